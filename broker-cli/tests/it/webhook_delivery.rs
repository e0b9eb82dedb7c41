//! Webhook delivery through the real binary, with recording sinks.

use std::time::Duration;

use crate::support::{recording_sink, spawn_broker, write_config, Seen};

/// A sink that records and answers `status`.
fn sink(status: u16) -> (String, Seen) {
    recording_sink(status)
}

async fn wait_for(seen: &Seen, n: usize) -> Vec<(String, String, String)> {
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

/// A message a target gave up on is settled only once its dead-letter copy is stored:
/// across a graceful stop (which waits up to `server.shutdown_timeout` for it) and a
/// restart, a message whose dead-lettering was refused is delivered again and reaches
/// the dead-letter queue — nothing vanishes.
#[actix_web::test]
async fn nothing_vanishes_while_being_dead_lettered_across_a_stop() {
    let (failing, seen) = sink(500);
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/broker.db", dir.path().display());
    let config = |dlq_max: usize| {
        format!(
            "[server]\nshutdown_timeout = \"1s\"\n[storage]\nurl = \"{db}\"\n\
             [[users]]\nname = \"u\"\npass_hash = \"plain;;password1\"\nqueues = [\"dlq\"]\n\
             [[queues]]\nname = \"q\"\n[[queues.webhooks]]\nurl = \"{failing}/a\"\nmax_retries = 0\n\
             dead_letter_queue = \"dlq\"\n[[queues]]\nname = \"dlq\"\nmax_message_size = {dlq_max}\n"
        )
    };
    // The dead-letter queue refuses the message (too large for it).
    let (_d, path) = write_config("broker.toml", &config(4));
    let mut b = spawn_broker(&path);
    b.post("/v1/queues/q/messages")
        .body("a long body")
        .send()
        .await
        .unwrap();
    let sample = r#"broker_webhook_dead_letter_failures_total{queue="q"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while crate::support::metric(&b.metrics().await, sample).unwrap_or(0.0) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "dead-lettering was never refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let attempts = seen.lock().unwrap().len();
    let stopping = std::time::Instant::now();
    b.signal("TERM");
    let status = b.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        stopping.elapsed() >= Duration::from_millis(900),
        "the stop waited for the dead-lettering (up to shutdown_timeout)"
    );

    // Back with a dead-letter queue that takes it: delivered again, then dead-lettered.
    std::fs::write(&path, config(1000)).unwrap();
    let b = spawn_broker(&path);
    let again = wait_for(&seen, attempts + 1).await;
    assert!(again.len() > attempts, "delivered again after the restart");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let bodies = crate::support::bodies(&b, "dlq", "u", "password1").await;
        if bodies == vec!["a long body".to_owned()] {
            break;
        }
        assert!(bodies.is_empty(), "{bodies:?}");
        assert!(std::time::Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
