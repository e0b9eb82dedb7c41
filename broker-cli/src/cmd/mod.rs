//! The subcommands.

pub mod bench;
pub mod bench_cluster;
pub mod healthcheck;
pub mod kube;
pub mod publish;
pub mod serve;
pub mod ws;

use std::io::{BufRead, IsTerminal, Read};
use std::path::Path;

use anyhow::{bail, Context};
use broker_core::settings::Settings;

/// The single-threaded runtime the client subcommands (publish, ws, healthcheck, bench)
/// drive their requests on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The DATA argument, or standard input for `-` or none.
pub fn read_data(data: Option<&str>) -> anyhow::Result<Vec<u8>> {
    match data {
        None | Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading standard input")?;
            Ok(buf)
        }
        Some(d) => Ok(d.as_bytes().to_vec()),
    }
}

/// Prints a success body; turns an error body into the command's error.
pub async fn print_response(res: reqwest::Response) -> anyhow::Result<()> {
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    if status.is_success() {
        println!("{text}");
        return Ok(());
    }
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or(text);
    bail!("{status}: {message}")
}

/// `broker hash-password`: prompts twice on a terminal (no echo), or reads one line.
pub fn hash_password(from_stdin: bool) -> anyhow::Result<()> {
    let password = if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Again: ")?;
        if first != again {
            bail!("the passwords differ");
        }
        first
    };
    if password.chars().count() < broker_core::broker::MIN_PASSWORD_LEN {
        bail!(
            "a password needs at least {} characters",
            broker_core::broker::MIN_PASSWORD_LEN
        );
    }
    println!("{}", broker_core::auth::hash_password(&password));
    Ok(())
}

/// `broker config check FILE`
pub fn config_check(file: &Path) -> anyhow::Result<()> {
    let s = Settings::load(Some(file)).with_context(|| format!("{}", file.display()))?;
    let shape = if s.source.legacy {
        " (webhook-queue format)"
    } else {
        ""
    };
    println!(
        "{}: ok{shape}: listen {}, {} queue(s), {} user(s)",
        file.display(),
        s.listen,
        s.config.queues.len(),
        s.users.len()
    );
    for user in s.weak_password_users() {
        println!("warning: user `{user}` has a plain or SHA password hash; prefer argon2id");
    }
    Ok(())
}
