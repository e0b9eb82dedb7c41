//! `broker healthcheck`: asks a running broker whether it is alive (`/healthz`) or ready
//! (`/readyz`) and exits 0 or 1. Container images without a shell or curl (the project's
//! own is distroless) use it for their HEALTHCHECK.

use std::time::Duration;

use anyhow::{bail, Context};

/// Arguments of `broker healthcheck`.
#[derive(clap::Args)]
pub struct Args {
    /// Broker base URL.
    #[arg(long, env = "BROKER_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Ask `/readyz` (should it get traffic) instead of `/healthz` (is it alive).
    #[arg(long)]
    ready: bool,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Exits 0 when the broker answers 200, else fails with what it said.
pub fn run(args: Args) -> anyhow::Result<()> {
    super::runtime()?.block_on(check(args))
}

async fn check(args: Args) -> anyhow::Result<()> {
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let url = format!("{}{path}", args.url.trim_end_matches('/'));
    let res = reqwest::Client::builder()
        .timeout(args.timeout)
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("GET {url}: {status} {body}");
    }
    println!("{body}");
    Ok(())
}
