//! Crossbar.io compatibility with real clients from PyPI (tests/python/requirements.txt):
//! crossbarhttprequests publishes through the pusher, requests signed byte for byte as
//! Crossbar's server verifies them, and Autobahn|Python (asyncio) WAMP sessions
//! subscribe and publish. `BROKER_TEST_PYTHON` names a Python with those packages
//! (`.ci/run` makes one); without it the tests are skipped, or fail when `CI` is set.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use broker_core::auth::token::{mint, Claims};
use broker_core::config::Secret;
use broker_core::crossbar::publication_id;
use serde_json::{json, Value};

use crate::support::{json, python, spawn_broker, write_config, ws_connect, BrokerProcess};

const JWT: &str = "crossbar-test-jwt-secret";

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/python/crossbar_clients.py"
);

/// Runs a client to completion; its JSON output lines.
fn run(py: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new(py)
        .arg(SCRIPT)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run python");
    assert!(out.status.success(), "{args:?} failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A client that keeps running; its JSON lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Running {
    fn start(py: &str, args: &[&str]) -> Running {
        let mut child = Command::new(py)
            .arg(SCRIPT)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Running { child, lines }
    }

    fn next(&self) -> Value {
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .expect("a line from the client within 20 s")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(pusher: &str) -> String {
    format!(
        r#"
[storage]
url = "memory://"
[pusher]
{pusher}
[ws]
jwt_secrets = ["{JWT}"]
[[users]]
name = "alice"
pass_hash = "plain;;alice-password"
queues = ["com.example.*"]
publish = ["com.example.*"]
[[queues]]
name = "com.example.*"
"#
    )
}

fn start(pusher: &str) -> (tempfile::TempDir, BrokerProcess) {
    let (dir, path) = write_config("broker.toml", &config(pusher));
    (dir, spawn_broker(&path))
}

async fn read_news(b: &BrokerProcess, since: u64) -> Value {
    let res = b
        .get(&format!(
            "/v1/queues/com.example.news/messages?since={since}"
        ))
        .basic_auth("alice", Some("alice-password"))
        .send()
        .await
        .unwrap();
    let (status, v) = json(res).await;
    assert_eq!(status, 200, "{v}");
    v
}

#[actix_web::test]
async fn crossbarhttprequests_publishes_and_signatures_are_checked_as_crossbar_does() {
    let Some(py) = python() else { return };
    let (_dir, b) = start("key = \"foo\"\nsecret = \"bar-secret\"");
    let push_url = format!("{}/push", b.url);

    // The library's signed publish (positional and keyword arguments).
    let r = run(
        &py,
        &[
            "push",
            &push_url,
            "com.example.news",
            r#"["Hello, world", 2]"#,
            r#"{"lang": "en"}"#,
            "foo",
            "bar-secret",
        ],
    );
    let id = r[0]["id"].as_u64().unwrap_or_else(|| panic!("{r:?}"));
    let read = read_news(&b, 0).await;
    let m = &read["messages"][0];
    assert_eq!(
        m["data"],
        json!({"args": ["Hello, world", 2], "kwargs": {"lang": "en"}})
    );
    assert_eq!(
        id,
        publication_id("com.example.news", m["offset"].as_u64().unwrap()),
        "the pusher answers with the publication id subscribers see"
    );

    // Wrong secret → the library's signature error (401); unsigned → 400.
    let r = run(
        &py,
        &[
            "push",
            &push_url,
            "com.example.news",
            "[]",
            "{}",
            "foo",
            "nope",
        ],
    );
    assert_eq!(r[0]["kind"], "ClientSignatureError", "{r:?}");
    let r = run(&py, &["push", &push_url, "com.example.news", "[]", "{}"]);
    assert_eq!(r[0]["kind"], "ClientMissingParams", "{r:?}");

    // Requests built as Crossbar's server verifies them.
    let r = run(
        &py,
        &[
            "signed-checks",
            &push_url,
            "foo",
            "bar-secret",
            "com.example.news",
        ],
    );
    let by_case = |c: &str| {
        r.iter()
            .find(|v| v["case"] == c)
            .unwrap_or_else(|| panic!("{c}: {r:?}"))
            .clone()
    };
    assert_eq!(by_case("good")["status"], 200);
    assert!(by_case("good")["body"]["id"].is_u64());
    let replayed = by_case("replayed");
    assert_eq!(replayed["status"], 400, "{replayed}");
    assert!(replayed["body"]["error"]
        .as_str()
        .unwrap()
        .contains("nonce already used"));
    assert_eq!(replayed["body"]["args"], json!([]));
    assert_eq!(by_case("wrong-signature")["status"], 401);
    let stale = by_case("stale");
    assert_eq!(
        (stale["status"].clone(), stale["body"]["error"].clone()),
        (json!(400), json!("Request expired, too old timestamp."))
    );
    assert_eq!(by_case("microseconds")["status"], 200);
    assert_eq!(by_case("empty-nonce")["status"], 400);

    // Exactly the accepted publications are in the queue.
    let read = read_news(&b, 0).await;
    assert_eq!(read["messages"].as_array().unwrap().len(), 3, "{read}");
}

#[actix_web::test]
async fn autobahn_sessions_and_native_clients_share_topics() {
    let Some(py) = python() else { return };
    let (_dir, b) = start("");
    let ws_url = format!("{}/ws", b.url.replacen("http://", "ws://", 1));
    let push_url = format!("{}/push", b.url);

    // An Autobahn subscriber (WAMP-Ticket): exact `com.example.news`, prefix `com.example.`.
    let sub = Running::start(
        &py,
        &[
            "subscribe",
            &ws_url,
            "realm1",
            "alice",
            "alice-password",
            "7",
            "com.example.news",
            "com.example.",
        ],
    );
    let ready = sub.next();
    assert_eq!(ready["ready"], true, "{ready}");
    let session = ready["session"].as_u64().unwrap();
    let (exact, prefix) = (ready["subs"][0].clone(), ready["subs"][1].clone());

    // 1. Through the pusher (crossbarhttprequests): both subscriptions get it.
    let r = run(
        &py,
        &[
            "push",
            &push_url,
            "com.example.news",
            r#"["pushed"]"#,
            r#"{"k": 1}"#,
        ],
    );
    let id = r[0]["id"].as_u64().unwrap();
    let mut got = [sub.next(), sub.next()];
    got.sort_by_key(|e| e["sub"].as_u64());
    for (e, s) in got.iter().zip([&exact, &prefix]) {
        assert_eq!(e["sub"], *s);
        assert_eq!(
            (&e["args"], &e["kwargs"], &e["topic"]),
            (
                &json!(["pushed"]),
                &json!({"k": 1}),
                &json!("com.example.news")
            )
        );
        assert_eq!(e["publication"], id);
    }

    // 2. With curl's request on the native API: a JSON body is one argument.
    let res = b
        .post("/v1/queues/com.example.news/messages")
        .header("content-type", "application/json")
        .body(r#"{"hello":"world"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for _ in 0..2 {
        let e = sub.next();
        assert_eq!(e["args"], json!([{"hello": "world"}]), "{e}");
    }

    // 3. From a native WebSocket client, on a queue only the prefix covers.
    let claims = Claims {
        sub: "alice".into(),
        exp: chrono::Utc::now().timestamp() + 300,
        iat: None,
        queues: None,
        publish: None,
    };
    let token = mint(&claims, &Secret::new(JWT));
    let mut native = ws_connect(&b.url, &format!("?token={token}"), None)
        .await
        .unwrap();
    assert_eq!(native.recv().await["event"], "connected");
    native
        .send(json!({"action": "publish", "queue": "com.example.other", "data": [1, 2]}))
        .await;
    assert_eq!(native.recv().await["event"], "published");
    let e = sub.next();
    assert_eq!(
        (&e["sub"], &e["topic"], &e["args"]),
        (&prefix, &json!("com.example.other"), &json!([[1, 2]]))
    );

    // 4. Pusher `exclude` with the subscriber's session id: it gets nothing of that
    //    publication, and the next one arrives as the next event.
    let body = json!({"topic": "com.example.news", "args": ["hidden"],
                      "options": {"exclude": [session]}});
    let res = b.post("/push").json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body = json!({"topic": "com.example.news", "args": ["shown"],
                      "options": {"eligible": [session]}});
    let res = b.post("/push").json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    for _ in 0..2 {
        let e = sub.next();
        assert_eq!(e["args"], json!(["shown"]), "{e}");
    }

    // 5. An Autobahn publisher reaches a native subscriber.
    native.subscribe("com.example.news", None).await;
    let r = run(
        &py,
        &[
            "publish",
            &ws_url,
            "realm1",
            "alice",
            "alice-password",
            "com.example.news",
            r#"["from autobahn"]"#,
            r#"{"x": true}"#,
        ],
    );
    let publication = r[0]["publication"].as_u64().unwrap();
    let m = native.recv().await;
    assert_eq!(m["event"], "message", "{m}");
    assert_eq!(
        m["data"],
        json!({"args": ["from autobahn"], "kwargs": {"x": true}})
    );
    assert_eq!(
        publication,
        publication_id("com.example.news", m["offset"].as_u64().unwrap())
    );
}

#[actix_web::test]
async fn wamp_sessions_are_refused_with_the_wrong_realm_or_ticket() {
    let Some(py) = python() else { return };
    let (_dir, b) = start("realm = \"crossbar-demo\"");
    let ws_url = format!("{}/v1/ws", b.url.replacen("http://", "ws://", 1));
    for (realm, ticket) in [("realm1", "alice-password"), ("crossbar-demo", "wrong")] {
        let out = Command::new(&py)
            .arg(SCRIPT)
            .args([
                "publish",
                &ws_url,
                realm,
                "alice",
                ticket,
                "com.example.news",
                "[]",
                "{}",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains("\"publication\""), "{text}");
        let reason = if realm == "realm1" {
            "wamp.error.no_such_realm"
        } else {
            "wamp.error.authentication_failed"
        };
        assert!(text.contains(reason), "{text}");
    }
    let r = run(
        &py,
        &[
            "publish",
            &ws_url,
            "crossbar-demo",
            "alice",
            "alice-password",
            "com.example.news",
            "[]",
            "{}",
        ],
    );
    assert!(r[0]["publication"].is_u64(), "{r:?}");
}
