//! The @platformatic/pg-hooks README tutorial, its curl commands byte for byte, against
//! the real binary on the tutorial's ports (3042 for the hooks service, 3001 for the
//! target service).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{send, spawn_broker_with, write_config};

const CREATE_QUEUE: &str = r#"curl --request POST \
  --url http://127.0.0.1:3042/queues/ \
  --header 'Content-Type: application/json' \
  --data '{
  "name": "my test",
  "callbackUrl": "http://127.0.0.1:3001/receive-my-hook",
  "method": "POST",
  "headers": {
    "Content-Type": "application/json"
  },
  "maxRetries": 1
}'"#;

const CREATE_MESSAGE: &str = r#"curl --request POST \
  --url http://0.0.0.0:3042/messages/ \
  --header 'Content-Type: application/json' \
  --data '{
  "queueId": 1,
  "body": "{ \"hello\": \"world\" }"
}'"#;

const CREATE_CRON: &str = r#"curl --request POST \
  --url http://0.0.0.0:3042/cron/ \
  --header 'Content-Type: application/json' \
  --data '{
  "queueId": 2,
  "schedule": "* * * * *",
  "body": "{ \"hello\": \"world\" }"
}'"#;

fn sh(script: &str) -> serde_json::Value {
    let out = Command::new("bash").args(["-c", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

#[actix_web::test]
async fn the_readme_tutorial_works_unchanged() {
    // The tutorial's target service: POST /receive-my-hook answers "ok".
    let received: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let (tx, mut rx) = tokio::sync::watch::channel(0usize);
    let tx = Arc::new(tx);
    let rec = received.clone();
    let target = actix_web::HttpServer::new(move || {
        let (rec, tx) = (rec.clone(), tx.clone());
        actix_web::App::new().route(
            "/receive-my-hook",
            actix_web::web::post().to(move |req: actix_web::HttpRequest, body: String| {
                let (rec, tx) = (rec.clone(), tx.clone());
                async move {
                    let ct = req
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let n = {
                        let mut r = rec.lock().unwrap();
                        r.push((ct, body));
                        r.len()
                    };
                    tx.send_replace(n);
                    "ok"
                }
            }),
        )
    })
    .workers(1)
    .bind("127.0.0.1:3001")
    .expect("port 3001 (the tutorial's target service) is free")
    .disable_signals()
    .run();
    actix_web::rt::spawn(target);

    let (_d, path) = write_config(
        "broker.toml",
        // The tutorial's target runs on this machine: loopback must be let through.
        "[admin]\ntoken = \"tutorial-admin-token\"\n[pg_hooks]\nallow_anonymous = true\n\
         [webhooks]\nallow_targets = [\"127.0.0.1/32\"]\n",
    );
    let b = spawn_broker_with(&path, &[("BROKER__SERVER__LISTEN", "127.0.0.1:3042")]);

    let queue = sh(CREATE_QUEUE);
    assert_eq!(queue["id"], 1);
    assert_eq!(queue["name"], "my test");
    assert_eq!(
        queue["callbackUrl"],
        "http://127.0.0.1:3001/receive-my-hook"
    );
    assert_eq!(queue["maxRetries"], 1);

    let message = sh(CREATE_MESSAGE);
    assert_eq!(
        (message["queueId"].as_u64(), message["body"].as_str()),
        (Some(1), Some(r#"{ "hello": "world" }"#))
    );
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n >= 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        received.lock().unwrap()[0],
        (
            "application/json".to_owned(),
            r#"{ "hello": "world" }"#.to_owned()
        ),
        "the hook received the body with the queue's headers"
    );

    // The optional cron step names queue 2, which the tutorial never creates: create it.
    let second = sh(&CREATE_QUEUE.replace("my test", "second"));
    assert_eq!(second["id"], 2);
    let cron = sh(CREATE_CRON);
    assert_eq!(
        (cron["id"].as_u64(), cron["schedule"].as_str()),
        (Some(1), Some("* * * * *"))
    );
    let (_, v) = send(b.get("/v1/crons").bearer_auth("tutorial-admin-token")).await;
    assert_eq!(v["crons"][0]["name"], "pg-hooks.cron.1");
    assert!(
        v["crons"][0]["next_run"]
            .as_str()
            .unwrap()
            .ends_with(":00.000Z"),
        "every minute: {v}"
    );

    // pg-hooks' admin secret header is the admin credential when anonymous access is off.
    // (Authorized: the answer is that nothing was dead-lettered.)
    let (s, v) = send(
        b.post("/v1/queues/pg-hooks.1/redrive")
            .header("X-PLATFORMATIC-ADMIN-SECRET", "tutorial-admin-token"),
    )
    .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("no_dead_letters")),
        "{v}"
    );
}
