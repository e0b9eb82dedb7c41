//! The deployment's observability against the real binary: every metric name the Grafana
//! dashboard (deploy/grafana/broker.json) and the alert rules
//! (deploy/prometheus/alerts.yaml) use is exported by a broker that has been exercised
//! (publish, reject, drop, delay, WebSocket delivery, webhooks that succeed and that
//! dead-letter, cron); and a real Prometheus scraping that broker answers the dashboard's
//! queries and evaluates the rules without error.
//!
//! The Prometheus test needs the `prometheus` binary (Debian's package; `.ci/run` installs
//! it) on PATH or in `BROKER_TEST_PROMETHEUS`; without it the test is skipped, or fails
//! when `CI` is set.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{metric, spawn_broker, spawn_http, write_config, ws_connect, BrokerProcess};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/broker.json");
const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/prometheus/alerts.yaml"
);

/// `broker_…` metric names in a text (PromQL, JSON or YAML): every such word.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut i = 0;
    while let Some(at) = text[i..].find("broker_") {
        let start = i + at;
        let boundary = start == 0 || !(word(bytes[start - 1]) || bytes[start - 1] == b'.');
        let mut end = start + "broker_".len();
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if boundary {
            names.insert(text[start..end].trim_end_matches('_').to_owned());
        }
        i = end;
    }
    names
}

/// Sample names of a Prometheus text exposition (`_bucket`, `_sum`, `_count` included).
fn exported_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_exprs() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_owned(),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

/// A dashboard expression as Grafana sends it with every variable on "All".
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$namespace", ".*")
        .replace("$pod", ".*")
        .replace("$queue", ".*")
}

/// A webhook sink: `/ok` answers 200, anything else 500.
fn spawn_sink() -> String {
    spawn_http(|req, _| async move {
        if req.path() == "/ok" {
            actix_web::HttpResponse::Ok().finish()
        } else {
            actix_web::HttpResponse::InternalServerError().finish()
        }
    })
}

/// Polls `/metrics` until `cond` holds (bounded: 20 s).
async fn until_metrics(b: &BrokerProcess, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = b.metrics().await;
        if cond(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} never showed:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A broker on SQLite that has done everything the dashboard and the alerts watch.
async fn exercised_broker() -> (BrokerProcess, tempfile::TempDir) {
    let sink = spawn_sink();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[storage]
url = "sqlite://{db}"
[ws]
jwt_secrets = ["observability-jwt-secret-0123"]
[[users]]
name = "ops"
pass_hash = "plain;;password2"
queues = ["orders", "orders-dlq", "ticks"]
[[queues]]
name = "orders"
auth = {{ method = "bearer", key = "orders-secret-1" }}
max_message_count = 3
[[queues.webhooks]]
url = "{sink}/ok"
[[queues.webhooks]]
url = "{sink}/fail"
max_retries = 1
backoff = {{ schedule = ["10ms"], jitter = 0.0 }}
dead_letter_queue = "orders-dlq"
[[queues]]
name = "orders-dlq"
[[queues]]
name = "ticks"
[[crons]]
name = "tick"
queue = "ticks"
schedule = "* * * * * *"
body = "{{}}"
"#,
        db = dir.path().join("broker.db").display(),
    );
    let (cfg_dir, path) = write_config("broker.toml", &toml);
    std::mem::forget(cfg_dir); // the config must outlive the process; it is tiny
    let b = spawn_broker(&path);

    // A WebSocket subscriber that receives one message (delivery latency), then leaves.
    let mut ws = ws_connect(&b.url, "", Some("Basic b3BzOnBhc3N3b3JkMg=="))
        .await
        .unwrap();
    assert_eq!(ws.recv().await["event"], "connected");
    ws.subscribe("orders", None).await;
    let publish = |body: &'static str, secret: &'static str| {
        b.post("/v1/queues/orders/messages")
            .bearer_auth(secret)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(
        publish("{\"n\":1}", "orders-secret-1")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(ws.recv().await["event"], "message");
    drop(ws);
    // Four more than the queue keeps: drops. A wrong secret: a rejection. A delayed one.
    for body in ["{\"n\":2}", "{\"n\":3}", "{\"n\":4}", "{\"n\":5}"] {
        assert_eq!(
            publish(body, "orders-secret-1").await.unwrap().status(),
            200
        );
    }
    assert_eq!(publish("{}", "wrong-secret").await.unwrap().status(), 403);
    let delayed = b
        .post("/v1/queues/orders/messages?delay=1h")
        .bearer_auth("orders-secret-1")
        .body("later")
        .send()
        .await
        .unwrap();
    assert_eq!(delayed.status(), 200);
    // Webhooks settle (one target succeeds, the other dead-letters), the cron ticks, and
    // the WebSocket's disconnect is counted.
    until_metrics(&b, "webhook outcomes, cron run, WS disconnect", |t| {
        metric(
            t,
            r#"broker_webhook_deliveries_total{outcome="success",queue="orders"}"#,
        )
        .is_some()
            && metric(
                t,
                r#"broker_webhook_deliveries_total{outcome="dead_lettered",queue="orders"}"#,
            )
            .is_some()
            && t.contains("broker_cron_runs_total{cron=\"tick\"")
            && t.contains("broker_ws_disconnects_total{")
    })
    .await;
    (b, dir)
}

#[actix_web::test]
async fn every_metric_the_dashboard_and_the_alerts_use_is_exported() {
    let (b, _dir) = exercised_broker().await;
    let exported = exported_names(&b.metrics().await);
    for (file, text) in [
        (DASHBOARD, std::fs::read_to_string(DASHBOARD).unwrap()),
        (ALERTS, std::fs::read_to_string(ALERTS).unwrap()),
    ] {
        let used = metric_names(&text);
        assert!(
            used.len() >= 8,
            "{file}: only {used:?} found; the scan is broken"
        );
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics the broker does not export: {missing:?}\nexported: {exported:?}"
        );
    }
}

#[test]
fn the_metric_name_scan_finds_names_and_only_names() {
    let found = metric_names(
        r#"sum(rate(broker_published_total{queue=~"$q"}[5m])) / broker_queue_limit_bytes
        "uid": "broker-overview", deploy/grafana/broker.json, x_broker_not, broker_ws_delivery_latency_seconds_bucket"#,
    );
    let want: BTreeSet<String> = [
        "broker_published_total",
        "broker_queue_limit_bytes",
        "broker_ws_delivery_latency_seconds_bucket",
    ]
    .map(String::from)
    .into();
    assert_eq!(found, want);
    assert!(
        exported_names("# HELP x\nbroker_a{q=\"1\"} 2\nbroker_b 3\n")
            .is_superset(&["broker_a", "broker_b"].map(String::from).into())
    );
}

/// The Prometheus binary, if this machine has one.
fn prometheus_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BROKER_TEST_PROMETHEUS").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
    });
    if on_path.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus is not installed (CI runs this test; .ci/run installs it)"
        );
        eprintln!("skipped: install Debian's prometheus package or set BROKER_TEST_PROMETHEUS");
    }
    on_path
}

/// A Prometheus server process, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (host:port) every second, with the alert rules.
    async fn start(bin: &Path, target: &str, dir: &Path) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {ALERTS}\nscrape_configs:\n  - job_name: broker\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        // A free port: bound, read, released (Prometheus binds it right after).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        p.until(
            "ready",
            |_| true,
            |http, url| http.get(format!("{url}/-/ready")),
        )
        .await;
        p
    }

    /// Polls a request until it answers 200 with a body `cond` accepts (bounded: 60 s).
    async fn until(
        &self,
        what: &str,
        cond: impl Fn(&Value) -> bool,
        req: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        loop {
            if let Ok(res) = req(&self.http, &self.url).send().await {
                let ok = res.status().is_success();
                last = res.text().await.unwrap_or_default();
                let v = serde_json::from_str(&last).unwrap_or(Value::Null);
                if ok && cond(&v) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus: {what} never came; last: {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn query(&self, expr: &str) -> (u16, Value) {
        let res = self
            .http
            .get(query_url(&self.url, expr))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap())
    }
}

/// `/api/v1/query?query=EXPR`, encoded.
fn query_url(base: &str, expr: &str) -> reqwest::Url {
    reqwest::Url::parse_with_params(&format!("{base}/api/v1/query"), [("query", expr)]).unwrap()
}

#[actix_web::test]
async fn a_real_prometheus_answers_the_dashboard_and_evaluates_the_alerts() {
    let Some(bin) = prometheus_bin() else { return };
    let (b, _dir) = exercised_broker().await;
    let target = b.url.trim_start_matches("http://").to_owned();
    let work = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(&bin, &target, work.path()).await;

    // The broker is scraped, and the ingest panel's query has data.
    let exprs = dashboard_exprs();
    let (_, ingest) = exprs
        .iter()
        .find(|(title, _)| title == "Published by queue")
        .expect("the dashboard has an ingest panel");
    let ingest = substitute(ingest);
    let v = prom
        .until(
            "a result for the ingest panel",
            |v| {
                v["data"]["result"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|s| s["metric"]["queue"] == "orders"))
            },
            |http, url| http.get(query_url(url, &ingest)),
        )
        .await;
    assert_eq!(v["status"], "success");

    // Every panel's query is valid PromQL for this Prometheus; the ones over metrics every
    // broker exports at once have data.
    let mut with_data = Vec::new();
    for (title, expr) in &exprs {
        let (status, v) = prom.query(&substitute(expr)).await;
        assert_eq!(status, 200, "{title}: {expr}: {v}");
        assert_eq!(v["status"], "success", "{title}: {v}");
        if !v["data"]["result"].as_array().unwrap().is_empty() {
            with_data.push(title.as_str());
        }
    }
    for title in [
        "Published by queue",
        "Depth vs limit",
        "Bytes vs limit",
        "Leader",
        "Readiness",
        "Connections by pod",
        "Active brokers",
        "Standbys",
    ] {
        assert!(
            with_data.contains(&title),
            "{title} has no data; with data: {with_data:?}"
        );
    }

    // The alert rules loaded and were evaluated without error; none fires on a healthy
    // broker except by what the test did on purpose (dead letters, a full queue).
    let rules = prom
        .until(
            "every rule evaluated",
            |v| {
                let rules = loaded_rules(v);
                !rules.is_empty()
                    && rules.iter().all(|r| {
                        r["lastEvaluation"]
                            .as_str()
                            .is_some_and(|t| !t.starts_with("0001"))
                    })
            },
            |http, url| http.get(format!("{url}/api/v1/rules")),
        )
        .await;
    let rules = loaded_rules(&rules);
    let written = std::fs::read_to_string(ALERTS)
        .unwrap()
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert!(written >= 10, "{written} rules in alerts.yaml");
    assert_eq!(rules.len(), written, "every rule of alerts.yaml is loaded");
    for r in &rules {
        assert_eq!(r["health"], "ok", "{}: {r}", r["name"]);
    }
    let firing: BTreeSet<&str> = rules
        .iter()
        .filter(|r| r["state"] != "inactive")
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(
        firing.is_subset(
            &[
                "BrokerDeadLettersGrowing",
                "BrokerWebhookFailureRatioHigh",
                "BrokerQueueNearLimit",
            ]
            .into()
        ),
        "alerts on a healthy broker: {firing:?}"
    );
    // The leader series is there, so BrokerNoLeader is evaluated against data: 1 leader.
    let (_, leaders) = prom.query("sum by (job) (broker_leader)").await;
    assert_eq!(leaders["data"]["result"][0]["value"][1], "1", "{leaders}");
    drop(prom);
    drop(b);
}

/// The rules of every group in Prometheus's `GET /api/v1/rules` answer.
fn loaded_rules(answer: &Value) -> Vec<&Value> {
    answer["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect()
}
