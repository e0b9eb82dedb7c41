//! Webhook delivery: retries with backoff, Retry-After, timeouts, ordering, signatures,
//! dead letters.

use std::time::Duration;

use crate::support::{json, metric, spawn_broker, spawn_sink, Reply, USER};

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
        },
        1 => Reply {
            status: 200,
            retry_after: None,
            delay: Duration::from_secs(3),
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
    let (_, v) = json(
        b.read("/v1/queues/q2/messages?wait=10s")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let m = &v["messages"][0];
    assert_eq!(m["data"], serde_json::json!({"lost": 1}));
    assert_eq!(m["headers"]["x-broker-original-queue"], "q");
    assert_eq!(m["headers"]["x-broker-original-offset"], "1");
    assert_eq!(m["headers"]["x-broker-attempts"], "3");
    assert_eq!(m["headers"]["x-broker-last-status"], "502");
    assert_eq!(m["headers"]["x-broker-target"], sink.url);
    let metrics = b.metrics().await;
    assert_eq!(
        metric(&metrics, r#"broker_dead_lettered_total{queue="q"}"#),
        Some(1.0)
    );
    assert_eq!(metric(&metrics, "broker_leader"), Some(1.0));
}
