//! How the replicas of a cluster reach each other's live connections: notifications to
//! a user or a connection (API Gateway's NotifyUser / NotifyConnection), the list of
//! connections, and closing one, wherever the connection is held.
//!
//! A single node has no fabric. On NATS ([`crate::store::NatsFabric`]) each replica
//! announces itself in a key-value bucket whose entries expire, and answers requests on a
//! subject of its own; an ask goes to every live replica at once and waits for each
//! answer (a replica that does not answer within a second is left out, and logged).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::actors::ConnectionInfo;

/// What one replica asks the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Ask {
    /// Deliver `data` (JSON) to every connection of `user`.
    NotifyUser {
        /// The user.
        user: String,
        /// The notification's JSON.
        data: String,
    },
    /// Deliver `data` (JSON) to connection `id`.
    NotifyConnection {
        /// The connection.
        id: String,
        /// The notification's JSON.
        data: String,
    },
    /// List the live connections.
    Connections,
    /// Close connection `id` with `code` and `reason`.
    Close {
        /// The connection.
        id: String,
        /// WebSocket close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
}

/// A replica's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Answer {
    /// A notification: whether the connection is held here, and how many got it.
    Notified {
        /// Whether the connection (NotifyConnection) is held by this replica.
        found: bool,
        /// Connections that got it.
        delivered: usize,
    },
    /// The connections held here.
    Connections(Vec<ConnectionInfo>),
    /// Whether the connection was held here (and is being closed).
    Closed {
        /// Held here.
        found: bool,
    },
}

/// Answers another replica's [`Ask`].
pub type Responder = Arc<dyn Fn(Ask) -> BoxFuture<'static, Answer> + Send + Sync>;

/// The replicas of a cluster, as one of them sees them.
pub trait Fabric: Send + Sync + 'static {
    /// This replica's id.
    fn node(&self) -> Arc<str>;
    /// Asks every other live replica; their answers.
    fn ask_all(&self, ask: Ask) -> BoxFuture<'static, Vec<Answer>>;
    /// Starts answering the others with `responder`.
    fn serve(&self, responder: Responder);
}
