//! `Webhook`: delivers every message of one queue to one target, at least once.
//!
//! It pulls from the queue (a cursor and `Read`, woken by the queue's change channel)
//! instead of being pushed to, so a slow or failing target never makes the queue drop
//! it and never slows the queue. Up to `max_in_flight` messages are in delivery at once
//! (1 = strictly in order, retries included). Failures (network errors, timeouts,
//! non-2xx) are retried after the target's backoff with jitter, or after `Retry-After`
//! on 429/503; after the last retry the message goes to the dead-letter queue with
//! headers naming where it came from. Runs only while this node is the leader.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use base64::Engine;
use serde::Serialize;

use super::ingress::{Ingress, PublishRequest, Publisher};
use super::leader::LeadershipChanged;
use super::queue::{Head, QueueHandle, Read};
use crate::delivery::{shown_url, WebhookSpec, MAX_RETRY_AFTER};
use crate::error::Error;
use crate::message::{now_ms, Message, NewMessage};
use crate::metrics::Metrics;
use crate::store::{Store, StoredAttempt};

/// Wait before reading again after the queue itself failed to answer.
const READ_RETRY: Duration = Duration::from_secs(1);
/// Wait before dead-lettering again after the dead-letter queue refused a message.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// Headers of a dead-lettered message.
pub mod dlq_headers {
    /// The queue the message was published to.
    pub const QUEUE: &str = "x-broker-original-queue";
    /// Its offset there.
    pub const OFFSET: &str = "x-broker-original-offset";
    /// The target that gave up.
    pub const TARGET: &str = "x-broker-target";
    /// Attempts made.
    pub const ATTEMPTS: &str = "x-broker-attempts";
    /// HTTP status of the last attempt, if there was a response.
    pub const LAST_STATUS: &str = "x-broker-last-status";
    /// Error of the last attempt.
    pub const LAST_ERROR: &str = "x-broker-last-error";
    /// Which target gave up (stable: from its URL); a redrive delivers to it alone.
    pub const TARGET_ID: &str = "x-broker-target-id";
    /// The `webhook-id` the message was sent under; a redrive sends it again under it.
    pub const WEBHOOK_ID: &str = "x-broker-webhook-id";
}

/// Headers of a message republished by a redrive for one target.
pub mod redrive_headers {
    /// Only the target with this id delivers it (the others skip it).
    pub const FOR_TARGET: &str = "x-broker-redrive-for";
    /// The `webhook-id` to deliver it under (the one its first attempts had).
    pub const WEBHOOK_ID: &str = "x-broker-redrive-webhook-id";
}

/// New target settings after a reload (same URL).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retarget {
    /// The new spec.
    pub spec: Arc<WebhookSpec>,
}

/// Stops the actor (target removed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopWebhook;

/// Delivery state for the admin API.
#[derive(Message)]
#[rtype(result = "WebhookStatus")]
pub struct GetStatus;

/// What the admin API shows of a target.
#[derive(Debug, Clone, Serialize, MessageResponse)]
pub struct WebhookStatus {
    /// Target URL.
    pub url: String,
    /// Whether this node delivers (it is the leader).
    pub active: bool,
    /// Messages published and not yet handed to a delivery.
    pub pending: u64,
    /// Messages in delivery (waiting retries included).
    pub in_flight: usize,
    /// Of those, messages whose retries are exhausted and whose dead-letter copy is not
    /// stored yet.
    pub dead_lettering: usize,
    /// Offset of the last message handed to a delivery.
    pub cursor: u64,
    /// Successful deliveries.
    pub delivered: u64,
    /// Messages dead-lettered (or dropped without a dead-letter queue).
    pub failed: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// When the next retry is due (RFC 3339).
    pub next_attempt: Option<String>,
}

struct InFlight {
    message: Arc<Message>,
    attempts: u32,
    retry: Option<(SpawnHandle, i64)>,
    last_status: Option<u16>,
    last_error: Option<String>,
    /// Retries are exhausted and the message is being dead-lettered: it stays here
    /// (unsettled) until its copy is stored in the dead-letter queue; how many times
    /// the dead-letter queue refused it.
    dead_lettering: Option<u32>,
}

/// Why an attempt failed.
struct Failure {
    status: Option<u16>,
    error: String,
    retry_after: Option<Duration>,
}

/// One queue's delivery to one target.
pub struct Webhook {
    handle: QueueHandle,
    label: String,
    /// Identifies the target in `webhook-id`s: from its URL, so it does not change
    /// when other targets are added or removed.
    target_id: String,
    spec: Arc<WebhookSpec>,
    ingress: Ingress,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    leader: bool,
    /// Started together with its queue (see [`Webhook::new`]).
    from_queue_start: bool,
    cursor: Option<u64>,
    /// Last value saved to the store: everything up to it is settled.
    settled: u64,
    /// Retries that were pending when the actor last stopped, by offset.
    resume: std::collections::HashMap<u64, StoredAttempt>,
    head: u64,
    epoch: Arc<str>,
    /// Distinguishes queues in webhook ids.
    id_prefix: String,
    /// What this actor added to the shared gauges (several targets share a label).
    reported: (i64, i64),
    reading: bool,
    watching: bool,
    in_flight: BTreeMap<u64, InFlight>,
    delivered: u64,
    failed: u64,
    last_error: Option<String>,
}

impl Webhook {
    /// Delivery of `handle`'s messages to one of its targets.
    #[allow(clippy::too_many_arguments)]
    /// A target of the queue at `handle`. `from_queue_start`: it started together with
    /// its queue, so a new target delivers everything published since the queue started
    /// (a target added to a running queue: what is published from now on).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        handle: QueueHandle,
        from_queue_start: bool,
        label: String,
        spec: Arc<WebhookSpec>,
        ingress: Ingress,
        client: reqwest::Client,
        metrics: Arc<Metrics>,
        store: Arc<dyn Store>,
    ) -> Self {
        let digest = crate::auth::ingest::compute_mac(
            crate::auth::HmacAlgo::Sha256,
            b"webhook-id",
            &[handle.name.as_bytes()],
        );
        let target = crate::auth::ingest::compute_mac(
            crate::auth::HmacAlgo::Sha256,
            b"webhook-target",
            &[spec.url.as_str().as_bytes()],
        );
        Self {
            id_prefix: hex::encode(&digest[..6]),
            target_id: hex::encode(&target[..6]),
            epoch: Arc::from(""),
            reported: (0, 0),
            handle,
            label,
            spec,
            ingress,
            client,
            metrics,
            store,
            leader: false,
            from_queue_start,
            cursor: None,
            settled: 0,
            resume: Default::default(),
            head: 0,
            reading: false,
            watching: false,
            in_flight: BTreeMap::new(),
            delivered: 0,
            failed: 0,
            last_error: None,
        }
    }

    fn gauges(&mut self) {
        let cursor = self.cursor.unwrap_or(self.head);
        let now = (
            self.in_flight.len() as i64,
            self.head.saturating_sub(cursor) as i64,
        );
        self.report(now);
    }

    /// Moves this actor's contribution to the shared gauges to `now`.
    fn report(&mut self, now: (i64, i64)) {
        let (f, p) = self.reported;
        self.metrics
            .webhook_in_flight
            .with_label_values(&[&self.label])
            .add(now.0 - f);
        self.metrics
            .webhook_pending
            .with_label_values(&[&self.label])
            .add(now.1 - p);
        self.reported = now;
    }

    /// Hands new messages to deliveries while there is room; waits for more otherwise.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let room = self
            .spec
            .config
            .max_in_flight
            .saturating_sub(self.in_flight.len());
        if !self.leader || self.reading {
            return;
        }
        if room == 0 {
            // Nothing more is read while everything in flight waits; the backlog still
            // grows with every publish, and the pending count must say so.
            return self.follow_head(ctx);
        }
        self.reading = true;
        let addr = self.handle.addr.clone();
        let mut changes = self.handle.changes.clone();
        // Seen before reading: a publish between the read and the wait still wakes us.
        changes.borrow_and_update();
        let Some(since) = self.cursor else {
            // First start: resume after the settled cursor kept in the store; a new
            // target delivers what is published from the queue's start if it started
            // with its queue, else from now on.
            let (queue, url) = (&self.handle.name, self.spec.url.as_str());
            let saved = self.store.delivery_cursor(queue, url);
            let pending = self.store.pending_attempts(queue, url);
            let fut = async move { (saved.await, pending.await, addr.send(Head).await) };
            let fut = fut.into_actor(self).map(|res, act, ctx| {
                act.reading = false;
                match res {
                    (Ok(saved), Ok(pending), Ok(h)) => {
                        act.resume = pending.into_iter().map(|a| (a.offset, a)).collect();
                        let new = if act.from_queue_start {
                            h.opened
                        } else {
                            h.head
                        };
                        let start = saved.unwrap_or(new).min(h.head);
                        act.cursor = Some(start);
                        act.settled = start;
                        act.head = h.head;
                        act.epoch = h.epoch;
                        if saved.is_none() {
                            act.save_settled(start);
                        }
                        act.pump(ctx);
                    }
                    _ => act.retry_read(ctx),
                }
            });
            ctx.spawn(fut);
            return;
        };
        let read = Read {
            since,
            epoch: None,
            limit: room,
        };
        ctx.spawn(addr.send(read).into_actor(self).map(move |res, act, ctx| {
            act.reading = false;
            match res {
                Ok(Ok(batch)) => {
                    act.head = batch.head;
                    act.epoch = batch.epoch.clone();
                    if batch.messages.is_empty() {
                        act.gauges();
                        act.wait_for_changes(ctx, changes);
                        return;
                    }
                    for m in batch.messages {
                        act.cursor = Some(m.offset);
                        if !act.delivers(&m) {
                            continue; // redriven for another target
                        }
                        match act.resume.remove(&m.offset) {
                            Some(a) => act.resume_retry(ctx, m, a),
                            None => act.attempt(ctx, m, 1),
                        }
                    }
                    act.gauges();
                    act.pump(ctx);
                }
                Ok(Err(Error::UnrecoverablePosition { .. })) => act.skip_rolled_off(ctx),
                _ => act.retry_read(ctx),
            }
        }));
    }

    /// Keeps the queue's head (and so the pending count) current while no read is
    /// made: reads it now, and again at every change of the queue.
    fn follow_head(&mut self, ctx: &mut Context<Self>) {
        if self.cursor.is_none() {
            return;
        }
        self.reading = true;
        let mut changes = self.handle.changes.clone();
        // Seen before the read: a publish after it still wakes us.
        changes.borrow_and_update();
        let head = self.handle.addr.send(Head);
        ctx.spawn(head.into_actor(self).map(move |res, act, ctx| {
            act.reading = false;
            match res {
                Ok(h) => {
                    act.head = h.head;
                    act.gauges();
                    if act.in_flight.len() < act.spec.config.max_in_flight {
                        // A delivery settled meanwhile: read again.
                        act.pump(ctx);
                    } else {
                        act.wait_for_changes(ctx, changes);
                    }
                }
                Err(_) => act.retry_read(ctx),
            }
        }));
    }

    /// The queue's retention ran past the cursor: those messages are gone for this target.
    fn skip_rolled_off(&mut self, ctx: &mut Context<Self>) {
        let fut = self.handle.addr.send(Head).into_actor(self).map(|res, act, ctx| {
            let Ok(h) = res else {
                return act.retry_read(ctx);
            };
            let from = act.cursor.unwrap_or(0);
            let to = h.first.saturating_sub(1);
            if to > from {
                tracing::warn!(queue = %act.handle.name, url = %shown_url(&act.spec.url), skipped = to - from,
                    "messages rolled off the queue before their delivery began");
                act.metrics
                    .webhook_skipped
                    .with_label_values(&[&act.label])
                    .inc_by(to - from);
            }
            act.cursor = Some(to.max(from));
            act.advance_settled();
            act.pump(ctx);
        });
        ctx.spawn(fut);
    }

    /// Saves the settled watermark: below the oldest message still in delivery.
    fn advance_settled(&mut self) {
        let Some(cursor) = self.cursor else {
            return;
        };
        let settled = self
            .in_flight
            .keys()
            .next()
            .map_or(cursor, |first| first - 1);
        if settled > self.settled {
            self.settled = settled;
            self.save_settled(settled);
        }
    }

    fn save_settled(&self, offset: u64) {
        let save =
            self.store
                .set_delivery_cursor(&self.handle.name, self.spec.url.as_str(), offset);
        let (queue, url) = (self.handle.name.clone(), self.spec.url.clone());
        actix::spawn(async move {
            if let Err(e) = save.await {
                tracing::error!(%queue, %url, error = %e, "cannot save the delivery cursor");
            }
        });
    }

    fn retry_read(&mut self, ctx: &mut Context<Self>) {
        ctx.run_later(READ_RETRY, |act, ctx| act.pump(ctx));
    }

    fn wait_for_changes(
        &mut self,
        ctx: &mut Context<Self>,
        mut changes: tokio::sync::watch::Receiver<u64>,
    ) {
        if self.watching {
            return;
        }
        self.watching = true;
        let fut = async move { changes.changed().await.is_ok() };
        ctx.spawn(fut.into_actor(self).map(|alive, act, ctx| {
            act.watching = false;
            if alive {
                act.pump(ctx);
            }
        }));
    }

    /// The id of a message for this target, the same on every retry (receivers
    /// deduplicate on it): queue, epoch, offset and target — or, for a message a redrive
    /// republished for this target, the id its first attempts had.
    fn webhook_id(&self, m: &Message) -> String {
        if let Some((_, id)) = m
            .headers
            .iter()
            .find(|(k, _)| k == redrive_headers::WEBHOOK_ID)
        {
            return id.clone();
        }
        format!(
            "msg_{}_{}_{}_{}",
            self.id_prefix, self.epoch, m.offset, self.target_id
        )
    }

    /// Whether this target delivers `m`: every message, but one a redrive republished
    /// for another target.
    fn delivers(&self, m: &Message) -> bool {
        m.headers
            .iter()
            .find(|(k, _)| k == redrive_headers::FOR_TARGET)
            .is_none_or(|(_, t)| *t == self.target_id)
    }

    fn attempt(&mut self, ctx: &mut Context<Self>, m: Arc<Message>, n: u32) {
        let offset = m.offset;
        let entry = self.in_flight.entry(offset).or_insert_with(|| InFlight {
            message: m.clone(),
            attempts: 0,
            retry: None,
            last_status: None,
            last_error: None,
            dead_lettering: None,
        });
        entry.attempts = n;
        entry.retry = None;
        let spec = &self.spec;
        let mut req = self
            .client
            .request(spec.method.clone(), spec.url.clone())
            .timeout(spec.config.timeout);
        // A message's own headers never set connection-level headers, credentials or
        // the signature headers (the target's configured headers may).
        for (k, v) in m
            .headers
            .iter()
            .filter(|(k, _)| crate::message::forwardable(k))
        {
            req = req.header(k, v);
        }
        for (k, v) in &spec.config.headers {
            req = req.header(k, v);
        }
        if let Some(ct) = m.content_type.as_deref() {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        if let Some(key) = &spec.signing_key {
            let id = self.webhook_id(&m);
            let ts = chrono::Utc::now().timestamp().to_string();
            let mac = crate::auth::ingest::compute_mac(
                crate::auth::HmacAlgo::Sha256,
                key,
                &[id.as_bytes(), b".", ts.as_bytes(), b".", &m.body],
            );
            let sig = base64::engine::general_purpose::STANDARD.encode(mac);
            req = req
                .header("webhook-id", id)
                .header("webhook-timestamp", ts)
                .header("webhook-signature", format!("v1,{sig}"));
        }
        let req = req.body(m.body.clone());
        let started = Instant::now();
        ctx.spawn(
            async move { outcome(req.send().await) }
                .into_actor(self)
                .map(move |res, act, ctx| {
                    act.metrics
                        .webhook_duration
                        .with_label_values(&[&act.label])
                        .observe(started.elapsed().as_secs_f64());
                    act.settle(ctx, offset, res);
                }),
        );
    }

    /// A retry that was pending before a restart: due at its saved time, counted on.
    fn resume_retry(&mut self, ctx: &mut Context<Self>, m: Arc<Message>, a: StoredAttempt) {
        let offset = m.offset;
        let wait = Duration::from_millis((a.next_attempt_ms - now_ms()).max(0) as u64);
        let handle = ctx.run_later(wait, move |act, ctx| {
            if let Some(e) = act.in_flight.get(&offset) {
                let m = e.message.clone();
                act.attempt(ctx, m, a.attempts + 1);
            }
        });
        self.in_flight.insert(
            offset,
            InFlight {
                message: m,
                attempts: a.attempts,
                retry: Some((handle, a.next_attempt_ms)),
                last_status: None,
                last_error: None,
                dead_lettering: None,
            },
        );
    }

    fn settle(&mut self, ctx: &mut Context<Self>, offset: u64, res: Result<(), Failure>) {
        let Some(entry) = self.in_flight.get_mut(&offset) else {
            return;
        };
        let n = entry.attempts;
        let count = |act: &Self, outcome: &str| {
            act.metrics
                .webhook_deliveries
                .with_label_values(&[&act.label, outcome])
                .inc();
        };
        let target = self.spec.url.to_string();
        match res {
            Ok(()) => {
                self.done_with(offset);
                self.delivered += 1;
                count(self, "success");
            }
            Err(f) => {
                entry.last_status = f.status;
                entry.last_error = Some(f.error.clone());
                self.last_error = Some(f.error.clone());
                if n > self.spec.config.max_retries {
                    self.failed += 1;
                    self.give_up(ctx, offset);
                } else {
                    count(self, "retry");
                    let unit = random_unit();
                    let step = self
                        .spec
                        .backoff
                        .delay(n, self.spec.config.backoff.jitter, unit);
                    // `Retry-After` may lengthen the wait, never shorten it below the
                    // target's own backoff (a `Retry-After: 0` is no busy loop).
                    let delay = f.retry_after.map_or(step, |ra| ra.max(step));
                    let due = now_ms() + delay.as_millis() as i64;
                    let handle = ctx.run_later(delay, move |act, ctx| {
                        if let Some(e) = act.in_flight.get(&offset) {
                            let m = e.message.clone();
                            act.attempt(ctx, m, n + 1);
                        }
                    });
                    if let Some(e) = self.in_flight.get_mut(&offset) {
                        e.retry = Some((handle, due));
                    }
                    // Survives a restart: the retry resumes at this time and count.
                    let attempt = StoredAttempt {
                        offset,
                        attempts: n,
                        next_attempt_ms: due,
                    };
                    self.store.save_attempt(&self.handle.name, &target, attempt);
                }
            }
        }
        self.advance_settled();
        self.gauges();
        self.pump(ctx);
    }

    /// Forgets a message that is done with (delivered, dropped or dead-lettered): it
    /// no longer holds the settled cursor back, nor its retry record.
    fn done_with(&mut self, offset: u64) {
        if let Some(done) = self.in_flight.remove(&offset) {
            if done.attempts > 1 {
                let target = self.spec.url.as_str();
                self.store.clear_attempt(&self.handle.name, target, offset);
            }
        }
    }

    /// Retries exhausted: to the dead-letter queue, or dropped (counted) without one.
    /// A message being dead-lettered stays in flight — the settled cursor does not pass
    /// it — until its copy is stored; a dead-letter queue that refuses it is tried again
    /// (counted in `broker_webhook_dead_letter_failures_total`), so a crash or a
    /// shutdown meanwhile only means the message is delivered again after the restart.
    fn give_up(&mut self, ctx: &mut Context<Self>, offset: u64) {
        let Some(done) = self.in_flight.get_mut(&offset) else {
            return;
        };
        let refusals = *done.dead_lettering.get_or_insert(0);
        let m = done.message.clone();
        let Some(dlq) = self.spec.config.dead_letter_queue.clone() else {
            tracing::warn!(queue = %self.handle.name, offset = m.offset, url = %shown_url(&self.spec.url),
                "webhook retries exhausted and no dead_letter_queue: message dropped");
            self.metrics
                .webhook_deliveries
                .with_label_values(&[&self.label, "dropped"])
                .inc();
            self.done_with(offset);
            return;
        };
        let (attempts, last_status, last_error) =
            (done.attempts, done.last_status, done.last_error.clone());
        let mut headers = crate::message::without_broker_headers(&m.headers);
        headers.push((dlq_headers::QUEUE.into(), self.handle.name.to_string()));
        headers.push((dlq_headers::OFFSET.into(), m.offset.to_string()));
        headers.push((dlq_headers::TARGET.into(), shown_url(&self.spec.url)));
        headers.push((dlq_headers::TARGET_ID.into(), self.target_id.clone()));
        headers.push((dlq_headers::WEBHOOK_ID.into(), self.webhook_id(&m)));
        headers.push((dlq_headers::ATTEMPTS.into(), attempts.to_string()));
        if let Some(s) = last_status {
            headers.push((dlq_headers::LAST_STATUS.into(), s.to_string()));
        }
        if let Some(e) = last_error {
            headers.push((dlq_headers::LAST_ERROR.into(), e));
        }
        let message = NewMessage {
            id: None,
            audience: None,
            body: m.body.clone(),
            content_type: m.content_type.clone(),
            headers,
        };
        let ingress = self.ingress.clone();
        let fut = async move {
            ingress
                .publish(PublishRequest {
                    queue: &dlq,
                    publisher: Publisher::Broker,
                    messages: vec![message],
                    deliver_at_ms: None,
                })
                .await
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(_) => {
                act.metrics
                    .dead_lettered
                    .with_label_values(&[&act.label])
                    .inc();
                act.metrics
                    .webhook_deliveries
                    .with_label_values(&[&act.label, "dead_lettered"])
                    .inc();
                act.done_with(offset);
                act.advance_settled();
                act.gauges();
                act.pump(ctx);
            }
            Err(e) => {
                tracing::error!(queue = %act.handle.name, offset, error = %e,
                    "could not dead-letter a message; it stays pending and is tried again");
                act.metrics
                    .webhook_dead_letter_failures
                    .with_label_values(&[&act.label])
                    .inc();
                if let Some(e) = act.in_flight.get_mut(&offset) {
                    e.dead_lettering = Some(refusals + 1);
                }
                // 1 s, doubling, at most a minute.
                let wait = DEAD_LETTER_RETRY * 2u32.saturating_pow(refusals.min(6));
                ctx.run_later(wait.min(Duration::from_secs(60)), move |act, ctx| {
                    act.give_up(ctx, offset)
                });
            }
        }));
    }
}

/// Maps a response to success or a failure worth retrying.
fn outcome(res: Result<reqwest::Response, reqwest::Error>) -> Result<(), Failure> {
    let resp = match res {
        Ok(r) => r,
        Err(e) => {
            let error = if e.is_timeout() {
                "timeout".to_owned()
            } else {
                // Without the URL: it may carry credentials.
                format!("request failed: {}", e.without_url())
            };
            return Err(Failure {
                status: None,
                error,
                retry_after: None,
            });
        }
    };
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let retry_after = if matches!(status.as_u16(), 429 | 503) {
        resp.headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
    } else {
        None
    };
    // Redirects are never followed (the client has no redirect policy): a 3xx is a
    // failed attempt, and says where it pointed (credentials stripped).
    let location = status
        .is_redirection()
        .then(|| resp.headers().get(reqwest::header::LOCATION))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(|l| crate::delivery::shown_url_text(l).unwrap_or_else(|| "(not a URL)".to_owned()));
    let error = match location {
        Some(to) => format!("HTTP {status}, redirect to {to} not followed"),
        None => format!("HTTP {status}"),
    };
    Err(Failure {
        status: Some(status.as_u16()),
        error,
        retry_after,
    })
}

/// `Retry-After`: seconds or an HTTP date; capped.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let d = match v.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
            let ms = (at.timestamp_millis() - now_ms()).max(0) as u64;
            Duration::from_millis(ms)
        }
    };
    Some(d.min(MAX_RETRY_AFTER))
}

fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    crate::random::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

impl Actor for Webhook {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        if self.spec.config.dead_letter_queue.is_some() {
            // The series exists from the start (at 0), so its alert sees the first refusal.
            self.metrics
                .webhook_dead_letter_failures
                .with_label_values(&[&self.label]);
        }
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.report((0, 0));
        if self.leader {
            self.metrics.webhook_targets_delivering.dec();
        }
    }
}

impl Handler<LeadershipChanged> for Webhook {
    type Result = ();

    fn handle(&mut self, msg: LeadershipChanged, ctx: &mut Self::Context) {
        if msg.leader == self.leader {
            return;
        }
        self.leader = msg.leader;
        if msg.leader {
            self.metrics.webhook_targets_delivering.inc();
        } else {
            self.metrics.webhook_targets_delivering.dec();
        }
        if msg.leader {
            self.pump(ctx);
        } else {
            // Another node takes over: forget what is in flight; on leading again,
            // resume from the settled cursor in the store (the other node moved it).
            self.cursor = None;
            for (_, e) in std::mem::take(&mut self.in_flight) {
                if let Some((h, _)) = e.retry {
                    ctx.cancel_future(h);
                }
            }
            self.gauges();
        }
    }
}

impl Handler<Retarget> for Webhook {
    type Result = ();

    fn handle(&mut self, msg: Retarget, ctx: &mut Self::Context) {
        self.spec = msg.spec;
        self.pump(ctx);
    }
}

impl Handler<StopWebhook> for Webhook {
    type Result = ();

    fn handle(&mut self, _: StopWebhook, ctx: &mut Self::Context) {
        // The target was removed: adding it again starts afresh.
        self.store
            .remove_delivery_cursor(&self.handle.name, self.spec.url.as_str());
        ctx.stop();
    }
}

impl Handler<GetStatus> for Webhook {
    type Result = WebhookStatus;

    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> WebhookStatus {
        let next = self
            .in_flight
            .values()
            .filter_map(|e| e.retry.as_ref().map(|(_, at)| *at))
            .min()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        let cursor = self.cursor.unwrap_or(self.head);
        WebhookStatus {
            url: shown_url(&self.spec.url),
            active: self.leader,
            pending: self.head.saturating_sub(cursor),
            in_flight: self.in_flight.len(),
            dead_lettering: self
                .in_flight
                .values()
                .filter(|e| e.dead_lettering.is_some())
                .count(),
            cursor,
            delivered: self.delivered,
            failed: self.failed,
            last_error: self.last_error.clone(),
            next_attempt: next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::hub::GetQueue;
    use crate::actors::leader::{Leader, SingleNode};
    use crate::actors::queue::Publish;
    use crate::config::parse;
    use crate::settings::Settings;

    fn settings(toml: &str) -> Arc<Settings> {
        let (cfg, src) = parse(None, toml, Vec::<(String, String)>::new()).unwrap();
        Arc::new(Settings::compile(cfg, src).unwrap())
    }

    /// The core over a memory store, as a single node, with `settings` (the arbiter
    /// runs the webhook actors: keep it).
    async fn core(
        settings: Arc<Settings>,
    ) -> (
        crate::actors::Launched,
        Arc<Metrics>,
        Arc<dyn Store>,
        Arbiter,
    ) {
        let metrics = Arc::new(Metrics::new());
        let store = crate::store::open("memory://", metrics.clone())
            .await
            .unwrap();
        let leader = Leader::new(Box::new(SingleNode), metrics.clone()).start();
        let arbiter = Arbiter::new();
        let launched = crate::actors::launch_for_tests(
            settings,
            store.clone(),
            metrics.clone(),
            leader,
            arbiter.handle(),
        );
        (launched, metrics, store, arbiter)
    }

    /// Starts a target (to a port that refuses, no retries) of queue `q` after five
    /// messages were published, with `saved` as its stored settled cursor; waits until
    /// it has settled everything and returns its status, with the store and its URL.
    async fn target_after_five(
        saved: Option<u64>,
        from_queue_start: bool,
    ) -> (Addr<Webhook>, WebhookStatus, Arc<dyn Store>) {
        // Port 9 on loopback refuses connections: every attempt fails at once.
        let with_target = settings(
            "[[queues]]\nname = \"q\"\n[[queues.webhooks]]\nurl = \"http://127.0.0.1:9/\"\nmax_retries = 0\n",
        );
        // A hub without the webhook (its own actor is started by hand below).
        let (launched, metrics, store, _arbiter) =
            core(settings("[[queues]]\nname = \"q\"\n")).await;
        let hub = launched.hub;
        let handle = hub
            .send(GetQueue { name: "q".into() })
            .await
            .unwrap()
            .unwrap();
        let msgs = (0..5)
            .map(|i| NewMessage {
                id: None,
                audience: None,
                body: bytes::Bytes::from(format!("m{i}")),
                content_type: None,
                headers: vec![],
            })
            .collect();
        handle
            .addr
            .send(Publish { messages: msgs })
            .await
            .unwrap()
            .unwrap();
        let url = "http://127.0.0.1:9/";
        if let Some(c) = saved {
            store.set_delivery_cursor("q", url, c).await.unwrap();
        }

        let spec = with_target.queue("q").unwrap().webhooks[0].clone();
        let w = Webhook::new(
            handle,
            from_queue_start,
            "q".into(),
            spec,
            launched.ingress,
            reqwest::Client::new(),
            metrics,
            store.clone(),
        )
        .start();
        w.send(LeadershipChanged { leader: true }).await.unwrap();
        let mut status = w.send(GetStatus).await.unwrap();
        for _ in 0..500 {
            if status.cursor == 5 && status.in_flight == 0 {
                break;
            }
            actix::clock::sleep(Duration::from_millis(10)).await;
            status = w.send(GetStatus).await.unwrap();
        }
        (w, status, store)
    }

    #[actix::test]
    async fn resumes_after_the_settled_cursor_in_the_store() {
        let url = "http://127.0.0.1:9/";
        let (w, status, store) = target_after_five(Some(2), false).await;
        assert_eq!(
            (status.failed, status.cursor, status.in_flight),
            (3, 5, 0),
            "offsets 3, 4 and 5, not 1 or 2"
        );
        assert_eq!(
            store.delivery_cursor("q", url).await.unwrap(),
            Some(5),
            "the settled cursor is saved"
        );
        w.send(StopWebhook).await.unwrap();
        assert_eq!(
            store.delivery_cursor("q", url).await.unwrap(),
            None,
            "a removed target starts afresh"
        );
    }

    /// A new target that started with its queue delivers what was published since the
    /// queue started, even before the target was running; one added to a running queue
    /// starts from the newest message.
    #[actix::test]
    async fn a_new_target_started_with_its_queue_misses_nothing() {
        let (_, status, _) = target_after_five(None, true).await;
        assert_eq!((status.failed, status.cursor), (5, 5), "offsets 1 to 5");
        let (_, status, _) = target_after_five(None, false).await;
        assert_eq!((status.failed, status.cursor), (0, 5), "from now on");
    }

    /// A message whose dead-letter copy is refused is not settled: the settled cursor
    /// stays before it (a restart delivers it again), it stays in flight and counted,
    /// and dead-lettering is tried again.
    #[actix::test]
    async fn a_message_is_settled_only_once_its_dead_letter_is_stored() {
        // The target refuses connections; the dead-letter queue refuses the message.
        let (launched, metrics, store, _arbiter) = core(settings(
            "[[queues]]\nname = \"q\"\n[[queues.webhooks]]\nurl = \"http://127.0.0.1:9/\"\n\
             max_retries = 0\ndead_letter_queue = \"dlq\"\n[[queues]]\nname = \"dlq\"\nmax_message_size = 4\n",
        ))
        .await;
        let handle = launched
            .hub
            .send(GetQueue { name: "q".into() })
            .await
            .unwrap()
            .unwrap();
        let big = NewMessage::from(bytes::Bytes::from_static(b"too large for the dlq"));
        handle
            .addr
            .send(Publish {
                messages: vec![big],
            })
            .await
            .unwrap()
            .unwrap();
        let failures = || {
            metrics
                .webhook_dead_letter_failures
                .with_label_values(&["q"])
                .get()
        };
        for _ in 0..1000 {
            if failures() >= 2 {
                break;
            }
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
        assert!(failures() >= 2, "dead-lettering is tried again");
        let url = "http://127.0.0.1:9/";
        assert_eq!(
            store.delivery_cursor("q", url).await.unwrap(),
            Some(0),
            "not settled: a restart delivers it again"
        );
        let status = crate::actors::webhooks::status(&launched.webhooks, "q").await;
        assert_eq!((status[0].in_flight, status[0].failed), (1, 1));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        let unit = random_unit();
        assert!((0.0..1.0).contains(&unit));
    }
}
