//! Subcommands and process lifecycle.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::io::Write;

use crate::support::{broker_bin, json, send, spawn_broker, write_config};

fn run(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(broker_bin())
        .args(args)
        .env("BROKER_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[actix_web::test]
async fn publish_subcommand_signs_like_the_queue_wants() {
    let toml = "[[users]]\nname = \"u\"\npass_hash = \"plain;;password1\"\nqueues = [\"signed\"]\n[[queues]]\nname = \"signed\"\nauth = { method = \"hmac-sha512\", key = \"k3y\", header_name = \"X-Sig\" }\n";
    let (_dir, path) = write_config("broker.toml", toml);
    let b = spawn_broker(&path);
    let (code, out, err) = run(
        &[
            "publish",
            "signed",
            r#"{"n":1}"#,
            "--url",
            &b.url,
            "--hmac-key",
            "k3y",
            "--hmac-header",
            "X-Sig",
            "--hmac-algo",
            "sha512",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["success"].as_bool(), v["offset"].as_u64()),
        (Some(true), Some(1))
    );
    // From stdin, as text.
    let (code, _, err) = run(
        &[
            "publish",
            "signed",
            "-",
            "--url",
            &b.url,
            "--hmac-key",
            "k3y",
            "--hmac-header",
            "X-Sig",
            "--hmac-algo",
            "sha512",
        ],
        Some("plain words"),
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(
        &[
            "publish",
            "signed",
            "x",
            "--url",
            &b.url,
            "--hmac-key",
            "wrong",
            "--hmac-header",
            "X-Sig",
        ],
        None,
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("403") && err.contains("not properly authenticated"),
        "{err}"
    );

    let (s, v) = send(
        b.get("/v1/queues/signed/messages")
            .basic_auth("u", Some("password1")),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["messages"][0]["data"], serde_json::json!({"n": 1}));
    assert_eq!(v["messages"][1]["body"], "plain words");
}

#[test]
fn config_example_and_check() {
    let (code, example, _) = run(&["config", "example"], None);
    assert_eq!(code, 0);
    assert!(
        example.contains("[server]") && example.contains("# "),
        "commented example"
    );
    let (_dir, path) = write_config("example.toml", &example);
    let (code, out, err) = run(&["config", "check", path.to_str().unwrap()], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");

    let (_dir, bad) = write_config(
        "bad.toml",
        "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 2\n[limits]\nmax_message_count = 0\n",
    );
    let (code, _, err) = run(&["config", "check", bad.to_str().unwrap()], None);
    assert_eq!(code, 1);
    assert!(err.contains("server") && err.contains("lisen"), "{err}");
    let (_dir, bad) = write_config("bad.toml", "[limits]\nmax_message_count = 0\n");
    let (code, _, err) = run(&["config", "check", bad.to_str().unwrap()], None);
    assert_eq!(code, 1);
    assert!(err.contains("limits.max_message_count"), "{err}");
}

#[test]
fn hash_password_from_stdin() {
    let (code, out, err) = run(&["hash-password", "--stdin"], Some("correct horse\n"));
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().starts_with("$argon2id$"), "{out}");
    let (code, _, err) = run(&["hash-password", "--stdin"], Some("short\n"));
    assert_eq!(code, 1);
    assert!(err.contains("at least 6"), "{err}");
}

/// `broker serve` without --config (the built-in example) in `dir`; its URL.
fn serve_default(dir: &std::path::Path) -> (std::process::Child, String) {
    let mut child = Command::new(broker_bin())
        .arg("serve")
        .current_dir(dir)
        .env("BROKER__SERVER__LISTEN", "127.0.0.1:0")
        .env("BROKER_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    (child, url)
}

#[actix_web::test]
async fn default_config_serves_the_demo_queue_durably() {
    // The default storage is SQLite in ./data/broker.db: what was acknowledged survives
    // kill -9 with its offset and epoch.
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let (mut child, url) = serve_default(dir.path());
    let res = http
        .post(format!("{url}/v1/queues/demo/messages"))
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (_, published) = json(res).await;
    assert!(dir.path().join("data/broker.db").exists());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (mut child, url) = serve_default(dir.path());
    let res = http
        .get(format!("{url}/v1/queues/demo/messages?since=0"))
        .basic_auth("demo", Some("demo-password"))
        .send()
        .await
        .unwrap();
    let (status, read) = json(res).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["epoch"], published["epoch"], "{read} vs {published}");
    let first = &read["messages"][0];
    assert_eq!(
        (&first["offset"], &first["body"]),
        (&published["offset"], &serde_json::json!("hi")),
        "{read}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn healthcheck_reports_a_live_and_ready_broker_and_fails_on_a_dead_one() {
    let (_dir, path) = write_config("broker.toml", "[[queues]]\nname = \"q\"\n");
    let b = spawn_broker(&path);
    let (code, out, _) = run(&["healthcheck", "--url", &b.url], None);
    assert_eq!((code, out.trim()), (0, r#"{"status":"ok"}"#));
    let (code, out, _) = run(&["healthcheck", "--ready", "--url", &b.url], None);
    assert_eq!((code, out.trim()), (0, r#"{"status":"ready"}"#));
    let url = b.url.clone();
    drop(b);
    let (code, _, err) = run(&["healthcheck", "--url", &url, "--timeout", "2s"], None);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/healthz"), "{err}");
}

#[actix_web::test]
async fn sigterm_releases_long_polls_and_exits_zero() {
    let toml = "[[users]]\nname = \"u\"\npass_hash = \"plain;;password1\"\nqueues = [\"q\"]\n[[queues]]\nname = \"q\"\n";
    let (_dir, path) = write_config("broker.toml", toml);
    let mut b = spawn_broker(&path);
    let started = Instant::now();
    let poll = b
        .get("/v1/queues/q/messages?wait=50s")
        .basic_auth("u", Some("password1"))
        .send();
    let stopper = async {
        b.wait_for_metric("broker_poll_waiting", 1.0).await;
        b.signal("TERM");
    };
    let (res, ()) = tokio::join!(poll, stopper);
    let (s, v) = json(res.unwrap()).await;
    assert_eq!(s, 200, "the in-flight long-poll is answered, not cut");
    assert_eq!(v["messages"].as_array().unwrap().len(), 0);
    assert!(started.elapsed() < Duration::from_secs(20));
    let status = b.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[actix_web::test]
async fn token_subscribe_and_notify_subcommands() {
    let toml = r#"
[admin]
token = "cli-admin-token-0123"
[ws]
jwt_secrets = ["cli-jwt-secret-0123456789"]
[[queues]]
name = "events"
"#;
    let (_dir, path) = write_config("broker.toml", toml);
    let b = spawn_broker(&path);
    let (code, token, err) = run(
        &[
            "token",
            "--user",
            "carol",
            "--queues",
            "events",
            "--ttl",
            "5m",
            "--config",
            path.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let token = token.trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT");

    // `broker subscribe` prints each message as a JSON line and exits after --count.
    let mut sub = Command::new(broker_bin())
        .args([
            "subscribe",
            "events",
            "--count",
            "2",
            "--url",
            &b.url,
            "--token",
            &token,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its stderr shows the `subscribed` event once it is in place.
    let mut err_lines = std::io::BufReader::new(sub.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("subscribed") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut err_lines, &mut line).unwrap() > 0,
            "subscribe exited early"
        );
    }
    for body in [r#"{"n":1}"#, r#"{"n":2}"#] {
        let (code, _, err) = run(&["publish", "events", body, "--url", &b.url], None);
        assert_eq!(code, 0, "{err}");
    }
    let out = sub.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[1],
        serde_json::json!({"event":"message","queue":"events","offset":2,"data":{"n":2}})
    );

    // `broker notify --user` reaches carol's connection.
    let mut ws = crate::support::ws_connect(&b.url, &format!("?token={token}"), None)
        .await
        .unwrap();
    assert_eq!(ws.recv().await["event"], "connected");
    let (code, out, err) = run(
        &[
            "notify",
            "--user",
            "carol",
            r#"{"ping":true}"#,
            "--url",
            &b.url,
            "--token",
            "cli-admin-token-0123",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["delivered"],
        1
    );
    assert_eq!(
        ws.recv().await,
        serde_json::json!({"event":"notify","data":{"ping":true}})
    );
    let (code, _, err) = run(
        &[
            "notify",
            "--connection",
            "nope",
            "1",
            "--url",
            &b.url,
            "--token",
            "cli-admin-token-0123",
        ],
        None,
    );
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
}

#[test]
fn bench_latency_reports_against_its_baseline() {
    let (code, out, err) = run(
        &["bench", "latency", "--messages", "50", "--warmup", "5"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    for line in [
        "baseline   HTTP publish round trip",
        "measured   publish -> WebSocket event",
        "ratio measured/baseline",
        "target: added p50 < 1 ms",
    ] {
        assert!(out.contains(line), "{out}");
    }
}

#[actix_web::test]
async fn a_config_cron_publishes_every_second() {
    let toml = "[[users]]\nname = \"u\"\npass_hash = \"plain;;password1\"\nqueues = [\"ticks\"]\n[[queues]]\nname = \"ticks\"\n[[crons]]\nname = \"each-second\"\nqueue = \"ticks\"\nschedule = \"* * * * * *\"\nbody = \"{\\\"tick\\\":true}\"\n";
    let (_dir, path) = write_config("broker.toml", toml);
    let b = spawn_broker(&path);
    let mut stamps = Vec::new();
    let mut since = 0;
    while stamps.len() < 3 {
        let (s, v) = send(
            b.get(&format!("/v1/queues/ticks/messages?since={since}&wait=5s"))
                .basic_auth("u", Some("password1")),
        )
        .await;
        assert_eq!(s, 200);
        for m in v["messages"].as_array().unwrap() {
            assert_eq!(m["data"], serde_json::json!({"tick": true}));
            assert_eq!(m["headers"]["x-broker-cron"], "each-second");
            since = m["offset"].as_u64().unwrap();
            stamps.push(
                chrono::DateTime::parse_from_rfc3339(m["received_at"].as_str().unwrap()).unwrap(),
            );
        }
    }
    for w in stamps.windows(2) {
        let gap = (w[1] - w[0]).num_milliseconds();
        assert!(
            (800..=1200).contains(&gap),
            "one message per tick: {stamps:?}"
        );
    }
    let m = b.metrics().await;
    assert!(
        crate::support::metric(
            &m,
            r#"broker_cron_runs_total{cron="each-second",outcome="ok"}"#
        )
        .unwrap()
            >= 3.0
    );
    assert!(crate::support::metric(
        &m,
        r#"broker_cron_next_run_timestamp_seconds{cron="each-second"}"#
    )
    .is_some());
}

/// The built-in example (public demo passwords and secrets) never listens beyond
/// loopback: without `--config`, a non-loopback `server.listen` is a clear error (what
/// the container image would otherwise have served on every interface).
#[test]
fn the_built_in_example_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(broker_bin())
        .arg("serve")
        .current_dir(dir.path())
        .env("BROKER__SERVER__LISTEN", "0.0.0.0:0")
        .env("BROKER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the built-in example is serving on 0.0.0.0");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it served: {stderr}");
    assert!(
        stderr.contains("only listens on loopback") && stderr.contains("--config"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing was served");
}
