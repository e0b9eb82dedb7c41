//! `Webhooks`: supervises the webhook targets — one `Webhook` actor per (queue, target),
//! started when the `Hub` starts a queue with targets, retargeted or stopped when a
//! reload changes them, on an arbiter of their own (away from the HTTP workers). Each
//! target follows the `Leader` (dispatch happens once across replicas) and publishes its
//! dead letters through the front door it is given.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use super::hub::SyncTargets;
use super::ingress::Ingress;
use super::leader::{Follow, Leader};
use super::queue::QueueHandle;
use super::webhook::{GetStatus, Retarget, StopWebhook, Webhook, WebhookStatus};
use crate::delivery::WebhookSpec;
use crate::metrics::Metrics;
use crate::store::Store;

/// What webhook deliveries need from the broker.
#[derive(Clone)]
pub struct Deliveries {
    /// Leadership, which webhooks follow (unless `targets` decides per target).
    pub leader: Addr<Leader>,
    /// Who delivers each target, where that is decided per target (a cluster).
    pub targets: Option<Arc<dyn crate::election::TargetElections>>,
    /// The outbound HTTP client (pooled, rustls, no redirects) of config-file targets.
    pub client: reqwest::Client,
    /// The client of targets defined at runtime: it also refuses internal addresses
    /// (`delivery::GuardedResolver`).
    pub guarded: reqwest::Client,
    /// The arbiter webhook actors run on, away from the HTTP workers.
    pub arbiter: ArbiterHandle,
}

#[cfg(test)]
impl Deliveries {
    /// Deliveries for a test.
    pub(crate) fn for_tests(leader: Addr<Leader>, arbiter: ArbiterHandle) -> Self {
        Deliveries {
            leader,
            targets: None,
            client: reqwest::Client::new(),
            guarded: reqwest::Client::new(),
            arbiter,
        }
    }
}

/// The targets of a queue.
#[derive(Message)]
#[rtype(result = "Vec<Addr<Webhook>>")]
struct QueueTargets {
    name: String,
}

/// A running target: its spec and its actor.
type Target = (Arc<WebhookSpec>, Addr<Webhook>);

/// The supervisor.
pub struct Webhooks {
    deliveries: Deliveries,
    ingress: Ingress,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// Running targets by queue.
    targets: HashMap<String, Vec<Target>>,
}

impl Webhooks {
    /// A supervisor starting targets that publish dead letters through `ingress`.
    pub(crate) fn new(
        deliveries: Deliveries,
        ingress: Ingress,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            deliveries,
            ingress,
            store,
            metrics,
            targets: HashMap::new(),
        }
    }

    fn start_target(
        &self,
        queue: &QueueHandle,
        label: &str,
        spec: Arc<WebhookSpec>,
        runtime: bool,
        from_queue_start: bool,
    ) -> Addr<Webhook> {
        let client = if runtime {
            &self.deliveries.guarded
        } else {
            &self.deliveries.client
        };
        let spec_url = spec.url.to_string();
        let w = Webhook::new(
            queue.clone(),
            from_queue_start,
            label.to_owned(),
            spec,
            self.ingress.clone(),
            client.clone(),
            self.metrics.clone(),
            self.store.clone(),
        );
        let key = format!("{}\n{}", queue.name, spec_url);
        let addr = Webhook::start_in_arbiter(&self.deliveries.arbiter, move |_| w);
        match &self.deliveries.targets {
            Some(targets) => targets.follow(key, addr.clone().recipient()),
            None => self.deliveries.leader.do_send(Follow {
                recipient: addr.clone().recipient(),
            }),
        }
        addr
    }
}

impl Actor for Webhooks {
    type Context = Context<Self>;
}

impl Handler<SyncTargets> for Webhooks {
    type Result = ();

    fn handle(&mut self, msg: SyncTargets, _: &mut Self::Context) {
        let name = msg.queue.name.to_string();
        let wanted = msg
            .spec
            .as_ref()
            .map(|s| s.webhooks.clone())
            .unwrap_or_default();
        let label = msg.spec.as_ref().map_or(&*name, |s| s.label()).to_owned();
        let runtime = msg.spec.as_ref().is_some_and(|s| s.runtime);
        let mut old = self.targets.remove(&name).unwrap_or_default();
        let mut now = Vec::new();
        for w in wanted {
            match old.iter().position(|(o, _)| o.config.url == w.config.url) {
                Some(pos) => {
                    let (o, addr) = old.remove(pos);
                    if o.config != w.config {
                        addr.do_send(Retarget { spec: w.clone() });
                    }
                    now.push((w, addr));
                }
                None => {
                    let addr =
                        self.start_target(&msg.queue, &label, w.clone(), runtime, msg.started);
                    now.push((w, addr));
                }
            }
        }
        for (_, addr) in old {
            addr.do_send(StopWebhook);
        }
        if !now.is_empty() {
            self.targets.insert(name, now);
        }
    }
}

impl Handler<QueueTargets> for Webhooks {
    type Result = MessageResult<QueueTargets>;

    fn handle(&mut self, msg: QueueTargets, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.targets
                .get(&msg.name)
                .map(|v| v.iter().map(|(_, a)| a.clone()).collect())
                .unwrap_or_default(),
        )
    }
}

/// Every running target.
#[derive(Message)]
#[rtype(result = "Vec<Addr<Webhook>>")]
struct AllTargets;

impl Handler<AllTargets> for Webhooks {
    type Result = MessageResult<AllTargets>;

    fn handle(&mut self, _: AllTargets, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.targets
                .values()
                .flat_map(|v| v.iter().map(|(_, a)| a.clone()))
                .collect(),
        )
    }
}

/// Messages being dead-lettered (retries exhausted, copy not stored yet), over every
/// target.
pub async fn dead_lettering(webhooks: &Addr<Webhooks>) -> usize {
    let addrs = webhooks.send(AllTargets).await.unwrap_or_default();
    let mut n = 0;
    for a in addrs {
        if let Ok(s) = a.send(GetStatus).await {
            n += s.dead_lettering;
        }
    }
    n
}

/// Delivery status of every target of a queue.
pub async fn status(webhooks: &Addr<Webhooks>, queue: &str) -> Vec<WebhookStatus> {
    let addrs = webhooks
        .send(QueueTargets {
            name: queue.to_owned(),
        })
        .await
        .unwrap_or_default();
    let mut out = Vec::with_capacity(addrs.len());
    for a in addrs {
        if let Ok(s) = a.send(GetStatus).await {
            out.push(s);
        }
    }
    out
}
