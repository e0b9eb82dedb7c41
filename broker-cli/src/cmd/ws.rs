//! `broker subscribe`, `broker token`, `broker notify`: the WebSocket side from a shell.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use broker_core::auth::token::{self, Claims};
use broker_core::config::Secret;
use broker_core::settings::Settings;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue, Message};

/// Arguments of `broker subscribe`.
#[derive(clap::Args)]
pub struct SubscribeArgs {
    /// Queues to subscribe to.
    #[arg(required = true)]
    queues: Vec<String>,
    /// Resume after this offset (with --epoch, replays what was missed).
    #[arg(long)]
    since: Option<u64>,
    /// The epoch `--since` belongs to.
    #[arg(long, requires = "since")]
    epoch: Option<String>,
    /// Session token (JWT), e.g. from `broker token`.
    #[arg(
        long,
        env = "BROKER_TOKEN",
        hide_env_values = true,
        conflicts_with = "user"
    )]
    token: Option<String>,
    /// Log in as this configured user (password from BROKER_PASSWORD or a prompt).
    #[arg(long)]
    user: Option<String>,
    /// Broker base URL (http:// or ws://).
    #[arg(long, env = "BROKER_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
}

/// Subscribes and prints each `message` event as one JSON line on stdout; other events
/// (subscribed, refresh, errors) go to stderr.
pub fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    super::runtime()?.block_on(run_subscribe(args))
}

async fn run_subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let url = ws_url(&args.url)?;
    let mut request = url.as_str().into_client_request()?;
    let auth = if let Some(t) = &args.token {
        Some(format!("Bearer {t}"))
    } else if let Some(u) = &args.user {
        let pw = match std::env::var("BROKER_PASSWORD") {
            Ok(p) => p,
            Err(_) => rpassword::prompt_password(format!("Password for {u}: "))?,
        };
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{pw}"));
        Some(format!("Basic {creds}"))
    } else {
        None
    };
    if let Some(a) = auth {
        request
            .headers_mut()
            .insert("authorization", HeaderValue::from_str(&a)?);
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    for (i, q) in args.queues.iter().enumerate() {
        let mut frame = serde_json::json!({"action": "subscribe", "queue": q, "id": i});
        if let Some(s) = args.since {
            frame["since"] = s.into();
        }
        if let Some(e) = &args.epoch {
            frame["epoch"] = e.clone().into();
        }
        ws.send(Message::text(frame.to_string())).await?;
    }
    let mut seen = 0u64;
    while let Some(frame) = ws.next().await {
        match frame? {
            Message::Text(text) => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if v["event"] == "message" {
                    println!("{text}");
                    seen += 1;
                    if args.count.is_some_and(|c| seen >= c) {
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                } else {
                    eprintln!("{text}");
                    if v["event"] == "error" && v["id"].is_number() {
                        bail!("subscribe failed: {}", v["message"]);
                    }
                }
            }
            Message::Close(reason) => {
                let why = reason
                    .map(|r| format!("{} {}", u16::from(r.code), r.reason))
                    .unwrap_or_default();
                bail!("the broker closed the connection {why}");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Arguments of `broker token`.
#[derive(clap::Args)]
pub struct TokenArgs {
    /// The user (`sub`).
    #[arg(long)]
    user: String,
    /// Queues (or patterns) to subscribe to, comma-separated; default: the user's config grants.
    #[arg(long, value_delimiter = ',')]
    queues: Option<Vec<String>>,
    /// Queues (or patterns) to publish into, comma-separated.
    #[arg(long, value_delimiter = ',')]
    publish: Option<Vec<String>>,
    /// Lifetime, e.g. 15m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    ttl: humantime::Duration,
    /// Signing secret (else the first `ws.jwt_secrets` of --config).
    #[arg(long, env = "BROKER_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Config file to take the signing secret from.
    #[arg(long, short, env = "BROKER_CONFIG")]
    config: Option<PathBuf>,
}

/// Prints a signed session token.
pub fn mint_token(args: TokenArgs) -> anyhow::Result<()> {
    let secret = match (args.secret, &args.config) {
        (Some(s), _) => Secret::new(s),
        (None, Some(path)) => Settings::load(Some(path))?
            .ws
            .jwt_secrets
            .first()
            .cloned()
            .context("the config has no ws.jwt_secrets")?,
        (None, None) => bail!("give --secret (or BROKER_JWT_SECRET) or --config"),
    };
    let now = chrono::Utc::now().timestamp();
    let ttl = Duration::from(args.ttl).as_secs() as i64;
    let claims = Claims {
        sub: args.user,
        exp: now + ttl,
        iat: Some(now),
        queues: args.queues,
        publish: args.publish,
    };
    println!("{}", token::mint(&claims, &secret));
    Ok(())
}

/// Arguments of `broker notify`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["user", "connection"])))]
pub struct NotifyArgs {
    /// Notify every connection of this user.
    #[arg(long)]
    user: Option<String>,
    /// Notify this connection.
    #[arg(long)]
    connection: Option<String>,
    /// JSON data; `-` or nothing reads standard input.
    data: Option<String>,
    /// Admin token or a `ws.notify_secrets` entry.
    #[arg(long, env = "BROKER_TOKEN", hide_env_values = true)]
    token: String,
    /// Broker base URL.
    #[arg(long, env = "BROKER_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
}

/// Sends a notification; prints `{"delivered":n}`.
pub fn notify(args: NotifyArgs) -> anyhow::Result<()> {
    let path = match (&args.user, &args.connection) {
        (Some(u), _) => format!("/v1/users/{u}/notify"),
        (None, Some(c)) => format!("/v1/connections/{c}/notify"),
        (None, None) => unreachable!("clap requires one"),
    };
    let body = super::read_data(args.data.as_deref())?;
    let url = format!("{}{path}", args.url.trim_end_matches('/'));
    super::runtime()?.block_on(async {
        let res = reqwest::Client::new()
            .post(&url)
            .bearer_auth(&args.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        super::print_response(res).await
    })
}

fn ws_url(base: &str) -> anyhow::Result<String> {
    let base = base.trim_end_matches('/');
    let rest = if let Some(r) = base.strip_prefix("http://") {
        format!("ws://{r}")
    } else if let Some(r) = base.strip_prefix("https://") {
        format!("wss://{r}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_owned()
    } else {
        bail!("--url must start with http://, https://, ws:// or wss://");
    };
    Ok(if rest.ends_with("/v1/ws") {
        rest
    } else {
        format!("{rest}/v1/ws")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn ws_urls() {
        assert_eq!(super::ws_url("http://h:1").unwrap(), "ws://h:1/v1/ws");
        assert_eq!(super::ws_url("https://h/").unwrap(), "wss://h/v1/ws");
        assert_eq!(super::ws_url("ws://h/v1/ws").unwrap(), "ws://h/v1/ws");
        assert!(super::ws_url("h:1").is_err());
    }
}
