//! Helpers that drive the real `broker` binary.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{KeyInit, Mac};

/// A Python with tests/python/requirements.txt (`BROKER_TEST_PYTHON`; `.ci/run` makes
/// one); `None` (skip) without it, a failure when `CI` is set.
pub fn python() -> Option<String> {
    match std::env::var("BROKER_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ if std::env::var_os("CI").is_some() => {
            panic!("BROKER_TEST_PYTHON is not set (CI runs these tests)")
        }
        _ => {
            eprintln!(
                "skipped: set BROKER_TEST_PYTHON to a Python with tests/python/requirements.txt"
            );
            None
        }
    }
}

/// The binary under test.
pub fn broker_bin() -> &'static str {
    env!("CARGO_BIN_EXE_broker")
}

/// A `broker serve` child process on a free loopback port.
pub struct BrokerProcess {
    pub child: Child,
    pub url: String,
    pub http: reqwest::Client,
    /// Its stdout lines after the first.
    pub lines: Lines,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `broker serve --config FILE`, listening on a port the OS picks, and waits for
/// its `listening on` line.
pub fn spawn_broker(config: &Path) -> BrokerProcess {
    spawn_broker_with(config, &[])
}

/// [`spawn_broker`] with extra environment variables.
pub fn spawn_broker_with(config: &Path, env: &[(&str, &str)]) -> BrokerProcess {
    let (child, mut lines) = spawn_serve(config, env);
    let url = next_line(&mut lines, "listening on ");
    BrokerProcess::new(child, url, lines)
}

/// Starts `broker serve` and returns it with its stdout lines.
pub fn spawn_serve(config: &Path, env: &[(&str, &str)]) -> (Child, Lines) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut child = Command::new(broker_bin())
        .args(["serve", "--config"])
        .arg(config)
        // The default storage (./data/broker.db) lands beside the test's config.
        .current_dir(config.parent().expect("config in a directory"))
        .env("BROKER__SERVER__LISTEN", "127.0.0.1:0")
        .env("BROKER_LOG", "error")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn broker");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// A child's stdout, line by line.
pub type Lines = std::sync::mpsc::Receiver<String>;

/// The next stdout line, which must start with `prefix`; the rest of it (bounded: 60 s).
pub fn next_line(lines: &mut Lines, prefix: &str) -> String {
    let line = lines
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("no line {prefix:?} from the broker: {e}"));
    line.trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
        .to_owned()
}

/// A fresh PostgreSQL database for one test (each broker deployment needs a database of
/// its own: the active lock is per database), dropped with the guard. `None` (skip)
/// when neither `BROKER_TEST_POSTGRES_URL` nor a local server is there; a failure when
/// `CI` is set.
pub fn fresh_postgres() -> Option<PgDatabase> {
    let base = match std::env::var("BROKER_TEST_POSTGRES_URL") {
        Ok(base) => base,
        // Else the local server, when it is there and takes the test login: the README's
        // test command runs these tests wherever PostgreSQL runs.
        Err(_) => {
            let local = "postgres://postgres@127.0.0.1:5432/postgres";
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 5432));
            let reachable =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok();
            let login = reachable
                && Command::new("psql")
                    .args([local, "-qc", "select 1"])
                    .output()
                    .is_ok_and(|o| o.status.success());
            if !login {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "PostgreSQL must be reachable in CI (.ci/run starts it)"
                );
                eprintln!("PostgreSQL is not reachable on 127.0.0.1:5432 with psql (BROKER_TEST_POSTGRES_URL unset); skipped");
                return None;
            }
            local.to_owned()
        }
    };
    let name = format!("broker_it_{}", broker_core::random::id());
    psql(&base, &format!("CREATE DATABASE {name}"));
    let (prefix, _) = base.rsplit_once('/').expect("a database in the URL");
    Some(PgDatabase {
        url: format!("{prefix}/{name}"),
        base,
        name,
    })
}

/// Runs one SQL statement with `psql`; panics with its error.
pub fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args([url, "-qc", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A database made by [`fresh_postgres`].
pub struct PgDatabase {
    /// Its URL.
    pub url: String,
    base: String,
    name: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                self.base.as_str(),
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

impl BrokerProcess {
    /// Wraps a child serving at `url`.
    pub fn new(child: Child, url: String, lines: Lines) -> Self {
        BrokerProcess {
            child,
            url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            lines,
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.url))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.url))
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.delete(format!("{}{path}", self.url))
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.put(format!("{}{path}", self.url))
    }

    /// `POST /v1/queues/{queue}/messages` with `body`: status and JSON reply.
    pub async fn publish(&self, queue: &str, body: &str) -> (u16, serde_json::Value) {
        json(
            self.post(&format!("/v1/queues/{queue}/messages"))
                .body(body.to_owned())
                .send()
                .await
                .unwrap(),
        )
        .await
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

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits (bounded) until a metric sample reaches `value`.
    pub async fn wait_for_metric(&self, sample: &str, value: f64) {
        for _ in 0..500 {
            if metric(&self.metrics().await, sample) == Some(value) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{sample} never reached {value}");
    }
}

/// An HTTP endpoint on a free loopback port answering every request with `handler`
/// (webhook sinks, stand-ins for other services); its base URL.
pub fn spawn_http<F, Fut>(handler: F) -> String
where
    F: Fn(actix_web::HttpRequest, actix_web::web::Bytes) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = actix_web::HttpResponse> + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new().default_service(actix_web::web::to(handler.clone()))
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .disable_signals()
    .run();
    actix_web::rt::spawn(server);
    url
}

/// The text bodies of a queue's retained messages, read with `GET …/messages?since=0`.
pub async fn bodies(b: &BrokerProcess, queue: &str, user: &str, password: &str) -> Vec<String> {
    let (s, v) = json(
        b.get(&format!("/v1/queues/{queue}/messages?since=0"))
            .basic_auth(user, Some(password))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_owned())
        .collect()
}

/// Every retained message of `queue` (read as user `u`, password `password1`):
/// offset → body, each offset once, and the epoch of the last read.
pub async fn read_all(b: &BrokerProcess, queue: &str) -> (BTreeMap<u64, String>, String) {
    let mut stored = BTreeMap::new();
    let mut since = 0;
    loop {
        let (s, v) = json(
            b.get(&format!(
                "/v1/queues/{queue}/messages?since={since}&limit=1000"
            ))
            .basic_auth("u", Some("password1"))
            .send()
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let msgs = v["messages"].as_array().unwrap();
        if msgs.is_empty() {
            return (stored, v["epoch"].as_str().unwrap().to_owned());
        }
        for m in msgs {
            let off = m["offset"].as_u64().unwrap();
            let body = m["body"].as_str().unwrap().to_owned();
            assert!(stored.insert(off, body).is_none(), "offset {off} twice");
            since = off;
        }
    }
}

/// Status and body text.
pub async fn text(res: reqwest::Response) -> (u16, String) {
    let s = res.status().as_u16();
    (s, res.text().await.unwrap())
}

/// Status and JSON body.
pub async fn json(res: reqwest::Response) -> (u16, serde_json::Value) {
    let (s, t) = text(res).await;
    let v = if t.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&t).unwrap_or_else(|_| panic!("not JSON: {t}"))
    };
    (s, v)
}

/// Hex HMAC-SHA256 with the `hmac` crate directly.
pub fn hmac_sha256_hex(key: &[u8], body: &[u8]) -> String {
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    m.update(body);
    hex::encode(m.finalize().into_bytes())
}

/// One sample of a Prometheus text exposition.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A temp dir with a file in it.
pub fn write_config(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A WebSocket test client.
pub struct WsClient {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

/// Opens `/v1/ws` (with an optional `Authorization` header value and query string).
pub async fn ws_connect(
    base: &str,
    query: &str,
    auth: Option<&str>,
) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}/v1/ws{query}", base.replacen("http://", "ws://", 1));
    let mut req = url.into_client_request()?;
    if let Some(a) = auth {
        req.headers_mut()
            .insert("authorization", a.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(WsClient { ws })
}

impl WsClient {
    pub async fn send(&mut self, v: serde_json::Value) {
        use futures_util::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::text(v.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, m: tokio_tungstenite::tungstenite::Message) {
        use futures_util::SinkExt;
        self.ws.send(m).await.unwrap();
    }

    /// The next text frame as JSON (control frames skipped); panics after 10 s.
    pub async fn recv(&mut self) -> serde_json::Value {
        match self.next().await {
            Next::Json(v) => v,
            Next::Closed(code, reason) => panic!("closed {code} {reason}"),
        }
    }

    /// The next event: a JSON frame or the close code.
    pub async fn next(&mut self) -> Next {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("no frame within 10 s");
            match frame {
                Some(Ok(Message::Text(t))) => return Next::Json(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(c))) => {
                    let (code, reason) = c
                        .map(|c| (u16::from(c.code), c.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Next::Closed(code, reason);
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Next::Closed(1006, String::new()),
            }
        }
    }

    /// Sends `subscribe` and returns the `subscribed` event (after any `refresh`).
    pub async fn subscribe(
        &mut self,
        queue: &str,
        since: Option<(u64, &str)>,
    ) -> serde_json::Value {
        let mut f = serde_json::json!({"action": "subscribe", "queue": queue});
        if let Some((s, e)) = since {
            f["since"] = s.into();
            f["epoch"] = e.into();
        }
        self.send(f).await;
        loop {
            let v = self.recv().await;
            if v["event"] == "subscribed" {
                return v;
            }
            assert_eq!(v["event"], "refresh", "{v}");
        }
    }
}

/// What [`WsClient::next`] saw.
#[derive(Debug)]
pub enum Next {
    /// A JSON text frame.
    Json(serde_json::Value),
    /// The connection closed with this code and reason.
    Closed(u16, String),
}

/// Sends a request: status and JSON body.
pub async fn send(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    json(req.send().await.unwrap()).await
}

/// Requests a recording sink received: path, `webhook-id` and body.
pub type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A webhook target on a free loopback port that records every request and answers
/// `status`; its base URL and what it saw.
pub fn recording_sink(status: u16) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let rec = seen.clone();
    let url = spawn_http(move |req, body| {
        let rec = rec.clone();
        async move {
            let id = req
                .headers()
                .get("webhook-id")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = String::from_utf8_lossy(&body).into_owned();
            rec.lock().unwrap().push((req.path().to_owned(), id, body));
            actix_web::HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
                .finish()
        }
    });
    (url, seen)
}

/// Publishers under load: tasks posting `{label}p{n}-{i}` bodies to `url`, recording
/// every acknowledged publish as (offset, body, epoch).
pub struct Load {
    /// What was acknowledged.
    pub acked: Arc<Mutex<Vec<(u64, String, String)>>>,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `publishers` tasks on `url`. `persist`: a refusal or a lost connection is not
    /// acknowledged and the publisher goes on (a cluster losing a member); otherwise
    /// it stops at the first one.
    pub fn start(
        http: &reqwest::Client,
        url: &str,
        publishers: usize,
        label: &str,
        persist: bool,
    ) -> Self {
        let acked: Arc<Mutex<Vec<(u64, String, String)>>> = Arc::default();
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..publishers)
            .map(|p| {
                let (acked, count, stop, http) =
                    (acked.clone(), count.clone(), stop.clone(), http.clone());
                let (url, label) = (url.to_owned(), label.to_owned());
                tokio::spawn(async move {
                    for i in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let body = format!("{label}p{p}-{i}");
                        let res = http.post(&url).body(body.clone()).send().await;
                        let res = match res {
                            Ok(r) if r.status() == 200 => r,
                            _ if persist => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                            _ => break,
                        };
                        let v: serde_json::Value = res.json().await.unwrap();
                        acked.lock().unwrap().push((
                            v["offset"].as_u64().unwrap(),
                            body,
                            v["epoch"].as_str().unwrap().to_owned(),
                        ));
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Load {
            acked,
            count,
            stop,
            tasks,
        }
    }

    /// Acknowledgements so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits (at most a minute) until `n` publishes were acknowledged.
    pub async fn wait_for(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.count() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} acknowledged (of {n})",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the publishers; everything acknowledged.
    pub async fn stop(self) -> Vec<(u64, String, String)> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// Asserts that every acknowledged (offset, body) is in `stored`, and that no body is
/// stored twice.
pub fn assert_stored_once<'a>(
    stored: &BTreeMap<u64, String>,
    acked: impl IntoIterator<Item = (u64, &'a String)>,
) {
    for (off, body) in acked {
        assert_eq!(
            stored.get(&off),
            Some(body),
            "acknowledged message at offset {off} is there"
        );
    }
    let bodies: std::collections::HashSet<&String> = stored.values().collect();
    assert_eq!(bodies.len(), stored.len(), "no message stored twice");
}
