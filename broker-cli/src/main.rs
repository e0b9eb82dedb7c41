//! `broker`: the command line of the broker. Business logic lives in broker-core and
//! broker-http; this crate parses arguments, sets up logging and the crypto provider,
//! serves (signals, the active lock on PostgreSQL) and runs the client subcommands.

mod cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// An actor-based event broker: HTTP in; WebSocket and HTTP polling out.
#[derive(Parser)]
#[command(name = "broker", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax, e.g. `info,broker_core=debug`).
    #[arg(long, global = true, env = "BROKER_LOG", default_value = "info")]
    log: String,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "BROKER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker. Without --config it runs the built-in example (`broker config example`).
    Serve {
        /// Config file: TOML, YAML or JSON (webhook-queue's options.conf works unchanged).
        #[arg(long, short, env = "BROKER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Publish one message to a queue over HTTP.
    Publish(cmd::publish::Args),
    /// Subscribe over WebSocket and print each message as a JSON line.
    Subscribe(cmd::ws::SubscribeArgs),
    /// Print a signed session token (JWT) for WebSocket clients.
    Token(cmd::ws::TokenArgs),
    /// Push JSON to every connection of a user, or to one connection.
    Notify(cmd::ws::NotifyArgs),
    /// Read a password from the terminal (or stdin) and print its argon2id hash for `pass_hash`.
    HashPassword {
        /// Read the password from standard input instead of prompting.
        #[arg(long)]
        stdin: bool,
    },
    /// Exit 0 if a running broker answers /healthz (or /readyz with --ready), else 1.
    Healthcheck(cmd::healthcheck::Args),
    /// Benchmarks that measure against a baseline taken in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print the commented example config, or check a config file.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Latency WebSocket delivery adds to a publish (in-process broker on loopback).
    Latency(cmd::bench::LatencyArgs),
    /// Durable publish throughput: SQLite against memory (in-process brokers on loopback).
    Publish(cmd::bench::PublishArgs),
    /// NATS JetStream with 1 and with 3 replicas: aggregate publish and fan-out
    /// throughput, and the publish -> WebSocket latency across replicas.
    Cluster(cmd::bench_cluster::ClusterArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the commented example configuration.
    Example,
    /// Validate a config file (with BROKER__* overrides applied); exit 1 naming each bad key.
    Check {
        /// The file.
        file: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    // One TLS crypto provider for the whole process (reqwest, later sqlx and JWT).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let result = match cli.command {
        Command::Serve { config } => cmd::serve::run(config),
        Command::Publish(args) => cmd::publish::run(args),
        Command::Subscribe(args) => cmd::ws::subscribe(args),
        Command::Token(args) => cmd::ws::mint_token(args),
        Command::Notify(args) => cmd::ws::notify(args),
        Command::Healthcheck(args) => cmd::healthcheck::run(args),
        Command::HashPassword { stdin } => cmd::hash_password(stdin),
        Command::Bench(BenchCommand::Latency(args)) => cmd::bench::latency(args),
        Command::Bench(BenchCommand::Publish(args)) => cmd::bench::publish(args),
        Command::Bench(BenchCommand::Cluster(args)) => cmd::bench_cluster::cluster(args),
        Command::Config(ConfigCommand::Example) => {
            print!("{}", broker_core::config::EXAMPLE);
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => cmd::config_check(&file),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
