//! `Hub`: owns the name → queue map and the registry of poll consumers.
//!
//! Queues named in the config are started with the hub (so their metrics exist from the
//! start); a name matching a configured `prefix.*` pattern gets its queue on first use.
//! A poll consumer is registered here by (user, client) → queue name, while its cursor
//! lives in the queue. A reload keeps queue contents, applies new limits, stops removed
//! queues, and puts consumers of removed queues or revoked grants into the
//! "disconnected" state that webhook-queue documents.
//! Prefix subscriptions (WAMP's `match: "prefix"`) are kept here too: the hub registers
//! the subscriber with every running queue whose name starts with the prefix (and that
//! the subscriber may read), and with each such queue that starts later.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use actix::prelude::*;
use tokio::sync::watch;

use super::leader::{Follow, LeadershipChanged};
use super::queue::{
    AddConsumer, ConsumerKey, IsIdle, Queue, QueueHandle, Reconfigure, RemoveConsumer, Subscribe,
    Unsubscribe,
};
use super::subscriber::Subscriber;
use crate::error::{Error, Rejection};
use crate::metrics::Metrics;
use crate::settings::{QueueSpec, Settings};
use crate::store::Store;

const QUEUE_REMOVED: &str = "A reload has removed that queue";
const GRANT_REVOKED: &str = "A reload has caused that queue to no longer be available to you";

/// Looks a queue up, creating it if its name is configured or matches a pattern.
#[derive(Message)]
#[rtype(result = "Result<QueueHandle, Error>")]
pub struct GetQueue {
    /// Queue name.
    pub name: String,
}

/// Registers a poll consumer on a queue.
#[derive(Message)]
#[rtype(result = "Result<(), Error>")]
pub struct Listen {
    /// The consumer.
    pub key: ConsumerKey,
    /// The queue to read.
    pub queue: String,
    /// `true` (webhook-queue's `/listen`): an existing, connected consumer is an error.
    /// `false` (`PUT /v1/consumers`): the same queue again is a no-op.
    pub exclusive: bool,
}

/// Removes a poll consumer.
#[derive(Message)]
#[rtype(result = "Result<(), Error>")]
pub struct Unlisten {
    /// The consumer.
    pub key: ConsumerKey,
}

/// Finds the queue of a poll consumer.
#[derive(Message)]
#[rtype(result = "Result<QueueHandle, Error>")]
pub struct ResolveConsumer {
    /// The consumer.
    pub key: ConsumerKey,
}

/// Subscribes to every queue whose name starts with `prefix` and that `grants` cover,
/// running now or started later, live (no replay).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubscribePrefix {
    /// The name prefix.
    pub prefix: String,
    /// Queues (and patterns) the subscriber may read.
    pub grants: Vec<String>,
    /// The subscriber, registered with each queue under its one id.
    pub subscriber: Subscriber,
}

/// Ends a prefix subscription.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UnsubscribePrefix {
    /// The subscriber's id.
    pub id: u64,
}

struct PrefixSub {
    prefix: String,
    grants: Vec<String>,
    subscriber: Subscriber,
}

impl PrefixSub {
    fn covers(&self, name: &str) -> bool {
        name.starts_with(&self.prefix) && crate::settings::grants(&self.grants, name)
    }

    fn attach(&self, queue: &Addr<Queue>) {
        queue.do_send(Subscribe {
            subscriber: self.subscriber.clone(),
            since: None,
            epoch: None,
        });
    }
}

/// Sent to the webhook supervisor: make the targets of a queue match its spec (`None`:
/// the queue is gone, stop them).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SyncTargets {
    /// The queue.
    pub queue: QueueHandle,
    /// Its spec now.
    pub spec: Option<Arc<QueueSpec>>,
    /// The queue has just started: its new targets deliver everything published since
    /// (not only what comes after they are running).
    pub started: bool,
}

/// Swaps in reloaded settings.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ApplySettings {
    /// The new settings.
    pub settings: Arc<Settings>,
}

struct ConsumerEntry {
    queue: String,
    disconnected: Option<&'static str>,
}

/// The queue registry.
pub struct Hub {
    settings: Arc<Settings>,
    store: Arc<dyn Store>,
    /// Where each queue's log is kept.
    logs: Arc<dyn crate::log::Logs>,
    metrics: Arc<Metrics>,
    queues: HashMap<String, QueueHandle>,
    /// The same queues, as the front door reads them (see [`Queues`]).
    running: Running,
    consumers: HashMap<ConsumerKey, ConsumerEntry>,
    /// Leadership, which queues follow (delayed releases) through the hub.
    leader: Addr<super::Leader>,
    /// The webhook supervisor, told when a queue with targets starts or changes.
    webhooks: Recipient<SyncTargets>,
    /// Prefix subscriptions by subscriber id.
    prefix_subs: HashMap<u64, PrefixSub>,
    /// Pattern queues found idle, since when.
    idle_since: HashMap<String, std::time::Instant>,
    /// Whether this node leads (queues release delayed messages only then).
    leading: bool,
}

/// The running queues by name, shared by the `Hub` (which writes it) and the front door.
pub(crate) type Running = Arc<RwLock<HashMap<Arc<str>, QueueHandle>>>;

/// The queues as the front door reaches them (cloneable): a running queue is looked up
/// here, so a publish to it is one mailbox round trip (to the queue); the `Hub` is asked
/// only for a queue it has yet to start (or to refuse).
#[derive(Clone)]
pub(crate) struct Queues {
    running: Running,
    hub: Addr<Hub>,
}

impl Queues {
    /// The queue `name`, created on first use if configured or matching a pattern.
    pub(crate) async fn get(&self, name: &str) -> Result<QueueHandle, Error> {
        let running = self.running.read().expect("queues lock").get(name).cloned();
        match running {
            Some(h) if h.addr.connected() => Ok(h),
            _ => {
                let name = name.to_owned();
                self.hub.send(GetQueue { name }).await?
            }
        }
    }
}

impl Queues {
    /// The queues of the hub at `hub`, as it publishes them in `running`.
    pub(crate) fn new(running: Running, hub: Addr<Hub>) -> Self {
        Self { running, hub }
    }
}

impl Hub {
    /// A hub over `store` and `logs` with the initial `settings`: it publishes its running queues
    /// in `running`, follows `leader` (and passes leadership on to its queues), and tells
    /// `webhooks` of each queue with targets that it starts or that a reload changes.
    pub(crate) fn new(
        settings: Arc<Settings>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        running: Running,
        leader: Addr<super::Leader>,
        webhooks: Recipient<SyncTargets>,
        logs: Arc<dyn crate::log::Logs>,
    ) -> Self {
        Self {
            settings,
            logs,
            store,
            metrics,
            queues: HashMap::new(),
            running,
            consumers: HashMap::new(),
            leader,
            webhooks,
            prefix_subs: HashMap::new(),
            idle_since: HashMap::new(),
            leading: false,
        }
    }

    /// Forgets a queue (dropping its last address stops the actor; readers in flight
    /// keep it until they are done).
    fn forget_queue(&mut self, name: &str) {
        self.queues.remove(name);
        self.running.write().expect("queues lock").remove(name);
        self.metrics.queues.set(self.queues.len() as i64);
    }

    /// Tells the webhook supervisor the spec of a running queue (`None`: removed).
    fn sync_webhooks(&self, handle: &QueueHandle, spec: Option<Arc<QueueSpec>>, started: bool) {
        // One message per queue started or reload: bounded by `limits.max_queues`.
        self.webhooks.do_send(SyncTargets {
            queue: handle.clone(),
            spec,
            started,
        });
    }

    fn queue(&mut self, name: &str) -> Result<QueueHandle, Error> {
        if let Some(h) = self.queues.get(name) {
            if h.addr.connected() {
                return Ok(h.clone());
            }
        }
        let spec = self
            .settings
            .queue(name)
            .ok_or_else(|| Error::UnknownQueue {
                queue: name.to_owned(),
            })?
            .clone();
        if spec.name != name {
            self.check_caps(&spec)?;
        }
        let name: Arc<str> = Arc::from(name);
        let (tx, rx) = watch::channel(0);
        let log = self.logs.log(&name, &spec);
        let addr = Queue::new(
            name.clone(),
            spec,
            log,
            self.store.clone(),
            self.metrics.clone(),
            tx,
            self.leading,
        )
        .start();
        let handle = QueueHandle {
            name: name.clone(),
            addr,
            changes: rx,
        };
        self.queues.insert(name.to_string(), handle.clone());
        (self.running.write().expect("queues lock")).insert(name.clone(), handle.clone());
        self.metrics.queues.set(self.queues.len() as i64);
        for sub in self.prefix_subs.values().filter(|s| s.covers(&name)) {
            sub.attach(&handle.addr);
        }
        Ok(handle)
    }

    /// Whether another queue may be created from pattern `spec`: under `limits.max_queues`
    /// live queues in all, and under the pattern's own `max_queues`.
    fn check_caps(&mut self, spec: &QueueSpec) -> Result<(), Error> {
        let stopped: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, h)| !h.addr.connected())
            .map(|(n, _)| n.clone())
            .collect();
        for name in stopped {
            self.forget_queue(&name);
        }
        let max = self.settings.config.limits.max_queues;
        if self.queues.len() >= max {
            return Err(Error::rejected(
                Rejection::TooManyQueues,
                format!("the broker holds {max} queues already (limits.max_queues)"),
            ));
        }
        if let Some(max) = spec.config.max_queues {
            let settings = &self.settings;
            let of_pattern = self
                .queues
                .keys()
                .filter(|n| settings.queue(n).is_some_and(|s| s.name == spec.name))
                .count();
            if of_pattern >= max {
                return Err(Error::rejected(
                    Rejection::TooManyQueues,
                    format!(
                        "pattern `{}` has {max} queues already (max_queues)",
                        spec.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Stops and forgets queues created from patterns that have held nothing for
    /// `limits.idle_queue_timeout` (asked of each such queue; first seen idle noted here).
    fn sweep_idle(&mut self, ctx: &mut Context<Self>) {
        let timeout = self.settings.config.limits.idle_queue_timeout;
        if timeout.is_zero() {
            return;
        }
        let settings = self.settings.clone();
        let candidates: Vec<(String, Addr<Queue>)> = self
            .queues
            .iter()
            .filter(|(n, h)| {
                h.addr.connected()
                    && settings
                        .queue(n)
                        .is_some_and(|s| s.name != n.as_str() && s.webhooks.is_empty())
            })
            .map(|(n, h)| (n.clone(), h.addr.clone()))
            .collect();
        for (name, addr) in candidates {
            ctx.spawn(addr.send(IsIdle).into_actor(self).map(move |res, act, _| {
                if res != Ok(true) {
                    act.idle_since.remove(&name);
                    return;
                }
                let since = *act
                    .idle_since
                    .entry(name.clone())
                    .or_insert_with(std::time::Instant::now);
                if since.elapsed() >= timeout {
                    act.idle_since.remove(&name);
                    act.forget_queue(&name);
                    act.store.remove(&name);
                    tracing::debug!(queue = %name, "idle queue forgotten");
                }
            }));
        }
    }

    /// [`Hub::queue`], starting the webhooks of a queue it creates.
    fn queue_with_webhooks(&mut self, name: &str) -> Result<QueueHandle, Error> {
        let existed = self.queues.get(name).is_some_and(|h| h.addr.connected());
        let h = self.queue(name)?;
        if !existed {
            if let Some(spec) = self.settings.queue(name).filter(|s| !s.webhooks.is_empty()) {
                self.sync_webhooks(&h, Some(spec.clone()), true);
            }
        }
        Ok(h)
    }

    /// Forgets a consumer, through its queue when that runs (so that a read in flight
    /// cannot write its position back afterwards), else in the store directly.
    fn forget_consumer(&self, key: ConsumerKey, queue: &str) {
        match self.queues.get(queue).filter(|h| h.addr.connected()) {
            Some(h) => h.addr.do_send(RemoveConsumer { key, forget: true }),
            None => self.store.remove_consumer(&key.user, &key.client),
        }
    }

    /// Forgets a consumer here, not in the store.
    fn drop_consumer(&mut self, key: &ConsumerKey) {
        if let Some(old) = self.consumers.remove(key) {
            if let Some(h) = self.queues.get(&old.queue) {
                h.addr.do_send(RemoveConsumer {
                    key: key.clone(),
                    forget: false,
                });
            }
        }
    }

    /// Brings back the poll consumers kept in the store (after a restart).
    fn restore_consumers(&mut self, stored: Vec<crate::store::StoredConsumer>) {
        for c in stored {
            let key = ConsumerKey {
                user: c.user.clone(),
                client: c.client.clone(),
            };
            let Some(user) = self.settings.users.get(&c.user).cloned() else {
                self.store.remove_consumer(&c.user, &c.client); // the user is gone
                continue;
            };
            let disconnected = match self.queue_with_webhooks(&c.queue) {
                Err(_) => Some(QUEUE_REMOVED),
                Ok(h) => {
                    h.addr.do_send(AddConsumer {
                        key: key.clone(),
                        last_seen: Some(c.last_seen),
                    });
                    (!user.may_read(&c.queue)).then_some(GRANT_REVOKED)
                }
            };
            self.consumers.insert(
                key,
                ConsumerEntry {
                    queue: c.queue,
                    disconnected,
                },
            );
        }
    }

    fn start_named_queues(&mut self) {
        let names: Vec<String> = self
            .settings
            .named_queues()
            .map(|q| q.name.clone())
            .collect();
        for n in names {
            let _ = self.queue_with_webhooks(&n);
        }
    }
}

impl Actor for Hub {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        self.leader.do_send(Follow {
            recipient: ctx.address().recipient(),
        });
        self.start_named_queues();
        // A quarter of the idle timeout (read at each sweep), between 1 s and 1 min.
        let every = (self.settings.config.limits.idle_queue_timeout / 4).clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        );
        ctx.run_interval(every, |act, ctx| act.sweep_idle(ctx));
        // Nothing is handled before the stored consumers are back.
        ctx.wait(
            self.store
                .consumers()
                .into_actor(self)
                .map(|res, act, _| match res {
                    Ok(stored) => act.restore_consumers(stored),
                    Err(e) => tracing::error!(error = %e, "cannot load the poll consumers"),
                }),
        );
    }
}

/// Passed on to every queue (and given to each new one).
impl Handler<LeadershipChanged> for Hub {
    type Result = ();

    fn handle(&mut self, msg: LeadershipChanged, _: &mut Self::Context) {
        self.leading = msg.leader;
        for q in self.queues.values() {
            q.addr.do_send(msg);
        }
    }
}

impl Handler<GetQueue> for Hub {
    type Result = Result<QueueHandle, Error>;

    fn handle(&mut self, msg: GetQueue, _: &mut Self::Context) -> Self::Result {
        self.queue_with_webhooks(&msg.name)
    }
}

impl Handler<Listen> for Hub {
    type Result = Result<(), Error>;

    fn handle(&mut self, msg: Listen, _: &mut Self::Context) -> Self::Result {
        if let Some(existing) = self.consumers.get(&msg.key) {
            if existing.disconnected.is_none() {
                if !msg.exclusive && existing.queue == msg.queue {
                    return Ok(());
                }
                return Err(Error::ClientExists {
                    client: msg.key.client,
                    queue: existing.queue.clone(),
                });
            }
        }
        let handle = self.queue_with_webhooks(&msg.queue)?;
        if let Some(old) = self.consumers.remove(&msg.key) {
            if let Some(h) = self.queues.get(&old.queue) {
                // Moved, not forgotten: the new queue writes its stored position.
                h.addr.do_send(RemoveConsumer {
                    key: msg.key.clone(),
                    forget: false,
                });
            }
        }
        // Mailboxes are FIFO: a read sent after this reply finds the consumer in place.
        handle.addr.do_send(AddConsumer {
            key: msg.key.clone(),
            last_seen: None,
        });
        self.consumers.insert(
            msg.key,
            ConsumerEntry {
                queue: msg.queue,
                disconnected: None,
            },
        );
        Ok(())
    }
}

/// Takes a consumer as the shared store has it (replicas sharing a NATS store): known
/// on this queue, its position moves there; otherwise it is registered (moved from
/// another queue if need be).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AdoptConsumer {
    /// The consumer as stored.
    pub stored: crate::store::StoredConsumer,
}

impl Handler<AdoptConsumer> for Hub {
    type Result = ();

    fn handle(&mut self, msg: AdoptConsumer, _: &mut Self::Context) {
        let c = msg.stored;
        let key = ConsumerKey {
            user: c.user.clone(),
            client: c.client.clone(),
        };
        if let Some(e) = self.consumers.get(&key) {
            if e.queue == c.queue && e.disconnected.is_none() {
                if let Some(h) = self.queues.get(&c.queue).filter(|h| h.addr.connected()) {
                    h.addr.do_send(super::queue::SyncConsumer {
                        key,
                        last_seen: c.last_seen,
                    });
                    return;
                }
            }
        }
        self.drop_consumer(&key);
        self.restore_consumers(vec![c]);
    }
}

/// Forgets a consumer here only (another replica removed it from the shared store).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DropConsumer {
    /// The consumer.
    pub key: ConsumerKey,
}

impl Handler<DropConsumer> for Hub {
    type Result = ();

    fn handle(&mut self, msg: DropConsumer, _: &mut Self::Context) {
        self.drop_consumer(&msg.key);
    }
}

impl Handler<Unlisten> for Hub {
    type Result = Result<(), Error>;

    fn handle(&mut self, msg: Unlisten, _: &mut Self::Context) -> Self::Result {
        let entry = self
            .consumers
            .remove(&msg.key)
            .ok_or_else(|| Error::ClientNotFound {
                client: msg.key.client.clone(),
            })?;
        self.forget_consumer(msg.key, &entry.queue);
        Ok(())
    }
}

impl Handler<ResolveConsumer> for Hub {
    type Result = Result<QueueHandle, Error>;

    fn handle(&mut self, msg: ResolveConsumer, _: &mut Self::Context) -> Self::Result {
        let entry = self
            .consumers
            .get(&msg.key)
            .ok_or_else(|| Error::ClientNotFound {
                client: msg.key.client.clone(),
            })?;
        if let Some(reason) = entry.disconnected {
            return Err(Error::ClientDisconnected {
                client: msg.key.client,
                reason: reason.to_owned(),
            });
        }
        let queue = entry.queue.clone();
        self.queue_with_webhooks(&queue)
            .map_err(|_| Error::ClientDisconnected {
                client: msg.key.client,
                reason: QUEUE_REMOVED.to_owned(),
            })
    }
}

impl Handler<SubscribePrefix> for Hub {
    type Result = ();

    fn handle(&mut self, msg: SubscribePrefix, _: &mut Self::Context) {
        let sub = PrefixSub {
            prefix: msg.prefix,
            grants: msg.grants,
            subscriber: msg.subscriber,
        };
        for (name, handle) in &self.queues {
            if handle.addr.connected() && sub.covers(name) {
                sub.attach(&handle.addr);
            }
        }
        self.prefix_subs.insert(sub.subscriber.id, sub);
    }
}

impl Handler<UnsubscribePrefix> for Hub {
    type Result = ();

    fn handle(&mut self, msg: UnsubscribePrefix, _: &mut Self::Context) {
        let Some(sub) = self.prefix_subs.remove(&msg.id) else {
            return;
        };
        for (name, handle) in &self.queues {
            if sub.covers(name) {
                handle.addr.do_send(Unsubscribe { id: msg.id });
            }
        }
    }
}

impl Handler<ApplySettings> for Hub {
    type Result = ();

    fn handle(&mut self, msg: ApplySettings, _: &mut Self::Context) {
        self.settings = msg.settings;
        let mut removed = Vec::new();
        for (name, handle) in &self.queues {
            match self.settings.queue(name) {
                Some(spec) => handle.addr.do_send(Reconfigure { spec: spec.clone() }),
                None => removed.push(name.clone()),
            }
        }
        for name in &removed {
            if let Some(h) = self.queues.get(name) {
                self.sync_webhooks(h, None, false);
            }
            self.forget_queue(name);
            self.store.remove(name);
        }
        for (name, h) in &self.queues {
            self.sync_webhooks(h, self.settings.queue(name).cloned(), false);
        }
        self.start_named_queues();
        let settings = self.settings.clone();
        let gone: Vec<(ConsumerKey, String)> = self
            .consumers
            .iter()
            .filter(|(k, _)| !settings.users.contains_key(&k.user))
            .map(|(k, e)| (k.clone(), e.queue.clone()))
            .collect();
        for (key, queue) in gone {
            // The user is gone, and with it its clients.
            self.consumers.remove(&key);
            self.forget_consumer(key, &queue);
        }
        self.consumers.retain(|key, entry| {
            let Some(user) = settings.users.get(&key.user) else {
                return false;
            };
            if entry.disconnected.is_none() {
                if settings.queue(&entry.queue).is_none() {
                    entry.disconnected = Some(QUEUE_REMOVED);
                } else if !user.may_read(&entry.queue) {
                    entry.disconnected = Some(GRANT_REVOKED);
                }
            }
            true
        });
    }
}
