//! Crossbar's pusher on a loopback server: limits, address and TLS requirements, input
//! checks and headers, each with Crossbar's status and `{"error","args","kwargs"}` body.

use serde_json::{json, Value};

use crate::support::spawn_broker;

const QUEUES: &str = r#"
[[queues]]
name = "news"
[[queues]]
name = "guarded"
auth = { method = "bearer", key = "a-long-enough-bearer" }
"#;

async fn push(
    b: &crate::support::TestBroker,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = b
        .post("/push")
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, v, headers)
}

fn assert_crossbar_error(v: &Value, contains: &str) {
    assert_eq!(v["args"], json!([]), "{v}");
    assert_eq!(v["kwargs"], json!({}), "{v}");
    let e = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(e.contains(contains), "{e:?} should contain {contains:?}");
}

#[actix_web::test]
async fn limits_addresses_and_tls_are_enforced() {
    let b = spawn_broker(&format!(
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n[pusher]\npost_body_limit = 64\nallowed_origins = [\"https://app.example\"]\n{QUEUES}"
    ))
    .await;
    let ok = r#"{"topic":"news","args":[1]}"#;
    let (s, v, h) = push(&b, ok, &[("origin", "https://app.example")]).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["id"].is_u64());
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-credentials"], "true");
    // An origin not listed is not reflected and gets no credentials.
    let (s, v, h) = push(&b, ok, &[("origin", "https://evil.example")]).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h.get("access-control-allow-credentials").is_none(), "{h:?}");
    assert_eq!(h["content-type"], "application/json; charset=UTF-8");
    assert_eq!(
        h["cache-control"],
        "no-store,no-cache,must-revalidate,max-age=0"
    );

    let big = format!(r#"{{"topic":"news","args":["{}"]}}"#, "x".repeat(100));
    let (s, v, _) = push(&b, &big, &[]).await;
    assert_eq!(s, 413);
    assert_crossbar_error(&v, "Request too long");

    // Nothing refused reached the queue (two accepted pushes).
    let depth = b.broker.head("news").await.unwrap();
    assert_eq!(depth.head, 2);
}

#[actix_web::test]
async fn require_ip_and_require_tls() {
    let b = spawn_broker(&format!(
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n[pusher]\nrequire_ip = [\"10.0.0.0/8\"]\n{QUEUES}"
    ))
    .await;
    let ok = r#"{"topic":"news"}"#;
    let (s, v, _) = push(&b, ok, &[]).await;
    assert_eq!(s, 400);
    assert_crossbar_error(&v, "Request denied based on IP address");
    // Through the trusted proxy, the forwarded address counts.
    let (s, v, _) = push(&b, ok, &[("x-forwarded-for", "10.1.2.3")]).await;
    assert_eq!(s, 200, "{v}");

    let b = spawn_broker(&format!(
        "[server]\ntrusted_proxies = [\"10.9.9.9\"]\n[pusher]\nrequire_tls = true\n{QUEUES}"
    ))
    .await;
    let (s, v, _) = push(&b, ok, &[]).await;
    assert_eq!(s, 400);
    assert_crossbar_error(&v, "not using TLS");
    // X-Forwarded-Proto from a peer that is not a trusted proxy is ignored.
    let (s, _, _) = push(&b, ok, &[("x-forwarded-proto", "https")]).await;
    assert_eq!(s, 400);

    let b = spawn_broker(&format!(
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n[pusher]\nrequire_tls = true\n{QUEUES}"
    ))
    .await;
    let (s, v, _) = push(&b, ok, &[("x-forwarded-proto", "https")]).await;
    assert_eq!(s, 200, "{v}");
    // The client's forged `https` line followed by the proxy's `http` is plain HTTP.
    let mut two = reqwest::header::HeaderMap::new();
    two.append("x-forwarded-proto", "https".parse().unwrap());
    two.append("x-forwarded-proto", "http".parse().unwrap());
    let res = b
        .post("/push")
        .header("content-type", "application/json")
        .headers(two)
        .body(ok)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let (s, _, _) = push(&b, ok, &[("x-forwarded-proto", "https, http")]).await;
    assert_eq!(s, 400);
}

#[actix_web::test]
async fn malformed_requests_get_crossbars_answers() {
    let b = spawn_broker(&format!("[pusher]\n{QUEUES}")).await;
    for (body, status, contains) in [
        ("not json", 400, "invalid JSON"),
        ("[1,2]", 400, "must be a dict"),
        (r#"{"args":[]}"#, 400, "missing key 'topic'"),
        (
            r#"{"topic":"news","args":"x"}"#,
            400,
            "'args' must be a list",
        ),
        (r#"{"topic":"nowhere"}"#, 404, "no queue for topic"),
        (r#"{"topic":"guarded"}"#, 401, "failed authentication"),
    ] {
        let (s, v, _) = push(&b, body, &[]).await;
        assert_eq!(s, status, "{body}: {v}");
        assert_crossbar_error(&v, contains);
    }
    let res = b
        .post("/push")
        .header("content-type", "text/plain")
        .body(r#"{"topic":"news"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = b
        .post("/push")
        .header("content-type", "application/json; charset=latin-1")
        .body(r#"{"topic":"news"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = b.get("/push").send().await.unwrap();
    assert_eq!(res.status(), 405);
    let res = b
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/push", b.url))
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["access-control-allow-methods"],
        "POST,PUT,OPTIONS"
    );
    assert_eq!(
        res.headers()["access-control-allow-headers"],
        "content-type"
    );
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    // PUT works like POST; a missing content type is refused (no CORS-simple requests).
    let put = |ct: Option<&'static str>| {
        let mut r = b
            .http
            .put(format!("{}/push", b.url))
            .body(r#"{"topic":"news","kwargs":{"a":1}}"#);
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        r.send()
    };
    assert_eq!(put(Some("application/json")).await.unwrap().status(), 200);
    assert_eq!(put(None).await.unwrap().status(), 400);
}

#[actix_web::test]
async fn without_a_pusher_section_there_is_no_route() {
    let b = spawn_broker(QUEUES).await;
    let res = b.post("/push").body("{}").send().await.unwrap();
    assert_eq!(res.status(), 404);
}
