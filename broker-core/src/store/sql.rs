//! `sqlite://PATH` and `postgres://…`: one schema, one migration list, one writer.
//!
//! Every change (appends, trims, cursors, removals) goes through a single writer task
//! that takes whatever is waiting — up to [`MAX_BATCH`] operations — and applies it in
//! one transaction: concurrent publishes share one commit (and, for SQLite in WAL mode
//! with `synchronous=FULL`, one fsync). An append is acknowledged only after the commit
//! that holds it. The writer keeps one connection of its own (for SQLite, on a thread of
//! its own); reads (a queue's retained window at start, cursors) use the pool.
//! Operations of one queue are applied in the order they were sent, except that trims
//! of a queue within one batch are merged into one (a trim never touches an append
//! that is not yet acknowledged).
//!
//! Migrations are a numbered list applied in one transaction each, recorded in
//! `broker_migrations`; sqlx's migrate feature is not used so that the build needs no
//! proc macros and the list is the same for both backends.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use super::lock::{pg_options, Fence, FileLock, FENCE_CHECK};
use super::{
    random_epoch, Store, StoredAttempt, StoredConsumer, StoredDelayed, StoredQueue, StoredTail,
};
use crate::error::Error;
use crate::message::Message;
use crate::message::NewMessage;
use crate::metrics::Metrics;

/// Most operations in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Depth of the writer's queue; awaited operations beyond it are refused (overload).
const WRITER_QUEUE: usize = 8192;
/// Depth beyond which even operations nobody awaits (cursor moves, trims, retry
/// records, removals) are dropped — logged and counted, never silently.
const WRITER_QUEUE_UNAWAITED: usize = 4 * WRITER_QUEUE;
/// After a batch failed, its operations are retried one by one so that only the
/// culprit fails; this many failing in a row means the store itself is failing and
/// the rest of the batch fails with them.
const FAILURES_BEFORE_GIVING_UP: usize = 3;

/// The schema, version by version; `{BLOB}` and `{INT}` are filled per backend.
const MIGRATIONS: &[&str] = &[
    // 1: queues, messages, webhook delivery cursors.
    "CREATE TABLE queues (name TEXT PRIMARY KEY, epoch TEXT NOT NULL, next_offset {INT} NOT NULL);
     CREATE TABLE messages (queue TEXT NOT NULL, pos {INT} NOT NULL, body {BLOB} NOT NULL,
        content_type TEXT, headers TEXT NOT NULL, received_at_ms {INT} NOT NULL,
        PRIMARY KEY (queue, pos));
     CREATE TABLE delivery_cursors (queue TEXT NOT NULL, target TEXT NOT NULL, pos {INT} NOT NULL,
        PRIMARY KEY (queue, target));",
    // 2: delayed messages until they are due.
    "CREATE TABLE delayed (queue TEXT NOT NULL, id {INT} NOT NULL, at_ms {INT} NOT NULL,
        body {BLOB} NOT NULL, content_type TEXT, headers TEXT NOT NULL, PRIMARY KEY (queue, id));",
    // 3: named pieces of broker state (runtime definitions).
    "CREATE TABLE broker_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 4: named poll consumers and their cursors.
    "CREATE TABLE consumers (username TEXT NOT NULL, client TEXT NOT NULL, queue TEXT NOT NULL,
        last_seen {INT} NOT NULL, PRIMARY KEY (username, client));",
    // 5: webhook deliveries waiting for a retry.
    "CREATE TABLE delivery_attempts (queue TEXT NOT NULL, target TEXT NOT NULL, pos {INT} NOT NULL,
        attempts {INT} NOT NULL, next_attempt_ms {INT} NOT NULL, PRIMARY KEY (queue, target, pos));",
    // 6: the idempotency key a message was published with.
    "ALTER TABLE messages ADD COLUMN idem TEXT;",
];

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

enum Op {
    Append {
        queue: String,
        messages: Vec<Arc<Message>>,
        /// Delayed entries these messages came from, deleted in the same transaction.
        released: Vec<u64>,
        done: oneshot::Sender<Result<(), Error>>,
    },
    Schedule {
        queue: String,
        delayed: Vec<StoredDelayed>,
        done: oneshot::Sender<Result<(), Error>>,
    },
    Trim {
        queue: String,
        first_kept: u64,
    },
    SaveConsumer(StoredConsumer),
    SaveAttempt {
        queue: String,
        target: String,
        attempt: StoredAttempt,
    },
    ClearAttempt {
        queue: String,
        target: String,
        offset: u64,
    },
    RemoveConsumer {
        user: String,
        client: String,
    },
    SetState {
        key: String,
        value: String,
        done: oneshot::Sender<Result<(), Error>>,
    },
    SetCursor {
        queue: String,
        target: String,
        offset: u64,
        done: oneshot::Sender<Result<(), Error>>,
    },
    RemoveCursor {
        queue: String,
        target: String,
    },
    Remove {
        queue: String,
    },
    /// A small write that tells whether the store takes writes (readiness).
    Probe,
    SetEpoch {
        queue: String,
        epoch: String,
    },
}

/// Reads run as tasks of their own: the caller (an actor) may be dropped with the
/// read in flight when the runtime is already shutting down, and an in-flight sqlx
/// query must not be dropped outside a runtime (its connection's drop spawns).
trait Detached<T> {
    fn detached(self) -> BoxFuture<'static, Result<T, Error>>;
}

impl<T, F> Detached<T> for F
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, Error>> + Send + 'static,
{
    fn detached(self) -> BoxFuture<'static, Result<T, Error>> {
        let task = tokio::spawn(self);
        async move { task.await.map_err(|_| Error::ShuttingDown)? }.boxed()
    }
}

/// A SQL-backed store.
pub struct SqlStore {
    pool: Pool,
    /// The writer's queue: one FIFO for every operation, so they are applied in call
    /// order; bounded by `queued` (the channel itself is not, so that an operation
    /// nobody awaits is never reordered by waiting for room).
    writer: mpsc::UnboundedSender<Op>,
    /// Operations in the writer's queue.
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    healthy: Arc<AtomicBool>,
    /// SQLite: the OS lock that keeps a second broker off the file, held while this
    /// store lives.
    _file_lock: Option<FileLock>,
}

fn store_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

impl SqlStore {
    /// Connects (creating the SQLite file and its directory if needed), migrates, and
    /// starts the writer. `fence` (PostgreSQL): the generation of the active lock this
    /// broker holds; every write transaction checks it (see [`super::lock`]).
    pub async fn connect(
        url: &str,
        metrics: Arc<Metrics>,
        fence: Option<Fence>,
    ) -> Result<Self, Error> {
        match url.strip_prefix("sqlite://") {
            Some(path) => Self::connect_sqlite(path, |o| o, metrics).await,
            None => Self::connect_pg(url, metrics, fence).await,
        }
    }

    /// SQLite at `path`; `tune` may add options (tests limit the file's size).
    async fn connect_sqlite(
        path: &str,
        tune: impl FnOnce(SqliteConnectOptions) -> SqliteConnectOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        if let Some(dir) = std::path::Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(store_err)?;
        }
        let file_lock = FileLock::take(std::path::Path::new(path))?;
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(store_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            // Checkpoint the WAL less often than every 1000 pages: fewer stalls.
            .pragma("wal_autocheckpoint", "10000")
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(tune(opts))
            .await
            .map_err(store_err)?;
        Self::start(Pool::Sqlite(pool), metrics, None, Some(file_lock)).await
    }

    async fn connect_pg(
        url: &str,
        metrics: Arc<Metrics>,
        fence: Option<Fence>,
    ) -> Result<Self, Error> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(pg_options(url)?)
            .await
            .map_err(store_err)?;
        Self::start(Pool::Postgres(pool), metrics, fence, None).await
    }

    /// Migrates and starts the writer.
    async fn start(
        pool: Pool,
        metrics: Arc<Metrics>,
        fence: Option<Fence>,
        file_lock: Option<FileLock>,
    ) -> Result<Self, Error> {
        {}
        migrate(&pool).await?;
        let (writer, rx) = mpsc::unbounded_channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let queued = Arc::new(AtomicUsize::new(0));
        let writer_loop = write_loop(
            pool.clone(),
            rx,
            queued.clone(),
            healthy.clone(),
            metrics.clone(),
            fence,
        );
        match &pool {
            // SQLite's connections do their I/O on their own threads: the writer gets
            // a thread of its own too, so a busy actor thread never delays a commit.
            Pool::Sqlite(_) => {
                std::thread::Builder::new()
                    .name("broker-store-writer".into())
                    .spawn(move || {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a current-thread runtime builds")
                            .block_on(writer_loop)
                    })
                    .map_err(store_err)?;
            }
            // PostgreSQL sockets belong to the runtime that opened them.
            Pool::Postgres(_) => {
                tokio::spawn(writer_loop);
            }
        }
        Ok(SqlStore {
            pool,
            writer,
            queued,
            metrics,
            healthy,
            _file_lock: file_lock,
        })
    }

    /// Queues an operation and resolves once the transaction holding it committed.
    ///
    /// The operation is queued now, in call order, not when the future is first polled:
    /// a queue's appends must reach the writer in offset order (a send that waited for
    /// room could be overtaken, and the writer refuses offsets that do not continue the
    /// stored history). A full writer queue is an overload: refused at once (503).
    fn commit(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<(), Error>>) -> Op,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let (done, wait) = oneshot::channel();
        let queued = self.enqueue(op(done), WRITER_QUEUE);
        async move {
            match queued {
                Ok(()) => {}
                Err(Some(_)) => {
                    return Err(Error::Store(format!(
                        "the store's write queue is full ({WRITER_QUEUE} operations waiting); try again"
                    )))
                }
                Err(None) => return Err(Error::ShuttingDown),
            }
            wait.await.map_err(|_| Error::ShuttingDown)?
        }
        .boxed()
    }

    /// Queues `op` behind everything queued before it, if fewer than `bound` wait;
    /// gives it back when there is no room (`Some`), `None` when the writer is gone.
    fn enqueue(&self, op: Op, bound: usize) -> Result<(), Option<Op>> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= bound {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Some(op));
        }
        self.writer.send(op).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            None
        })
    }

    /// Queues an operation nobody waits for, in call order with every other one. Past
    /// [`WRITER_QUEUE_UNAWAITED`] waiting operations it is dropped, logged and counted
    /// (`broker_store_dropped_ops_total`).
    fn send(&self, op: Op) {
        if let Err(Some(op)) = self.enqueue(op, WRITER_QUEUE_UNAWAITED) {
            self.metrics.store_dropped_ops.inc();
            tracing::error!(
                op = op.kind(),
                "the store's write queue is full; an operation nobody waits for was dropped"
            );
        }
    }
}

async fn migrate(pool: &Pool) -> Result<(), Error> {
    let (int, blob) = match pool {
        Pool::Sqlite(_) => ("INTEGER", "BLOB"),
        Pool::Postgres(_) => ("BIGINT", "BYTEA"),
    };
    let create = "CREATE TABLE IF NOT EXISTS broker_migrations (version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)";
    let current: i64 = match pool {
        Pool::Sqlite(p) => {
            sqlx::query(create).execute(p).await.map_err(store_err)?;
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM broker_migrations")
                .fetch_one(p)
                .await
                .map_err(store_err)?
        }
        Pool::Postgres(p) => {
            sqlx::query(create).execute(p).await.map_err(store_err)?;
            let v: i32 =
                sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM broker_migrations")
                    .fetch_one(p)
                    .await
                    .map_err(store_err)?;
            i64::from(v)
        }
    };
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        let sql = sql.replace("{INT}", int).replace("{BLOB}", blob);
        let now = crate::message::now_ms();
        macro_rules! apply {
            ($p:expr) => {{
                let mut tx = $p.begin().await.map_err(store_err)?;
                for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    // Constant DDL with type names filled in: nothing from outside.
                    sqlx::query(sqlx::AssertSqlSafe(stmt.to_owned()))
                        .execute(&mut *tx)
                        .await
                        .map_err(store_err)?;
                }
                sqlx::query(
                    "INSERT INTO broker_migrations (version, applied_at_ms) VALUES ($1, $2)",
                )
                .bind(version as i32)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(store_err)?;
                tx.commit().await.map_err(store_err)?;
            }};
        }
        match pool {
            Pool::Sqlite(p) => apply!(p),
            Pool::Postgres(p) => apply!(p),
        }
        tracing::info!(version, "store migrated");
    }
    Ok(())
}

/// How soon the writer probes the store after a commit failed: readiness follows the
/// store's health, not the last commit (one rejected batch must not leave an idle
/// broker unready).
const PROBE_AFTER_FAILURE: Duration = Duration::from_millis(200);
/// How often it probes while the store is unhealthy.
const PROBE_UNHEALTHY: Duration = Duration::from_secs(1);
/// How often it probes an idle, healthy store (an outage is seen without traffic).
const PROBE_IDLE: Duration = Duration::from_secs(5);

/// Applies waiting operations in one transaction per batch, and probes the store with a
/// small write transaction when it is idle or unhealthy. `healthy` is the outcome of
/// the last transaction, batch or probe.
///
/// A connection whose transaction failed is closed, never reused: a failed `COMMIT`
/// (SQLite's `SQLITE_FULL`, `SQLITE_BUSY`) can leave its transaction open, and a later
/// `BEGIN` on it would only open a savepoint whose "commit" reaches nothing. Every
/// transaction starts with an explicit `BEGIN` that the database itself refuses inside
/// a transaction, so a connection not back in autocommit is never written through.
async fn write_loop(
    pool: Pool,
    mut rx: mpsc::UnboundedReceiver<Op>,
    queued: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    fence: Option<Fence>,
) {
    let fence = fence.map(|f| f.generation());
    let mut sqlite = None;
    let mut pg = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut next_probe = tokio::time::Instant::now() + PROBE_IDLE;
    loop {
        let probe = tokio::select! {
            n = rx.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    break;
                }
                queued.fetch_sub(n, Ordering::AcqRel);
                false
            }
            _ = tokio::time::sleep_until(next_probe) => {
                batch.push(Op::Probe);
                true
            }
        };
        let started = Instant::now();
        macro_rules! apply {
            ($conn:ident, $p:expr, $apply:path, $ops:expr) => {{
                let conn = match $conn.take() {
                    Some(c) => Ok(c),
                    None => $p.acquire().await,
                };
                match conn {
                    Ok(mut c) => {
                        let r = $apply(&mut c, $ops, fence).await;
                        if r.is_ok() {
                            $conn = Some(c);
                        } else {
                            // Closed, not returned to the pool.
                            c.close_on_drop();
                        }
                        r
                    }
                    Err(e) => Err(e),
                }
            }};
        }
        let result = match &pool {
            Pool::Sqlite(p) => apply!(sqlite, p, apply_sqlite, &batch),
            Pool::Postgres(p) => apply!(pg, p, apply_pg, &batch),
        };
        if !probe {
            metrics
                .store_commit
                .observe(started.elapsed().as_secs_f64());
            metrics.store_batch.observe(batch.len() as f64);
        }
        if let Err(e) = &result {
            metrics.store_errors.inc();
            if probe {
                tracing::warn!(error = %e, "store probe failed");
            } else {
                tracing::error!(error = %e, ops = batch.len(), "store commit failed");
            }
        }
        // One failed batch: each operation again on its own, so that one bad operation
        // (a value the database refuses) fails alone, not everyone's writes with it.
        let outcomes: Vec<Result<(), String>> = match &result {
            Ok(()) => vec![Ok(()); batch.len()],
            Err(e) if probe || batch.len() == 1 => vec![Err(e.to_string()); batch.len()],
            Err(e) => {
                let mut outcomes = Vec::with_capacity(batch.len());
                let mut failing = 0;
                let mut last = e.to_string();
                for op in &batch {
                    if failing >= FAILURES_BEFORE_GIVING_UP {
                        // The store itself is failing, not one operation.
                        outcomes.push(Err(last.clone()));
                        continue;
                    }
                    let one = std::slice::from_ref(op);
                    let r = match &pool {
                        Pool::Sqlite(p) => apply!(sqlite, p, apply_sqlite, one),
                        Pool::Postgres(p) => apply!(pg, p, apply_pg, one),
                    };
                    match r {
                        Ok(()) => {
                            failing = 0;
                            outcomes.push(Ok(()));
                        }
                        Err(e) => {
                            failing += 1;
                            last = e.to_string();
                            outcomes.push(Err(last.clone()));
                        }
                    }
                }
                outcomes
            }
        };
        let ok = outcomes.iter().all(Result::is_ok);
        // Readiness follows the store, not one refused value: healthy if anything of a
        // failed batch went through on its own.
        let healthy_now = ok || (!probe && outcomes.iter().any(Result::is_ok));
        if healthy.swap(healthy_now, Ordering::AcqRel) != healthy_now {
            if healthy_now {
                tracing::info!("store healthy again");
            } else {
                tracing::warn!("store unhealthy: publishes are refused until a write succeeds");
            }
        }
        next_probe = tokio::time::Instant::now()
            + match (healthy_now, probe) {
                (true, _) => PROBE_IDLE,
                (false, false) => PROBE_AFTER_FAILURE,
                (false, true) => PROBE_UNHEALTHY,
            };
        for (op, outcome) in batch.drain(..).zip(outcomes) {
            let reply = outcome.clone().map_err(Error::Store);
            match op {
                Op::Append { done, .. }
                | Op::Schedule { done, .. }
                | Op::SetCursor { done, .. }
                | Op::SetState { done, .. } => {
                    let _ = done.send(reply);
                }
                Op::Probe => {}
                other => {
                    if let Err(e) = outcome {
                        // Nobody waits for it: never lost without a word.
                        metrics.store_dropped_ops.inc();
                        tracing::error!(op = other.kind(), error = %e, "a store operation nobody waits for failed and was dropped");
                    }
                }
            }
        }
    }
}

impl Op {
    /// What it is, for logs.
    fn kind(&self) -> &'static str {
        match self {
            Op::Append { .. } => "append",
            Op::Schedule { .. } => "schedule",
            Op::Trim { .. } => "trim",
            Op::SaveConsumer(_) => "save_consumer",
            Op::SaveAttempt { .. } => "save_attempt",
            Op::ClearAttempt { .. } => "clear_attempt",
            Op::RemoveConsumer { .. } => "remove_consumer",
            Op::SetState { .. } => "set_state",
            Op::SetCursor { .. } => "set_cursor",
            Op::RemoveCursor { .. } => "remove_cursor",
            Op::Remove { .. } => "remove_queue",
            Op::Probe => "probe",
            Op::SetEpoch { .. } => "set_epoch",
        }
    }
}

fn headers_json(m: &Message) -> String {
    if m.headers.is_empty() {
        return "[]".to_owned();
    }
    serde_json::to_string(&m.headers).expect("string pairs serialize")
}

/// Rows per INSERT statement (6 binds each: far below both backends' limits).
const ROWS_PER_INSERT: usize = 500;

macro_rules! apply_ops {
    ($name:ident, $db:ty, $begin:expr) => {
        pub(super) async fn $name(
            conn: &mut sqlx::pool::PoolConnection<$db>,
            ops: &[Op],
            fence: Option<i64>,
        ) -> Result<(), sqlx::Error> {
            // `begin_with` fails unless both sqlx and the database say the connection
            // is in autocommit.
            let mut tx = sqlx::Connection::begin_with(&mut **conn, $begin).await?;
            if let Some(mine) = fence {
                // Holds the fence row (shared) until this transaction ends: a broker
                // that takes the active lock bumps it, and waits for this commit first.
                let current: i64 = sqlx::query_scalar(FENCE_CHECK).fetch_one(&mut *tx).await?;
                if current != mine {
                    return Err(sqlx::Error::InvalidArgument(format!(
                        "fenced: another broker took the database's active lock (generation {current}, this broker's {mine}); nothing is written"
                    )));
                }
            }
            // Appends are gathered per queue and written as multi-row INSERTs (one
            // statement per few hundred rows, not one per message); any other operation
            // on a queue first flushes that queue's gathered appends, so per-queue order
            // is kept.
            let mut pending: Vec<(&str, Vec<&Arc<Message>>)> = Vec::new();
            let mut trims: Vec<(&str, u64)> = Vec::new();
            async fn flush(
                tx: &mut sqlx::Transaction<'_, $db>,
                queue: &str,
                rows: &[&Arc<Message>],
            ) -> Result<(), sqlx::Error> {
                let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                    return Ok(());
                };
                let contiguous = rows
                    .iter()
                    .enumerate()
                    .all(|(i, m)| m.offset == first.offset + i as u64);
                // Offsets only ever continue the stored history: a commit reported as
                // failed (or another writer) cannot leave a gap or be written over.
                let moved = sqlx::query(ADVANCE_NEXT)
                    .bind(queue)
                    .bind(first.offset as i64)
                    .bind(last.offset as i64 + 1)
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
                if !contiguous || moved != 1 {
                    return Err(sqlx::Error::InvalidArgument(format!(
                        "queue `{queue}`: offsets {}..={} do not continue the stored history",
                        first.offset, last.offset
                    )));
                }
                for chunk in rows.chunks(ROWS_PER_INSERT) {
                    // sqlx's builder takes owned binds: the one copy a body makes here.
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO messages (queue, pos, body, content_type, headers, received_at_ms, idem) ",
                    );
                    qb.push_values(chunk.iter(), |mut b, m| {
                        b.push_bind(queue.to_owned())
                            .push_bind(m.offset as i64)
                            .push_bind(m.body.to_vec())
                            .push_bind(m.content_type.as_deref().map(str::to_owned))
                            .push_bind(headers_json(m))
                            .push_bind(m.received_at_ms)
                            .push_bind(m.id.as_deref().map(str::to_owned));
                    });
                    qb.build().execute(&mut **tx).await?;
                }
                Ok(())
            }
            macro_rules! flush_queue {
                ($queue:expr) => {
                    if let Some(i) = pending.iter().position(|(q, _)| *q == $queue) {
                        let (q, rows) = pending.remove(i);
                        flush(&mut tx, q, &rows).await?;
                    }
                };
            }
            for op in ops {
                match op {
                    Op::Append { queue, messages, released, .. } => {
                        match pending.iter_mut().find(|(q, _)| *q == queue.as_str()) {
                            Some((_, rows)) => rows.extend(messages.iter()),
                            None => pending.push((queue.as_str(), messages.iter().collect())),
                        }
                        for id in released {
                            let gone = sqlx::query("DELETE FROM delayed WHERE queue = $1 AND id = $2")
                                .bind(queue.as_str())
                                .bind(*id as i64)
                                .execute(&mut *tx)
                                .await?
                                .rows_affected();
                            // Released twice would publish it twice: refused.
                            if gone != 1 {
                                return Err(sqlx::Error::InvalidArgument(format!(
                                    "queue `{queue}`: delayed message {id} is not stored (released already?)"
                                )));
                            }
                        }
                    }
                    Op::Schedule { queue, delayed, .. } => {
                        for d in delayed {
                            let headers = serde_json::to_string(&d.message.headers).expect("string pairs serialize");
                            sqlx::query("INSERT INTO delayed (queue, id, at_ms, body, content_type, headers) VALUES ($1, $2, $3, $4, $5, $6)")
                                .bind(queue.as_str())
                                .bind(d.id as i64)
                                .bind(d.at_ms)
                                .bind(d.message.body.to_vec())
                                .bind(d.message.content_type.as_deref().map(str::to_owned))
                                .bind(headers)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                    Op::Trim { queue, first_kept } => {
                        // A trim only removes acknowledged messages, never an append
                        // still waiting in this batch: trims of a queue are coalesced
                        // into one DELETE at the end (a queue at its limit sends one
                        // per publish).
                        match trims.iter_mut().find(|(q, _)| *q == queue.as_str()) {
                            Some((_, kept)) => *kept = (*kept).max(*first_kept),
                            None => trims.push((queue.as_str(), *first_kept)),
                        }
                    }
                    Op::SaveAttempt { queue, target, attempt } => {
                        sqlx::query("INSERT INTO delivery_attempts (queue, target, pos, attempts, next_attempt_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (queue, target, pos) DO UPDATE SET attempts = excluded.attempts, next_attempt_ms = excluded.next_attempt_ms")
                            .bind(queue.as_str())
                            .bind(target.as_str())
                            .bind(attempt.offset as i64)
                            .bind(i64::from(attempt.attempts))
                            .bind(attempt.next_attempt_ms)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Op::ClearAttempt { queue, target, offset } => {
                        sqlx::query("DELETE FROM delivery_attempts WHERE queue = $1 AND target = $2 AND pos = $3")
                            .bind(queue.as_str())
                            .bind(target.as_str())
                            .bind(*offset as i64)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Op::SaveConsumer(c) => {
                        sqlx::query("INSERT INTO consumers (username, client, queue, last_seen) VALUES ($1, $2, $3, $4) ON CONFLICT (username, client) DO UPDATE SET queue = excluded.queue, last_seen = excluded.last_seen")
                            .bind(c.user.as_str())
                            .bind(c.client.as_str())
                            .bind(c.queue.as_str())
                            .bind(c.last_seen as i64)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Op::RemoveConsumer { user, client } => {
                        sqlx::query("DELETE FROM consumers WHERE username = $1 AND client = $2")
                            .bind(user.as_str())
                            .bind(client.as_str())
                            .execute(&mut *tx)
                            .await?;
                    }
                    Op::SetState { key, value, .. } => {
                        sqlx::query(UPSERT_STATE)
                            .bind(key.as_str())
                            .bind(value.as_str())
                            .execute(&mut *tx)
                            .await?;
                    }
                    Op::SetEpoch { queue, epoch } => {
                        let changed = sqlx::query("UPDATE queues SET epoch = $2 WHERE name = $1")
                            .bind(queue.as_str())
                            .bind(epoch.as_str())
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                        if changed != 1 {
                            return Err(sqlx::Error::InvalidArgument(format!(
                                "queue `{queue}` is not stored: its epoch cannot change"
                            )));
                        }
                    }
                    Op::Probe => {
                        sqlx::query(UPSERT_STATE)
                            .bind(PROBE_KEY)
                            .bind(crate::message::now_ms().to_string())
                            .execute(&mut *tx)
                            .await?;
                    }
                    Op::SetCursor { queue, target, offset, .. } => {
                        sqlx::query(UPSERT_CURSOR)
                            .bind(queue.as_str())
                            .bind(target.as_str())
                            .bind(*offset as i64)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Op::RemoveCursor { queue, target } => {
                        for sql in [
                            "DELETE FROM delivery_cursors WHERE queue = $1 AND target = $2",
                            "DELETE FROM delivery_attempts WHERE queue = $1 AND target = $2",
                        ] {
                            sqlx::query(sql)
                                .bind(queue.as_str())
                                .bind(target.as_str())
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                    Op::Remove { queue } => {
                        flush_queue!(queue.as_str());
                        trims.retain(|(q, _)| *q != queue.as_str());
                        for sql in [
                            "DELETE FROM messages WHERE queue = $1",
                            "DELETE FROM delivery_cursors WHERE queue = $1",
                            "DELETE FROM delayed WHERE queue = $1",
                            "DELETE FROM delivery_attempts WHERE queue = $1",
                        ] {
                            sqlx::query(sql).bind(queue.as_str()).execute(&mut *tx).await?;
                        }
                        sqlx::query("DELETE FROM queues WHERE name = $1")
                            .bind(queue.as_str())
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
            for (q, rows) in std::mem::take(&mut pending) {
                flush(&mut tx, q, &rows).await?;
            }
            for (q, first_kept) in trims {
                sqlx::query("DELETE FROM messages WHERE queue = $1 AND pos < $2")
                    .bind(q)
                    .bind(first_kept as i64)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        }
    };
}

const UPSERT_CURSOR: &str = "INSERT INTO delivery_cursors (queue, target, pos) VALUES ($1, $2, $3) ON CONFLICT (queue, target) DO UPDATE SET pos = excluded.pos";
const UPSERT_STATE: &str = "INSERT INTO broker_state (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value";
/// Moves a queue's next offset only from where this writer expects it.
const ADVANCE_NEXT: &str =
    "UPDATE queues SET next_offset = $3 WHERE name = $1 AND next_offset = $2";
/// The key the writer's probe transactions write.
const PROBE_KEY: &str = "broker.probe";

mod sqlite_ops {
    use super::*;
    // IMMEDIATE: the write lock is taken at the start, never upgraded mid-transaction.
    apply_ops!(apply, sqlx::Sqlite, "BEGIN IMMEDIATE");
}
mod pg_ops {
    use super::*;
    apply_ops!(apply, sqlx::Postgres, "BEGIN");
}
use pg_ops::apply as apply_pg;
use sqlite_ops::apply as apply_sqlite;

/// A queue's row (created if missing): its epoch and next offset. Stored cursors (a
/// webhook target's, a poll consumer's) beyond the stored history prove that history
/// was lost (e.g. a file restored from an older copy): the queue then starts a new
/// epoch, with offsets continuing past every cursor so none of them skips new messages.
macro_rules! queue_row {
    ($p:expr, $queue:expr) => {{
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT epoch, next_offset FROM queues WHERE name = $1")
                .bind($queue)
                .fetch_optional($p)
                .await
                .map_err(store_err)?;
        match row {
            Some((epoch, next)) => {
                let beyond: Option<i64> = sqlx::query_scalar(CURSORS_BEYOND)
                    .bind($queue)
                    .bind(next - 1)
                    .fetch_one($p)
                    .await
                    .map_err(store_err)?;
                match beyond {
                    None => (epoch, next),
                    Some(cursor) => {
                        let epoch = random_epoch().to_string();
                        tracing::error!(
                            queue = $queue,
                            stored_next_offset = next,
                            cursor,
                            %epoch,
                            "the stored history is older than its cursors (restored from an older copy?): new epoch, readers will be told to refresh"
                        );
                        sqlx::query("UPDATE queues SET epoch = $2, next_offset = $3 WHERE name = $1")
                            .bind($queue)
                            .bind(&epoch)
                            .bind(cursor + 1)
                            .execute($p)
                            .await
                            .map_err(store_err)?;
                        (epoch, cursor + 1)
                    }
                }
            }
            None => {
                let epoch = random_epoch().to_string();
                sqlx::query("INSERT INTO queues (name, epoch, next_offset) VALUES ($1, $2, 1)")
                    .bind($queue)
                    .bind(&epoch)
                    .execute($p)
                    .await
                    .map_err(store_err)?;
                (epoch, 1)
            }
        }
    }};
}

/// The highest cursor of a queue above `$2` (its newest stored offset), if any.
const CURSORS_BEYOND: &str = "SELECT MAX(v) FROM (
    SELECT MAX(pos) AS v FROM delivery_cursors WHERE queue = $1 AND pos > $2
    UNION ALL SELECT MAX(last_seen) AS v FROM consumers WHERE queue = $1 AND last_seen > $2) AS beyond";

/// A queue's stored messages after offset `$after`, oldest first.
macro_rules! messages_after {
    ($p:expr, $queue:expr, $after:expr) => {{
        let rows = sqlx::query("SELECT pos, body, content_type, headers, received_at_ms, idem FROM messages WHERE queue = $1 AND pos > $2 ORDER BY pos")
            .bind($queue)
            .bind($after as i64)
            .fetch_all($p)
            .await
            .map_err(store_err)?;
        let name: Arc<str> = Arc::from($queue);
        rows.into_iter()
            .map(|r| {
                let body: Vec<u8> = r.get(1);
                let content_type: Option<String> = r.get(2);
                let headers: String = r.get(3);
                let id: Option<String> = r.get(5);
                Arc::new(Message {
                    content_type: content_type.map(Arc::from),
                    headers: serde_json::from_str(&headers).unwrap_or_default(),
                    received_at_ms: r.get(4),
                    id: id.map(Arc::from),
                    ..Message::new(name.clone(), r.get::<i64, _>(0) as u64, Bytes::from(body))
                })
            })
            .collect::<Vec<_>>()
    }};
}

macro_rules! open_queue {
    ($p:expr, $queue:expr) => {{
        let (epoch, next_offset) = queue_row!($p, $queue);
        let messages = messages_after!($p, $queue, 0u64);
        let delayed = sqlx::query("SELECT id, at_ms, body, content_type, headers FROM delayed WHERE queue = $1 ORDER BY id")
            .bind($queue)
            .fetch_all($p)
            .await
            .map_err(store_err)?
            .into_iter()
            .map(|r| {
                let body: Vec<u8> = r.get(2);
                let content_type: Option<String> = r.get(3);
                let headers: String = r.get(4);
                StoredDelayed {
                    id: r.get::<i64, _>(0) as u64,
                    at_ms: r.get(1),
                    message: NewMessage {
                        id: None,
                        audience: None,
                        body: Bytes::from(body),
                        content_type: content_type.map(Arc::from),
                        headers: serde_json::from_str(&headers).unwrap_or_default(),
                    },
                }
            })
            .collect();
        Ok(StoredQueue {
            epoch: Arc::from(epoch),
            messages,
            next_offset: next_offset as u64,
            delayed,
        })
    }};
}

macro_rules! tail_queue {
    ($p:expr, $queue:expr, $after:expr) => {{
        let (epoch, next_offset) = queue_row!($p, $queue);
        let messages = messages_after!($p, $queue, $after);
        Ok(StoredTail {
            epoch: Arc::from(epoch),
            messages,
            next_offset: next_offset as u64,
        })
    }};
}

macro_rules! read_cursor {
    ($p:expr, $queue:expr, $target:expr) => {{
        let v: Option<i64> =
            sqlx::query_scalar("SELECT pos FROM delivery_cursors WHERE queue = $1 AND target = $2")
                .bind($queue)
                .bind($target)
                .fetch_optional($p)
                .await
                .map_err(store_err)?;
        Ok(v.map(|v| v as u64))
    }};
}

impl Store for SqlStore {
    fn open(&self, queue: &str) -> BoxFuture<'static, Result<StoredQueue, Error>> {
        let (pool, queue) = (self.pool.clone(), queue.to_owned());
        async move {
            match &pool {
                Pool::Sqlite(p) => open_queue!(p, queue.as_str()),
                Pool::Postgres(p) => open_queue!(p, queue.as_str()),
            }
        }
        .detached()
    }

    fn tail(&self, queue: &str, after: u64) -> BoxFuture<'static, Result<StoredTail, Error>> {
        let (pool, queue) = (self.pool.clone(), queue.to_owned());
        async move {
            match &pool {
                Pool::Sqlite(p) => tail_queue!(p, queue.as_str(), after),
                Pool::Postgres(p) => tail_queue!(p, queue.as_str(), after),
            }
        }
        .detached()
    }

    fn append(
        &self,
        queue: &str,
        messages: Vec<Arc<Message>>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let queue = queue.to_owned();
        self.commit(|done| Op::Append {
            queue,
            messages,
            released: Vec::new(),
            done,
        })
    }

    fn schedule(
        &self,
        queue: &str,
        delayed: Vec<StoredDelayed>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let queue = queue.to_owned();
        self.commit(|done| Op::Schedule {
            queue,
            delayed,
            done,
        })
    }

    fn release(
        &self,
        queue: &str,
        messages: Vec<Arc<Message>>,
        ids: Vec<u64>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let queue = queue.to_owned();
        self.commit(|done| Op::Append {
            queue,
            messages,
            released: ids,
            done,
        })
    }

    fn trim(&self, queue: &str, first_kept: u64) {
        self.send(Op::Trim {
            queue: queue.to_owned(),
            first_kept,
        });
    }

    fn remove(&self, queue: &str) {
        self.send(Op::Remove {
            queue: queue.to_owned(),
        });
    }

    fn set_epoch(&self, queue: &str, epoch: &str) {
        self.send(Op::SetEpoch {
            queue: queue.to_owned(),
            epoch: epoch.to_owned(),
        });
    }

    fn delivery_cursor(
        &self,
        queue: &str,
        target: &str,
    ) -> BoxFuture<'static, Result<Option<u64>, Error>> {
        let (pool, queue, target) = (self.pool.clone(), queue.to_owned(), target.to_owned());
        async move {
            match &pool {
                Pool::Sqlite(p) => read_cursor!(p, queue.as_str(), target.as_str()),
                Pool::Postgres(p) => read_cursor!(p, queue.as_str(), target.as_str()),
            }
        }
        .detached()
    }

    fn set_delivery_cursor(
        &self,
        queue: &str,
        target: &str,
        offset: u64,
    ) -> BoxFuture<'static, Result<(), Error>> {
        let (queue, target) = (queue.to_owned(), target.to_owned());
        self.commit(|done| Op::SetCursor {
            queue,
            target,
            offset,
            done,
        })
    }

    fn pending_attempts(
        &self,
        queue: &str,
        target: &str,
    ) -> BoxFuture<'static, Result<Vec<StoredAttempt>, Error>> {
        let (pool, queue, target) = (self.pool.clone(), queue.to_owned(), target.to_owned());
        async move {
            let q = "SELECT pos, attempts, next_attempt_ms FROM delivery_attempts WHERE queue = $1 AND target = $2 ORDER BY pos";
            let rows: Vec<(i64, i64, i64)> = match &pool {
                Pool::Sqlite(p) => sqlx::query_as(q).bind(queue).bind(target).fetch_all(p).await,
                Pool::Postgres(p) => sqlx::query_as(q).bind(queue).bind(target).fetch_all(p).await,
            }
            .map_err(store_err)?;
            Ok(rows
                .into_iter()
                .map(|(pos, attempts, next)| StoredAttempt {
                    offset: pos as u64,
                    attempts: attempts as u32,
                    next_attempt_ms: next,
                })
                .collect())
        }
        .detached()
    }

    fn save_attempt(&self, queue: &str, target: &str, attempt: StoredAttempt) {
        self.send(Op::SaveAttempt {
            queue: queue.to_owned(),
            target: target.to_owned(),
            attempt,
        });
    }

    fn clear_attempt(&self, queue: &str, target: &str, offset: u64) {
        self.send(Op::ClearAttempt {
            queue: queue.to_owned(),
            target: target.to_owned(),
            offset,
        });
    }

    fn consumers(&self) -> BoxFuture<'static, Result<Vec<StoredConsumer>, Error>> {
        let pool = self.pool.clone();
        async move {
            let q = "SELECT username, client, queue, last_seen FROM consumers";
            let rows = match &pool {
                Pool::Sqlite(p) => sqlx::query(q).fetch_all(p).await.map(|rows| {
                    rows.into_iter()
                        .map(|r| (r.get(0), r.get(1), r.get(2), r.get::<i64, _>(3)))
                        .collect::<Vec<(String, String, String, i64)>>()
                }),
                Pool::Postgres(p) => sqlx::query(q).fetch_all(p).await.map(|rows| {
                    rows.into_iter()
                        .map(|r| (r.get(0), r.get(1), r.get(2), r.get::<i64, _>(3)))
                        .collect::<Vec<(String, String, String, i64)>>()
                }),
            }
            .map_err(store_err)?;
            Ok(rows
                .into_iter()
                .map(|(user, client, queue, last_seen)| StoredConsumer {
                    user,
                    client,
                    queue,
                    last_seen: last_seen as u64,
                })
                .collect())
        }
        .detached()
    }

    fn save_consumer(&self, consumer: StoredConsumer) {
        self.send(Op::SaveConsumer(consumer));
    }

    fn remove_consumer(&self, user: &str, client: &str) {
        self.send(Op::RemoveConsumer {
            user: user.to_owned(),
            client: client.to_owned(),
        });
    }

    fn state(&self, key: &str) -> BoxFuture<'static, Result<Option<String>, Error>> {
        let (pool, key) = (self.pool.clone(), key.to_owned());
        async move {
            let q = "SELECT value FROM broker_state WHERE key = $1";
            let v: Option<String> = match &pool {
                Pool::Sqlite(p) => sqlx::query_scalar(q).bind(key).fetch_optional(p).await,
                Pool::Postgres(p) => sqlx::query_scalar(q).bind(key).fetch_optional(p).await,
            }
            .map_err(store_err)?;
            Ok(v)
        }
        .detached()
    }

    fn set_state(&self, key: &str, value: String) -> BoxFuture<'static, Result<(), Error>> {
        let key = key.to_owned();
        self.commit(|done| Op::SetState { key, value, done })
    }

    fn remove_delivery_cursor(&self, queue: &str, target: &str) {
        self.send(Op::RemoveCursor {
            queue: queue.to_owned(),
            target: target.to_owned(),
        });
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(queue: &str, offset: u64) -> Arc<Message> {
        Arc::new(Message {
            received_at_ms: 0,
            ..Message::new(Arc::from(queue), offset, Bytes::from(format!("m{offset}")))
        })
    }

    fn append(queue: &str, offsets: std::ops::RangeInclusive<u64>) -> Op {
        Op::Append {
            queue: queue.into(),
            messages: offsets.map(|o| msg(queue, o)).collect(),
            released: Vec::new(),
            done: oneshot::channel().0,
        }
    }

    fn trim(queue: &str, first_kept: u64) -> Op {
        Op::Trim {
            queue: queue.into(),
            first_kept,
        }
    }

    async fn sqlite_store(dir: &tempfile::TempDir) -> SqlStore {
        let url = format!("sqlite://{}/t.db", dir.path().display());
        SqlStore::connect(&url, Arc::new(Metrics::new()), None)
            .await
            .unwrap()
    }

    /// Trims of one batch are merged, and a trim sent before a queue was removed never
    /// reaches the messages of the queue created again under that name.
    #[actix::test]
    async fn trims_in_one_batch_are_merged_and_end_at_a_removal() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir).await;
        let Pool::Sqlite(pool) = &store.pool else {
            unreachable!()
        };
        store.open("a").await.unwrap();
        store.open("b").await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        let batch = vec![
            append("a", 1..=5),
            trim("a", 2),
            append("a", 6..=6),
            trim("a", 4),
            trim("a", 3),
            append("b", 1..=8),
            trim("b", 7),
            Op::Remove { queue: "b".into() },
            trim("b", 2),
        ];
        apply_sqlite(&mut conn, &batch, None).await.unwrap();
        store.open("b").await.unwrap();
        apply_sqlite(&mut conn, &[append("b", 1..=3), trim("b", 2)], None)
            .await
            .unwrap();
        let sql = "SELECT pos FROM messages WHERE queue = $1 ORDER BY pos";
        for (queue, kept) in [("a", vec![4, 5, 6]), ("b", vec![2, 3])] {
            let rows: Vec<i64> = sqlx::query_scalar(sql)
                .bind(queue)
                .fetch_all(pool)
                .await
                .unwrap();
            assert_eq!(rows, kept, "queue {queue}");
        }
    }

    /// An append must continue the stored history: not skip past it (an earlier commit
    /// failed), not write over it (another writer), not leave a hole inside a batch.
    #[actix::test]
    async fn appends_that_do_not_continue_the_stored_history_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir).await;
        store.open("q").await.unwrap();
        store
            .append("q", (1..=2).map(|o| msg("q", o)).collect())
            .await
            .unwrap();
        for offsets in [vec![4], vec![2], vec![3, 5]] {
            let batch = offsets.iter().map(|o| msg("q", *o)).collect();
            let err = store.append("q", batch).await.unwrap_err();
            assert!(
                err.to_string()
                    .contains("do not continue the stored history"),
                "{offsets:?}: {err}"
            );
        }
        store.append("q", vec![msg("q", 3)]).await.unwrap();
        let tail = store.tail("q", 1).await.unwrap();
        let offsets: Vec<u64> = tail.messages.iter().map(|m| m.offset).collect();
        assert_eq!((offsets, tail.next_offset), (vec![2, 3], 4));
    }

    /// The full disk: SQLite refuses writes past `max_page_count` with SQLITE_FULL
    /// (the end-to-end test fills a real file system). Every refused append stays
    /// refused (no later "commit" of a savepoint on a connection left inside a failed
    /// transaction), and a new store (a restart) finds exactly what was acknowledged and
    /// goes on from there.
    #[actix::test]
    async fn a_full_database_acknowledges_nothing_it_does_not_keep() {
        let dir = tempfile::tempdir().unwrap();
        let path = format!("{}/t.db", dir.path().display());
        let store = SqlStore::connect_sqlite(
            &path,
            |o| o.pragma("max_page_count", "40"),
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap();
        store.open("q").await.unwrap();
        let big = |o: u64| {
            let mut m = (*msg("q", o)).clone();
            m.body = Bytes::from(vec![b'x'; 3000]);
            Arc::new(m)
        };
        let (mut next, mut acked, mut refused) = (1u64, Vec::new(), 0);
        while refused < 50 {
            match store.append("q", vec![big(next)]).await {
                Ok(()) => {
                    assert_eq!(refused, 0, "acknowledged after a refusal, offset {next}");
                    acked.push(next);
                    next += 1;
                }
                Err(e) => {
                    assert!(e.to_string().contains("full"), "{e}");
                    refused += 1;
                }
            }
            assert!(next < 1000, "the limit never bit");
        }
        assert!(acked.len() > 3, "{acked:?}");
        assert!(!store.healthy());
        drop(store);
        // The writer thread lets go of the file lock with the store: wait for it.
        let store = loop {
            match SqlStore::connect(&format!("sqlite://{path}"), Arc::new(Metrics::new()), None)
                .await
            {
                Ok(s) => break s,
                Err(e) => {
                    assert!(e.to_string().contains("in use"), "{e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        let back = store.open("q").await.unwrap();
        let offsets: Vec<u64> = back.messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, acked);
        assert_eq!(back.next_offset, next);
        store.append("q", vec![big(next)]).await.unwrap();
    }

    /// Stored cursors beyond the stored history (the messages were lost, the cursors
    /// not) give the queue a new epoch at open, offsets continuing past every cursor.
    #[actix::test]
    async fn cursors_beyond_the_stored_history_start_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir).await;
        let before = store.open("q").await.unwrap();
        store
            .append("q", (1..=2).map(|o| msg("q", o)).collect())
            .await
            .unwrap();
        store
            .set_delivery_cursor("q", "http://t/1", 7)
            .await
            .unwrap();
        store.save_consumer(StoredConsumer {
            user: "u".into(),
            client: "c".into(),
            queue: "q".into(),
            last_seen: 9,
        });
        store.set_state("barrier", String::new()).await.unwrap();
        let after = store.open("q").await.unwrap();
        assert_ne!(after.epoch, before.epoch);
        assert_eq!((after.next_offset, after.messages.len()), (10, 2));
        let again = store.open("q").await.unwrap();
        assert_eq!(again.epoch, after.epoch, "once, not at every open");
    }

    /// A second store on one SQLite file is refused, naming the file and the holder.
    #[actix::test]
    async fn a_second_store_on_one_sqlite_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = sqlite_store(&dir).await;
        let url = format!("sqlite://{}/t.db", dir.path().display());
        let err = SqlStore::connect(&url, Arc::new(Metrics::new()), None)
            .await
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("t.db") && msg.contains(&format!("process {}", std::process::id())),
            "{msg}"
        );
    }
}
