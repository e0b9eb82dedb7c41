//! `broker publish QUEUE [DATA|-]`: one message over HTTP, signed the way the queue wants.

use anyhow::{bail, Context};
use broker_core::auth::{sign_hex, HmacAlgo};

/// Arguments of `broker publish`.
#[derive(clap::Args)]
pub struct Args {
    /// Queue name.
    queue: String,
    /// The message; `-` or nothing reads standard input.
    data: Option<String>,
    /// Broker base URL.
    #[arg(long, env = "BROKER_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Shared secret for `bearer` queues (sent as `Authorization: Bearer …`).
    #[arg(long, env = "BROKER_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Key for `hmac-*` queues: the body's hex HMAC goes into --hmac-header.
    #[arg(long, env = "BROKER_HMAC_KEY", hide_env_values = true)]
    hmac_key: Option<String>,
    /// Header carrying the HMAC (the queue's `header_name`).
    #[arg(long, default_value = "X-Signature")]
    hmac_header: String,
    /// HMAC hash.
    #[arg(long, value_enum, default_value = "sha256")]
    hmac_algo: Algo,
    /// Content type; default: application/json when DATA is valid JSON, else text/plain.
    #[arg(long)]
    content_type: Option<String>,
    /// Extra header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Algo {
    Sha256,
    Sha512,
}

/// Publishes and prints the broker's JSON answer; fails with its error message.
pub fn run(args: Args) -> anyhow::Result<()> {
    super::runtime()?.block_on(publish(args))
}

async fn publish(args: Args) -> anyhow::Result<()> {
    let body = super::read_data(args.data.as_deref())?;
    let content_type = args.content_type.clone().unwrap_or_else(|| {
        if serde_json::from_slice::<serde_json::Value>(&body).is_ok() {
            "application/json".into()
        } else {
            "text/plain; charset=utf-8".into()
        }
    });
    let url = format!(
        "{}/v1/queues/{}/messages",
        args.url.trim_end_matches('/'),
        args.queue
    );
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let mut req = client
        .post(&url)
        .header("content-type", content_type)
        .body(body.clone());
    if let Some(s) = &args.secret {
        req = req.header("authorization", format!("Bearer {s}"));
    }
    if let Some(k) = &args.hmac_key {
        let algo = match args.hmac_algo {
            Algo::Sha256 => HmacAlgo::Sha256,
            Algo::Sha512 => HmacAlgo::Sha512,
        };
        req = req.header(&args.hmac_header, sign_hex(algo, k.as_bytes(), &body));
    }
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            bail!("--header must look like `Name: value`, got `{h}`");
        };
        req = req.header(name.trim(), value.trim());
    }
    let res = req.send().await.with_context(|| format!("POST {url}"))?;
    super::print_response(res).await
}
