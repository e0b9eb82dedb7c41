//! The WAMP v2 dialect (`wamp.2.json`, the Basic Profile as a broker): a connection that
//! negotiated it is a session like any other (same limits, heartbeats, backpressure,
//! registry entry) that speaks WAMP. A topic is a queue name; `match: "prefix"`
//! subscribes to every queue the prefix covers.

use std::sync::Arc;

use broker_core::broker::PublishOutcome;
use broker_core::config::SlowConsumer;
use broker_core::crossbar::{publication, publication_id};
use broker_core::message::{Audience, Message};
use broker_core::subscriber::Lagged;
use bytestring::ByteString;
use serde_json::value::RawValue;

use crate::protocol::close;
use crate::session::{Dialect, Identity, Link, Session};
use crate::wamp::{self, code, uri, ClientMsg};

/// Where a WAMP session is in its life.
pub(crate) struct Wamp {
    /// Credentials given with the upgrade request, used at HELLO.
    transport: Option<Identity>,
    phase: Phase,
    authmethod: &'static str,
}

#[derive(Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for HELLO.
    New,
    /// CHALLENGE sent for this authid; waiting for AUTHENTICATE.
    Challenged(String),
    /// Checking credentials or registering.
    Joining,
    /// WELCOME sent.
    Established,
    /// GOODBYE or ABORT sent.
    Closing,
}

impl Wamp {
    /// A session that has yet to say HELLO; `transport`: credentials of the upgrade.
    pub(crate) fn new(transport: Option<Identity>) -> Self {
        Self {
            transport,
            phase: Phase::New,
            authmethod: "anonymous",
        }
    }
}

type S = Session<Wamp>;

/// ABORT (before WELCOME); the caller closes.
fn abort(s: &mut S, link: &mut dyn Link<Wamp>, reason: &str, msg: &str) {
    s.dialect.phase = Phase::Closing;
    s.send(link, wamp::abort(reason, msg));
}

fn violation(s: &mut S, link: &mut dyn Link<Wamp>, message: &str) {
    abort(s, link, uri::PROTOCOL_VIOLATION, message);
    s.close(link, close::PROTOCOL_ERROR, "protocol_error");
}

fn join(s: &mut S, link: &mut dyn Link<Wamp>, identity: Identity, method: &'static str) {
    s.dialect.phase = Phase::Joining;
    s.dialect.authmethod = method;
    s.authorized(link, identity);
}

impl Dialect for Wamp {
    fn text(s: &mut S, link: &mut dyn Link<Wamp>, text: &str) {
        let msg = match wamp::parse(text) {
            Ok(m) => m,
            Err(e) => return violation(s, link, &e),
        };
        match (s.dialect.phase.clone(), msg) {
            (
                Phase::New,
                ClientMsg::Hello {
                    realm,
                    authmethods,
                    authid,
                },
            ) => hello(s, link, realm, authmethods, authid),
            (Phase::Challenged(authid), ClientMsg::Authenticate { ticket }) => {
                s.dialect.phase = Phase::Joining;
                let (broker, remote) = (s.broker.clone(), s.remote);
                link.wait(Box::pin(async move {
                    let res = broker.authenticate(&authid, &ticket, remote).await;
                    Box::new(move |s: &mut S, link: &mut dyn Link<Wamp>| match res {
                        Ok(u) => join(s, link, Identity::of_user(&u), "ticket"),
                        Err(e) => {
                            abort(s, link, uri::AUTHENTICATION_FAILED, &e.to_string());
                            s.close(link, close::INVALID_TOKEN, "invalid_token");
                        }
                    }) as crate::session::Then<Wamp>
                }));
            }
            (Phase::Established, ClientMsg::Goodbye) => {
                s.dialect.phase = Phase::Closing;
                s.send(link, wamp::goodbye(uri::GOODBYE_AND_OUT));
                s.close(link, 1000, "client_closed");
            }
            (
                Phase::Established,
                ClientMsg::Subscribe {
                    request,
                    topic,
                    prefix,
                },
            ) => subscribe(s, link, request, topic, prefix),
            (
                Phase::Established,
                ClientMsg::Unsubscribe {
                    request,
                    subscription,
                },
            ) => {
                let frame = if s.drop_sub(subscription).is_some() {
                    wamp::unsubscribed(request)
                } else {
                    let m = "no such subscription";
                    wamp::error(code::UNSUBSCRIBE, request, uri::NO_SUCH_SUBSCRIPTION, m)
                };
                s.send(link, frame);
            }
            (
                Phase::Established,
                ClientMsg::Publish {
                    request,
                    topic,
                    args,
                    kwargs,
                    acknowledge,
                    exclude_me,
                    mut exclude,
                    eligible,
                },
            ) => {
                if exclude_me {
                    exclude.push(s.session_id);
                }
                let publish = Publication {
                    request,
                    topic,
                    args,
                    kwargs,
                    acknowledge,
                    audience: Audience { exclude, eligible },
                };
                publish.send(s, link);
            }
            (Phase::Closing, _) => {}
            (_, m) => violation(s, link, &format!("unexpected message now: {m:?}")),
        }
    }

    fn binary(s: &mut S, link: &mut dyn Link<Wamp>) {
        violation(s, link, "binary frames are not part of wamp.2.json");
    }

    fn welcome(s: &mut S, link: &mut dyn Link<Wamp>) {
        let realm = s.broker.settings().realm().to_owned();
        let user = s.identity.as_ref().map_or("", |i| i.user.as_str());
        let frame = wamp::welcome(s.session_id, &realm, user, s.dialect.authmethod);
        s.dialect.phase = Phase::Established;
        s.send(link, frame);
    }

    fn refused(s: &mut S, link: &mut dyn Link<Wamp>, e: &broker_core::Error) {
        abort(s, link, uri::NOT_AUTHORIZED, &e.to_string());
    }

    fn auth_timeout(s: &mut S, link: &mut dyn Link<Wamp>) {
        let msg = "no HELLO/AUTHENTICATE within ws.auth_timeout";
        abort(s, link, uri::AUTHENTICATION_FAILED, msg);
    }

    /// GOODBYE before the server closes an established session.
    fn closing(s: &mut S, link: &mut dyn Link<Wamp>, code: u16) {
        if s.dialect.phase != Phase::Established {
            return;
        }
        s.dialect.phase = Phase::Closing;
        let reason = if code == close::GOING_AWAY {
            uri::SYSTEM_SHUTDOWN
        } else {
            uri::CLOSE_REALM
        };
        s.send(link, wamp::goodbye(reason));
    }

    fn event(m: &Message, sub: u64) -> ByteString {
        let tail = m.wamp_event.get_or_init(|| wamp::event_tail(m));
        wamp::event(sub, tail)
    }

    /// Close, or (`ws.slow_consumer = "refresh"`) register again with that queue, live,
    /// under the same subscription id (WAMP has no way to say that events were skipped).
    fn lagged(s: &mut S, link: &mut dyn Link<Wamp>, msg: Lagged) {
        if s.ws.config.slow_consumer == SlowConsumer::Close {
            s.drop_sub(msg.subscription);
            return s.close(link, close::SLOW_CONSUMER, "slow_consumer");
        }
        let queue: Arc<str> = msg.queue.clone();
        s.resubscribe_live(link, msg.subscription, queue);
    }

    /// Notifications are part of the native protocol only.
    fn notify(_: &mut S, _: &mut dyn Link<Wamp>, _: &[u8]) {}
}

fn hello(
    s: &mut S,
    link: &mut dyn Link<Wamp>,
    realm: String,
    authmethods: Vec<String>,
    authid: Option<String>,
) {
    let served = s.broker.settings().realm().to_owned();
    if realm != served {
        abort(s, link, uri::NO_SUCH_REALM, &format!("no realm `{realm}`"));
        return s.close(link, 1000, "no_such_realm");
    }
    if let Some(identity) = s.dialect.transport.take() {
        return join(s, link, identity, "transport");
    }
    match authid {
        Some(authid) if authmethods.iter().any(|m| m == "ticket") => {
            s.dialect.phase = Phase::Challenged(authid);
            s.send(link, wamp::challenge_ticket());
        }
        _ if s.ws.config.allow_anonymous => {
            let identity = Identity::anonymous(&s.ws);
            join(s, link, identity, "anonymous");
        }
        _ => {
            let msg = "anonymous sessions are not allowed: authenticate with WAMP-Ticket (authid and password)";
            abort(s, link, uri::AUTHENTICATION_FAILED, msg);
            s.close(link, close::INVALID_TOKEN, "invalid_token");
        }
    }
}

fn subscribe(s: &mut S, link: &mut dyn Link<Wamp>, request: u64, topic: String, prefix: bool) {
    let refuse = move |s: &S, link: &mut dyn Link<Wamp>, e: &str, m: &str| {
        s.send(link, wamp::error(code::SUBSCRIBE, request, e, m));
    };
    if let Err(m) = s.room_for_a_subscription() {
        return refuse(s, link, uri::TOO_MANY_SUBSCRIPTIONS, &m);
    }
    if prefix {
        let id = s.subscribe_prefix(link, topic);
        return s.send(link, wamp::subscribed(request, id));
    }
    if !s.may_read(&topic) {
        let m = format!("not allowed to subscribe to `{topic}`");
        return refuse(s, link, uri::NOT_AUTHORIZED, &m);
    }
    let name = topic.clone();
    s.subscribe(link, name, None, None, move |s, link, res| match res {
        Ok((id, _)) => s.send(link, wamp::subscribed(request, id)),
        Err(e) => {
            let m = match &e {
                broker_core::Error::UnknownQueue { .. } => {
                    format!("`{topic}` is not a queue of this broker")
                }
                e => e.to_string(),
            };
            let uri = wamp::error_uri(&e, uri::SUBSCRIBE_FAILED);
            refuse(s, link, uri, &m);
        }
    });
}

/// A PUBLISH.
struct Publication {
    request: u64,
    topic: String,
    args: Option<String>,
    kwargs: Option<String>,
    acknowledge: bool,
    audience: Audience,
}

impl Publication {
    fn send(self, s: &mut S, link: &mut dyn Link<Wamp>) {
        let raw = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| serde_json::from_str::<Box<RawValue>>(t).ok())
        };
        let msg = publication(
            raw(&self.args).as_deref(),
            raw(&self.kwargs).as_deref(),
            Some(self.audience),
        );
        let (request, acknowledge) = (self.request, self.acknowledge);
        s.publish(link, self.topic, msg, move |s, link, topic, out| {
            if !acknowledge {
                return;
            }
            match out {
                Ok(PublishOutcome::Published { published: p, .. }) => {
                    let id = publication_id(topic, p.last_offset);
                    s.send(link, wamp::published(request, id));
                }
                Ok(PublishOutcome::Scheduled(_)) => {}
                Err(e) => {
                    let uri = wamp::error_uri(&e, uri::PUBLISH_FAILED);
                    s.send(
                        link,
                        wamp::error(code::PUBLISH, request, uri, &e.to_string()),
                    );
                }
            }
        });
    }
}
