//! `WsSession`: one actor per WebSocket connection.
//!
//! It authenticates (at connect, or with `authorize` within `ws.auth_timeout`), keeps
//! its subscriptions (each a [`Subscriber`] registered with a queue), writes message
//! events, and answers actions. Its mailbox is bounded by `ws.max_pending_messages` and
//! queues account the bytes it has not consumed (`ws.max_pending_bytes`): a session that
//! does not keep up is dropped by the queue and gets one `Lagged`, then either a
//! `refresh` event (it continues from the newest message) or close code 4008.
//! Note that actix polls this actor only while the HTTP layer can write to the socket:
//! a client that stops reading stalls only its own session.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::Item;
use actix_web_actors::ws;
use broker_core::auth::token::{self, Claims};
use broker_core::broker::Subscription;
use broker_core::broker::{PublishOutcome, PublishRequest, Publisher};
use broker_core::config::SlowConsumer;
use broker_core::message::{Message, NewMessage};
use broker_core::settings::{grants, Settings, WsSettings};
use broker_core::subscriber::{
    next_subscription_id, ConnectionInfo, Deliver, Disconnect, Lagged, Notify, Regrant, Subscriber,
};
use broker_core::Broker;
use bytes::{Bytes, BytesMut};
use serde_json::value::RawValue;

use crate::protocol::{self, close, Action};

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

pub(crate) struct Sub {
    /// Queue name, or the prefix of a prefix subscription.
    pub(crate) topic: String,
    /// What ends it.
    pub(crate) handle: Subscription,
    /// An exact subscription (one queue, with a replay), not a prefix one.
    pub(crate) exact: bool,
    pub(crate) pending: Arc<AtomicUsize>,
    /// Newest offset delivered (exact subscriptions: the replay/live seam).
    pub(crate) last_offset: u64,
}

/// The protocol a connection speaks, chosen by its subprotocol at the upgrade.
pub(crate) enum Dialect {
    /// The native JSON protocol (`protocol`).
    Native,
    /// WAMP v2 (`wamp.2.json`).
    Wamp(Box<crate::wamp_session::WampState>),
}

/// A WebSocket connection.
pub struct WsSession {
    pub(crate) id: Arc<str>,
    /// Numeric id (WAMP's session id; what `exclude`/`eligible` name).
    pub(crate) session_id: u64,
    pub(crate) broker: Arc<Broker>,
    pub(crate) ws: Arc<WsSettings>,
    pub(crate) remote: IpAddr,
    pub(crate) identity: Option<Identity>,
    registered: bool,
    /// Subscriptions by id.
    pub(crate) subs: HashMap<u64, Sub>,
    last_heard: Instant,
    fragments: Option<(bool, BytesMut)>,
    close_reason: &'static str,
    pub(crate) dialect: Dialect,
}

impl WsSession {
    /// A session for a connection from `remote`, authenticated already or not.
    pub fn new(broker: Arc<Broker>, remote: IpAddr, identity: Option<Identity>) -> Self {
        let ws = broker.settings().ws.clone();
        Self {
            id: new_connection_id(),
            session_id: broker_core::crossbar::random_session_id(),
            broker,
            ws,
            remote,
            identity,
            registered: false,
            subs: HashMap::new(),
            last_heard: Instant::now(),
            fragments: None,
            close_reason: "client_closed",
            dialect: Dialect::Native,
        }
    }

    /// The same session speaking WAMP (`wamp.2.json`): credentials given at the upgrade
    /// are used once the client sends HELLO.
    pub fn wamp(broker: Arc<Broker>, remote: IpAddr, identity: Option<Identity>) -> Self {
        let mut s = Self::new(broker, remote, None);
        s.dialect = Dialect::Wamp(Box::new(crate::wamp_session::WampState::new(identity)));
        s
    }

    fn is_wamp(&self) -> bool {
        matches!(self.dialect, Dialect::Wamp(_))
    }

    /// The id of the native subscription to `queue`.
    fn native_sub(&self, queue: &str) -> Option<u64> {
        self.subs
            .iter()
            .find(|(_, s)| s.exact && s.topic == queue)
            .map(|(id, _)| *id)
    }

    /// A subscriber for this session, and its pending-bytes counter.
    pub(crate) fn new_subscriber(
        &self,
        ctx: &mut ws::WebsocketContext<Self>,
        id: u64,
    ) -> (Subscriber, Arc<AtomicUsize>) {
        let pending = Arc::new(AtomicUsize::new(0));
        let addr = ctx.address();
        let subscriber = Subscriber {
            id,
            deliver: addr.clone().recipient(),
            lagged: addr.recipient(),
            pending_bytes: pending.clone(),
            max_pending_bytes: self.ws.config.max_pending_bytes,
        };
        (subscriber, pending)
    }
    pub(crate) fn send(&self, ctx: &mut ws::WebsocketContext<Self>, frame: bytestring::ByteString) {
        self.broker
            .metrics()
            .ws_frames
            .with_label_values(&["out"])
            .inc();
        ctx.text(frame);
    }

    fn error(
        &self,
        ctx: &mut ws::WebsocketContext<Self>,
        id: Option<&RawValue>,
        code: &str,
        message: &str,
    ) {
        self.send(ctx, protocol::error(id, code, message));
    }

    pub(crate) fn close(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        code: u16,
        reason: &'static str,
    ) {
        if self.is_wamp() && self.identity.is_some() {
            self.wamp_goodbye(ctx, code);
        }
        self.close_reason = reason;
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::Other(code),
            description: Some(reason.to_owned()),
        }));
        ctx.stop();
    }

    /// Registers the now-authenticated session and greets it.
    pub(crate) fn authorized(&mut self, ctx: &mut ws::WebsocketContext<Self>, identity: Identity) {
        let user = identity.user.clone();
        if let Some(at) = identity.expires_at_ms {
            // Rights end with the token: closed at its expiry, whatever it is doing.
            let now = broker_core::message::now_ms();
            let left = Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0));
            ctx.run_later(left, |act, ctx| {
                act.close(ctx, close::INVALID_TOKEN, "token_expired");
            });
        }
        self.identity = Some(identity);
        let addr = ctx.address();
        let info = ConnectionInfo {
            id: self.id.clone(),
            user: user.clone(),
            remote: self.remote.to_string(),
            connected_at: chrono_now(),
        };
        let cfg = &self.ws.config;
        let max = if user.is_empty() {
            cfg.max_anonymous_connections
        } else {
            cfg.max_connections_per_user
        };
        let register = self.broker.register_connection(
            info,
            addr.clone().recipient(),
            addr.clone().recipient(),
            addr.recipient(),
            max,
        );
        ctx.wait(
            register
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok(()) => {
                        act.registered = true;
                        if act.is_wamp() {
                            act.wamp_welcome(ctx);
                        } else {
                            let hello = protocol::connected(&act.id, &user);
                            act.send(ctx, hello);
                        }
                    }
                    Err(broker_core::Error::ShuttingDown) => {
                        act.close(ctx, close::GOING_AWAY, "shutting_down")
                    }
                    Err(e) => {
                        if act.is_wamp() {
                            act.wamp_abort(ctx, crate::wamp::uri::NOT_AUTHORIZED, &e.to_string());
                        } else {
                            act.error(ctx, None, "too_many_connections", &e.to_string());
                        }
                        act.close(ctx, close::TOO_MANY_CONNECTIONS, "too_many_connections");
                    }
                }),
        );
    }

    fn handle_text(&mut self, ctx: &mut ws::WebsocketContext<Self>, text: &str) {
        if self.is_wamp() {
            return self.wamp_text(ctx, text);
        }
        let (id, action) = match protocol::parse(text) {
            Ok(p) => p,
            Err((id, (code, message))) => return self.error(ctx, id.as_deref(), code, &message),
        };
        let id = id.as_deref();
        if let Action::Authorize(t) = &action {
            if self.identity.is_some() {
                return self.error(
                    ctx,
                    id,
                    "already_authorized",
                    "this connection is authorized already",
                );
            }
            let settings = self.broker.settings();
            match token::verify(t, &settings.ws.jwt_secrets) {
                Ok(claims) => self.authorized(ctx, Identity::from_claims(claims, &settings)),
                Err(e) => {
                    self.error(ctx, id, "invalid_token", &e.to_string());
                    self.close(ctx, close::INVALID_TOKEN, "invalid_token");
                }
            }
            return;
        }
        if matches!(action, Action::Ping) {
            return self.send(ctx, protocol::pong(id));
        }
        if let Action::Unknown(name) = &action {
            let msg = format!(
                "no action `{name}`; actions: authorize, subscribe, unsubscribe, publish, ping"
            );
            return self.error(ctx, id, "not_implemented", &msg);
        }
        let Some(identity) = self.identity.clone() else {
            return self.error(
                ctx,
                id,
                "unauthorized",
                "send {\"action\":\"authorize\",\"token\":…} first",
            );
        };
        let id = id.map(|r| r.to_owned());
        match action {
            Action::Subscribe {
                queue,
                since,
                epoch,
            } => self.subscribe(ctx, &identity, id, queue, since, epoch),
            Action::Unsubscribe(queue) => match self.native_sub(&queue) {
                Some(sub_id) => {
                    self.drop_sub(sub_id);
                    self.send(ctx, protocol::unsubscribed(id.as_deref(), &queue));
                }
                None => self.error(
                    ctx,
                    id.as_deref(),
                    "not_subscribed",
                    "not subscribed to that queue",
                ),
            },
            Action::Publish { queue, data } => self.publish(ctx, &identity, id, queue, data),
            Action::Authorize(_) | Action::Ping | Action::Unknown(_) => {
                unreachable!("handled above")
            }
        }
    }

    fn subscribe(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        identity: &Identity,
        id: Option<Box<RawValue>>,
        queue: String,
        since: Option<u64>,
        epoch: Option<String>,
    ) {
        let id_ref = id.as_deref();
        if !grants(&identity.read, &queue) {
            return self.error(
                ctx,
                id_ref,
                "not_granted",
                &format!("not allowed to subscribe to `{queue}`"),
            );
        }
        if self.native_sub(&queue).is_some() {
            return self.error(
                ctx,
                id_ref,
                "already_subscribed",
                &format!("already subscribed to `{queue}`"),
            );
        }
        if self.subs.len() >= self.ws.config.max_subscriptions {
            let msg = format!(
                "at most {} subscriptions per connection",
                self.ws.config.max_subscriptions
            );
            return self.error(ctx, id_ref, "too_many_subscriptions", &msg);
        }
        let (subscriber, pending) = self.new_subscriber(ctx, next_subscription_id());
        let sub_id = subscriber.id;
        let broker = self.broker.clone();
        let name = queue.clone();
        let fut = async move { broker.subscribe(&name, subscriber, since, epoch).await };
        // `wait`: no delivery is handled before the replay is written, so the seam
        // between replay and live messages has no gap and no duplicate.
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
            let (handle, reply) = match res {
                Ok(r) => r,
                Err(e) => return act.error(ctx, id.as_deref(), e.code(), &e.to_string()),
            };
            if reply.unrecoverable {
                act.send(
                    ctx,
                    protocol::refresh(&queue, "unrecoverable_position", reply.head, &reply.epoch),
                );
            }
            act.send(
                ctx,
                protocol::subscribed(
                    id.as_deref(),
                    &queue,
                    reply.head,
                    &reply.epoch,
                    reply.recovered,
                ),
            );
            for m in &reply.replay {
                act.send_message(ctx, sub_id, m);
            }
            act.subs.insert(
                sub_id,
                Sub {
                    topic: queue,
                    handle,
                    exact: true,
                    pending,
                    last_offset: reply.head,
                },
            );
        }));
    }

    fn publish(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        identity: &Identity,
        id: Option<Box<RawValue>>,
        queue: String,
        data: String,
    ) {
        let msg = NewMessage {
            audience: None,
            body: Bytes::from(data),
            content_type: Some(Arc::from("application/json")),
            headers: Vec::new(),
        };
        let fut = self.publish_one(identity.publish.clone(), queue, msg);
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok((
                queue,
                PublishOutcome::Published {
                    published: p,
                    delivered,
                },
            )) => {
                let frame =
                    protocol::published(id.as_deref(), &queue, p.last_offset, &p.epoch, delivered);
                act.send(ctx, frame);
            }
            Ok((_, PublishOutcome::Scheduled(_))) => {
                act.error(ctx, id.as_deref(), "error", "unexpected delayed publish")
            }
            Err(e) => act.error(ctx, id.as_deref(), e.code(), &e.to_string()),
        }));
    }

    /// Publishes one message through the broker's front door as this session (its
    /// publish grants and address): the queue's name and the outcome. Both dialects
    /// publish this way.
    pub(crate) fn publish_one(
        &self,
        grants: Vec<String>,
        queue: String,
        msg: NewMessage,
    ) -> impl std::future::Future<Output = Result<(String, PublishOutcome), broker_core::Error>>
    {
        let (broker, remote) = (self.broker.clone(), self.remote);
        async move {
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
                .await?;
            Ok((queue, out))
        }
    }

    /// Ends subscription `id` (with its queue, or the Hub for a prefix one).
    pub(crate) fn drop_sub(&mut self, id: u64) -> Option<Sub> {
        let sub = self.subs.remove(&id)?;
        sub.handle.cancel();
        Some(sub)
    }

    fn send_message(&self, ctx: &mut ws::WebsocketContext<Self>, sub_id: u64, m: &Message) {
        if m.audience
            .as_ref()
            .is_some_and(|a| !a.admits(self.session_id))
        {
            return;
        }
        let frame = if self.is_wamp() {
            let tail = m.wamp_event.get_or_init(|| crate::wamp::event_tail(m));
            crate::wamp::event(sub_id, tail)
        } else {
            m.ws_frame.get_or_init(|| protocol::message(m)).clone()
        };
        self.send(ctx, frame);
        self.broker
            .metrics()
            .ws_delivery_latency
            .observe(m.accepted.elapsed().as_secs_f64());
    }

    fn heartbeat(&self, ctx: &mut ws::WebsocketContext<Self>) {
        let (interval, timeout) = (self.ws.config.ping_interval, self.ws.config.pong_timeout);
        ctx.run_interval(interval, move |_, ctx| {
            let sent = Instant::now();
            ctx.ping(b"");
            ctx.run_later(timeout, move |act, ctx| {
                if act.last_heard < sent {
                    act.close(ctx, close::NO_PONG, "no_pong");
                }
            });
        });
    }
}

impl Actor for WsSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.ws.config.max_pending_messages);
        self.broker.metrics().ws_connections.inc();
        self.heartbeat(ctx);
        // Shutdown closes every connection, authenticated or not.
        let mut shutdown = self.broker.shutdown_signal();
        ctx.spawn(
            async move {
                if !*shutdown.borrow_and_update() {
                    let _ = shutdown.changed().await;
                }
            }
            .into_actor(self)
            .map(|_, act, ctx| act.close(ctx, close::GOING_AWAY, "shutting_down")),
        );
        match self.identity.take() {
            Some(identity) => self.authorized(ctx, identity),
            None => {
                ctx.run_later(self.ws.config.auth_timeout, |act, ctx| {
                    if act.identity.is_none() {
                        if act.is_wamp() {
                            act.wamp_abort(
                                ctx,
                                crate::wamp::uri::AUTHENTICATION_FAILED,
                                "no HELLO/AUTHENTICATE within ws.auth_timeout",
                            );
                        } else {
                            act.error(
                                ctx,
                                None,
                                "auth_timeout",
                                "no authorize within ws.auth_timeout",
                            );
                        }
                        act.close(ctx, close::AUTH_TIMEOUT, "auth_timeout");
                    }
                });
            }
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let ids: Vec<u64> = self.subs.keys().copied().collect();
        for id in ids {
            self.drop_sub(id);
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
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        let msg = match item {
            Ok(m) => m,
            Err(ws::ProtocolError::Overflow) => {
                return self.close(ctx, close::TOO_BIG, "frame_too_large");
            }
            Err(_) => return self.close(ctx, close::PROTOCOL_ERROR, "protocol_error"),
        };
        let max = self.ws.config.max_frame_size;
        match msg {
            ws::Message::Text(text) => {
                self.broker
                    .metrics()
                    .ws_frames
                    .with_label_values(&["in"])
                    .inc();
                self.handle_text(ctx, &text);
            }
            ws::Message::Binary(_) => {
                self.broker
                    .metrics()
                    .ws_frames
                    .with_label_values(&["in"])
                    .inc();
                self.error(
                    ctx,
                    None,
                    "unsupported_frame",
                    "binary frames are not part of the protocol; send JSON text",
                );
            }
            ws::Message::Continuation(item) => {
                let (first, chunk, last) = match item {
                    Item::FirstText(b) => (Some(true), b, false),
                    Item::FirstBinary(b) => (Some(false), b, false),
                    Item::Continue(b) => (None, b, false),
                    Item::Last(b) => (None, b, true),
                };
                if let Some(is_text) = first {
                    self.fragments = Some((is_text, BytesMut::new()));
                }
                let Some((_, buf)) = self.fragments.as_mut() else {
                    return self.close(ctx, close::PROTOCOL_ERROR, "protocol_error");
                };
                if buf.len() + chunk.len() > max {
                    return self.close(ctx, close::TOO_BIG, "frame_too_large");
                }
                buf.extend_from_slice(&chunk);
                if last {
                    let (is_text, buf) = self.fragments.take().expect("checked above");
                    self.broker
                        .metrics()
                        .ws_frames
                        .with_label_values(&["in"])
                        .inc();
                    match (is_text, std::str::from_utf8(&buf)) {
                        (true, Ok(text)) => self.handle_text(ctx, text),
                        (true, Err(_)) => self.close(ctx, close::PROTOCOL_ERROR, "protocol_error"),
                        (false, _) => self.error(
                            ctx,
                            None,
                            "unsupported_frame",
                            "binary frames are not part of the protocol",
                        ),
                    }
                }
            }
            ws::Message::Ping(p) => ctx.pong(&p),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}

impl Handler<Deliver> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
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
            self.send_message(ctx, msg.subscription, m);
        }
    }
}

impl Handler<Lagged> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Lagged, ctx: &mut Self::Context) {
        if !self.subs.contains_key(&msg.subscription) {
            return; // ended meanwhile
        }
        if self.is_wamp() {
            return self.wamp_lagged(ctx, msg);
        }
        self.subs.remove(&msg.subscription);
        match self.ws.config.slow_consumer {
            SlowConsumer::Close => self.close(ctx, close::SLOW_CONSUMER, "slow_consumer"),
            SlowConsumer::Refresh => {
                self.send(
                    ctx,
                    protocol::refresh(&msg.queue, "slow_consumer", msg.offset, &msg.epoch),
                );
                // Skip forward: subscribe again, live from the newest message.
                if let Some(identity) = self.identity.clone() {
                    self.subscribe(ctx, &identity, None, msg.queue.to_string(), None, None);
                }
            }
        }
    }
}

impl Handler<Notify> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Notify, ctx: &mut Self::Context) {
        if self.is_wamp() {
            return; // notifications are part of the native protocol only
        }
        if let Some(frame) = protocol::notify(&msg.data) {
            self.send(ctx, frame);
        }
    }
}

impl Handler<Regrant> for WsSession {
    type Result = ();

    /// A reload: rights are re-derived; a session that lost its user, or the grant of a
    /// subscription it holds, is closed (4011) — the client reconnects and sees what it
    /// may now. Narrower publish grants apply to the next publish.
    fn handle(&mut self, msg: Regrant, ctx: &mut Self::Context) {
        let Some(current) = &self.identity else {
            return;
        };
        let Some(new) = current.under(&msg.settings) else {
            return self.close(ctx, close::REVOKED, "user_removed");
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
            return self.close(ctx, close::REVOKED, "grants_revoked");
        }
        self.identity = Some(Identity {
            expires_at_ms: current.expires_at_ms,
            ..new
        });
    }
}

impl Handler<Disconnect> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, ctx: &mut Self::Context) {
        self.close(ctx, msg.code, msg.reason);
    }
}

fn new_connection_id() -> Arc<str> {
    broker_core::message::random_id()
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
