//! Storage faults through the real binary: a file system that fills up under SQLite, a
//! second broker on one SQLite file, PostgreSQL sessions terminated under two brokers,
//! a rejected commit on an idle broker, a database that is not up yet at start.
//!
//! The rule every test checks: what a publisher was told is stored (`200` with an
//! offset) is found after a `kill -9` and a restart, under that offset, and nothing a
//! publisher was refused is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    broker_bin, fresh_postgres, json, next_line, psql, read_all, spawn_broker, spawn_serve,
    write_config, BrokerProcess,
};

fn config(url: &str, queue: &str) -> String {
    format!(
        "[storage]\nurl = \"{url}\"\n[limits]\nmax_message_count = 1000000\nmax_queue_size = 1000000000\n\
         [[users]]\nname = \"u\"\npass_hash = \"plain;;password1\"\nqueues = [\"{queue}\"]\n\
         [[queues]]\nname = \"{queue}\"\n"
    )
}

/// A tmpfs of `size` mounted on a temp dir for one test (unmounted on drop): a real
/// file system that fills up. Mounting needs root, as CI has; elsewhere the test is
/// skipped (with `CI` set, a failed mount fails the test).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount");
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must be able to mount a tmpfs: {why}"
            );
            eprintln!("cannot mount a tmpfs ({why}); skipped");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system of `dir` with a file, then gives back `spare` bytes; the file.
fn fill(dir: &Path, spare: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n as u64,
        }
    }
    let _ = f.sync_all();
    f.set_len(len.saturating_sub(spare)).unwrap();
    path
}

/// Waits (bounded) until `/readyz` answers `status`.
async fn wait_ready(b: &BrokerProcess, status: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, v) = json(b.get("/readyz").send().await.unwrap()).await;
        if s == status {
            return v;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {s}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The reproduction: SQLite on a small file system, sequential publishes of
/// ~230 bytes past the point where it is full, `kill -9`, restart. Every acknowledged
/// offset is there with its body, no refused body is, nothing was acknowledged while
/// the disk was full, `/readyz` said so, and writes resumed once there was room again
/// (without a restart).
#[actix_web::test]
async fn sqlite_on_a_full_disk_acknowledges_only_what_it_keeps() {
    let Some(fs) = Tmpfs::mount("4m") else { return };
    let queue = "full";
    let url = format!("sqlite://{}/broker.db", fs.path().display());
    let (_d, path) = write_config("broker.toml", &config(&url, queue));
    let mut b = spawn_broker(&path);
    let filler = fill(fs.path(), 256 * 1024);

    let pad = "x".repeat(220);
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut refused: Vec<String> = Vec::new();
    let mut acked_after_full = 0;
    for i in 0..3000 {
        let body = format!("m{i:05}-{pad}");
        let (s, v) = b.publish(queue, &body).await;
        match s {
            200 => {
                if !refused.is_empty() {
                    acked_after_full += 1;
                }
                acked.insert(v["offset"].as_u64().unwrap(), body);
            }
            503 => {
                assert_eq!(v["code"], "store_unavailable", "{v}");
                refused.push(body);
            }
            _ => panic!("{s} {v}"),
        }
        if refused.len() >= 300 {
            break;
        }
    }
    assert!(
        acked.len() >= 10,
        "the disk filled too soon: {}",
        acked.len()
    );
    assert_eq!(refused.len(), 300, "the disk never filled");
    assert_eq!(
        acked_after_full, 0,
        "nothing is acknowledged while the disk is full"
    );
    let v = wait_ready(&b, 503).await;
    assert_eq!(v["status"], "store_unavailable");

    // Room again: the broker takes writes without a restart, and says it is ready.
    std::fs::remove_file(filler).unwrap();
    wait_ready(&b, 200).await;
    for i in 0..20 {
        let body = format!("after-{i}");
        let (s, v) = b.publish(queue, &body).await;
        assert_eq!(s, 200, "{v}");
        acked.insert(v["offset"].as_u64().unwrap(), body);
    }
    let offsets: Vec<u64> = acked.keys().copied().collect();
    let first = offsets[0];
    assert_eq!(
        offsets,
        (first..first + offsets.len() as u64).collect::<Vec<_>>(),
        "offsets +1 per stored message: none skipped by the refused ones"
    );

    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let b2 = spawn_broker(&path);
    let (stored, _) = read_all(&b2, queue).await;
    assert_eq!(
        stored, acked,
        "exactly the acknowledged messages, under their offsets"
    );
    for r in &refused {
        assert!(
            !stored.values().any(|s| s == r),
            "a refused message is stored"
        );
    }
}

/// A second broker on the SQLite file of a running one refuses to start, naming the
/// file and the process that has it.
#[actix_web::test]
async fn a_second_broker_on_one_sqlite_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/broker.db", dir.path().display());
    let (_d, path) = write_config("broker.toml", &config(&url, "q"));
    let first = spawn_broker(&path);
    let mut second = Command::new(broker_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .env("BROKER__SERVER__LISTEN", "127.0.0.1:0")
        .env("BROKER_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second broker serves the same SQLite file");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("{}/broker.db", dir.path().display()))
            && stderr.contains(&format!("process {}", first.child.id())),
        "{stderr}"
    );
    // The first one is untouched.
    assert_eq!(first.publish("q", "x").await.0, 200);
}

/// One batch the database rejects leaves an idle broker ready again by itself: readiness
/// follows the store's health (the writer's probe), not the last commit.
#[actix_web::test]
async fn readiness_recovers_by_itself_after_a_rejected_commit() {
    let Some(db) = fresh_postgres() else { return };
    let queue = format!("rej.{}", broker_core::random::id());
    let (_d, path) = write_config("broker.toml", &config(&db.url, &queue));
    let b = spawn_broker(&path);
    let constraint = format!("block_{}", queue.replace('.', "_"));
    psql(
        &db.url,
        &format!(
            "ALTER TABLE messages ADD CONSTRAINT {constraint} CHECK (queue <> '{queue}') NOT VALID"
        ),
    );
    let (s, v) = b.publish(&queue, "refused").await;
    assert_eq!(
        (s, v["code"].as_str()),
        (503, Some("store_unavailable")),
        "{v}"
    );
    // No other publish arrives; the constraint stays: the store itself is healthy.
    wait_ready(&b, 200).await;
    psql(
        &db.url,
        &format!("ALTER TABLE messages DROP CONSTRAINT {constraint}"),
    );
    let (s, v) = b.publish(&queue, "kept").await;
    assert_eq!(
        (s, v["offset"].as_u64()),
        (200, Some(1)),
        "no offset skipped: {v}"
    );
}

/// A TCP forwarder from a free loopback port to `target`, started later than the
/// broker that points at it: a database that is not up yet.
fn forward_later(target: String) -> (u16, impl FnOnce()) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = move || {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
    };
    (port, start)
}

/// A broker started while PostgreSQL cannot be reached waits (unready, alive) and
/// becomes active once it can, instead of exiting.
#[actix_web::test]
async fn a_broker_started_before_postgres_is_reachable_waits_for_it() {
    let Some(db) = fresh_postgres() else { return };
    // postgres://USER@HOST:PORT/NAME → the same through a forwarder not started yet.
    let (prefix, name) = db.url.rsplit_once('/').unwrap();
    let (user, host) = prefix.split_once('@').expect("USER@HOST in the test URL");
    let (port, start_forwarding) = forward_later(host.to_owned());
    let url = format!("{user}@127.0.0.1:{port}/{name}");
    let (_d, path) = write_config("broker.toml", &config(&url, "q"));
    let (mut child, mut lines) = spawn_serve(&path, &[]);
    let addr = next_line(&mut lines, "standby on ");
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{addr}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{addr}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    // Still there a few retries later (it used to exit at once).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(child.try_wait().unwrap().is_none(), "the broker exited");
    start_forwarding();
    assert_eq!(next_line(&mut lines, "listening on "), addr);
    let b = BrokerProcess::new(child, addr, lines);
    wait_ready(&b, 200).await;
    assert_eq!(b.publish("q", "x").await.0, 200);
}

/// Split brain, the reproduction: two brokers on one database under publish
/// load through both, and only the lock holder's session is terminated, at a random
/// moment, several times. Whatever the timing: every acknowledged publish is readable
/// from the broker that is active at the end, exactly once, under the offset it was
/// acknowledged with, and a reader that followed the old active broker to its end goes
/// on at the new one without a silent gap.
#[actix_web::test]
async fn terminating_the_lock_session_never_loses_or_hides_an_acknowledged_message() {
    let Some(db) = fresh_postgres() else { return };
    let (_d, path) = write_config("broker.toml", &config(&db.url, "q"));
    let mut active = spawn_broker(&path);
    let acked: Arc<Mutex<BTreeMap<u64, String>>> = Arc::default();
    let mut seen_by_reader: BTreeMap<u64, String> = BTreeMap::new();
    for round in 0..4 {
        // The standby's lock retries (every second) start at a random phase against
        // the active broker's lock checks (every second): which one comes first after
        // the termination is left to chance, as in production.
        tokio::time::sleep(Duration::from_millis(rand_ms(1000))).await;
        let mut standby = {
            let (child, mut lines) = spawn_serve(&path, &[]);
            let url = next_line(&mut lines, "standby on ");
            BrokerProcess::new(child, url, lines)
        };
        // Publishers try both brokers in turn (as a load balancer might during a
        // failover); only 200s count.
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for p in 0..4 {
            let urls = [active.url.clone(), standby.url.clone()];
            let (acked, stop, http) = (acked.clone(), stop.clone(), active.http.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let body = format!("r{round}-p{p}-{i}");
                    let url = format!("{}/v1/queues/q/messages", urls[i % 2]);
                    let Ok(res) = http.post(&url).body(body.clone()).send().await else {
                        continue;
                    };
                    if res.status() == 200 {
                        let v: Value = res.json().await.unwrap();
                        let off = v["offset"].as_u64().unwrap();
                        let prev = acked.lock().unwrap().insert(off, body);
                        assert!(prev.is_none(), "offset {off} acknowledged twice");
                    }
                }
            }));
        }
        // Random moment under load.
        let wait = 100 + rand_ms(400);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        // Half of the rounds pause the old broker around the termination (a long GC
        // pause, a stalled VM), so that the new active broker is certainly serving
        // before the old one can notice: its publishes in flight meet the fence.
        let pause = round % 2 == 1;
        if pause {
            active.signal("STOP");
        }
        // Only the lock's session: the old broker's other connections go on.
        psql(
            &db.url,
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
             AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        );
        if pause {
            assert_eq!(next_line(&mut standby.lines, "listening on "), standby.url);
            active.signal("CONT");
        }
        // The old active broker reads to its end while it still answers.
        let mut since = seen_by_reader.keys().last().copied().unwrap_or(0);
        loop {
            let Ok(res) = active
                .get(&format!("/v1/queues/q/messages?since={since}&limit=1000"))
                .basic_auth("u", Some("password1"))
                .send()
                .await
            else {
                break;
            };
            if res.status() != 200 {
                break;
            }
            let v: Value = res.json().await.unwrap();
            let msgs = v["messages"].as_array().unwrap().clone();
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                let off = m["offset"].as_u64().unwrap();
                assert_eq!(off, since + 1, "the reader saw a gap at the old broker");
                seen_by_reader.insert(off, m["body"].as_str().unwrap().to_owned());
                since = off;
            }
        }
        // The old broker stops (exit 1); the standby becomes active on its address.
        let status = tokio::task::spawn_blocking(move || {
            let s = active.child.wait().unwrap();
            drop(active);
            s
        })
        .await
        .unwrap();
        assert_eq!(status.code(), Some(1), "round {round}");
        if !pause {
            assert_eq!(next_line(&mut standby.lines, "listening on "), standby.url);
        }
        // A little load on the new active broker, then stop the publishers.
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        active = standby;
        // The reader goes on at the new active broker from where it was.
        let (stored, _) = read_all(&active, "q").await;
        for (off, body) in stored.range(since + 1..) {
            seen_by_reader.insert(*off, body.clone());
        }
        let acked = acked.lock().unwrap().clone();
        for (off, body) in &acked {
            assert_eq!(
                stored.get(off),
                Some(body),
                "round {round}: acknowledged offset {off}"
            );
        }
        let offsets: Vec<u64> = stored.keys().copied().collect();
        assert_eq!(
            offsets,
            (1..=offsets.len() as u64).collect::<Vec<_>>(),
            "round {round}: offsets +1 per message"
        );
        assert_eq!(
            seen_by_reader, stored,
            "round {round}: the reader saw every stored message, no gap"
        );
    }
}

/// A pseudo-random number below `n` (no rand dependency for one jitter).
fn rand_ms(n: u64) -> u64 {
    let id = broker_core::random::id();
    u64::from_str_radix(&id[..8], 16).unwrap() % n
}
