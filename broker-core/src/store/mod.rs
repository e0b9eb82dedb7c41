//! Where queue contents live. The `Queue` actor keeps its retained window in memory for
//! reads and fan-out; the store is what makes that window survive (or, for `memory://`,
//! deliberately not survive) a restart.
//!
//! Contract for implementations: `append` futures of one queue complete in call order,
//! and a future resolves only once the messages are as durable as the backend promises.
//! Durable backends (SQLite, PostgreSQL) will implement the same trait.

mod memory;

use std::sync::Arc;

use futures_util::future::BoxFuture;

pub use memory::MemoryStore;

use crate::error::Error;
use crate::message::Message;

/// What a queue finds in the store when it starts.
#[derive(Debug, Clone)]
pub struct StoredQueue {
    /// The queue's epoch; a new one when its history was lost.
    pub epoch: Arc<str>,
    /// The retained messages, oldest first.
    pub messages: Vec<Arc<Message>>,
    /// Offset the next message gets.
    pub next_offset: u64,
}

/// A storage backend.
pub trait Store: Send + Sync + 'static {
    /// Opens (creating if needed) a queue and returns its retained state.
    fn open(&self, queue: &str) -> BoxFuture<'static, Result<StoredQueue, Error>>;
    /// Appends messages (already given offsets) to a queue.
    fn append(
        &self,
        queue: &str,
        messages: Vec<Arc<Message>>,
    ) -> BoxFuture<'static, Result<(), Error>>;
    /// Forgets messages with offsets below `first_kept`.
    fn trim(&self, queue: &str, first_kept: u64);
    /// Forgets a queue entirely (removed from the config), delivery cursors included.
    fn remove(&self, queue: &str);
    /// The settled delivery cursor of webhook `target` of `queue`: every message up to
    /// it was delivered or dead-lettered. `None` for a new target.
    fn delivery_cursor(
        &self,
        queue: &str,
        target: &str,
    ) -> BoxFuture<'static, Result<Option<u64>, Error>>;
    /// Moves that cursor (it only ever grows while the queue's epoch stays).
    fn set_delivery_cursor(
        &self,
        queue: &str,
        target: &str,
        offset: u64,
    ) -> BoxFuture<'static, Result<(), Error>>;
    /// Forgets the cursor of a removed target.
    fn remove_delivery_cursor(&self, queue: &str, target: &str);
}

/// A fresh random epoch: 16 hex digits.
pub fn random_epoch() -> Arc<str> {
    crate::message::random_id()
}

/// Opens the store named by `storage.url`.
pub fn open(url: &str) -> Result<Arc<dyn Store>, Error> {
    match url {
        "memory://" => Ok(Arc::new(MemoryStore::default())),
        other => Err(Error::Store(format!("unsupported storage url `{other}`"))),
    }
}
