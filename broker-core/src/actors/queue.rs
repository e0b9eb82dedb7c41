//! `Queue`: one queue's bounded, ordered log.
//!
//! It hands appends to its log (`crate::log`, which gives offsets and makes them
//! durable) and makes them visible, strictly in offset order, once the log has them,
//! whether they come back from its own appends or through the log's feed (another
//! replica's); it drops the oldest messages past the limits, and keeps
//! the cursors of the poll consumers that read it, so that a read and its cursor move
//! are one step. Readers that wait (long-poll) watch the `changes` channel, which is
//! bumped whenever something a reader could see changes: no per-waiter bookkeeping here.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;

pub use super::cursors::ConsumerKey;
use super::cursors::{ConsumerRead as CursorRead, Cursors};
use super::delayed::{DelayedSet, Full};
use super::leader::LeadershipChanged;
use super::subscriber::{Lagged, Subscriber};
use super::subscribers::Subscribers;
use super::window::{DropReason, Window};
use crate::error::{Error, Rejection};
use crate::log::QueueLog;
use crate::message::{now_ms, Message, NewMessage};
use crate::metrics::Metrics;
use crate::settings::QueueSpec;
use crate::store::{Store, StoredQueue};

/// How long a delayed release that the store refused waits before the next try.
const DELAYED_RETRY_MS: i64 = 1000;

/// Mailbox capacity: publishers and readers `send` (never `do_send`), so a busy queue
/// pushes back on them instead of growing without bound.
const MAILBOX_CAPACITY: usize = 4096;

/// What callers hold to talk to one queue.
#[derive(Clone)]
pub struct QueueHandle {
    /// The queue's name.
    pub name: Arc<str>,
    /// The actor.
    pub addr: Addr<Queue>,
    /// Bumped whenever readers could see something new; long-polls wait on it.
    pub changes: watch::Receiver<u64>,
}

/// Result of a successful publish.
#[derive(Debug, Clone)]
pub struct Published {
    /// Offset of the first message published.
    pub first_offset: u64,
    /// Offset of the last message published.
    pub last_offset: u64,
    /// The queue's epoch.
    pub epoch: Arc<str>,
    /// Messages not stored again because their idempotency key was stored before (or
    /// repeated in this publish). When nothing new was stored, the offsets are those of
    /// the first publish.
    pub duplicates: usize,
}

/// What a read returns.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The queue's epoch.
    pub epoch: Arc<str>,
    /// The newest offset visible in the queue (0 when nothing was ever published).
    pub head: u64,
    /// The messages, oldest first.
    pub messages: Vec<Arc<Message>>,
}

/// Appends messages (all or none).
#[derive(Message)]
#[rtype(result = "Result<Published, Error>")]
pub struct Publish {
    /// The messages, in order.
    pub messages: Vec<NewMessage>,
}

/// Holds messages back until `deliver_at_ms`; they get their offsets (in order of due
/// time) when they become visible, to every kind of reader at once.
#[derive(Message)]
#[rtype(result = "Result<Scheduled, Error>")]
pub struct PublishAt {
    /// The messages, in order.
    pub messages: Vec<NewMessage>,
    /// Unix milliseconds at which they become visible.
    pub deliver_at_ms: i64,
}

/// Result of a delayed publish.
#[derive(Debug, Clone)]
pub struct Scheduled {
    /// How many messages wait.
    pub count: usize,
    /// When they become visible (Unix ms).
    pub deliver_at_ms: i64,
}

/// The queue's epoch, newest offset and oldest retained offset.
#[derive(Message)]
#[rtype(result = "HeadInfo")]
pub struct Head;

/// Reply to [`Head`].
#[derive(Debug, Clone, MessageResponse)]
pub struct HeadInfo {
    /// The epoch.
    pub epoch: Arc<str>,
    /// Newest visible offset.
    pub head: u64,
    /// Oldest retained offset (`head + 1` when empty).
    pub first: u64,
    /// The head when the queue started (loaded its stored state): where a webhook
    /// target that started with the queue begins, so that nothing published since the
    /// queue took publishes is missed.
    pub opened: u64,
}

/// Reads the messages after `since` (the last offset the reader has seen).
#[derive(Message)]
#[rtype(result = "Result<Batch, Error>")]
pub struct Read {
    /// Last offset seen; 0 reads from the oldest retained message.
    pub since: u64,
    /// The epoch the reader's `since` belongs to, if it knows it.
    pub epoch: Option<String>,
    /// Most messages to return.
    pub limit: usize,
}

/// Creates (or resets) a poll consumer positioned after the newest message.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddConsumer {
    /// The consumer.
    pub key: ConsumerKey,
    /// Its stored position (restart); `None` for a new consumer (after the newest).
    pub last_seen: Option<u64>,
}

/// Forgets a poll consumer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveConsumer {
    /// The consumer.
    pub key: ConsumerKey,
    /// Also delete it from the store (not when it is being moved to another queue).
    pub forget: bool,
}

/// Reads a poll consumer's unread messages and moves its cursor past them.
#[derive(Message)]
#[rtype(result = "Result<Batch, Error>")]
pub struct ConsumerRead {
    /// The consumer.
    pub key: ConsumerKey,
    /// Most messages to return.
    pub limit: usize,
}

/// Registers a live subscriber, first replaying what it missed. Replay and registration
/// happen in one step, so there is neither a gap nor a duplicate at the seam.
#[derive(Message)]
#[rtype(result = "Subscribed")]
pub struct Subscribe {
    /// The subscriber.
    pub subscriber: Subscriber,
    /// Last offset the subscriber has seen, to resume after; `None` starts live.
    pub since: Option<u64>,
    /// The epoch `since` belongs to.
    pub epoch: Option<String>,
}

/// Reply to [`Subscribe`].
#[derive(Debug, MessageResponse)]
pub struct Subscribed {
    /// The queue's epoch.
    pub epoch: Arc<str>,
    /// The newest offset; live delivery continues after it.
    pub head: u64,
    /// The retained messages after `since`, oldest first.
    pub replay: Vec<Arc<Message>>,
    /// `since` was given and everything after it was replayed.
    pub recovered: bool,
    /// `since` was given but messages after it are gone (or the epoch differs).
    pub unrecoverable: bool,
}

/// Ends a live subscription.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    /// The subscription id.
    pub id: u64,
}

/// Whether the queue holds nothing: no message, delayed message, subscriber, consumer or
/// append in flight (the Hub forgets idle pattern queues).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct IsIdle;

/// Applies new limits after a reload (dropping what no longer fits).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconfigure {
    /// The queue's new spec.
    pub spec: Arc<QueueSpec>,
}

/// An append handed to the log, in call order: what it stored once it has resolved
/// (`Some(None)`: it failed).
struct Inflight {
    seq: u64,
    outcome: Option<Option<Vec<Arc<Message>>>>,
}

/// One queue. Created by the `Hub`.
pub struct Queue {
    name: Arc<str>,
    spec: Arc<QueueSpec>,
    /// Where its messages are kept (offsets, durability, other replicas' appends).
    log: Box<dyn QueueLog>,
    /// Cursors and delayed entries.
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// This queue's metric handles (no label lookups on the hot path).
    m: crate::metrics::QueueMetrics,
    changes: watch::Sender<u64>,
    epoch: Arc<str>,
    /// The retained window (messages, bytes, newest visible offset).
    window: Window,
    /// Appends handed to the log and not yet applied, in call order.
    inflight: VecDeque<Inflight>,
    /// Number of the next append.
    next_seq: u64,
    /// Stored entries that arrived before an entry ahead of them (see `accept`);
    /// bounded by the appends in flight and the feed's batch.
    early: BTreeMap<u64, Arc<Message>>,
    /// The named poll consumers and their refresh rules.
    consumers: Cursors,
    /// Idempotency keys stored recently.
    recent: super::recent::Recent,
    /// The live subscribers.
    subscribers: Subscribers,
    /// Delayed messages: one heap and one timer for the earliest, not a timer each.
    delayed: DelayedSet,
    /// The one timer, for the earliest delayed message (its due time and handle).
    delayed_timer: Option<(i64, SpawnHandle)>,
    /// Whether this node leads: only the leader releases delayed messages.
    leading: bool,
    /// The head when the stored state was loaded.
    opened: u64,
    /// An append failed: nothing more is appended until every append in flight has
    /// settled and the stored tail has been re-read (a commit reported as failed may
    /// still have happened; offsets continue from what the store holds).
    resync: Resync,
}

/// Where the queue stands after a failed append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resync {
    /// Appends go through.
    No,
    /// Waiting for the appends in flight to settle.
    Draining,
    /// Reading the stored tail.
    Reading,
}

impl Queue {
    /// A queue that loads its state from `log` when it starts.
    pub fn new(
        name: Arc<str>,
        spec: Arc<QueueSpec>,
        log: Box<dyn QueueLog>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        changes: watch::Sender<u64>,
        leading: bool,
    ) -> Self {
        let replicated = log.replicated();
        Self {
            m: metrics.queue(spec.label()),
            name,
            spec,
            log,
            store,
            metrics,
            changes,
            epoch: Arc::from(""),
            window: Window::default(),
            inflight: VecDeque::new(),
            next_seq: 0,
            early: BTreeMap::new(),
            consumers: Cursors::default(),
            recent: Default::default(),
            subscribers: Subscribers::default(),
            delayed: if replicated {
                DelayedSet::with_random_ids()
            } else {
                DelayedSet::default()
            },
            delayed_timer: None,
            leading: leading || replicated,
            opened: 0,
            resync: Resync::No,
        }
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn restore(&mut self, state: StoredQueue, ctx: &mut Context<Self>) {
        let added = self.delayed.restore(state.delayed);
        self.m.delayed.add(added as i64);
        self.arm_delayed_timer(ctx);
        self.epoch = state.epoch;
        self.log.continue_at(state.next_offset);
        self.recent.note(&state.messages);
        let (n, size) = self.window.append(state.messages);
        self.window.raise_head(state.next_offset - 1);
        self.opened = self.window.head();
        self.m.depth.add(n as i64);
        self.m.bytes.add(size as i64);
        self.set_limit_gauges();
        self.enforce_limits();
    }

    fn set_limit_gauges(&self) {
        let l = &self.spec.limits;
        self.m.limit_messages.set(l.max_message_count as i64);
        self.m.limit_bytes.set(l.max_queue_size as i64);
    }

    /// Drops the oldest messages until the queue is within its limits.
    fn enforce_limits(&mut self) {
        let dropped = self.window.enforce(&self.spec.limits);
        for (reason, size) in &dropped {
            match reason {
                DropReason::Count => self.m.dropped_count.inc(),
                DropReason::Size => self.m.dropped_size.inc(),
            }
            self.m.depth.dec();
            self.m.bytes.sub(*size as i64);
        }
        if !dropped.is_empty() {
            self.log.trim(self.window.first_retained());
        }
    }

    /// Makes acknowledged appends visible, in call order. After a failed append
    /// nothing more becomes visible from here: what the log holds past the last
    /// visible offset is re-read instead ([`Queue::resync_tail`]).
    fn apply_acknowledged(&mut self, ctx: &mut Context<Self>) {
        while self.inflight.front().is_some_and(|i| i.outcome.is_some()) {
            let done = self.inflight.pop_front().expect("checked above");
            match done.outcome {
                Some(Some(messages)) if self.resync == Resync::No => self.accept(messages),
                Some(Some(_)) => {}
                _ => self.resync = Resync::Draining,
            }
        }
        if self.resync == Resync::Draining && self.inflight.is_empty() {
            self.resync_tail(ctx);
        }
    }

    /// Takes stored entries (from an append or the log's feed) and makes visible what
    /// follows the head without a gap: offsets already visible are skipped, entries
    /// after a gap wait in `early` until the entries before them arrive (a replicated
    /// log may acknowledge appends out of offset order).
    fn accept(&mut self, messages: Vec<Arc<Message>>) {
        let head = self.window.head();
        for m in messages.into_iter().filter(|m| m.offset > head) {
            self.early.insert(m.offset, m);
        }
        let mut next = head + 1;
        let mut ready = Vec::new();
        while let Some(m) = self.early.remove(&next) {
            ready.push(m);
            next += 1;
        }
        if !ready.is_empty() {
            self.make_visible(ready);
            self.notify();
        }
    }

    /// Appends stored messages (contiguous, after `head`) to the visible log.
    fn make_visible(&mut self, messages: Vec<Arc<Message>>) {
        let size: usize = messages.iter().map(|m| m.body.len()).sum();
        self.fan_out(&messages, size);
        self.recent.note(&messages);
        let (n, _) = self.window.append(messages);
        self.m.published.inc_by(n as u64);
        self.m.depth.add(n as i64);
        self.m.bytes.add(size as i64);
        self.enforce_limits();
        let (window, first) = (self.idempotency_window_ms(), self.window.first_retained());
        self.recent.prune(now_ms(), window, first);
    }

    /// `limits.idempotency_window` in milliseconds.
    fn idempotency_window_ms(&self) -> i64 {
        i64::try_from(self.spec.limits.idempotency_window.as_millis()).unwrap_or(i64::MAX)
    }

    /// Re-reads what the store holds after the last visible offset, makes it visible
    /// and continues offsets from the stored next offset; retried until the store
    /// answers.
    fn resync_tail(&mut self, ctx: &mut Context<Self>) {
        self.resync = Resync::Reading;
        let read = self.log.tail(self.window.head());
        ctx.spawn(read.into_actor(self).map(|res, act, ctx| match res {
            Ok(tail) => {
                if tail.epoch != act.epoch {
                    act.replace_history(tail);
                } else {
                    let found = tail.messages.len();
                    let fresh: Vec<_> = tail
                        .messages
                        .into_iter()
                        .filter(|m| m.offset > act.window.head())
                        .collect();
                    if !fresh.is_empty() {
                        tracing::warn!(queue = %act.name, found, "messages whose commit was reported as failed are stored; made visible");
                        act.make_visible(fresh);
                        act.notify();
                    }
                    act.window.raise_head(tail.next_offset - 1);
                }
                let head = act.window.head();
                act.early.retain(|offset, _| *offset > head);
                act.log.continue_at(head + 1);
                act.resync = Resync::No;
                act.accept(Vec::new());
            }
            Err(e) => {
                tracing::warn!(queue = %act.name, error = %e, "cannot re-read the queue's stored tail; retrying");
                ctx.run_later(Duration::from_secs(1), |act, ctx| act.resync_tail(ctx));
            }
        }));
    }

    /// The store holds another history under this name (the queue was removed and
    /// created again meanwhile): take it, and tell every reader to refresh.
    fn replace_history(&mut self, tail: crate::store::StoredTail) {
        tracing::error!(queue = %self.name, old = %self.epoch, new = %tail.epoch, "the stored history of the queue changed: new epoch");
        self.early.clear();
        let (n, size) = self.window.reset(0);
        self.m.depth.sub(n as i64);
        self.m.bytes.sub(size as i64);
        self.recent = super::recent::Recent::default();
        self.recent.note(&tail.messages);
        let (n, size) = self.window.append(tail.messages);
        self.window.raise_head(tail.next_offset - 1);
        self.m.depth.add(n as i64);
        self.m.bytes.add(size as i64);
        self.epoch = tail.epoch;
        self.consumers.note_loss();
        for (id, sub) in self.subscribers.drain() {
            sub.lagged.do_send(Lagged {
                subscription: id,
                queue: self.name.clone(),
                offset: self.window.head(),
                epoch: self.epoch.clone(),
            });
        }
        self.enforce_limits();
        self.notify();
    }

    /// Offers new messages to every live subscriber; never waits on one. One dropped
    /// for lagging gets one notice (bounded even though `do_send` is not).
    fn fan_out(&mut self, messages: &[Arc<Message>], bytes: usize) {
        for (id, sub) in self.subscribers.offer(&self.name, messages, bytes) {
            self.metrics.ws_slow_consumers.inc();
            sub.lagged.do_send(Lagged {
                subscription: id,
                queue: self.name.clone(),
                offset: self.window.head(),
                epoch: self.epoch.clone(),
            });
        }
    }

    /// Keeps a consumer's position in the store (survives restarts with a durable store).
    fn save_cursor(&self, key: &ConsumerKey, last_seen: u64) {
        self.store.save_consumer(crate::store::StoredConsumer {
            user: key.user.clone(),
            client: key.client.clone(),
            queue: self.name.to_string(),
            last_seen,
        });
    }

    /// Whether a reader at `since` (of `epoch`, if given) is only ahead of this replica:
    /// on a log other replicas append to, this replica's feed may not have brought what
    /// the reader saw elsewhere yet. Such a reader waits instead of being told to refresh.
    fn ahead_of_this_replica(&self, since: u64, epoch: Option<&str>) -> bool {
        self.log.replicated()
            && since > self.window.head()
            && epoch.is_none_or(|e| e == &*self.epoch)
    }

    /// A reader that knows the current epoch and has seen offsets beyond the newest
    /// one proves that history was lost (the store restored from an older copy): the
    /// queue takes a new epoch, so no reader is ever shown other messages under offsets
    /// it has seen once new publishes reach them. Every reader resuming with the old
    /// epoch is told to refresh.
    fn note_position(&mut self, since: u64, epoch: Option<&str>) {
        if since <= self.window.head() || epoch != Some(&*self.epoch) || self.log.replicated() {
            return;
        }
        let new = crate::store::random_epoch();
        tracing::error!(
            queue = %self.name,
            since,
            head = self.window.head(),
            old = %self.epoch,
            new = %new,
            "a reader has seen offsets this queue does not have: its history was lost; new epoch"
        );
        self.log.set_epoch(&new);
        self.epoch = new;
    }
}

impl Actor for Queue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        self.open(ctx, 1);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.m.delayed.sub(self.delayed.len() as i64);
        self.m.depth.sub(self.window.len() as i64);
        self.m.bytes.sub(self.window.bytes() as i64);
    }
}

/// Attempts at loading a queue's stored state before the queue gives up (and stops; the
/// next use starts it again).
const OPEN_ATTEMPTS: u32 = 3;

impl Queue {
    /// Loads the stored state; nothing else is handled until it is loaded. A failure
    /// (a store busy or briefly away) is retried, 0.5 s then 1 s later, before the
    /// queue stops.
    fn open(&mut self, ctx: &mut Context<Self>, attempt: u32) {
        ctx.wait(
            self.log
                .open()
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok(state) => {
                        act.restore(state, ctx);
                        if let Some(feed) = act.log.feed() {
                            ctx.add_stream(feed);
                        }
                        if let Some(changes) = act.log.delayed_feed() {
                            ctx.add_stream(changes);
                        }
                    }
                    Err(e) if attempt < OPEN_ATTEMPTS => {
                        tracing::warn!(queue = %act.name, error = %e, attempt, "cannot open queue; retrying");
                        let pause = Duration::from_millis(500 * u64::from(attempt));
                        ctx.wait(
                            tokio::time::sleep(pause)
                                .into_actor(act)
                                .map(move |(), act, ctx| act.open(ctx, attempt + 1)),
                        );
                    }
                    Err(e) => {
                        tracing::error!(queue = %act.name, error = %e, "cannot open queue");
                        ctx.stop();
                    }
                }),
        );
    }

    /// Refuses a batch with an oversized message (webhook-queue: consumers must refresh).
    fn check_sizes(&mut self, messages: &[NewMessage]) -> Result<(), Error> {
        let max = self.spec.limits.max_message_size;
        let Some(big) = messages.iter().find(|m| m.body.len() > max) else {
            return Ok(());
        };
        self.consumers.note_loss();
        self.notify();
        Err(Error::rejected(
            Rejection::MessageTooLarge,
            format!(
                "Message was too large: {} bytes, queue `{}` takes at most {max}",
                big.body.len(),
                self.name
            ),
        ))
    }

    /// Hands the batch to the log and makes it visible once stored.
    /// `released`: the delayed entries these messages come from (forgotten atomically).
    fn append(
        &mut self,
        messages: Vec<NewMessage>,
        released: Vec<u64>,
    ) -> ResponseActFuture<Self, Result<Published, Error>> {
        if self.resync != Resync::No {
            let e = Error::Store(format!(
                "queue `{}` is re-reading its stored tail after a failed write",
                self.name
            ));
            return Box::pin(fut::ready(Err(e)));
        }
        if messages.is_empty() {
            let head = self.window.head();
            let done = Published {
                first_offset: head,
                last_offset: head,
                epoch: self.epoch.clone(),
                duplicates: 0,
            };
            return Box::pin(fut::ready(Ok(done)));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let append = self.log.append(messages, released);
        self.inflight.push_back(Inflight { seq, outcome: None });
        Box::pin(append.into_actor(self).map(move |res, act, ctx| {
            let (published, outcome) = match res {
                Ok(stored) => {
                    let p = Published {
                        first_offset: stored.first().map_or(0, |m| m.offset),
                        last_offset: stored.last().map_or(0, |m| m.offset),
                        epoch: act.epoch.clone(),
                        duplicates: 0,
                    };
                    (Ok(p), Some(stored))
                }
                Err(e) => (Err(e), None),
            };
            if let Some(entry) = act.inflight.iter_mut().find(|i| i.seq == seq) {
                entry.outcome = Some(outcome);
            }
            act.apply_acknowledged(ctx);
            published
        }))
    }

    /// Arms the one timer for the earliest delayed message.
    fn arm_delayed_timer(&mut self, ctx: &mut Context<Self>) {
        let Some(at) = self.delayed.earliest().filter(|_| self.leading) else {
            return;
        };
        if self.delayed_timer.as_ref().is_some_and(|(t, _)| *t <= at) {
            return;
        }
        if let Some((_, h)) = self.delayed_timer.take() {
            ctx.cancel_future(h);
        }
        let wait = Duration::from_millis((at - now_ms()).max(0) as u64);
        let handle = ctx.run_later(wait, |act, ctx| {
            act.delayed_timer = None;
            act.release_due(ctx);
        });
        self.delayed_timer = Some((at, handle));
    }

    /// Appends every delayed message that is due, in due order, as one batch.
    fn release_due(&mut self, ctx: &mut Context<Self>) {
        let due = self.delayed.take_due(now_ms());
        self.m.delayed.sub(due.len() as i64);
        if !due.is_empty() {
            let ids = due.iter().map(|d| d.id).collect();
            let messages = due.iter().map(|d| d.message.clone()).collect();
            ctx.spawn(self.append(messages, ids).map(move |res, act, ctx| {
                if let Err(e) = res {
                    // Still in the store: try again shortly rather than lose them.
                    tracing::error!(queue = %act.name, error = %e, "delayed messages could not be released; retrying");
                    let retry_at = now_ms() + DELAYED_RETRY_MS;
                    act.m.delayed.add(due.len() as i64);
                    act.delayed.retry(due, retry_at);
                    act.arm_delayed_timer(ctx);
                }
            }));
        }
        self.arm_delayed_timer(ctx);
    }
}

impl Handler<Publish> for Queue {
    type Result = ResponseActFuture<Self, Result<Published, Error>>;

    fn handle(&mut self, msg: Publish, _: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.check_sizes(&msg.messages) {
            return Box::pin(fut::ready(Err(e)));
        }
        self.publish_once(msg.messages)
    }
}

impl Queue {
    /// Appends `messages`, leaving out those whose idempotency key was stored recently
    /// (and repeats of a key within the batch); `duplicates` counts what was left out.
    /// Nothing new to store: the offsets of what was stored before.
    fn publish_once(
        &mut self,
        messages: Vec<NewMessage>,
    ) -> ResponseActFuture<Self, Result<Published, Error>> {
        if messages.iter().all(|m| m.id.is_none()) {
            return self.append(messages, Vec::new());
        }
        let (now, window) = (now_ms(), self.idempotency_window_ms());
        let first = self.window.first_retained();
        let mut before = Vec::new();
        let mut keys: Vec<Arc<str>> = Vec::new();
        let mut fresh = Vec::with_capacity(messages.len());
        let total = messages.len();
        for m in messages {
            if let Some(k) = &m.id {
                if let Some(offset) = self.recent.find(k, now, window, first) {
                    before.push(offset);
                    continue;
                }
                if keys.contains(k) {
                    continue; // the same key twice in one publish: stored once
                }
                if self.recent.in_flight(k) {
                    let e = Error::rejected(
                        Rejection::IdempotencyKeyInUse,
                        "a publish with this Idempotency-Key is still being stored; retry",
                    );
                    return Box::pin(fut::ready(Err(e)));
                }
                keys.push(k.clone());
            }
            fresh.push(m);
        }
        let duplicates = total - fresh.len();
        if fresh.is_empty() {
            return Box::pin(fut::ready(Ok(Published {
                first_offset: before.iter().copied().min().unwrap_or_default(),
                last_offset: before.iter().copied().max().unwrap_or_default(),
                epoch: self.epoch.clone(),
                duplicates,
            })));
        }
        for k in &keys {
            self.recent.begin(k.clone());
        }
        Box::pin(self.append(fresh, Vec::new()).map(move |res, act, _| {
            for k in &keys {
                act.recent.end(k);
            }
            res.map(|p| Published { duplicates, ..p })
        }))
    }
}

impl Handler<PublishAt> for Queue {
    type Result = ResponseActFuture<Self, Result<Scheduled, Error>>;

    fn handle(&mut self, msg: PublishAt, _: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.check_sizes(&msg.messages) {
            return Box::pin(fut::ready(Err(e)));
        }
        let limits = &self.spec.limits;
        let (max, max_bytes) = (limits.max_delayed_messages, limits.max_delayed_bytes);
        let count = msg.messages.len();
        let at_ms = msg.deliver_at_ms;
        let items = match self.delayed.reserve(msg.messages, at_ms, max, max_bytes) {
            Ok(items) => items,
            Err(full) => {
                let held = match full {
                    Full::Count => format!("{max} delayed messages (max_delayed_messages)"),
                    Full::Bytes => {
                        format!("{max_bytes} bytes of delayed messages (max_delayed_bytes)")
                    }
                };
                let e = Error::rejected(
                    Rejection::TooManyDelayed,
                    format!("queue `{}` would hold more than {held}", self.name),
                );
                return Box::pin(fut::ready(Err(e)));
            }
        };
        // Acknowledged once the store has them, like any publish.
        let save = self.store.schedule(&self.name, items.clone());
        Box::pin(save.into_actor(self).map(move |res, act, ctx| {
            if let Err(e) = res {
                act.delayed.settle(items, false);
                return Err(e);
            }
            let added = act.delayed.settle(items, true);
            act.m.delayed.add(added as i64);
            act.arm_delayed_timer(ctx);
            Ok(Scheduled {
                count,
                deliver_at_ms: at_ms,
            })
        }))
    }
}

impl Handler<Head> for Queue {
    type Result = HeadInfo;

    fn handle(&mut self, _: Head, _: &mut Self::Context) -> HeadInfo {
        HeadInfo {
            epoch: self.epoch.clone(),
            head: self.window.head(),
            first: self.window.first_retained(),
            opened: self.opened,
        }
    }
}

impl Handler<Read> for Queue {
    type Result = Result<Batch, Error>;

    fn handle(&mut self, msg: Read, _: &mut Self::Context) -> Self::Result {
        self.note_position(msg.since, msg.epoch.as_deref());
        let unrecoverable = || Error::UnrecoverablePosition {
            queue: self.name.to_string(),
            since: msg.since,
            offset: self.window.head(),
            epoch: self.epoch.to_string(),
        };
        if msg.epoch.as_deref().is_some_and(|e| e != &*self.epoch) {
            return Err(unrecoverable());
        }
        if self.ahead_of_this_replica(msg.since, msg.epoch.as_deref()) {
            // Nothing here yet: a long-poll waits for this replica to catch up.
            return Ok(Batch {
                epoch: self.epoch.clone(),
                head: self.window.head(),
                messages: Vec::new(),
            });
        }
        // `since` ahead of the queue (another epoch), or before what is retained.
        if !self.window.covers(msg.since) {
            return Err(unrecoverable());
        }
        Ok(Batch {
            epoch: self.epoch.clone(),
            head: self.window.head(),
            messages: self.window.after(msg.since, msg.limit),
        })
    }
}

impl Handler<AddConsumer> for Queue {
    type Result = ();

    fn handle(&mut self, msg: AddConsumer, _: &mut Self::Context) {
        let new = msg.last_seen.is_none();
        let at = self
            .consumers
            .add(msg.key.clone(), msg.last_seen, &self.window);
        if new {
            self.save_cursor(&msg.key, at);
        }
    }
}

/// Moves (or adds) a consumer to where the shared store has it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SyncConsumer {
    /// The consumer.
    pub key: ConsumerKey,
    /// Its stored position.
    pub last_seen: u64,
}

impl Handler<SyncConsumer> for Queue {
    type Result = ();

    fn handle(&mut self, msg: SyncConsumer, _: &mut Self::Context) {
        self.consumers.sync(msg.key, msg.last_seen, &self.window);
    }
}

impl Handler<RemoveConsumer> for Queue {
    type Result = ();

    fn handle(&mut self, msg: RemoveConsumer, _: &mut Self::Context) {
        if msg.forget {
            self.store.remove_consumer(&msg.key.user, &msg.key.client);
        }
        self.consumers.remove(&msg.key);
    }
}

impl Handler<ConsumerRead> for Queue {
    type Result = Result<Batch, Error>;

    fn handle(&mut self, msg: ConsumerRead, _: &mut Self::Context) -> Self::Result {
        let head = self.window.head();
        match self.consumers.read(&msg.key, &self.window, msg.limit) {
            CursorRead::Unknown => Err(Error::ClientNotFound {
                client: msg.key.client,
            }),
            CursorRead::Refresh { reason, at } => {
                self.save_cursor(&msg.key, at);
                Err(Error::Refresh {
                    queue: self.name.to_string(),
                    reason: reason.to_owned(),
                    offset: at,
                    epoch: self.epoch.to_string(),
                })
            }
            CursorRead::Messages { messages, moved_to } => {
                if let Some(at) = moved_to {
                    self.save_cursor(&msg.key, at);
                }
                Ok(Batch {
                    epoch: self.epoch.clone(),
                    head,
                    messages,
                })
            }
        }
    }
}

impl Handler<Subscribe> for Queue {
    type Result = Subscribed;

    fn handle(&mut self, msg: Subscribe, _: &mut Self::Context) -> Self::Result {
        let mut replay = Vec::new();
        let (mut recovered, mut unrecoverable) = (false, false);
        if let Some(since) = msg.since {
            self.note_position(since, msg.epoch.as_deref());
            let epoch_ok = msg.epoch.as_deref().is_none_or(|e| e == &*self.epoch);
            if epoch_ok && self.window.covers(since) {
                replay = self.window.after(since, usize::MAX);
                recovered = true;
            } else if self.ahead_of_this_replica(since, msg.epoch.as_deref()) {
                // Nothing to replay here yet; live delivery starts after `since`.
                recovered = true;
            } else {
                unrecoverable = true;
            }
        }
        self.subscribers.insert(msg.subscriber.id, msg.subscriber);
        let head = match msg.since {
            // The seam between replay and live delivery (the session skips what is
            // older): never before what the reader has seen on another replica.
            Some(since) if recovered => self.window.head().max(since),
            _ => self.window.head(),
        };
        Subscribed {
            epoch: self.epoch.clone(),
            head,
            replay,
            recovered,
            unrecoverable,
        }
    }
}

/// Delayed messages are released where the election says.
impl Handler<LeadershipChanged> for Queue {
    type Result = ();

    fn handle(&mut self, msg: LeadershipChanged, ctx: &mut Self::Context) {
        // Replicas sharing a log all release (the log stores each release once).
        self.leading = msg.leader || self.log.replicated();
        if self.leading {
            self.arm_delayed_timer(ctx);
        } else if let Some((_, h)) = self.delayed_timer.take() {
            ctx.cancel_future(h);
        }
    }
}

/// Delayed entries other replicas scheduled or released.
impl StreamHandler<crate::log::DelayedChange> for Queue {
    fn handle(&mut self, change: crate::log::DelayedChange, ctx: &mut Self::Context) {
        match change {
            crate::log::DelayedChange::Scheduled(d) => {
                let added = self.delayed.restore(vec![d]);
                self.m.delayed.add(added as i64);
                self.arm_delayed_timer(ctx);
            }
            crate::log::DelayedChange::Released(id) => {
                if self.delayed.forget(id) {
                    self.m.delayed.dec();
                }
            }
        }
    }

    fn finished(&mut self, _: &mut Self::Context) {
        tracing::error!(queue = %self.name, "the feed of delayed entries ended: entries scheduled elsewhere are no longer seen");
    }
}

/// Entries of the log that this queue did not append (another replica's).
impl StreamHandler<Vec<Arc<Message>>> for Queue {
    fn handle(&mut self, messages: Vec<Arc<Message>>, ctx: &mut Self::Context) {
        let (now, head) = (now_ms(), self.window.head());
        for m in messages.iter().filter(|m| m.offset > head) {
            let delay = now.saturating_sub(m.received_at_ms).max(0) as f64 / 1000.0;
            self.metrics.cluster_feed_delay.observe(delay);
        }
        if self.resync == Resync::No {
            self.accept(messages);
        }
        if self.resync == Resync::Draining && self.inflight.is_empty() {
            self.resync_tail(ctx);
        }
    }

    fn finished(&mut self, _: &mut Self::Context) {
        // The queue keeps serving what it has and its own appends.
        tracing::error!(queue = %self.name, "the log's feed ended: entries appended elsewhere are no longer seen");
    }
}

impl Handler<Unsubscribe> for Queue {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Self::Context) {
        self.subscribers.remove(msg.id);
    }
}

impl Handler<IsIdle> for Queue {
    type Result = bool;

    fn handle(&mut self, _: IsIdle, _: &mut Self::Context) -> bool {
        self.window.len() == 0
            && self.delayed.len() == 0
            && self.subscribers.is_empty()
            && self.consumers.is_empty()
            && self.inflight.is_empty()
            && self.resync == Resync::No
    }
}

impl Handler<Reconfigure> for Queue {
    type Result = ();

    fn handle(&mut self, msg: Reconfigure, _: &mut Self::Context) {
        self.spec = msg.spec;
        self.set_limit_gauges();
        let before = self.window.len();
        self.enforce_limits();
        if self.window.len() != before {
            self.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::IngestAuth;
    use crate::config::LimitsConfig;
    use crate::store::MemoryStore;
    use bytes::Bytes;

    fn spawn(limits: LimitsConfig) -> (Addr<Queue>, watch::Receiver<u64>) {
        spawn_on(limits, Arc::new(MemoryStore::default()))
    }

    fn spawn_on(
        limits: LimitsConfig,
        store: Arc<MemoryStore>,
    ) -> (Addr<Queue>, watch::Receiver<u64>) {
        let log = crate::log::StoreLogs(store.clone()).of(&Arc::from("q"));
        spawn_with(limits, log, store)
    }

    fn spawn_with(
        limits: LimitsConfig,
        log: Box<dyn QueueLog>,
        store: Arc<dyn Store>,
    ) -> (Addr<Queue>, watch::Receiver<u64>) {
        let spec = Arc::new(QueueSpec {
            name: "q".into(),
            limits,
            allow_ips: vec![],
            auth: IngestAuth::None,
            json_only: false,
            kind: Default::default(),
            webhooks: vec![],
            config: serde_json::from_str(r#"{"name":"q"}"#).unwrap(),
            runtime: false,
        });
        let (tx, rx) = watch::channel(0);
        let metrics = Arc::new(Metrics::new());
        let q = Queue::new("q".into(), spec, log, store, metrics, tx, true);
        (q.start(), rx)
    }

    fn body(n: usize) -> NewMessage {
        NewMessage {
            id: None,
            audience: None,
            body: Bytes::from(vec![b'x'; n]),
            content_type: None,
            headers: vec![],
        }
    }

    async fn publish(q: &Addr<Queue>, sizes: &[usize]) -> Result<Published, Error> {
        q.send(Publish {
            messages: sizes.iter().map(|n| body(*n)).collect(),
        })
        .await
        .unwrap()
    }

    fn limits(count: usize, size: usize, total: usize) -> LimitsConfig {
        LimitsConfig {
            max_message_count: count,
            max_message_size: size,
            max_queue_size: total,
            max_delayed_messages: 10,
            ..LimitsConfig::default()
        }
    }

    fn key() -> ConsumerKey {
        ConsumerKey {
            user: "u".into(),
            client: "c".into(),
        }
    }

    async fn consumer_read(q: &Addr<Queue>) -> Result<Vec<u64>, String> {
        match q
            .send(ConsumerRead {
                key: key(),
                limit: 100,
            })
            .await
            .unwrap()
        {
            Ok(b) => Ok(b.messages.iter().map(|m| m.offset).collect()),
            Err(Error::Refresh { reason, offset, .. }) => {
                Err(format!("refresh@{offset}:{}", &reason[..10]))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Publishes until the queue takes one again (it refuses while it re-reads its
    /// stored tail after a failure).
    async fn publish_when_back(q: &Addr<Queue>) -> Published {
        for _ in 0..1000 {
            match publish(q, &[1]).await {
                Ok(p) => return p,
                Err(Error::Store(_)) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("the queue never took a publish again");
    }

    async fn visible(q: &Addr<Queue>) -> Vec<u64> {
        let read = Read {
            since: 0,
            epoch: None,
            limit: 100,
        };
        let batch = q.send(read).await.unwrap().unwrap();
        batch.messages.iter().map(|m| m.offset).collect()
    }

    /// A refused append takes no offset; an append reported as failed that the store
    /// kept anyway becomes visible once the queue re-reads its tail, and offsets go on
    /// after it: offsets stay +1 per stored message, and readers see only stored ones.
    #[actix::test]
    async fn failed_appends_skip_no_offset_and_hide_nothing_stored() {
        use crate::store::Fault;
        let store = Arc::new(MemoryStore::default());
        let (q, _) = spawn_on(limits(100, 100, 10_000), store.clone());
        assert_eq!(publish(&q, &[1]).await.unwrap().first_offset, 1);
        store.inject(Fault::Refuse);
        assert!(matches!(publish(&q, &[1]).await, Err(Error::Store(_))));
        assert_eq!(
            publish_when_back(&q).await.first_offset,
            2,
            "no offset skipped"
        );
        store.inject(Fault::KeepButReportFailure);
        assert!(matches!(publish(&q, &[1]).await, Err(Error::Store(_))));
        assert_eq!(
            publish_when_back(&q).await.first_offset,
            4,
            "offset 3 is stored, so it is taken"
        );
        assert_eq!(visible(&q).await, vec![1, 2, 3, 4]);
    }

    /// A reader that saw offsets beyond the newest under the current epoch (history
    /// lost, e.g. a restored file) makes the queue take a new epoch: that reader and
    /// every other one resuming with the old epoch are told to refresh, even after new
    /// publishes reach the offsets they saw.
    #[actix::test]
    async fn a_reader_ahead_of_the_queue_proves_lost_history() {
        let (q, _) = spawn(limits(100, 100, 10_000));
        let old = publish(&q, &[1, 1]).await.unwrap().epoch;
        let read = |since: u64, epoch: &str| Read {
            since,
            epoch: Some(epoch.to_owned()),
            limit: 100,
        };
        let ahead = q.send(read(5, &old)).await.unwrap();
        let Err(Error::UnrecoverablePosition { epoch, offset, .. }) = ahead else {
            panic!("{ahead:?}")
        };
        assert_ne!(epoch, &*old);
        assert_eq!(offset, 2);
        publish(&q, &[1, 1, 1, 1]).await.unwrap();
        let behind = q.send(read(2, &old)).await.unwrap();
        assert!(matches!(behind, Err(Error::UnrecoverablePosition { .. })));
        let fine = q.send(read(2, &epoch)).await.unwrap().unwrap();
        assert_eq!(fine.messages.len(), 4);
    }

    #[actix::test]
    async fn offsets_are_dense_and_reads_resume() {
        let (q, mut changes) = spawn(limits(100, 100, 10_000));
        changes.borrow_and_update();
        let p = publish(&q, &[1, 2, 3]).await.unwrap();
        assert_eq!((p.first_offset, p.last_offset), (1, 3));
        assert!(changes.has_changed().unwrap(), "readers are woken");
        let b = q
            .send(Read {
                since: 1,
                epoch: Some(p.epoch.to_string()),
                limit: 10,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            b.messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(b.head, 3);
        let b = q
            .send(Read {
                since: 0,
                epoch: None,
                limit: 2,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.messages.len(), 2);
        let wrong_epoch = q
            .send(Read {
                since: 1,
                epoch: Some("other".into()),
                limit: 10,
            })
            .await
            .unwrap();
        assert!(matches!(
            wrong_epoch,
            Err(Error::UnrecoverablePosition { offset: 3, .. })
        ));
        let ahead = q
            .send(Read {
                since: 4,
                epoch: None,
                limit: 10,
            })
            .await
            .unwrap();
        assert!(matches!(ahead, Err(Error::UnrecoverablePosition { .. })));
    }

    #[actix::test]
    async fn count_and_size_limits_drop_oldest() {
        let (q, _) = spawn(limits(3, 10, 25));
        publish(&q, &[10, 10, 1, 1]).await.unwrap(); // count: drops 1
        let b = q
            .send(Read {
                since: 1,
                epoch: None,
                limit: 10,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            b.messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        publish(&q, &[10, 10]).await.unwrap(); // size: 1+1+10+10=22 after dropping 2 (and 3 by count)
        let gone = q
            .send(Read {
                since: 1,
                epoch: None,
                limit: 10,
            })
            .await
            .unwrap();
        assert!(matches!(gone, Err(Error::UnrecoverablePosition { .. })));
        let b = q
            .send(Read {
                since: 3,
                epoch: None,
                limit: 10,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            b.messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![4, 5, 6]
        );
        let big = publish(&q, &[11]).await;
        assert!(matches!(
            big,
            Err(Error::Rejected {
                reason: Rejection::MessageTooLarge,
                ..
            })
        ));
        let batch_with_big = publish(&q, &[1, 11]).await;
        assert!(batch_with_big.is_err());
        let b = q
            .send(Read {
                since: 5,
                epoch: None,
                limit: 10,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.head, 6, "rejected messages take no offset");
    }

    #[actix::test]
    async fn consumer_refresh_rules_of_webhook_queue() {
        let (q, _) = spawn(limits(2, 10, 100));
        publish(&q, &[1]).await.unwrap();
        q.send(AddConsumer {
            key: key(),
            last_seen: None,
        })
        .await
        .unwrap();
        assert_eq!(
            consumer_read(&q).await,
            Ok(vec![]),
            "a new consumer starts after the newest"
        );
        publish(&q, &[1, 1]).await.unwrap();
        assert_eq!(consumer_read(&q).await, Ok(vec![2, 3]));
        // Roll-off: 4,5,6 published, only 5,6 kept; 4 was unread.
        publish(&q, &[1, 1, 1]).await.unwrap();
        assert_eq!(consumer_read(&q).await, Err("refresh@6:It's been ".into()));
        assert_eq!(
            consumer_read(&q).await,
            Ok(vec![]),
            "told once, then resumes from the newest"
        );
        publish(&q, &[1]).await.unwrap();
        assert_eq!(consumer_read(&q).await, Ok(vec![7]));
        // An oversized message after the consumer listened.
        assert!(publish(&q, &[11]).await.is_err());
        assert_eq!(consumer_read(&q).await, Err("refresh@7:One or mor".into()));
        publish(&q, &[1]).await.unwrap();
        assert_eq!(consumer_read(&q).await, Ok(vec![8]));
        // A consumer added after the oversized message is not affected by it.
        q.send(RemoveConsumer {
            key: key(),
            forget: true,
        })
        .await
        .unwrap();
        assert!(consumer_read(&q)
            .await
            .unwrap_err()
            .starts_with("no client"));
    }

    #[actix::test]
    async fn reconfigure_applies_lower_limits() {
        let (q, _) = spawn(limits(10, 10, 100));
        publish(&q, &[1, 1, 1, 1]).await.unwrap();
        let spec = Arc::new(QueueSpec {
            name: "q".into(),
            limits: limits(2, 10, 100),
            allow_ips: vec![],
            auth: IngestAuth::None,
            json_only: false,
            kind: Default::default(),
            webhooks: vec![],
            config: serde_json::from_str(r#"{"name":"q"}"#).unwrap(),
            runtime: false,
        });
        q.send(Reconfigure { spec }).await.unwrap();
        let b = q
            .send(Read {
                since: 2,
                epoch: None,
                limit: 10,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            b.messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![3, 4]
        );
    }

    /// A log like a replicated one: offsets are given when the test acknowledges an
    /// append (in any order), and entries written by "another replica" arrive through
    /// the feed, as do the queue's own once stored.
    #[derive(Clone, Default)]
    struct Remote(Arc<std::sync::Mutex<RemoteState>>);

    type Ack = tokio::sync::oneshot::Sender<Result<Vec<Arc<Message>>, Error>>;

    #[derive(Default)]
    struct RemoteState {
        next: u64,
        pending: Vec<Option<(Vec<NewMessage>, Ack)>>,
        feed: Option<tokio::sync::mpsc::UnboundedSender<Vec<Arc<Message>>>>,
    }

    impl Remote {
        /// Stores append `i` (in call order), tells the feed (if `feed`) and acks it.
        fn ack(&self, i: usize, feed: bool) {
            let mut st = self.0.lock().unwrap();
            let (batch, ack) = st.pending[i].take().expect("acked once");
            let stored = st.store(batch);
            if feed {
                st.feed.as_ref().unwrap().send(stored.clone()).unwrap();
            }
            ack.send(Ok(stored)).unwrap();
        }

        /// Entries another replica appended.
        fn append_elsewhere(&self, n: usize) {
            let mut st = self.0.lock().unwrap();
            let stored = st.store((0..n).map(|_| body(1)).collect());
            st.feed.as_ref().unwrap().send(stored).unwrap();
        }

        fn appends(&self) -> usize {
            self.0.lock().unwrap().pending.len()
        }
    }

    impl RemoteState {
        fn store(&mut self, batch: Vec<NewMessage>) -> Vec<Arc<Message>> {
            batch
                .into_iter()
                .map(|m| {
                    self.next += 1;
                    Arc::new(m.into_message("q".into(), self.next, now_ms()))
                })
                .collect()
        }
    }

    impl QueueLog for Remote {
        fn open(&mut self) -> futures_util::future::BoxFuture<'static, Result<StoredQueue, Error>> {
            Box::pin(fut::ready(Ok(StoredQueue {
                epoch: "e".into(),
                messages: vec![],
                next_offset: 1,
                delayed: vec![],
            })))
        }
        fn append(
            &mut self,
            batch: Vec<NewMessage>,
            _: Vec<u64>,
        ) -> futures_util::future::BoxFuture<'static, Result<Vec<Arc<Message>>, Error>> {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.0.lock().unwrap().pending.push(Some((batch, tx)));
            Box::pin(async move { rx.await.expect("acked") })
        }
        fn tail(
            &self,
            _: u64,
        ) -> futures_util::future::BoxFuture<'static, Result<crate::store::StoredTail, Error>>
        {
            unreachable!("no append fails here")
        }
        fn continue_at(&mut self, _: u64) {}
        fn trim(&self, _: u64) {}
        fn set_epoch(&self, _: &str) {}
        fn feed(&mut self) -> Option<futures_util::stream::BoxStream<'static, Vec<Arc<Message>>>> {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            self.0.lock().unwrap().feed = Some(tx);
            Some(Box::pin(futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            )))
        }
    }

    /// The log seam holds for a replicated log: appends acknowledged out of order
    /// become visible in offset order, entries appended elsewhere appear through the
    /// feed, and an entry that arrives both ways is shown once.
    #[actix::test]
    async fn a_replicated_log_feeds_the_queue_in_offset_order() {
        let remote = Remote::default();
        let (q, _) = spawn_with(
            limits(100, 100, 10_000),
            Box::new(remote.clone()),
            Arc::new(MemoryStore::default()),
        );
        let first = actix::spawn(publish_owned(q.clone(), 2));
        let second = actix::spawn(publish_owned(q.clone(), 1));
        while remote.appends() < 2 {
            tokio::task::yield_now().await;
        }
        // The second append is acknowledged first: it gets offset 1, the first 2..3.
        remote.ack(1, false);
        let p = second.await.unwrap().unwrap();
        assert_eq!((p.first_offset, p.last_offset), (1, 1));
        assert_eq!(
            visible(&q).await,
            Vec::<u64>::new(),
            "1 waits for the append before it"
        );
        remote.ack(0, false);
        let p = first.await.unwrap().unwrap();
        assert_eq!((p.first_offset, p.last_offset), (2, 3));
        assert_eq!(visible(&q).await, vec![1, 2, 3]);

        remote.append_elsewhere(2);
        let mut seen = visible(&q).await;
        while seen.len() < 5 {
            tokio::task::yield_now().await;
            seen = visible(&q).await;
        }
        assert_eq!(seen, vec![1, 2, 3, 4, 5]);

        let third = actix::spawn(publish_owned(q.clone(), 1));
        while remote.appends() < 3 {
            tokio::task::yield_now().await;
        }
        remote.ack(2, true);
        assert_eq!(third.await.unwrap().unwrap().first_offset, 6);
        assert_eq!(visible(&q).await, vec![1, 2, 3, 4, 5, 6], "shown once");
    }

    /// Delayed messages are released only while this node leads; a node that becomes
    /// leader releases what is due at once, one that loses the lead stops.
    #[actix::test]
    async fn delayed_messages_are_released_only_by_the_leader() {
        let (q, mut changes) = spawn(limits(100, 100, 10_000));
        q.send(LeadershipChanged { leader: false }).await.unwrap();
        let at = now_ms() + 50;
        let scheduled = PublishAt {
            messages: vec![body(1)],
            deliver_at_ms: at,
        };
        q.send(scheduled).await.unwrap().unwrap();
        // Past the due time, as the queue's own clock says, and still held back.
        while now_ms() <= at + 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            visible(&q).await,
            Vec::<u64>::new(),
            "not the leader: held back"
        );
        changes.borrow_and_update();
        q.send(LeadershipChanged { leader: true }).await.unwrap();
        changes.changed().await.unwrap();
        assert_eq!(visible(&q).await, vec![1], "released once leading");
    }

    /// A queue started again over its store goes on after the stored offsets.
    #[actix::test]
    async fn offsets_go_on_after_a_restart() {
        let store = Arc::new(MemoryStore::default());
        let (q, _) = spawn_on(limits(100, 100, 10_000), store.clone());
        publish(&q, &[1, 1]).await.unwrap();
        drop(q);
        let (q, _) = spawn_on(limits(100, 100, 10_000), store);
        assert_eq!(publish(&q, &[1]).await.unwrap().first_offset, 3);
        assert_eq!(visible(&q).await, vec![1, 2, 3]);
    }

    async fn publish_owned(q: Addr<Queue>, n: usize) -> Result<Published, Error> {
        publish(&q, &vec![1; n]).await
    }
}
