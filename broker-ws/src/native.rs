//! The native JSON dialect (`protocol`): actions `authorize`, `subscribe`,
//! `unsubscribe`, `publish`, `ping`; events `connected`, `subscribed`, `message`,
//! `published`, `notify`, `refresh`, `error`, each error with the core's code.

use std::sync::Arc;

use broker_core::auth::token;
use broker_core::broker::PublishOutcome;
use broker_core::config::SlowConsumer;
use broker_core::message::{Message, NewMessage};
use broker_core::subscriber::Lagged;
use bytes::Bytes;
use bytestring::ByteString;
use serde_json::value::RawValue;

use crate::protocol::{self, close, Action};
use crate::session::{Dialect, Identity, Link, Session};

/// The native protocol (no state of its own).
pub(crate) struct Native;

type S = Session<Native>;

fn error(s: &S, link: &mut dyn Link<Native>, id: Option<&RawValue>, code: &str, message: &str) {
    s.send(link, protocol::error(id, code, message));
}

impl Dialect for Native {
    fn text(s: &mut S, link: &mut dyn Link<Native>, text: &str) {
        let (id, action) = match protocol::parse(text) {
            Ok(p) => p,
            Err((id, (code, message))) => return error(s, link, id.as_deref(), code, &message),
        };
        let id = id.as_deref();
        let action = match action {
            Action::Authorize(t) => return authorize(s, link, id, &t),
            Action::Ping => return s.send(link, protocol::pong(id)),
            Action::Unknown(name) => {
                let msg = format!(
                    "no action `{name}`; actions: authorize, subscribe, unsubscribe, publish, ping"
                );
                return error(s, link, id, "not_implemented", &msg);
            }
            a => a,
        };
        if s.identity.is_none() {
            let msg = "send {\"action\":\"authorize\",\"token\":…} first";
            return error(s, link, id, "unauthorized", msg);
        }
        let id = id.map(|r| r.to_owned());
        match action {
            Action::Subscribe {
                queue,
                since,
                epoch,
            } => subscribe(s, link, id, queue, since, epoch),
            Action::Unsubscribe(queue) => match s.exact_sub(&queue) {
                Some(sub) => {
                    s.drop_sub(sub);
                    s.send(link, protocol::unsubscribed(id.as_deref(), &queue));
                }
                None => error(
                    s,
                    link,
                    id.as_deref(),
                    "not_subscribed",
                    "not subscribed to that queue",
                ),
            },
            Action::Publish { queue, data } => publish(s, link, id, queue, data),
            Action::Authorize(_) | Action::Ping | Action::Unknown(_) => {}
        }
    }

    fn binary(s: &mut S, link: &mut dyn Link<Native>) {
        let msg = "binary frames are not part of the protocol; send JSON text";
        error(s, link, None, "unsupported_frame", msg);
    }

    fn welcome(s: &mut S, link: &mut dyn Link<Native>) {
        let user = s.identity.as_ref().map_or("", |i| i.user.as_str());
        s.send(link, protocol::connected(&s.id, user));
    }

    fn refused(s: &mut S, link: &mut dyn Link<Native>, e: &broker_core::Error) {
        error(s, link, None, "too_many_connections", &e.to_string());
    }

    fn auth_timeout(s: &mut S, link: &mut dyn Link<Native>) {
        let msg = "no authorize within ws.auth_timeout";
        error(s, link, None, "auth_timeout", msg);
    }

    fn closing(_: &mut S, _: &mut dyn Link<Native>, _: u16) {}

    fn event(m: &Message, _: u64) -> ByteString {
        m.ws_frame.get_or_init(|| protocol::message(m)).clone()
    }

    fn lagged(s: &mut S, link: &mut dyn Link<Native>, msg: Lagged) {
        s.drop_sub(msg.subscription);
        match s.ws.config.slow_consumer {
            SlowConsumer::Close => s.close(link, close::SLOW_CONSUMER, "slow_consumer"),
            SlowConsumer::Refresh => {
                let frame = protocol::refresh(&msg.queue, "slow_consumer", msg.offset, &msg.epoch);
                s.send(link, frame);
                // Skip forward: subscribe again, live from the newest message.
                subscribe(s, link, None, msg.queue.to_string(), None, None);
            }
        }
    }

    fn notify(s: &mut S, link: &mut dyn Link<Native>, data: &[u8]) {
        if let Some(frame) = protocol::notify(data) {
            s.send(link, frame);
        }
    }
}

fn authorize(s: &mut S, link: &mut dyn Link<Native>, id: Option<&RawValue>, token: &str) {
    if s.identity.is_some() {
        let msg = "this connection is authorized already";
        return error(s, link, id, "already_authorized", msg);
    }
    let settings = s.broker.settings();
    match token::verify(token, &settings.ws.jwt_secrets) {
        Ok(claims) => s.authorized(link, Identity::from_claims(claims, &settings)),
        Err(e) => {
            error(s, link, id, "invalid_token", &e.to_string());
            s.close(link, close::INVALID_TOKEN, "invalid_token");
        }
    }
}

fn subscribe(
    s: &mut S,
    link: &mut dyn Link<Native>,
    id: Option<Box<RawValue>>,
    queue: String,
    since: Option<u64>,
    epoch: Option<String>,
) {
    let id_ref = id.as_deref();
    if !s.may_read(&queue) {
        let msg = format!("not allowed to subscribe to `{queue}`");
        return error(s, link, id_ref, "not_granted", &msg);
    }
    if s.exact_sub(&queue).is_some() {
        let msg = format!("already subscribed to `{queue}`");
        return error(s, link, id_ref, "already_subscribed", &msg);
    }
    if let Err(msg) = s.room_for_a_subscription() {
        return error(s, link, id_ref, "too_many_subscriptions", &msg);
    }
    let name = queue.clone();
    s.subscribe(link, name, since, epoch, move |s, link, res| {
        let (sub, reply) = match res {
            Ok(r) => r,
            Err(e) => return error(s, link, id.as_deref(), e.code(), &e.to_string()),
        };
        if reply.unrecoverable {
            let frame =
                protocol::refresh(&queue, "unrecoverable_position", reply.head, &reply.epoch);
            s.send(link, frame);
        }
        let frame = protocol::subscribed(
            id.as_deref(),
            &queue,
            reply.head,
            &reply.epoch,
            reply.recovered,
        );
        s.send(link, frame);
        for m in &reply.replay {
            s.write_event(link, sub, m);
        }
    });
}

fn publish(
    s: &mut S,
    link: &mut dyn Link<Native>,
    id: Option<Box<RawValue>>,
    queue: String,
    data: String,
) {
    let msg = NewMessage {
        id: None,
        content_type: Some(Arc::from("application/json")),
        ..NewMessage::from(Bytes::from(data))
    };
    s.publish(link, queue, msg, move |s, link, queue, out| match out {
        Ok(PublishOutcome::Published {
            published: p,
            delivered,
        }) => {
            let frame =
                protocol::published(id.as_deref(), queue, p.last_offset, &p.epoch, delivered);
            s.send(link, frame);
        }
        Ok(PublishOutcome::Scheduled(_)) => error(
            s,
            link,
            id.as_deref(),
            "error",
            "unexpected delayed publish",
        ),
        Err(e) => error(s, link, id.as_deref(), e.code(), &e.to_string()),
    });
}
