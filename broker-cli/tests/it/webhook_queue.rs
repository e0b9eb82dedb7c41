//! webhook-queue's README flows, through the real binary, with a config file in
//! webhook-queue's own format, checking its exact wire format (empty bodies, the
//! `MessageList` shape, `{"message","refresh"}` errors, 410 semantics).

use crate::support::{hmac_sha256_hex, send, spawn_broker, text, write_config};

/// webhook-queue's `sha512;SALT;HEX` for password "insecure2", salt "77", computed with
/// `python3 -c 'import hashlib;print("sha512;77;"+hashlib.sha512(b"insecure277").hexdigest())'`.
const JANE_HASH: &str = "sha512;77;6dfcdbf97628335602c0b5d37838c40457e9ac77561f90d8858be82a962d5ddca31f9008d052b27dbcab816c87e3f04716fac66cdd8dec106ced10dfc4831a1f";

fn options(jane_hash: &str, bar: bool, john_queues: &str) -> String {
    let bar_queue = if bar {
        r#",{"name": "bar", "max_message_count": 3, "max_message_size": 10, "max_queue_size": 25}"#
    } else {
        ""
    };
    format!(
        r#"{{
    "listen_host": "127.0.0.1",
    "listen_port": 8080,
    "users": [
        {{"name": "John Doe", "pass_hash": "plain;;insecure", "can_reload": true, "queues": {john_queues}}},
        {{"name": "jane", "pass_hash": "{jane_hash}", "can_reload": false, "queues": ["foo"]}}
    ],
    "queues": [
        {{"name": "foo", "whitelist_ip": ["127.0.0.1"],
          "auth": {{"method": "hmac-sha256", "key": "12345", "header_name": "Foo-Auth"}}}}
        {bar_queue}
    ],
    "max_message_count": 100,
    "max_message_size": 10000,
    "max_queue_size": 500000
}}"#
    )
}

const JOHN: (&str, &str) = ("John Doe", "insecure");

async fn publish_foo(b: &crate::support::BrokerProcess, body: &str) -> (u16, String) {
    let sig = hmac_sha256_hex(b"12345", body.as_bytes());
    text(
        b.post("/q/foo")
            .header("Foo-Auth", sig)
            .body(body.to_owned())
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn read(
    b: &crate::support::BrokerProcess,
    user: (&str, &str),
    client: &str,
) -> (u16, serde_json::Value) {
    send(
        b.get(&format!("/read/{client}"))
            .basic_auth(user.0, Some(user.1)),
    )
    .await
}

async fn listen(
    b: &crate::support::BrokerProcess,
    user: (&str, &str),
    client: &str,
    queue: &str,
) -> (u16, String) {
    text(
        b.get(&format!("/listen/{client}/{queue}"))
            .basic_auth(user.0, Some(user.1))
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

#[actix_web::test]
async fn readme_flow_listen_publish_read_and_limits() {
    let (_dir, path) = write_config(
        "options.conf",
        &options(JANE_HASH, true, r#"["foo", "bar"]"#),
    );
    let b = spawn_broker(&path);

    // listen → empty 200; again → error.
    assert_eq!(listen(&b, JOHN, "c1", "foo").await, (200, String::new()));
    let (s, body) = listen(&b, JOHN, "c1", "foo").await;
    assert_eq!(s, 409);
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["refresh"], false);
    assert!(err["message"].is_string());

    // publish with a correct and a wrong HMAC.
    assert_eq!(
        publish_foo(&b, r#"{"hello":"world"}"#).await,
        (200, String::new())
    );
    let (s, body) = text(
        b.post("/q/foo")
            .header("Foo-Auth", "00".repeat(32))
            .body("x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let (s, _) = text(b.post("/q/foo").body("x").send().await.unwrap()).await;
    assert_eq!(s, 401);

    // read → MessageList; again → nothing new.
    let (s, v) = read(&b, JOHN, "c1").await;
    assert_eq!(s, 200);
    let (_, time) = text(b.get("/time").send().await.unwrap()).await;
    assert!(time.parse::<i64>().is_ok());
    assert_eq!(
        v,
        serde_json::json!({"time": time, "current_message": 1, "messages": [{"id": 1, "message": "{\"hello\":\"world\"}"}]})
    );
    let (_, v) = read(&b, JOHN, "c1").await;
    assert_eq!(ids(&v), Vec::<u64>::new());

    // bar: max 3 messages, 10 bytes each, 25 bytes in all.
    assert_eq!(listen(&b, JOHN, "c2", "bar").await.0, 200);
    for m in ["a", "b", "c", "d"] {
        assert_eq!(
            text(b.post("/q/bar").body(m).send().await.unwrap()).await.0,
            200
        );
    }
    // Overflow by count: "a" rolled off unread.
    let (s, v) = read(&b, JOHN, "c2").await;
    assert_eq!((s, v["refresh"].as_bool()), (410, Some(true)), "{v}");
    assert!(v["message"].as_str().unwrap().contains("too long"));
    let (s, v) = read(&b, JOHN, "c2").await;
    assert_eq!(
        (s, ids(&v)),
        (200, vec![]),
        "refresh is told once; the cursor is at the newest"
    );
    assert_eq!(
        text(b.post("/q/bar").body("e").send().await.unwrap())
            .await
            .0,
        200
    );
    let (_, v) = read(&b, JOHN, "c2").await;
    assert_eq!(ids(&v), vec![5]);

    // Overflow by total size: three 10-byte messages do not fit in 25 bytes.
    for m in ["0123456789", "abcdefghij", "ABCDEFGHIJ"] {
        assert_eq!(
            text(b.post("/q/bar").body(m).send().await.unwrap()).await.0,
            200
        );
    }
    let (s, v) = read(&b, JOHN, "c2").await;
    assert_eq!((s, v["refresh"].as_bool()), (410, Some(true)), "{v}");
    assert_eq!(read(&b, JOHN, "c2").await.0, 200);

    // One oversized message: rejected, and the listening client must refresh.
    let (s, body) = text(b.post("/q/bar").body("01234567890").send().await.unwrap()).await;
    assert_eq!(s, 413, "{body}");
    let (s, v) = read(&b, JOHN, "c2").await;
    assert_eq!((s, v["refresh"].as_bool()), (410, Some(true)));
    assert!(v["message"].as_str().unwrap().contains("size constraints"));
    // Reads resume.
    assert_eq!(
        text(b.post("/q/bar").body("after").send().await.unwrap())
            .await
            .0,
        200
    );
    let (s, v) = read(&b, JOHN, "c2").await;
    assert_eq!(s, 200);
    assert_eq!(v["messages"][0]["message"], "after");
    assert_eq!(v["current_message"], 9);

    // unlisten, then the client is unknown.
    let (s, _) = text(
        b.get("/unlisten/c2")
            .basic_auth(JOHN.0, Some(JOHN.1))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(read(&b, JOHN, "c2").await.0, 404);
    // A queue the user is not granted.
    assert_eq!(listen(&b, ("jane", "insecure2"), "j", "bar").await.0, 403);
    // No login, wrong login.
    assert_eq!(text(b.get("/read/c1").send().await.unwrap()).await.0, 401);
    assert_eq!(read(&b, ("John Doe", "nope"), "c1").await.0, 403);
}

#[actix_web::test]
async fn reload_keeps_contents_and_disconnects_revoked_clients() {
    let (_dir, path) = write_config(
        "options.conf",
        &options(JANE_HASH, true, r#"["foo", "bar"]"#),
    );
    let b = spawn_broker(&path);
    let jane = ("jane", "insecure2");
    assert_eq!(listen(&b, JOHN, "c1", "foo").await.0, 200);
    assert_eq!(listen(&b, JOHN, "c2", "bar").await.0, 200);
    assert_eq!(listen(&b, jane, "j1", "foo").await.0, 200);
    assert_eq!(publish_foo(&b, "kept across reload").await.0, 200);

    // John loses foo, and bar disappears.
    std::fs::write(&path, options(JANE_HASH, false, r#"[]"#)).unwrap();
    assert_eq!(
        text(
            b.get("/reload")
                .basic_auth(jane.0, Some(jane.1))
                .send()
                .await
                .unwrap()
        )
        .await
        .0,
        403
    );
    let (s, body) = text(
        b.get("/reload")
            .basic_auth(JOHN.0, Some(JOHN.1))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, body.as_str()), (200, ""));

    let (s, v) = read(&b, jane, "j1").await;
    assert_eq!(s, 200);
    assert_eq!(
        v["messages"][0]["message"], "kept across reload",
        "contents survive a reload"
    );
    let (s, v) = read(&b, JOHN, "c1").await;
    assert_eq!((s, v["refresh"].as_bool()), (410, Some(false)));
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no longer be available"),
        "{v}"
    );
    let (s, v) = read(&b, JOHN, "c2").await;
    assert_eq!(s, 410);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("removed that queue"),
        "{v}"
    );
    // A disconnected client may be unlistened.
    assert_eq!(
        text(
            b.get("/unlisten/c2")
                .basic_auth(JOHN.0, Some(JOHN.1))
                .send()
                .await
                .unwrap()
        )
        .await
        .0,
        200
    );

    // An invalid file is refused; the running configuration stays (same for SIGHUP).
    std::fs::write(
        &path,
        r#"{"listen_host": "127.0.0.1", "listen_port": 1, "users": [], "queues": [], "bogus": 1}"#,
    )
    .unwrap();
    let (s, v) = send(b.post("/reload").basic_auth(JOHN.0, Some(JOHN.1))).await;
    assert_eq!(s, 500);
    assert!(v["message"].as_str().unwrap().contains("bogus"), "{v}");
    assert_eq!(read(&b, jane, "j1").await.0, 200);

    // SIGHUP reloads too: bar comes back and John may listen to it again.
    std::fs::write(&path, options(JANE_HASH, true, r#"["bar"]"#)).unwrap();
    b.signal("HUP");
    b.wait_for_metric(r#"broker_config_reloads_total{outcome="ok"}"#, 2.0)
        .await;
    assert_eq!(listen(&b, JOHN, "c2", "bar").await.0, 200);
    assert_eq!(
        listen(&b, JOHN, "c1", "bar").await.0,
        200,
        "a disconnected client may listen again"
    );
}

#[actix_web::test]
async fn set_password_rewrites_the_file_and_the_old_password_stops_working() {
    let (_dir, path) = write_config("options.conf", &options(JANE_HASH, true, r#"["foo"]"#));
    let b = spawn_broker(&path);
    let old = ("jane", "insecure2");
    assert_eq!(listen(&b, old, "j", "foo").await.0, 200);
    let (s, v) = send(
        b.post("/setPassword")
            .basic_auth(old.0, Some(old.1))
            .json(&serde_json::json!({"password": "short"})),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (400, Some("password_too_short")));
    let (s, body) = text(
        b.post("/setPassword")
            .basic_auth(old.0, Some(old.1))
            .json(&serde_json::json!({"password": "a-new-password"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, body.as_str()), (200, ""));

    assert_eq!(read(&b, old, "j").await.0, 403, "the old password fails");
    assert_eq!(
        read(&b, ("jane", "a-new-password"), "j").await.0,
        200,
        "the client survives"
    );
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let hash = file["users"][1]["pass_hash"].as_str().unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert_eq!(
        file["users"][0]["pass_hash"], "plain;;insecure",
        "other users untouched"
    );
    assert_eq!(
        file["listen_host"], "127.0.0.1",
        "still webhook-queue's format"
    );
}

#[actix_web::test]
async fn allow_list_spoofing_and_trusted_proxy() {
    let toml = r#"
[server]
trusted_proxies = ["127.0.0.1"]
[[queues]]
name = "hooks"
allow_ips = ["10.1.2.3"]
"#;
    let (_dir, path) = write_config("broker.toml", toml);
    let b = spawn_broker(&path);
    let send = |xff: &'static str| {
        b.post("/q/hooks")
            .header("X-Forwarded-For", xff)
            .body("x")
            .send()
    };
    assert_eq!(
        send("10.1.2.3").await.unwrap().status(),
        200,
        "through the trusted proxy"
    );
    assert_eq!(
        send("10.1.2.3, 203.0.113.5").await.unwrap().status(),
        403,
        "forged left part ignored"
    );
    assert_eq!(
        b.post("/q/hooks").body("x").send().await.unwrap().status(),
        403
    );

    // Without trusted proxies the header is never believed.
    let (_dir2, path2) = write_config(
        "broker.toml",
        "[[queues]]\nname = \"hooks\"\nallow_ips = [\"10.1.2.3\"]\n",
    );
    let b2 = spawn_broker(&path2);
    let res = b2
        .post("/q/hooks")
        .header("X-Forwarded-For", "10.1.2.3")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
}

#[actix_web::test]
async fn bearer_secret_rotation_by_reload() {
    let cfg = |keys: &str| {
        format!("[[queues]]\nname = \"ingest\"\nauth = {{ method = \"bearer\", keys = {keys} }}\n")
    };
    let (_dir, path) = write_config("broker.toml", &cfg(r#"["old-secret"]"#));
    let b = spawn_broker(&path);
    let send = |secret: &'static str| {
        b.post("/v1/queues/ingest/messages")
            .header("Authorization", secret)
            .body("{}")
            .send()
    };
    assert_eq!(send("old-secret").await.unwrap().status(), 200);
    assert_eq!(send("new-secret").await.unwrap().status(), 403);
    std::fs::write(&path, cfg(r#"["old-secret", "new-secret"]"#)).unwrap();
    b.signal("HUP");
    b.wait_for_metric(r#"broker_config_reloads_total{outcome="ok"}"#, 1.0)
        .await;
    assert_eq!(send("old-secret").await.unwrap().status(), 200);
    assert_eq!(send("Bearer new-secret").await.unwrap().status(), 200);
    std::fs::write(&path, cfg(r#"["new-secret"]"#)).unwrap();
    b.signal("HUP");
    b.wait_for_metric(r#"broker_config_reloads_total{outcome="ok"}"#, 2.0)
        .await;
    assert_eq!(send("old-secret").await.unwrap().status(), 403);
    assert_eq!(send("new-secret").await.unwrap().status(), 200);
}
