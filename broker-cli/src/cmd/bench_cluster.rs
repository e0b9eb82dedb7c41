//! `broker bench cluster`: the broker on NATS JetStream with 1 and with 3 replicas, in
//! the same run, on the same NATS cluster (three local `nats-server` processes on
//! loopback unless `--nats` names servers), every stream with 3 replicas.
//!
//! - publish: `--publishers` concurrent HTTP publishers, spread evenly over the
//!   replicas, send `--messages` messages of `--payload` bytes into one queue;
//!   aggregate msg/s, 3 replicas against 1;
//! - fan-out: `--subscribers` WebSocket subscribers, spread over the replicas, each get
//!   `--fanout-messages` messages published through the first replica; deliveries/s
//!   from the first publish to the last delivery, 3 replicas against 1;
//! - latency: sequential publishes through replica A, timed to the WebSocket event on
//!   replica B, against the same with the subscriber on A (the baseline: no hop between
//!   replicas); p50 and p99. Target (issue 16): p99 ≤ 10 ms.
//!
//! The replicas run in this process (an actix system each), like the load generator:
//! on a small machine the figures show what the CPU allows, not what the design does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::bench::{start_broker, throughput, Stats};

/// Arguments of `broker bench cluster`.
#[derive(clap::Args)]
pub struct ClusterArgs {
    /// NATS servers to use (comma-separated `nats://` URLs); default: three local
    /// `nats-server` processes on free loopback ports.
    #[arg(long)]
    nats: Option<String>,
    /// Messages of the publish phase, per replica count.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Concurrent publishers.
    #[arg(long, default_value_t = 64)]
    publishers: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// WebSocket subscribers of the fan-out phase.
    #[arg(long, default_value_t = 300)]
    subscribers: usize,
    /// Messages of the fan-out phase.
    #[arg(long, default_value_t = 200)]
    fanout_messages: usize,
    /// Publishes of the latency phase (each way).
    #[arg(long, default_value_t = 1000)]
    latency_messages: usize,
    /// Exit 1 if the latency target (p99 ≤ 10 ms) is missed.
    #[arg(long)]
    check: bool,
}

/// The cross-replica latency target of issue 16.
const TARGET_P99: Duration = Duration::from_millis(10);

fn config(nats: &str, prefix: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[storage]
url = "{nats}"
[storage.nats]
prefix = "{prefix}"
[limits]
max_message_count = 100000
max_queue_size = 1000000000
[ws]
allow_anonymous = true
anonymous_queues = ["fan", "lat"]
max_connections_per_user = 100000
[[queues]]
name = "bench"
[[queues]]
name = "fan"
[[queues]]
name = "lat"
"#
    )
}

/// Runs the benchmark and prints its report.
pub fn cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let rt = super::runtime()?;
    let local = match &args.nats {
        Some(_) => None,
        None => Some(
            rt.block_on(broker_core::store::nats_testing::NatsCluster::start(3))
                .context(
                    "nats-server is not installed: install it (Debian: nats-server) or pass --nats",
                )?,
        ),
    };
    let nats = args
        .nats
        .clone()
        .or_else(|| local.as_ref().map(|c| c.urls()))
        .expect("one of the two");
    let run = broker_core::random::id();
    let mut phases = Vec::new();
    for replicas in [1usize, 3] {
        // A prefix per phase: the phases share no stream.
        let prefix = format!("bench{replicas}-{run}");
        let bases = (0..replicas)
            .map(|_| start_broker(&config(&nats, &prefix)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let publish = rt.block_on(throughput(
            &bases,
            args.messages,
            args.publishers,
            args.payload,
        ))?;
        let fanout = rt.block_on(fan_out(&bases, &args))?;
        let latency = if replicas > 1 {
            Some((
                rt.block_on(latency(&bases[0], &bases[0], &args))?,
                rt.block_on(latency(&bases[0], &bases[1], &args))?,
            ))
        } else {
            None
        };
        phases.push((replicas, publish, fanout, latency));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "broker bench cluster: NATS JetStream, 3 servers, streams with 3 replicas; {} messages of {} bytes, {} publishers; {} subscribers x {} messages",
        args.messages, args.payload, args.publishers, args.subscribers, args.fanout_messages
    );
    for (replicas, publish, fanout, _) in &phases {
        println!(
            "  {replicas} replica(s)   publish {publish:>9.0} msg/s   fan-out {fanout:>10.0} deliveries/s"
        );
    }
    let (one, three) = (&phases[0], &phases[1]);
    println!(
        "  ratio 3/1              publish {:>9.3}         fan-out {:>10.3}",
        three.1 / one.1,
        three.2 / one.2
    );
    let (same, across) = three.3.as_ref().expect("measured with 3 replicas");
    println!(
        "  baseline   publish on A -> WebSocket event on A   p50 {:>7.2} ms   p99 {:>7.2} ms",
        ms(same.p50),
        ms(same.p99)
    );
    println!(
        "  measured   publish on A -> WebSocket event on B   p50 {:>7.2} ms   p99 {:>7.2} ms",
        ms(across.p50),
        ms(across.p99)
    );
    let met = across.p99 <= TARGET_P99;
    println!(
        "  target: p99 across replicas <= 10 ms               {}",
        if met { "met" } else { "MISSED" }
    );
    drop(local);
    if args.check && !met {
        bail!("target missed: p99 {:?} > {TARGET_P99:?}", across.p99);
    }
    Ok(())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An anonymous WebSocket session on `base`, subscribed to `queue`.
async fn subscriber(base: &str, queue: &str) -> anyhow::Result<Ws> {
    let url = format!("{}/v1/ws", base.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::text(format!(
        r#"{{"action":"subscribe","queue":"{queue}"}}"#
    )))
    .await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"subscribed\"") => return Ok(ws),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the WebSocket closed before subscribing"),
        }
    }
}

/// Deliveries per second to subscribers spread over `bases`.
async fn fan_out(bases: &[String], args: &ClusterArgs) -> anyhow::Result<f64> {
    let mut subs = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        subs.push(subscriber(&bases[i % bases.len()], "fan").await?);
    }
    let delivered = Arc::new(AtomicUsize::new(0));
    let want = args.fanout_messages;
    let mut readers = Vec::new();
    for mut ws in subs {
        let delivered = delivered.clone();
        readers.push(tokio::spawn(async move {
            let mut n = 0;
            while n < want {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.contains("\"message\"") => {
                        n += 1;
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            n
        }));
    }
    let http = reqwest::Client::new();
    let url = format!("{}/v1/queues/fan/messages", bases[0]);
    let body = format!("\"{}\"", "x".repeat(args.payload.saturating_sub(2)));
    let started = Instant::now();
    let publishers = 8;
    let per = want.div_ceil(publishers);
    let mut sent = 0;
    let mut batch = Vec::new();
    for p in 0..publishers {
        let n = per.min(want - sent);
        sent += n;
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        batch.push(tokio::spawn(async move {
            for _ in 0..n {
                http.post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?
                    .error_for_status()?;
            }
            let _ = p;
            anyhow::Ok(())
        }));
    }
    for b in batch {
        b.await??;
    }
    for r in readers {
        let got = tokio::time::timeout(Duration::from_secs(120), r)
            .await
            .context("subscribers still waiting after 2 minutes")??;
        anyhow::ensure!(got == want, "a subscriber got {got} of {want} messages");
    }
    Ok(delivered.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Publish on `publish_on` → WebSocket event on `subscribe_on`, sequentially.
async fn latency(
    publish_on: &str,
    subscribe_on: &str,
    args: &ClusterArgs,
) -> anyhow::Result<Stats> {
    let mut ws = subscriber(subscribe_on, "lat").await?;
    let http = reqwest::Client::new();
    let url = format!("{publish_on}/v1/queues/lat/messages");
    let body = format!("\"{}\"", "x".repeat(args.payload.saturating_sub(2)));
    let warmup = 50;
    let mut times = Vec::with_capacity(args.latency_messages);
    for round in 0..warmup + args.latency_messages {
        let t0 = Instant::now();
        let (res, event) = tokio::join!(
            http.post(&url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send(),
            async {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.contains("\"message\"") => {
                            return Ok(t0.elapsed())
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(anyhow::Error::from(e)),
                        None => bail!("the WebSocket closed"),
                    }
                }
            }
        );
        res?.error_for_status()?;
        let took = event?;
        if round >= warmup {
            times.push(took);
        }
    }
    Ok(Stats::of(times))
}
