//! Where queue contents live. The `Queue` actor keeps its retained window in memory for
//! reads and fan-out; the store is what makes that window survive (or, for `memory://`,
//! deliberately not survive) a restart.
//!
//! Contract for implementations: `append` futures of one queue complete in call order,
//! and a future resolves only once the messages are as durable as the backend promises.
//! An append continues the stored history exactly (its first offset is the stored next
//! offset) or fails; after a failure the queue re-reads its tail (`tail`), because a
//! commit reported as failed may still have happened.

#[cfg(test)]
mod conformance;
mod lock;
mod memory;
pub mod nats;
mod nats_fabric;
mod nats_lease;
pub mod nats_log;
mod nats_targets;
#[cfg(any(test, feature = "local-nats"))]
pub mod nats_testing;
mod sql;

use std::sync::Arc;

use futures_util::future::BoxFuture;

pub use lock::{ActiveLock, Fence, ACTIVE_LOCK_KEY};
#[cfg(test)]
pub(crate) use memory::Fault;
pub use memory::MemoryStore;
pub use nats::{is_nats_url, NatsOptions, NatsStore};
pub use nats_fabric::NatsFabric;
pub use nats_lease::NatsLease;
pub use nats_log::JetStreamLogs;
pub use nats_targets::NatsTargets;
pub use sql::SqlStore;

use crate::error::Error;
use crate::message::Message;

/// A delayed message as the store keeps it until it is due.
#[derive(Debug, Clone)]
pub struct StoredDelayed {
    /// Its id within the queue (grows).
    pub id: u64,
    /// When it is due, Unix ms.
    pub at_ms: i64,
    /// The message.
    pub message: crate::message::NewMessage,
}

/// A named poll consumer as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredConsumer {
    /// Its user.
    pub user: String,
    /// Its client name.
    pub client: String,
    /// Its queue.
    pub queue: String,
    /// The last offset it has read.
    pub last_seen: u64,
}

/// A webhook delivery waiting for a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredAttempt {
    /// The message's offset.
    pub offset: u64,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due, Unix ms.
    pub next_attempt_ms: i64,
}

/// What a queue finds in the store when it starts.
#[derive(Debug, Clone)]
pub struct StoredQueue {
    /// The queue's epoch; a new one when its history was lost.
    pub epoch: Arc<str>,
    /// The retained messages, oldest first.
    pub messages: Vec<Arc<Message>>,
    /// Offset the next message gets.
    pub next_offset: u64,
    /// Delayed messages not yet due, in id order.
    pub delayed: Vec<StoredDelayed>,
}

/// What a queue re-reads after a failed append: the stored epoch, next offset and the
/// messages after the offset the queue had seen acknowledged.
#[derive(Debug, Clone)]
pub struct StoredTail {
    /// The queue's epoch (changed if the stored history was replaced meanwhile).
    pub epoch: Arc<str>,
    /// Stored messages after the offset asked for, oldest first.
    pub messages: Vec<Arc<Message>>,
    /// Offset the next message gets.
    pub next_offset: u64,
}

/// A storage backend.
pub trait Store: Send + Sync + 'static {
    /// Opens (creating if needed) a queue and returns its retained state.
    fn open(&self, queue: &str) -> BoxFuture<'static, Result<StoredQueue, Error>>;
    /// The queue's stored epoch, next offset and messages after `after`.
    fn tail(&self, queue: &str, after: u64) -> BoxFuture<'static, Result<StoredTail, Error>> {
        let open = self.open(queue);
        Box::pin(async move {
            let q = open.await?;
            Ok(StoredTail {
                epoch: q.epoch,
                messages: q
                    .messages
                    .into_iter()
                    .filter(|m| m.offset > after)
                    .collect(),
                next_offset: q.next_offset,
            })
        })
    }
    /// Appends messages (already given offsets) to a queue.
    fn append(
        &self,
        queue: &str,
        messages: Vec<Arc<Message>>,
    ) -> BoxFuture<'static, Result<(), Error>>;
    /// Keeps delayed messages; resolves once they are as durable as appends.
    fn schedule(
        &self,
        queue: &str,
        delayed: Vec<StoredDelayed>,
    ) -> BoxFuture<'static, Result<(), Error>>;
    /// Appends due messages and forgets the delayed entries they came from, atomically:
    /// a crash can neither lose nor duplicate them.
    fn release(
        &self,
        queue: &str,
        messages: Vec<Arc<Message>>,
        ids: Vec<u64>,
    ) -> BoxFuture<'static, Result<(), Error>>;
    /// Forgets messages with offsets below `first_kept`.
    fn trim(&self, queue: &str, first_kept: u64);
    /// Forgets a queue entirely (removed from the config), delivery cursors included.
    fn remove(&self, queue: &str);
    /// Gives a queue a new epoch (its history was found lost); offsets go on.
    fn set_epoch(&self, queue: &str, epoch: &str);
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
    /// Forgets the cursor (and the pending attempts) of a removed target.
    fn remove_delivery_cursor(&self, queue: &str, target: &str);
    /// Deliveries of a target waiting for a retry.
    fn pending_attempts(
        &self,
        queue: &str,
        target: &str,
    ) -> BoxFuture<'static, Result<Vec<StoredAttempt>, Error>>;
    /// Records a scheduled retry (not awaited).
    fn save_attempt(&self, queue: &str, target: &str, attempt: StoredAttempt);
    /// Forgets a settled delivery's retry record (not awaited).
    fn clear_attempt(&self, queue: &str, target: &str, offset: u64);
    /// Every named poll consumer.
    fn consumers(&self) -> BoxFuture<'static, Result<Vec<StoredConsumer>, Error>>;
    /// Creates or moves a consumer's cursor (not awaited: a crash can only make a reader
    /// see messages again, never skip them).
    fn save_consumer(&self, consumer: StoredConsumer);
    /// Forgets a consumer.
    fn remove_consumer(&self, user: &str, client: &str);
    /// One named consumer as stored now (replicas sharing the store read it before
    /// serving it: another replica may have moved or removed it).
    fn consumer(
        &self,
        user: &str,
        client: &str,
    ) -> BoxFuture<'static, Result<Option<StoredConsumer>, Error>> {
        let (all, user, client) = (self.consumers(), user.to_owned(), client.to_owned());
        Box::pin(async move {
            Ok(all
                .await?
                .into_iter()
                .find(|c| c.user == user && c.client == client))
        })
    }
    /// Whether `key` (a signed request's nonce or id) is seen here for the first time
    /// by any broker sharing the store, remembering it for at least `keep`; `true` where
    /// no other broker shares the store (each broker's own cache covers it).
    fn claim_once(
        &self,
        _key: &str,
        _keep: std::time::Duration,
    ) -> BoxFuture<'static, Result<bool, Error>> {
        Box::pin(async { Ok(true) })
    }
    /// Resolves once every write asked for before it (awaited or not) is stored.
    fn flush(&self) -> BoxFuture<'static, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
    /// A named piece of broker state (JSON), e.g. the runtime definitions.
    fn state(&self, key: &str) -> BoxFuture<'static, Result<Option<String>, Error>>;
    /// Saves a named piece of state; resolves after its commit.
    fn set_state(&self, key: &str, value: String) -> BoxFuture<'static, Result<(), Error>>;
    /// Values written to a named piece of state by other brokers sharing the store (a
    /// NATS cluster), as they are written; `None` where no other broker writes it.
    fn watch_state(&self, _key: &str) -> Option<futures_util::stream::BoxStream<'static, String>> {
        None
    }
    /// Whether the store takes writes: the outcome of its last write, batch or probe
    /// (`/readyz` reports it).
    fn healthy(&self) -> bool {
        true
    }
}

/// A fresh random epoch: 16 hex digits.
pub fn random_epoch() -> Arc<str> {
    crate::random::id()
}

/// Opens the store named by `storage.url`: `memory://`, `sqlite://PATH`, `postgres://…`.
pub async fn open(
    url: &str,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<Arc<dyn Store>, Error> {
    open_fenced(url, metrics, None).await
}

/// [`open`] for a broker holding the database's active lock: every write checks
/// `fence` (PostgreSQL), so a broker that lost the lock acknowledges nothing more.
pub async fn open_fenced(
    url: &str,
    metrics: Arc<crate::metrics::Metrics>,
    fence: Option<Fence>,
) -> Result<Arc<dyn Store>, Error> {
    let store: Arc<dyn Store> = if url == "memory://" {
        Arc::new(MemoryStore::default())
    } else if is_sql_url(url) {
        Arc::new(SqlStore::connect(url, metrics, fence).await?)
    } else if is_nats_url(url) {
        Arc::new(NatsStore::connect(&NatsOptions::new(url), metrics).await?)
    } else {
        return Err(Error::Store(format!(
            "unsupported storage url `{}`",
            without_password(url)
        )));
    };
    tracing::info!(storage = %without_password(url), "store opened");
    Ok(store)
}

/// `url` with the password of its user info (`postgres://user:PASSWORD@host`) replaced,
/// for logs and errors.
pub fn without_password(url: &str) -> std::borrow::Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.into();
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            let tail = &rest[authority.len()..];
            format!("{scheme}://{user}:***@{host}{tail}").into()
        }
        _ => url.into(),
    }
}

/// Whether `url` names a SQL backend.
pub fn is_sql_url(url: &str) -> bool {
    url.starts_with("sqlite://") || is_postgres_url(url)
}

/// Whether `url` names PostgreSQL (where several brokers may share one database).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The PostgreSQL the tests use: `BROKER_TEST_POSTGRES_URL`, or else the local server
/// on 127.0.0.1:5432 when it is reachable (database `broker_test`, created if missing),
/// so the README's test command runs the PostgreSQL tests wherever PostgreSQL runs.
/// `None` (the test is skipped, saying why) otherwise; with `CI` set, a failure.
#[cfg(test)]
pub(crate) async fn test_postgres_url() -> Option<String> {
    use sqlx::Connection;
    if let Ok(u) = std::env::var("BROKER_TEST_POSTGRES_URL") {
        return Some(u);
    }
    const LOCAL: &str = "postgres://postgres@127.0.0.1:5432";
    let ci = std::env::var_os("CI").is_some();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 5432));
    let timeout = std::time::Duration::from_millis(300);
    if std::net::TcpStream::connect_timeout(&addr, timeout).is_err() {
        assert!(
            !ci,
            "PostgreSQL must be reachable in CI (.ci/run starts it)"
        );
        eprintln!("PostgreSQL is not reachable on 127.0.0.1:5432 (BROKER_TEST_POSTGRES_URL unset); skipped");
        return None;
    }
    match sqlx::PgConnection::connect(&format!("{LOCAL}/postgres")).await {
        Ok(mut c) => {
            // Concurrent tests may race to create it: "exists" is fine.
            let _ = sqlx::query("CREATE DATABASE broker_test")
                .execute(&mut c)
                .await;
            Some(format!("{LOCAL}/broker_test"))
        }
        Err(e) => {
            assert!(!ci, "PostgreSQL refused the test login: {e}");
            eprintln!("PostgreSQL on 127.0.0.1:5432 refused the test login ({e}); skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::without_password;

    #[test]
    fn passwords_are_kept_out_of_logged_urls() {
        for (url, shown) in [
            (
                "postgres://app:s3cr%40t@db:5432/broker?sslmode=require",
                "postgres://app:***@db:5432/broker?sslmode=require",
            ),
            ("postgres://app@db/broker", "postgres://app@db/broker"),
            ("sqlite://./data/broker.db", "sqlite://./data/broker.db"),
            ("memory://", "memory://"),
        ] {
            assert_eq!(without_password(url), shown);
        }
    }
}
