//! NATS servers on loopback: Debian's `nats-server` started on free loopback ports with
//! JetStream and a data directory of its own, alone or as a 3-node cluster; killed when
//! dropped. Used by the tests and by `broker bench cluster` (never by `broker serve`).
//!
//! Without `nats-server` on the `PATH` the test is skipped, saying why; with `CI` set it
//! fails instead (`.ci/run` installs the package).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `nats-server` process.
pub struct NatsNode {
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    /// Its name in the cluster.
    pub name: String,
    child: Option<Child>,
    args: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

/// A cluster of servers (or one).
pub struct NatsCluster {
    /// The servers.
    pub nodes: Vec<NatsNode>,
    /// The data directories, kept across restarts of a node.
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The `nats-server` binary, if installed.
pub fn nats_server() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-server must be installed in CI (.ci/run installs it)"
        );
        eprintln!("nats-server is not installed; skipped");
    }
    found
}

impl NatsCluster {
    /// `n` servers (1, or 3 for a cluster) on free loopback ports, JetStream ready
    /// (a meta leader elected). `None` when `nats-server` is not installed.
    pub async fn start(n: usize) -> Option<Self> {
        let bin = nats_server()?;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let clients: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("n{i}");
            let data = dir.path().join(&name);
            let mut args = vec![
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                clients[i].to_string(),
                "-js".into(),
                "-sd".into(),
                data.display().to_string(),
                "-n".into(),
                name.clone(),
            ];
            if n > 1 {
                let others: Vec<String> = (0..n)
                    .filter(|j| *j != i)
                    .map(|j| format!("nats://127.0.0.1:{}", routes[j]))
                    .collect();
                args.extend([
                    "--cluster_name".into(),
                    "broker-test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", routes[i]),
                    "--routes".into(),
                    others.join(","),
                ]);
            }
            let mut node = NatsNode {
                url: format!("nats://127.0.0.1:{}", clients[i]),
                name,
                child: None,
                args,
                _dir: None,
            };
            node.spawn(&bin);
            nodes.push(node);
        }
        let cluster = NatsCluster { nodes, _dir: dir };
        cluster.wait_ready().await;
        Some(cluster)
    }

    /// Every server's URL, comma-separated (a broker's `storage.url`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until JetStream answers through every server.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &self.nodes {
            loop {
                assert!(
                    Instant::now() < deadline,
                    "JetStream on {} did not become ready",
                    node.url
                );
                if let Ok(c) = async_nats::connect(&node.url).await {
                    let js = async_nats::jetstream::new(c);
                    // JetStream answers "not found" once a meta leader is elected
                    // (2.9's account info does not parse with this client).
                    use async_nats::jetstream::context::GetStreamErrorKind as K;
                    if let Err(e) = js.get_stream("ready-probe").await {
                        if matches!(e.kind(), K::JetStream(j)
                            if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND)
                        {
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl NatsNode {
    fn spawn(&mut self, bin: &std::path::Path) {
        let child = Command::new(bin)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
    }

    /// Kills the server at once (`kill -9`).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        let bin = nats_server().expect("nats-server was found before");
        self.spawn(&bin);
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill();
    }
}
