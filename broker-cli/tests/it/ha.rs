//! Several brokers on one PostgreSQL database, through the real binary: one is active,
//! the others stand by (503 `standby`, health and metrics only) and take over when it
//! dies, with offsets and the epoch going on; an active broker that loses its lock stops
//! at once; on Kubernetes each labels its pod `standby`, then `active` (checked against
//! a stand-in for the API server that records the patches).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::support::{
    bodies, fresh_postgres, metric, next_line, psql, send, spawn_broker_with, spawn_http,
    spawn_serve, write_config, BrokerProcess,
};

fn config(url: &str) -> String {
    format!(
        "[storage]\nurl = \"{url}\"\n[[users]]\nname = \"u\"\npass_hash = \"plain;;password1\"\nqueues = [\"q\"]\n[[queues]]\nname = \"q\"\n"
    )
}

/// Starts a broker that must stand by (another one is active).
fn spawn_standby(path: &std::path::Path, env: &[(&str, &str)]) -> BrokerProcess {
    let (child, mut lines) = spawn_serve(path, env);
    let url = next_line(&mut lines, "standby on ");
    BrokerProcess::new(child, url, lines)
}

async fn publish(b: &BrokerProcess, body: &'static str) -> (u16, Value) {
    send(b.post("/v1/queues/q/messages").body(body)).await
}

#[actix_web::test]
async fn a_standby_takes_over_when_the_active_broker_dies() {
    let Some(db) = fresh_postgres() else { return };
    let (_d, path) = write_config("broker.toml", &config(&db.url));
    let mut active = spawn_broker_with(&path, &[]);
    let mut standby = spawn_standby(&path, &[]);

    // The standby serves health and metrics, refuses the rest, and is not ready.
    let (s, v) = publish(&standby, "to the standby").await;
    assert_eq!((s, v["code"].as_str()), (503, Some("standby")), "{v}");
    assert_eq!(standby.get("/healthz").send().await.unwrap().status(), 200);
    assert_eq!(standby.get("/readyz").send().await.unwrap().status(), 503);
    let r = standby.get("/readyz?standby=ok").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let m = standby.metrics().await;
    assert_eq!(metric(&m, "broker_leader"), Some(0.0));
    assert_eq!(metric(&active.metrics().await, "broker_leader"), Some(1.0));

    let (s, first) = publish(&active, "one").await;
    assert_eq!(s, 200, "{first}");
    active.child.kill().unwrap();
    active.child.wait().unwrap();

    // The standby becomes active on the same address, and the queue goes on.
    assert_eq!(next_line(&mut standby.lines, "listening on "), standby.url);
    let (s, second) = publish(&standby, "two").await;
    assert_eq!(s, 200, "{second}");
    assert_eq!(second["epoch"], first["epoch"], "same history");
    assert_eq!(second["offset"], first["offset"].as_u64().unwrap() + 1);
    let bodies = bodies(&standby, "q", "u", "password1").await;
    assert_eq!(bodies, ["one", "two"]);
    assert_eq!(metric(&standby.metrics().await, "broker_leader"), Some(1.0));
    assert_eq!(standby.get("/readyz").send().await.unwrap().status(), 200);
}

#[actix_web::test]
async fn an_active_broker_that_loses_its_lock_stops_at_once() {
    let Some(db) = fresh_postgres() else { return };
    let (_d, path) = write_config("broker.toml", &config(&db.url));
    let mut b = spawn_broker_with(&path, &[]);
    assert_eq!(publish(&b, "x").await.0, 200);
    // The database ends the lock's session (as it does when it restarts or loses the
    // broker's connection).
    psql(
        &db.url,
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
         AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = b.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still serving without its lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(1));
}

/// One request the API stand-in saw: method and path, content type, authorization, body.
type Patch = (String, String, String, Value);
/// What the API stand-in saw.
type Seen = Arc<Mutex<Vec<Patch>>>;

/// A stand-in for the Kubernetes API server: records each PATCH (path, content type,
/// authorization, body) and answers 200.
fn spawn_api() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let rec = seen.clone();
    let url = spawn_http(move |req, body: actix_web::web::Bytes| {
        let rec = rec.clone();
        async move {
            let header = |n: &str| {
                req.headers()
                    .get(n)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            };
            rec.lock().unwrap().push((
                format!("{} {}", req.method(), req.path()),
                header("content-type"),
                header("authorization"),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ));
            actix_web::HttpResponse::Ok().json(serde_json::json!({"kind": "Pod"}))
        }
    });
    (url, seen)
}

/// Waits (bounded) until the API has seen `n` patches.
async fn patches(seen: &Mutex<Vec<Patch>>, n: usize) -> Vec<Patch> {
    for _ in 0..500 {
        let s = seen.lock().unwrap().clone();
        if s.len() >= n {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} patches: {:?}", seen.lock().unwrap());
}

#[actix_web::test]
async fn on_kubernetes_each_broker_labels_its_pod_with_its_role() {
    let Some(db) = fresh_postgres() else { return };
    let (api, seen) = spawn_api();
    let sa = tempfile::tempdir().unwrap();
    std::fs::write(sa.path().join("namespace"), "brokers\n").unwrap();
    std::fs::write(sa.path().join("token"), "sa-token-1\n").unwrap();
    let sa_dir = sa.path().to_str().unwrap();
    let env = |pod: &'static str| {
        [
            ("BROKER_K8S_ROLE_LABEL", "broker.io/role"),
            ("BROKER_K8S_POD_NAME", pod),
            ("BROKER_K8S_API", api.as_str()),
            ("BROKER_K8S_SA_DIR", sa_dir),
        ]
    };
    let (_d, path) = write_config("broker.toml", &config(&db.url));
    let mut a = spawn_broker_with(&path, &env("broker-a"));
    let first = patches(&seen, 1).await;
    assert_eq!(
        first[0],
        (
            "PATCH /api/v1/namespaces/brokers/pods/broker-a".to_owned(),
            "application/merge-patch+json".to_owned(),
            "Bearer sa-token-1".to_owned(),
            serde_json::json!({"metadata": {"labels": {"broker.io/role": "active"}}}),
        )
    );
    // The token is read for every request (kubelet rotates it).
    std::fs::write(sa.path().join("token"), "sa-token-2\n").unwrap();
    let _b = spawn_standby(&path, &env("broker-b"));
    let two = patches(&seen, 2).await;
    assert_eq!(two[1].0, "PATCH /api/v1/namespaces/brokers/pods/broker-b");
    assert_eq!(two[1].2, "Bearer sa-token-2");
    assert_eq!(two[1].3["metadata"]["labels"]["broker.io/role"], "standby");
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let three = patches(&seen, 3).await;
    assert_eq!(three[2].0, "PATCH /api/v1/namespaces/brokers/pods/broker-b");
    assert_eq!(three[2].3["metadata"]["labels"]["broker.io/role"], "active");
}
