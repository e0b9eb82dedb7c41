//! A queue's log on JetStream ([`crate::log::QueueLog`]): every replica appends to the
//! same stream and hears the others' appends through a feed, so a queue shows the same
//! messages, under the same offsets, on every replica.
//!
//! - A plain queue's stream gives the offsets: appends are pipelined (many in flight,
//!   from any replica), each resolves with the sequence JetStream acknowledged after
//!   its quorum stored it.
//! - A queue made from a pattern shares its pattern's stream: the offset is written into
//!   the message, and each append is conditional on the stream's last sequence (see
//!   [`Inner::append_shared`]), so two replicas can never give one offset twice; a
//!   replica that lost the race re-reads where the stream and the queue end and tries
//!   again with the next offset.
//! - The feed is an ordered consumer (no gaps, no duplicates; recreated after any
//!   hiccup from the sequence after the last one it gave).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{consumer, kv};
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};

use super::nats::{decode, is_unheard, Inner, Place, Placement};
use crate::error::Error;
use crate::log::{DelayedChange, Logs, QueueLog};
use crate::message::{now_ms, Message, NewMessage};
use crate::settings::QueueSpec;
use crate::store::{StoredQueue, StoredTail};

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
            feed_from: Arc::new(AtomicU64::new(1)),
            trims: Arc::new(Trims::default()),
        })
    }
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
    /// The stream sequence the feed starts at (after what `open` loaded).
    feed_from: Arc<AtomicU64>,
    trims: Arc<Trims>,
}

impl QueueLog for JetStreamLog {
    fn open(&mut self) -> BoxFuture<'static, Result<StoredQueue, Error>> {
        let (inner, queue) = (self.inner.clone(), self.queue.clone());
        // `feed` is asked for once `open` resolved: it starts where loading ended.
        let feed_from = self.feed_from.clone();
        async move {
            let loaded = inner.load(&queue, 0).await?;
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
        let (inner, place, queue) = (self.inner.clone(), self.place.clone(), self.queue.clone());
        async move {
            let now = now_ms();
            let ids: Vec<Option<String>> = if released.is_empty() {
                // Idempotency keys, per queue (a pattern's queues share a stream).
                let t = super::nats::token(&queue);
                batch
                    .iter()
                    .map(|m| m.id.as_ref().map(|k| format!("k.{t}.{k}")))
                    .collect()
            } else {
                // A release repeated (after a crash between publish and forgetting the
                // delayed entry) is recognised by JetStream within its duplicate window.
                released
                    .iter()
                    .map(|id| Some(format!("delayed.{}.{id}", super::nats::token(&queue))))
                    .collect()
            };
            let messages = if place.shared {
                let messages = batch
                    .into_iter()
                    .map(|m| m.into_message(queue.clone(), 0, now))
                    .collect();
                inner
                    .append_shared(&place, &queue, messages, false, ids)
                    .await?
            } else {
                append_own(&inner, &place, &queue, batch, ids, now).await?
            };
            inner.forget_delayed(&queue, &released).await?;
            Ok(messages)
        }
        .boxed()
    }

    fn tail(&self, after: u64) -> BoxFuture<'static, Result<StoredTail, Error>> {
        let (inner, queue) = (self.inner.clone(), self.queue.clone());
        async move { inner.tail(&queue, after).await }.boxed()
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

    fn delayed_feed(&mut self) -> Option<BoxStream<'static, DelayedChange>> {
        let (inner, queue) = (self.inner.clone(), self.queue.clone());
        let prefix = format!("{}.", super::nats::token(&queue));
        let changes = futures_util::stream::unfold(None, move |mut watch: Option<kv::Watch>| {
            let (inner, queue, prefix) = (inner.clone(), queue.clone(), prefix.clone());
            async move {
                loop {
                    let Some(w) = watch.as_mut() else {
                        // With history: what was scheduled before the watch began too
                        // (entries the queue holds already are skipped there).
                        match inner
                            .kv
                            .delayed
                            .watch_with_history(format!("{prefix}*"))
                            .await
                        {
                            Ok(w) => watch = Some(w),
                            Err(e) => {
                                tracing::warn!(queue = %queue, error = %e, "cannot follow the queue's delayed entries; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                        continue;
                    };
                    match w.next().await {
                        Some(Ok(entry)) => {
                            if let Some(c) = super::nats::delayed_change(&entry, &prefix) {
                                return Some((c, watch));
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(queue = %queue, error = %e, "the watch of delayed entries failed; watching again");
                            watch = None;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        None => watch = None,
                    }
                }
            }
        });
        Some(changes.boxed())
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
    for ((mut m, ack), id) in messages.into_iter().zip(acks).zip(&ids) {
        m.offset = match inner.acknowledged(ack).await {
            Ok(ack) => ack.sequence,
            // Nothing stored (see `Inner::publish`): sent again, alone.
            Err(e) if is_unheard(&e) => {
                inner
                    .publish(place, &m, None, id.as_deref())
                    .await?
                    .sequence
            }
            Err(e) => return Err(e),
        };
        stored.push(Arc::new(m));
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
            max_expires: super::nats::FEED_EXPIRES,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Store(format!("NATS: follow: {e}")))?;
    consumer
        .messages()
        .await
        .map_err(|e| Error::Store(format!("NATS: follow: {e}")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::metrics::Metrics;
    use crate::store::nats_testing::NatsCluster;
    use crate::store::{NatsOptions, NatsStore};

    async fn replica(url: &str, prefix: &str) -> JetStreamLogs {
        let options = NatsOptions {
            prefix: prefix.into(),
            ..NatsOptions::new(url)
        };
        let store = NatsStore::connect(&options, Arc::new(Metrics::new()))
            .await
            .unwrap();
        JetStreamLogs {
            store: Arc::new(store),
        }
    }

    fn batch(replica: &str, i: usize) -> Vec<NewMessage> {
        (0..2)
            .map(|j| NewMessage::from(bytes::Bytes::from(format!("{replica}-{i}-{j}"))))
            .collect()
    }

    /// Reads a feed until it gave `n` messages.
    async fn take(feed: &mut BoxStream<'static, Vec<Arc<Message>>>, n: usize) -> Vec<Arc<Message>> {
        let mut got = Vec::new();
        while got.len() < n {
            let more = tokio::time::timeout(Duration::from_secs(20), feed.next())
                .await
                .expect("the feed goes on")
                .expect("the feed never ends");
            got.extend(more);
        }
        got
    }

    #[actix::test]
    async fn replicas_append_to_one_log_and_each_hears_all_in_offset_order() {
        let Some(cluster) = NatsCluster::start(3).await else {
            return;
        };
        let prefix = format!("t{}", crate::random::id());
        let (a, b) = (
            replica(&cluster.nodes[0].url, &prefix).await,
            replica(&cluster.nodes[1].url, &prefix).await,
        );
        let (cfg, src) = crate::config::parse(
            None,
            "[[queues]]\nname = \"plain\"\n[[queues]]\nname = \"chat.*\"\n",
            Vec::<(String, String)>::new(),
        )
        .unwrap();
        let settings = crate::settings::Settings::compile(cfg, src).unwrap();
        // A plain queue (its own stream, pipelined appends) and a pattern's queue (the
        // pattern's stream, conditional appends racing between the replicas).
        for name in ["plain", "chat.room1"] {
            let queue: Arc<str> = Arc::from(name);
            let spec = settings.queue(name).unwrap();
            let (mut la, mut lb) = (a.log(&queue, spec), b.log(&queue, spec));
            assert_eq!(la.open().await.unwrap().next_offset, 1);
            lb.open().await.unwrap();
            let (mut fa, mut fb) = (la.feed().unwrap(), lb.feed().unwrap());
            let appends = (0..40).flat_map(|i| {
                [
                    la.append(batch("a", i), Vec::new()),
                    lb.append(batch("b", i), Vec::new()),
                ]
            });
            let mut acked = BTreeMap::new();
            for stored in futures_util::future::join_all(appends).await {
                for m in stored.unwrap() {
                    let before = acked.insert(m.offset, m.body.clone());
                    assert!(before.is_none(), "{name}: offset {} given twice", m.offset);
                }
            }
            assert_eq!(
                acked.keys().copied().collect::<Vec<_>>(),
                (1..=160).collect::<Vec<u64>>(),
                "{name}: offsets go up by one"
            );
            for feed in [&mut fa, &mut fb] {
                let heard = take(feed, 160).await;
                let offsets: Vec<u64> = heard.iter().map(|m| m.offset).collect();
                assert_eq!(
                    offsets,
                    (1..=160).collect::<Vec<u64>>(),
                    "{name}: in order, once"
                );
                for m in heard {
                    assert_eq!(acked[&m.offset], m.body, "{name}: the acknowledged message");
                }
            }
            // A replica that starts later loads the same history.
            let mut late = replica(&cluster.nodes[2].url, &prefix)
                .await
                .log(&queue, spec);
            let loaded = late.open().await.unwrap();
            assert_eq!(loaded.next_offset, 161);
            assert_eq!(loaded.messages.len(), 160);
            assert_eq!(loaded.messages[41].body, acked[&42]);
            // Trims drop the oldest; offsets go on.
            la.trim(151);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let tail = lb.tail(0).await.unwrap();
                if tail.messages.first().map(|m| m.offset) == Some(151) {
                    assert_eq!(tail.next_offset, 161);
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{name}: trimmed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
