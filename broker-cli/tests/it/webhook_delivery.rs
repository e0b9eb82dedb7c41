//! Webhook delivery through the real binary, with recording sinks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{spawn_broker, spawn_http, write_config};

/// Requests a sink received: path and `webhook-id`.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A sink that records and answers `status`.
fn sink(status: u16) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let rec = seen.clone();
    let url = spawn_http(move |req, _body| {
        let rec = rec.clone();
        async move {
            let id = req
                .headers()
                .get("webhook-id")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            rec.lock().unwrap().push((req.path().to_owned(), id));
            actix_web::HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
                .finish()
        }
    });
    (url, seen)
}

async fn wait_for(seen: &Seen, n: usize) -> Vec<(String, String)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = seen.lock().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} requests",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `webhook-id` identifies the message and the target, not the target's place in the
/// list: a retry resumed after a restart whose config added a target in front keeps
/// the id the receiver saw on the first attempt.
#[actix_web::test]
async fn webhook_ids_survive_targets_added_in_front() {
    let (failing, seen) = sink(500);
    let (other, _) = sink(200);
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/broker.db", dir.path().display());
    let target = |url: &str| {
        format!(
            "[[queues.webhooks]]\nurl = \"{url}/a\"\nsigning_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n\
             max_retries = 5\nbackoff = {{ schedule = [\"300ms\"], jitter = 0.0 }}\n"
        )
    };
    let config =
        |targets: &str| format!("[storage]\nurl = \"{db}\"\n[[queues]]\nname = \"q\"\n{targets}");
    let (_d, path) = write_config("broker.toml", &config(&target(&failing)));
    let mut b = spawn_broker(&path);
    b.post("/v1/queues/q/messages")
        .body("m")
        .send()
        .await
        .unwrap();
    let first = wait_for(&seen, 1).await[0].1.clone();
    assert!(first.starts_with("msg_"), "{first}");
    b.child.kill().unwrap();
    b.child.wait().unwrap();

    // Restarted with another target in front of the failing one.
    let both = format!("{}{}", target(&other), target(&failing));
    std::fs::write(&path, config(&both)).unwrap();
    let before = seen.lock().unwrap().len();
    let _b = spawn_broker(&path);
    let again = wait_for(&seen, before + 1).await;
    assert_eq!(
        again[before].1, first,
        "the same message to the same target keeps its id"
    );
}
