//! WebSocket subscribers and notifications, with real WebSocket clients
//! (tokio-tungstenite) against the real binary.

use std::time::{Duration, Instant};

use broker_core::auth::token::{mint, Claims};
use broker_core::config::Secret;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::{coding::Data, coding::OpCode, Frame};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    json, metric, send, spawn_broker, write_config, ws_connect, BrokerProcess, Next, WsClient,
};

const JWT: &str = "test-jwt-secret-0123456789";
const ADMIN: &str = "test-admin-token-0123";

fn config(extra: &str) -> String {
    format!(
        r#"
[server]
max_body_size = 4194304
[admin]
token = "{ADMIN}"
[ws]
jwt_secrets = ["{JWT}"]
notify_secrets = ["test-notify-secret-0123"]
auth_timeout = "1s"
max_frame_size = 4096
{extra}
[[users]]
name = "alice"
pass_hash = "plain;;alice-pass"
queues = ["q1", "q2", "small", "big", "bcast"]
publish = ["q1", "nu", "nc"]
[[users]]
name = "bob"
pass_hash = "plain;;bob-pass"
queues = ["q1"]
[[queues]]
name = "q1"
[[queues]]
name = "q2"
[[queues]]
name = "small"
max_message_count = 5
[[queues]]
name = "big"
max_message_size = 10000
max_queue_size = 262144
[[queues]]
name = "bcast"
[[queues]]
name = "nu"
kind = "notify-user"
[[queues]]
name = "nc"
kind = "notify-connection"
"#
    )
}

fn token(user: &str, ttl: i64) -> String {
    let claims = Claims {
        sub: user.into(),
        exp: chrono::Utc::now().timestamp() + ttl,
        iat: None,
        queues: None,
        publish: None,
    };
    mint(&claims, &Secret::new(JWT))
}

async fn connect(b: &BrokerProcess, user: &str) -> (WsClient, String) {
    let mut c = ws_connect(&b.url, &format!("?token={}", token(user, 300)), None)
        .await
        .unwrap();
    let hello = c.recv().await;
    assert_eq!(
        (hello["event"].as_str(), hello["user"].as_str()),
        (Some("connected"), Some(user)),
        "{hello}"
    );
    (c, hello["connection_id"].as_str().unwrap().to_owned())
}

async fn publish(b: &BrokerProcess, queue: &str, body: &str) -> serde_json::Value {
    let (s, v) = send(
        b.post(&format!("/v1/queues/{queue}/messages"))
            .header("content-type", "application/json")
            .body(body.to_owned()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn expect_message(c: &mut WsClient, queue: &str, offset: u64) -> serde_json::Value {
    let v = c.recv().await;
    assert_eq!(
        (
            v["event"].as_str(),
            v["queue"].as_str(),
            v["offset"].as_u64()
        ),
        (Some("message"), Some(queue), Some(offset)),
        "{v}"
    );
    v
}

/// A connected session whose socket has a 4 KiB receive buffer (no autotuning), so that
/// not reading pushes back on the broker after a few KiB instead of tens of MiB.
async fn connect_tiny_buffer(b: &BrokerProcess, user: &str) -> WsClient {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = b.url.trim_start_matches("http://").parse().unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let url = format!("ws://{addr}/v1/ws?token={}", token(user, 300));
    let plain = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(url, plain).await.unwrap();
    let mut c = WsClient { ws };
    assert_eq!(c.recv().await["event"], "connected");
    c
}

/// Proves nothing else arrived: the next frame is the pong to this ping.
async fn expect_nothing_pending(c: &mut WsClient) {
    c.send(json!({"action": "ping", "id": "probe"})).await;
    let v = c.recv().await;
    assert_eq!(v, json!({"action": "pong", "id": "probe"}));
}

#[actix_web::test]
async fn http_publishes_reach_every_subscriber_in_order() {
    let (_d, path) = write_config("broker.toml", &config(""));
    let b = spawn_broker(&path);
    let (mut a1, _) = connect(&b, "alice").await;
    let (mut a2, _) = connect(&b, "alice").await;
    let (mut bob, _) = connect(&b, "bob").await;
    assert_eq!(a1.subscribe("q1", None).await["recovered"], false);
    a1.subscribe("q2", None).await;
    a2.subscribe("q2", None).await;
    bob.subscribe("q1", None).await;
    for i in 1..=20u64 {
        publish(&b, "q1", &format!(r#"{{"n":{i}}}"#)).await;
        publish(&b, "q2", &format!(r#"{{"n":{i}}}"#)).await;
    }
    // a1 has both queues interleaved; per queue the order is the offset order.
    let mut next = [1u64, 1u64];
    for _ in 0..40 {
        let v = a1.recv().await;
        let k = if v["queue"] == "q1" { 0 } else { 1 };
        assert_eq!(v["offset"].as_u64(), Some(next[k]), "{v}");
        assert_eq!(v["data"]["n"].as_u64(), Some(next[k]));
        next[k] += 1;
    }
    for i in 1..=20 {
        expect_message(&mut a2, "q2", i).await;
        expect_message(&mut bob, "q1", i).await;
    }
    expect_nothing_pending(&mut a2).await;
    expect_nothing_pending(&mut bob).await;
    let m = b.metrics().await;
    assert_eq!(metric(&m, "broker_ws_connections"), Some(3.0));
    assert!(metric(&m, r#"broker_ws_frames_total{direction="out"}"#).unwrap() >= 80.0);
}

#[actix_web::test]
async fn reconnect_with_since_gets_exactly_the_missed_messages() {
    let (_d, path) = write_config("broker.toml", &config(""));
    let b = spawn_broker(&path);
    let (mut c, _) = connect(&b, "alice").await;
    let sub = c.subscribe("small", None).await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        publish(&b, "small", &format!("{i}")).await;
        expect_message(&mut c, "small", i).await;
    }
    drop(c);
    for i in 4..=6 {
        publish(&b, "small", &format!("{i}")).await;
    }
    let (mut c, _) = connect(&b, "alice").await;
    let sub = c.subscribe("small", Some((3, &epoch))).await;
    assert_eq!(
        (sub["recovered"].as_bool(), sub["offset"].as_u64()),
        (Some(true), Some(6))
    );
    for i in 4..=6 {
        expect_message(&mut c, "small", i).await;
    }
    publish(&b, "small", "7").await;
    expect_message(&mut c, "small", 7).await;
    expect_nothing_pending(&mut c).await;
    drop(c);

    // Roll-off: `small` keeps 5 messages; 8..=14 push out 7..=9.
    for i in 8..=14 {
        publish(&b, "small", &format!("{i}")).await;
    }
    let (mut c, _) = connect(&b, "alice").await;
    c.send(json!({"action": "subscribe", "queue": "small", "since": 7, "epoch": epoch, "id": 1}))
        .await;
    let refresh = c.recv().await;
    assert_eq!(
        refresh,
        json!({"event": "refresh", "queue": "small", "reason": "unrecoverable_position", "offset": 14, "epoch": epoch})
    );
    let sub = c.recv().await;
    assert_eq!(
        (
            sub["event"].as_str(),
            sub["recovered"].as_bool(),
            sub["id"].as_u64()
        ),
        (Some("subscribed"), Some(false), Some(1))
    );
    publish(&b, "small", "15").await;
    expect_message(&mut c, "small", 15).await;
    // Another epoch is unrecoverable too.
    let (mut c2, _) = connect(&b, "alice").await;
    c2.send(
        json!({"action": "subscribe", "queue": "small", "since": 14, "epoch": "0000000000000000"}),
    )
    .await;
    assert_eq!(c2.recv().await["event"], "refresh");
}

#[actix_web::test]
async fn connect_time_and_action_authentication() {
    let (_d, path) = write_config("broker.toml", &config(""));
    let b = spawn_broker(&path);
    // Expired and forged tokens are refused before the upgrade.
    for t in [token("alice", -10), format!("{}x", token("alice", 300))] {
        let err = ws_connect(&b.url, &format!("?token={t}"), None)
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("401"), "{err}");
    }
    let err = ws_connect(&b.url, "", Some("Basic YWxpY2U6d3Jvbmc="))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("403"), "{err}");
    // HTTP Basic and Bearer at connect.
    let mut c = ws_connect(&b.url, "", Some("Basic YWxpY2U6YWxpY2UtcGFzcw=="))
        .await
        .unwrap();
    assert_eq!(c.recv().await["user"], "alice");
    let mut c = ws_connect(&b.url, "", Some(&format!("Bearer {}", token("bob", 60))))
        .await
        .unwrap();
    assert_eq!(c.recv().await["user"], "bob");

    // No credentials: actions wait for `authorize`.
    let mut c = ws_connect(&b.url, "", None).await.unwrap();
    c.send(json!({"action": "subscribe", "queue": "q1", "id": 5}))
        .await;
    let v = c.recv().await;
    assert_eq!(
        (v["code"].as_str(), v["id"].as_u64()),
        (Some("unauthorized"), Some(5))
    );
    c.send(json!({"action": "authorize", "token": token("bob", 60)}))
        .await;
    assert_eq!(c.recv().await["event"], "connected");
    assert_eq!(c.subscribe("q1", None).await["queue"], "q1");
    c.send(json!({"action": "subscribe", "queue": "q2", "id": 6}))
        .await;
    assert_eq!(c.recv().await["code"], "not_granted", "bob may not read q2");

    // A bad token in `authorize` closes with 4001.
    let mut c = ws_connect(&b.url, "", None).await.unwrap();
    c.send(json!({"action": "authorize", "token": token("bob", -1)}))
        .await;
    assert_eq!(c.recv().await["code"], "invalid_token");
    assert!(matches!(c.next().await, Next::Closed(4001, _)));

    // Silence past ws.auth_timeout (1 s) closes with 4002.
    let mut c = ws_connect(&b.url, "", None).await.unwrap();
    let start = Instant::now();
    assert_eq!(c.recv().await["code"], "auth_timeout");
    assert!(matches!(c.next().await, Next::Closed(4002, _)));
    assert!(start.elapsed() >= Duration::from_millis(900));
}

#[actix_web::test]
async fn pings_unknown_actions_malformed_and_oversized_frames() {
    let (_d, path) = write_config("broker.toml", &config(""));
    let b = spawn_broker(&path);
    let (mut c, _) = connect(&b, "alice").await;
    c.send(json!({"action": "ping", "id": 1})).await;
    assert_eq!(c.recv().await, json!({"action": "pong", "id": 1}));
    c.send(json!({"action": "sendmessage", "id": "x"})).await;
    let v = c.recv().await;
    assert_eq!(
        (v["event"].as_str(), v["code"].as_str(), v["id"].as_str()),
        (Some("error"), Some("not_implemented"), Some("x"))
    );
    c.send_raw(Message::text("{not json")).await;
    assert_eq!(c.recv().await["code"], "invalid_json");
    expect_nothing_pending(&mut c).await; // still open

    // A text message in three fragments is reassembled.
    let text = r#"{"action":"ping","id":"frag"}"#;
    let (p1, rest) = text.split_at(10);
    let (p2, p3) = rest.split_at(10);
    c.send_raw(Message::Frame(Frame::message(
        p1.as_bytes().to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    c.send_raw(Message::Frame(Frame::message(
        p2.as_bytes().to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await;
    c.send_raw(Message::Frame(Frame::message(
        p3.as_bytes().to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    assert_eq!(c.recv().await, json!({"action": "pong", "id": "frag"}));

    // Publish over WebSocket: granted queue only.
    c.send(json!({"action": "publish", "queue": "q1", "data": {"via": "ws"}, "id": 2}))
        .await;
    let v = c.recv().await;
    assert_eq!(
        (v["event"].as_str(), v["offset"].as_u64(), v["id"].as_u64()),
        (Some("published"), Some(1), Some(2))
    );
    c.send(json!({"action": "publish", "queue": "q2", "data": 1, "id": 3}))
        .await;
    assert_eq!(c.recv().await["code"], "not_granted");
    let (_, v) = send(
        b.get("/v1/queues/q1/messages")
            .basic_auth("alice", Some("alice-pass")),
    )
    .await;
    assert_eq!(v["messages"][0]["data"], json!({"via": "ws"}));

    // Over ws.max_frame_size (4096): closed with 1009.
    c.send_raw(Message::text(format!(
        r#"{{"action":"ping","pad":"{}"}}"#,
        "x".repeat(5000)
    )))
    .await;
    assert!(matches!(c.next().await, Next::Closed(1009, _)));
}

#[actix_web::test]
async fn notifications_reach_exactly_their_targets() {
    let (_d, path) = write_config("broker.toml", &config(""));
    let b = spawn_broker(&path);
    let (mut bob1, id1) = connect(&b, "bob").await;
    let (mut bob2, _) = connect(&b, "bob").await;
    let (mut alice, alice_id) = connect(&b, "alice").await;
    let notify = |path: String, body: &'static str, token: &'static str| {
        b.post(&path)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let (s, v) = json(
        notify(
            "/v1/users/bob/notify".into(),
            r#"{"hello":"bob"}"#,
            "test-notify-secret-0123",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!((s, v["delivered"].as_u64()), (200, Some(2)));
    for c in [&mut bob1, &mut bob2] {
        assert_eq!(
            c.recv().await,
            json!({"event": "notify", "data": {"hello": "bob"}})
        );
    }
    expect_nothing_pending(&mut alice).await;

    let (s, v) = json(
        notify(format!("/v1/connections/{id1}/notify"), r#"[1,2]"#, ADMIN)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, v["delivered"].as_u64()), (200, Some(1)));
    assert_eq!(bob1.recv().await["data"], json!([1, 2]));
    expect_nothing_pending(&mut bob2).await;
    let (s, v) = json(
        notify("/v1/connections/nope/notify".into(), "1", ADMIN)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (404, Some("unknown_connection")));
    let (s, _) = json(
        notify("/v1/users/bob/notify".into(), "1", "wrong-token")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = json(
        notify("/v1/users/bob/notify".into(), "{bad", ADMIN)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400);

    // The queue kinds take API Gateway's NotifyUser / NotifyConnection message shapes.
    let v = publish(&b, "nu", r#"{"userId":"bob","data":{"k":1}}"#).await;
    assert_eq!(v["delivered"], 2);
    assert_eq!(bob1.recv().await["data"], json!({"k": 1}));
    assert_eq!(bob2.recv().await["data"], json!({"k": 1}));
    let v = publish(
        &b,
        "nc",
        &format!(r#"{{"connectionId":"{alice_id}","data":"just you"}}"#),
    )
    .await;
    assert_eq!(v["delivered"], 1);
    assert_eq!(
        alice.recv().await,
        json!({"event": "notify", "data": "just you"})
    );
    expect_nothing_pending(&mut bob1).await;
    let (s, v) = send(b.post("/v1/queues/nu/messages").body(r#"{"userId":"bob"}"#)).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_body")));
    // Over WebSocket too.
    alice.send(json!({"action": "publish", "queue": "nu", "data": {"userId": "bob", "data": 7}, "id": 1})).await;
    assert_eq!(alice.recv().await["delivered"], 2);
    assert_eq!(bob1.recv().await["data"], 7);
    assert_eq!(bob2.recv().await["data"], 7);

    // Admin: list, and close one with 4010.
    let (s, v) = send(b.get("/v1/connections").bearer_auth(ADMIN)).await;
    assert_eq!(s, 200);
    assert_eq!(v["connections"].as_array().unwrap().len(), 3);
    let (s, _) = send(
        b.get("/v1/connections")
            .bearer_auth("test-notify-secret-0123"),
    )
    .await;
    assert_eq!(s, 403, "notify secrets are not admin");
    let (s, _) = send(
        b.http
            .delete(format!("{}/v1/connections/{id1}", b.url))
            .bearer_auth(ADMIN),
    )
    .await;
    assert_eq!(s, 200);
    let n = bob1.next().await;
    assert!(matches!(n, Next::Closed(4010, _)), "{n:?}");
}

#[actix_web::test]
async fn a_stalled_subscriber_does_not_delay_others_and_memory_stays_bounded() {
    let (_d, path) = write_config(
        "broker.toml",
        &config("max_pending_messages = 64\nmax_pending_bytes = 262144"),
    );
    let b = spawn_broker(&path);
    let (mut healthy, _) = connect(&b, "alice").await;
    healthy.subscribe("big", None).await;

    // The stalled client: a tiny receive buffer, subscribes, then never reads again.
    let mut stalled = connect_tiny_buffer(&b, "alice").await;
    stalled.subscribe("big", None).await;

    let rss = |m: &str| metric(m, "process_resident_memory_bytes").unwrap();
    let before = rss(&b.metrics().await);
    // 64 MiB in 8 KiB messages, published in batches of 100.
    let body = "x".repeat(8 * 1024);
    let batch = json!({"messages": (0..100).map(|_| json!({"body": body})).collect::<Vec<_>>()})
        .to_string();
    let start = Instant::now();
    let mut expected = 1u64;
    for _ in 0..80 {
        let res = b
            .post("/v1/queues/big/batch")
            .body(batch.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        // The healthy subscriber keeps up with every message, in order.
        for _ in 0..100 {
            let v = healthy.recv().await;
            assert_eq!(v["offset"].as_u64(), Some(expected));
            expected += 1;
        }
    }
    let elapsed = start.elapsed();
    let m = b.metrics().await;
    let grown = rss(&m) - before;
    assert!(
        metric(&m, "broker_ws_slow_consumers_total").unwrap() >= 1.0,
        "the stalled subscriber was detected"
    );
    assert!(
        grown < 32.0 * 1024.0 * 1024.0,
        "RSS grew by {grown} bytes while 64 MiB went through"
    );
    assert!(
        elapsed < Duration::from_secs(60),
        "healthy delivery took {elapsed:?}"
    );
    drop(stalled);
}

#[actix_web::test]
async fn a_thousand_connections_each_receive_a_broadcast() {
    let (_d, path) = write_config("broker.toml", &config("max_connections_per_user = 1000"));
    let b = spawn_broker(&path);
    let query = format!("?token={}", token("alice", 300));
    let mut clients = Vec::with_capacity(1000);
    for chunk in 0..10 {
        let conns = (0..100).map(|_| ws_connect(&b.url, &query, None));
        for c in futures_util::future::join_all(conns).await {
            let mut c = c.unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
            assert_eq!(c.recv().await["event"], "connected");
            clients.push(c);
        }
    }
    // Subscribe all (answers awaited, so every subscription is in place).
    futures_util::future::join_all(clients.iter_mut().map(|c| c.subscribe("bcast", None))).await;
    b.wait_for_metric("broker_ws_connections", 1000.0).await;
    publish(&b, "bcast", r#"{"to":"everyone"}"#).await;
    let got = futures_util::future::join_all(clients.iter_mut().map(|c| c.recv())).await;
    for v in got {
        assert_eq!(
            v,
            json!({"event": "message", "queue": "bcast", "offset": 1, "data": {"to": "everyone"}})
        );
    }
}

#[actix_web::test]
async fn server_pings_and_closes_the_silent() {
    let (_d, path) = write_config(
        "broker.toml",
        &config("ping_interval = \"300ms\"\npong_timeout = \"1s\""),
    );
    let b = spawn_broker(&path);
    // A live client answers pings (tungstenite replies while reading) and stays.
    let (mut live, _) = connect(&b, "alice").await;
    let mut pings = 0;
    while pings < 3 {
        use futures_util::StreamExt;
        if let Some(Ok(Message::Ping(_))) = live.ws.next().await {
            pings += 1;
        }
    }
    // A client that never reads never answers: closed with 4004 ("no_pong").
    let (silent, _) = connect(&b, "bob").await;
    let no_pong = r#"broker_ws_disconnects_total{reason="no_pong"}"#;
    // Keep reading (and so answering) on the live one while waiting.
    let keep_reading = async {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = live.ws.next().await {}
        panic!("the live connection was closed");
    };
    tokio::select! {
        _ = b.wait_for_metric(no_pong, 1.0) => {}
        _ = keep_reading => {}
    }
    expect_nothing_pending(&mut live).await;
    assert_eq!(
        metric(&b.metrics().await, no_pong),
        Some(1.0),
        "only the silent one"
    );
    drop(silent);
}

/// A subscriber with a tiny receive buffer that starts reading only after `mib` MiB
/// were published: what does it see?
async fn lagging_subscriber_sees(policy: &str, mib: usize) -> Vec<Next> {
    let (_d, path) = write_config(
        "broker.toml",
        &config(&format!(
            "max_pending_messages = 16\nmax_pending_bytes = 65536\nslow_consumer = \"{policy}\""
        )),
    );
    let b = spawn_broker(&path);
    let mut slow = connect_tiny_buffer(&b, "alice").await;
    slow.subscribe("big", None).await;
    let body = "x".repeat(8 * 1024);
    let batch = json!({"messages": (0..128).map(|_| json!({"body": body})).collect::<Vec<_>>()})
        .to_string();
    for _ in 0..mib {
        assert_eq!(
            b.post("/v1/queues/big/batch")
                .body(batch.clone())
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    b.wait_for_metric("broker_ws_slow_consumers_total", 1.0)
        .await;
    // Now read everything that arrives, up to the first non-message event (and one more).
    let mut seen = Vec::new();
    loop {
        let n = slow.next().await;
        let stop = match &n {
            Next::Json(v) => v["event"] != "message",
            Next::Closed(..) => true,
        };
        if stop {
            seen.push(n);
            if let Next::Json(_) = seen.last().unwrap() {
                seen.push(slow.next().await);
            }
            return seen;
        }
    }
}

#[actix_web::test]
async fn slow_consumer_policy_refresh() {
    let seen = lagging_subscriber_sees("refresh", 16).await;
    let Next::Json(refresh) = &seen[0] else {
        panic!("{seen:?}")
    };
    assert_eq!(
        (refresh["event"].as_str(), refresh["reason"].as_str()),
        (Some("refresh"), Some("slow_consumer")),
        "{refresh}"
    );
    let Next::Json(again) = &seen[1] else {
        panic!("{seen:?}")
    };
    assert_eq!(
        (again["event"].as_str(), again["queue"].as_str()),
        (Some("subscribed"), Some("big")),
        "skipped forward, live again"
    );
}

#[actix_web::test]
async fn slow_consumer_policy_close() {
    let seen = lagging_subscriber_sees("close", 16).await;
    assert!(matches!(seen[0], Next::Closed(4008, _)), "{seen:?}");
}

#[actix_web::test]
async fn subscription_and_connection_limits() {
    let (_d, path) = write_config(
        "broker.toml",
        &config("max_subscriptions = 1\nmax_connections_per_user = 2"),
    );
    let b = spawn_broker(&path);
    let (mut c, _) = connect(&b, "alice").await;
    c.subscribe("q1", None).await;
    c.send(json!({"action": "subscribe", "queue": "q2", "id": 1}))
        .await;
    assert_eq!(c.recv().await["code"], "too_many_subscriptions");
    c.send(json!({"action": "subscribe", "queue": "q1", "id": 2}))
        .await;
    assert_eq!(c.recv().await["code"], "already_subscribed");
    c.send(json!({"action": "unsubscribe", "queue": "q1", "id": 3}))
        .await;
    assert_eq!(
        c.recv().await,
        json!({"event": "unsubscribed", "queue": "q1", "id": 3})
    );
    c.subscribe("q2", None).await;

    let (_second, _) = connect(&b, "alice").await;
    let mut third = ws_connect(&b.url, &format!("?token={}", token("alice", 300)), None)
        .await
        .unwrap();
    assert_eq!(third.recv().await["code"], "too_many_connections");
    assert!(matches!(third.next().await, Next::Closed(4003, _)));
    let (_bob, _) = connect(&b, "bob").await; // the limit is per user
}

/// A session's rights end with its token: it is closed (4001 `token_expired`) at the
/// token's expiry, with no leeway, whatever it is doing.
#[actix_web::test]
async fn a_session_is_closed_when_its_token_expires() {
    let (_d, path) = write_config("broker.toml", &config(""));
    let b = spawn_broker(&path);
    let mut c = ws_connect(&b.url, &format!("?token={}", token("alice", 2)), None)
        .await
        .unwrap();
    assert_eq!(c.recv().await["event"], "connected");
    c.subscribe("q1", None).await;
    let started = Instant::now();
    loop {
        match c.next().await {
            Next::Closed(code, reason) => {
                assert_eq!((code, reason.as_str()), (4001, "token_expired"));
                break;
            }
            Next::Json(v) => assert_ne!(v["event"], "message", "{v}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(4), "closed late");
}

/// Anonymous connections are capped all together (they skip the per-user cap).
#[actix_web::test]
async fn anonymous_connections_are_capped() {
    let (_d, path) = write_config(
        "broker.toml",
        &config(
            "allow_anonymous = true\nanonymous_queues = [\"q1\"]\nmax_anonymous_connections = 2",
        ),
    );
    let b = spawn_broker(&path);
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = ws_connect(&b.url, "", None).await.unwrap();
        assert_eq!(c.recv().await["event"], "connected");
        open.push(c);
    }
    let mut third = ws_connect(&b.url, "", None).await.unwrap();
    let v = third.recv().await;
    assert_eq!(v["code"], "too_many_connections", "{v}");
    match third.next().await {
        Next::Closed(code, _) => assert_eq!(code, 4003),
        other => panic!("{other:?}"),
    }
    // A user's connection is not counted against the anonymous cap.
    let (_alice, _) = connect(&b, "alice").await;
}

/// A reload that narrows a user's grants closes its sessions that hold a subscription it
/// lost (4011 `grants_revoked`); other sessions go on. A token session whose user is
/// removed keeps only what its token grants itself (here nothing): closed too. (A Basic
/// session of a removed user is closed with `user_removed`.)
#[actix_web::test]
async fn a_reload_that_revokes_rights_closes_the_sessions_using_them() {
    let (_d, path) = write_config("broker.toml", &config(""));
    let b = spawn_broker(&path);
    let (mut alice, _) = connect(&b, "alice").await;
    alice.subscribe("q1", None).await;
    let (mut bob, _) = connect(&b, "bob").await;
    bob.subscribe("q1", None).await;

    // bob may read q2 only now; alice keeps q1.
    let narrowed = std::fs::read_to_string(&path).unwrap().replace(
        "name = \"bob\"\npass_hash = \"plain;;bob-pass\"\nqueues = [\"q1\"]",
        "name = \"bob\"\npass_hash = \"plain;;bob-pass\"\nqueues = [\"q2\"]",
    );
    assert_ne!(narrowed, std::fs::read_to_string(&path).unwrap());
    std::fs::write(&path, &narrowed).unwrap();
    let res = b.post("/reload").bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    match bob.next().await {
        Next::Closed(code, reason) => assert_eq!((code, reason.as_str()), (4011, "grants_revoked")),
        other => panic!("{other:?}"),
    }
    publish(&b, "q1", r#"{"n":1}"#).await;
    expect_message(&mut alice, "q1", 1).await;

    // alice is removed from the config.
    let removed = narrowed.replace("name = \"alice\"", "name = \"alicia\"");
    std::fs::write(&path, removed).unwrap();
    let res = b.post("/reload").bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    loop {
        match alice.next().await {
            Next::Closed(code, reason) => {
                assert_eq!((code, reason.as_str()), (4011, "grants_revoked"));
                break;
            }
            Next::Json(v) => assert_ne!(v["event"], "message", "{v}"),
        }
    }
}
