//! The subcommands.

pub mod publish;
pub mod serve;

use std::io::{BufRead, IsTerminal};
use std::path::Path;

use anyhow::{bail, Context};
use broker_core::settings::Settings;

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
