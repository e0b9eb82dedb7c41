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

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::error::Error;

/// The advisory lock of `broker serve` ("broker" in ASCII). Advisory locks are per
/// database: one broker deployment per database.
pub const ACTIVE_LOCK_KEY: i64 = 0x6272_6f6b_6572;
/// How often a standby asks for the lock.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How often the holder checks its session.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Longest a check may take before the lock counts as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The advisory lock, held by a session of its own for as long as this value lives.
pub struct ActiveLock {
    conn: PgConnection,
}

fn lock_err(e: impl std::fmt::Display) -> Error {
    Error::Store(format!("active lock: {e}"))
}

async fn session(url: &str) -> Result<PgConnection, Error> {
    PgConnection::connect_with(&super::sql::pg_options(url)?)
        .await
        .map_err(lock_err)
}

impl ActiveLock {
    /// Waits until this process holds advisory lock `key` of the database at `url`.
    /// `waiting` is called once, if the lock is held elsewhere. A first connection that
    /// fails is an error (a wrong URL should not wait forever); later failures while
    /// waiting are retried.
    pub async fn acquire(url: &str, key: i64, waiting: impl FnOnce()) -> Result<Self, Error> {
        let mut conn = Some(session(url).await?);
        let mut waiting = Some(waiting);
        loop {
            if let Some(c) = conn.as_mut() {
                match sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut *c)
                    .await
                {
                    Ok(true) => {
                        return Ok(ActiveLock {
                            conn: conn.take().expect("checked above"),
                        })
                    }
                    Ok(false) => {
                        if let Some(w) = waiting.take() {
                            w();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "standby: asking for the active lock failed; reconnecting");
                        conn = None;
                    }
                }
            } else {
                match session(url).await {
                    Ok(c) => conn = Some(c),
                    Err(e) => tracing::warn!(error = %e, "standby: cannot reach the database"),
                }
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn url() -> Option<String> {
        match std::env::var("BROKER_TEST_POSTGRES_URL") {
            Ok(u) => Some(u),
            Err(_) if std::env::var_os("CI").is_some() => {
                panic!("BROKER_TEST_POSTGRES_URL must be set in CI (.ci/run sets it)")
            }
            Err(_) => {
                eprintln!("BROKER_TEST_POSTGRES_URL is not set; skipped");
                None
            }
        }
    }

    /// A key no other test (or broker) uses.
    fn key() -> i64 {
        i64::from_str_radix(&crate::message::random_id()[..15], 16).unwrap()
    }

    #[actix::test]
    async fn a_second_broker_waits_until_the_first_is_gone() {
        let Some(url) = url() else { return };
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
        let Some(url) = url() else { return };
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

    #[actix::test]
    async fn the_holder_notices_when_its_session_is_gone() {
        let Some(url) = url() else { return };
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
