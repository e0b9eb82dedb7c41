//! `Cron`: publishes each entry's body into its queue at every tick of its schedule,
//! while this node is the leader.
//!
//! One timer per entry, armed for the next tick only. A tick that fires late (a stalled
//! process, a new leader) fires once and the next one is computed from the current time:
//! missed ticks never pile up into a backlog, and a tick never fires twice.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::ingress::{Ingress, PublishRequest, Publisher};
use super::leader::LeadershipChanged;
use crate::message::NewMessage;
use crate::metrics::Metrics;
use crate::schedule::CronSpec;
use crate::store::Store;

/// Store key of the last fired tick of every entry.
const TICKS_KEY: &str = "cron_ticks";

/// Replaces the set of entries (load, reload, admin API).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetCrons {
    /// Every entry.
    pub crons: Vec<Arc<CronSpec>>,
}

/// Lists entries with their next run.
#[derive(Message)]
#[rtype(result = "Vec<CronInfo>")]
pub struct ListCrons;

/// What the admin API shows of an entry.
#[derive(Debug, Clone, Serialize)]
pub struct CronInfo {
    /// Name.
    pub name: String,
    /// Target queue.
    pub queue: String,
    /// Schedule.
    pub schedule: String,
    /// Time zone.
    pub timezone: String,
    /// Next run (RFC 3339), while this node is the leader.
    pub next_run: Option<String>,
    /// Last run (RFC 3339).
    pub last_run: Option<String>,
}

struct Entry {
    spec: Arc<CronSpec>,
    timer: Option<SpawnHandle>,
    next: Option<DateTime<Utc>>,
    /// The last tick that fired (scheduling goes on from it).
    last_tick: Option<DateTime<Utc>>,
    /// The last tick whose message the store acknowledged: what is saved, so a tick
    /// whose publish failed fires again after a restart.
    acked_tick: Option<DateTime<Utc>>,
}

/// The scheduler.
pub struct Cron {
    entries: HashMap<String, Entry>,
    leader: bool,
    ingress: Ingress,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
}

impl Cron {
    /// A scheduler publishing through the front door.
    pub(crate) fn new(
        crons: Vec<Arc<CronSpec>>,
        ingress: Ingress,
        metrics: Arc<Metrics>,
        store: Arc<dyn Store>,
    ) -> Self {
        let entries = crons
            .into_iter()
            .map(|spec| {
                let e = Entry {
                    spec,
                    timer: None,
                    next: None,
                    last_tick: None,
                    acked_tick: None,
                };
                (e.spec.config.name.clone(), e)
            })
            .collect();
        Self {
            entries,
            leader: false,
            ingress,
            metrics,
            store,
        }
    }

    /// Saves every entry's last fired tick (a restart fires a missed tick once, never
    /// one that already fired).
    fn save_ticks(&self) {
        let ticks: HashMap<&str, i64> = self
            .entries
            .iter()
            .filter_map(|(n, e)| e.acked_tick.map(|t| (n.as_str(), t.timestamp_millis())))
            .collect();
        let json = serde_json::to_string(&ticks).expect("a map of numbers serializes");
        let save = self.store.set_state(TICKS_KEY, json);
        actix::spawn(async move {
            if let Err(e) = save.await {
                tracing::error!(error = %e, "cannot save cron ticks");
            }
        });
    }

    fn arm(&mut self, ctx: &mut Context<Self>, name: &str) {
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        if let Some(h) = e.timer.take() {
            ctx.cancel_future(h);
        }
        if !self.leader {
            e.next = None;
            return;
        }
        // A tick missed while no node ran it (the last fired one is older than the most
        // recent occurrence) fires once, now; older missed ticks are not replayed.
        if let Some(last) = e.last_tick {
            let now_local = Utc::now().with_timezone(&e.spec.tz);
            let missed = e
                .spec
                .schedule
                .find_previous_occurrence(&now_local, true)
                .ok()
                .map(|t| t.with_timezone(&Utc))
                .filter(|prev| *prev > last);
            if let Some(tick) = missed {
                let name = name.to_owned();
                e.next = Some(tick);
                e.timer = Some(ctx.run_later(std::time::Duration::ZERO, move |act, ctx| {
                    act.fire(ctx, &name, tick)
                }));
                return;
            }
        }
        // Never the tick that already fired, even if the timer woke a little early.
        let from = e.last_tick.map_or(Utc::now(), |t| t.max(Utc::now()));
        let Some(next) = e.spec.next_after(from) else {
            e.next = None;
            return;
        };
        e.next = Some(next);
        self.metrics
            .cron_next_run
            .with_label_values(&[name])
            .set(next.timestamp_millis() as f64 / 1000.0);
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        let name = name.to_owned();
        e.timer = Some(ctx.run_later(wait, move |act, ctx| act.fire(ctx, &name, next)));
    }

    fn fire(&mut self, ctx: &mut Context<Self>, name: &str, tick: DateTime<Utc>) {
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        e.timer = None;
        e.last_tick = Some(tick);
        let spec = e.spec.clone();
        let ingress = self.ingress.clone();
        let content_type = serde_json::from_slice::<serde::de::IgnoredAny>(&spec.body)
            .is_ok()
            .then(|| Arc::from("application/json"));
        let mut headers: Vec<(String, String)> = spec.config.headers.clone().into_iter().collect();
        let content_type = crate::message::content_type_of(&headers).or(content_type);
        headers.push(("x-broker-cron".into(), spec.config.name.clone()));
        let message = NewMessage {
            // The tick's own key: where every replica of a cluster fires it, the log
            // stores it once.
            id: Some(Arc::from(format!(
                "cron.{}.{}",
                spec.config.name,
                tick.timestamp_millis()
            ))),
            audience: None,
            body: spec.body.clone(),
            content_type,
            headers,
        };
        let queue = spec.config.queue.clone();
        let fut = async move {
            ingress
                .publish(PublishRequest {
                    queue: &queue,
                    publisher: Publisher::Broker,
                    messages: vec![message],
                    deliver_at_ms: None,
                })
                .await
        };
        let label = name.to_owned();
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            let outcome = if res.is_ok() { "ok" } else { "error" };
            match res {
                // Counts as fired only now that its message is stored.
                Ok(_) => {
                    if let Some(e) = act.entries.get_mut(&label) {
                        e.acked_tick = e.acked_tick.max(Some(tick));
                    }
                    act.save_ticks();
                }
                Err(e) => tracing::error!(cron = %label, error = %e, "cron publish failed"),
            }
            act.metrics
                .cron_runs
                .with_label_values(&[&label, outcome])
                .inc();
        }));
        self.arm(ctx, name);
    }

    fn arm_all(&mut self, ctx: &mut Context<Self>) {
        let names: Vec<String> = self.entries.keys().cloned().collect();
        for n in names {
            self.arm(ctx, &n);
        }
    }
}

impl Actor for Cron {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Last ticks first: no leadership change is handled before they are known.
        ctx.wait(
            self.store
                .state(TICKS_KEY)
                .into_actor(self)
                .map(|res, act, _| {
                    let ticks: HashMap<String, i64> = match res {
                        Ok(Some(json)) => serde_json::from_str(&json).unwrap_or_default(),
                        Ok(None) => HashMap::new(),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot load cron ticks");
                            HashMap::new()
                        }
                    };
                    for (name, ms) in ticks {
                        if let Some(e) = act.entries.get_mut(&name) {
                            e.last_tick = DateTime::from_timestamp_millis(ms);
                            e.acked_tick = e.last_tick;
                        }
                    }
                }),
        );
    }
}

impl Handler<LeadershipChanged> for Cron {
    type Result = ();

    fn handle(&mut self, msg: LeadershipChanged, ctx: &mut Self::Context) {
        self.leader = msg.leader;
        self.arm_all(ctx);
    }
}

impl Handler<SetCrons> for Cron {
    type Result = ();

    fn handle(&mut self, msg: SetCrons, ctx: &mut Self::Context) {
        let mut old = std::mem::take(&mut self.entries);
        for spec in msg.crons {
            let name = spec.config.name.clone();
            let entry = match old.remove(&name) {
                // Unchanged: keep its timer and last tick.
                Some(e) if e.spec.config == spec.config => e,
                Some(mut e) => {
                    if let Some(h) = e.timer.take() {
                        ctx.cancel_future(h);
                    }
                    Entry {
                        spec,
                        timer: None,
                        next: None,
                        last_tick: e.last_tick,
                        acked_tick: e.acked_tick,
                    }
                }
                None => Entry {
                    spec,
                    timer: None,
                    next: None,
                    last_tick: None,
                    acked_tick: None,
                },
            };
            let armed = entry.timer.is_some();
            self.entries.insert(name.clone(), entry);
            if !armed {
                self.arm(ctx, &name);
            }
        }
        for (name, mut e) in old {
            if let Some(h) = e.timer.take() {
                ctx.cancel_future(h);
            }
            let _ = self.metrics.cron_next_run.remove_label_values(&[&name]);
        }
    }
}

impl Handler<ListCrons> for Cron {
    type Result = MessageResult<ListCrons>;

    fn handle(&mut self, _: ListCrons, _: &mut Self::Context) -> Self::Result {
        let fmt = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut v: Vec<CronInfo> = self
            .entries
            .values()
            .map(|e| CronInfo {
                name: e.spec.config.name.clone(),
                queue: e.spec.config.queue.clone(),
                schedule: e.spec.config.schedule.clone(),
                timezone: e.spec.tz.name().to_owned(),
                next_run: e.next.as_ref().map(fmt),
                last_run: e.last_tick.as_ref().map(fmt),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        MessageResult(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::hub::{GetQueue, Hub};
    use crate::actors::leader::testing::{elect, Manual};
    use crate::actors::leader::{Follow, Leader};
    use crate::actors::queue::Read;
    use crate::config::parse;
    use crate::settings::Settings;
    use std::time::Duration;

    const CONFIG: &str = "[[queues]]\nname = \"ticks\"\n[[crons]]\nname = \"every-second\"\nqueue = \"ticks\"\nschedule = \"* * * * * *\"\nbody = \"{}\"\n";

    async fn head(hub: &Addr<Hub>) -> Vec<i64> {
        let q = hub
            .send(GetQueue {
                name: "ticks".into(),
            })
            .await
            .unwrap()
            .unwrap();
        let b = q
            .addr
            .send(Read {
                since: 0,
                epoch: None,
                limit: 100,
            })
            .await
            .unwrap()
            .unwrap();
        b.messages.iter().map(|m| m.received_at_ms).collect()
    }

    /// A hub, a leader and a store for a config; schedulers are started on demand.
    struct Harness {
        settings: Arc<Settings>,
        metrics: Arc<Metrics>,
        store: Arc<dyn Store>,
        leader: Addr<Leader>,
        hub: Addr<Hub>,
        ingress: Ingress,
        _arbiter: Arbiter,
    }

    impl Harness {
        async fn new(
            config: &str,
            election: Box<dyn crate::actors::leader::Election>,
            ticks: Option<String>,
        ) -> Self {
            let (cfg, src) = parse(None, config, Vec::<(String, String)>::new()).unwrap();
            let settings = Arc::new(Settings::compile(cfg, src).unwrap());
            let metrics = Arc::new(Metrics::new());
            let store = crate::store::open("memory://", metrics.clone())
                .await
                .unwrap();
            if let Some(t) = ticks {
                store.set_state(TICKS_KEY, t).await.unwrap();
            }
            let leader = Leader::new(election, metrics.clone()).start();
            let arbiter = Arbiter::new();
            let launched = crate::actors::launch_for_tests(
                settings.clone(),
                store.clone(),
                metrics.clone(),
                leader.clone(),
                arbiter.handle(),
            );
            let (hub, ingress) = (launched.hub, launched.ingress);
            Harness {
                settings,
                metrics,
                store,
                leader,
                hub,
                ingress,
                _arbiter: arbiter,
            }
        }

        /// A scheduler following the leader, as after a start or a restart.
        async fn start_cron(&self) -> Addr<Cron> {
            let crons = self.settings.crons.clone();
            let cron = Cron::new(
                crons,
                self.ingress.clone(),
                self.metrics.clone(),
                self.store.clone(),
            )
            .start();
            let recipient = cron.clone().recipient();
            self.leader.send(Follow { recipient }).await.unwrap();
            cron
        }
    }

    /// A tick counts as fired only once its message is stored: a refused publish is not
    /// recorded, so after a restart that tick fires again.
    #[actix::test]
    async fn a_tick_whose_publish_is_refused_is_not_recorded() {
        const REFUSING: &str = "[[queues]]\nname = \"ticks\"\nmax_message_size = 1\n[[crons]]\nname = \"every-second\"\nqueue = \"ticks\"\nschedule = \"* * * * * *\"\nbody = \"{}\"\n";
        let hook = Arc::new(std::sync::Mutex::new(None));
        let h = Harness::new(REFUSING, Box::new(Manual(hook.clone())), None).await;
        let _cron = h.start_cron().await;
        elect(&hook, true);
        let failed = h
            .metrics
            .cron_runs
            .with_label_values(&["every-second", "error"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while failed.get() < 2 {
            assert!(std::time::Instant::now() < deadline, "the cron never ran");
            actix::clock::sleep(Duration::from_millis(20)).await;
        }
        // The store is written in order: a barrier write is committed after any save.
        h.store.set_state("barrier", String::new()).await.unwrap();
        let saved = h.store.state(TICKS_KEY).await.unwrap();
        assert!(
            saved.as_deref().is_none_or(|j| !j.contains("every-second")),
            "a refused tick was recorded: {saved:?}"
        );
    }

    #[actix::test]
    async fn fires_every_tick_only_while_leader() {
        let hook = Arc::new(std::sync::Mutex::new(None));
        let h = Harness::new(CONFIG, Box::new(Manual(hook.clone())), None).await;
        let (hub, leader, metrics) = (h.hub.clone(), h.leader.clone(), h.metrics.clone());
        let cron = h.start_cron().await;

        // A follower never fires (an absence: observed over 1.5 ticks).
        actix::clock::sleep(Duration::from_millis(1500)).await;
        assert!(head(&hub).await.is_empty());
        assert_eq!(cron.send(ListCrons).await.unwrap()[0].next_run, None);

        elect(&hook, true);
        let q = hub
            .send(GetQueue {
                name: "ticks".into(),
            })
            .await
            .unwrap()
            .unwrap();
        let mut changes = q.changes.clone();
        while head(&hub).await.len() < 3 {
            tokio::time::timeout(Duration::from_secs(5), changes.changed())
                .await
                .unwrap()
                .unwrap();
        }
        let ticks = head(&hub).await;
        for pair in ticks.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                (900..=1100).contains(&gap),
                "one run per tick, a second apart: {ticks:?}"
            );
        }
        assert!(cron.send(ListCrons).await.unwrap()[0].next_run.is_some());

        elect(&hook, false);
        let _ = leader.send(crate::actors::leader::IsLeader).await; // change delivered (FIFO)
        let _ = cron.send(ListCrons).await;
        let before = head(&hub).await.len();
        actix::clock::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            head(&hub).await.len(),
            before,
            "no run after losing leadership"
        );
        assert_eq!(
            metrics
                .cron_runs
                .with_label_values(&["every-second", "ok"])
                .get() as usize,
            before
        );
    }

    #[actix::test]
    async fn a_missed_tick_fires_once_after_a_restart_and_never_twice() {
        use chrono::Timelike;
        // Keep clear of a minute boundary during the test.
        let sec = Utc::now().second();
        if sec >= 55 {
            actix::clock::sleep(Duration::from_secs(61 - u64::from(sec))).await;
        }
        const EVERY_MINUTE: &str = "[[queues]]\nname = \"ticks\"\n[[crons]]\nname = \"every-minute\"\nqueue = \"ticks\"\nschedule = \"* * * * *\"\n";
        // The last run was three minutes ago: three ticks were missed.
        let three_min_ago = (Utc::now() - chrono::Duration::minutes(3))
            .with_second(0)
            .unwrap();
        let ticks = format!("{{\"every-minute\":{}}}", three_min_ago.timestamp_millis());
        let single = Box::new(crate::actors::leader::SingleNode);
        let h = Harness::new(EVERY_MINUTE, single, Some(ticks)).await;
        let hub = h.hub.clone();
        let q = hub
            .send(GetQueue {
                name: "ticks".into(),
            })
            .await
            .unwrap()
            .unwrap();
        let mut changes = q.changes.clone();

        let first = h.start_cron().await;
        while head(&hub).await.is_empty() {
            tokio::time::timeout(Duration::from_secs(5), changes.changed())
                .await
                .unwrap()
                .unwrap();
        }
        let this_minute = Utc::now()
            .with_second(0)
            .unwrap()
            .with_nanosecond(0)
            .unwrap();
        let listed = first.send(ListCrons).await.unwrap();
        assert_eq!(
            listed[0].last_run.as_deref(),
            Some(
                this_minute
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                    .as_str()
            )
        );
        actix::clock::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            head(&hub).await.len(),
            1,
            "the missed ticks fire once, not three times"
        );

        // A restart (a new scheduler on the same store) does not fire that tick again.
        first.send(SetCrons { crons: vec![] }).await.unwrap();
        let second = h.start_cron().await;
        let _ = second.send(ListCrons).await; // leadership handled (FIFO)
        actix::clock::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            head(&hub).await.len(),
            1,
            "a tick that fired never fires twice"
        );
        assert!(second.send(ListCrons).await.unwrap()[0].next_run.is_some());
    }
}
