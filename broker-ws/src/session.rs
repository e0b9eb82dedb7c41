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
use std::time::Instant;

use actix::prelude::*;
use actix_http::ws::Item;
use actix_web_actors::ws;
use broker_core::actors::registry::{Register, Unregister};
use broker_core::actors::subscriber::next_subscription_id;
use broker_core::actors::{
    ConnectionInfo, Deliver, Disconnect, Lagged, Notify, Queue, Subscribe, Subscriber, Unsubscribe,
};
use broker_core::auth::token::{self, Claims};
use broker_core::config::SlowConsumer;
use broker_core::message::{Message, NewMessage};
use broker_core::settings::{grants, Settings, WsSettings};
use broker_core::{Broker, Error};
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
}

impl Identity {
    /// From verified token claims; missing grant lists fall back to the configured user.
    pub fn from_claims(c: Claims, settings: &Settings) -> Self {
        let user = settings.users.get(&c.sub);
        Identity {
            read: c
                .queues
                .unwrap_or_else(|| user.map(|u| u.grants.clone()).unwrap_or_default()),
            publish: c
                .publish
                .unwrap_or_else(|| user.map(|u| u.publish.clone()).unwrap_or_default()),
            user: c.sub,
        }
    }

    /// An anonymous session (only when `ws.allow_anonymous`).
    pub fn anonymous(ws: &WsSettings) -> Self {
        Identity {
            user: String::new(),
            read: ws.config.anonymous_queues.clone(),
            publish: Vec::new(),
        }
    }
}

struct Sub {
    id: u64,
    queue: Addr<Queue>,
    pending: Arc<AtomicUsize>,
    last_offset: u64,
}

/// A WebSocket connection.
pub struct WsSession {
    id: Arc<str>,
    broker: Arc<Broker>,
    ws: Arc<WsSettings>,
    remote: IpAddr,
    identity: Option<Identity>,
    registered: bool,
    subs: HashMap<String, Sub>,
    last_heard: Instant,
    fragments: Option<(bool, BytesMut)>,
    close_reason: &'static str,
}

impl WsSession {
    /// A session for a connection from `remote`, authenticated already or not.
    pub fn new(broker: Arc<Broker>, remote: IpAddr, identity: Option<Identity>) -> Self {
        let ws = broker.settings().ws.clone();
        Self {
            id: new_connection_id(),
            broker,
            ws,
            remote,
            identity,
            registered: false,
            subs: HashMap::new(),
            last_heard: Instant::now(),
            fragments: None,
            close_reason: "client_closed",
        }
    }

    fn send(&self, ctx: &mut ws::WebsocketContext<Self>, frame: bytestring::ByteString) {
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

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: u16, reason: &'static str) {
        self.close_reason = reason;
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::Other(code),
            description: Some(reason.to_owned()),
        }));
        ctx.stop();
    }

    /// Registers the now-authenticated session and greets it.
    fn authorized(&mut self, ctx: &mut ws::WebsocketContext<Self>, identity: Identity) {
        let user = identity.user.clone();
        self.identity = Some(identity);
        let addr = ctx.address();
        let register = Register {
            info: ConnectionInfo {
                id: self.id.clone(),
                user: user.clone(),
                remote: self.remote.to_string(),
                connected_at: chrono_now(),
            },
            notify: addr.clone().recipient(),
            control: addr.recipient(),
            max_per_user: self.ws.config.max_connections_per_user,
        };
        let registry = self.broker.registry().clone();
        ctx.wait(
            registry
                .send(register)
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok(Ok(())) => {
                        act.registered = true;
                        let hello = protocol::connected(&act.id, &user);
                        act.send(ctx, hello);
                    }
                    Ok(Err(e)) => {
                        act.error(ctx, None, "too_many_connections", &e.to_string());
                        act.close(ctx, close::TOO_MANY_CONNECTIONS, "too_many_connections");
                    }
                    Err(_) => act.close(ctx, close::GOING_AWAY, "shutting_down"),
                }),
        );
    }

    fn handle_text(&mut self, ctx: &mut ws::WebsocketContext<Self>, text: &str) {
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
            Action::Unsubscribe(queue) => match self.subs.remove(&queue) {
                Some(sub) => {
                    sub.queue.do_send(Unsubscribe { id: sub.id });
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
        if self.subs.contains_key(&queue) {
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
        let pending = Arc::new(AtomicUsize::new(0));
        let addr = ctx.address();
        let subscriber = Subscriber {
            id: next_subscription_id(),
            deliver: addr.clone().recipient(),
            lagged: addr.recipient(),
            pending_bytes: pending.clone(),
            max_pending_bytes: self.ws.config.max_pending_bytes,
        };
        let sub_id = subscriber.id;
        let broker = self.broker.clone();
        let name = queue.clone();
        let fut = async move {
            let handle = broker.queue(&name).await?;
            let reply = handle
                .addr
                .send(Subscribe {
                    subscriber,
                    since,
                    epoch,
                })
                .await?;
            Ok::<_, Error>((handle.addr, reply))
        };
        // `wait`: no delivery is handled before the replay is written, so the seam
        // between replay and live messages has no gap and no duplicate.
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
            let (queue_addr, reply) = match res {
                Ok(r) => r,
                Err(e) => return act.error(ctx, id.as_deref(), error_code(&e), &e.to_string()),
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
                act.send_message(ctx, m);
            }
            act.subs.insert(
                queue,
                Sub {
                    id: sub_id,
                    queue: queue_addr,
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
        let id_ref = id.as_deref();
        if !grants(&identity.publish, &queue) {
            return self.error(
                ctx,
                id_ref,
                "not_granted",
                &format!("not allowed to publish to `{queue}`"),
            );
        }
        let settings = self.broker.settings();
        let Some(spec) = settings.queue(&queue).cloned() else {
            return self.error(
                ctx,
                id_ref,
                "unknown_queue",
                &format!("unknown queue `{queue}`"),
            );
        };
        if !spec.allow_ips.is_empty() && !spec.allow_ips.iter().any(|n| n.contains(&self.remote)) {
            return self.error(
                ctx,
                id_ref,
                "ip_not_allowed",
                "this address may not publish to that queue",
            );
        }
        let msg = NewMessage {
            body: Bytes::from(data),
            content_type: Some(Arc::from("application/json")),
            headers: Vec::new(),
        };
        let broker = self.broker.clone();
        let fut = async move {
            broker
                .publish(&queue, &spec, vec![msg], None)
                .await
                .map(|o| (queue, o))
        };
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok((queue, out)) => {
                let Some(p) = &out.published else {
                    return act.error(ctx, id.as_deref(), "error", "unexpected delayed publish");
                };
                let frame = protocol::published(
                    id.as_deref(),
                    &queue,
                    p.last_offset,
                    &p.epoch,
                    out.delivered,
                );
                act.send(ctx, frame);
            }
            Err(e) => act.error(ctx, id.as_deref(), error_code(&e), &e.to_string()),
        }));
    }

    fn send_message(&self, ctx: &mut ws::WebsocketContext<Self>, m: &Message) {
        let frame = m.ws_frame.get_or_init(|| protocol::message(m)).clone();
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
                        act.error(
                            ctx,
                            None,
                            "auth_timeout",
                            "no authorize within ws.auth_timeout",
                        );
                        act.close(ctx, close::AUTH_TIMEOUT, "auth_timeout");
                    }
                });
            }
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for sub in self.subs.values() {
            sub.queue.do_send(Unsubscribe { id: sub.id });
        }
        if self.registered {
            self.broker.registry().do_send(Unregister {
                id: self.id.clone(),
            });
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
        let Some(sub) = self
            .subs
            .get_mut(&*msg.queue)
            .filter(|s| s.id == msg.subscription)
        else {
            return; // unsubscribed meanwhile
        };
        sub.pending.fetch_sub(msg.bytes, Ordering::AcqRel);
        let from = sub.last_offset;
        if let Some(last) = msg.messages.last() {
            sub.last_offset = sub.last_offset.max(last.offset);
        }
        for m in msg.messages.iter().filter(|m| m.offset > from) {
            self.send_message(ctx, m);
        }
    }
}

impl Handler<Lagged> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Lagged, ctx: &mut Self::Context) {
        if self
            .subs
            .get(&*msg.queue)
            .is_none_or(|s| s.id != msg.subscription)
        {
            return; // an older subscription of this queue
        }
        self.subs.remove(&*msg.queue);
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
        if let Some(frame) = protocol::notify(&msg.data) {
            self.send(ctx, frame);
        }
    }
}

impl Handler<Disconnect> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, ctx: &mut Self::Context) {
        self.close(ctx, msg.code, msg.reason);
    }
}

/// The `code` of an error event for a core error.
fn error_code(e: &Error) -> &'static str {
    match e {
        Error::Rejected { reason, .. } => reason.as_str(),
        Error::UnknownQueue { .. } => "unknown_queue",
        Error::Store(_) => "store_unavailable",
        Error::ShuttingDown => "shutting_down",
        _ => "error",
    }
}

fn new_connection_id() -> Arc<str> {
    broker_core::message::random_id()
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
