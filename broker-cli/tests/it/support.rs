//! Helpers that drive the real `broker` binary.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hmac::{KeyInit, Mac};

/// The binary under test.
pub fn broker_bin() -> &'static str {
    env!("CARGO_BIN_EXE_broker")
}

/// A `broker serve` child process on a free loopback port.
pub struct BrokerProcess {
    pub child: Child,
    pub url: String,
    pub http: reqwest::Client,
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
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut child = Command::new(broker_bin())
        .args(["serve", "--config"])
        .arg(config)
        .env("BROKER__SERVER__LISTEN", "127.0.0.1:0")
        .env("BROKER_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn broker");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    BrokerProcess {
        child,
        url,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    }
}

impl BrokerProcess {
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.url))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.url))
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
