//! `broker serve`: load the config, start the actors, serve HTTP, handle signals.
//!
//! Prints exactly one line to stdout once listening: `listening on http://ADDR`
//! (scripts and tests wait for it; with `listen = "127.0.0.1:0"` it carries the port).
//! SIGHUP reloads the config; SIGTERM and SIGINT stop accepting, let in-flight requests
//! finish (long-polls return at once) within `server.shutdown_timeout`, and exit 0.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use broker_core::settings::Settings;
use broker_core::Broker;
use tokio::signal::unix::{signal, SignalKind};

/// Runs the broker until a terminating signal.
pub fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = Settings::load(config.as_deref()).context("loading the configuration")?;
    actix_web::rt::System::new().block_on(serve(settings))
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let listen = settings.listen;
    let source = settings
        .source
        .path
        .as_ref()
        .map_or("built-in example".to_owned(), |p| p.display().to_string());
    let broker = Broker::start(settings).await?;
    let listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let server = broker_http::server(broker.clone(), listener)?;
    let handle = server.handle();
    tracing::info!(%addr, config = %source, "broker listening");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let signals = async move {
        let sig = loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    // Errors are logged by reload; the old configuration stays.
                    let _ = broker.reload().await;
                }
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
            }
        };
        tracing::info!(signal = sig, "shutting down gracefully");
        broker.begin_shutdown();
        handle.stop(true).await;
    };
    actix_web::rt::spawn(signals);
    server.await?;
    tracing::info!("stopped");
    Ok(())
}
