//! `broker bench latency`: what WebSocket delivery adds to a publish, measured against a
//! baseline taken in the same run.
//!
//! A broker runs in this process on a loopback port (its own actix system and workers).
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
    let url = start_broker()?;
    let report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(measure(&url, &args))?;
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

fn start_broker() -> anyhow::Result<String> {
    let (cfg, source) = parse(None, CONFIG, Vec::<(String, String)>::new())?;
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

struct Stats {
    p50: Duration,
    p99: Duration,
}

impl Stats {
    fn of(mut v: Vec<Duration>) -> Self {
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
