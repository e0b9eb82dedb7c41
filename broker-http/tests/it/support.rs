//! Test helpers: a real broker on a free loopback port, in this process.

use std::path::PathBuf;
use std::sync::Arc;

use broker_core::config::parse;
use broker_core::settings::Settings;
use broker_core::Broker;
use hmac::{KeyInit, Mac};

/// A running broker.
pub struct TestBroker {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The broker, for direct inspection.
    #[allow(dead_code)]
    pub broker: Arc<Broker>,
    /// HTTP client.
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
    /// The config file the broker was started from.
    #[allow(dead_code)]
    pub config_path: PathBuf,
}

/// Starts a broker from a TOML config (its `server.listen` is replaced by a free port).
pub async fn spawn_broker(toml: &str) -> TestBroker {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("broker.toml");
    std::fs::write(&config_path, toml).unwrap();
    let mut env = vec![(
        "BROKER__SERVER__LISTEN".to_owned(),
        "127.0.0.1:0".to_owned(),
    )];
    if !toml.contains("[storage]") {
        // The default backend (SQLite), in this test's own directory.
        env.push((
            "BROKER__STORAGE__URL".to_owned(),
            format!("sqlite://{}/data/broker.db", dir.path().display()),
        ));
    }
    let (cfg, source) = parse(Some(&config_path), toml, env).unwrap();
    let settings = Settings::compile(cfg, source).unwrap();
    let listener = std::net::TcpListener::bind(settings.listen).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let broker = Broker::start(settings).await.unwrap();
    let server = broker_http::server(broker.clone(), listener).unwrap();
    actix_web::rt::spawn(server);
    TestBroker {
        url,
        broker,
        http: reqwest::Client::new(),
        _dir: dir,
        config_path,
    }
}

impl TestBroker {
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.url))
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.url))
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.put(format!("{}{path}", self.url))
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.delete(format!("{}{path}", self.url))
    }

    /// GET as the test user `u` / `password1`.
    pub fn read(&self, path: &str) -> reqwest::RequestBuilder {
        self.get(path).basic_auth("u", Some("password1"))
    }

    /// Waits (bounded) until a metric sample reaches `value`: an observable event, not a sleep.
    pub async fn wait_for_metric(&self, sample: &str, value: f64) {
        for _ in 0..500 {
            if metric(&self.metrics().await, sample) == Some(value) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{sample} never reached {value}");
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Status and JSON body of a response.
pub async fn json(res: reqwest::Response) -> (u16, serde_json::Value) {
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    let v = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    };
    (status, v)
}

/// Hex HMAC-SHA256, computed with the `hmac` crate directly (not the broker's helper).
pub fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    hex::encode(m.finalize().into_bytes())
}

/// The value of one sample in a Prometheus text exposition, if present.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A user `u` with password `password1` (plain, fast in tests) reading everything.
pub const USER: &str = r#"
[[users]]
name = "u"
pass_hash = "plain;;password1"
queues = ["q", "q2", "small", "json", "bearer", "hmac", "gh", "stripe", "slack", "sw", "local", "proxied", "p.*"]
"#;

/// One request a [`Sink`] received.
#[derive(Clone, Debug)]
pub struct Hit {
    pub at: std::time::Instant,
    pub method: String,
    pub headers: std::collections::HashMap<String, String>,
    pub body: bytes::Bytes,
}

/// How a [`Sink`] answers request number `n` (0-based).
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<&'static str>,
    pub delay: std::time::Duration,
    /// A `Location` header (with a 3xx status: a redirect).
    pub location: Option<String>,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply {
            status,
            retry_after: None,
            delay: std::time::Duration::ZERO,
            location: None,
        }
    }

    /// A 307 to `to`.
    pub fn redirect(to: &str) -> Self {
        Reply {
            location: Some(to.to_owned()),
            ..Reply::status(307)
        }
    }
}

/// A local webhook receiver that records every request.
pub struct Sink {
    pub url: String,
    pub hits: std::sync::Arc<std::sync::Mutex<Vec<Hit>>>,
    count: tokio::sync::watch::Receiver<usize>,
}

pub async fn spawn_sink(plan: impl Fn(usize, &Hit) -> Reply + Send + Sync + 'static) -> Sink {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    use std::sync::{Arc, Mutex};
    let hits = Arc::new(Mutex::new(Vec::<Hit>::new()));
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    let plan = Arc::new(plan);
    let tx = Arc::new(tx);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let state = (hits.clone(), plan, tx);
    let server = HttpServer::new(move || {
        let (hits, plan, tx) = state.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let (hits, plan, tx) = (hits.clone(), plan.clone(), tx.clone());
            async move {
                let hit = Hit {
                    at: std::time::Instant::now(),
                    method: req.method().to_string(),
                    headers: req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                        .collect(),
                    body,
                };
                let n = {
                    let mut h = hits.lock().unwrap();
                    h.push(hit.clone());
                    h.len() - 1
                };
                tx.send_replace(n + 1);
                let reply = plan(n, &hit);
                if !reply.delay.is_zero() {
                    tokio::time::sleep(reply.delay).await;
                }
                let mut res = HttpResponse::build(
                    actix_web::http::StatusCode::from_u16(reply.status).unwrap(),
                );
                if let Some(ra) = reply.retry_after {
                    res.insert_header(("Retry-After", ra));
                }
                if let Some(to) = reply.location {
                    res.insert_header(("Location", to));
                }
                res.body("ok")
            }
        }))
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .disable_signals()
    .run();
    actix_web::rt::spawn(server);
    Sink {
        url,
        hits,
        count: rx,
    }
}

impl Sink {
    /// Waits (up to 20 s) until at least `n` requests arrived; returns them.
    pub async fn wait_hits(&mut self, n: usize) -> Vec<Hit> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while *self.count.borrow_and_update() < n {
            tokio::time::timeout_at(deadline, self.count.changed())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} requests arrived", *self.count.borrow()))
                .unwrap();
        }
        self.hits.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

/// Sends a request: status and JSON body.
pub async fn send(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    json(req.send().await.unwrap()).await
}
