//! Publishing: auth methods over HTTP, limits, content rules, batches, client addresses.

use base64::Engine;

use crate::support::{hmac_hex, json, metric, send, spawn_broker, USER};

fn config(extra: &str) -> String {
    format!("{USER}\n{extra}")
}

#[actix_web::test]
async fn publish_and_read_every_body_kind() {
    let b = spawn_broker(&config("[[queues]]\nname = \"q\"\n")).await;
    let (s, v) = send(
        b.post("/v1/queues/q/messages")
            .header("content-type", "application/json")
            .body(r#"{"n":1}"#),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["success"].as_bool(),
            v["queue"].as_str(),
            v["offset"].as_u64()
        ),
        (Some(true), Some("q"), Some(1))
    );
    let epoch = v["epoch"].as_str().unwrap().to_owned();
    assert_eq!(epoch.len(), 16);
    b.post("/v1/queues/q/messages")
        .header("content-type", "text/plain")
        .body("hi")
        .send()
        .await
        .unwrap();
    b.post("/v1/queues/q/messages")
        .body(vec![0xffu8, 0, 1])
        .send()
        .await
        .unwrap();

    let (s, v) = send(b.read("/v1/queues/q/messages?since=0")).await;
    assert_eq!(s, 200);
    assert_eq!(v["epoch"], epoch.as_str());
    assert_eq!(v["offset"], 3);
    let m = v["messages"].as_array().unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!(m[0]["data"], serde_json::json!({"n": 1}));
    assert_eq!(m[1]["body"], "hi");
    assert_eq!(
        m[2]["body_base64"],
        base64::engine::general_purpose::STANDARD.encode([0xff, 0, 1])
    );
    let (_, v) = send(b.read("/v1/queues/q/messages?since=2&limit=5")).await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 1);
    assert_eq!(v["messages"][0]["offset"], 3);
}

#[actix_web::test]
async fn batch_is_all_or_nothing() {
    let b = spawn_broker(&config(
        "[[queues]]\nname = \"small\"\nmax_message_size = 10\nmax_queue_size = 1000\n",
    ))
    .await;
    let ok = r#"{"messages":[{"data":{"a":1}},{"body":"two"},{"body_base64":"AAE="}]}"#;
    let (s, v) = send(b.post("/v1/queues/small/batch").body(ok)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["first_offset"].as_u64(),
            v["offset"].as_u64(),
            v["count"].as_u64()
        ),
        (Some(1), Some(3), Some(3))
    );

    let too_big = r#"{"messages":[{"body":"ok"},{"body":"far too long for this queue"}]}"#;
    let (s, v) = send(b.post("/v1/queues/small/batch").body(too_big)).await;
    assert_eq!((s, v["code"].as_str()), (413, Some("message_too_large")));
    let malformed = r#"{"messages":[{"body":"ok"},{"body":"x","data":1}]}"#;
    let (s, v) = send(b.post("/v1/queues/small/batch").body(malformed)).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_body")));
    assert!(
        v["message"].as_str().unwrap().contains("messages[1]"),
        "{v}"
    );
    let (s, _) = send(b.post("/v1/queues/small/batch").body(r#"{"messages":[]}"#)).await;
    assert_eq!(s, 400);

    let (_, v) = json(b.read("/v1/queues/small/messages").send().await.unwrap()).await;
    assert_eq!(
        v["offset"], 3,
        "nothing of the refused batches was published"
    );
}

#[actix_web::test]
async fn json_content_rule() {
    let b = spawn_broker(&config(
        "[[queues]]\nname = \"json\"\ncontent_type = \"json\"\n",
    ))
    .await;
    let (s, v) = send(b.post("/v1/queues/json/messages").body("{not json")).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_body")));
    let (s, _) = send(b.post("/v1/queues/json/messages").body("[1,2]")).await;
    assert_eq!(s, 200);
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"broker_rejected_total{queue="json",reason="invalid_body"}"#
        ),
        Some(1.0)
    );
}

#[actix_web::test]
async fn bearer_rotation_and_hmac_over_http() {
    let b = spawn_broker(&config(
        r#"
[[queues]]
name = "bearer"
auth = { method = "bearer", keys = ["old-key", "new-key"] }
[[queues]]
name = "hmac"
auth = { method = "hmac-sha256", key = "12345", header_name = "Foo-Auth" }
"#,
    ))
    .await;
    for auth in ["old-key", "Bearer new-key"] {
        let (s, v) = send(
            b.post("/v1/queues/bearer/messages")
                .header("Authorization", auth)
                .body("x"),
        )
        .await;
        assert_eq!(s, 200, "{auth}: {v}");
    }
    let (s, v) = send(
        b.post("/v1/queues/bearer/messages")
            .header("Authorization", "Bearer nope")
            .body("x"),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("invalid_signature")));
    let (s, _) = send(b.post("/v1/queues/bearer/messages").body("x")).await;
    assert_eq!(s, 401);

    let body = br#"{"hello":"world"}"#;
    let sig = hmac_hex(b"12345", &[body]);
    let (s, _) = send(
        b.post("/v1/queues/hmac/messages")
            .header("Foo-Auth", &sig)
            .body(&body[..]),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = send(
        b.post("/v1/queues/hmac/messages")
            .header("Foo-Auth", &sig)
            .body("tampered"),
    )
    .await;
    assert_eq!(s, 403);
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"broker_rejected_total{queue="bearer",reason="invalid_signature"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"broker_rejected_total{queue="bearer",reason="missing_credentials"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, r#"broker_published_total{queue="hmac"}"#),
        Some(1.0)
    );
}

#[actix_web::test]
async fn signature_presets_over_http() {
    let b = spawn_broker(&config(
        r#"
[[queues]]
name = "gh"
auth = { method = "github", key = "gh-secret" }
[[queues]]
name = "stripe"
auth = { method = "stripe", key = "whsec_stripe" }
[[queues]]
name = "slack"
auth = { method = "slack", key = "slack-secret" }
[[queues]]
name = "sw"
auth = { method = "standard-webhooks", key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" }
"#,
    ))
    .await;
    let body = br#"{"event":"x"}"#;
    let now = chrono::Utc::now().timestamp().to_string();
    let stale = (chrono::Utc::now().timestamp() - 600).to_string();

    let gh = format!("sha256={}", hmac_hex(b"gh-secret", &[body]));
    let res = b
        .post("/v1/queues/gh/messages")
        .header("X-Hub-Signature-256", gh)
        .body(&body[..])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let stripe = |ts: &str| {
        format!(
            "t={ts},v1={}",
            hmac_hex(b"whsec_stripe", &[ts.as_bytes(), b".", body])
        )
    };
    let res = b
        .post("/v1/queues/stripe/messages")
        .header("Stripe-Signature", stripe(&now))
        .body(&body[..])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (s, v) = send(
        b.post("/v1/queues/stripe/messages")
            .header("Stripe-Signature", stripe(&stale))
            .body(&body[..]),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("stale_timestamp")));

    let slack = format!(
        "v0={}",
        hmac_hex(b"slack-secret", &[b"v0:", now.as_bytes(), b":", body])
    );
    let res = b
        .post("/v1/queues/slack/messages")
        .header("X-Slack-Request-Timestamp", &now)
        .header("X-Slack-Signature", slack)
        .body(&body[..])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let key = base64::engine::general_purpose::STANDARD
        .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .unwrap();
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(&key).unwrap();
    hmac::Mac::update(&mut mac, format!("msg_1.{now}.").as_bytes());
    hmac::Mac::update(&mut mac, body);
    let sig =
        base64::engine::general_purpose::STANDARD.encode(hmac::Mac::finalize(mac).into_bytes());
    let sw = || {
        b.post("/v1/queues/sw/messages")
            .header("webhook-id", "msg_1")
            .header("webhook-timestamp", &now)
            .header("webhook-signature", format!("v1,{sig}"))
            .body(&body[..])
            .send()
    };
    assert_eq!(sw().await.unwrap().status(), 200);
    // The same signed request again, within its tolerance: a replay, refused (Stripe,
    // Slack and Standard Webhooks alike), and nothing stored twice.
    let (s, v) = json(sw().await.unwrap()).await;
    assert_eq!((s, v["code"].as_str()), (409, Some("replayed")), "{v}");
    let (s, v) = send(
        b.post("/v1/queues/stripe/messages")
            .header("Stripe-Signature", stripe(&now))
            .body(&body[..]),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("replayed")), "{v}");
    let (s, _) = send(
        b.post("/v1/queues/sw/messages")
            .header("webhook-id", "msg_1")
            .body(&body[..]),
    )
    .await;
    assert_eq!(s, 401);
}

#[actix_web::test]
async fn allow_list_and_trusted_proxies() {
    let b = spawn_broker(&config(
        r#"
[server]
trusted_proxies = ["127.0.0.1"]
[[queues]]
name = "local"
allow_ips = ["127.0.0.0/8"]
[[queues]]
name = "proxied"
allow_ips = ["198.51.100.0/24"]
"#,
    ))
    .await;
    // Behind the trusted proxy (the test client is 127.0.0.1) the forwarded address counts.
    let res = b
        .post("/v1/queues/proxied/messages")
        .header("X-Forwarded-For", "198.51.100.7")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The left part of X-Forwarded-For is whatever the client wrote: never believed.
    let (s, v) = send(
        b.post("/v1/queues/proxied/messages")
            .header("X-Forwarded-For", "198.51.100.7, 203.0.113.1")
            .body("x"),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("ip_not_allowed")));
    let res = b
        .post("/v1/queues/local/messages")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = b
        .post("/v1/queues/local/messages")
        .header("X-Forwarded-For", "203.0.113.1")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);

    // Two header lines: the client's forged one, then the one its proxy appended (as
    // HAProxy does). Every line counts, in order: the appended address is the client.
    let mut two = reqwest::header::HeaderMap::new();
    two.append("x-forwarded-for", "198.51.100.7".parse().unwrap());
    two.append("x-forwarded-for", "203.0.113.9".parse().unwrap());
    let (s, v) = send(b.post("/v1/queues/proxied/messages").headers(two).body("x")).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (403, Some("ip_not_allowed")),
        "{v}"
    );
    // A port is stripped; an entry that is no address is refused, never the proxy's.
    let res = b
        .post("/v1/queues/proxied/messages")
        .header("X-Forwarded-For", "198.51.100.7:4711")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for forwarded in ["unknown", "garbage, 127.0.0.1"] {
        let (s, v) = send(
            b.post("/v1/queues/local/messages")
                .header("X-Forwarded-For", forwarded)
                .body("x"),
        )
        .await;
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("invalid_forwarded_for")),
            "{forwarded}: {v}"
        );
    }
}

#[actix_web::test]
async fn untrusted_peer_cannot_spoof_its_address() {
    // No trusted proxies: X-Forwarded-For is ignored entirely.
    let b = spawn_broker(&config(
        "[[queues]]\nname = \"proxied\"\nallow_ips = [\"198.51.100.0/24\"]\n",
    ))
    .await;
    let res = b
        .post("/v1/queues/proxied/messages")
        .header("X-Forwarded-For", "198.51.100.7")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
}

#[actix_web::test]
async fn size_limits_and_unknown_queues() {
    let b = spawn_broker(&config(
        "[server]\nmax_body_size = 1000\n[limits]\nmax_message_size = 100\nmax_queue_size = 1000\n[[queues]]\nname = \"q\"\n",
    ))
    .await;
    let (s, v) = send(b.post("/v1/queues/q/messages").body(vec![b'x'; 101])).await;
    assert_eq!((s, v["code"].as_str()), (413, Some("message_too_large")));
    let (s, v) = send(b.post("/v1/queues/q/messages").body(vec![b'x'; 5000])).await;
    assert_eq!((s, v["code"].as_str()), (413, Some("body_too_large")));
    let (s, v) = send(b.post("/v1/queues/nope/messages").body("x")).await;
    assert_eq!(
        (s, v["code"].as_str(), v["refresh"].as_bool()),
        (404, Some("unknown_queue"), Some(false))
    );
    let (s, v) = send(b.post("/v1/queues/q/messages?deliver=30s").body("x")).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_query")));
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"broker_rejected_total{queue="q",reason="message_too_large"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"broker_rejected_total{queue="q",reason="body_too_large"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"broker_rejected_total{queue="_unknown",reason="unknown_queue"}"#
        ),
        Some(1.0)
    );
}

#[actix_web::test]
async fn pattern_queues_are_created_on_first_use() {
    let b = spawn_broker(&config(
        "[[queues]]\nname = \"p.*\"\nmax_message_count = 2\n",
    ))
    .await;
    for q in ["p.a", "p.b", "p.a"] {
        let res = b
            .post(&format!("/v1/queues/{q}/messages"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let (_, v) = json(b.read("/v1/queues/p.a/messages").send().await.unwrap()).await;
    assert_eq!(v["offset"], 2);
    let (s, _) = send(b.post("/v1/queues/p./messages").body("x")).await;
    assert_eq!(s, 404);
    let m = b.metrics().await;
    assert_eq!(
        metric(&m, r#"broker_published_total{queue="p.*"}"#),
        Some(3.0),
        "pattern queues share their label"
    );
}

/// Anyone who may publish to a pattern cannot grow the broker without bound: queues made
/// from patterns are capped (the pattern's `max_queues`, and `limits.max_queues` in all:
/// 429 `too_many_queues`), counted in `broker_queues`, and forgotten once they have held
/// nothing for `limits.idle_queue_timeout`, which makes room again.
#[actix_web::test]
async fn pattern_queues_are_capped_and_idle_ones_forgotten() {
    let b = spawn_broker(&config(
        "[limits]\nmax_queues = 50\nidle_queue_timeout = \"1s\"\n[[queues]]\nname = \"p.*\"\nmax_queues = 2\n",
    ))
    .await;
    // Readers create queues too (an empty read), and leave them idle.
    for q in ["p.a", "p.b"] {
        let (s, v) = send(b.read(&format!("/v1/queues/{q}/messages"))).await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = send(b.post("/v1/queues/p.c/messages").body("x")).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (429, Some("too_many_queues")),
        "{v}"
    );
    let (s, v) = send(b.read("/v1/queues/p.d/messages")).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (429, Some("too_many_queues")),
        "{v}"
    );
    assert_eq!(
        metric(
            &b.metrics().await,
            r#"broker_rejected_total{queue="p.*",reason="too_many_queues"}"#
        ),
        Some(1.0),
        "the refused publish is counted"
    );
    // Once idle long enough they are forgotten, and new ones can be made.
    let live = |m: &str| metric(m, "broker_queues").unwrap_or(-1.0);
    let before = live(&b.metrics().await);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while live(&b.metrics().await) > before - 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle queues never forgotten"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (s, v) = send(b.post("/v1/queues/p.c/messages").body("x")).await;
    assert_eq!(s, 200, "{v}");
}

#[actix_web::test]
async fn an_idempotency_key_makes_a_retried_publish_return_the_first_offset() {
    let b = spawn_broker(&config(
        "[limits]\nmax_message_count = 3\n[[queues]]\nname = \"q\"\n",
    ))
    .await;
    let publish = |key: &str, body: &str| {
        b.post("/v1/queues/q/messages")
            .header("idempotency-key", key)
            .body(body.to_owned())
    };
    let (s, first) = send(publish("order-1", "a")).await;
    assert_eq!((s, first["offset"].as_u64()), (200, Some(1)), "{first}");
    assert!(first.get("duplicate").is_none(), "{first}");
    let (s, again) = send(publish("order-1", "a (retried)")).await;
    assert_eq!(
        (s, again["offset"].as_u64(), again["duplicate"].as_bool()),
        (200, Some(1), Some(true)),
        "{again}"
    );
    assert_eq!(again["epoch"], first["epoch"]);
    let (_, other) = send(publish("order-2", "b")).await;
    assert_eq!(other["offset"], 2);
    let (_, v) = send(b.read("/v1/queues/q/messages?since=0")).await;
    let bodies: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["a", "b"], "stored once");
    // Once its message is dropped by the limits, the key is a new publish.
    for i in 0..3 {
        send(b.post("/v1/queues/q/messages").body(format!("fill {i}"))).await;
    }
    let (_, late) = send(publish("order-1", "a (much later)")).await;
    assert_eq!(late["offset"], 6, "{late}");
    // Bad keys, and keys with a delay, are refused.
    for bad in ["", &"k".repeat(256), "with space"] {
        let (s, v) = send(publish(bad, "x")).await;
        assert_eq!(
            (s, v["code"].as_str()),
            (400, Some("invalid_header")),
            "{bad:?}: {v}"
        );
    }
    let (s, v) = send(
        b.post("/v1/queues/q/messages?delay=1s")
            .header("idempotency-key", "k")
            .body("x"),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_query")), "{v}");
}

#[actix_web::test]
async fn batch_elements_with_ids_are_stored_once() {
    let b = spawn_broker(&config("[[queues]]\nname = \"q\"\n")).await;
    let batch = |ids: &[&str]| {
        let messages: Vec<_> = ids
            .iter()
            .map(|id| serde_json::json!({"body": format!("m-{id}"), "id": id}))
            .collect();
        b.post("/v1/queues/q/batch")
            .json(&serde_json::json!({ "messages": messages }))
    };
    let (s, v) = send(batch(&["a", "b"])).await;
    assert_eq!(
        (s, v["first_offset"].as_u64(), v["offset"].as_u64()),
        (200, Some(1), Some(2)),
        "{v}"
    );
    assert!(v.get("duplicates").is_none(), "{v}");
    // Retried whole: nothing new, the first offsets.
    let (_, v) = send(batch(&["a", "b"])).await;
    assert_eq!(
        (
            v["first_offset"].as_u64(),
            v["offset"].as_u64(),
            v["duplicates"].as_u64()
        ),
        (Some(1), Some(2), Some(2)),
        "{v}"
    );
    // Partly new: only the new one is stored; a key twice in one batch is stored once.
    let (_, v) = send(batch(&["b", "c", "c"])).await;
    assert_eq!(
        (
            v["first_offset"].as_u64(),
            v["offset"].as_u64(),
            v["duplicates"].as_u64()
        ),
        (Some(3), Some(3), Some(2)),
        "{v}"
    );
    let (_, v) = send(b.read("/v1/queues/q/messages?since=0")).await;
    let bodies: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["m-a", "m-b", "m-c"]);
    let (s, v) = send(batch(&["with space"])).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_body")), "{v}");
}
