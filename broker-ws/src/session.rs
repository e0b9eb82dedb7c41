//! The session core: what a WebSocket session is whatever protocol it speaks.
//!
//! A [`Session`] authenticates (at connect, or in its protocol within `ws.auth_timeout`),
//! registers with the broker's connection registry (connection caps), keeps its
//! subscriptions (each a [`Subscriber`] registered with a queue, or a prefix), publishes
//! through the broker's front door with its grants, writes events, follows reloads
//! (`Regrant`) and token expiry, and counts frames. What is said on the wire is the
//! [`Dialect`]'s: the native JSON protocol (`native.rs`) or WAMP v2 (`wamp_dialect.rs`);
//! neither knows the other. The socket itself is the [`Link`], implemented by
//! `transport.rs` — the one file that names actix-web-actors.
//!
//! Backpressure: the transport's mailbox is bounded by `ws.max_pending_messages` and
//! queues account the bytes a session has not consumed (`ws.max_pending_bytes`); a session
//! that does not keep up is dropped by the queue and gets one `Lagged`, which its dialect
//! turns into a refresh or a close (4008).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;
use broker_core::auth::token::Claims;
use broker_core::broker::{PublishOutcome, PublishRequest, Publisher, Subscription};
use broker_core::message::{Message, NewMessage};
use broker_core::settings::{grants, Settings, WsSettings};
use broker_core::subscriber::Subscribed;
use broker_core::subscriber::{
    next_subscription_id, ConnectionInfo, Deliver, Disconnect, Lagged, Notify, Regrant, Subscriber,
};
use broker_core::Broker;
use bytestring::ByteString;

use crate::protocol::close;

/// Who a session acts as.
#[derive(Debug, Clone)]
pub struct Identity {
    /// User name (empty when anonymous).
    pub user: String,
    /// Queues (and patterns) it may subscribe to.
    pub read: Vec<String>,
    /// Queues (and patterns) it may publish into.
    pub publish: Vec<String>,
    /// When its token expires (Unix ms): the session is closed then (4001).
    pub expires_at_ms: Option<i64>,
    /// The token's claims, when it came from one (its rights are re-derived from them
    /// at a reload).
    pub claims: Option<Claims>,
}

impl Identity {
    /// From verified token claims; missing grant lists fall back to the configured user.
    pub fn from_claims(c: Claims, settings: &Settings) -> Self {
        let user = settings.users.get(&c.sub);
        Identity {
            read: c
                .queues
                .clone()
                .unwrap_or_else(|| user.map(|u| u.grants.clone()).unwrap_or_default()),
            publish: c
                .publish
                .clone()
                .unwrap_or_else(|| user.map(|u| u.publish.clone()).unwrap_or_default()),
            expires_at_ms: Some(c.exp.saturating_mul(1000)),
            user: c.sub.clone(),
            claims: Some(c),
        }
    }

    /// A configured user that logged in (Basic at the upgrade, WAMP ticket).
    pub fn of_user(u: &broker_core::settings::UserSpec) -> Self {
        Identity {
            user: u.name.clone(),
            read: u.grants.clone(),
            publish: u.publish.clone(),
            expires_at_ms: None,
            claims: None,
        }
    }

    /// An anonymous session (only when `ws.allow_anonymous`).
    pub fn anonymous(ws: &WsSettings) -> Self {
        Identity {
            user: String::new(),
            read: ws.config.anonymous_queues.clone(),
            publish: Vec::new(),
            expires_at_ms: None,
            claims: None,
        }
    }

    /// The same session's rights under `settings` (after a reload): `None` when it has
    /// none any more (its user was removed, anonymous access was turned off).
    pub fn under(&self, settings: &Settings) -> Option<Identity> {
        if let Some(c) = &self.claims {
            return Some(Identity::from_claims(c.clone(), settings));
        }
        if self.user.is_empty() {
            return settings
                .ws
                .config
                .allow_anonymous
                .then(|| Identity::anonymous(&settings.ws));
        }
        settings.users.get(&self.user).map(|u| Identity::of_user(u))
    }
}

/// One subscription of a session.
pub(crate) struct Sub {
    /// Queue name, or the prefix of a prefix subscription.
    pub(crate) topic: String,
    /// What ends it.
    pub(crate) handle: Subscription,
    /// An exact subscription (one queue, with a replay), not a prefix one.
    pub(crate) exact: bool,
    /// Bytes delivered to the session and not yet written (shared with the queues).
    pub(crate) pending: Arc<AtomicUsize>,
    /// Newest offset delivered (exact subscriptions: the replay/live seam).
    pub(crate) last_offset: u64,
}

/// What runs on the session once a future it waited for is done.
pub(crate) type Then<D> = Box<dyn FnOnce(&mut Session<D>, &mut dyn Link<D>)>;

/// A future whose outcome is what to do next.
pub(crate) type Pending<D> = Pin<Box<dyn Future<Output = Then<D>>>>;

/// Where the connection registry reaches a session.
pub(crate) struct Endpoints {
    /// Notifications for its user or connection.
    pub notify: Recipient<Notify>,
    /// Closing it (admin, shutdown).
    pub control: Recipient<Disconnect>,
    /// Reloads.
    pub regrant: Recipient<Regrant>,
}

/// What the session asks of its transport (the socket and the actor around it).
pub(crate) trait Link<D: Dialect> {
    /// Writes a text frame.
    fn text(&mut self, frame: ByteString);
    /// Sends a close frame and ends the connection.
    fn close(&mut self, code: u16, reason: &'static str);
    /// Runs `fut`; nothing else (no frame, no delivery) is handled until its outcome
    /// has run.
    fn wait(&mut self, fut: Pending<D>);
    /// Runs `fut` beside the session's other work.
    fn spawn(&mut self, fut: Pending<D>);
    /// Runs `then` after `after`.
    fn later(&mut self, after: Duration, then: Then<D>);
    /// A subscriber delivering to this session as subscription `id`.
    fn subscriber(
        &self,
        id: u64,
        pending: Arc<AtomicUsize>,
        max_pending_bytes: usize,
    ) -> Subscriber;
    /// Where the connection registry reaches this session.
    fn endpoints(&self) -> Endpoints;
}

/// A protocol a session speaks. Each hook gets the whole session (its own state is
/// `session.dialect`) and the link.
pub(crate) trait Dialect: Sized + Unpin + 'static {
    /// A text frame from the client.
    fn text(s: &mut Session<Self>, link: &mut dyn Link<Self>, text: &str);
    /// A binary frame from the client (neither protocol has them).
    fn binary(s: &mut Session<Self>, link: &mut dyn Link<Self>);
    /// The session is authenticated and registered: greet it.
    fn welcome(s: &mut Session<Self>, link: &mut dyn Link<Self>);
    /// The registry refused the session (too many connections); it is closed next.
    fn refused(s: &mut Session<Self>, link: &mut dyn Link<Self>, e: &broker_core::Error);
    /// No authentication within `ws.auth_timeout`; it is closed next.
    fn auth_timeout(s: &mut Session<Self>, link: &mut dyn Link<Self>);
    /// The server is about to close the session with `code`: last words, if any.
    fn closing(s: &mut Session<Self>, link: &mut dyn Link<Self>, code: u16);
    /// The frame that carries `m` for subscription `sub`.
    fn event(m: &Message, sub: u64) -> ByteString;
    /// A queue dropped subscription `msg.subscription` (still held) for falling behind.
    fn lagged(s: &mut Session<Self>, link: &mut dyn Link<Self>, msg: Lagged);
    /// A notification for this session's user or connection.
    fn notify(s: &mut Session<Self>, link: &mut dyn Link<Self>, data: &[u8]);
}

/// A WebSocket session, speaking dialect `D`.
pub(crate) struct Session<D> {
    pub(crate) id: Arc<str>,
    /// Numeric id (WAMP's session id; what `exclude`/`eligible` name).
    pub(crate) session_id: u64,
    pub(crate) broker: Arc<Broker>,
    pub(crate) ws: Arc<WsSettings>,
    pub(crate) remote: IpAddr,
    /// Set once authenticated.
    pub(crate) identity: Option<Identity>,
    registered: bool,
    /// Subscriptions by id.
    pub(crate) subs: HashMap<u64, Sub>,
    /// The `broker_ws_disconnects_total` reason.
    close_reason: &'static str,
    /// `broker_ws_frames_total{direction}`, looked up once.
    frames_in: prometheus::IntCounter,
    frames_out: prometheus::IntCounter,
    /// The protocol's own state.
    pub(crate) dialect: D,
}

impl<D: Dialect> Session<D> {
    /// A session for a connection from `remote`, authenticated already or not.
    pub(crate) fn new(
        broker: Arc<Broker>,
        remote: IpAddr,
        identity: Option<Identity>,
        dialect: D,
    ) -> Self {
        let ws = broker.settings().ws.clone();
        let frames = &broker.metrics().ws_frames;
        let (frames_in, frames_out) = (
            frames.with_label_values(&["in"]),
            frames.with_label_values(&["out"]),
        );
        Self {
            frames_in,
            frames_out,
            id: broker_core::random::id(),
            session_id: broker_core::crossbar::random_session_id(),
            broker,
            ws,
            remote,
            identity,
            registered: false,
            subs: HashMap::new(),
            close_reason: "client_closed",
            dialect,
        }
    }

    /// The connection is open: shutdown closes it; it authenticates now or within
    /// `ws.auth_timeout`.
    pub(crate) fn start(&mut self, link: &mut dyn Link<D>) {
        self.broker.metrics().ws_connections.inc();
        let mut shutdown = self.broker.shutdown_signal();
        link.spawn(Box::pin(async move {
            if !*shutdown.borrow_and_update() {
                let _ = shutdown.changed().await;
            }
            Box::new(|s: &mut Session<D>, link: &mut dyn Link<D>| {
                s.close(link, close::GOING_AWAY, "shutting_down")
            }) as Then<D>
        }));
        match self.identity.take() {
            Some(identity) => self.authorized(link, identity),
            None => link.later(
                self.ws.config.auth_timeout,
                Box::new(|s, link| {
                    if s.identity.is_none() {
                        D::auth_timeout(s, link);
                        s.close(link, close::AUTH_TIMEOUT, "auth_timeout");
                    }
                }),
            ),
        }
    }

    /// The connection is gone: subscriptions end, the registry forgets it.
    pub(crate) fn stopped(&mut self) {
        for (_, sub) in self.subs.drain() {
            sub.handle.cancel();
        }
        if self.registered {
            self.broker.unregister_connection(self.id.clone());
        }
        let m = self.broker.metrics();
        m.ws_connections.dec();
        m.ws_disconnects
            .with_label_values(&[self.close_reason])
            .inc();
    }

    /// Writes a frame (counted).
    pub(crate) fn send(&self, link: &mut dyn Link<D>, frame: ByteString) {
        self.frames_out.inc();
        link.text(frame);
    }

    /// Counts a frame from the client.
    pub(crate) fn heard_frame(&self) {
        self.frames_in.inc();
    }

    /// Closes the connection with `code`, after the dialect's last words.
    pub(crate) fn close(&mut self, link: &mut dyn Link<D>, code: u16, reason: &'static str) {
        D::closing(self, link, code);
        self.close_reason = reason;
        link.close(code, reason);
    }

    /// Registers the now-authenticated session (connection caps) and has it greeted.
    pub(crate) fn authorized(&mut self, link: &mut dyn Link<D>, identity: Identity) {
        let user = identity.user.clone();
        if let Some(at) = identity.expires_at_ms {
            // Rights end with the token: closed at its expiry, whatever it is doing.
            let now = broker_core::message::now_ms();
            let left = Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0));
            link.later(
                left,
                Box::new(|s, link| s.close(link, close::INVALID_TOKEN, "token_expired")),
            );
        }
        self.identity = Some(identity);
        let info = ConnectionInfo {
            id: self.id.clone(),
            user: user.clone(),
            remote: self.remote.to_string(),
            connected_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            replica: None,
        };
        let cfg = &self.ws.config;
        let max = if user.is_empty() {
            cfg.max_anonymous_connections
        } else {
            cfg.max_connections_per_user
        };
        let e = link.endpoints();
        let register = self
            .broker
            .register_connection(info, e.notify, e.control, e.regrant, max);
        link.wait(Box::pin(async move {
            let res = register.await;
            Box::new(
                move |s: &mut Session<D>, link: &mut dyn Link<D>| match res {
                    Ok(()) => {
                        s.registered = true;
                        D::welcome(s, link);
                    }
                    Err(broker_core::Error::ShuttingDown) => {
                        s.close(link, close::GOING_AWAY, "shutting_down")
                    }
                    Err(e) => {
                        D::refused(s, link, &e);
                        s.close(link, close::TOO_MANY_CONNECTIONS, "too_many_connections");
                    }
                },
            ) as Then<D>
        }));
    }

    /// Whether one more subscription fits (`ws.max_subscriptions`): the refusal's
    /// message otherwise.
    pub(crate) fn room_for_a_subscription(&self) -> Result<(), String> {
        let max = self.ws.config.max_subscriptions;
        if self.subs.len() >= max {
            return Err(format!("at most {max} subscriptions per connection"));
        }
        Ok(())
    }

    /// A subscriber for subscription `id`, with a fresh pending-bytes counter.
    fn subscriber(&self, link: &dyn Link<D>, id: u64) -> (Subscriber, Arc<AtomicUsize>) {
        let pending = Arc::new(AtomicUsize::new(0));
        let max = self.ws.config.max_pending_bytes;
        (link.subscriber(id, pending.clone(), max), pending)
    }

    /// Subscribes to queue `queue` (the caller has checked the grant), replaying after
    /// `since`. Nothing else is handled until `then` has run with the outcome — the
    /// subscription is in place by then, and `then` writes the reply and the replay
    /// before any live message: no gap and no duplicate at the seam.
    pub(crate) fn subscribe(
        &mut self,
        link: &mut dyn Link<D>,
        queue: String,
        since: Option<u64>,
        epoch: Option<String>,
        then: impl FnOnce(&mut Session<D>, &mut dyn Link<D>, Result<(u64, Subscribed), broker_core::Error>)
            + 'static,
    ) {
        let (subscriber, pending) = self.subscriber(link, next_subscription_id());
        let id = subscriber.id;
        let broker = self.broker.clone();
        link.wait(Box::pin(async move {
            let res = broker.subscribe(&queue, subscriber, since, epoch).await;
            Box::new(move |s: &mut Session<D>, link: &mut dyn Link<D>| {
                let res = res.map(|(handle, reply)| {
                    let sub = Sub {
                        topic: queue,
                        handle,
                        exact: true,
                        pending,
                        last_offset: reply.head,
                    };
                    s.subs.insert(id, sub);
                    (id, reply)
                });
                then(s, link, res);
            }) as Then<D>
        }));
    }

    /// Subscribes to every queue whose name starts with `prefix` that the session may
    /// read, running now or later, live; its id.
    pub(crate) fn subscribe_prefix(&mut self, link: &mut dyn Link<D>, prefix: String) -> u64 {
        let read = self
            .identity
            .as_ref()
            .map(|i| i.read.clone())
            .unwrap_or_default();
        let (subscriber, pending) = self.subscriber(link, next_subscription_id());
        let id = subscriber.id;
        let handle = self
            .broker
            .subscribe_prefix(prefix.clone(), read, subscriber);
        let sub = Sub {
            topic: prefix,
            handle,
            exact: false,
            pending,
            last_offset: 0,
        };
        self.subs.insert(id, sub);
        id
    }

    /// Registers subscription `id` with `queue` again, live (after it lagged), keeping
    /// its id and pending-bytes counter.
    pub(crate) fn resubscribe_live(&mut self, link: &mut dyn Link<D>, id: u64, queue: Arc<str>) {
        let Some(sub) = self.subs.get(&id) else {
            return;
        };
        let max = self.ws.config.max_pending_bytes;
        let subscriber = link.subscriber(id, sub.pending.clone(), max);
        let broker = self.broker.clone();
        link.spawn(Box::pin(async move {
            // The session keeps its first handle: same queue, same subscription id.
            let res = broker.subscribe(&queue, subscriber, None, None).await;
            Box::new(move |_: &mut Session<D>, _: &mut dyn Link<D>| {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "resubscribe after lag failed");
                }
            }) as Then<D>
        }));
    }

    /// The id of the exact subscription to `queue`.
    pub(crate) fn exact_sub(&self, queue: &str) -> Option<u64> {
        self.subs
            .iter()
            .find(|(_, s)| s.exact && s.topic == queue)
            .map(|(id, _)| *id)
    }

    /// Ends subscription `id` (with its queue, or the Hub for a prefix one).
    pub(crate) fn drop_sub(&mut self, id: u64) -> Option<Sub> {
        let sub = self.subs.remove(&id)?;
        sub.handle.cancel();
        Some(sub)
    }

    /// Publishes one message through the broker's front door as this session (its
    /// publish grants and address); `then` gets the queue's name and the outcome.
    pub(crate) fn publish(
        &mut self,
        link: &mut dyn Link<D>,
        queue: String,
        msg: NewMessage,
        then: impl FnOnce(
                &mut Session<D>,
                &mut dyn Link<D>,
                &str,
                Result<PublishOutcome, broker_core::Error>,
            ) + 'static,
    ) {
        let grants = self
            .identity
            .as_ref()
            .map(|i| i.publish.clone())
            .unwrap_or_default();
        let (broker, remote) = (self.broker.clone(), self.remote);
        link.wait(Box::pin(async move {
            let out = broker
                .publish(PublishRequest {
                    queue: &queue,
                    publisher: Publisher::Session {
                        grants: &grants,
                        client_ip: remote,
                    },
                    messages: vec![msg],
                    deliver_at_ms: None,
                })
                .await;
            Box::new(move |s: &mut Session<D>, link: &mut dyn Link<D>| then(s, link, &queue, out))
                as Then<D>
        }));
    }

    /// Whether the session may read `queue`.
    pub(crate) fn may_read(&self, queue: &str) -> bool {
        self.identity
            .as_ref()
            .is_some_and(|i| grants(&i.read, queue))
    }

    /// Messages a queue delivered: written, minus what a replay wrote already.
    pub(crate) fn deliver(&mut self, link: &mut dyn Link<D>, msg: Deliver) {
        let Some(sub) = self.subs.get_mut(&msg.subscription) else {
            return; // unsubscribed meanwhile
        };
        sub.pending.fetch_sub(msg.bytes, Ordering::AcqRel);
        // Exact subscriptions skip what their replay sent; prefix ones have no replay.
        let from = if sub.exact { sub.last_offset } else { 0 };
        if let Some(last) = msg.messages.last() {
            sub.last_offset = sub.last_offset.max(last.offset);
        }
        for m in msg.messages.iter().filter(|m| m.offset > from) {
            self.write_event(link, msg.subscription, m);
        }
    }

    /// Writes one message for subscription `sub`, if it is meant for this session.
    pub(crate) fn write_event(&self, link: &mut dyn Link<D>, sub: u64, m: &Message) {
        if m.audience
            .as_ref()
            .is_some_and(|a| !a.admits(self.session_id))
        {
            return;
        }
        self.send(link, D::event(m, sub));
        self.broker
            .metrics()
            .ws_delivery_latency
            .observe(m.accepted.elapsed().as_secs_f64());
    }

    /// A queue dropped a subscription of this session for falling behind.
    pub(crate) fn lagged(&mut self, link: &mut dyn Link<D>, msg: Lagged) {
        if self.subs.contains_key(&msg.subscription) {
            D::lagged(self, link, msg);
        }
    }

    /// A reload: rights are re-derived; a session that lost its user, or the grant of a
    /// subscription it holds, is closed (4011) — the client reconnects and sees what it
    /// may now. Narrower publish grants apply to the next publish.
    pub(crate) fn regrant(&mut self, link: &mut dyn Link<D>, msg: Regrant) {
        let Some(current) = &self.identity else {
            return;
        };
        let Some(new) = current.under(&msg.settings) else {
            return self.close(link, close::REVOKED, "user_removed");
        };
        let lost = self.subs.values().any(|s| {
            let granted = if s.exact {
                grants(&new.read, &s.topic)
            } else {
                // A prefix subscription: every grant it was made under must remain.
                current.read.iter().all(|g| new.read.contains(g))
            };
            !granted
        });
        if lost {
            return self.close(link, close::REVOKED, "grants_revoked");
        }
        self.identity = Some(Identity {
            expires_at_ms: current.expires_at_ms,
            ..new
        });
    }
}
