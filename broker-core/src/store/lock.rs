//! One active broker per PostgreSQL database.
//!
//! Several `broker serve` processes may point at one database (a hot standby, or the
//! Helm chart's `ha` profile), but a broker keeps each queue's log, offsets, cursors and
//! timers in its own memory: two brokers writing one database would hand out the same
//! offsets and deliver every webhook twice. So a broker on PostgreSQL takes a
//! session-level advisory lock on a connection of its own before it opens the store;
//! the others wait as standbys and take over when the holder's session ends (its process
//! exits, is killed, or its node is lost).
//!
//! The holder checks its session every [`CHECK_EVERY`] and must stop serving at once
//! when a check fails or takes longer than [`CHECK_TIMEOUT`]: from then on another broker
//! may hold the lock. The session has server-side TCP keepalives (the store's session
//! settings), so the database notices a vanished holder after about 11 s, later than
//! the holder notices (at most 4 s): the old holder is gone before a standby can take
//! over.
//!
//! Noticing is not enough on its own: between the moment the database ends the holder's
//! lock session and the moment the holder's check fails, the holder could still commit
//! through its other connections. So taking the lock also bumps a **fence**, a
//! generation number in the one-row table `broker_fence`, and every write transaction
//! of the store first reads that row `FOR SHARE` and refuses to write if the generation
//! is not the one its broker got (see `sql.rs`). The new holder first ends any session
//! that is inside such a transaction (a paused old holder would otherwise hold the row
//! until the database times it out), and the bump waits for a transaction that holds
//! the row; every later transaction of the old holder sees the new generation: nothing
//! is acknowledged by a broker that no longer holds the lock.
//!
//! A broker that cannot reach the database at start waits and retries with backoff
//! (unready, saying why), as it would behind a supervisor, but without exiting.
//!
//! SQLite has no such sharing: a second broker on one file is refused at start by an OS
//! lock ([`FileLock`]).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use crate::error::Error;

/// The check each write transaction starts with on a fenced store.
pub(super) const FENCE_CHECK: &str = "SELECT generation FROM broker_fence WHERE id = 1 FOR SHARE";
/// First wait after a failed connection at start; it doubles up to [`CONNECT_BACKOFF_MAX`].
const CONNECT_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between connection attempts at start.
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The generation a broker got when it took the active lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence(i64);

impl Fence {
    /// The generation number.
    pub fn generation(self) -> i64 {
        self.0
    }
}

/// An exclusive OS lock (`flock`) on `PATH.lock` beside a SQLite file, held while the
/// value lives; the file holds the holder's process id for the refusal message.
pub(super) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Takes the lock of the database file `db`, or fails naming the file and the
    /// process that holds it.
    pub(super) fn take(db: &Path) -> Result<Self, Error> {
        let mut path = PathBuf::from(db.as_os_str());
        path.as_mut_os_string().push(".lock");
        let err = |e: std::io::Error| Error::Store(format!("{}: {e}", path.display()));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    format!("process {holder}")
                };
                return Err(Error::Store(format!(
                    "the SQLite file {} is in use by {holder} (lock {}); two brokers must not share one SQLite file",
                    db.display(),
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
        }
        file.set_len(0).map_err(err)?;
        file.rewind().map_err(err)?;
        write!(file, "{}", std::process::id()).map_err(err)?;
        Ok(FileLock { _file: file })
    }
}

/// The advisory lock of `broker serve` ("broker" in ASCII). Advisory locks are per
/// database: one broker deployment per database.
pub const ACTIVE_LOCK_KEY: i64 = 0x6272_6f6b_6572;
/// How often a standby asks for the lock.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How often the holder checks its session.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest a check may take before the lock counts as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Session settings of every PostgreSQL connection the broker opens. When a broker's
/// node vanishes, the database must end its sessions soon — the lock's (so a standby
/// can take over) and the writer's (whose row locks would otherwise block the new
/// active broker for as long as the kernel's default keepalive, hours): server-side TCP
/// keepalives end a silent session after about 5 + 2 × 3 = 11 s, and a session idle
/// inside a transaction (the writer's take milliseconds) is ended after a minute.
const PG_SESSION: [(&str, &str); 4] = [
    ("tcp_keepalives_idle", "5"),
    ("tcp_keepalives_interval", "2"),
    ("tcp_keepalives_count", "3"),
    ("idle_in_transaction_session_timeout", "60000"),
];

/// Connect options for a `postgres://` URL, with [`PG_SESSION`].
pub(super) fn pg_options(url: &str) -> Result<PgConnectOptions, Error> {
    Ok(PgConnectOptions::from_str(url)
        .map_err(|e| Error::Store(e.to_string()))?
        .options(PG_SESSION))
}

/// The advisory lock, held by a session of its own for as long as this value lives.
pub struct ActiveLock {
    conn: PgConnection,
    fence: Fence,
}

fn lock_err(e: impl std::fmt::Display) -> Error {
    Error::Store(format!("active lock: {e}"))
}

async fn session(url: &str) -> Result<PgConnection, Error> {
    PgConnection::connect_with(&pg_options(url)?)
        .await
        .map_err(lock_err)
}

impl ActiveLock {
    /// Waits until this process holds advisory lock `key` of the database at `url`,
    /// then bumps the fence. `waiting` is called once, when the lock is held elsewhere or
    /// the database cannot be reached. A URL that does not parse is an error at once;
    /// an unreachable database is retried with backoff (logged each time), since in
    /// an orchestrated deployment the database may simply not be up yet.
    pub async fn acquire(url: &str, key: i64, waiting: impl FnOnce()) -> Result<Self, Error> {
        pg_options(url)?;
        let mut conn: Option<PgConnection> = None;
        let mut waiting = Some(waiting);
        let mut backoff = CONNECT_BACKOFF;
        loop {
            let wait = if let Some(c) = conn.as_mut() {
                match try_lock(c, key).await {
                    Ok(Some(fence)) => {
                        return Ok(ActiveLock {
                            conn: conn.take().expect("checked above"),
                            fence,
                        })
                    }
                    Ok(None) => RETRY_EVERY,
                    Err(e) => {
                        tracing::warn!(error = %e, "asking for the active lock failed; reconnecting");
                        conn = None;
                        RETRY_EVERY
                    }
                }
            } else {
                match session(url).await {
                    Ok(c) => {
                        backoff = CONNECT_BACKOFF;
                        conn = Some(c);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach the database; not ready, retrying");
                        let wait = backoff;
                        backoff = (backoff * 2).min(CONNECT_BACKOFF_MAX);
                        wait
                    }
                }
            };
            if let Some(w) = waiting.take() {
                w();
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// The fence generation this holder got.
    pub fn fence(&self) -> Fence {
        self.fence
    }

    /// The database's process id of the lock's session (tests terminate it).
    pub async fn session_pid(&mut self) -> Result<i32, Error> {
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut self.conn)
            .await
            .map_err(lock_err)
    }

    /// Resolves when the lock may have been lost: a check of its session failed or did
    /// not answer in time. The caller must stop serving then.
    pub async fn lost(mut self) -> Error {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let check = sqlx::query("SELECT 1").execute(&mut self.conn);
            match tokio::time::timeout(CHECK_TIMEOUT, check).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return lock_err(format!("its session failed: {e}")),
                Err(_) => {
                    return lock_err(format!(
                        "its session did not answer within {CHECK_TIMEOUT:?}"
                    ))
                }
            }
        }
    }
}

/// The active lock as the broker's election: the broker holding it leads (it is the
/// only one serving the database), until a check of the lock's session fails.
impl crate::election::Election for ActiveLock {
    fn run(self: Box<Self>, report: Box<dyn Fn(bool) + Send + Sync>) {
        report(true);
        tokio::spawn(async move {
            let e = self.lost().await;
            tracing::error!(error = %e, "lost the active lock: no longer the leader");
            report(false);
        });
    }
}

/// Takes advisory lock `key` on `conn` if it is free and bumps the fence: the fence,
/// or `None` when another session holds the lock.
async fn try_lock(conn: &mut PgConnection, key: i64) -> Result<Option<Fence>, sqlx::Error> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(None);
    }
    // Only the lock holder runs these, so they never race each other.
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS broker_fence (id INTEGER PRIMARY KEY, generation BIGINT NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO broker_fence (id, generation) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    )
    .execute(&mut *conn)
    .await?;
    // A write transaction of the previous holder that still holds the row (its
    // process paused, its node cut off) would make the bump below wait until the
    // database ends it (`idle_in_transaction_session_timeout`): end it now. Only fenced
    // writers ever touch this table; a statement that is running (not idle) ends by
    // itself, so only sessions idle in a transaction are ended.
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
         JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'relation' AND l.relation = 'broker_fence'::regclass \
         AND l.pid <> pg_backend_pid() AND a.state LIKE 'idle in transaction%'",
    )
    .fetch_all(&mut *conn)
    .await?;
    if !ended.is_empty() {
        tracing::warn!(
            sessions = ended.len(),
            "ended the previous active broker's write sessions"
        );
    }
    // Waits for a write transaction of the previous holder that holds the row.
    let generation: i64 = sqlx::query_scalar(
        "UPDATE broker_fence SET generation = generation + 1 WHERE id = 1 RETURNING generation",
    )
    .fetch_one(&mut *conn)
    .await?;
    tracing::info!(generation, "took the database's active lock");
    Ok(Some(Fence(generation)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    async fn url() -> Option<String> {
        crate::store::test_postgres_url().await
    }

    /// A key no other test (or broker) uses.
    fn key() -> i64 {
        i64::from_str_radix(&crate::random::id()[..15], 16).unwrap()
    }

    #[actix::test]
    async fn a_second_broker_waits_until_the_first_is_gone() {
        let Some(url) = url().await else { return };
        let key = key();
        let first = ActiveLock::acquire(&url, key, || panic!("the lock is free"))
            .await
            .unwrap();
        let waited = Arc::new(AtomicBool::new(false));
        let w = waited.clone();
        let u = url.clone();
        let second = tokio::spawn(async move {
            ActiveLock::acquire(&u, key, move || w.store(true, Ordering::SeqCst)).await
        });
        // The second asks, is refused, and keeps waiting while the first lives.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !waited.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "never asked");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(RETRY_EVERY * 2).await;
        assert!(!second.is_finished(), "took a held lock");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("took over within 10 s")
            .unwrap()
            .unwrap();
        drop(second);
    }

    #[actix::test]
    async fn sessions_end_soon_when_their_peer_vanishes() {
        let Some(url) = url().await else { return };
        let mut lock = ActiveLock::acquire(&url, key(), || panic!("the lock is free"))
            .await
            .unwrap();
        let unix_socket: bool = sqlx::query_scalar("SELECT inet_server_addr() IS NULL")
            .fetch_one(&mut lock.conn)
            .await
            .unwrap();
        for (name, want) in [
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_count", "3"),
            ("idle_in_transaction_session_timeout", "1min"),
        ] {
            let got: String = sqlx::query_scalar("SELECT current_setting($1)")
                .bind(name)
                .fetch_one(&mut lock.conn)
                .await
                .unwrap();
            // Over a Unix socket keepalives read 0: they only apply to TCP.
            assert!(got == want || (got == "0" && unix_socket), "{name} = {got}");
        }
    }

    /// A database of its own (the fence is per database; other tests take locks).
    struct FreshDb {
        base: String,
        name: String,
        url: String,
    }

    impl FreshDb {
        async fn new(base: &str) -> FreshDb {
            let name = format!("broker_fence_{}", crate::random::id());
            let mut admin = PgConnection::connect(base).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .unwrap();
            let (prefix, _) = base.rsplit_once('/').unwrap();
            FreshDb {
                url: format!("{prefix}/{name}"),
                base: base.to_owned(),
                name,
            }
        }

        async fn drop_it(self) {
            let mut admin = PgConnection::connect(&self.base).await.unwrap();
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await;
        }
    }

    /// Split brain, deterministically: the old holder's lock session is gone and a new
    /// holder has the lock, but the old broker has not noticed yet and still has its
    /// store. Nothing it writes now is acknowledged, and the new holder's store sees
    /// everything the old one acknowledged before.
    #[actix::test]
    async fn a_broker_that_lost_its_lock_acknowledges_nothing_more() {
        let Some(base) = url().await else { return };
        let db = FreshDb::new(&base).await;
        let key = key();
        let metrics = || std::sync::Arc::new(crate::metrics::Metrics::new());
        let msg = |o: u64| {
            std::sync::Arc::new(crate::message::Message {
                received_at_ms: 0,
                ..crate::message::Message::new("q".into(), o, bytes::Bytes::from(format!("m{o}")))
            })
        };
        let mut old = ActiveLock::acquire(&db.url, key, || panic!("the lock is free"))
            .await
            .unwrap();
        let old_store = crate::store::SqlStore::connect(&db.url, metrics(), Some(old.fence()))
            .await
            .unwrap();
        use crate::store::Store;
        old_store.open("q").await.unwrap();
        old_store
            .append("q", (1..=3).map(msg).collect())
            .await
            .unwrap();

        let pid = old.session_pid().await.unwrap();
        let mut admin = PgConnection::connect(&db.url).await.unwrap();
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&mut admin)
            .await
            .unwrap();
        let new = ActiveLock::acquire(&db.url, key, || {}).await.unwrap();
        assert!(new.fence().generation() > old.fence().generation());

        let err = old_store.append("q", vec![msg(4)]).await.unwrap_err();
        assert!(err.to_string().contains("fenced"), "{err}");
        assert!(!old_store.healthy());

        let new_store = crate::store::SqlStore::connect(&db.url, metrics(), Some(new.fence()))
            .await
            .unwrap();
        let q = new_store.open("q").await.unwrap();
        let offsets: Vec<u64> = q.messages.iter().map(|m| m.offset).collect();
        assert_eq!((offsets, q.next_offset), (vec![1, 2, 3], 4));
        new_store.append("q", vec![msg(4)]).await.unwrap();
        drop((old_store, new_store, old, new));
        db.drop_it().await;
    }

    #[actix::test]
    async fn the_holder_notices_when_its_session_is_gone() {
        let Some(url) = url().await else { return };
        let mut lock = ActiveLock::acquire(&url, key(), || panic!("the lock is free"))
            .await
            .unwrap();
        let pid = lock.session_pid().await.unwrap();
        let lost = tokio::spawn(lock.lost());
        tokio::time::sleep(CHECK_EVERY * 2).await;
        assert!(!lost.is_finished(), "a healthy session is not lost");
        let mut admin = PgConnection::connect(&url).await.unwrap();
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert!(killed);
        let err = tokio::time::timeout(CHECK_EVERY + CHECK_TIMEOUT * 2, lost)
            .await
            .expect("noticed within one check")
            .unwrap();
        assert!(err.to_string().contains("active lock"), "{err}");
    }
}
