//! The queue's log: the seam between a `Queue` actor and wherever its messages are kept.
//!
//! What a queue needs from its log is small: load what is retained, append a batch and
//! learn the offsets it got, re-read the tail after a failure, trim to the limits, change
//! the epoch, and hear of entries that appeared without an append of its own. The
//! `Queue` keeps the visible window, the cursors, the subscribers and the delayed set;
//! the log only keeps order and durability.
//!
//! Today's implementation is [`StoreLog`]: offsets are given here, at call time, and the
//! batch goes to the broker's [`Store`] (memory, SQLite or PostgreSQL). The contract is
//! written for a replicated log too, one whose appends are acknowledged by other nodes:
//!
//! - the log, not the queue, gives offsets; an append resolves with the messages as
//!   stored (offsets set), and only once they are as durable as the log promises;
//! - append futures may resolve in any order, and entries may appear through [`QueueLog::feed`]
//!   before (or without) the append that wrote them resolving here; the queue makes
//!   entries visible strictly in offset order and ignores offsets it already shows;
//! - an append reported as failed may still have been stored: the queue then re-reads
//!   [`QueueLog::tail`] and continues from what it finds ([`QueueLog::continue_at`]).

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::error::Error;
use crate::message::{now_ms, Message, NewMessage};
use crate::store::{Store, StoredQueue, StoredTail};

/// One queue's log.
pub trait QueueLog: Send + 'static {
    /// Loads the retained state: epoch, messages, next offset, delayed entries. The
    /// queue then calls [`QueueLog::continue_at`] with the next offset found.
    fn open(&mut self) -> BoxFuture<'static, Result<StoredQueue, Error>>;
    /// Appends a batch (all or none); the log gives the offsets. Resolves with the
    /// messages as stored once they are durable. `released`: ids of the delayed entries
    /// these messages come from, forgotten in the same step (a crash neither loses nor
    /// duplicates them).
    fn append(
        &mut self,
        batch: Vec<NewMessage>,
        released: Vec<u64>,
    ) -> BoxFuture<'static, Result<Vec<Arc<Message>>, Error>>;
    /// The stored epoch, next offset and entries after `after` (read after a failed
    /// append or a gap in the feed).
    fn tail(&self, after: u64) -> BoxFuture<'static, Result<StoredTail, Error>>;
    /// Offsets go on at `next` (what [`QueueLog::open`] or [`QueueLog::tail`] found).
    fn continue_at(&mut self, next: u64);
    /// Forgets entries below `first_kept` (the queue's limits dropped them).
    fn trim(&self, first_kept: u64);
    /// Gives the queue a new epoch (its history was found lost); offsets go on.
    fn set_epoch(&self, epoch: &str);
    /// Entries that appear without an append of this queue (another replica wrote them),
    /// in offset order. `None` for a log that only this queue writes.
    fn feed(&mut self) -> Option<BoxStream<'static, Vec<Arc<Message>>>>;
    /// Delayed entries scheduled or released by other replicas sharing the store, as
    /// that happens (entries held already may come again). `None` where only this
    /// queue schedules.
    fn delayed_feed(&mut self) -> Option<BoxStream<'static, DelayedChange>> {
        None
    }
    /// Whether other replicas append to this log too: then a reader ahead of this
    /// queue's head is only ahead of this replica, not proof of lost history.
    fn replicated(&self) -> bool {
        false
    }
}

/// A change to a queue's delayed entries made elsewhere (see [`QueueLog::delayed_feed`]).
#[derive(Debug, Clone)]
pub enum DelayedChange {
    /// An entry was scheduled.
    Scheduled(crate::store::StoredDelayed),
    /// The entry with this id was released (or dropped).
    Released(u64),
}

/// Opens the log of each queue.
pub trait Logs: Send + Sync + 'static {
    /// The log of `queue`, made from `spec` (a queue or a pattern; not loaded yet: the
    /// queue calls [`QueueLog::open`]).
    fn log(&self, queue: &Arc<str>, spec: &crate::settings::QueueSpec) -> Box<dyn QueueLog>;
}

/// Logs kept in the broker's store.
pub struct StoreLogs(pub Arc<dyn Store>);

impl StoreLogs {
    /// The log of `queue` (the store needs no spec).
    pub fn of(&self, queue: &Arc<str>) -> Box<dyn QueueLog> {
        Box::new(StoreLog {
            store: self.0.clone(),
            queue: queue.clone(),
            next: 1,
        })
    }
}

impl Logs for StoreLogs {
    fn log(&self, queue: &Arc<str>, _spec: &crate::settings::QueueSpec) -> Box<dyn QueueLog> {
        self.of(queue)
    }
}

/// A queue's log in the broker's store. Only this broker's queue writes it (the store's
/// active lock or file lock sees to that), so offsets are given here, at call time:
/// consecutive appends get consecutive ranges and the store's `append` futures complete
/// in call order.
pub struct StoreLog {
    store: Arc<dyn Store>,
    queue: Arc<str>,
    /// The offset the next message gets.
    next: u64,
}

impl QueueLog for StoreLog {
    fn open(&mut self) -> BoxFuture<'static, Result<StoredQueue, Error>> {
        self.store.open(&self.queue)
    }

    fn append(
        &mut self,
        batch: Vec<NewMessage>,
        released: Vec<u64>,
    ) -> BoxFuture<'static, Result<Vec<Arc<Message>>, Error>> {
        let now = now_ms();
        let first = self.next;
        let messages: Vec<Arc<Message>> = batch
            .into_iter()
            .zip(first..)
            .map(|(m, offset)| Arc::new(m.into_message(self.queue.clone(), offset, now)))
            .collect();
        self.next = first + messages.len() as u64;
        let stored = if released.is_empty() {
            self.store.append(&self.queue, messages.clone())
        } else {
            self.store.release(&self.queue, messages.clone(), released)
        };
        Box::pin(async move { stored.await.map(|()| messages) })
    }

    fn tail(&self, after: u64) -> BoxFuture<'static, Result<StoredTail, Error>> {
        self.store.tail(&self.queue, after)
    }

    fn continue_at(&mut self, next: u64) {
        self.next = next;
    }

    fn trim(&self, first_kept: u64) {
        self.store.trim(&self.queue, first_kept);
    }

    fn set_epoch(&self, epoch: &str) {
        self.store.set_epoch(&self.queue, epoch);
    }

    fn feed(&mut self) -> Option<BoxStream<'static, Vec<Arc<Message>>>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn batch(n: usize) -> Vec<NewMessage> {
        (0..n)
            .map(|i| NewMessage::from(bytes::Bytes::from(format!("m{i}"))))
            .collect()
    }

    #[actix::test]
    async fn store_log_gives_consecutive_offsets_and_continues_after_a_resync() {
        let logs = StoreLogs(Arc::new(MemoryStore::default()));
        let mut log = logs.of(&Arc::from("q"));
        let opened = log.open().await.unwrap();
        assert_eq!(opened.next_offset, 1);
        let a = log.append(batch(2), Vec::new());
        let b = log.append(batch(1), Vec::new());
        let offsets = |ms: Vec<Arc<Message>>| ms.iter().map(|m| m.offset).collect::<Vec<_>>();
        assert_eq!(offsets(a.await.unwrap()), vec![1, 2]);
        assert_eq!(offsets(b.await.unwrap()), vec![3]);
        let tail = log.tail(1).await.unwrap();
        assert_eq!(tail.next_offset, 4);
        assert_eq!(offsets(tail.messages), vec![2, 3]);
        log.continue_at(tail.next_offset);
        assert_eq!(
            offsets(log.append(batch(1), Vec::new()).await.unwrap()),
            vec![4]
        );
        assert!(log.feed().is_none(), "only this queue writes a store log");
    }
}
