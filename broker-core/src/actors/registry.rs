//! `ConnectionRegistry`: live connections by id and by user, for notifications
//! (API Gateway's NotifyUser / NotifyConnection), admin listing and disconnects.
//!
//! Sessions register when authenticated and unregister when they stop. Notifications are
//! `try_send`: a connection whose mailbox is full does not get this one (and does not
//! count as delivered), it never makes the sender wait.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;
use serde::Serialize;

use super::subscriber::{Disconnect, Notify, Regrant};
use crate::error::Error;
use crate::metrics::Metrics;

/// What the admin API shows of a connection.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ConnectionInfo {
    /// Connection id.
    pub id: Arc<str>,
    /// The user it authenticated as (empty for anonymous).
    pub user: String,
    /// The client address.
    pub remote: String,
    /// When it connected, RFC 3339.
    pub connected_at: String,
    /// The replica holding it (a NATS cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<Arc<str>>,
}

/// Adds an authenticated connection.
#[derive(Message)]
#[rtype(result = "Result<(), Error>")]
pub struct Register {
    /// What to list.
    pub info: ConnectionInfo,
    /// Where notifications go.
    pub notify: Recipient<Notify>,
    /// Where close requests go.
    pub control: Recipient<Disconnect>,
    /// Where reloads go.
    pub regrant: Recipient<Regrant>,
    /// `ws.max_connections_per_user` at the time of connecting.
    pub max_per_user: usize,
}

/// Removes a connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    /// Connection id.
    pub id: Arc<str>,
}

/// Pushes JSON `data` to every connection of a user; replies how many got it.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct NotifyUser {
    /// The user.
    pub user: String,
    /// The notification.
    pub notify: Notify,
}

/// Pushes JSON `data` to one connection; replies 1 or 0 (mailbox full), or an error.
#[derive(Message)]
#[rtype(result = "Result<usize, Error>")]
pub struct NotifyConnection {
    /// Connection id.
    pub id: String,
    /// The notification.
    pub notify: Notify,
}

/// Lists connections.
#[derive(Message)]
#[rtype(result = "Vec<ConnectionInfo>")]
pub struct ListConnections;

/// Closes one connection.
#[derive(Message)]
#[rtype(result = "Result<(), Error>")]
pub struct CloseConnection {
    /// Connection id.
    pub id: String,
    /// The close frame to send.
    pub disconnect: Disconnect,
}

struct Entry {
    info: ConnectionInfo,
    notify: Recipient<Notify>,
    control: Recipient<Disconnect>,
    regrant: Recipient<Regrant>,
}

/// Tells every connection that the configuration changed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegrantAll {
    /// The new settings.
    pub settings: Arc<crate::settings::Settings>,
}

impl Handler<RegrantAll> for ConnectionRegistry {
    type Result = ();

    fn handle(&mut self, msg: RegrantAll, _: &mut Self::Context) {
        for e in self.by_id.values() {
            // One per connection and reload: bounded by how often the config is reloaded.
            e.regrant.do_send(Regrant {
                settings: msg.settings.clone(),
            });
        }
    }
}

/// The registry of live connections.
pub struct ConnectionRegistry {
    by_id: HashMap<Arc<str>, Entry>,
    by_user: HashMap<String, HashSet<Arc<str>>>,
    metrics: Arc<Metrics>,
}

impl ConnectionRegistry {
    /// An empty registry.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            by_id: HashMap::new(),
            by_user: HashMap::new(),
            metrics,
        }
    }

    fn deliver(&self, entry: &Entry, notify: Notify) -> usize {
        usize::from(entry.notify.try_send(notify).is_ok())
    }
}

impl Actor for ConnectionRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<Register> for ConnectionRegistry {
    type Result = Result<(), Error>;

    fn handle(&mut self, msg: Register, _: &mut Self::Context) -> Self::Result {
        let user = msg.info.user.clone();
        let ids = self.by_user.entry(user.clone()).or_default();
        // Anonymous connections share the user "" and so one cap.
        if ids.len() >= msg.max_per_user {
            return Err(Error::TooManyConnections {
                user: if user.is_empty() {
                    "(anonymous)".to_owned()
                } else {
                    user
                },
                max: msg.max_per_user,
            });
        }
        ids.insert(msg.info.id.clone());
        self.by_id.insert(
            msg.info.id.clone(),
            Entry {
                info: msg.info,
                notify: msg.notify,
                control: msg.control,
                regrant: msg.regrant,
            },
        );
        Ok(())
    }
}

impl Handler<Unregister> for ConnectionRegistry {
    type Result = ();

    fn handle(&mut self, msg: Unregister, _: &mut Self::Context) {
        if let Some(e) = self.by_id.remove(&msg.id) {
            if let Some(ids) = self.by_user.get_mut(&e.info.user) {
                ids.remove(&msg.id);
                if ids.is_empty() {
                    self.by_user.remove(&e.info.user);
                }
            }
        }
    }
}

impl Handler<NotifyUser> for ConnectionRegistry {
    type Result = usize;

    fn handle(&mut self, msg: NotifyUser, _: &mut Self::Context) -> usize {
        let Some(ids) = self.by_user.get(&msg.user) else {
            return 0;
        };
        let n = ids
            .iter()
            .filter_map(|id| self.by_id.get(id))
            .map(|e| self.deliver(e, msg.notify.clone()))
            .sum();
        self.metrics
            .notifications
            .with_label_values(&["user"])
            .inc_by(n as u64);
        n
    }
}

impl Handler<NotifyConnection> for ConnectionRegistry {
    type Result = Result<usize, Error>;

    fn handle(&mut self, msg: NotifyConnection, _: &mut Self::Context) -> Self::Result {
        let e = self
            .by_id
            .get(msg.id.as_str())
            .ok_or(Error::UnknownConnection { id: msg.id })?;
        let n = self.deliver(e, msg.notify);
        self.metrics
            .notifications
            .with_label_values(&["connection"])
            .inc_by(n as u64);
        Ok(n)
    }
}

impl Handler<ListConnections> for ConnectionRegistry {
    type Result = Vec<ConnectionInfo>;

    fn handle(&mut self, _: ListConnections, _: &mut Self::Context) -> Self::Result {
        let mut v: Vec<ConnectionInfo> = self.by_id.values().map(|e| e.info.clone()).collect();
        v.sort_by(|a, b| a.connected_at.cmp(&b.connected_at).then(a.id.cmp(&b.id)));
        v
    }
}

impl Handler<CloseConnection> for ConnectionRegistry {
    type Result = Result<(), Error>;

    fn handle(&mut self, msg: CloseConnection, _: &mut Self::Context) -> Self::Result {
        let e = self
            .by_id
            .get(msg.id.as_str())
            .ok_or(Error::UnknownConnection { id: msg.id })?;
        // A close is one message per connection: do_send is bounded here.
        e.control.do_send(msg.disconnect);
        Ok(())
    }
}
