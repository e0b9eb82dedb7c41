//! Operations endpoints and the error shape of routes that do not exist.

use crate::support::{json, metric, send, spawn_broker, USER};

#[actix_web::test]
async fn health_and_readiness() {
    let b = spawn_broker(USER).await;
    let (s, v) = json(b.get("/healthz").send().await.unwrap()).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, _) = json(b.get("/readyz").send().await.unwrap()).await;
    assert_eq!(s, 200);
    b.broker.begin_shutdown();
    let (s, v) = json(b.get("/readyz").send().await.unwrap()).await;
    assert_eq!((s, v["status"].as_str()), (503, Some("shutting_down")));
}

#[actix_web::test]
async fn metrics_cover_the_contract() {
    let b = spawn_broker(&format!(
        "{USER}\n[[queues]]\nname = \"q\"\nmax_message_count = 1\n"
    ))
    .await;
    b.post("/v1/queues/q/messages")
        .body("a")
        .send()
        .await
        .unwrap();
    b.post("/v1/queues/q/messages")
        .body("bb")
        .send()
        .await
        .unwrap();
    b.read("/v1/queues/q/messages?since=1")
        .send()
        .await
        .unwrap();
    let m = b.metrics().await;
    assert_eq!(
        metric(&m, r#"broker_published_total{queue="q"}"#),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, r#"broker_dropped_total{queue="q",reason="count"}"#),
        Some(1.0)
    );
    assert_eq!(metric(&m, r#"broker_queue_depth{queue="q"}"#), Some(1.0));
    assert_eq!(metric(&m, r#"broker_queue_bytes{queue="q"}"#), Some(2.0));
    assert_eq!(
        metric(&m, r#"broker_queue_limit_messages{queue="q"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"broker_poll_reads_total{outcome="messages",queue="q"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"broker_http_requests_total{method="POST",route="/v1/queues/{queue}/messages",status="200"}"#
        ),
        Some(2.0)
    );
    assert!(m.contains(
        "broker_http_request_duration_seconds_bucket{route=\"/v1/queues/{queue}/messages\""
    ));
    assert!(
        m.contains("process_resident_memory_bytes"),
        "process metrics"
    );
}

#[actix_web::test]
async fn unknown_routes_and_methods_are_json() {
    let b = spawn_broker(USER).await;
    let (s, v) = json(b.get("/nope").send().await.unwrap()).await;
    assert_eq!(
        (s, v["code"].as_str(), v["refresh"].as_bool()),
        (404, Some("not_found"), Some(false))
    );
    let (s, v) = json(b.delete("/v1/queues/q/batch").send().await.unwrap()).await;
    assert_eq!((s, v["code"].as_str()), (405, Some("method_not_allowed")));
    let (s, v) = send(
        b.put("/v1/consumers/c")
            .basic_auth("u", Some("password1"))
            .header("content-type", "application/json")
            .body("{"),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_json")));
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"broker_http_requests_total{method="GET",route="unmatched",status="404"}"#
        ),
        Some(1.0)
    );
}
