//! `Queue`: one queue's bounded, ordered log.
//!
//! It assigns offsets, hands appends to the store and makes them visible (in offset
//! order) once the store has them, drops the oldest messages past the limits, and keeps
//! the cursors of the poll consumers that read it, so that a read and its cursor move
//! are one step. Readers that wait (long-poll) watch the `changes` channel, which is
//! bumped whenever something a reader could see changes: no per-waiter bookkeeping here.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;

use super::cursors::{ConsumerRead as CursorRead, Cursors};
use super::delayed::DelayedSet;
use super::subscriber::{Lagged, Offer, Subscriber};
use super::window::{DropReason, Window};
use crate::error::{Error, Rejection};
use crate::message::{now_ms, Message, NewMessage};
use crate::metrics::Metrics;
use crate::settings::QueueSpec;
use crate::store::{Store, StoredQueue};

/// How long a delayed release that the store refused waits before the next try.
const DELAYED_RETRY_MS: i64 = 1000;

/// Mailbox capacity: publishers and readers `send` (never `do_send`), so a busy queue
/// pushes back on them instead of growing without bound.
const MAILBOX_CAPACITY: usize = 4096;

/// Identifies a poll consumer: client names are unique per user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConsumerKey {
    /// The user that owns it.
    pub user: String,
    /// The client name the user chose.
    pub client: String,
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

struct Inflight {
    messages: Vec<Arc<Message>>,
    outcome: Option<Result<(), ()>>,
}

/// One queue. Created by the `Hub`.
pub struct Queue {
    name: Arc<str>,
    spec: Arc<QueueSpec>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// This queue's metric handles (no label lookups on the hot path).
    m: crate::metrics::QueueMetrics,
    changes: watch::Sender<u64>,
    epoch: Arc<str>,
    /// The retained window (messages, bytes, newest visible offset).
    window: Window,
    /// Offset the next publish gets (ahead of `head` while appends are in flight).
    next_offset: u64,
    inflight: VecDeque<Inflight>,
    /// The named poll consumers and their refresh rules.
    consumers: Cursors,
    subscribers: HashMap<u64, Subscriber>,
    /// Delayed messages: one heap and one timer for the earliest, not a timer each.
    delayed: DelayedSet,
    /// The one timer, for the earliest delayed message (its due time and handle).
    delayed_timer: Option<(i64, SpawnHandle)>,
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
    /// A queue that loads its state from `store` when it starts.
    pub fn new(
        name: Arc<str>,
        spec: Arc<QueueSpec>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        changes: watch::Sender<u64>,
    ) -> Self {
        Self {
            m: metrics.queue(spec.label()),
            name,
            spec,
            store,
            metrics,
            changes,
            epoch: Arc::from(""),
            window: Window::default(),
            next_offset: 1,
            inflight: VecDeque::new(),
            consumers: Cursors::default(),
            subscribers: HashMap::new(),
            delayed: DelayedSet::default(),
            delayed_timer: None,
            resync: Resync::No,
        }
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn restore(&mut self, state: StoredQueue, ctx: &mut Context<Self>) {
        self.m.delayed.add(state.delayed.len() as i64);
        self.delayed.restore(state.delayed);
        self.arm_delayed_timer(ctx);
        self.epoch = state.epoch;
        self.next_offset = state.next_offset;
        let (n, size) = self.window.append(state.messages);
        self.window.raise_head(state.next_offset - 1);
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
            self.store.trim(&self.name, self.window.first_retained());
        }
    }

    /// Makes acknowledged appends visible, strictly in offset order. After a failed
    /// append nothing more becomes visible from here: what the store holds past the
    /// last visible offset is re-read instead ([`Queue::resync_tail`]).
    fn apply_acknowledged(&mut self, ctx: &mut Context<Self>) {
        let mut changed = false;
        while self.inflight.front().is_some_and(|i| i.outcome.is_some()) {
            let done = self.inflight.pop_front().expect("checked above");
            match done.outcome {
                Some(Ok(())) if self.resync == Resync::No => {
                    self.make_visible(done.messages);
                    changed = true;
                }
                Some(Ok(())) => {}
                _ => self.resync = Resync::Draining,
            }
        }
        if changed {
            self.notify();
        }
        if self.resync == Resync::Draining && self.inflight.is_empty() {
            self.resync_tail(ctx);
        }
    }

    /// Appends stored messages (contiguous, after `head`) to the visible log.
    fn make_visible(&mut self, messages: Vec<Arc<Message>>) {
        let size: usize = messages.iter().map(|m| m.body.len()).sum();
        self.fan_out(&messages, size);
        let (n, _) = self.window.append(messages);
        self.m.published.inc_by(n as u64);
        self.m.depth.add(n as i64);
        self.m.bytes.add(size as i64);
        self.enforce_limits();
    }

    /// Re-reads what the store holds after the last visible offset, makes it visible
    /// and continues offsets from the stored next offset; retried until the store
    /// answers.
    fn resync_tail(&mut self, ctx: &mut Context<Self>) {
        self.resync = Resync::Reading;
        let read = self.store.tail(&self.name, self.window.head());
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
                act.next_offset = act.window.head() + 1;
                act.resync = Resync::No;
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
        let (n, size) = self.window.reset(0);
        self.m.depth.sub(n as i64);
        self.m.bytes.sub(size as i64);
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

    /// Offers new messages to every live subscriber; never waits on one.
    fn fan_out(&mut self, messages: &[Arc<Message>], bytes: usize) {
        if self.subscribers.is_empty() {
            return;
        }
        let batch: Arc<[Arc<Message>]> = messages.into();
        let mut dropped = Vec::new();
        for (id, sub) in &self.subscribers {
            match sub.offer(&self.name, &batch, bytes) {
                Offer::Sent => {}
                Offer::Lagging => dropped.push((*id, true)),
                Offer::Closed => dropped.push((*id, false)),
            }
        }
        for (id, lagging) in dropped {
            let Some(sub) = self.subscribers.remove(&id) else {
                continue;
            };
            if lagging {
                self.metrics.ws_slow_consumers.inc();
                // One notice per dropped subscription: bounded even though do_send is not.
                sub.lagged.do_send(Lagged {
                    subscription: id,
                    queue: self.name.clone(),
                    offset: self.window.head(),
                    epoch: self.epoch.clone(),
                });
            }
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

    /// A reader that knows the current epoch and has seen offsets beyond the newest
    /// one proves that history was lost (the store restored from an older copy): the
    /// queue takes a new epoch, so no reader is ever shown other messages under offsets
    /// it has seen once new publishes reach them. Every reader resuming with the old
    /// epoch is told to refresh.
    fn note_position(&mut self, since: u64, epoch: Option<&str>) {
        if since <= self.window.head() || epoch != Some(&*self.epoch) {
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
        self.store.set_epoch(&self.name, &new);
        self.epoch = new;
    }
}

impl Actor for Queue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        // Nothing else is handled until the queue's state is loaded.
        ctx.wait(
            self.store
                .open(&self.name)
                .into_actor(self)
                .map(|res, act, ctx| match res {
                    Ok(state) => act.restore(state, ctx),
                    Err(e) => {
                        tracing::error!(queue = %act.name, error = %e, "cannot open queue");
                        ctx.stop();
                    }
                }),
        );
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.m.delayed.sub(self.delayed.len() as i64);
        self.m.depth.sub(self.window.len() as i64);
        self.m.bytes.sub(self.window.bytes() as i64);
    }
}

impl Queue {
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

    /// Gives offsets, hands the batch to the store and makes it visible once stored.
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
            let head = self.next_offset - 1;
            let done = Published {
                first_offset: head,
                last_offset: head,
                epoch: self.epoch.clone(),
            };
            return Box::pin(fut::ready(Ok(done)));
        }
        let now = now_ms();
        let first = self.next_offset;
        let messages: Vec<Arc<Message>> = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                Arc::new(Message {
                    content_type: m.content_type,
                    headers: m.headers,
                    received_at_ms: now,
                    audience: m.audience,
                    ..Message::new(self.name.clone(), first + i as u64, m.body)
                })
            })
            .collect();
        let last = first + messages.len() as u64 - 1;
        self.next_offset = last + 1;
        let append = if released.is_empty() {
            self.store.append(&self.name, messages.clone())
        } else {
            self.store.release(&self.name, messages.clone(), released)
        };
        self.inflight.push_back(Inflight {
            messages,
            outcome: None,
        });
        Box::pin(append.into_actor(self).map(move |res, act, ctx| {
            let ok = res.is_ok();
            if let Some(entry) = act
                .inflight
                .iter_mut()
                .find(|i| i.messages.first().is_some_and(|m| m.offset == first))
            {
                entry.outcome = Some(if ok { Ok(()) } else { Err(()) });
            }
            act.apply_acknowledged(ctx);
            res.map(|()| Published {
                first_offset: first,
                last_offset: last,
                epoch: act.epoch.clone(),
            })
        }))
    }

    /// Arms the one timer for the earliest delayed message.
    fn arm_delayed_timer(&mut self, ctx: &mut Context<Self>) {
        let Some(at) = self.delayed.earliest() else {
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
        self.append(msg.messages, Vec::new())
    }
}

impl Handler<PublishAt> for Queue {
    type Result = ResponseActFuture<Self, Result<Scheduled, Error>>;

    fn handle(&mut self, msg: PublishAt, _: &mut Self::Context) -> Self::Result {
        if let Err(e) = self.check_sizes(&msg.messages) {
            return Box::pin(fut::ready(Err(e)));
        }
        let max = self.spec.limits.max_delayed_messages;
        let count = msg.messages.len();
        let at_ms = msg.deliver_at_ms;
        let Some(items) = self.delayed.reserve(msg.messages, at_ms, max) else {
            let e = Error::rejected(
                Rejection::TooManyDelayed,
                format!("queue `{}` holds {max} delayed messages already", self.name),
            );
            return Box::pin(fut::ready(Err(e)));
        };
        // Acknowledged once the store has them, like any publish.
        let save = self.store.schedule(&self.name, items.clone());
        Box::pin(save.into_actor(self).map(move |res, act, ctx| {
            if let Err(e) = res {
                act.delayed.settle(count, Vec::new());
                return Err(e);
            }
            act.delayed.settle(count, items);
            act.m.delayed.add(count as i64);
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
            } else {
                unrecoverable = true;
            }
        }
        self.subscribers.insert(msg.subscriber.id, msg.subscriber);
        Subscribed {
            epoch: self.epoch.clone(),
            head: self.window.head(),
            replay,
            recovered,
            unrecoverable,
        }
    }
}

impl Handler<Unsubscribe> for Queue {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Self::Context) {
        self.subscribers.remove(&msg.id);
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
        let q = Queue::new("q".into(), spec, store, Arc::new(Metrics::new()), tx);
        (q.start(), rx)
    }

    fn body(n: usize) -> NewMessage {
        NewMessage {
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
}
