//! Delayed messages: `?delay=` and `?at=`.

use std::time::{Duration, Instant};

use crate::support::{json, metric, send, spawn_broker, USER};

#[actix_web::test]
async fn delayed_messages_appear_at_their_time_in_due_order() {
    let b = spawn_broker(&format!("{USER}\n[[queues]]\nname = \"q\"\n")).await;
    let start = Instant::now();
    // Published late-first: the 1 s one becomes visible before the 2 s one.
    let (s, v) = send(b.post("/v1/queues/q/messages?delay=2s").body("second")).await;
    assert_eq!(
        (s, v["scheduled"].as_bool(), v["count"].as_u64()),
        (200, Some(true), Some(1)),
        "{v}"
    );
    assert!(v.get("offset").is_none(), "offsets are given when due");
    let at = (chrono::Utc::now() + chrono::Duration::milliseconds(1000))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (s, _) = send(
        b.post(&format!("/v1/queues/q/messages?at={at}"))
            .body("first"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        metric(&b.metrics().await, r#"broker_delayed_messages{queue="q"}"#),
        Some(2.0)
    );

    let (_, v) = json(b.read("/v1/queues/q/messages").send().await.unwrap()).await;
    assert_eq!(
        v["messages"].as_array().unwrap().len(),
        0,
        "not visible before its time"
    );
    let (_, v) = send(b.read("/v1/queues/q/messages?wait=10s")).await;
    assert_eq!(v["messages"][0]["body"], "first");
    assert_eq!(v["messages"][0]["offset"], 1);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "visible only at its time"
    );
    let (_, v) = send(b.read("/v1/queues/q/messages?since=1&wait=10s")).await;
    assert_eq!(
        (
            v["messages"][0]["body"].as_str(),
            v["messages"][0]["offset"].as_u64()
        ),
        (Some("second"), Some(2))
    );
    assert!(start.elapsed() >= Duration::from_millis(1900));
    assert_eq!(
        metric(&b.metrics().await, r#"broker_delayed_messages{queue="q"}"#),
        Some(0.0)
    );
}

#[actix_web::test]
async fn delayed_input_errors() {
    let b = spawn_broker(&format!(
        "{USER}\n[limits]\nmax_delayed_messages = 2\n[[queues]]\nname = \"q\"\n"
    ))
    .await;
    for q in [
        "delay=soon",
        "at=yesterday",
        "delay=1s&at=2030-01-01T00:00:00Z",
    ] {
        let (s, v) = send(b.post(&format!("/v1/queues/q/messages?{q}")).body("x")).await;
        assert_eq!((s, v["code"].as_str()), (400, Some("invalid_query")), "{q}");
    }
    let batch = r#"{"messages":[{"body":"a"},{"body":"b"},{"body":"c"}]}"#;
    let (s, v) = send(b.post("/v1/queues/q/batch?delay=1h").body(batch)).await;
    assert_eq!((s, v["code"].as_str()), (429, Some("too_many_delayed")));
    // A time in the past publishes at once.
    let (s, v) = send(
        b.post("/v1/queues/q/messages?at=2000-01-01T00:00:00Z")
            .body("now"),
    )
    .await;
    assert_eq!((s, v["offset"].as_u64()), (200, Some(1)));
}

/// `limits.max_delay` bounds how far a publish may be delayed, and no delay wraps: a
/// huge `delay=` used to overflow into 1970 (published at once), `at=2999-…` was held.
#[actix_web::test]
async fn delays_past_max_delay_or_too_large_to_compute_are_refused() {
    let b = spawn_broker(&format!(
        "{USER}\n[limits]\nmax_delay = \"1h\"\n[[queues]]\nname = \"q\"\n"
    ))
    .await;
    for query in [
        "delay=9000000000000000",
        "delay=18446744073709551615",
        "delay=2h",
        "at=2999-01-01T00:00:00Z",
    ] {
        let (s, v) = send(b.post(&format!("/v1/queues/q/messages?{query}")).body("x")).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("delay_too_long")),
            "{query}: {v}"
        );
    }
    let (s, v) = send(b.post("/v1/queues/q/messages?delay=59m").body("x")).await;
    assert_eq!((s, v["scheduled"].as_bool()), (200, Some(true)), "{v}");
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"broker_rejected_total{queue="q",reason="delay_too_long"}"#
        ),
        Some(4.0)
    );
    let (_, v) = json(b.read("/v1/queues/q/messages").send().await.unwrap()).await;
    assert_eq!(
        v["messages"].as_array().unwrap().len(),
        0,
        "nothing published"
    );
}
