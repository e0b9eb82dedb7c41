//! Webhook delivery: retries with backoff, Retry-After, timeouts, ordering, signatures,
//! dead letters.

use std::time::Duration;

use crate::support::{json, metric, send, spawn_broker, spawn_sink, Reply, USER};

fn queue_with_webhook(sink: &str, extra: &str) -> String {
    format!(
        r#"{USER}
[[queues]]
name = "q"
[[queues.webhooks]]
url = "{sink}"
{extra}
[[queues]]
name = "q2"
"#
    )
}

#[actix_web::test]
async fn fails_twice_then_succeeds_exactly_once_with_backoff() {
    let mut sink = spawn_sink(|n, _| Reply::status(if n < 2 { 500 } else { 200 })).await;
    let b = spawn_broker(&queue_with_webhook(
        &sink.url,
        "max_retries = 5\nbackoff = { schedule = [\"150ms\", \"300ms\"], jitter = 0.0 }",
    ))
    .await;
    let res = b
        .post("/v1/queues/q/messages")
        .header("content-type", "application/json")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let hits = sink.wait_hits(3).await;
    assert!(hits
        .iter()
        .all(|h| &h.body[..] == br#"{"n":1}"# && h.method == "POST"));
    assert_eq!(hits[0].headers["content-type"], "application/json");
    let gap1 = hits[1].at - hits[0].at;
    let gap2 = hits[2].at - hits[1].at;
    assert!(
        gap1 >= Duration::from_millis(140),
        "first retry after the first delay: {gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(290),
        "second retry after the second delay: {gap2:?}"
    );
    b.wait_for_metric(
        r#"broker_webhook_deliveries_total{outcome="success",queue="q"}"#,
        1.0,
    )
    .await;
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"broker_webhook_deliveries_total{outcome="retry",queue="q"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, r#"broker_webhook_in_flight{queue="q"}"#),
        Some(0.0)
    );
    // Nothing more after the success (checked for a while: an absence has no event).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.len(), 3);
}

#[actix_web::test]
async fn retry_after_is_honoured_and_timeouts_are_failures() {
    let mut sink = spawn_sink(|n, _| match n {
        0 => Reply {
            status: 503,
            retry_after: Some("1"),
            delay: Duration::ZERO,
            location: None,
        },
        1 => Reply {
            status: 200,
            retry_after: None,
            delay: Duration::from_secs(3),
            location: None,
        },
        _ => Reply::status(200),
    })
    .await;
    let b = spawn_broker(&queue_with_webhook(
        &sink.url,
        "timeout = \"300ms\"\nbackoff = { schedule = [\"10ms\"], jitter = 0.0 }",
    ))
    .await;
    b.post("/v1/queues/q/messages")
        .body("x")
        .send()
        .await
        .unwrap();
    let hits = sink.wait_hits(3).await;
    assert!(
        hits[1].at - hits[0].at >= Duration::from_millis(990),
        "Retry-After: 1 waits a second, not 10 ms"
    );
    assert!(
        hits[2].at - hits[1].at < Duration::from_secs(2),
        "the slow answer timed out after 300 ms and was retried"
    );
    b.wait_for_metric(
        r#"broker_webhook_deliveries_total{outcome="success",queue="q"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &b.metrics().await,
            r#"broker_webhook_deliveries_total{outcome="retry",queue="q"}"#
        ),
        Some(2.0)
    );
}

#[actix_web::test]
async fn one_in_flight_keeps_order_under_retries() {
    // Every message fails its first attempt.
    let seen = std::sync::Mutex::new(std::collections::HashSet::<Vec<u8>>::new());
    let mut sink = spawn_sink(move |_, h| {
        let fresh = seen.lock().unwrap().insert(h.body.to_vec());
        Reply::status(if fresh { 500 } else { 200 })
    })
    .await;
    let b = spawn_broker(&queue_with_webhook(
        &sink.url,
        "max_in_flight = 1\nbackoff = { schedule = [\"20ms\"], jitter = 0.0 }",
    ))
    .await;
    for i in 1..=5 {
        b.post("/v1/queues/q/messages")
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
    }
    let hits = sink.wait_hits(10).await;
    let bodies: Vec<String> = hits
        .iter()
        .map(|h| String::from_utf8(h.body.to_vec()).unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["m1", "m1", "m2", "m2", "m3", "m3", "m4", "m4", "m5", "m5"]
    );
}

#[actix_web::test]
async fn signatures_verify_with_the_standardwebhooks_crate() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut sink = spawn_sink(|n, _| Reply::status(if n == 0 { 500 } else { 200 })).await;
    let b = spawn_broker(&queue_with_webhook(
        &sink.url,
        &format!(
            "signing_secret = \"{SECRET}\"\nbackoff = {{ schedule = [\"10ms\"], jitter = 0.0 }}"
        ),
    ))
    .await;
    b.post("/v1/queues/q/messages")
        .header("content-type", "application/json")
        .body(r#"{"signed":true}"#)
        .send()
        .await
        .unwrap();
    let hits = sink.wait_hits(2).await;
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    for h in &hits {
        let mut headers = reqwest::header::HeaderMap::new();
        for k in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            headers.insert(k, h.headers[k].parse().unwrap());
        }
        verifier
            .verify(&h.body, &headers)
            .expect("a valid Standard Webhooks signature");
        let mut tampered = h.body.to_vec();
        tampered.push(b' ');
        assert!(verifier.verify(&tampered, &headers).is_err());
    }
    assert_eq!(
        hits[0].headers["webhook-id"], hits[1].headers["webhook-id"],
        "stable across retries"
    );
}

#[actix_web::test]
async fn exhausted_messages_are_dead_lettered_with_their_story() {
    let mut sink = spawn_sink(|_, _| Reply::status(502)).await;
    let b = spawn_broker(&format!(
        r#"{USER}
[[queues]]
name = "q"
[[queues.webhooks]]
url = "{}"
max_retries = 2
dead_letter_queue = "q2"
backoff = {{ schedule = ["10ms"], jitter = 0.0 }}
[[queues]]
name = "q2"
"#,
        sink.url
    ))
    .await;
    b.post("/v1/queues/q/messages")
        .header("content-type", "application/json")
        .body(r#"{"lost":1}"#)
        .send()
        .await
        .unwrap();
    sink.wait_hits(3).await;
    let (_, v) = send(b.read("/v1/queues/q2/messages?wait=10s")).await;
    let m = &v["messages"][0];
    assert_eq!(m["data"], serde_json::json!({"lost": 1}));
    assert_eq!(m["headers"]["x-broker-original-queue"], "q");
    assert_eq!(m["headers"]["x-broker-original-offset"], "1");
    assert_eq!(m["headers"]["x-broker-attempts"], "3");
    assert_eq!(m["headers"]["x-broker-last-status"], "502");
    assert_eq!(m["headers"]["x-broker-target"], sink.url);
    // The counter moves once the dead-letter queue acknowledged the append, which a
    // reader of that queue can observe first: await it rather than read it once.
    b.wait_for_metric(r#"broker_dead_lettered_total{queue="q"}"#, 1.0)
        .await;
    assert_eq!(metric(&b.metrics().await, "broker_leader"), Some(1.0));
}

const ADMIN: &str = "admin-token-0123456789";

#[actix_web::test]
async fn admin_api_runtime_queues_crons_status_and_redrive() {
    // The sink refuses everything until `open` is set.
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = open.clone();
    let mut sink = spawn_sink(move |_, _| {
        Reply::status(if gate.load(std::sync::atomic::Ordering::SeqCst) {
            200
        } else {
            500
        })
    })
    .await;
    let b = spawn_broker(&format!(
        "{USER}\n[admin]\ntoken = \"{ADMIN}\"\n[webhooks]\nallow_targets = [\"127.0.0.1/32\"]\n\
         [[queues]]\nname = \"q\"\n[[queues]]\nname = \"dlq\"\n"
    ))
    .await;
    let def = serde_json::json!({
        "max_message_count": 50,
        "webhooks": [{
            "url": sink.url, "max_retries": 1, "dead_letter_queue": "dlq",
            "signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "backoff": {"schedule": ["10ms"], "jitter": 0.0}
        }]
    });
    let (s, _) = json(b.put("/v1/queues/orders").json(&def).send().await.unwrap()).await;
    assert_eq!(s, 401, "admin only");
    let (s, v) = send(b.put("/v1/queues/orders").bearer_auth(ADMIN).json(&def)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["runtime"].as_bool(),
            v["limits"]["max_message_count"].as_u64()
        ),
        (Some(true), Some(50))
    );
    assert_eq!(
        v["definition"]["webhooks"][0]["signing_secret"], "***",
        "secrets are redacted"
    );
    let (s, v) = send(b.put("/v1/queues/q").bearer_auth(ADMIN).json(&def)).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("defined_in_config")));
    let bad = serde_json::json!({"webhooks": [{"url": "ftp://x"}]});
    let (s, v) = send(b.put("/v1/queues/bad").bearer_auth(ADMIN).json(&bad)).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_definition")));
    assert!(
        v["message"].as_str().unwrap().contains("webhooks[0].url"),
        "{v}"
    );

    // Refused twice (1 retry) → dead-lettered.
    b.post("/v1/queues/orders/messages")
        .body("order-1")
        .send()
        .await
        .unwrap();
    sink.wait_hits(2).await;
    b.wait_for_metric(r#"broker_dead_lettered_total{queue="orders"}"#, 1.0)
        .await;
    let (_, v) = send(
        b.get("/v1/queues/orders")
            .header("X-PLATFORMATIC-ADMIN-SECRET", ADMIN),
    )
    .await;
    let st = &v["webhooks"][0];
    assert_eq!(
        (
            st["failed"].as_u64(),
            st["in_flight"].as_u64(),
            st["active"].as_bool()
        ),
        (Some(1), Some(0), Some(true)),
        "{v}"
    );
    assert_eq!(st["last_error"], "HTTP 500 Internal Server Error");

    // The target recovers; redrive delivers the dead letter.
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    let (s, v) = send(b.post("/v1/queues/dlq/redrive").bearer_auth(ADMIN)).await;
    assert_eq!(
        (s, v["redriven"].as_u64(), v["offset"].as_u64()),
        (200, Some(1), Some(1)),
        "{v}"
    );
    let hits = sink.wait_hits(3).await;
    assert_eq!(&hits[2].body[..], b"order-1");
    assert!(
        !hits[2].headers.contains_key("x-broker-original-queue"),
        "redriven as published, not as a dead letter"
    );

    // Crons.
    let cron = serde_json::json!({"name": "tick", "queue": "orders", "schedule": "0 0 1 1 *", "body": "{}"});
    let (s, v) = send(b.post("/v1/crons").bearer_auth(ADMIN).json(&cron)).await;
    assert_eq!((s, v["name"].as_str()), (201, Some("tick")), "{v}");
    assert!(v["next_run"]
        .as_str()
        .unwrap()
        .ends_with("-01-01T00:00:00.000Z"));
    let (s, _) = send(b.post("/v1/crons").bearer_auth(ADMIN).json(&cron)).await;
    assert_eq!(s, 409);
    let bad = serde_json::json!({"name": "x", "queue": "orders", "schedule": "every day"});
    let (s, _) = send(b.post("/v1/crons").bearer_auth(ADMIN).json(&bad)).await;
    assert_eq!(s, 400);
    let (_, v) = json(b.get("/v1/crons").bearer_auth(ADMIN).send().await.unwrap()).await;
    assert_eq!(v["crons"].as_array().unwrap().len(), 1);
    let (s, _) = send(b.delete("/v1/crons/tick").bearer_auth(ADMIN)).await;
    assert_eq!(s, 200);

    // Runtime queues survive a reload of the config file; then they can be deleted.
    b.post("/reload").bearer_auth(ADMIN).send().await.unwrap();
    let (s, _) = send(b.get("/v1/queues/orders").bearer_auth(ADMIN)).await;
    assert_eq!(s, 200);
    let (s, _) = send(b.delete("/v1/queues/orders").bearer_auth(ADMIN)).await;
    assert_eq!(s, 200);
    let (s, _) = send(b.post("/v1/queues/orders/messages").body("x")).await;
    assert_eq!(s, 404);
}

/// Publishers cannot set the broker's own headers (a forged `x-broker-original-queue`
/// would let a redrive publish into another queue) nor, through a message, the headers
/// a delivery's connection, credentials or signature use: refused at ingest, or never
/// forwarded.
#[actix_web::test]
async fn publishers_cannot_forge_broker_or_connection_headers() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let sink = spawn_sink(|_, _| Reply::status(200)).await;
    let b = spawn_broker(&queue_with_webhook(
        &sink.url,
        &format!("signing_secret = \"{SECRET}\""),
    ))
    .await;
    // A new target delivers what is published once it has started (on its own thread):
    // warm up until it delivers.
    let mut warm = 0;
    while sink.hits.lock().unwrap().is_empty() {
        assert!(warm < 50, "the target never delivered");
        b.post("/v1/queues/q/messages")
            .body("warm")
            .send()
            .await
            .unwrap();
        warm += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for headers in [
        serde_json::json!({"x-broker-original-queue": "q2"}),
        serde_json::json!({"X-Broker-Target": "http://elsewhere/"}),
        serde_json::json!({"bad name": "x"}),
        serde_json::json!({"x-ok": "line\r\nInjected: 1"}),
    ] {
        let (s, v) = send(
            b.post("/v1/queues/q/batch")
                .json(&serde_json::json!({"messages": [{"body": "x", "headers": headers}]})),
        )
        .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("invalid_header")),
            "{headers}: {v}"
        );
    }
    let forged = serde_json::json!({
        "host": "evil.example",
        "authorization": "Bearer stolen",
        "cookie": "session=1",
        "webhook-id": "msg_forged",
        "content-type": "text/evil",
        "x-trace": "kept",
    });
    let (s, v) = send(
        b.post("/v1/queues/q/batch")
            .json(&serde_json::json!({"messages": [{"data": {"n": 1}, "headers": forged}]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let hit = loop {
        let found = sink
            .hits
            .lock()
            .unwrap()
            .iter()
            .find(|h| h.headers.contains_key("x-trace"))
            .cloned();
        if let Some(h) = found {
            break h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the forged message never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(hit.headers.get("x-trace").map(String::as_str), Some("kept"));
    assert!(!hit.headers.contains_key("authorization"));
    assert!(!hit.headers.contains_key("cookie"));
    assert_ne!(
        hit.headers.get("host").map(String::as_str),
        Some("evil.example")
    );
    assert_eq!(
        hit.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert!(
        hit.headers["webhook-id"].starts_with("msg_") && hit.headers["webhook-id"] != "msg_forged",
        "the broker's own id: {:?}",
        hit.headers["webhook-id"]
    );
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"broker_rejected_total{queue="q",reason="invalid_header"}"#
        ),
        Some(4.0)
    );
}

/// Credentials in a target's URL or headers never leave the broker: not in the
/// dead-letter headers, not in the admin API, not in the last error.
#[actix_web::test]
async fn target_credentials_are_never_shown() {
    let mut sink = spawn_sink(|_, _| Reply::status(500)).await;
    // The sink's address with credentials in user info, query and a token-like segment.
    let with_secrets = sink.url.replacen("http://", "http://user:pa55word@", 1)
        + "/in/abcdefghijklmnopqrstuvwxyz?token=topsecret";
    let b = spawn_broker(&format!(
        r#"{USER}
[admin]
token = "{ADMIN}"
[[queues]]
name = "q"
[[queues.webhooks]]
url = "{with_secrets}"
max_retries = 0
dead_letter_queue = "q2"
headers = {{ authorization = "Bearer header-secret" }}
[[queues]]
name = "q2"
"#
    ))
    .await;
    // A new target starts with what is published after it has started (on its own
    // thread): publish until it delivers; each delivery is refused and dead-lettered.
    for _ in 0..50 {
        b.post("/v1/queues/q/messages")
            .body("x")
            .send()
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if !sink.hits.lock().unwrap().is_empty() {
            break;
        }
    }
    sink.wait_hits(1).await;
    let (_, v) = send(b.read("/v1/queues/q2/messages?wait=10s")).await;
    let (_, admin) = send(b.get("/v1/queues/q").bearer_auth(ADMIN)).await;
    for shown in [v.to_string(), admin.to_string()] {
        for secret in [
            "pa55word",
            "topsecret",
            "abcdefghijklmnopqrstuvwxyz",
            "header-secret",
        ] {
            assert!(!shown.contains(secret), "{secret} shown: {shown}");
        }
    }
    let target = v["messages"][0]["headers"]["x-broker-target"]
        .as_str()
        .unwrap();
    assert!(target.ends_with("/in/***"), "{target}");
}

/// Targets defined at runtime (admin API, pg-hooks routes) cannot reach internal
/// addresses — loopback, private, link-local (cloud metadata), also through a name that
/// resolves there — unless `webhooks.allow_targets` lets them; config-file targets are
/// trusted; runtime definitions have quotas; no delivery follows a redirect.
#[actix_web::test]
async fn runtime_targets_cannot_reach_internal_addresses_and_redirects_are_not_followed() {
    const ADMIN: &str = "ssrf-admin-token-0123";
    let mut elsewhere = spawn_sink(|_, _| Reply::status(200)).await;
    let to = elsewhere.url.clone();
    let mut sink = spawn_sink(move |n, _| match n {
        0 => Reply::redirect(&to),
        _ => Reply::status(200),
    })
    .await;
    // The config-file target on loopback is trusted.
    let b = spawn_broker(&format!(
        "{}\n[admin]\ntoken = \"{ADMIN}\"\n[limits]\nmax_runtime_queues = 2\n",
        queue_with_webhook(
            &sink.url,
            "max_retries = 3\nbackoff = { schedule = [\"10ms\"], jitter = 0.0 }"
        )
    ))
    .await;
    for (url, why) in [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://localhost:9/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:9/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]:9/hook", "loopback"),
    ] {
        let def = serde_json::json!({"webhooks": [{"url": url}]});
        let (s, v) = send(b.put("/v1/queues/rt").bearer_auth(ADMIN).json(&def)).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("target_not_allowed")),
            "{url}: {v}"
        );
        assert!(v["message"].as_str().unwrap().contains(why), "{url}: {v}");
    }
    // A public address is accepted (nothing listens there; nothing is sent in this test).
    let def = serde_json::json!({"webhooks": [{"url": "http://192.0.2.10/hook"}]});
    let (s, v) = send(b.put("/v1/queues/rt").bearer_auth(ADMIN).json(&def)).await;
    assert_eq!(s, 200, "{v}");
    // Quotas: two runtime queues at most.
    let (s, _) = send(
        b.put("/v1/queues/rt2")
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = send(
        b.put("/v1/queues/rt3")
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({})),
    )
    .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (429, Some("too_many_definitions")),
        "{v}"
    );

    // The redirect is a failed attempt, retried at the same target, never followed.
    b.post("/v1/queues/q/messages")
        .body("m")
        .send()
        .await
        .unwrap();
    let hits = sink.wait_hits(2).await;
    assert_eq!(&hits[1].body[..], b"m");
    b.wait_for_metric(
        r#"broker_webhook_deliveries_total{outcome="success",queue="q"}"#,
        1.0,
    )
    .await;
    assert_eq!(elsewhere.len(), 0, "the redirect was not followed");
    let (_, v) = send(b.get("/v1/queues/q").bearer_auth(ADMIN)).await;
    let last = v["webhooks"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        last.starts_with("HTTP 307") && last.contains("redirect to http://127.0.0.1:"),
        "the failed attempt says where it pointed: {v}"
    );
    let _ = &mut elsewhere;
}

/// With `webhooks.allow_targets`, a runtime target may reach that internal network,
/// and its deliveries arrive (through the resolver that guards runtime targets).
#[actix_web::test]
async fn allowed_internal_networks_are_reachable_by_runtime_targets() {
    const ADMIN: &str = "ssrf-admin-token-4567";
    let mut sink = spawn_sink(|_, _| Reply::status(200)).await;
    let b = spawn_broker(&format!(
        "{USER}\n[admin]\ntoken = \"{ADMIN}\"\n[webhooks]\nallow_targets = [\"127.0.0.0/8\", \"::1/128\"]\n"
    ))
    .await;
    // By name: the guarded resolver lets the allowed loopback address through.
    let url = sink.url.replace("127.0.0.1", "localhost");
    let def = serde_json::json!({"webhooks": [{"url": url}]});
    let (s, v) = send(b.put("/v1/queues/rt").bearer_auth(ADMIN).json(&def)).await;
    assert_eq!(s, 200, "{v}");
    b.post("/v1/queues/rt/messages")
        .body("in")
        .send()
        .await
        .unwrap();
    let hits = sink.wait_hits(1).await;
    assert_eq!(&hits[0].body[..], b"in");
}

/// A redrive that meets an error says how far it got (`redriven`, `offset`) with the
/// error, and a repeated redrive does not republish what an earlier one did.
#[actix_web::test]
async fn redrive_reports_progress_on_error_and_is_safe_to_repeat() {
    const ADMIN: &str = "redrive-admin-token-89";
    let b = spawn_broker(&format!(
        "{USER}\n[admin]\ntoken = \"{ADMIN}\"\n[webhooks]\nallow_targets = [\"127.0.0.1/32\"]\n\
         [[queues]]\nname = \"dlq\"\n"
    ))
    .await;
    // Two runtime queues whose target refuses every connection: each message is
    // dead-lettered at once.
    let def = serde_json::json!({
        "webhooks": [{"url": "http://127.0.0.1:9/", "max_retries": 0, "dead_letter_queue": "dlq"}]
    });
    for q in ["p.a", "p.b"] {
        let (s, v) = send(
            b.put(&format!("/v1/queues/{q}"))
                .bearer_auth(ADMIN)
                .json(&def),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    // Dead letters at dlq offsets 1 (p.a), 2 (p.b), 3 (p.a), in that order.
    for (n, q) in ["p.a", "p.b", "p.a"].iter().enumerate() {
        b.post(&format!("/v1/queues/{q}/messages"))
            .body(format!("m{n}"))
            .send()
            .await
            .unwrap();
        let total = |t: String| {
            ["p.a", "p.b"]
                .iter()
                .filter_map(|q| metric(&t, &format!("broker_dead_lettered_total{{queue=\"{q}\"}}")))
                .sum::<f64>()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while total(b.metrics().await) < (n + 1) as f64 {
            assert!(
                std::time::Instant::now() < deadline,
                "dead letter {n} missing"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let head = |v: &serde_json::Value| v["offset"].as_u64();
    // p.b goes away: redriving its dead letter fails.
    let (s, _) = send(b.delete("/v1/queues/p.b").bearer_auth(ADMIN)).await;
    assert_eq!(s, 200);
    let (_, a) = send(b.get("/v1/queues/p.a").bearer_auth(ADMIN)).await;
    assert_eq!(head(&a), Some(2));

    let (s, v) = send(b.post("/v1/queues/dlq/redrive").bearer_auth(ADMIN)).await;
    assert_eq!(
        (
            s,
            v["code"].as_str(),
            v["redriven"].as_u64(),
            v["offset"].as_u64()
        ),
        (404, Some("unknown_queue"), Some(1), Some(1)),
        "stopped at dead letter 2 after redriving 1: {v}"
    );
    let (_, a) = send(b.get("/v1/queues/p.a").bearer_auth(ADMIN)).await;
    assert_eq!(head(&a), Some(3), "m0 republished into p.a");

    // Repeated as is: m0 is not republished again.
    let (s, v) = send(b.post("/v1/queues/dlq/redrive").bearer_auth(ADMIN)).await;
    assert_eq!(
        (s, v["redriven"].as_u64(), v["offset"].as_u64()),
        (404, Some(0), Some(1))
    );
    let (_, a) = send(b.get("/v1/queues/p.a").bearer_auth(ADMIN)).await;
    assert_eq!(head(&a), Some(3), "a repeat republishes nothing twice");

    // Past the one that cannot go anywhere: m2 is republished.
    let body = serde_json::json!({"since": 2, "limit": 1});
    let (s, v) = send(
        b.post("/v1/queues/dlq/redrive")
            .bearer_auth(ADMIN)
            .json(&body),
    )
    .await;
    assert_eq!(
        (s, v["redriven"].as_u64(), v["offset"].as_u64()),
        (200, Some(1), Some(3)),
        "{v}"
    );
    let (_, a) = send(b.get("/v1/queues/p.a").bearer_auth(ADMIN)).await;
    assert_eq!(head(&a), Some(4));
}

/// While a target is down and holds its maximum in flight, the backlog keeps counting:
/// `broker_webhook_pending` and the admin API's `pending` grow with every publish.
#[actix_web::test]
async fn the_backlog_is_counted_while_the_target_is_down() {
    const ADMIN: &str = "backlog-admin-token-01";
    let sink = spawn_sink(|_, _| Reply::status(500)).await;
    let b = spawn_broker(&format!(
        "{}\n[admin]\ntoken = \"{ADMIN}\"\n",
        queue_with_webhook(
            &sink.url,
            "max_in_flight = 2\nmax_retries = 5\nbackoff = { schedule = [\"1h\"], jitter = 0.0 }"
        )
    ))
    .await;
    // The first two are taken into delivery (and fail, to be retried in an hour).
    for i in 0..2 {
        b.post("/v1/queues/q/messages")
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
    }
    b.wait_for_metric(r#"broker_webhook_in_flight{queue="q"}"#, 2.0)
        .await;
    let batch = serde_json::json!({
        "messages": (0..498).map(|i| serde_json::json!({"body": format!("n{i}")})).collect::<Vec<_>>()
    });
    let (s, _) = send(b.post("/v1/queues/q/batch").json(&batch)).await;
    assert_eq!(s, 200);
    b.wait_for_metric(r#"broker_webhook_pending{queue="q"}"#, 498.0)
        .await;
    let (_, v) = send(b.get("/v1/queues/q").bearer_auth(ADMIN)).await;
    assert_eq!(
        (
            v["webhooks"][0]["pending"].as_u64(),
            v["webhooks"][0]["in_flight"].as_u64()
        ),
        (Some(498), Some(2)),
        "{v}"
    );
}

/// `Retry-After: 0` does not shorten the target's backoff: no busy loop into the
/// dead-letter queue.
#[actix_web::test]
async fn retry_after_zero_waits_the_backoff() {
    let mut sink = spawn_sink(|_, _| Reply {
        retry_after: Some("0"),
        ..Reply::status(429)
    })
    .await;
    let b = spawn_broker(&queue_with_webhook(
        &sink.url,
        "max_retries = 2\nbackoff = { schedule = [\"300ms\"], jitter = 0.0 }",
    ))
    .await;
    b.post("/v1/queues/q/messages")
        .body("x")
        .send()
        .await
        .unwrap();
    let hits = sink.wait_hits(3).await;
    for pair in hits.windows(2) {
        assert!(
            pair[1].at - pair[0].at >= Duration::from_millis(290),
            "retried after {:?}",
            pair[1].at - pair[0].at
        );
    }
}

/// A dead letter is redriven to the target that gave up on it — not to the queue's
/// other targets — under the `webhook-id` its first attempts had, and only once; a
/// redrive that finds nothing says so.
#[actix_web::test]
async fn redrive_goes_to_the_failed_target_once_under_its_id() {
    const ADMIN: &str = "redrive-target-token-01";
    let mut good = spawn_sink(|_, _| Reply::status(200)).await;
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = open.clone();
    let mut bad = spawn_sink(move |_, _| {
        Reply::status(if gate.load(std::sync::atomic::Ordering::SeqCst) {
            200
        } else {
            500
        })
    })
    .await;
    let b = spawn_broker(&format!(
        "{USER}\n[admin]\ntoken = \"{ADMIN}\"\n[[queues]]\nname = \"q\"\n\
         [[queues.webhooks]]\nurl = \"{}\"\n\
         [[queues.webhooks]]\nurl = \"{}\"\nmax_retries = 0\ndead_letter_queue = \"dlq\"\n\
         signing_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n\
         [[queues]]\nname = \"dlq\"\n",
        good.url, bad.url
    ))
    .await;
    for i in 0..3 {
        b.post("/v1/queues/q/messages")
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
    }
    good.wait_hits(3).await;
    let first = bad.wait_hits(3).await;
    b.wait_for_metric(r#"broker_dead_lettered_total{queue="q"}"#, 3.0)
        .await;
    open.store(true, std::sync::atomic::Ordering::SeqCst);

    let (s, v) = send(b.post("/v1/queues/dlq/redrive").bearer_auth(ADMIN)).await;
    assert_eq!((s, v["redriven"].as_u64()), (200, Some(3)), "{v}");
    let hits = bad.wait_hits(6).await;
    let ids = |h: &[crate::support::Hit]| {
        let mut v: Vec<String> = h.iter().map(|h| h.headers["webhook-id"].clone()).collect();
        v.sort();
        v
    };
    assert_eq!(
        ids(&hits[3..6]),
        ids(&first[..3]),
        "redriven under the ids of the first attempts"
    );
    assert!(
        hits[3..].iter().all(|h| h
            .headers
            .keys()
            .all(|k| !k.starts_with("x-broker-redrive-"))),
        "the redrive's own headers stay inside"
    );
    // A marker after the redriven messages: the good target gets it next, having
    // skipped what was redriven for the other one.
    b.post("/v1/queues/q/messages")
        .body("marker")
        .send()
        .await
        .unwrap();
    let got = good.wait_hits(4).await;
    assert_eq!(
        &got[3].body[..],
        b"marker",
        "the other target received nothing redriven"
    );

    // Again: nothing left to redrive, and nothing is sent.
    let (s, v) = send(b.post("/v1/queues/dlq/redrive").bearer_auth(ADMIN)).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("no_dead_letters")),
        "{v}"
    );
    bad.wait_hits(7).await; // the marker
    assert_eq!(bad.len(), 7);
}
