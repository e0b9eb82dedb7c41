//! The running broker: settings that can be swapped by a reload, the hub, metrics,
//! login checks and the shutdown signal. The HTTP layer holds one `Arc<Broker>`.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::watch;

use crate::actors::cron::{Cron, SetCrons};
use crate::actors::leader::{Follow, Leader, SingleNode};
use crate::actors::webhooks::{Deliveries, Webhooks};
use crate::actors::{
    ApplySettings, Batch, ConnectionRegistry, ConsumerKey, ConsumerRead, Hub, Listen, Notify,
    QueueHandle, Read, ResolveConsumer, Subscribe, SubscribePrefix, Subscribed, Subscriber,
    Unlisten, Unsubscribe, UnsubscribePrefix,
};
use crate::auth::{hash_password, CredentialCache};
use crate::config;
use crate::error::Error;
use crate::message::NewMessage;
use crate::metrics::Metrics;
use crate::notify::Route;
use crate::settings::{QueueSpec, Runtime, Settings, UserSpec};
use crate::store;

use crate::actors::ingress::Ingress;
pub use crate::actors::ingress::{PublishOutcome, PublishRequest, Publisher};
use crate::settings::SharedSettings;

/// Checks runtime definitions about to replace `current.runtime`: the quotas
/// (`limits.max_runtime_*`), and that every webhook target new to them reaches no
/// internal address (`webhooks.allow_targets`). Config-file definitions are trusted.
async fn check_runtime(current: &Settings, runtime: &Runtime) -> Result<(), Error> {
    let limits = &current.config.limits;
    let targets: Vec<&str> = runtime
        .queues
        .iter()
        .flat_map(|q| q.webhooks.iter().map(|w| w.url.as_str()))
        .collect();
    for (what, n, max) in [
        ("queues", runtime.queues.len(), limits.max_runtime_queues),
        ("targets", targets.len(), limits.max_runtime_targets),
        ("crons", runtime.crons.len(), limits.max_runtime_crons),
    ] {
        if n > max {
            return Err(Error::TooManyDefinitions { what, max });
        }
    }
    let known: std::collections::HashSet<&str> = current
        .runtime
        .queues
        .iter()
        .flat_map(|q| q.webhooks.iter().map(|w| w.url.as_str()))
        .collect();
    for url in targets.into_iter().filter(|u| !known.contains(u)) {
        crate::delivery::check_runtime_target(url, &current.allow_targets)
            .await
            .map_err(Error::TargetNotAllowed)?;
    }
    Ok(())
}

/// webhook-queue's minimum password length for `/setPassword`.
pub const MIN_PASSWORD_LEN: usize = 6;

/// The running broker.
pub struct Broker {
    hub: Addr<Hub>,
    /// The webhook supervisor (delivery status).
    webhooks: Addr<Webhooks>,
    store: Arc<dyn store::Store>,
    registry: Addr<ConnectionRegistry>,
    /// Kept for the broker's lifetime (its followers hold it too).
    _leader: Addr<Leader>,
    /// Whether this node leads, as it changes.
    leadership: watch::Receiver<bool>,
    /// Whether losing the lead means stopping (the database's active lock), rather than
    /// handing singleton work to another replica (a NATS cluster).
    exclusive: bool,
    /// Whether other replicas share the store as equals (a NATS cluster).
    replicated: bool,
    /// The other replicas' connections (a NATS cluster).
    fabric: Option<Arc<dyn crate::fabric::Fabric>>,
    cron: Addr<Cron>,
    /// Keeps the delivery arbiter's thread alive as long as the broker.
    _deliveries: Arbiter,
    /// Entities of the pg-hooks compatible routes.
    pub pg_hooks: crate::pg_hooks::PgHooks,
    settings: SharedSettings,
    /// The one publish door (shared with cron and webhooks).
    ingress: Ingress,
    metrics: Arc<Metrics>,
    credentials: CredentialCache,
    /// `webhooks.allow_targets`, as the guarded client's resolver reads it.
    allowed_targets: crate::delivery::AllowedTargets,
    /// Bounds on password checks (rate per address and user, concurrency).
    logins: RwLock<Arc<crate::auth::login::LoginGuard>>,
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
        Self::start_holding(settings, None).await
    }

    /// [`Broker::start`] for a broker that holds the database's active lock: the lock is
    /// its election (it leads until the lock is lost, see [`Broker::lost_leadership`]),
    /// and its store writes only while the lock's fence is current.
    pub async fn start_holding(
        settings: Settings,
        lock: Option<store::ActiveLock>,
    ) -> Result<Arc<Broker>, Error> {
        let metrics = Arc::new(Metrics::new());
        let Backend {
            store,
            logs,
            election,
            exclusive,
            replicated,
            fabric,
            targets,
        } = Backend::open(
            &settings.config.storage,
            &settings.config.limits,
            lock,
            metrics.clone(),
        )
        .await?;
        let pg_hooks = crate::pg_hooks::PgHooks::default();
        let mut settings = settings;
        if let Some(json) = store.state(STATE_KEY).await? {
            // What does not load is kept aside, never overwritten by the next save.
            let set_aside = |why: String| {
                let (store, json) = (store.clone(), json.clone());
                async move {
                    let key = format!("{STATE_KEY}.unloaded.{}", crate::message::now_ms());
                    store.set_state(&key, json).await?;
                    tracing::error!(error = %why, kept_as = %key, "stored runtime definitions were not loaded; the stored copy is kept aside under that key (broker_state)");
                    Ok::<_, Error>(())
                }
            };
            match serde_json::from_str::<PersistedState>(&json) {
                Ok(p) => {
                    let (cfg, source) = (settings.config.clone(), settings.source.clone());
                    let mut unloaded = Vec::new();
                    match Settings::compile_with(cfg, source, p.runtime) {
                        Ok(s) => settings = s,
                        // The config file changed under them: start without, say so loudly.
                        Err(e) => unloaded.push(format!("runtime definitions: {e}")),
                    }
                    if let Err(e) = pg_hooks.restore(p.pg_hooks) {
                        unloaded.push(format!("pg-hooks state: {e}"));
                    }
                    if !unloaded.is_empty() {
                        set_aside(unloaded.join("; ")).await?;
                    }
                }
                Err(e) => set_aside(format!("unreadable: {e}")).await?,
            }
        }
        warn_weak_passwords(&settings);
        let settings = Arc::new(settings);
        let leader = Leader::new(election, metrics.clone());
        let leadership = leader.watch();
        let leader = leader.start();
        // No delivery follows a redirect (a target could send it anywhere); targets
        // defined at runtime also never reach internal addresses.
        let allowed_targets: crate::delivery::AllowedTargets =
            Arc::new(RwLock::new(settings.allow_targets.clone()));
        let builder = || {
            reqwest::Client::builder()
                .user_agent(concat!("broker/", env!("CARGO_PKG_VERSION")))
                .pool_idle_timeout(std::time::Duration::from_secs(60))
                .redirect(reqwest::redirect::Policy::none())
        };
        let client_err =
            |e: reqwest::Error| Error::Startup(format!("cannot build the HTTP client: {e}"));
        let client = builder().build().map_err(client_err)?;
        let guarded = builder()
            .dns_resolver(Arc::new(crate::delivery::GuardedResolver {
                allow: allowed_targets.clone(),
            }))
            .build()
            .map_err(client_err)?;
        let arbiter = Arbiter::new();
        let shared: SharedSettings = Arc::new(RwLock::new(settings.clone()));
        let registry = ConnectionRegistry::new(metrics.clone()).start();
        let deliveries = Deliveries {
            leader: leader.clone(),
            targets,
            client,
            guarded,
            arbiter: arbiter.handle(),
        };
        let crate::actors::Launched {
            hub,
            webhooks,
            ingress,
        } = crate::actors::launch(
            &shared,
            store.clone(),
            logs,
            metrics.clone(),
            registry.clone(),
            fabric.clone(),
            deliveries,
        );
        let cron = Cron::new(
            settings.crons.clone(),
            ingress.clone(),
            metrics.clone(),
            store.clone(),
        )
        .start();
        if replicated {
            // Every replica fires every tick; the log keeps one message per tick (each
            // tick has its own idempotency key): no tick is lost with a replica.
            cron.do_send(crate::actors::leader::LeadershipChanged { leader: true });
        } else {
            leader.do_send(Follow {
                recipient: cron.clone().recipient(),
            });
        }
        let (shutdown, _) = watch::channel(false);
        let follow = store.watch_state(STATE_KEY);
        let broker = Arc::new(Broker {
            hub,
            webhooks,
            store,
            registry,
            _leader: leader,
            leadership,
            exclusive,
            replicated,
            fabric,
            cron,
            _deliveries: arbiter,
            pg_hooks,
            settings: shared,
            ingress,
            metrics,
            credentials: CredentialCache::default(),
            allowed_targets,
            logins: RwLock::new(Arc::new(crate::auth::login::LoginGuard::new(
                settings.config.limits.login_attempts_per_minute,
            ))),
            pusher_nonces: Default::default(),
            started_at: chrono::Utc::now().timestamp(),
            shutdown,
            config_lock: tokio::sync::Mutex::new(()),
        });
        if let Some(values) = follow {
            actix::spawn(follow_state(Arc::downgrade(&broker), values));
        }
        if let Some(fabric) = &broker.fabric {
            fabric.serve(answer_replicas(Arc::downgrade(&broker)));
        }
        Ok(broker)
    }

    /// Whether a signed request (its nonce or id as `key`) is seen for the first time
    /// by every replica sharing the store, remembering it for `keep`; always `true` on
    /// one node (its own nonce cache decides there).
    pub async fn claim_signed(&self, key: &str, keep: Duration) -> Result<bool, Error> {
        self.store.claim_once(key, keep).await
    }

    /// Nonces of signed pusher requests seen within the timestamp window.
    pub fn pusher_nonces(&self) -> &crate::auth::crossbar::NonceCache {
        &self.pusher_nonces
    }

    /// Resolves once this node, having led, has lost the lead (the database's active
    /// lock was lost): it must stop serving, another broker may be active. Never for a
    /// single node.
    pub async fn lost_leadership(&self) {
        if !self.exclusive {
            return std::future::pending().await;
        }
        let mut rx = self.leadership.clone();
        if rx.wait_for(|leads| *leads).await.is_ok() {
            let _ = rx.wait_for(|leads| !*leads).await;
        }
    }

    /// The one publish call every producer makes: see [`Ingress::publish`].
    pub async fn publish(&self, req: PublishRequest<'_>) -> Result<PublishOutcome, Error> {
        self.ingress.publish(req).await
    }

    /// The ingest checks that need no body: see [`Ingress::admit_ingest`].
    pub fn admit_ingest<'a>(
        &self,
        queue: &str,
        client_ip: IpAddr,
        headers: &'a dyn Fn(&str) -> Option<&'a str>,
    ) -> Result<Arc<QueueSpec>, Error> {
        self.ingress.admit_ingest(queue, client_ip, headers)
    }

    /// Counts a publish refused before it reached [`Broker::publish`]; returns it.
    pub fn count_refusal(&self, label: &str, e: Error) -> Error {
        self.ingress.count_refusal(label, e)
    }

    /// Pushes JSON `data` to a user's connections or to one connection; how many got it.
    pub async fn notify(&self, route: Route, data: bytes::Bytes) -> Result<usize, Error> {
        self.ingress.notify(route, data).await
    }

    /// The queue `name`, created on first use if configured or matching a pattern.
    pub(crate) async fn queue(&self, name: &str) -> Result<QueueHandle, Error> {
        self.ingress.queue(name).await
    }

    /// Reads the messages of `queue` after `since` (the last offset the reader has seen;
    /// `epoch` the one it belongs to), at most `limit`, long-polling up to `wait` when
    /// there are none yet. The caller has checked the reader's grant.
    pub async fn read(
        &self,
        queue: &str,
        since: u64,
        epoch: Option<String>,
        limit: usize,
        wait: Duration,
    ) -> Result<Batch, Error> {
        let handle = self.queue(queue).await?;
        let batch = self
            .long_poll(&handle, wait, || {
                handle.addr.send(Read {
                    since,
                    epoch: epoch.clone(),
                    limit,
                })
            })
            .await;
        self.count_poll_read(queue, &batch);
        batch
    }

    /// Creates a named poll consumer of `queue` for `key`, positioned after the newest
    /// message. `exclusive` (webhook-queue's `/listen`): a connected consumer of that
    /// name is an error; otherwise the same queue again is a no-op. The caller has
    /// checked the grant.
    pub async fn listen(
        &self,
        key: ConsumerKey,
        queue: String,
        exclusive: bool,
    ) -> Result<(), Error> {
        self.sync_consumer(&key).await?;
        self.hub
            .send(Listen {
                key,
                queue: queue.clone(),
                exclusive,
            })
            .await??;
        if self.replicated {
            // The queue has saved the new cursor once it answers after the hub did.
            let h = self.queue(&queue).await?;
            h.addr.send(crate::actors::Head).await?;
        }
        self.settle_consumers().await
    }

    /// Removes a named poll consumer.
    pub async fn unlisten(&self, key: ConsumerKey) -> Result<(), Error> {
        self.sync_consumer(&key).await?;
        self.hub.send(Unlisten { key: key.clone() }).await??;
        if self.replicated {
            // Its queue forgets it in the store too; this does it before the reply.
            self.store.remove_consumer(&key.user, &key.client);
        }
        self.settle_consumers().await
    }

    /// On a cluster, a consumer is read from the shared store before it is served
    /// (another replica may have created, moved or removed it), and this replica takes
    /// it as stored, once its queue shows what the consumer has seen.
    async fn sync_consumer(&self, key: &ConsumerKey) -> Result<(), Error> {
        if !self.replicated {
            return Ok(());
        }
        match self.store.consumer(&key.user, &key.client).await? {
            Some(c) => {
                if let Ok(h) = self.queue(&c.queue).await {
                    catch_up(&h, c.last_seen).await;
                }
                self.hub
                    .send(crate::actors::hub::AdoptConsumer { stored: c })
                    .await?;
            }
            None => {
                self.hub
                    .send(crate::actors::hub::DropConsumer { key: key.clone() })
                    .await?
            }
        }
        Ok(())
    }

    /// On a cluster, a consumer's new position is stored before the reply, so that the
    /// next request, on any replica, continues from it.
    async fn settle_consumers(&self) -> Result<(), Error> {
        if self.replicated {
            self.store.flush().await?;
        }
        Ok(())
    }

    /// A named consumer's unread messages (at most `limit`, long-polling up to `wait`);
    /// its cursor moves past them in the same step. The queue's name and the batch.
    pub async fn consume(
        &self,
        key: ConsumerKey,
        limit: usize,
        wait: Duration,
    ) -> Result<(Arc<str>, Batch), Error> {
        self.sync_consumer(&key).await?;
        let handle = self
            .hub
            .send(ResolveConsumer { key: key.clone() })
            .await??;
        let batch = self
            .long_poll(&handle, wait, || {
                handle.addr.send(ConsumerRead {
                    key: key.clone(),
                    limit,
                })
            })
            .await;
        self.count_poll_read(&handle.name, &batch);
        let batch = batch?;
        self.settle_consumers().await?;
        Ok((handle.name, batch))
    }

    /// `broker_poll_reads_total{queue,outcome}`, once per answered read.
    fn count_poll_read(&self, queue: &str, batch: &Result<Batch, Error>) {
        let outcome = match batch {
            Ok(b) if b.messages.is_empty() => "empty",
            Ok(_) => "messages",
            Err(Error::Refresh { .. }) => "refresh",
            Err(_) => return,
        };
        if let Some(spec) = self.settings().queue(queue) {
            self.metrics
                .poll_reads
                .with_label_values(&[spec.label(), outcome])
                .inc();
        }
    }

    /// Runs `read` until it returns messages, `wait` passes, the queue goes away or the
    /// broker shuts down. Wakes on the queue's change channel, not on a timer.
    async fn long_poll<F, Fut>(
        &self,
        handle: &QueueHandle,
        wait: Duration,
        mut read: F,
    ) -> Result<Batch, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Result<Batch, Error>, MailboxError>>,
    {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = handle.changes.clone();
        let mut shutdown = self.shutdown_signal();
        loop {
            // Mark the current version seen *before* reading, so a publish that lands
            // between the read and the wait still wakes us.
            changes.borrow_and_update();
            let batch = read().await??;
            if !batch.messages.is_empty() || wait.is_zero() || *shutdown.borrow() {
                return Ok(batch);
            }
            let waiting = &self.metrics.poll_waiting;
            waiting.inc();
            let woken = tokio::select! {
                changed = changes.changed() => changed.is_ok(),
                _ = tokio::time::sleep_until(deadline) => false,
                _ = shutdown.changed() => false,
            };
            waiting.dec();
            if !woken {
                return Ok(batch);
            }
        }
    }

    /// A queue's epoch, newest offset and oldest retained offset (admin views).
    pub async fn head(&self, queue: &str) -> Result<crate::actors::queue::HeadInfo, Error> {
        let handle = self.queue(queue).await?;
        Ok(handle.addr.send(crate::actors::Head).await?)
    }

    /// The delivery state of each webhook target of `queue` (admin views).
    pub async fn webhook_status(&self, queue: &str) -> Vec<crate::actors::webhook::WebhookStatus> {
        crate::actors::webhooks::status(&self.webhooks, queue).await
    }

    /// Every cron with its schedule and next run (admin views).
    pub async fn crons(&self) -> Result<Vec<crate::actors::cron::CronInfo>, Error> {
        Ok(self.cron.send(crate::actors::cron::ListCrons).await?)
    }

    /// Every live WebSocket connection (admin views), on every replica of a cluster.
    pub async fn connections(&self) -> Result<Vec<crate::actors::ConnectionInfo>, Error> {
        let mut all = self.connections_here().await?;
        if let Some(fabric) = &self.fabric {
            for a in fabric.ask_all(crate::fabric::Ask::Connections).await {
                if let crate::fabric::Answer::Connections(theirs) = a {
                    all.extend(theirs);
                }
            }
            all.sort_by(|a, b| a.connected_at.cmp(&b.connected_at).then(a.id.cmp(&b.id)));
        }
        Ok(all)
    }

    /// The connections this replica holds.
    async fn connections_here(&self) -> Result<Vec<crate::actors::ConnectionInfo>, Error> {
        let mut here = self
            .registry
            .send(crate::actors::registry::ListConnections)
            .await?;
        if let Some(fabric) = &self.fabric {
            let node = fabric.node();
            for c in &mut here {
                c.replica = Some(node.clone());
            }
        }
        Ok(here)
    }

    /// Closes connection `id` with `disconnect`'s close frame, on whichever replica
    /// holds it.
    pub async fn close_connection(
        &self,
        id: String,
        disconnect: crate::actors::Disconnect,
    ) -> Result<(), Error> {
        let here = self
            .registry
            .send(crate::actors::registry::CloseConnection {
                id: id.clone(),
                disconnect,
            })
            .await?;
        match (here, &self.fabric) {
            (Err(Error::UnknownConnection { id }), Some(fabric)) => {
                let ask = crate::fabric::Ask::Close {
                    id: id.clone(),
                    code: disconnect.code,
                    reason: disconnect.reason.to_owned(),
                };
                let found = fabric
                    .ask_all(ask)
                    .await
                    .into_iter()
                    .any(|a| matches!(a, crate::fabric::Answer::Closed { found: true }));
                if found {
                    Ok(())
                } else {
                    Err(Error::UnknownConnection { id })
                }
            }
            (here, _) => here,
        }
    }

    /// Answers another replica's ask from what this replica holds.
    async fn answer(&self, ask: crate::fabric::Ask) -> crate::fabric::Answer {
        use crate::fabric::{Answer, Ask};
        match ask {
            Ask::NotifyUser { user, data } => {
                let n = self
                    .ingress
                    .notify_here(Route::User(user), bytes::Bytes::from(data))
                    .await
                    .unwrap_or(0);
                Answer::Notified {
                    found: n > 0,
                    delivered: n,
                }
            }
            Ask::NotifyConnection { id, data } => {
                match self
                    .ingress
                    .notify_here(Route::Connection(id), bytes::Bytes::from(data))
                    .await
                {
                    Ok(n) => Answer::Notified {
                        found: true,
                        delivered: n,
                    },
                    Err(_) => Answer::Notified {
                        found: false,
                        delivered: 0,
                    },
                }
            }
            Ask::Connections => {
                Answer::Connections(self.connections_here().await.unwrap_or_default())
            }
            Ask::Close { id, code, reason } => {
                // Reasons are the broker's own (a close frame's reason is public).
                let reason = CLOSE_REASONS
                    .iter()
                    .find(|r| **r == reason)
                    .copied()
                    .unwrap_or("closed");
                let close = crate::actors::registry::CloseConnection {
                    id,
                    disconnect: crate::actors::Disconnect { code, reason },
                };
                let found = matches!(self.registry.send(close).await, Ok(Ok(())));
                Answer::Closed { found }
            }
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

    /// Subscribes `subscriber` to the queue `name` (created if a pattern allows),
    /// replaying what it missed after `since` (of `epoch`) in the same step: the handle
    /// that ends it, and the queue's reply (epoch, head, replay). The caller has checked
    /// the reader's grant.
    pub async fn subscribe(
        &self,
        name: &str,
        subscriber: Subscriber,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Result<(Subscription, Subscribed), Error> {
        let handle = self.queue(name).await?;
        let id = subscriber.id;
        let reply = handle
            .addr
            .send(Subscribe {
                subscriber,
                since,
                epoch,
            })
            .await?;
        let sub = Subscription {
            id,
            of: SubscriptionOf::Queue(handle.addr),
        };
        Ok((sub, reply))
    }

    /// Subscribes `subscriber` to every queue whose name starts with `prefix` and that
    /// `grants` allow, now and as they start (WAMP's prefix match), live.
    pub fn subscribe_prefix(
        &self,
        prefix: String,
        grants: Vec<String>,
        subscriber: Subscriber,
    ) -> Subscription {
        let id = subscriber.id;
        self.hub.do_send(SubscribePrefix {
            prefix,
            grants,
            subscriber,
        });
        Subscription {
            id,
            of: SubscriptionOf::Prefix(self.hub.clone()),
        }
    }

    /// Registers a live connection (notifications, admin listing, disconnects); refused
    /// past `max_per_user` connections of its user.
    pub fn register_connection(
        &self,
        info: crate::actors::ConnectionInfo,
        notify: Recipient<Notify>,
        control: Recipient<crate::actors::Disconnect>,
        regrant: Recipient<crate::actors::subscriber::Regrant>,
        max_per_user: usize,
    ) -> impl std::future::Future<Output = Result<(), Error>> + 'static {
        let send = self.registry.send(crate::actors::registry::Register {
            info,
            notify,
            control,
            regrant,
            max_per_user,
        });
        async move { send.await? }
    }

    /// Forgets a connection (it closed).
    pub fn unregister_connection(&self, id: Arc<str>) {
        self.registry
            .do_send(crate::actors::registry::Unregister { id });
    }

    /// Checks a login from `client`. Recent successes are cached; a check is rate
    /// limited per address and per user name, bounded in concurrency, runs argon2 on the
    /// blocking pool, and costs the same for an unknown user (`auth::login`).
    pub async fn authenticate(
        &self,
        user: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<Arc<UserSpec>, Error> {
        let spec = self.settings().users.get(user).cloned();
        if let Some(spec) = &spec {
            if self.credentials.contains(user, password) {
                return Ok(spec.clone());
            }
        }
        let guard = self.logins.read().expect("logins lock").clone();
        let known = spec.as_ref().map(|s| s.name.as_str());
        let admitted = guard.admit(client, known).inspect_err(|_| {
            self.metrics.login_refusals.inc();
        })?;
        let pw = password.to_owned();
        let check = spec.clone();
        let ok = admitted
            .verify(move || match &check {
                Some(s) => s.password.verify(&pw),
                None => {
                    // The same work as for a known user, whatever the outcome.
                    let _ = crate::auth::login::decoy().verify(&pw);
                    false
                }
            })
            .await?;
        match spec {
            Some(spec) if ok => {
                self.credentials.insert(user, password);
                Ok(spec)
            }
            _ => Err(Error::BadLogin),
        }
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
        check_runtime(&current, &runtime).await?;
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

    /// Takes runtime definitions and pg-hooks entities another replica saved (a NATS
    /// cluster): compiled with this replica's config and swapped in like a reload.
    /// What this replica saved itself comes back here too, and changes nothing.
    async fn adopt_state(&self, json: &str) {
        let _guard = self.config_lock.lock().await;
        let theirs = match serde_json::from_str::<PersistedState>(json) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "runtime definitions saved by another replica do not load; keeping these");
                return;
            }
        };
        let current = self.settings();
        let mine = PersistedState {
            runtime: current.runtime.clone(),
            pg_hooks: self.pg_hooks.snapshot(),
        };
        if serde_json::to_string(&mine).ok().as_deref() == Some(json) {
            return;
        }
        if let Err(e) = self.pg_hooks.restore(theirs.pg_hooks) {
            tracing::error!(error = %e, "pg-hooks state saved by another replica does not load");
        }
        let compiled = Settings::compile_with(
            current.config.clone(),
            current.source.clone(),
            theirs.runtime,
        );
        // Errors are logged (and counted) by the reload.
        let _ = self.finish_reload(compiled).await;
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
        new.allow_targets
            .clone_into(&mut self.allowed_targets.write().expect("allowed targets lock"));
        let rate = new.config.limits.login_attempts_per_minute;
        if self.logins.read().expect("logins lock").per_minute() != rate {
            *self.logins.write().expect("logins lock") =
                Arc::new(crate::auth::login::LoginGuard::new(rate));
        }
        self.cron.do_send(SetCrons {
            crons: new.crons.clone(),
        });
        // Live connections re-derive their rights (removed users, narrowed grants).
        self.registry.do_send(crate::actors::registry::RegrantAll {
            settings: new.clone(),
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
        use crate::actors::webhook::{dlq_headers, redrive_headers};
        let handle = self.queue(dlq).await?;
        // Where earlier redrives of this dead-letter queue got to (same epoch only):
        // what they republished is not republished again.
        let key = format!("redrive.{dlq}");
        let epoch = handle.addr.send(crate::actors::Head).await?.epoch;
        let done = self.store.state(&key).await?.and_then(|v| {
            let (e, o) = v.split_once(':')?;
            (e == &*epoch).then(|| o.parse::<u64>().ok()).flatten()
        });
        let since = since.max(done.unwrap_or(0));
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
        let stopped = |n, last, e| Error::RedriveStopped {
            redriven: n,
            offset: last,
            cause: Box::new(e),
        };
        for m in &batch.messages {
            let header = |name: &str| {
                m.headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            if let Some(origin) = header(dlq_headers::QUEUE) {
                let origin = &origin;
                let mut headers = crate::message::without_broker_headers(&m.headers);
                // For the target that gave up only, under the id it was sent with.
                if let Some(target) = header(dlq_headers::TARGET_ID) {
                    headers.push((redrive_headers::FOR_TARGET.into(), target));
                    if let Some(id) = header(dlq_headers::WEBHOOK_ID) {
                        headers.push((redrive_headers::WEBHOOK_ID.into(), id));
                    }
                }
                let message = NewMessage {
                    id: None,
                    content_type: m.content_type.clone(),
                    headers,
                    ..NewMessage::from(m.body.clone())
                };
                let published = self.publish(PublishRequest {
                    queue: origin,
                    publisher: Publisher::Broker,
                    messages: vec![message],
                    deliver_at_ms: None,
                });
                published.await.map_err(|e| stopped(n, last, e))?;
                n += 1;
            }
            last = m.offset;
            // Kept before the next one is republished: a repeated redrive goes on
            // after it (a crash between the two can only republish this one again).
            self.store
                .set_state(&key, format!("{epoch}:{last}"))
                .await
                .map_err(|e| stopped(n, last, e))?;
        }
        if n == 0 {
            return Err(Error::NoDeadLetters {
                queue: dlq.to_owned(),
                since,
            });
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

    /// At shutdown, once the server has stopped: waits (up to `timeout`) until no
    /// message is being dead-lettered, so that what a target gave up on reaches its
    /// dead-letter queue before the process ends. What is still unsettled then is
    /// delivered again after the restart (never lost); how many is logged.
    pub async fn finish_dead_letters(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = crate::actors::webhooks::dead_lettering(&self.webhooks).await;
            if n == 0 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(messages = n, "shutting down with messages not dead-lettered yet; they are delivered again after the restart");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

/// Waits (at most a second) until `queue` on this replica shows offset `offset`: another
/// replica's reader may have seen it a moment before this replica's feed brought it.
async fn catch_up(queue: &QueueHandle, offset: u64) {
    let mut changes = queue.changes.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        changes.borrow_and_update();
        match queue.addr.send(crate::actors::Head).await {
            Ok(h) if h.head < offset => {}
            _ => return,
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Close reasons a replica passes on for another.
const CLOSE_REASONS: &[&str] = &["closed_by_admin"];

/// Answers the other replicas' asks while the broker lives.
fn answer_replicas(broker: std::sync::Weak<Broker>) -> crate::fabric::Responder {
    use futures_util::FutureExt;
    Arc::new(move |ask| {
        let broker = broker.clone();
        async move {
            match broker.upgrade() {
                Some(b) => b.answer(ask).await,
                None => crate::fabric::Answer::Closed { found: false },
            }
        }
        .boxed()
    })
}

/// Adopts the runtime definitions other replicas save, for as long as the broker lives.
async fn follow_state(
    broker: std::sync::Weak<Broker>,
    mut values: futures_util::stream::BoxStream<'static, String>,
) {
    use futures_util::StreamExt;
    while let Some(json) = values.next().await {
        let Some(b) = broker.upgrade() else { return };
        b.adopt_state(&json).await;
    }
}

/// Where a broker keeps its queues and state, and how its replicas share the lead.
struct Backend {
    store: Arc<dyn store::Store>,
    logs: Arc<dyn crate::log::Logs>,
    election: Box<dyn crate::election::Election>,
    /// Whether the lead is the database's active lock (lost: stop serving).
    exclusive: bool,
    /// Whether other replicas share the store and log as equals (a NATS cluster).
    replicated: bool,
    /// How this replica reaches the others' connections (a NATS cluster).
    fabric: Option<Arc<dyn crate::fabric::Fabric>>,
    /// Who delivers each webhook target (a NATS cluster spreads them).
    targets: Option<Arc<dyn crate::election::TargetElections>>,
}

impl Backend {
    /// The backend `storage` names. `lock`: the database's active lock this broker
    /// holds (PostgreSQL); its store writes only while the lock's fence is current.
    async fn open(
        storage: &crate::config::StorageConfig,
        limits: &crate::config::LimitsConfig,
        lock: Option<store::ActiveLock>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        if store::is_nats_url(&storage.url) {
            let n = &storage.nats;
            let options = store::NatsOptions {
                url: storage.url.clone(),
                credentials: n.credentials.clone(),
                ca_file: n.ca_file.clone(),
                replicas: n.replicas,
                prefix: n.prefix.clone(),
                duplicate_window: limits.idempotency_window,
            };
            // Like a database that is not up yet: wait for JetStream (a cluster that
            // is still electing its leader, servers still starting), retrying.
            let mut wait = Duration::from_millis(500);
            let nats = loop {
                match store::NatsStore::connect(&options, metrics.clone()).await {
                    Ok(n) => break Arc::new(n),
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "NATS JetStream is not available yet; waiting");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                }
            };
            let node = crate::random::id();
            let election = nats.lease(node.to_string()).await?;
            let fabric = nats.fabric(node).await?;
            let targets = nats.targets(&fabric).await?;
            return Ok(Backend {
                store: nats.clone(),
                logs: Arc::new(store::JetStreamLogs { store: nats }),
                election: Box::new(election),
                exclusive: false,
                replicated: true,
                fabric: Some(fabric),
                targets: Some(Arc::new(targets)),
            });
        }
        let fence = lock.as_ref().map(store::ActiveLock::fence);
        let exclusive = lock.is_some();
        let election: Box<dyn crate::election::Election> = match lock {
            Some(lock) => Box::new(lock),
            None => Box::new(SingleNode),
        };
        let store = store::open_fenced(&storage.url, metrics, fence).await?;
        Ok(Backend {
            logs: Arc::new(crate::log::StoreLogs(store.clone())),
            store,
            election,
            exclusive,
            replicated: false,
            fabric: None,
            targets: None,
        })
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

/// A live subscription: what a transport holds instead of an actor's address.
/// Dropping it does not end it; [`Subscription::cancel`] does.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    of: SubscriptionOf,
}

#[derive(Debug)]
enum SubscriptionOf {
    Queue(Addr<crate::actors::Queue>),
    Prefix(Addr<Hub>),
}

impl Subscription {
    /// The subscriber's id (what its deliveries carry).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Ends the subscription (its queue, or every queue of a prefix, forgets it).
    pub fn cancel(&self) {
        let id = self.id;
        match &self.of {
            SubscriptionOf::Queue(q) => q.do_send(Unsubscribe { id }),
            SubscriptionOf::Prefix(hub) => hub.do_send(UnsubscribePrefix { id }),
        }
    }
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
