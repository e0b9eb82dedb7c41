//! Benchmarks that report against a baseline measured in the same run.
//!
//! `broker bench publish`: durable publish throughput. 64 concurrent publishers send
//! 256-byte messages over HTTP to a broker on `memory://` (the baseline) and then to one
//! on SQLite (WAL, `synchronous=FULL`, group commit); the ratio is the result. Target
//! (issue 5): SQLite ≥ 0.5 × memory.
//!
//! `broker bench latency`: what WebSocket delivery adds to a publish, measured against a
//! baseline taken in the same run.
//!
//! A broker runs in this process on a loopback port (its own actix system and workers),
//! for `latency` on `memory://`, so the figures are the broker's own, not the disk's.
//! Baseline: sequential HTTP publishes into a queue nobody subscribes to, timed from
//! sending the request to receiving the response. Measured: the same publishes into a
//! queue with one WebSocket subscriber, timed from sending the request to receiving the
//! `message` event. The difference of the medians is the latency WebSocket delivery
//! adds; the ratio of the medians is reported too. Target (issue 3): added p50 < 1 ms.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use broker_core::config::parse;
use broker_core::settings::Settings;
use broker_core::Broker;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// Arguments of `broker bench latency`.
#[derive(clap::Args)]
pub struct LatencyArgs {
    /// Measured publishes per phase.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Unmeasured publishes first.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Exit 1 if the target (added p50 < 1 ms) is missed.
    #[arg(long)]
    check: bool,
}

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[storage]
url = "memory://"
[limits]
max_message_count = 10000
max_queue_size = 100000000
[ws]
allow_anonymous = true
anonymous_queues = ["measured"]
[[queues]]
name = "baseline"
[[queues]]
name = "measured"
"#;

/// The added-latency target of issue 3.
const TARGET_ADDED_P50: Duration = Duration::from_millis(1);

/// Runs the benchmark and prints its report.
pub fn latency(args: LatencyArgs) -> anyhow::Result<()> {
    let url = start_broker(CONFIG)?;
    let report = super::runtime()?.block_on(measure(&url, &args))?;
    println!("{report}");
    if args.check && !report.meets_target() {
        bail!(
            "target missed: added p50 {:?} >= {:?}",
            report.added_p50(),
            TARGET_ADDED_P50
        );
    }
    Ok(())
}

/// Arguments of `broker bench publish`.
#[derive(clap::Args)]
pub struct PublishArgs {
    /// Messages per backend.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 64)]
    publishers: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Exit 1 if the target (SQLite ≥ 0.5 × memory) is missed.
    #[arg(long)]
    check: bool,
}

/// The durable-throughput target of issue 5.
const TARGET_RATIO: f64 = 0.5;

/// Runs `broker bench publish` and prints its report.
pub fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sqlite = format!("sqlite://{}/bench.db", dir.path().display());
    let rt = super::runtime()?;
    let mut rates = Vec::new();
    let mut store_stats = String::new();
    for url in ["memory://", sqlite.as_str()] {
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"{url}\"\n[limits]\nmax_message_count = 10000\n[[queues]]\nname = \"bench\"\n"
        );
        let base = start_broker(&config)?;
        let bases = [base];
        let rate = rt.block_on(throughput(
            &bases,
            args.messages,
            args.publishers,
            args.payload,
        ))?;
        rates.push(rate);
        store_stats = rt.block_on(store_summary(&bases[0]))?;
    }
    let ratio = rates[1] / rates[0];
    println!(
        "broker bench publish: {} messages of {} bytes per backend, {} concurrent publishers, HTTP on loopback",
        args.messages, args.payload, args.publishers
    );
    println!(
        "  baseline   memory://                     {:>10.0} msg/s",
        rates[0]
    );
    println!(
        "  measured   sqlite (WAL, synchronous=FULL) {:>9.0} msg/s",
        rates[1]
    );
    println!("  ratio sqlite/memory                      {:>10.3}", ratio);
    println!("  sqlite group commit                      {store_stats}");
    println!(
        "  target: ratio >= {TARGET_RATIO}                     {}",
        if ratio >= TARGET_RATIO {
            "met"
        } else {
            "MISSED"
        }
    );
    if args.check && ratio < TARGET_RATIO {
        bail!("target missed: {ratio:.3} < {TARGET_RATIO}");
    }
    Ok(())
}

/// Aggregate publish rate of `publishers` concurrent HTTP publishers spread evenly over
/// the brokers at `bases`, `messages` of `payload` bytes in all, into queue `bench`.
pub(crate) async fn throughput(
    bases: &[String],
    messages: usize,
    publishers: usize,
    payload: usize,
) -> anyhow::Result<f64> {
    let http = reqwest::Client::new();
    let body = bytes::Bytes::from(vec![b'x'; payload]);
    let per = messages.div_ceil(publishers.max(1));
    let run = |i: usize, n: usize| {
        let url = format!("{}/v1/queues/bench/messages", bases[i % bases.len()]);
        let (http, body) = (http.clone(), body.clone());
        async move {
            for _ in 0..n {
                let res = http.post(&url).body(body.clone()).send().await?;
                anyhow::ensure!(
                    res.status().is_success(),
                    "publish failed: {}",
                    res.status()
                );
            }
            anyhow::Ok(())
        }
    };
    // Warm up connections and the store.
    futures_util::future::try_join_all((0..publishers).map(|i| run(i, 2))).await?;
    let started = Instant::now();
    futures_util::future::try_join_all((0..publishers).map(|i| run(i, per))).await?;
    Ok((per * publishers) as f64 / started.elapsed().as_secs_f64())
}

/// Mean batch size and commit time from the broker's own metrics.
async fn store_summary(base: &str) -> anyhow::Result<String> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?;
    let sample = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let commits = sample("broker_store_commit_duration_seconds_count").max(1.0);
    Ok(format!(
        "{:.0} commits, {:.1} ops each, {:.2} ms each (means)",
        commits,
        sample("broker_store_batch_size_sum") / commits,
        sample("broker_store_commit_duration_seconds_sum") / commits * 1000.0
    ))
}

pub(crate) fn start_broker(config: &str) -> anyhow::Result<String> {
    let (cfg, source) = parse(None, config, Vec::<(String, String)>::new())?;
    let settings = Settings::compile(cfg, source)?;
    let listener = std::net::TcpListener::bind(settings.listen)?;
    let url = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let started = Broker::start(settings)
                .await
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(broker_http::server(b, listener)?));
            match started {
                Ok(server) => {
                    let _ = tx.send(Ok(()));
                    let _ = server.await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
    });
    rx.recv().context("broker thread ended")??;
    Ok(url)
}

async fn measure(url: &str, args: &LatencyArgs) -> anyhow::Result<Report> {
    let http = reqwest::Client::new();
    let body = bytes::Bytes::from(format!(
        "\"{}\"",
        "x".repeat(args.payload.saturating_sub(2))
    ));
    let publish = |queue: &'static str| {
        http.post(format!("{url}/v1/queues/{queue}/messages"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    };
    let ws_url = format!("{}/v1/ws", url.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await?;
    ws.send(Message::text(
        r#"{"action":"subscribe","queue":"measured"}"#,
    ))
    .await?;
    loop {
        let Some(frame) = ws.next().await else {
            bail!("the WebSocket closed before subscribing");
        };
        if let Message::Text(t) = frame? {
            if t.contains("\"subscribed\"") {
                break;
            }
        }
    }

    let mut baseline = Vec::with_capacity(args.messages);
    let mut delivered = Vec::with_capacity(args.messages);
    for round in 0..args.warmup + args.messages {
        let t0 = Instant::now();
        let res = publish("baseline").await?;
        let rtt = t0.elapsed();
        anyhow::ensure!(
            res.status().is_success(),
            "baseline publish: {}",
            res.status()
        );

        let t0 = Instant::now();
        let (res, frame) = tokio::join!(publish("measured"), async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.contains("\"message\"") => {
                        return Ok(t0.elapsed())
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(anyhow::Error::from(e)),
                    None => bail!("the WebSocket closed"),
                }
            }
        });
        anyhow::ensure!(res?.status().is_success(), "measured publish failed");
        let to_ws = frame?;
        if round >= args.warmup {
            baseline.push(rtt);
            delivered.push(to_ws);
        }
    }
    Ok(Report {
        baseline: Stats::of(baseline),
        delivered: Stats::of(delivered),
        messages: args.messages,
        payload: args.payload,
    })
}

pub(crate) struct Stats {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

impl Stats {
    pub(crate) fn of(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
        Stats {
            p50: at(0.50),
            p99: at(0.99),
        }
    }
}

struct Report {
    baseline: Stats,
    delivered: Stats,
    messages: usize,
    payload: usize,
}

impl Report {
    fn added_p50(&self) -> Duration {
        self.delivered.p50.saturating_sub(self.baseline.p50)
    }

    fn meets_target(&self) -> bool {
        self.added_p50() < TARGET_ADDED_P50
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(
            f,
            "broker bench latency: {} publishes of {} bytes per phase, loopback",
            self.messages, self.payload
        )?;
        writeln!(
            f,
            "  baseline   HTTP publish round trip      p50 {:>8.1} µs   p99 {:>8.1} µs",
            us(self.baseline.p50),
            us(self.baseline.p99)
        )?;
        writeln!(
            f,
            "  measured   publish -> WebSocket event   p50 {:>8.1} µs   p99 {:>8.1} µs",
            us(self.delivered.p50),
            us(self.delivered.p99)
        )?;
        writeln!(
            f,
            "  added by WebSocket delivery (p50)        {:>8.1} µs",
            us(self.added_p50())
        )?;
        writeln!(
            f,
            "  ratio measured/baseline (p50)            {:>8.3}",
            self.delivered.p50.as_secs_f64() / self.baseline.p50.as_secs_f64()
        )?;
        write!(
            f,
            "  target: added p50 < 1 ms                 {}",
            if self.meets_target() { "met" } else { "MISSED" }
        )
    }
}
