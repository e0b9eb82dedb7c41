//! The running broker: settings that can be swapped by a reload, the hub, metrics,
//! login checks and the shutdown signal. The HTTP layer holds one `Arc<Broker>`.

use std::sync::{Arc, RwLock};

use actix::prelude::*;
use tokio::sync::watch;

use crate::actors::cron::{Cron, SetCrons};
use crate::actors::hub::Deliveries;
use crate::actors::leader::{Follow, Leader, SingleNode};
use crate::actors::registry::{NotifyConnection, NotifyUser};
use crate::actors::{
    ApplySettings, ConnectionRegistry, GetQueue, Hub, Notify, Publish, PublishAt, Published,
    QueueHandle, Scheduled,
};
use crate::auth::{hash_password, CredentialCache};
use crate::config::{self, QueueKind};
use crate::error::{Error, Rejection};
use crate::message::NewMessage;
use crate::metrics::Metrics;
use crate::notify::{self, Route};
use crate::settings::{QueueSpec, Runtime, Settings, UserSpec};
use crate::store;

/// webhook-queue's minimum password length for `/setPassword`.
pub const MIN_PASSWORD_LEN: usize = 6;

/// The running broker.
pub struct Broker {
    hub: Addr<Hub>,
    store: Arc<dyn store::Store>,
    registry: Addr<ConnectionRegistry>,
    leader: Addr<Leader>,
    cron: Addr<Cron>,
    /// Keeps the delivery arbiter's thread alive as long as the broker.
    _deliveries: Arbiter,
    /// Entities of the pg-hooks compatible routes.
    pub pg_hooks: crate::pg_hooks::PgHooks,
    settings: RwLock<Arc<Settings>>,
    metrics: Arc<Metrics>,
    credentials: CredentialCache,
    /// Nonces of signed pusher requests within their window.
    pusher_nonces: crate::auth::crossbar::NonceCache,
    started_at: i64,
    shutdown: watch::Sender<bool>,
    /// Serialises reloads and password changes (each reads, edits and swaps the config).
    config_lock: tokio::sync::Mutex<()>,
}

impl Broker {
    /// Opens the store, restores the runtime definitions kept there, and starts the
    /// actors. Call inside a running actix system.
    pub async fn start(settings: Settings) -> Result<Arc<Broker>, Error> {
        Self::start_fenced(settings, None).await
    }

    /// [`Broker::start`] for a broker that holds the database's active lock: its store
    /// writes only while `fence` is current (see `store::ActiveLock`).
    pub async fn start_fenced(
        settings: Settings,
        fence: Option<store::Fence>,
    ) -> Result<Arc<Broker>, Error> {
        let metrics = Arc::new(Metrics::new());
        let store =
            store::open_fenced(&settings.config.storage.url, metrics.clone(), fence).await?;
        let pg_hooks = crate::pg_hooks::PgHooks::default();
        let mut settings = settings;
        if let Some(json) = store.state(STATE_KEY).await? {
            match serde_json::from_str::<PersistedState>(&json) {
                Ok(p) => {
                    let (cfg, source) = (settings.config.clone(), settings.source.clone());
                    match Settings::compile_with(cfg, source, p.runtime) {
                        Ok(s) => settings = s,
                        // The config file changed under them: start without, say so loudly.
                        Err(e) => {
                            tracing::error!(error = %e, "stored runtime definitions no longer fit the config; not loaded")
                        }
                    }
                    if let Err(e) = pg_hooks.restore(p.pg_hooks) {
                        tracing::error!(error = %e, "stored pg-hooks state is unreadable; not loaded");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "stored runtime definitions are unreadable; not loaded")
                }
            }
        }
        warn_weak_passwords(&settings);
        let settings = Arc::new(settings);
        let leader = Leader::new(Box::new(SingleNode), metrics.clone()).start();
        let client = reqwest::Client::builder()
            .user_agent(concat!("broker/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| Error::Store(format!("cannot build the HTTP client: {e}")))?;
        let arbiter = Arbiter::new();
        let deliveries = Deliveries {
            leader: leader.clone(),
            client,
            arbiter: arbiter.handle(),
        };
        let hub = Hub::new(settings.clone(), store.clone(), metrics.clone(), deliveries).start();
        let cron = Cron::new(
            settings.crons.clone(),
            hub.clone(),
            metrics.clone(),
            store.clone(),
        )
        .start();
        leader.do_send(Follow {
            recipient: cron.clone().recipient(),
        });
        let registry = ConnectionRegistry::new(metrics.clone()).start();
        let (shutdown, _) = watch::channel(false);
        Ok(Arc::new(Broker {
            hub,
            store,
            registry,
            leader,
            cron,
            _deliveries: arbiter,
            pg_hooks,
            settings: RwLock::new(settings),
            metrics,
            credentials: CredentialCache::default(),
            pusher_nonces: Default::default(),
            started_at: chrono::Utc::now().timestamp(),
            shutdown,
            config_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// Nonces of signed pusher requests seen within the timestamp window.
    pub fn pusher_nonces(&self) -> &crate::auth::crossbar::NonceCache {
        &self.pusher_nonces
    }

    /// The hub actor.
    pub fn hub(&self) -> &Addr<Hub> {
        &self.hub
    }

    /// The leadership actor.
    pub fn leader(&self) -> &Addr<Leader> {
        &self.leader
    }

    /// The cron scheduler.
    pub fn cron(&self) -> &Addr<Cron> {
        &self.cron
    }

    /// The registry of live connections.
    pub fn registry(&self) -> &Addr<ConnectionRegistry> {
        &self.registry
    }

    /// The publish pipeline shared by HTTP ingest and WebSocket `publish`, after the
    /// caller has authenticated the publisher: content rules, notify-kind shapes, the
    /// queue (limits), then routing of notifications. Refusals are counted here.
    pub async fn publish(
        &self,
        queue: &str,
        spec: &QueueSpec,
        messages: Vec<NewMessage>,
        deliver_at_ms: Option<i64>,
    ) -> Result<PublishOutcome, Error> {
        let counted = |e: Error| {
            if let Error::Rejected { reason, .. } = &e {
                self.metrics.reject(spec.label(), *reason);
            }
            e
        };
        let single = messages.len() == 1;
        let mut routes = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let what = || {
                if single {
                    "the body".to_owned()
                } else {
                    format!("messages[{i}]")
                }
            };
            if spec.json_only {
                if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&m.body) {
                    return Err(counted(Error::rejected(
                        Rejection::InvalidBody,
                        format!("{} is not valid JSON: {e}", what()),
                    )));
                }
            }
            match notify::route(spec.kind, &m.body) {
                Ok(Some(r)) => routes.push(r),
                Ok(None) => {}
                Err(Error::Rejected { reason, message }) => {
                    return Err(counted(Error::Rejected {
                        reason,
                        message: format!("{}: {message}", what()),
                    }))
                }
                Err(e) => return Err(e),
            }
        }
        let handle = self.queue(queue).await?;
        if let Some(at) = deliver_at_ms.filter(|at| *at > crate::message::now_ms()) {
            if spec.kind != QueueKind::Queue {
                return Err(counted(Error::rejected(
                    Rejection::InvalidBody,
                    "notify queues deliver at once; `delay`/`at` are not accepted",
                )));
            }
            let scheduled = handle
                .addr
                .send(PublishAt {
                    messages,
                    deliver_at_ms: at,
                })
                .await?
                .map_err(counted)?;
            return Ok(PublishOutcome {
                published: None,
                scheduled: Some(scheduled),
                delivered: None,
            });
        }
        let published = handle
            .addr
            .send(Publish { messages })
            .await?
            .map_err(counted)?;
        let delivered = if spec.kind == QueueKind::Queue {
            None
        } else {
            let mut n = 0;
            for (route, data) in routes {
                // The message is stored either way; an unknown connection gets nothing.
                n += self.notify(route, data).await.unwrap_or(0);
            }
            Some(n)
        };
        Ok(PublishOutcome {
            published: Some(published),
            scheduled: None,
            delivered,
        })
    }

    /// Pushes JSON `data` to a user's connections or to one connection; how many got it.
    pub async fn notify(&self, route: Route, data: bytes::Bytes) -> Result<usize, Error> {
        let notify = Notify { data };
        match route {
            Route::User(user) => Ok(self.registry.send(NotifyUser { user, notify }).await?),
            Route::Connection(id) => self.registry.send(NotifyConnection { id, notify }).await?,
        }
    }

    /// The current settings (one consistent version; a reload swaps them whole).
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("settings lock").clone()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Unix time (seconds) at which the broker started; webhook-queue's `/time`.
    pub fn started_at(&self) -> i64 {
        self.started_at
    }

    /// The queue `name`, created on first use if configured or matching a pattern.
    pub async fn queue(&self, name: &str) -> Result<QueueHandle, Error> {
        self.hub
            .send(GetQueue {
                name: name.to_owned(),
            })
            .await?
            .ok_or_else(|| Error::UnknownQueue {
                queue: name.to_owned(),
            })
    }

    /// Subscribes to the queue `name` (created if a pattern allows): its address and the
    /// queue's reply (epoch, head, replay).
    pub async fn subscribe(
        &self,
        name: &str,
        subscribe: crate::actors::Subscribe,
    ) -> Result<(Addr<crate::actors::Queue>, crate::actors::Subscribed), Error> {
        let handle = self.queue(name).await?;
        let reply = handle.addr.send(subscribe).await?;
        Ok((handle.addr, reply))
    }

    /// Checks a login. Argon2 runs on the blocking pool; successes are cached briefly.
    pub async fn authenticate(&self, user: &str, password: &str) -> Result<Arc<UserSpec>, Error> {
        let spec = self
            .settings()
            .users
            .get(user)
            .cloned()
            .ok_or(Error::BadLogin)?;
        if self.credentials.contains(user, password) {
            return Ok(spec);
        }
        let (check, pw) = (spec.clone(), password.to_owned());
        let ok = tokio::task::spawn_blocking(move || check.password.verify(&pw))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        if !ok {
            return Err(Error::BadLogin);
        }
        self.credentials.insert(user, password);
        Ok(spec)
    }

    /// Re-reads the config from where it came from; on any error the old one stays.
    /// Runtime definitions (admin API) are kept.
    pub async fn reload(&self) -> Result<(), Error> {
        let _guard = self.config_lock.lock().await;
        let current = self.settings();
        let path = current.source.path.clone();
        let runtime = current.runtime.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let (cfg, source) = config::read(path.as_deref())?;
            Settings::compile_with(cfg, source, runtime)
        })
        .await
        .map_err(|_| Error::ShuttingDown)?;
        self.finish_reload(loaded).await
    }

    /// Changes the runtime definitions (queues and crons of the admin API) and swaps in
    /// settings compiled with them; an invalid change leaves everything as it was.
    pub async fn redefine(
        &self,
        change: impl FnOnce(&mut Runtime) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let _guard = self.config_lock.lock().await;
        let current = self.settings();
        let mut runtime = current.runtime.clone();
        change(&mut runtime)?;
        let compiled =
            Settings::compile_with(current.config.clone(), current.source.clone(), runtime);
        self.finish_reload(compiled).await?;
        self.persist_state().await
    }

    /// Saves the runtime definitions and the pg-hooks entities to the store (they come
    /// back at the next start); resolves after the commit.
    pub async fn persist_state(&self) -> Result<(), Error> {
        let state = PersistedState {
            runtime: self.settings().runtime.clone(),
            pg_hooks: self.pg_hooks.snapshot(),
        };
        let json = serde_json::to_string(&state).expect("runtime definitions serialize");
        self.store.set_state(STATE_KEY, json).await
    }

    /// webhook-queue's `/setPassword`: hashes with argon2id, writes the hash into the
    /// config file atomically, and swaps the settings so the old password stops working.
    pub async fn set_password(&self, user: &str, password: &str) -> Result<(), Error> {
        if password.chars().count() < MIN_PASSWORD_LEN {
            return Err(Error::PasswordTooShort {
                min: MIN_PASSWORD_LEN,
            });
        }
        let _guard = self.config_lock.lock().await;
        let source = self.settings().source.clone();
        let runtime = self.settings().runtime.clone();
        let (user, password) = (user.to_owned(), password.to_owned());
        let loaded = tokio::task::spawn_blocking(move || {
            let hash = hash_password(&password);
            let (path, text) = config::with_user_pass_hash(&source, &user, &hash)?;
            // Validate the edited file before it replaces the old one.
            let (cfg, source) = config::parse(Some(&path), &text, std::env::vars())?;
            let settings = Settings::compile_with(cfg, source, runtime)?;
            config::write_atomically(&path, text.as_bytes())?;
            Ok(settings)
        })
        .await
        .map_err(|_| Error::ShuttingDown)?;
        self.finish_reload(loaded).await
    }

    async fn finish_reload(&self, loaded: Result<Settings, Error>) -> Result<(), Error> {
        let outcome = |o: &str| self.metrics.reloads.with_label_values(&[o]).inc();
        let new = match loaded {
            Ok(s) => Arc::new(s),
            Err(e) => {
                outcome("error");
                tracing::error!(error = %e, "reload failed; keeping the running configuration");
                return Err(e);
            }
        };
        let old = self.settings();
        if new.listen != old.listen || new.config.storage.url != old.config.storage.url {
            tracing::warn!("server.listen and storage.url take effect at the next restart");
        }
        warn_weak_passwords(&new);
        *self.settings.write().expect("settings lock") = new.clone();
        self.credentials.clear();
        self.cron.do_send(SetCrons {
            crons: new.crons.clone(),
        });
        self.hub.send(ApplySettings { settings: new }).await?;
        outcome("ok");
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Republishes dead letters of `dlq` (after offset `since`, at most `limit`) into the
    /// queues they came from; returns how many and the last offset handled.
    pub async fn redrive(
        &self,
        dlq: &str,
        since: u64,
        limit: usize,
    ) -> Result<(usize, u64), Error> {
        use crate::actors::webhook::dlq_headers;
        let handle = self.queue(dlq).await?;
        let batch = handle
            .addr
            .send(crate::actors::Read {
                since,
                epoch: None,
                limit,
            })
            .await??;
        let mut last = since;
        let mut n = 0;
        for m in &batch.messages {
            last = m.offset;
            let Some((_, origin)) = m.headers.iter().find(|(k, _)| k == dlq_headers::QUEUE) else {
                continue; // not a dead letter
            };
            let message = NewMessage {
                audience: None,
                body: m.body.clone(),
                content_type: m.content_type.clone(),
                headers: m
                    .headers
                    .iter()
                    .filter(|(k, _)| !k.starts_with("x-broker-"))
                    .cloned()
                    .collect(),
            };
            let target = self.queue(origin).await?;
            target
                .addr
                .send(Publish {
                    messages: vec![message],
                })
                .await??;
            n += 1;
        }
        Ok((n, last))
    }

    /// Why this node should not get traffic now (`shutting_down`, `store_unavailable`),
    /// or `None` when it is ready. Each call is an observation for `broker_ready` and
    /// `broker_readiness_changes_total`, so probes and scrapes see the same readiness.
    pub fn unready_reason(&self) -> Option<&'static str> {
        let reason = if *self.shutdown.borrow() {
            Some("shutting_down")
        } else if !self.store.healthy() {
            Some("store_unavailable")
        } else {
            None
        };
        self.metrics.observe_ready(reason.is_none());
        reason
    }

    /// Starts shutting down: long-polls return at once.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves when shutdown begins; long-polls select on it.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

/// Store key of the persisted runtime definitions.
const STATE_KEY: &str = "runtime";

/// What survives a restart of the admin API's and pg-hooks routes' definitions.
#[derive(serde::Serialize, serde::Deserialize)]
struct PersistedState {
    runtime: Runtime,
    #[serde(default)]
    pg_hooks: serde_json::Value,
}

/// What a publish did.
#[derive(Debug)]
pub struct PublishOutcome {
    /// Offsets and epoch (immediate publishes).
    pub published: Option<Published>,
    /// When the messages become visible (delayed publishes).
    pub scheduled: Option<Scheduled>,
    /// For notify-kind queues: connections that got the notification(s).
    pub delivered: Option<usize>,
}

fn warn_weak_passwords(settings: &Settings) {
    for user in settings.weak_password_users() {
        tracing::warn!(
            user,
            "user has a plain or SHA password hash; set a new password (POST /setPassword) \
             or `broker hash-password` to switch to argon2id"
        );
    }
}
