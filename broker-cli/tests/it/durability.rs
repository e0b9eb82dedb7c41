//! Durable storage through the real binary: publishers under load, `kill -9`, restart;
//! every acknowledged message is there with its offset and epoch, nothing twice, no
//! offset reused. Run for SQLite and PostgreSQL.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{
    assert_stored_once, bodies, fresh_postgres, json, metric, psql, read_all, send, spawn_broker,
    spawn_http, write_config, Load,
};

fn config(url: &str, queue: &str) -> String {
    format!(
        "[storage]\nurl = \"{url}\"\n[limits]\nmax_message_count = 100000\nmax_queue_size = 100000000\n\
         [[users]]\nname = \"u\"\npass_hash = \"plain;;password1\"\nqueues = [\"{queue}\"]\n\
         [[queues]]\nname = \"{queue}\"\n"
    )
}

async fn crash_and_recover(url: &str) {
    let queue = format!("crash.{}", broker_core::random::id());
    let (_dir, path) = write_config("broker.toml", &config(url, &queue));
    let mut b = spawn_broker(&path);

    // Every publish the broker answered 200 for; publishers stop at their first
    // refusal (none is expected under load).
    let load = Load::start(
        &b.http,
        &format!("{}/v1/queues/{queue}/messages", b.url),
        8,
        "",
        false,
    );
    load.wait_for(400).await;
    b.child.kill().unwrap(); // SIGKILL, mid-load
    b.child.wait().unwrap();
    let acked = load.stop().await;
    assert!(acked.len() >= 400);

    let b2 = spawn_broker(&path);
    let (stored, epoch) = read_all(&b2, &queue).await;
    for (_, _, e) in &acked {
        assert_eq!(e, &epoch, "the epoch survives the crash");
    }
    assert_stored_once(&stored, acked.iter().map(|(o, b, _)| (*o, b)));
    let last = *stored.keys().last().unwrap();
    let (s, v) = send(
        b2.post(&format!("/v1/queues/{queue}/messages"))
            .body("after"),
    )
    .await;
    assert_eq!(s, 200);
    assert!(v["offset"].as_u64().unwrap() > last, "no offset is reused");
}

#[actix_web::test]
async fn sqlite_loses_nothing_acknowledged_on_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    crash_and_recover(&format!("sqlite://{}/broker.db", dir.path().display())).await;
}

#[actix_web::test]
async fn postgres_loses_nothing_acknowledged_on_kill_9() {
    if let Some(db) = fresh_postgres() {
        crash_and_recover(&db.url).await;
    }
}

#[actix_web::test]
async fn delayed_messages_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/broker.db", dir.path().display());
    let (_d, path) = write_config("broker.toml", &config(&url, "later"));
    let mut b = spawn_broker(&path);
    let (s, v) = send(
        b.post("/v1/queues/later/messages?delay=2s")
            .body("from before the crash"),
    )
    .await;
    assert_eq!((s, v["scheduled"].as_bool()), (200, Some(true)));
    b.child.kill().unwrap();
    b.child.wait().unwrap();

    let b2 = spawn_broker(&path);
    let (s, v) = send(
        b2.get("/v1/queues/later/messages?since=0&wait=10s")
            .basic_auth("u", Some("password1")),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["messages"][0]["body"], "from before the crash", "{v}");
    assert_eq!(v["messages"][0]["offset"], 1);
}

#[actix_web::test]
async fn runtime_definitions_survive_kill_9() {
    const ADMIN: &str = "durable-admin-token-01";
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/broker.db", dir.path().display());
    let toml = format!(
        "{}\n[admin]\ntoken = \"{ADMIN}\"\n[pg_hooks]\nallow_anonymous = true\n\
         [webhooks]\nallow_targets = [\"127.0.0.1/32\"]\n",
        config(&url, "base")
    );
    let (_d, path) = write_config("broker.toml", &toml);
    let mut b = spawn_broker(&path);
    let def = serde_json::json!({"max_message_count": 7});
    let (s, _) = send(
        b.http
            .put(format!("{}/v1/queues/orders", b.url))
            .bearer_auth(ADMIN)
            .json(&def),
    )
    .await;
    assert_eq!(s, 200);
    let cron = serde_json::json!({"name": "nightly", "queue": "orders", "schedule": "0 2 * * *"});
    let (s, _) = send(b.post("/v1/crons").bearer_auth(ADMIN).json(&cron)).await;
    assert_eq!(s, 201);
    let pg = serde_json::json!({"name": "hooks", "callbackUrl": "http://127.0.0.1:9/x"});
    let (s, v) = json(b.post("/queues").json(&pg).send().await.unwrap()).await;
    assert_eq!((s, v["id"].as_u64()), (200, Some(1)));
    b.child.kill().unwrap();
    b.child.wait().unwrap();

    let b2 = spawn_broker(&path);
    let (s, v) = send(b2.get("/v1/queues/orders").bearer_auth(ADMIN)).await;
    assert_eq!(
        (
            s,
            v["limits"]["max_message_count"].as_u64(),
            v["runtime"].as_bool()
        ),
        (200, Some(7), Some(true)),
        "{v}"
    );
    let (_, v) = json(b2.get("/v1/crons").bearer_auth(ADMIN).send().await.unwrap()).await;
    assert_eq!(v["crons"][0]["name"], "nightly");
    let (_, v) = json(b2.get("/queues").send().await.unwrap()).await;
    assert_eq!(v[0]["name"], "hooks");
    let (s, v) = json(b2.post("/queues").json(&pg).send().await.unwrap()).await;
    assert_eq!(
        (s, v["id"].as_u64()),
        (200, Some(2)),
        "pg-hooks ids continue"
    );
}

#[actix_web::test]
async fn webhook_queue_clients_resume_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/broker.db", dir.path().display());
    let (_d, path) = write_config("broker.toml", &config(&url, "q"));
    let mut b = spawn_broker(&path);
    let user = |r: reqwest::RequestBuilder| r.basic_auth("u", Some("password1"));
    assert_eq!(
        user(b.get("/listen/c1/q")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        user(b.get("/listen/gone/q")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        user(b.get("/unlisten/gone")).send().await.unwrap().status(),
        200
    );
    for m in ["one", "two"] {
        b.post("/q/q").body(m).send().await.unwrap();
    }
    let (_, v) = json(user(b.get("/read/c1")).send().await.unwrap()).await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 2);
    b.post("/q/q").body("three").send().await.unwrap();
    b.child.kill().unwrap();
    b.child.wait().unwrap();

    let b2 = spawn_broker(&path);
    let user = |r: reqwest::RequestBuilder| r.basic_auth("u", Some("password1"));
    let (s, v) = json(user(b2.get("/read/c1")).send().await.unwrap()).await;
    assert_eq!(
        s, 200,
        "the client is still listening after the restart: {v}"
    );
    let got: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["three"], "exactly what it had not read");
    assert_eq!(
        user(b2.get("/read/gone")).send().await.unwrap().status(),
        404,
        "unlistened stays gone"
    );
}

#[actix_web::test]
async fn a_pending_retry_resumes_after_kill_9_at_its_time_and_count() {
    use std::time::Instant;
    // A target that always fails, recording when it is called.
    let hits: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let (tx, mut rx) = tokio::sync::watch::channel(0usize);
    let tx = Arc::new(tx);
    let rec = hits.clone();
    let sink = spawn_http(move |_, _| {
        let (rec, tx) = (rec.clone(), tx.clone());
        async move {
            let n = {
                let mut h = rec.lock().unwrap();
                h.push(Instant::now());
                h.len()
            };
            tx.send_replace(n);
            actix_web::HttpResponse::InternalServerError().finish()
        }
    }) + "/hook";

    const ADMIN: &str = "retry-admin-token-0123";
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/broker.db", dir.path().display());
    let toml = format!(
        "{}\n[admin]\ntoken = \"{ADMIN}\"\n[[queues.webhooks]]\nurl = \"{sink}\"\nmax_retries = 1\ndead_letter_queue = \"dlq\"\nbackoff = {{ schedule = [\"3s\"], jitter = 0.0 }}\n[[queues]]\nname = \"dlq\"\n[[queues]]\nname = \"barrier\"\n[[users]]\nname = \"ops\"\npass_hash = \"plain;;password2\"\nqueues = [\"dlq\"]\n",
        config(&url, "q")
    );
    let (_d, path) = write_config("broker.toml", &toml);
    let mut b = spawn_broker(&path);
    let t0 = Instant::now();
    b.post("/q/q").body("retry me").send().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n >= 1))
        .await
        .unwrap()
        .unwrap();
    // Until the retry is scheduled (and so its record queued for the store)…
    loop {
        let (_, v) = send(b.get("/v1/queues/q").bearer_auth(ADMIN)).await;
        if v["webhooks"][0]["next_attempt"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // …and an acknowledged publish after it has been committed (one writer, in order).
    assert_eq!(
        b.post("/q/barrier")
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    b.child.kill().unwrap();
    b.child.wait().unwrap();

    let b2 = spawn_broker(&path);
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n >= 2))
        .await
        .unwrap()
        .unwrap();
    let second = hits.lock().unwrap()[1];
    assert!(
        second - t0 >= Duration::from_millis(2900),
        "the retry kept its time: {:?}",
        second - t0
    );
    let (_, v) = send(
        b2.get("/v1/queues/dlq/messages?since=0&wait=10s")
            .basic_auth("ops", Some("password2")),
    )
    .await;
    assert_eq!(
        v["messages"][0]["headers"]["x-broker-attempts"], "2",
        "the count went on: {v}"
    );
    assert_eq!(hits.lock().unwrap().len(), 2, "not started over");
}

#[actix_web::test]
async fn a_failing_store_answers_503_flips_readyz_and_recovers_without_restart() {
    let Some(db) = fresh_postgres() else { return };
    let url = db.url.clone();
    let queue = format!("fail.{}", broker_core::random::id());
    let (_d, path) = write_config("broker.toml", &config(&url, &queue));
    let b = spawn_broker(&path);
    let publish = |body: &'static str| {
        b.post(&format!("/v1/queues/{queue}/messages"))
            .body(body)
            .send()
    };
    assert_eq!(publish("before").await.unwrap().status(), 200);

    // Break every write: messages, and the writer's probe (broker_state).
    let psql = |sql: String| psql(&url, &sql);
    let constraint = format!("block_{}", queue.replace('.', "_"));
    psql(format!(
        "ALTER TABLE messages ADD CONSTRAINT {constraint} CHECK (queue <> '{queue}') NOT VALID; \
         ALTER TABLE broker_state ADD CONSTRAINT {constraint} CHECK (false) NOT VALID"
    ));
    let (s, v) = json(publish("during").await.unwrap()).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (503, Some("store_unavailable")),
        "{v}"
    );
    let (s, v) = json(b.get("/readyz").send().await.unwrap()).await;
    assert_eq!((s, v["status"].as_str()), (503, Some("store_unavailable")));
    // What the probe saw is what Prometheus sees (the readiness-flapping alert's input).
    let m = b.metrics().await;
    assert_eq!(metric(&m, "broker_ready"), Some(0.0));
    assert_eq!(metric(&m, "broker_readiness_changes_total"), Some(1.0));
    assert!(metric(&m, "broker_store_errors_total").unwrap() >= 1.0);

    psql(format!(
        "ALTER TABLE messages DROP CONSTRAINT {constraint}; \
         ALTER TABLE broker_state DROP CONSTRAINT {constraint}"
    ));
    // Ready again by itself (the writer's probe), then publishes go through.
    let mut ready = false;
    for _ in 0..200 {
        if b.get("/readyz").send().await.unwrap().status() == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "ready again without a publish");
    assert_eq!(
        publish("after").await.unwrap().status(),
        200,
        "recovers without a restart"
    );
    let m = b.metrics().await;
    assert_eq!(metric(&m, "broker_ready"), Some(1.0));
    assert_eq!(metric(&m, "broker_readiness_changes_total"), Some(2.0));
    let bodies = bodies(&b, &queue, "u", "password1").await;
    assert_eq!(
        bodies,
        ["before", "after"],
        "what was refused was never acknowledged nor shown"
    );
    let m = b.metrics().await;
    assert!(crate::support::metric(&m, "broker_store_errors_total").unwrap() >= 1.0);
}

/// Stored runtime definitions that no longer fit the config are not loaded, and never
/// overwritten: the stored copy is kept aside (`runtime.unloaded.<ms>` in broker_state)
/// before the next save replaces `runtime`.
#[actix_web::test]
async fn unloadable_runtime_definitions_are_kept_aside_not_overwritten() {
    const ADMIN: &str = "durable-admin-token-02";
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let url = format!("sqlite://{}", db.display());
    let with_dlq = format!(
        "{}\n[admin]\ntoken = \"{ADMIN}\"\n[webhooks]\nallow_targets = [\"127.0.0.1/32\"]\n\
         [[queues]]\nname = \"dlq\"\n",
        config(&url, "base")
    );
    let (_d, path) = write_config("broker.toml", &with_dlq);
    let b = spawn_broker(&path);
    let def = serde_json::json!({
        "webhooks": [{"url": "http://127.0.0.1:9/", "dead_letter_queue": "dlq"}]
    });
    let put = |b: &crate::support::BrokerProcess, name: &str, def: &serde_json::Value| {
        b.http
            .put(format!("{}/v1/queues/{name}", b.url))
            .bearer_auth(ADMIN)
            .json(def)
            .send()
    };
    assert_eq!(put(&b, "orders", &def).await.unwrap().status(), 200);
    drop(b); // kill -9

    // The config no longer has the dead-letter queue the runtime queue names.
    std::fs::write(
        &path,
        format!("{}\n[admin]\ntoken = \"{ADMIN}\"\n", config(&url, "base")),
    )
    .unwrap();
    let b = spawn_broker(&path);
    assert_eq!(b.publish("orders", "x").await.0, 404, "not loaded");
    // A save of the runtime definitions now must not lose the stored copy.
    let other = serde_json::json!({"max_message_count": 5});
    assert_eq!(put(&b, "other", &other).await.unwrap().status(), 200);
    drop(b);
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             print('\\n'.join(k+' '+v for k,v in c.execute(\"select key, value from broker_state where key like 'runtime%'\")))",
        ])
        .arg(&db)
        .output()
        .unwrap();
    let rows = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let aside = rows
        .lines()
        .find(|l| l.starts_with("runtime.unloaded."))
        .unwrap_or_else(|| panic!("nothing kept aside: {rows}"));
    assert!(aside.contains("orders"), "{aside}");
    let current = rows.lines().find(|l| l.starts_with("runtime ")).unwrap();
    assert!(
        current.contains("other") && !current.contains("orders"),
        "{current}"
    );
}

#[actix_web::test]
async fn an_idempotency_key_is_remembered_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/broker.db", dir.path().display());
    let (_d, path) = write_config("broker.toml", &config(&url, "keyed"));
    let publish = |b: &crate::support::BrokerProcess, body: &str| {
        b.post("/v1/queues/keyed/messages")
            .header("idempotency-key", "payment-42")
            .body(body.to_owned())
    };
    let mut b = spawn_broker(&path);
    let (s, first) = send(publish(&b, "charge")).await;
    assert_eq!(s, 200, "{first}");
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let b2 = spawn_broker(&path);
    let (s, again) = send(publish(&b2, "charge (retried after the crash)")).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(
        (again["offset"].clone(), again["duplicate"].as_bool()),
        (first["offset"].clone(), Some(true))
    );
    assert_eq!(bodies(&b2, "keyed", "u", "password1").await, ["charge"]);
}
