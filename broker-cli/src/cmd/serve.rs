//! `broker serve`: load the config, start the actors, serve HTTP, handle signals.
//!
//! Prints exactly one line to stdout once it serves: `listening on http://ADDR`
//! (scripts and tests wait for it; with `listen = "127.0.0.1:0"` it carries the port).
//! SIGHUP reloads the config; SIGTERM and SIGINT stop accepting, let in-flight requests
//! finish (long-polls return at once) within `server.shutdown_timeout`, wait (up to that
//! time again) for messages being dead-lettered, and exit 0.
//!
//! On PostgreSQL a broker first takes the database's active lock
//! (`broker_core::store::ActiveLock`). While another broker holds it, this one is a
//! standby: it prints `standby on http://ADDR` first, answers health and metrics on its
//! address and 503 `standby` to everything else, and becomes active (reading its config
//! file again) when the lock frees. A database that cannot be reached at start is waited
//! for the same way (retried with backoff, each failure logged). If an active broker loses the lock it stops at once
//! and exits 1: another broker may be active by then.

use std::cell::RefCell;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Context;
use broker_core::settings::Settings;
use broker_core::store::{ActiveLock, ACTIVE_LOCK_KEY};
use broker_core::Broker;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::kube::RoleLabel;

/// Runs the broker until a terminating signal.
pub fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = Settings::load(config.as_deref()).context("loading the configuration")?;
    actix_web::rt::System::new().block_on(serve(config, settings))
}

/// The process's signal streams, registered once before anything is served (an
/// unregistered SIGHUP would end a standby).
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

fn say(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

async fn serve(config: Option<PathBuf>, settings: Settings) -> anyhow::Result<()> {
    let mut signals = Signals {
        hup: signal(SignalKind::hangup())?,
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
    };
    // The built-in example publishes its passwords and secrets: never on the network.
    if settings.source.path.is_none() && !settings.listen.ip().is_loopback() {
        anyhow::bail!(
            "the built-in example configuration (its demo passwords and secrets are public) \
             only listens on loopback, not on {}; pass --config FILE (see `broker config example`)",
            settings.listen
        );
    }
    let listener = TcpListener::bind(settings.listen)
        .with_context(|| format!("binding {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let role = RoleLabel::from_env().context("pod role label")?;
    let url = settings.config.storage.url.clone();
    let (settings, lock, standby) = if broker_core::store::is_postgres_url(&url) {
        match wait_until_active(&url, &listener, addr, role.as_ref(), &mut signals).await? {
            // Stopped while waiting.
            None => return Ok(()),
            Some((lock, standby)) => (reread(config.as_deref(), settings), Some(lock), standby),
        }
    } else {
        (settings, None, None)
    };

    let source = settings
        .source
        .path
        .as_ref()
        .map_or("built-in example".to_owned(), |p| p.display().to_string());
    let broker = Broker::start_holding(settings, lock).await?;
    let server = broker_http::server(broker.clone(), listener)?;
    let handle = server.handle();
    // The standby answered (health, 503 `standby`) while the store was opened; once it
    // is gone, everything reaches the active server.
    if let Some(h) = standby {
        h.stop(true).await;
    }
    tracing::info!(%addr, config = %source, "broker listening");
    say(&format!("listening on http://{addr}"))?;
    if let Some(role) = &role {
        role.spawn_set("active");
    }

    let leading = broker.clone();
    let waiting = broker.clone();
    let lost = async move { leading.lost_leadership().await };
    let fenced = Rc::new(RefCell::new(false));
    let fenced_in = fenced.clone();
    let control = async move {
        tokio::pin!(lost);
        let sig = loop {
            tokio::select! {
                _ = signals.hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    // Errors are logged by reload; the old configuration stays.
                    let _ = broker.reload().await;
                }
                _ = signals.term.recv() => break "SIGTERM",
                _ = signals.int.recv() => break "SIGINT",
                () = &mut lost => {
                    // Another broker may be active now: stop serving at once, no drain.
                    tracing::error!("lost the active lock; stopping now");
                    *fenced_in.borrow_mut() = true;
                    handle.stop(false).await;
                    return;
                }
            }
        };
        tracing::info!(signal = sig, "shutting down gracefully");
        broker.begin_shutdown();
        handle.stop(true).await;
    };
    actix_web::rt::spawn(control);
    server.await?;
    if *fenced.borrow() {
        anyhow::bail!("stopped because the active lock was lost");
    }
    // What a target gave up on reaches its dead-letter queue before the process ends.
    let timeout = waiting.settings().config.server.shutdown_timeout;
    waiting.finish_dead_letters(timeout).await;
    tracing::info!("stopped");
    Ok(())
}

/// The configuration as the file says now (a standby may have waited long); the one
/// loaded at start if the file no longer loads or names another store (the lock held
/// is that store's).
fn reread(config: Option<&Path>, settings: Settings) -> Settings {
    if config.is_none() {
        return settings;
    }
    match Settings::load(config) {
        Ok(s) if s.config.storage.url == settings.config.storage.url => s,
        Ok(_) => {
            tracing::error!("the configuration now names another store; a restart applies it");
            settings
        }
        Err(e) => {
            tracing::error!(error = %e, "the configuration no longer loads; using the one read at start");
            settings
        }
    }
}

/// Takes the database's active lock, serving as a standby while another broker holds
/// it: the lock, and the standby server if there was one (the caller stops it once it
/// serves). `None` when a terminating signal came first.
async fn wait_until_active(
    url: &str,
    listener: &TcpListener,
    addr: SocketAddr,
    role: Option<&Arc<RoleLabel>>,
    signals: &mut Signals,
) -> anyhow::Result<Option<(ActiveLock, Option<actix_web::dev::ServerHandle>)>> {
    let standby: Rc<RefCell<Option<actix_web::dev::ServerHandle>>> = Rc::default();
    let started = standby.clone();
    let labelling: Rc<RefCell<Option<tokio::task::JoinHandle<()>>>> = Rc::default();
    let label_task = labelling.clone();
    let role_for_wait = role.cloned();
    let become_standby = move || {
        tracing::info!(%addr, "not active yet (another broker holds the database's active lock, or the database cannot be reached): standing by");
        let metrics = Arc::new(broker_core::metrics::Metrics::new());
        metrics.leader.set(0);
        metrics.observe_ready(false);
        // The listener stays bound throughout: the standby serves a duplicate of it.
        match listener
            .try_clone()
            .and_then(|l| broker_http::standby_server(metrics, l))
        {
            Ok(server) => {
                *started.borrow_mut() = Some(server.handle());
                actix_web::rt::spawn(server);
                let _ = say(&format!("standby on http://{addr}"));
            }
            Err(e) => tracing::error!(error = %e, "cannot serve as a standby"),
        }
        if let Some(role) = role_for_wait {
            *label_task.borrow_mut() = Some(role.spawn_set("standby"));
        }
    };
    let lock = tokio::select! {
        lock = ActiveLock::acquire(url, ACTIVE_LOCK_KEY, become_standby) => Some(lock?),
        _ = signals.term.recv() => None,
        _ = signals.int.recv() => None,
    };
    if let Some(task) = labelling.borrow_mut().take() {
        task.abort();
    }
    let standby = standby.borrow_mut().take();
    match lock {
        Some(lock) => {
            tracing::info!("holding the database's active lock");
            Ok(Some((lock, standby)))
        }
        None => {
            if let Some(h) = standby {
                h.stop(true).await;
            }
            Ok(None)
        }
    }
}
