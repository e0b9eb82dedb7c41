//! The WAMP side of [`WsSession`]: a connection that negotiated `wamp.2.json` is the same
//! actor (same limits, heartbeats, backpressure, registry entry), speaking WAMP v2's
//! Basic Profile as a broker. A WAMP topic is a queue name; `match: "prefix"`
//! subscribes through the Hub to every queue the prefix covers.

use std::sync::Arc;

use actix::prelude::*;
use actix_web_actors::ws;
use broker_core::broker::PublishOutcome;
use broker_core::config::SlowConsumer;
use broker_core::crossbar::{publication, publication_id};
use broker_core::message::Audience;
use broker_core::settings::grants;
use broker_core::subscriber::Lagged;
use serde_json::value::RawValue;

use crate::protocol::close;
use crate::session::{Identity, Sub, WsSession};
use crate::wamp::{self, code, uri, ClientMsg};

/// Where a WAMP session is in its life.
pub(crate) struct WampState {
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

impl WampState {
    pub(crate) fn new(transport: Option<Identity>) -> Self {
        Self {
            transport,
            phase: Phase::New,
            authmethod: "anonymous",
        }
    }
}

impl WsSession {
    fn wamp_state(&mut self) -> &mut WampState {
        match &mut self.dialect {
            crate::session::Dialect::Wamp(s) => s,
            crate::session::Dialect::Native => unreachable!("a WAMP session"),
        }
    }

    /// ABORT (before WELCOME) and close.
    pub(crate) fn wamp_abort(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reason: &str,
        msg: &str,
    ) {
        self.wamp_state().phase = Phase::Closing;
        self.send(ctx, wamp::abort(reason, msg));
    }

    /// GOODBYE before the server closes an established session.
    pub(crate) fn wamp_goodbye(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: u16) {
        let state = self.wamp_state();
        if state.phase != Phase::Established {
            return;
        }
        state.phase = Phase::Closing;
        let reason = if code == close::GOING_AWAY {
            uri::SYSTEM_SHUTDOWN
        } else {
            uri::CLOSE_REALM
        };
        self.send(ctx, wamp::goodbye(reason));
    }

    /// WELCOME, once the session is registered.
    pub(crate) fn wamp_welcome(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let realm = self.broker.settings().realm().to_owned();
        let user = self
            .identity
            .as_ref()
            .map(|i| i.user.clone())
            .unwrap_or_default();
        let state = self.wamp_state();
        state.phase = Phase::Established;
        let method = state.authmethod;
        self.send(ctx, wamp::welcome(self.session_id, &realm, &user, method));
    }

    fn join(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        identity: Identity,
        method: &'static str,
    ) {
        let state = self.wamp_state();
        state.phase = Phase::Joining;
        state.authmethod = method;
        self.authorized(ctx, identity);
    }

    fn violation(&mut self, ctx: &mut ws::WebsocketContext<Self>, message: &str) {
        self.wamp_abort(ctx, uri::PROTOCOL_VIOLATION, message);
        self.close(ctx, close::PROTOCOL_ERROR, "protocol_error");
    }

    pub(crate) fn wamp_text(&mut self, ctx: &mut ws::WebsocketContext<Self>, text: &str) {
        let msg = match wamp::parse(text) {
            Ok(m) => m,
            Err(e) => return self.violation(ctx, &e),
        };
        let phase = self.wamp_state().phase.clone();
        match (phase, msg) {
            (
                Phase::New,
                ClientMsg::Hello {
                    realm,
                    authmethods,
                    authid,
                },
            ) => self.hello(ctx, realm, authmethods, authid),
            (Phase::Challenged(authid), ClientMsg::Authenticate { ticket }) => {
                self.wamp_state().phase = Phase::Joining;
                let broker = self.broker.clone();
                let fut = async move { broker.authenticate(&authid, &ticket).await };
                ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
                    Ok(u) => act.join(ctx, Identity::of_user(&u), "ticket"),
                    Err(e) => {
                        act.wamp_abort(ctx, uri::AUTHENTICATION_FAILED, &e.to_string());
                        act.close(ctx, close::INVALID_TOKEN, "invalid_token");
                    }
                }));
            }
            (Phase::Established, ClientMsg::Goodbye) => {
                self.wamp_state().phase = Phase::Closing;
                self.send(ctx, wamp::goodbye(uri::GOODBYE_AND_OUT));
                self.close(ctx, 1000, "client_closed");
            }
            (
                Phase::Established,
                ClientMsg::Subscribe {
                    request,
                    topic,
                    prefix,
                },
            ) => self.wamp_subscribe(ctx, request, topic, prefix),
            (
                Phase::Established,
                ClientMsg::Unsubscribe {
                    request,
                    subscription,
                },
            ) => {
                if self.drop_sub(subscription).is_some() {
                    self.send(ctx, wamp::unsubscribed(request));
                } else {
                    let e = wamp::error(
                        code::UNSUBSCRIBE,
                        request,
                        uri::NO_SUCH_SUBSCRIPTION,
                        "no such subscription",
                    );
                    self.send(ctx, e);
                }
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
                    exclude.push(self.session_id);
                }
                let audience = Audience { exclude, eligible };
                self.wamp_publish(ctx, request, topic, args, kwargs, acknowledge, audience);
            }
            (Phase::Closing, _) => {}
            (_, m) => self.violation(ctx, &format!("unexpected message now: {m:?}")),
        }
    }

    fn hello(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        realm: String,
        authmethods: Vec<String>,
        authid: Option<String>,
    ) {
        let served = self.broker.settings().realm().to_owned();
        if realm != served {
            self.wamp_abort(ctx, uri::NO_SUCH_REALM, &format!("no realm `{realm}`"));
            return self.close(ctx, 1000, "no_such_realm");
        }
        if let Some(identity) = self.wamp_state().transport.take() {
            return self.join(ctx, identity, "transport");
        }
        match authid {
            Some(authid) if authmethods.iter().any(|m| m == "ticket") => {
                self.wamp_state().phase = Phase::Challenged(authid);
                self.send(ctx, wamp::challenge_ticket());
            }
            _ if self.ws.config.allow_anonymous => {
                let identity = Identity::anonymous(&self.ws);
                self.join(ctx, identity, "anonymous");
            }
            _ => {
                self.wamp_abort(
                    ctx,
                    uri::AUTHENTICATION_FAILED,
                    "anonymous sessions are not allowed: authenticate with WAMP-Ticket (authid and password)",
                );
                self.close(ctx, close::INVALID_TOKEN, "invalid_token");
            }
        }
    }

    fn wamp_subscribe(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        request: u64,
        topic: String,
        prefix: bool,
    ) {
        let identity = self
            .identity
            .clone()
            .expect("established sessions have one");
        let refuse = |act: &mut Self, ctx: &mut ws::WebsocketContext<Self>, e: &str, m: &str| {
            act.send(ctx, wamp::error(code::SUBSCRIBE, request, e, m));
        };
        if self.subs.len() >= self.ws.config.max_subscriptions {
            let m = format!("at most {} subscriptions", self.ws.config.max_subscriptions);
            return refuse(self, ctx, uri::TOO_MANY_SUBSCRIPTIONS, &m);
        }
        let sub_id = broker_core::subscriber::next_subscription_id();
        let (subscriber, pending) = self.new_subscriber(ctx, sub_id);
        if prefix {
            let handle =
                self.broker
                    .subscribe_prefix(topic.clone(), identity.read.clone(), subscriber);
            self.subs.insert(
                sub_id,
                Sub {
                    topic,
                    handle,
                    exact: false,
                    pending,
                    last_offset: 0,
                },
            );
            return self.send(ctx, wamp::subscribed(request, sub_id));
        }
        if !grants(&identity.read, &topic) {
            let m = format!("not allowed to subscribe to `{topic}`");
            return refuse(self, ctx, uri::NOT_AUTHORIZED, &m);
        }
        let broker = self.broker.clone();
        let name = topic.clone();
        let fut = async move {
            let (handle, reply) = broker.subscribe(&name, subscriber, None, None).await?;
            Ok::<_, broker_core::Error>((handle, reply.head))
        };
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok((handle, head)) => {
                act.subs.insert(
                    sub_id,
                    Sub {
                        topic,
                        handle,
                        exact: true,
                        pending,
                        last_offset: head,
                    },
                );
                act.send(ctx, wamp::subscribed(request, sub_id));
            }
            Err(e) => {
                let m = match &e {
                    broker_core::Error::UnknownQueue { .. } => {
                        format!("`{topic}` is not a queue of this broker")
                    }
                    e => e.to_string(),
                };
                let uri = wamp::error_uri(&e, uri::SUBSCRIBE_FAILED);
                act.send(ctx, wamp::error(code::SUBSCRIBE, request, uri, &m));
            }
        }));
    }

    #[allow(clippy::too_many_arguments)]
    fn wamp_publish(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        request: u64,
        topic: String,
        args: Option<String>,
        kwargs: Option<String>,
        acknowledge: bool,
        audience: Audience,
    ) {
        let identity = self
            .identity
            .clone()
            .expect("established sessions have one");
        let refuse =
            move |act: &mut Self, ctx: &mut ws::WebsocketContext<Self>, e: &str, m: &str| {
                if acknowledge {
                    act.send(ctx, wamp::error(code::PUBLISH, request, e, m));
                }
            };
        let raw = |s: &Option<String>| {
            s.as_deref()
                .and_then(|t| serde_json::from_str::<Box<RawValue>>(t).ok())
        };
        let msg = publication(
            raw(&args).as_deref(),
            raw(&kwargs).as_deref(),
            Some(audience),
        );
        let fut = self.publish_one(identity.publish, topic, msg);
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok((topic, out)) => {
                if let (true, PublishOutcome::Published { published: p, .. }) = (acknowledge, &out)
                {
                    let id = publication_id(&topic, p.last_offset);
                    act.send(ctx, wamp::published(request, id));
                }
            }
            Err(e) => refuse(
                act,
                ctx,
                wamp::error_uri(&e, uri::PUBLISH_FAILED),
                &e.to_string(),
            ),
        }));
    }

    /// A queue dropped a subscription of this session for falling behind: close, or
    /// (`ws.slow_consumer = "refresh"`) register again with that queue, live, under the
    /// same subscription id (WAMP has no way to say that events were skipped).
    pub(crate) fn wamp_lagged(&mut self, ctx: &mut ws::WebsocketContext<Self>, msg: Lagged) {
        if self.ws.config.slow_consumer == SlowConsumer::Close {
            self.drop_sub(msg.subscription);
            return self.close(ctx, close::SLOW_CONSUMER, "slow_consumer");
        }
        // Same id and the same pending-bytes counter (a prefix subscription shares it
        // with its other queues).
        let (mut subscriber, _) = self.new_subscriber(ctx, msg.subscription);
        if let Some(sub) = self.subs.get(&msg.subscription) {
            subscriber.pending_bytes = sub.pending.clone();
        }
        let broker = self.broker.clone();
        let queue: Arc<str> = msg.queue.clone();
        ctx.spawn(
            async move {
                // The session keeps its first handle: same queue, same subscription id.
                broker.subscribe(&queue, subscriber, None, None).await?;
                Ok::<_, broker_core::Error>(())
            }
            .into_actor(self)
            .map(|res, _, _| {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "WAMP resubscribe after lag failed");
                }
            }),
        );
    }
}
