//! Outbound webhook signatures verified by the Standard Webhooks reference library from
//! PyPI (`standardwebhooks`, pinned in tests/python/requirements.txt), for a secret with
//! the `whsec_` prefix and one without (the specification reads both as base64; the
//! broker once used an unprefixed secret's bytes as they are, which no receiver using
//! the library could verify).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::support::{python, spawn_broker, spawn_http, write_config};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/python/standard_webhooks_verify.py"
);

/// A delivery the sink saw: path, headers, body.
type Delivery = (String, Vec<(String, String)>, Vec<u8>);

/// What the reference library says of each delivery, verified with `secret`.
fn verify(py: &str, secret: &str, deliveries: &[&Delivery]) -> Vec<Value> {
    let req = json!({
        "secret": secret,
        "deliveries": deliveries.iter().map(|(_, headers, body)| json!({
            "body_b64": base64::engine::general_purpose::STANDARD.encode(body),
            "headers": headers
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect::<serde_json::Map<String, Value>>(),
        })).collect::<Vec<_>>(),
    });
    let mut child = Command::new(py)
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the verifier failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[actix_web::test]
async fn deliveries_verify_with_the_reference_library_with_and_without_whsec() {
    let Some(py) = python() else { return };
    // Two keys, one written with the prefix and one without.
    const PREFIXED: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const BARE: &str = "c2VjcmV0LWtleS1mb3ItdGhlLWJhcmUtdGFyZ2V0";
    let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let rec = seen.clone();
    let sink = spawn_http(move |req, body| {
        let rec = rec.clone();
        async move {
            let headers = req
                .headers()
                .iter()
                .filter(|(k, _)| k.as_str().starts_with("webhook-"))
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            rec.lock()
                .unwrap()
                .push((req.path().to_owned(), headers, body.to_vec()));
            actix_web::HttpResponse::Ok().finish()
        }
    });
    let (_d, path) = write_config(
        "broker.toml",
        &format!(
            "[storage]\nurl = \"memory://\"\n[[queues]]\nname = \"q\"\n\
             [[queues.webhooks]]\nurl = \"{sink}/prefixed\"\nsigning_secret = \"{PREFIXED}\"\n\
             [[queues.webhooks]]\nurl = \"{sink}/bare\"\nsigning_secret = \"{BARE}\"\n"
        ),
    );
    let b = spawn_broker(&path);
    for body in [r#"{"n":1}"#, "plain text, not JSON"] {
        let s = b
            .post("/v1/queues/q/messages")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(s.status(), 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap().len() < 4 {
        assert!(std::time::Instant::now() < deadline, "deliveries missing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap().clone();
    for (target, secret, other) in [("/prefixed", PREFIXED, BARE), ("/bare", BARE, PREFIXED)] {
        let mine: Vec<&Delivery> = seen.iter().filter(|d| d.0 == target).collect();
        assert_eq!(mine.len(), 2, "{target}");
        for v in verify(&py, secret, &mine) {
            assert_eq!(v["ok"], true, "{target}: {v}");
        }
        for v in verify(&py, other, &mine) {
            assert_eq!(v["ok"], false, "{target} verified with the other key: {v}");
        }
    }
}
