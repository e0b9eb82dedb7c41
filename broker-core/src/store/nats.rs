//! NATS JetStream as the store of a cluster of equal replicas (`storage.url =
//! "nats://…"`). See `docs/cluster.md` for the guarantees and limits.
//!
//! Layout (every name starts with `storage.nats.prefix`, `broker` by default):
//! - a **plain queue** is one stream, `broker_q_<queue>`, subject `broker.q.<queue>`;
//!   its offsets are the stream's sequence numbers (+1 per message, no gaps: nothing
//!   ever deletes single messages, trims purge from the head);
//! - every queue made from **one pattern** (`chat.*`) shares one stream,
//!   `broker_p_<pattern>`, one subject per queue (`broker.p.<pattern>.<queue>`): a
//!   cluster needs one stream (one RAFT group) per queue *definition*, not per dynamic
//!   queue. Offsets are kept in each message's metadata and made contiguous by
//!   conditional appends (see [`Inner::append_shared`]);
//! - the epoch of a queue is kept in its stream's description (2.9 has no stream
//!   metadata): a stream created again is a new epoch;
//! - cursors, consumers, retry records, delayed messages and named state are kept in
//!   key-value buckets (`broker_state`, …), replicated like the streams.
//!
//! Names from clients are encoded into tokens (`[A-Za-z0-9_-]`, see [`token`]) so that
//! no queue name can reach another subject, stream or key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{random_epoch, StoredAttempt, StoredConsumer, StoredDelayed, StoredQueue, StoredTail};
use crate::error::Error;
use crate::message::Message;
use crate::metrics::Metrics;

/// How long one JetStream request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Operations waiting in the writer's queue past which new awaited ones are refused
/// (503) and unawaited ones dropped and counted.
const WRITER_QUEUE: usize = 8192;
/// Header holding a message's metadata (JSON, see [`Meta`]).
const META: &str = "Broker-Meta";

/// How to reach NATS: `[storage] url` and `[storage.nats]`.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// One or more `nats://host:port` (comma-separated); user and password may be in the
    /// URL.
    pub url: String,
    /// A `.creds` file (JWT and NKey seed).
    pub credentials: Option<std::path::PathBuf>,
    /// A PEM file of CA certificates; also requires TLS.
    pub ca_file: Option<std::path::PathBuf>,
    /// Replicas of each stream and bucket; 0: 3 when the cluster has at least 3
    /// servers, else 1.
    pub replicas: usize,
    /// Prefix of every stream, subject and bucket name.
    pub prefix: String,
    /// JetStream's duplicate window: how long a publish id is remembered.
    pub duplicate_window: Duration,
}

impl NatsOptions {
    /// `url` with the defaults of `[storage.nats]`.
    pub fn new(url: &str) -> Self {
        let d = crate::config::NatsConfig::default();
        NatsOptions {
            url: url.to_owned(),
            credentials: d.credentials,
            ca_file: d.ca_file,
            replicas: d.replicas,
            prefix: d.prefix,
            duplicate_window: crate::config::LimitsConfig::default().idempotency_window,
        }
    }
}

/// Connects to NATS with `o` (waits up to the connection timeout for the first server).
pub async fn connect(o: &NatsOptions) -> Result<async_nats::Client, Error> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(concat!("broker/", env!("CARGO_PKG_VERSION")))
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None);
    if let Some(path) = &o.credentials {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| Error::Store(format!("storage.nats.credentials: {e}")))?;
    }
    if let Some(ca) = &o.ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> = o
        .url
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Store(format!("storage.url: {e}")))?;
    opts.connect(addrs).await.map_err(|e| {
        Error::Store(format!(
            "cannot connect to NATS at {}: {e}",
            super::without_password(&o.url)
        ))
    })
}

/// Whether `url` names NATS.
pub fn is_nats_url(url: &str) -> bool {
    url.starts_with("nats://") || url.starts_with("tls://")
}

/// A name from outside as one subject token / stream-name part: `[A-Za-z0-9-]` kept,
/// `_` doubled, every other byte `_XX` (hex); injective. Longer than 96 characters:
/// `h` and its SHA-256 (names stay under JetStream's and file systems' limits).
pub fn token(name: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' => out.push(b as char),
            b'_' => out.push_str("__"),
            _ => {
                let _ = write!(out, "_{b:02X}");
            }
        }
    }
    if out.len() > 96 {
        use sha2::Digest;
        return format!("h{}", hex::encode(sha2::Sha256::digest(name.as_bytes())));
    }
    out
}

/// Where a queue's messages are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A stream of its own (plain queues).
    Own,
    /// The stream of the pattern it was made from, one subject of it.
    Pattern(Arc<str>),
}

/// A queue's stream and subject.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub(crate) stream: String,
    pub(crate) subject: String,
    /// Whether other queues share the stream (offsets in the metadata).
    pub(crate) shared: bool,
    /// The subjects the stream holds.
    subjects: String,
}

/// A message's metadata as kept in the [`META`] header.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    /// Received at, Unix ms.
    t: i64,
    /// Content type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<String>,
    /// Headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    h: Vec<(String, String)>,
    /// The offset (queues sharing a stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    o: Option<u64>,
    /// The WebSocket sessions it is for, when not all: kept, so that every replica
    /// honours it (session ids are random across the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    a: Option<AudienceRecord>,
    /// The idempotency key it was published with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<String>,
}

/// [`crate::message::Audience`] as kept in [`Meta`].
#[derive(Debug, Serialize, Deserialize)]
struct AudienceRecord {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    x: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e: Option<Vec<u64>>,
}

/// The JetStream form of `m` (its offset kept when the stream is shared).
pub(crate) fn encode(m: &Message, shared: bool) -> async_nats::HeaderMap {
    let meta = Meta {
        t: m.received_at_ms,
        c: m.content_type.as_deref().map(str::to_owned),
        h: m.headers.clone(),
        o: shared.then_some(m.offset),
        a: m.audience.as_deref().map(|a| AudienceRecord {
            x: a.exclude.clone(),
            e: a.eligible.clone(),
        }),
        k: m.id.as_deref().map(str::to_owned),
    };
    let mut h = async_nats::HeaderMap::new();
    // JSON escapes CR and LF: nothing from a client can end the header.
    h.insert(
        META,
        serde_json::to_string(&meta).expect("metadata serialises"),
    );
    h
}

/// The message kept at stream sequence `seq`.
pub(crate) fn decode(
    queue: &Arc<str>,
    seq: u64,
    headers: Option<&async_nats::HeaderMap>,
    payload: Bytes,
) -> Result<Message, Error> {
    let meta: Meta = headers
        .and_then(|h| h.get(META))
        .ok_or_else(|| Error::Store(format!("message {seq} of `{queue}` has no metadata")))
        .and_then(|v| {
            serde_json::from_str(v.as_str())
                .map_err(|e| Error::Store(format!("message {seq} of `{queue}`: {e}")))
        })?;
    Ok(Message {
        content_type: meta.c.map(Arc::from),
        headers: meta.h,
        received_at_ms: meta.t,
        audience: meta.a.map(|a| {
            Arc::new(crate::message::Audience {
                exclude: a.x,
                eligible: a.e,
            })
        }),
        id: meta.k.map(Arc::from),
        ..Message::new(queue.clone(), meta.o.unwrap_or(seq), payload)
    })
}

fn nats_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Store(format!("NATS: {what}: {e}"))
}

/// Awaits `f`, failing after [`REQUEST_TIMEOUT`].
async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T, Error> {
    tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .map_err(|_| nats_err(what, "timed out"))
}

/// The key-value buckets.
#[derive(Clone)]
pub(crate) struct Buckets {
    pub(crate) state: kv::Store,
    pub(crate) consumers: kv::Store,
    pub(crate) cursors: kv::Store,
    pub(crate) attempts: kv::Store,
    pub(crate) delayed: kv::Store,
    /// Signed requests' nonces and ids seen, for [`SEEN_FOR`].
    pub(crate) seen: kv::Store,
}

/// How long the cluster remembers a signed request (its replay protection).
const SEEN_FOR: Duration = Duration::from_secs(2 * 3600);

/// What the store's operations share (cloned into their futures).
pub(crate) struct Inner {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) prefix: String,
    pub(crate) replicas: usize,
    pub(crate) duplicate_window: Duration,
    pub(crate) kv: Buckets,
    /// Queues made from a pattern (others have a stream of their own).
    placements: RwLock<HashMap<Arc<str>, Placement>>,
    /// Handles of the streams used so far, by name.
    streams: std::sync::Mutex<HashMap<String, stream::Stream>>,
    /// The append state of each shared stream (see [`Inner::append_shared`]).
    heads: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<StreamHead>>>>,
}

/// Where a shared stream ends, as this replica last knew it, and where each of its
/// queues ends as of then.
#[derive(Debug, Default)]
pub(crate) struct StreamHead {
    /// The stream's last sequence; `None`: unknown (read it before appending).
    last_seq: Option<u64>,
    /// The next offset of each queue, valid while `last_seq` is.
    next: HashMap<Arc<str>, u64>,
}

/// How long one pull of an ordered consumer lasts; its idle heartbeat is half of it. A
/// consumer whose server died is noticed (two heartbeats missed) and made again within
/// a few seconds, not the client's default of half a minute.
pub(crate) const FEED_EXPIRES: Duration = Duration::from_secs(2);

/// Conditional appends retried after losing a race before the append fails.
const MAX_CONFLICTS: usize = 64;

impl Inner {
    /// Where `queue` is kept.
    pub(crate) fn place(&self, queue: &str) -> Place {
        let p = self.prefix.as_str();
        let placement = self.placements.read().expect("placements lock");
        match placement.get(queue) {
            Some(Placement::Pattern(pattern)) => {
                let pt = token(pattern);
                Place {
                    stream: format!("{p}_p_{pt}"),
                    subject: format!("{p}.p.{pt}.{}", token(queue)),
                    subjects: format!("{p}.p.{pt}.*"),
                    shared: true,
                }
            }
            _ => {
                let t = token(queue);
                Place {
                    stream: format!("{p}_q_{t}"),
                    subject: format!("{p}.q.{t}"),
                    subjects: format!("{p}.q.{t}"),
                    shared: false,
                }
            }
        }
    }

    /// The stream at `place`, created (with a fresh epoch) if missing.
    /// Handles are kept (appends to a pattern's stream look it up every time); one
    /// whose stream went away is dropped by [`Inner::forget_stream`].
    pub(crate) async fn stream(&self, place: &Place) -> Result<stream::Stream, Error> {
        let known = self
            .streams
            .lock()
            .expect("streams lock")
            .get(&place.stream)
            .cloned();
        if let Some(s) = known {
            return Ok(s);
        }
        let s = self.find_or_create(place).await?;
        let mut streams = self.streams.lock().expect("streams lock");
        streams.insert(place.stream.clone(), s.clone());
        Ok(s)
    }

    /// Drops the kept handle of `stream` (deleted, or a request on it failed).
    pub(crate) fn forget_stream(&self, stream: &str) {
        self.streams.lock().expect("streams lock").remove(stream);
    }

    async fn find_or_create(&self, place: &Place) -> Result<stream::Stream, Error> {
        match timed("stream info", self.js.get_stream(&place.stream)).await? {
            Ok(s) => return Ok(s),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(nats_err("stream info", e)),
        }
        let config = stream::Config {
            name: place.stream.clone(),
            subjects: vec![place.subjects.clone()],
            description: Some(format!("epoch={}", random_epoch())),
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: self.duplicate_window,
            allow_direct: true,
            ..Default::default()
        };
        match timed("create stream", self.js.create_stream(config)).await? {
            Ok(s) => Ok(s),
            // Another replica created it meanwhile: take theirs.
            Err(_) => timed("stream info", self.js.get_stream(&place.stream))
                .await?
                .map_err(|e| nats_err("stream info", e)),
        }
    }

    /// The epoch kept in `info`'s description.
    fn epoch_of(info: &stream::Info) -> Arc<str> {
        let d = info.config.description.as_deref().unwrap_or_default();
        match d.strip_prefix("epoch=") {
            Some(e) if !e.is_empty() => Arc::from(e),
            // Created by someone else: its creation time stands for the epoch.
            _ => Arc::from(format!(
                "{:016x}",
                info.created.unix_timestamp_nanos() as u64
            )),
        }
    }

    /// Reads the messages of `place` with stream sequences `from..=until` (an ordered
    /// consumer: gaps are impossible), decoded as messages of `queue`.
    async fn read(
        &self,
        stream: &stream::Stream,
        place: &Place,
        queue: &Arc<str>,
        from: u64,
        until: u64,
    ) -> Result<Vec<(u64, Message)>, Error> {
        let mut out = Vec::new();
        if from > until {
            return Ok(out);
        }
        let consumer = timed(
            "create reader",
            stream.create_consumer(consumer::pull::OrderedConfig {
                filter_subject: place.subject.clone(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    // An empty stream's first sequence is 0, which JetStream refuses.
                    start_sequence: from.max(1),
                },
                max_expires: FEED_EXPIRES,
                ..Default::default()
            }),
        )
        .await?
        .map_err(|e| nats_err("create reader", e))?;
        let mut messages = timed("read", consumer.messages())
            .await?
            .map_err(|e| nats_err("read", e))?;
        loop {
            let Some(m) = timed("read", messages.next()).await? else {
                break;
            };
            let m = m.map_err(|e| nats_err("read", e))?;
            let info = m.info().map_err(|e| nats_err("read", e))?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            let msg = decode(queue, seq, m.headers.as_ref(), m.payload.clone())?;
            out.push((seq, msg));
            if seq >= until || pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// The last message of a shared subject: its stream sequence and offset.
    pub(crate) async fn last_of_subject(
        &self,
        stream: &stream::Stream,
        place: &Place,
        queue: &Arc<str>,
    ) -> Result<Option<(u64, u64)>, Error> {
        match timed(
            "last message",
            stream.get_last_raw_message_by_subject(&place.subject),
        )
        .await?
        {
            Ok(m) => {
                let msg = decode(queue, m.sequence, Some(&m.headers), m.payload)?;
                Ok(Some((m.sequence, msg.offset)))
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats_err("last message", e)),
        }
    }

    /// The queue's epoch, messages after offset `after`, next offset, and the stream
    /// sequence after its last message (where a feed starts).
    pub(crate) async fn load(&self, queue: &str, after: u64) -> Result<Loaded, Error> {
        let place = self.place(queue);
        let mut stream = self.stream(&place).await?;
        let info = match timed("stream info", stream.info()).await? {
            Ok(info) => info.clone(),
            Err(e) => {
                // Maybe deleted and made again elsewhere: look it up afresh next time.
                self.forget_stream(&place.stream);
                return Err(nats_err("stream info", e));
            }
        };
        let epoch = Self::epoch_of(&info);
        let name: Arc<str> = Arc::from(queue);
        if !place.shared {
            let st = &info.state;
            let from = st.first_sequence.max(after + 1);
            let messages = if st.messages == 0 {
                Vec::new()
            } else {
                self.read(&stream, &place, &name, from, st.last_sequence)
                    .await?
            };
            return Ok(Loaded {
                epoch,
                messages: messages.into_iter().map(|(_, m)| Arc::new(m)).collect(),
                next_offset: st.last_sequence + 1,
                feed_from: st.last_sequence + 1,
            });
        }
        let Some((last_seq, last_offset)) = self.last_of_subject(&stream, &place, &name).await?
        else {
            return Ok(Loaded {
                epoch,
                messages: Vec::new(),
                next_offset: 1,
                feed_from: info.state.last_sequence + 1,
            });
        };
        let messages = self
            .read(&stream, &place, &name, info.state.first_sequence, last_seq)
            .await?
            .into_iter()
            .filter(|(_, m)| m.offset > after)
            .map(|(_, m)| Arc::new(m))
            .collect();
        Ok(Loaded {
            epoch,
            messages,
            next_offset: last_offset + 1,
            feed_from: last_seq + 1,
        })
    }

    /// The queue's epoch, next offset and messages after `after`.
    pub(crate) async fn tail(&self, queue: &str, after: u64) -> Result<StoredTail, Error> {
        let loaded = self.load(queue, after).await?;
        Ok(StoredTail {
            epoch: loaded.epoch,
            messages: loaded.messages,
            next_offset: loaded.next_offset,
        })
    }

    /// Publishes one message to `place`, on condition that the stream's last sequence
    /// is `expect`, and waits for its acknowledgement.
    pub(crate) async fn publish(
        &self,
        place: &Place,
        m: &Message,
        expect: Option<u64>,
        id: Option<&str>,
    ) -> Result<PublishAck, Error> {
        let mut tries = 0;
        loop {
            let ack = self.send(place, m, expect, id).await?;
            match self.acknowledged(ack).await {
                // Right after a stream is created, servers other than its leader's may
                // not know yet that it listens: nobody received the message; again.
                Err(e) if is_unheard(&e) && tries < UNHEARD_RETRIES => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// Sends one message to `place` (see [`Inner::publish`]); the acknowledgement is
    /// awaited apart, so that many can be in flight.
    pub(crate) async fn send(
        &self,
        place: &Place,
        m: &Message,
        expect: Option<u64>,
        id: Option<&str>,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        let mut p = jetstream::message::PublishMessage::build()
            .payload(m.body.clone())
            .headers(encode(m, place.shared));
        if let Some(e) = expect {
            p = p.expected_last_sequence(e);
        }
        if let Some(id) = id {
            p = p.message_id(id);
        }
        timed("publish", self.js.send_publish(place.subject.clone(), p))
            .await?
            .map_err(publish_err)
    }

    /// Waits for the acknowledgement of a message sent.
    pub(crate) async fn acknowledged(
        &self,
        ack: jetstream::context::PublishAckFuture,
    ) -> Result<PublishAck, Error> {
        let ack = timed("publish", std::future::IntoFuture::into_future(ack))
            .await?
            .map_err(publish_err)?;
        Ok(PublishAck {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// The delayed messages kept for `queue`, in id order.
    pub(crate) async fn delayed(&self, queue: &str) -> Result<Vec<StoredDelayed>, Error> {
        let mut delayed = Vec::new();
        for key in keys_with(&self.kv.delayed, &format!("{}.", token(queue))).await? {
            if let Some(d) = get_json::<DelayedRecord>(&self.kv.delayed, &key).await? {
                delayed.push(d.into_stored()?);
            }
        }
        delayed.sort_by_key(|d| d.id);
        Ok(delayed)
    }

    /// Forgets released delayed messages.
    pub(crate) async fn forget_delayed(&self, queue: &str, ids: &[u64]) -> Result<(), Error> {
        let prefix = token(queue);
        for id in ids {
            purge_key(&self.kv.delayed, &format!("{prefix}.{id}")).await?;
        }
        Ok(())
    }

    /// Appends `messages` (offsets set) so that they continue the stored history
    /// exactly, one conditional publish each.
    async fn append_exact(&self, queue: &str, messages: Vec<Arc<Message>>) -> Result<(), Error> {
        let Some(first) = messages.first() else {
            return Ok(());
        };
        let place = self.place(queue);
        if place.shared {
            let name: Arc<str> = Arc::from(queue);
            let ids = vec![None; messages.len()];
            let messages = messages.iter().map(|m| (**m).clone()).collect();
            self.append_shared(&place, &name, messages, true, ids)
                .await?;
            return Ok(());
        }
        self.stream(&place).await?;
        let mut expect = first.offset - 1;
        for m in &messages {
            expect = self.publish(&place, m, Some(expect), None).await?.sequence;
        }
        Ok(())
    }

    /// Appends to a queue that shares its pattern's stream, giving offsets that
    /// continue the queue's own (`exact`: the offsets the messages carry, or fail).
    ///
    /// Each publish is conditional on the *stream's* last sequence
    /// (`Nats-Expected-Last-Sequence`), which a clustered 2.9 server checks against
    /// its proposals in flight; the per-subject condition it also has is checked only
    /// against what is applied, so two racing replicas could both pass it. This
    /// replica serialises its appends to one stream and remembers, as of the stream's
    /// last sequence, where each of its queues ends; a publish refused because another
    /// replica appended meanwhile makes it re-read the stream's end and then the
    /// queue's (in that order: if the publish then succeeds, nothing was appended after
    /// what was read) and try again.
    pub(crate) async fn append_shared(
        &self,
        place: &Place,
        queue: &Arc<str>,
        messages: Vec<Message>,
        exact: bool,
        ids: Vec<Option<String>>,
    ) -> Result<Vec<Arc<Message>>, Error> {
        let head = self.head_of(&place.stream);
        let mut head = head.lock().await;
        let stream = self.stream(place).await?;
        let mut stored = Vec::with_capacity(messages.len());
        for (mut m, id) in messages.into_iter().zip(ids) {
            let mut conflicts = 0;
            loop {
                if head.last_seq.is_none() {
                    let info = stream
                        .get_info()
                        .await
                        .map_err(|e| nats_err("stream info", e))?;
                    *head = StreamHead {
                        last_seq: Some(info.state.last_sequence),
                        next: HashMap::new(),
                    };
                }
                let next = match head.next.get(queue) {
                    Some(n) => *n,
                    None => {
                        let last = self.last_of_subject(&stream, place, queue).await?;
                        let n = last.map_or(1, |(_, offset)| offset + 1);
                        head.next.insert(queue.clone(), n);
                        n
                    }
                };
                if exact && m.offset != next {
                    return Err(Error::Store(format!(
                        "offset {} does not continue `{queue}` (next is {next})",
                        m.offset
                    )));
                }
                m.offset = next;
                match self.publish(place, &m, head.last_seq, id.as_deref()).await {
                    // Published before under this id: the stored copy stands.
                    Ok(ack) if ack.duplicate => {
                        head.last_seq = None;
                        let original = timed("get", stream.get_raw_message(ack.sequence))
                            .await?
                            .map_err(|e| nats_err("get", e))?;
                        let m = decode(
                            queue,
                            original.sequence,
                            Some(&original.headers),
                            original.payload,
                        )?;
                        stored.push(Arc::new(m));
                        break;
                    }
                    Ok(ack) => {
                        head.last_seq = Some(ack.sequence);
                        head.next.insert(queue.clone(), next + 1);
                        stored.push(Arc::new(m));
                        break;
                    }
                    Err(e) if is_conflict(&e) && !exact && conflicts < MAX_CONFLICTS => {
                        conflicts += 1;
                        head.last_seq = None;
                    }
                    Err(e) => {
                        head.last_seq = None;
                        return Err(e);
                    }
                }
            }
        }
        Ok(stored)
    }

    /// The append state of a shared stream on this replica.
    fn head_of(&self, stream: &str) -> Arc<tokio::sync::Mutex<StreamHead>> {
        let mut heads = self.heads.lock().expect("heads lock");
        heads.entry(stream.to_owned()).or_default().clone()
    }

    /// Drops the messages of `queue` below offset `first_kept`; the last one always stays
    /// (it carries a shared queue's next offset).
    pub(crate) async fn trim(&self, queue: &str, first_kept: u64) -> Result<(), Error> {
        let place = self.place(queue);
        let stream = self.stream(&place).await?;
        let purge = if place.shared {
            let name: Arc<str> = Arc::from(queue);
            let Some((_, last)) = self.last_of_subject(&stream, &place, &name).await? else {
                return Ok(());
            };
            let keep = (last + 1).saturating_sub(first_kept).max(1);
            timed(
                "purge",
                std::future::IntoFuture::into_future(
                    stream.purge().filter(place.subject.clone()).keep(keep),
                ),
            )
            .await?
        } else {
            let info = stream
                .get_info()
                .await
                .map_err(|e| nats_err("stream info", e))?;
            let upto = first_kept.min(info.state.last_sequence);
            timed(
                "purge",
                std::future::IntoFuture::into_future(stream.purge().sequence(upto)),
            )
            .await?
        };
        purge.map(|_| ()).map_err(|e| nats_err("purge", e))
    }

    pub(crate) async fn set_epoch(&self, queue: &str, epoch: &str) -> Result<(), Error> {
        let place = self.place(queue);
        let mut stream = self.stream(&place).await?;
        let mut config = timed("stream info", stream.info())
            .await?
            .map_err(|e| nats_err("stream info", e))?
            .config
            .clone();
        config.description = Some(format!("epoch={epoch}"));
        timed("update stream", self.js.update_stream(config))
            .await?
            .map(|_| ())
            .map_err(|e| nats_err("update stream", e))
    }

    /// Forgets a queue: its stream (own) or its messages but the last (shared: offsets
    /// of a pattern's queue never start again under the stream's epoch), and its keys.
    async fn remove(&self, queue: &str) -> Result<(), Error> {
        let place = self.place(queue);
        if place.shared {
            self.trim(queue, u64::MAX).await?;
        } else {
            self.forget_stream(&place.stream);
            match timed("delete stream", self.js.delete_stream(&place.stream)).await? {
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(nats_err("delete stream", e)),
            }
        }
        let prefix = format!("{}.", token(queue));
        for bucket in [&self.kv.cursors, &self.kv.attempts, &self.kv.delayed] {
            for key in keys_with(bucket, &prefix).await? {
                bucket
                    .purge(&key)
                    .await
                    .map_err(|e| nats_err("purge key", e))?;
            }
        }
        Ok(())
    }
}

/// Whether a stream request failed because the stream does not exist.
fn not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// What [`Inner::load`] found.
pub(crate) struct Loaded {
    pub(crate) epoch: Arc<str>,
    pub(crate) messages: Vec<Arc<Message>>,
    pub(crate) next_offset: u64,
    /// The stream sequence after the queue's last message.
    pub(crate) feed_from: u64,
}

/// JetStream's acknowledgement of a publish.
pub(crate) struct PublishAck {
    pub(crate) sequence: u64,
    /// The publish id was seen within the duplicate window: nothing new was stored.
    pub(crate) duplicate: bool,
}

/// Whether a publish reached no stream (nothing was stored).
pub(crate) fn is_unheard(e: &Error) -> bool {
    matches!(e, Error::Store(m) if m.contains(UNHEARD))
}
const UNHEARD: &str = "no stream listens";
/// How often a publish that reached no stream is sent again (50 ms apart).
const UNHEARD_RETRIES: usize = 60;

/// Whether a publish failed because its condition did not hold.
pub(crate) fn is_conflict(e: &Error) -> bool {
    matches!(e, Error::Store(m) if m.contains(CONFLICT))
}
const CONFLICT: &str = "wrong last sequence";

fn publish_err(e: jetstream::context::PublishError) -> Error {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::WrongLastSequence => nats_err("publish", CONFLICT),
        K::StreamNotFound => nats_err("publish", UNHEARD),
        _ => nats_err("publish", e),
    }
}

/// The key-value bucket `name`, created if missing. The bucket's stream is created here
/// the way JetStream's key-value convention lays it out: the client's own
/// `create_key_value` first asks for account details that a 2.9 server does not send.
pub(crate) async fn bucket(
    js: &jetstream::Context,
    name: String,
    replicas: usize,
    max_age: Option<Duration>,
) -> Result<kv::Store, Error> {
    if let Ok(b) = timed("bucket", js.get_key_value(name.clone())).await? {
        return Ok(b);
    }
    let config = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age: max_age.unwrap_or_default(),
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        // Expired keys' markers are not kept; a lease's key disappears with its age.
        duplicate_window: max_age
            .unwrap_or(Duration::from_secs(120))
            .min(Duration::from_secs(120)),
        ..Default::default()
    };
    // Another replica may create it meanwhile: either way it exists after this.
    let created = timed("bucket", js.create_stream(config)).await?;
    match timed("bucket", js.get_key_value(name.clone())).await? {
        Ok(b) => Ok(b),
        Err(e) => Err(nats_err(
            "bucket",
            format!(
                "{e} (creating it: {:?})",
                created.err().map(|e| e.to_string())
            ),
        )),
    }
}

/// Keys of `bucket` starting with `prefix`.
async fn keys_with(bucket: &kv::Store, prefix: &str) -> Result<Vec<String>, Error> {
    let mut keys = match timed("keys", bucket.keys()).await? {
        Ok(k) => k,
        Err(e) => return Err(nats_err("keys", e)),
    };
    let mut out = Vec::new();
    while let Some(k) = timed("keys", keys.next()).await? {
        let k = k.map_err(|e| nats_err("keys", e))?;
        if k.starts_with(prefix) {
            out.push(k);
        }
    }
    Ok(out)
}

/// A record kept under a key (JSON).
async fn get_json<T: serde::de::DeserializeOwned>(
    bucket: &kv::Store,
    key: &str,
) -> Result<Option<T>, Error> {
    match timed("get", bucket.get(key)).await? {
        Ok(Some(v)) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| nats_err("decode", e)),
        Ok(None) => Ok(None),
        Err(e) => Err(nats_err("get", e)),
    }
}

async fn put_json<T: Serialize>(bucket: &kv::Store, key: &str, v: &T) -> Result<(), Error> {
    let bytes = Bytes::from(serde_json::to_vec(v).expect("records serialise"));
    timed("put", bucket.put(key, bytes))
        .await?
        .map(|_| ())
        .map_err(|e| nats_err("put", e))
}

async fn purge_key(bucket: &kv::Store, key: &str) -> Result<(), Error> {
    timed("purge key", bucket.purge(key))
        .await?
        .map_err(|e| nats_err("purge key", e))
}

#[derive(Serialize, Deserialize)]
struct ConsumerRecord {
    user: String,
    client: String,
    queue: String,
    last_seen: u64,
}

#[derive(Serialize, Deserialize)]
struct AttemptRecord {
    offset: u64,
    attempts: u32,
    next_attempt_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct DelayedRecord {
    id: u64,
    at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
    /// The body, base64.
    body: String,
}

type Op = BoxFuture<'static, ()>;

/// The NATS JetStream store.
pub struct NatsStore {
    inner: Arc<Inner>,
    /// Writes, applied one after another in call order.
    writer: mpsc::UnboundedSender<Op>,
    queued: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl NatsStore {
    /// Connects, creates the buckets it needs, and starts the writer.
    pub async fn connect(o: &NatsOptions, metrics: Arc<Metrics>) -> Result<Self, Error> {
        let client = connect(o).await?;
        // JetStream API requests (stream creation above all) may take a while on a
        // busy cluster: as long as the store's own bound.
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        let servers = {
            let info = client.server_info();
            let mut urls: Vec<String> = info.connect_urls.clone();
            urls.sort();
            urls.dedup();
            urls.len().max(1)
        };
        let replicas = match o.replicas {
            0 if servers >= 3 => 3,
            0 => 1,
            n => n,
        };
        let bucket = |name: &str| bucket(&js, format!("{}_{name}", o.prefix), replicas, None);
        let kv = Buckets {
            state: bucket("state").await?,
            consumers: bucket("consumers").await?,
            cursors: bucket("cursors").await?,
            attempts: bucket("attempts").await?,
            delayed: bucket("delayed").await?,
            seen: self::bucket(&js, format!("{}_seen", o.prefix), replicas, Some(SEEN_FOR)).await?,
        };
        let inner = Arc::new(Inner {
            client,
            js,
            prefix: o.prefix.clone(),
            replicas,
            duplicate_window: o.duplicate_window,
            kv,
            placements: RwLock::new(HashMap::new()),
            heads: Default::default(),
            streams: Default::default(),
        });
        let (writer, mut rx) = mpsc::unbounded_channel::<Op>();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        tokio::spawn(async move {
            while let Some(op) = rx.recv().await {
                op.await;
                q.fetch_sub(1, Ordering::AcqRel);
            }
        });
        // The connection's state, as `broker_cluster_connected` shows it.
        let (client, gauge) = (inner.client.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                let up = client.connection_state() == async_nats::connection::State::Connected;
                gauge.cluster_connected.set(i64::from(up));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        tracing::info!(replicas, servers, "NATS JetStream store ready");
        Ok(Self {
            inner,
            writer,
            queued,
            healthy: Arc::new(AtomicBool::new(true)),
            metrics,
        })
    }

    /// What the store's log and election use.
    pub(crate) fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }

    /// A campaign for the cluster's lead, as replica `node`.
    pub async fn lease(&self, node: String) -> Result<super::NatsLease, Error> {
        super::NatsLease::new(
            &self.inner.js,
            &self.inner.prefix,
            self.inner.replicas,
            node,
        )
        .await
    }

    /// The webhook targets this replica delivers (see [`super::NatsTargets`]).
    pub async fn targets(&self, fabric: &super::NatsFabric) -> Result<super::NatsTargets, Error> {
        let leases = bucket(
            &self.inner.js,
            format!("{}_leader", self.inner.prefix),
            self.inner.replicas,
            Some(super::nats_lease::LEASE_TTL),
        )
        .await?;
        Ok(fabric.targets(leases))
    }

    /// This replica's place in the cluster's fabric, as replica `node`.
    pub async fn fabric(&self, node: Arc<str>) -> Result<Arc<super::NatsFabric>, Error> {
        super::NatsFabric::start(&self.inner, node, self.metrics.clone()).await
    }

    /// Records that `queue` is made from `pattern` (its messages go to the pattern's
    /// stream); plain queues need no call.
    pub fn place(&self, queue: &str, placement: Placement) {
        let mut p = self.inner.placements.write().expect("placements lock");
        match placement {
            Placement::Own => p.remove(queue),
            other => p.insert(Arc::from(queue), other),
        };
    }

    /// Queues `op` behind every write queued before it; resolves with its outcome.
    fn write<T: Send + 'static>(
        &self,
        op: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, Error>> {
        let (done, wait) = oneshot::channel();
        let healthy = self.healthy.clone();
        let op = async move {
            let res = op.await;
            healthy.store(!matches!(res, Err(Error::Store(_))), Ordering::Release);
            let _ = done.send(res);
        };
        if self.queued.fetch_add(1, Ordering::AcqRel) >= WRITER_QUEUE {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return async {
                Err(Error::Store(format!(
                    "the store's write queue is full ({WRITER_QUEUE} operations waiting); try again"
                )))
            }
            .boxed();
        }
        if self.writer.send(op.boxed()).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return async { Err(Error::ShuttingDown) }.boxed();
        }
        async move { wait.await.map_err(|_| Error::ShuttingDown)? }.boxed()
    }

    /// Queues a write nobody waits for; a failure is logged and counted
    /// (`broker_store_dropped_ops_total`).
    fn send(
        &self,
        kind: &'static str,
        op: impl std::future::Future<Output = Result<(), Error>> + Send + 'static,
    ) {
        let metrics = self.metrics.clone();
        let done = self.write(op);
        let watch = async move {
            if let Err(e) = done.await {
                metrics.store_dropped_ops.inc();
                tracing::error!(op = kind, error = %e, "a store write nobody waits for failed");
            }
        };
        tokio::spawn(watch);
    }

    fn key(queue: &str, target: &str) -> String {
        format!("{}.{}", token(queue), token(target))
    }
}

impl super::Store for NatsStore {
    fn open(&self, queue: &str) -> BoxFuture<'static, Result<StoredQueue, Error>> {
        let (inner, queue) = (self.inner.clone(), queue.to_owned());
        self.write(async move {
            let loaded = inner.load(&queue, 0).await?;
            let delayed = inner.delayed(&queue).await?;
            Ok(StoredQueue {
                epoch: loaded.epoch,
                messages: loaded.messages,
                next_offset: loaded.next_offset,
                delayed,
            })
        })
    }

    fn tail(&self, queue: &str, after: u64) -> BoxFuture<'static, Result<StoredTail, Error>> {
        let (inner, queue) = (self.inner.clone(), queue.to_owned());
        async move { inner.tail(&queue, after).await }.boxed()
    }

    fn append(
        &self,
        queue: &str,
        messages: Vec<Arc<Message>>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let (inner, queue) = (self.inner.clone(), queue.to_owned());
        self.write(async move { inner.append_exact(&queue, messages).await })
    }

    fn schedule(
        &self,
        queue: &str,
        delayed: Vec<StoredDelayed>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let (inner, prefix) = (self.inner.clone(), token(queue));
        self.write(async move {
            for d in delayed {
                let key = format!("{prefix}.{}", d.id);
                put_json(&inner.kv.delayed, &key, &DelayedRecord::from_stored(&d)).await?;
            }
            Ok(())
        })
    }

    fn release(
        &self,
        queue: &str,
        messages: Vec<Arc<Message>>,
        ids: Vec<u64>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let (inner, queue) = (self.inner.clone(), queue.to_owned());
        self.write(async move {
            let prefix = token(&queue);
            for id in &ids {
                let key = format!("{prefix}.{id}");
                if timed("get", inner.kv.delayed.get(&key))
                    .await?
                    .map_err(|e| nats_err("get", e))?
                    .is_none()
                {
                    return Err(Error::Store(format!(
                        "delayed message {id} of `{queue}` was released before"
                    )));
                }
            }
            inner.append_exact(&queue, messages).await?;
            inner.forget_delayed(&queue, &ids).await
        })
    }

    fn trim(&self, queue: &str, first_kept: u64) {
        let (inner, queue) = (self.inner.clone(), queue.to_owned());
        self.send("trim", async move { inner.trim(&queue, first_kept).await });
    }

    fn remove(&self, queue: &str) {
        let (inner, queue) = (self.inner.clone(), queue.to_owned());
        self.send("remove", async move { inner.remove(&queue).await });
    }

    fn set_epoch(&self, queue: &str, epoch: &str) {
        let (inner, queue, epoch) = (self.inner.clone(), queue.to_owned(), epoch.to_owned());
        self.send(
            "set_epoch",
            async move { inner.set_epoch(&queue, &epoch).await },
        );
    }

    fn delivery_cursor(
        &self,
        queue: &str,
        target: &str,
    ) -> BoxFuture<'static, Result<Option<u64>, Error>> {
        let (inner, key) = (self.inner.clone(), Self::key(queue, target));
        async move { get_json::<u64>(&inner.kv.cursors, &key).await }.boxed()
    }

    fn set_delivery_cursor(
        &self,
        queue: &str,
        target: &str,
        offset: u64,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let (inner, key) = (self.inner.clone(), Self::key(queue, target));
        self.write(async move { put_json(&inner.kv.cursors, &key, &offset).await })
    }

    fn remove_delivery_cursor(&self, queue: &str, target: &str) {
        let (inner, key) = (self.inner.clone(), Self::key(queue, target));
        self.send("remove_delivery_cursor", async move {
            purge_key(&inner.kv.cursors, &key).await?;
            for k in keys_with(&inner.kv.attempts, &format!("{key}.")).await? {
                purge_key(&inner.kv.attempts, &k).await?;
            }
            Ok(())
        });
    }

    fn pending_attempts(
        &self,
        queue: &str,
        target: &str,
    ) -> BoxFuture<'static, Result<Vec<StoredAttempt>, Error>> {
        let (inner, key) = (self.inner.clone(), Self::key(queue, target));
        async move {
            let mut out = Vec::new();
            for k in keys_with(&inner.kv.attempts, &format!("{key}.")).await? {
                if let Some(a) = get_json::<AttemptRecord>(&inner.kv.attempts, &k).await? {
                    out.push(StoredAttempt {
                        offset: a.offset,
                        attempts: a.attempts,
                        next_attempt_ms: a.next_attempt_ms,
                    });
                }
            }
            out.sort_by_key(|a| a.offset);
            Ok(out)
        }
        .boxed()
    }

    fn save_attempt(&self, queue: &str, target: &str, a: StoredAttempt) {
        let inner = self.inner.clone();
        let key = format!("{}.{}", Self::key(queue, target), a.offset);
        self.send("save_attempt", async move {
            let record = AttemptRecord {
                offset: a.offset,
                attempts: a.attempts,
                next_attempt_ms: a.next_attempt_ms,
            };
            put_json(&inner.kv.attempts, &key, &record).await
        });
    }

    fn clear_attempt(&self, queue: &str, target: &str, offset: u64) {
        let inner = self.inner.clone();
        let key = format!("{}.{offset}", Self::key(queue, target));
        self.send("clear_attempt", async move {
            purge_key(&inner.kv.attempts, &key).await
        });
    }

    fn consumers(&self) -> BoxFuture<'static, Result<Vec<StoredConsumer>, Error>> {
        let inner = self.inner.clone();
        async move {
            let mut out = Vec::new();
            for k in keys_with(&inner.kv.consumers, "").await? {
                if let Some(c) = get_json::<ConsumerRecord>(&inner.kv.consumers, &k).await? {
                    out.push(StoredConsumer {
                        user: c.user,
                        client: c.client,
                        queue: c.queue,
                        last_seen: c.last_seen,
                    });
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn save_consumer(&self, c: StoredConsumer) {
        let inner = self.inner.clone();
        let key = Self::key(&c.user, &c.client);
        self.send("save_consumer", async move {
            let record = ConsumerRecord {
                user: c.user,
                client: c.client,
                queue: c.queue,
                last_seen: c.last_seen,
            };
            put_json(&inner.kv.consumers, &key, &record).await
        });
    }

    fn consumer(
        &self,
        user: &str,
        client: &str,
    ) -> BoxFuture<'static, Result<Option<StoredConsumer>, Error>> {
        let (inner, key) = (self.inner.clone(), Self::key(user, client));
        async move {
            // From the bucket's stream leader, not a replica that may lag behind.
            let bucket = &inner.kv.consumers;
            let subject = format!("{}{key}", bucket.prefix);
            let last = timed(
                "get",
                bucket.stream.get_last_raw_message_by_subject(&subject),
            )
            .await?;
            let m = match last {
                Ok(m) => m,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    return Ok(None)
                }
                Err(e) => return Err(nats_err("get", e)),
            };
            // A purged key leaves an empty marker.
            if m.payload.is_empty() {
                return Ok(None);
            }
            let c: ConsumerRecord =
                serde_json::from_slice(&m.payload).map_err(|e| nats_err("decode", e))?;
            Ok(Some(StoredConsumer {
                user: c.user,
                client: c.client,
                queue: c.queue,
                last_seen: c.last_seen,
            }))
        }
        .boxed()
    }

    fn claim_once(&self, key: &str, keep: Duration) -> BoxFuture<'static, Result<bool, Error>> {
        use sha2::Digest;
        let inner = self.inner.clone();
        // Hashed: any length and bytes, and nothing of the request in the bucket.
        let key = hex::encode(sha2::Sha256::digest(key.as_bytes()));
        async move {
            if keep > SEEN_FOR {
                tracing::warn!(
                    keep = ?keep,
                    "a signature window is longer than replicas remember signed requests (2 h): replays older than that reach other replicas"
                );
            }
            match timed("claim", inner.kv.seen.create(&key, Bytes::new())).await? {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(nats_err("claim", e)),
            }
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), Error>> {
        self.write(async { Ok(()) })
    }

    fn remove_consumer(&self, user: &str, client: &str) {
        let (inner, key) = (self.inner.clone(), Self::key(user, client));
        self.send("remove_consumer", async move {
            purge_key(&inner.kv.consumers, &key).await
        });
    }

    fn state(&self, key: &str) -> BoxFuture<'static, Result<Option<String>, Error>> {
        let (inner, key) = (self.inner.clone(), token(key));
        async move {
            match timed("get", inner.kv.state.get(key)).await? {
                Ok(Some(v)) => String::from_utf8(v.to_vec())
                    .map(Some)
                    .map_err(|e| nats_err("state", e)),
                Ok(None) => Ok(None),
                Err(e) => Err(nats_err("get", e)),
            }
        }
        .boxed()
    }

    fn set_state(&self, key: &str, value: String) -> BoxFuture<'static, Result<(), Error>> {
        let (inner, key) = (self.inner.clone(), token(key));
        self.write(async move {
            timed("put", inner.kv.state.put(key, Bytes::from(value)))
                .await?
                .map(|_| ())
                .map_err(|e| nats_err("put", e))
        })
    }

    fn watch_state(&self, key: &str) -> Option<futures_util::stream::BoxStream<'static, String>> {
        let (inner, key) = (self.inner.clone(), token(key));
        let values = futures_util::stream::unfold(None, move |mut watch: Option<kv::Watch>| {
            let (inner, key) = (inner.clone(), key.clone());
            async move {
                loop {
                    let Some(w) = watch.as_mut() else {
                        match inner.kv.state.watch_with_history(&key).await {
                            Ok(w) => watch = Some(w),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot watch the shared state; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                        continue;
                    };
                    match w.next().await {
                        Some(Ok(e)) if e.operation == kv::Operation::Put => {
                            match String::from_utf8(e.value.to_vec()) {
                                Ok(v) => return Some((v, watch)),
                                Err(_) => continue,
                            }
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "the shared state's watch failed; watching again");
                            watch = None;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        None => watch = None,
                    }
                }
            }
        });
        Some(values.boxed())
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
            && self.inner.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// A change of the delayed bucket under `prefix` (a queue's token and `.`), as the
/// queue hears it.
pub(crate) fn delayed_change(entry: &kv::Entry, prefix: &str) -> Option<crate::log::DelayedChange> {
    let id: u64 = entry.key.strip_prefix(prefix)?.parse().ok()?;
    match entry.operation {
        kv::Operation::Put => serde_json::from_slice::<DelayedRecord>(&entry.value)
            .ok()
            .and_then(|r| r.into_stored().ok())
            .map(crate::log::DelayedChange::Scheduled),
        kv::Operation::Delete | kv::Operation::Purge => {
            Some(crate::log::DelayedChange::Released(id))
        }
    }
}

impl DelayedRecord {
    fn from_stored(d: &StoredDelayed) -> Self {
        use base64::Engine;
        DelayedRecord {
            id: d.id,
            at_ms: d.at_ms,
            content_type: d.message.content_type.as_deref().map(str::to_owned),
            headers: d.message.headers.clone(),
            body: base64::engine::general_purpose::STANDARD.encode(&d.message.body),
        }
    }

    fn into_stored(self) -> Result<StoredDelayed, Error> {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD
            .decode(self.body)
            .map_err(|e| nats_err("delayed message", e))?;
        Ok(StoredDelayed {
            id: self.id,
            at_ms: self.at_ms,
            message: crate::message::NewMessage {
                id: None,
                body: Bytes::from(body),
                content_type: self.content_type.map(Arc::from),
                headers: self.headers,
                audience: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_injective_and_safe() {
        let names = ["a.b", "a_2Eb", "a_b", "a__b", "chat.*", "x>y", "é", "a b"];
        let tokens: Vec<String> = names.iter().map(|n| token(n)).collect();
        for t in &tokens {
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{t}"
            );
        }
        let mut unique = tokens.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), tokens.len(), "{tokens:?}");
        assert_eq!(token("orders"), "orders");
        assert_eq!(token(&"q".repeat(200)).len(), 65);
    }

    #[test]
    fn metadata_survives_the_round_trip_and_headers_cannot_break_out() {
        let m = Message {
            content_type: Some(Arc::from("text/plain")),
            headers: vec![("x-a".into(), "line\r\nInjected: yes".into())],
            received_at_ms: 42,
            ..Message::new(Arc::from("q"), 7, Bytes::from_static(b"body"))
        };
        let h = encode(&m, true);
        assert!(!h.get(META).unwrap().as_str().contains('\n'));
        let back = decode(&Arc::from("q"), 99, Some(&h), m.body.clone()).unwrap();
        assert!(back.audience.is_none());
        let only = Message {
            audience: Some(Arc::new(crate::message::Audience {
                exclude: vec![3],
                eligible: Some(vec![4, 5]),
            })),
            ..Message::new(Arc::from("q"), 1, Bytes::new())
        };
        let seen = decode(
            &Arc::from("q"),
            1,
            Some(&encode(&only, false)),
            Bytes::new(),
        )
        .unwrap()
        .audience
        .unwrap();
        assert_eq!(
            (seen.admits(4), seen.admits(3), seen.admits(6)),
            (true, false, false)
        );
        assert_eq!(back.offset, 7, "a shared stream keeps the offset");
        assert_eq!(back.headers, m.headers);
        assert_eq!(
            (back.received_at_ms, back.content_type),
            (42, m.content_type.clone())
        );
        let own = decode(&Arc::from("q"), 99, Some(&encode(&m, false)), m.body).unwrap();
        assert_eq!(own.offset, 99, "an own stream's offset is the sequence");
    }
}
