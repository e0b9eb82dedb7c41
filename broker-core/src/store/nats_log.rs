//! A queue's log on JetStream ([`crate::log::QueueLog`]): every replica appends to the
//! same stream and hears the others' appends through a feed, so a queue shows the same
//! messages, under the same offsets, on every replica.
//!
//! - A plain queue's stream gives the offsets: appends are pipelined (many in flight,
//!   from any replica), each resolves with the sequence JetStream acknowledged after
//!   its quorum stored it.
//! - A queue made from a pattern shares its pattern's stream: the offset is written into
//!   the message, and each append is conditional on the subject's last sequence, so two
//!   replicas can never give one offset twice; a replica that lost the race re-reads
//!   the subject's last message and tries again with the next offset.
//! - The feed is an ordered consumer (no gaps, no duplicates; recreated after any
//!   hiccup from the sequence after the last one it gave).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};

use super::nats::{decode, is_conflict, Inner, Place, Placement};
use crate::error::Error;
use crate::log::{Logs, QueueLog};
use crate::message::{now_ms, Message, NewMessage};
use crate::settings::QueueSpec;
use crate::store::{StoredQueue, StoredTail};

/// Conditional appends retried after losing a race before the append fails.
const MAX_CONFLICTS: usize = 64;
/// Messages the feed hands to its queue at once.
const FEED_BATCH: usize = 256;

/// The logs of a NATS-backed broker.
pub struct JetStreamLogs {
    pub(crate) store: Arc<super::NatsStore>,
}

impl Logs for JetStreamLogs {
    fn log(&self, queue: &Arc<str>, spec: &QueueSpec) -> Box<dyn QueueLog> {
        let placement = if spec.name == **queue {
            Placement::Own
        } else {
            Placement::Pattern(Arc::from(spec.name.as_str()))
        };
        self.store.place(queue, placement);
        let inner = self.store.inner();
        Box::new(JetStreamLog {
            place: inner.place(queue),
            inner,
            queue: queue.clone(),
            head: Arc::new(tokio::sync::Mutex::new(SubjectHead::default())),
            feed_from: Arc::new(AtomicU64::new(1)),
            trims: Arc::new(Trims::default()),
        })
    }
}

/// Where a shared queue's subject ends (conditional appends continue it).
#[derive(Debug, Default, Clone, Copy)]
struct SubjectHead {
    /// Stream sequence of its last message (0: none).
    last_seq: u64,
    /// The offset the next message gets.
    next_offset: u64,
}

/// Trims wanted and whether one runs (at most one purge in flight per queue).
#[derive(Default)]
struct Trims {
    wanted: AtomicU64,
    running: AtomicBool,
}

/// One queue's log on JetStream.
pub struct JetStreamLog {
    inner: Arc<Inner>,
    queue: Arc<str>,
    place: Place,
    head: Arc<tokio::sync::Mutex<SubjectHead>>,
    /// The stream sequence the feed starts at (after what `open` loaded).
    feed_from: Arc<AtomicU64>,
    trims: Arc<Trims>,
}

impl QueueLog for JetStreamLog {
    fn open(&mut self) -> BoxFuture<'static, Result<StoredQueue, Error>> {
        let (inner, queue, head) = (self.inner.clone(), self.queue.clone(), self.head.clone());
        // `feed` is asked for once `open` resolved: it starts where loading ended.
        let feed_from = self.feed_from.clone();
        async move {
            let loaded = inner.load(&queue, 0).await?;
            *head.lock().await = SubjectHead {
                last_seq: loaded.last_subject_seq,
                next_offset: loaded.next_offset,
            };
            feed_from.store(loaded.feed_from, Ordering::Release);
            Ok(StoredQueue {
                epoch: loaded.epoch,
                messages: loaded.messages,
                next_offset: loaded.next_offset,
                delayed: inner.delayed(&queue).await?,
            })
        }
        .boxed()
    }

    fn append(
        &mut self,
        batch: Vec<NewMessage>,
        released: Vec<u64>,
    ) -> BoxFuture<'static, Result<Vec<Arc<Message>>, Error>> {
        let (inner, place, queue, head) = (
            self.inner.clone(),
            self.place.clone(),
            self.queue.clone(),
            self.head.clone(),
        );
        async move {
            let now = now_ms();
            let ids: Vec<Option<String>> = if released.is_empty() {
                vec![None; batch.len()]
            } else {
                // A release repeated (after a crash between publish and forgetting the
                // delayed entry) is recognised by JetStream within its duplicate window.
                released
                    .iter()
                    .map(|id| Some(format!("delayed.{}.{id}", super::nats::token(&queue))))
                    .collect()
            };
            let messages = if place.shared {
                append_shared(&inner, &place, &queue, &head, batch, ids, now).await?
            } else {
                append_own(&inner, &place, &queue, batch, ids, now).await?
            };
            inner.forget_delayed(&queue, &released).await?;
            Ok(messages)
        }
        .boxed()
    }

    fn tail(&self, after: u64) -> BoxFuture<'static, Result<StoredTail, Error>> {
        let (inner, queue, head) = (self.inner.clone(), self.queue.clone(), self.head.clone());
        async move {
            let loaded = inner.load(&queue, after).await?;
            *head.lock().await = SubjectHead {
                last_seq: loaded.last_subject_seq,
                next_offset: loaded.next_offset,
            };
            Ok(StoredTail {
                epoch: loaded.epoch,
                messages: loaded.messages,
                next_offset: loaded.next_offset,
            })
        }
        .boxed()
    }

    fn continue_at(&mut self, _next: u64) {
        // JetStream gives the offsets; nothing to continue locally.
    }

    fn trim(&self, first_kept: u64) {
        self.trims.wanted.fetch_max(first_kept, Ordering::AcqRel);
        if self.trims.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let (inner, queue, trims) = (self.inner.clone(), self.queue.clone(), self.trims.clone());
        tokio::spawn(async move {
            let mut done = 0;
            loop {
                let wanted = trims.wanted.load(Ordering::Acquire);
                if wanted <= done {
                    trims.running.store(false, Ordering::Release);
                    // A trim asked for between the check and the flag: take it.
                    if trims.wanted.load(Ordering::Acquire) > done
                        && !trims.running.swap(true, Ordering::AcqRel)
                    {
                        continue;
                    }
                    return;
                }
                match inner.trim(&queue, wanted).await {
                    Ok(()) => done = wanted,
                    Err(e) => {
                        tracing::warn!(queue = %queue, error = %e, "cannot trim the queue's stream; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                // Coalesce: trims asked for meanwhile go in one purge.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    fn set_epoch(&self, epoch: &str) {
        let (inner, queue, epoch) = (self.inner.clone(), self.queue.clone(), epoch.to_owned());
        tokio::spawn(async move {
            if let Err(e) = inner.set_epoch(&queue, &epoch).await {
                tracing::error!(queue = %queue, error = %e, "cannot store the queue's new epoch");
            }
        });
    }

    fn feed(&mut self) -> Option<BoxStream<'static, Vec<Arc<Message>>>> {
        Some(feed(
            self.inner.clone(),
            self.place.clone(),
            self.queue.clone(),
            self.feed_from.load(Ordering::Acquire),
        ))
    }

    fn replicated(&self) -> bool {
        true
    }
}

/// Appends to a stream of the queue's own: pipelined, JetStream gives the offsets.
async fn append_own(
    inner: &Inner,
    place: &Place,
    queue: &Arc<str>,
    batch: Vec<NewMessage>,
    ids: Vec<Option<String>>,
    now: i64,
) -> Result<Vec<Arc<Message>>, Error> {
    let messages: Vec<Message> = batch
        .into_iter()
        .map(|m| m.into_message(queue.clone(), 0, now))
        .collect();
    // Sent back to back; their acknowledgements are awaited together.
    let mut acks = Vec::with_capacity(messages.len());
    for (m, id) in messages.iter().zip(&ids) {
        acks.push(inner.send(place, m, None, id.as_deref()).await?);
    }
    let mut stored = Vec::with_capacity(messages.len());
    for (mut m, ack) in messages.into_iter().zip(acks) {
        m.offset = inner.acknowledged(ack).await?.sequence;
        stored.push(Arc::new(m));
    }
    Ok(stored)
}

/// Appends to a queue sharing its pattern's stream: one conditional publish after the
/// other, each continuing the subject; a lost race re-reads the subject's end.
async fn append_shared(
    inner: &Inner,
    place: &Place,
    queue: &Arc<str>,
    head: &tokio::sync::Mutex<SubjectHead>,
    batch: Vec<NewMessage>,
    ids: Vec<Option<String>>,
    now: i64,
) -> Result<Vec<Arc<Message>>, Error> {
    let mut head = head.lock().await;
    let mut stored = Vec::with_capacity(batch.len());
    for (m, id) in batch.into_iter().zip(ids) {
        let mut m = m.into_message(queue.clone(), 0, now);
        let mut conflicts = 0;
        loop {
            m.offset = head.next_offset.max(1);
            let sent = inner
                .publish(place, &m, Some(head.last_seq), id.as_deref())
                .await;
            match sent {
                Ok(ack) if ack.duplicate => {
                    // Released before (a repeated release): the stored copy stands.
                    break;
                }
                Ok(ack) => {
                    head.last_seq = ack.sequence;
                    head.next_offset = m.offset + 1;
                    stored.push(Arc::new(m));
                    break;
                }
                Err(e) if is_conflict(&e) && conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                    let stream = inner.stream(place).await?;
                    let (seq, offset) = inner
                        .last_of_subject(&stream, place, queue)
                        .await?
                        .unwrap_or((0, 0));
                    *head = SubjectHead {
                        last_seq: seq,
                        next_offset: offset + 1,
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(stored)
}

/// The entries of `place` from stream sequence `from` on, as they are stored, for ever:
/// an ordered consumer, recreated after any failure from where it stopped.
fn feed(
    inner: Arc<Inner>,
    place: Place,
    queue: Arc<str>,
    from: u64,
) -> BoxStream<'static, Vec<Arc<Message>>> {
    type Messages = consumer::pull::Ordered;
    let state: (u64, Option<Messages>) = (from, None);
    futures_util::stream::unfold(state, move |(mut next, mut messages)| {
        let (inner, place, queue) = (inner.clone(), place.clone(), queue.clone());
        async move {
            loop {
                let Some(m) = messages.as_mut() else {
                    match open_feed(&inner, &place, next).await {
                        Ok(m) => messages = Some(m),
                        Err(e) => {
                            tracing::warn!(queue = %queue, error = %e, "cannot follow the queue's stream; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    continue;
                };
                match m.next().await {
                    Some(Ok(m)) => {
                        let Ok(info) = m.info() else { continue };
                        let seq = info.stream_sequence;
                        next = seq + 1;
                        match decode(&queue, seq, m.headers.as_ref(), m.payload.clone()) {
                            Ok(msg) => return Some((Arc::new(msg), (next, messages))),
                            Err(e) => {
                                tracing::error!(queue = %queue, seq, error = %e, "a message on the queue's subject is not the broker's; skipped");
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(queue = %queue, error = %e, "the queue's feed failed; following again");
                        messages = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    None => messages = None,
                }
            }
        }
    })
    .ready_chunks(FEED_BATCH)
    .boxed()
}

/// An ordered consumer of `place` from stream sequence `from`.
async fn open_feed(
    inner: &Inner,
    place: &Place,
    from: u64,
) -> Result<consumer::pull::Ordered, Error> {
    let stream = inner.stream(place).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: place.subject.clone(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Store(format!("NATS: follow: {e}")))?;
    consumer
        .messages()
        .await
        .map_err(|e| Error::Store(format!("NATS: follow: {e}")))
}
