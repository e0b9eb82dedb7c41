//! broker-core: the model and the machinery of `broker`, without HTTP.
//!
//! - [`Broker`]: the running broker as the transports see it — the one publish call
//!   ([`Broker::publish`]), settings that a reload swaps, login checks, shutdown.
//! - [`config`]: the configuration model (native shape and webhook-queue's), loading with
//!   environment overrides, and write-back for password changes;
//!   [`settings::Settings`] is its validated, compiled form.
//! - [`actors`]: `Hub` (queue registry, poll consumers, prefix subscriptions, webhook
//!   supervision), `Queue` (one bounded, ordered log each), `Webhook` (one target each),
//!   `Cron`, `ConnectionRegistry`, `Leader`.
//! - [`log`]: the seam between a queue and where its messages are kept (`QueueLog`),
//!   filled today by the store; a replicated log fills it too.
//! - [`election`]: who does the once-across-replicas work (cron, delayed releases,
//!   webhook dispatch): one node, or the holder of the database's active lock.
//! - [`store`]: the `Store` trait behind every write, and its memory, SQLite and
//!   PostgreSQL backends (with the active lock and its fence).
//! - [`auth`]: ingest verifiers, user passwords, tokens, client addresses behind proxies.
//! - [`error`]: the one error type; each error's public code is assigned there.
//! - [`metrics`]: the Prometheus registry.
//!
//! docs/architecture.md is the map: who owns what, and the path of one message.

mod actors;
pub mod auth;
pub mod broker;
pub mod config;
pub mod crossbar;
pub mod delivery;
pub mod election;
pub mod error;
pub mod fabric;
pub mod log;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod pg_hooks;
pub mod random;
pub mod schedule;
pub mod settings;
pub mod store;

pub use actors::{Batch, ConsumerKey};

/// The interface of live subscribers (a WebSocket session): the messages a queue and
/// the connection registry send them, and what they register with.
pub mod subscriber {
    pub use crate::actors::subscriber::*;
    pub use crate::actors::{ConnectionInfo, Subscribed};
}
pub use broker::Broker;
pub use error::{Error, Rejection};
