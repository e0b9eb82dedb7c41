//! Reading: since/epoch semantics, long-poll, named consumers, grants, login.

use std::time::{Duration, Instant};

use crate::support::{json, metric, send, spawn_broker, USER};

fn config(extra: &str) -> String {
    format!("{USER}\n{extra}")
}

#[actix_web::test]
async fn since_before_retention_or_other_epoch_is_gone() {
    let b = spawn_broker(&config("[[queues]]\nname = \"q\"\nmax_message_count = 2\n")).await;
    for i in 0..4 {
        b.post("/v1/queues/q/messages")
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
    }
    let (s, v) = send(b.read("/v1/queues/q/messages?since=1")).await;
    assert_eq!(
        (s, v["code"].as_str(), v["refresh"].as_bool()),
        (410, Some("unrecoverable_position"), Some(true))
    );
    assert_eq!(v["offset"], 4);
    let epoch = v["epoch"].as_str().unwrap().to_owned();
    let (s, v) = send(b.read(&format!("/v1/queues/q/messages?since=2&epoch={epoch}"))).await;
    assert_eq!(s, 200);
    assert_eq!(v["messages"].as_array().unwrap().len(), 2);
    let (s, _) = send(b.read("/v1/queues/q/messages?since=2&epoch=0000000000000000")).await;
    assert_eq!(s, 410);
}

#[actix_web::test]
async fn long_poll_returns_when_a_message_arrives() {
    let b = spawn_broker(&config("[[queues]]\nname = \"q\"\n")).await;
    let start = Instant::now();
    let reader = b.read("/v1/queues/q/messages?since=0&wait=30s").send();
    let publisher = async {
        // Publish only once the read is parked, so only the wake-up can deliver it.
        b.wait_for_metric("broker_poll_waiting", 1.0).await;
        b.post("/v1/queues/q/messages")
            .body("wake up")
            .send()
            .await
            .unwrap();
    };
    let (res, ()) = tokio::join!(reader, publisher);
    let (s, v) = json(res.unwrap()).await;
    assert_eq!(s, 200);
    assert_eq!(v["messages"][0]["body"], "wake up");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "woken by the publish, not the timeout"
    );
}

#[actix_web::test]
async fn long_poll_times_out_empty() {
    let b = spawn_broker(&config("[[queues]]\nname = \"q\"\n")).await;
    let start = Instant::now();
    let (s, v) = send(b.read("/v1/queues/q/messages?since=0&wait=1s")).await;
    assert_eq!(s, 200);
    assert_eq!(v["messages"].as_array().unwrap().len(), 0);
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "waited for the timeout"
    );
    let (s, v) = send(b.read("/v1/queues/q/messages?wait=later")).await;
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid_wait")));
}

#[actix_web::test]
async fn named_consumers() {
    let b = spawn_broker(&config(
        "[[queues]]\nname = \"q\"\nmax_message_count = 3\n[[queues]]\nname = \"q2\"\n",
    ))
    .await;
    b.post("/v1/queues/q/messages")
        .body("before")
        .send()
        .await
        .unwrap();
    let (s, v) = send(
        b.put("/v1/consumers/c1")
            .basic_auth("u", Some("password1"))
            .json(&serde_json::json!({"queue": "q"})),
    )
    .await;
    assert_eq!((s, v["queue"].as_str()), (200, Some("q")));
    let (s, _) = send(
        b.put("/v1/consumers/c1")
            .basic_auth("u", Some("password1"))
            .json(&serde_json::json!({"queue": "q"})),
    )
    .await;
    assert_eq!(s, 200, "idempotent for the same queue");
    let (s, v) = send(
        b.put("/v1/consumers/c1")
            .basic_auth("u", Some("password1"))
            .json(&serde_json::json!({"queue": "q2"})),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (409, Some("client_exists")));

    b.post("/v1/queues/q/messages")
        .body("one")
        .send()
        .await
        .unwrap();
    let (s, v) = json(b.read("/v1/consumers/c1/messages").send().await.unwrap()).await;
    assert_eq!(s, 200);
    let bodies: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["one"],
        "a new consumer starts after the newest message"
    );
    let (_, v) = json(b.read("/v1/consumers/c1/messages").send().await.unwrap()).await;
    assert_eq!(
        v["messages"].as_array().unwrap().len(),
        0,
        "the cursor moved"
    );

    for i in 0..5 {
        b.post("/v1/queues/q/messages")
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
    }
    let (s, v) = json(b.read("/v1/consumers/c1/messages").send().await.unwrap()).await;
    assert_eq!(
        (s, v["code"].as_str(), v["refresh"].as_bool()),
        (410, Some("refresh"), Some(true))
    );
    let (s, v) = json(b.read("/v1/consumers/c1/messages").send().await.unwrap()).await;
    assert_eq!((s, v["messages"].as_array().unwrap().len()), (200, 0));

    let (s, _) = send(
        b.delete("/v1/consumers/c1")
            .basic_auth("u", Some("password1")),
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = json(b.read("/v1/consumers/c1/messages").send().await.unwrap()).await;
    assert_eq!((s, v["code"].as_str()), (404, Some("unknown_client")));
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"broker_poll_reads_total{outcome="refresh",queue="q"}"#
        ),
        Some(1.0)
    );
}

#[actix_web::test]
async fn logins_and_grants() {
    let b = spawn_broker(&format!(
        "{USER}\n[[users]]\nname = \"other\"\npass_hash = \"plain;;password2\"\nqueues = []\n[[queues]]\nname = \"q\"\n"
    ))
    .await;
    let res = b.get("/v1/queues/q/messages").send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().get("www-authenticate").is_some());
    let (s, v) = send(b.get("/v1/queues/q/messages").basic_auth("u", Some("nope"))).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("bad_login")));
    let (s, v) = send(
        b.get("/v1/queues/q/messages")
            .basic_auth("ghost", Some("x")),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("bad_login")));
    let (s, v) = send(
        b.get("/v1/queues/q/messages")
            .basic_auth("other", Some("password2")),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (403, Some("not_granted")));
    let (s, _) = send(
        b.get("/v1/queues/q/messages")
            .basic_auth("u", Some("password1")),
    )
    .await;
    assert_eq!(s, 200);
}

#[actix_web::test]
async fn argon2_logins_work_and_are_cached() {
    let hash = broker_core::auth::hash_password("s3cret-pass");
    let b = spawn_broker(&format!(
        "[[users]]\nname = \"a\"\npass_hash = \"{hash}\"\nqueues = [\"q\"]\n[[queues]]\nname = \"q\"\n"
    ))
    .await;
    for _ in 0..3 {
        let res = b
            .get("/v1/queues/q/messages")
            .basic_auth("a", Some("s3cret-pass"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let res = b
        .get("/v1/queues/q/messages")
        .basic_auth("a", Some("s3cret-pasS"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
}

/// Password checks are rate limited per client address and per user name: past the
/// rate a login is refused unchecked with 429 `too_many_logins` and `Retry-After`,
/// an unknown user's attempts count like a known one's, and a recently verified login
/// is not checked again (it keeps working).
#[actix_web::test]
async fn logins_are_rate_limited_per_address_and_user() {
    let b = spawn_broker(&format!(
        "{USER}\n[limits]\nlogin_attempts_per_minute = 3\n[[queues]]\nname = \"q\"\n"
    ))
    .await;
    // A verified login, cached: it is not checked (nor counted) again.
    let (s, _) = send(b.read("/v1/queues/q/messages")).await;
    assert_eq!(s, 200);
    let wrong = |user: &str| {
        b.get("/v1/queues/q/messages")
            .basic_auth(user, Some("wrong-password"))
    };
    let (s, v) = send(wrong("u")).await;
    assert_eq!((s, v["code"].as_str()), (403, Some("bad_login")));
    let (s, v) = send(wrong("nobody")).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (403, Some("bad_login")),
        "an unknown user is checked (and counted) like a known one"
    );
    let res = wrong("u").send().await.unwrap();
    assert_eq!(res.status(), 429, "the address's three checks are used");
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After: {retry}");
    let (_, v) = json(res).await;
    assert_eq!(v["code"], "too_many_logins");
    let refused = metric(&b.metrics().await, "broker_login_refusals_total");
    assert!(refused >= Some(1.0), "{refused:?}");
    let (s, _) = send(b.read("/v1/queues/q/messages")).await;
    assert_eq!(s, 200, "the cached login still works");
}
