//! `Ingress`: the one front door for publishing. Every producer — HTTP ingest, batch and
//! webhook-queue's `/q`, native WebSocket, WAMP, the Crossbar pusher, the pg-hooks routes
//! (through [`crate::Broker`]), and inside the broker cron, dead-lettering and redrive —
//! calls [`Ingress::publish`], which does, once and in one order: queue lookup (names and
//! patterns), the address rule, ingest authentication, grants, body rules, notify
//! routing, the queue (limits, store), and counts every refusal under the queue's label
//! and its reason. It is a cloneable handle (the actors that publish hold one); a publish
//! to a running queue is one mailbox round trip, to the `Queue` (the `Hub` is asked
//! only to start a queue).

use std::net::IpAddr;
use std::sync::Arc;

use actix::prelude::*;

use super::hub::Queues;
use super::queue::{Publish, PublishAt, Published, QueueHandle, Scheduled};
use super::registry::{ConnectionRegistry, NotifyConnection, NotifyUser};
use super::subscriber::Notify;
use crate::auth::crossbar::{NonceCache, SignatureError};
use crate::config::QueueKind;
use crate::error::{Error, Rejection};
use crate::message::NewMessage;
use crate::metrics::{Metrics, UNKNOWN_QUEUE_LABEL};
use crate::notify::{self, Route};
use crate::settings::{QueueSpec, Settings, SharedSettings};

/// The front door (cloneable).
#[derive(Clone)]
pub(crate) struct Ingress {
    settings: SharedSettings,
    queues: Queues,
    registry: Addr<ConnectionRegistry>,
    /// The other replicas' connections (a cluster).
    fabric: Option<Arc<dyn crate::fabric::Fabric>>,
    metrics: Arc<Metrics>,
    /// Signed ingest requests seen within their tolerance (replays are refused).
    replays: Arc<NonceCache>,
    /// The store other replicas share (a cluster): a signed request is claimed there
    /// too, so that a replay to another replica is refused as well.
    shared: Option<Arc<dyn crate::store::Store>>,
}

/// Signed requests remembered at most (past it: 503 rather than forgetting early).
const MAX_REMEMBERED_SIGNATURES: usize = 1_000_000;

impl Ingress {
    /// A front door publishing into `queues`.
    pub(crate) fn new(
        settings: SharedSettings,
        queues: Queues,
        registry: Addr<ConnectionRegistry>,
        fabric: Option<Arc<dyn crate::fabric::Fabric>>,
        shared: Option<Arc<dyn crate::store::Store>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            settings,
            queues,
            registry,
            fabric,
            metrics,
            replays: Arc::new(NonceCache::new(MAX_REMEMBERED_SIGNATURES)),
            shared,
        }
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("settings lock").clone()
    }

    /// Publishes, with the checks [`Publisher`] calls for (see the module doc). Every
    /// refusal is counted here under the queue's label and its reason.
    pub async fn publish(&self, req: PublishRequest<'_>) -> Result<PublishOutcome, Error> {
        let settings = self.settings();
        let Some(spec) = settings.queue(req.queue).cloned() else {
            let e = Error::UnknownQueue {
                queue: req.queue.to_owned(),
            };
            return Err(self.count_refusal(UNKNOWN_QUEUE_LABEL, e));
        };
        let counted = |e: Error| self.count_refusal(spec.label(), e);
        let claimed = admit(&spec, req.queue, &req.publisher, &self.replays).map_err(counted)?;
        if let (Some((key, keep_ms)), Some(shared)) = (claimed, &self.shared) {
            let keep = std::time::Duration::from_millis(u64::try_from(keep_ms).unwrap_or(0));
            if !shared.claim_once(&key, keep).await.map_err(counted)? {
                return Err(counted(replayed()));
            }
        }
        let messages = req.messages;
        let single = messages.len() == 1;
        let mut routes = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let what = || {
                if single {
                    "the body".to_owned()
                } else {
                    format!("messages[{i}]")
                }
            };
            let outside = !matches!(req.publisher, Publisher::Broker);
            if let Some(problem) = outside
                .then(|| crate::message::header_problem(&m.headers, m.content_type.as_deref()))
                .flatten()
            {
                return Err(counted(Error::rejected(
                    Rejection::InvalidHeader,
                    format!("{}: {problem}", what()),
                )));
            }
            if spec.json_only {
                if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&m.body) {
                    return Err(counted(Error::rejected(
                        Rejection::InvalidBody,
                        format!("{} is not valid JSON: {e}", what()),
                    )));
                }
            }
            match notify::route(spec.kind, &m.body) {
                Ok(Some(r)) => routes.push(r),
                Ok(None) => {}
                Err(Error::Rejected { reason, message }) => {
                    return Err(counted(Error::Rejected {
                        reason,
                        message: format!("{}: {message}", what()),
                    }))
                }
                Err(e) => return Err(e),
            }
        }
        let handle = self.queue(req.queue).await.map_err(counted)?;
        let now = crate::message::now_ms();
        if let Some(at) = req.deliver_at_ms {
            let max_ms = i64::try_from(spec.limits.max_delay.as_millis()).unwrap_or(i64::MAX);
            if at.saturating_sub(now) > max_ms {
                return Err(counted(Error::rejected(
                    Rejection::DelayTooLong,
                    format!(
                        "a publish may be delayed by at most {} (limits.max_delay)",
                        humantime::format_duration(spec.limits.max_delay)
                    ),
                )));
            }
        }
        if let Some(at) = req.deliver_at_ms.filter(|at| *at > now) {
            if spec.kind != QueueKind::Queue {
                return Err(counted(Error::rejected(
                    Rejection::InvalidBody,
                    "notify queues deliver at once; `delay`/`at` are not accepted",
                )));
            }
            let scheduled = handle
                .addr
                .send(PublishAt {
                    messages,
                    deliver_at_ms: at,
                })
                .await
                .map_err(|_| counted(gone(req.queue)))?
                .map_err(counted)?;
            return Ok(PublishOutcome::Scheduled(scheduled));
        }
        let published = handle
            .addr
            .send(Publish { messages })
            .await
            .map_err(|_| counted(gone(req.queue)))?
            .map_err(counted)?;
        let delivered = if spec.kind == QueueKind::Queue {
            None
        } else {
            let mut n = 0;
            for (route, data) in routes {
                // The message is stored either way; an unknown connection gets nothing.
                n += self.notify(route, data).await.unwrap_or(0);
            }
            Some(n)
        };
        Ok(PublishOutcome::Published {
            published,
            delivered,
        })
    }

    /// The checks of an ingest request that need no body (queue, address, header-only
    /// credentials), for a transport that must not buffer a body it would refuse: the
    /// queue's spec. [`Ingress::publish`] applies them again with the body.
    pub fn admit_ingest<'a>(
        &self,
        queue: &str,
        client_ip: IpAddr,
        headers: &'a dyn Fn(&str) -> Option<&'a str>,
    ) -> Result<Arc<QueueSpec>, Error> {
        let settings = self.settings();
        let Some(spec) = settings.queue(queue).cloned() else {
            let e = Error::UnknownQueue {
                queue: queue.to_owned(),
            };
            return Err(self.count_refusal(UNKNOWN_QUEUE_LABEL, e));
        };
        let early = Publisher::Ingest {
            client_ip,
            headers,
            body: None,
        };
        admit(&spec, queue, &early, &self.replays)
            .map_err(|e| self.count_refusal(spec.label(), e))?;
        Ok(spec)
    }

    /// Counts a publish refused before it reached [`Ingress::publish`] (a body over
    /// `server.max_body_size`), under `label`; returns it.
    pub fn count_refusal(&self, label: &str, e: Error) -> Error {
        match &e {
            Error::Rejected { reason, .. } => self.metrics.reject(label, *reason),
            Error::UnknownQueue { .. } => self
                .metrics
                .reject(UNKNOWN_QUEUE_LABEL, Rejection::UnknownQueue),
            _ => {}
        }
        e
    }

    /// Pushes JSON `data` to a user's connections or to one connection; how many got it.
    pub async fn notify(&self, route: Route, data: bytes::Bytes) -> Result<usize, Error> {
        use crate::fabric::{Answer, Ask};
        let here = self.notify_here(route.clone(), data.clone()).await;
        let Some(fabric) = &self.fabric else {
            return here;
        };
        let data = String::from_utf8_lossy(&data).into_owned();
        let delivered = |answers: Vec<Answer>| {
            answers.into_iter().filter_map(|a| match a {
                Answer::Notified { found, delivered } => Some((found, delivered)),
                _ => None,
            })
        };
        match route {
            Route::User(user) => {
                let there = fabric.ask_all(Ask::NotifyUser { user, data }).await;
                Ok(here? + delivered(there).map(|(_, n)| n).sum::<usize>())
            }
            Route::Connection(_) => match here {
                Err(Error::UnknownConnection { id }) => {
                    let ask = Ask::NotifyConnection {
                        id: id.clone(),
                        data,
                    };
                    delivered(fabric.ask_all(ask).await)
                        .find(|(found, _)| *found)
                        .map(|(_, n)| n)
                        .ok_or(Error::UnknownConnection { id })
                }
                other => other,
            },
        }
    }

    /// [`Ingress::notify`] to the connections this replica holds.
    pub(crate) async fn notify_here(
        &self,
        route: Route,
        data: bytes::Bytes,
    ) -> Result<usize, Error> {
        let notify = Notify { data };
        match route {
            Route::User(user) => Ok(self.registry.send(NotifyUser { user, notify }).await?),
            Route::Connection(id) => self.registry.send(NotifyConnection { id, notify }).await?,
        }
    }

    /// The queue `name`, created on first use if configured or matching a pattern.
    pub(crate) async fn queue(&self, name: &str) -> Result<QueueHandle, Error> {
        self.queues.get(name).await
    }
}

/// Who is publishing: decides which checks [`Ingress::publish`] applies.
pub enum Publisher<'a> {
    /// An HTTP ingest request: the queue's address allow-list and its ingest
    /// authentication (over the raw body, when the method signs it).
    Ingest {
        /// The client's address (through trusted proxies: the forwarded one).
        client_ip: IpAddr,
        /// Looks a request header up by (case-insensitive) name.
        headers: &'a dyn Fn(&str) -> Option<&'a str>,
        /// The raw body; `None` for the checks that precede reading it.
        body: Option<&'a [u8]>,
    },
    /// An authenticated session (native WebSocket, WAMP): its publish grants and the
    /// queue's address allow-list.
    Session {
        /// Queues and patterns the session may publish into.
        grants: &'a [String],
        /// The client's address.
        client_ip: IpAddr,
    },
    /// A request its protocol authenticated already (the Crossbar pusher's signature,
    /// the pg-hooks routes): the queue's address allow-list.
    Authenticated {
        /// The client's address.
        client_ip: IpAddr,
    },
    /// The broker itself (redrive): no checks.
    Broker,
}

/// One publish: what [`Ingress::publish`] takes.
pub struct PublishRequest<'a> {
    /// The queue (a configured name, or a name matching a pattern).
    pub queue: &'a str,
    /// Who is publishing.
    pub publisher: Publisher<'a>,
    /// The messages, in order (all or none).
    pub messages: Vec<NewMessage>,
    /// When they become visible (Unix ms), for a delayed publish.
    pub deliver_at_ms: Option<i64>,
}

/// What a publish did.
#[derive(Debug)]
pub enum PublishOutcome {
    /// Appended and acknowledged by the store.
    Published {
        /// Offsets and epoch.
        published: Published,
        /// For notify-kind queues: connections that got the notification(s).
        delivered: Option<usize>,
    },
    /// Held back until their time.
    Scheduled(Scheduled),
}

/// The queue stopped before it answered: it could not load its stored state (its store
/// is away; the next publish starts it again) or the queue was just removed. Nothing
/// was stored.
fn gone(queue: &str) -> Error {
    Error::Store(format!(
        "queue `{queue}` is not available right now (its stored state could not be loaded); nothing was stored, retry"
    ))
}

/// A signed request received before.
fn replayed() -> Error {
    Error::rejected(
        Rejection::Replayed,
        "this signed request was received already (a replay)",
    )
}

/// The checks of `publisher` on queue `name` (spec `spec`), in the order of
/// [`Ingress::publish`]: address, ingest authentication, grants. A signed request's
/// replay key and how long to remember it, once remembered here.
fn admit(
    spec: &QueueSpec,
    name: &str,
    publisher: &Publisher<'_>,
    replays: &NonceCache,
) -> Result<Option<(String, i64)>, Error> {
    let client_ip = match publisher {
        Publisher::Broker => return Ok(None),
        Publisher::Ingest { client_ip, .. }
        | Publisher::Session { client_ip, .. }
        | Publisher::Authenticated { client_ip } => client_ip,
    };
    if !spec.allows_ip(client_ip) {
        return Err(Error::rejected(
            Rejection::IpNotAllowed,
            format!("address {client_ip} may not publish to queue `{name}`"),
        ));
    }
    match publisher {
        Publisher::Ingest { headers, body, .. } => {
            let now = chrono::Utc::now().timestamp();
            match body {
                Some(body) => {
                    spec.auth.verify(headers, body, now)?;
                    // Only a verified request is remembered: nobody else can spend one.
                    let Some((key, tolerance)) = spec.auth.replay_key(headers) else {
                        return Ok(None);
                    };
                    let keep_ms = tolerance.saturating_mul(2_000);
                    let key = format!("{name}\n{key}");
                    replays
                        .check_and_remember(&key, now.saturating_mul(1000), keep_ms)
                        .map_err(|e| match e {
                            SignatureError::Replayed => replayed(),
                            _ => Error::Store("too many signed requests to remember".into()),
                        })?;
                    Ok(Some((key, keep_ms)))
                }
                None if !spec.auth.needs_body() => {
                    spec.auth.verify(headers, b"", now).map(|()| None)
                }
                None => Ok(None),
            }
        }
        Publisher::Session { grants, .. } if !crate::settings::grants(grants, name) => {
            Err(Error::rejected(
                Rejection::NotGranted,
                format!("not allowed to publish to `{name}`"),
            ))
        }
        _ => Ok(None),
    }
}
