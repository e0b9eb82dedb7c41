//! One front door for publishing: a publish refused over HTTP, native WebSocket, WAMP
//! and the Crossbar pusher is refused by the same rule and counted in the same metric
//! with the same reason label (broker-core's `Broker::publish`), through the real binary.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{metric, send, spawn_broker, write_config, ws_connect};

const CONFIG: &str = r#"
[pusher]
[ws]
allow_anonymous = false
[[users]]
name = "alice"
pass_hash = "plain;;alice-pass"
queues = ["guarded"]
publish = ["guarded"]
[[queues]]
name = "guarded"
allow_ips = ["10.0.0.0/8"]
"#;

const BASIC: &str = "Basic YWxpY2U6YWxpY2UtcGFzcw=="; // alice:alice-pass

#[actix_web::test]
async fn a_refused_publish_is_counted_alike_over_every_transport() {
    let (_d, path) = write_config("broker.toml", CONFIG);
    let b = spawn_broker(&path);
    let sample = r#"broker_rejected_total{queue="guarded",reason="ip_not_allowed"}"#;

    // HTTP.
    let (s, v) = send(b.post("/v1/queues/guarded/messages").body("{}")).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (403, Some("ip_not_allowed")),
        "{v}"
    );
    b.wait_for_metric(sample, 1.0).await;

    // Native WebSocket.
    let mut ws = ws_connect(&b.url, "", Some(BASIC)).await.unwrap();
    assert_eq!(ws.recv().await["event"], "connected");
    ws.send(json!({"action": "publish", "queue": "guarded", "data": {"n": 1}, "id": 7}))
        .await;
    let v = ws.recv().await;
    assert_eq!(
        (v["event"].as_str(), v["code"].as_str(), v["id"].as_u64()),
        (Some("error"), Some("ip_not_allowed"), Some(7)),
        "{v}"
    );
    b.wait_for_metric(sample, 2.0).await;

    // WAMP v2 (raw frames: HELLO, WELCOME, PUBLISH with acknowledge, ERROR).
    let url = format!("{}/v1/ws", b.url.replacen("http://", "ws://", 1));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "wamp.2.json".parse().unwrap());
    req.headers_mut()
        .insert("authorization", BASIC.parse().unwrap());
    let (mut wamp, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let frame = |v: Value| Message::text(v.to_string());
    wamp.send(frame(json!([1, "realm1", {"roles": {"publisher": {}}}])))
        .await
        .unwrap();
    let welcome = next_json(&mut wamp).await;
    assert_eq!(welcome[0], 2, "{welcome}");
    wamp.send(frame(
        json!([16, 9, {"acknowledge": true}, "guarded", ["x"]]),
    ))
    .await
    .unwrap();
    let err = next_json(&mut wamp).await;
    assert_eq!(
        (&err[0], &err[1], &err[2], err[4].as_str()),
        (
            &json!(8),
            &json!(16),
            &json!(9),
            Some("wamp.error.not_authorized")
        ),
        "{err}"
    );
    b.wait_for_metric(sample, 3.0).await;

    // The Crossbar pusher (Crossbar's wording for an address refusal).
    let (s, v) = send(
        b.post("/push")
            .header("content-type", "application/json")
            .body(r#"{"topic":"guarded","args":[1]}"#),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    b.wait_for_metric(sample, 4.0).await;

    let m = b.metrics().await;
    assert_eq!(
        metric(&m, sample),
        Some(4.0),
        "one count per refusal, no more"
    );
    assert_eq!(
        metric(&m, r#"broker_published_total{queue="guarded"}"#).unwrap_or(0.0),
        0.0
    );
}

/// The next text frame as JSON (bounded: 10 s).
async fn next_json<S>(ws: &mut S) -> Value
where
    S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("open")
            .unwrap();
        if let Message::Text(t) = frame {
            return serde_json::from_str(&t).unwrap();
        }
    }
}
