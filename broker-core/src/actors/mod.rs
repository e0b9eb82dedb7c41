//! The actors, one per file with the messages they handle above them: `Hub` (queue
//! registry), `Queue` (one log each), `Webhooks` (supervises the targets), `Webhook`
//! (one target each), `Cron`, `ConnectionRegistry` (live connections by id and user)
//! and `Leader`; `subscriber` is the interface live subscribers implement; `ingress` is
//! the front door (a handle, not an actor) through which everything publishes.
//! [`launch`] wires the hub, the webhook supervisor and the front door together.

pub mod cron;
mod cursors;
mod delayed;
pub mod hub;
pub mod ingress;
pub mod leader;
pub mod queue;
mod recent;
pub mod registry;
pub mod subscriber;
mod subscribers;
pub mod webhook;
pub mod webhooks;
mod window;

pub use hub::{
    ApplySettings, Hub, Listen, ResolveConsumer, SubscribePrefix, Unlisten, UnsubscribePrefix,
};
pub use leader::Leader;
pub use queue::{
    Batch, ConsumerKey, ConsumerRead, Head, Queue, QueueHandle, Read, Subscribe, Subscribed,
    Unsubscribe,
};
pub use registry::{ConnectionInfo, ConnectionRegistry};
pub use subscriber::{Disconnect, Notify, Subscriber};

use std::sync::Arc;

use actix::prelude::*;

/// The core's registry and what hangs off it, as [`launch`] starts them.
pub(crate) struct Launched {
    /// The queue registry.
    pub hub: Addr<Hub>,
    /// The webhook supervisor.
    pub webhooks: Addr<webhooks::Webhooks>,
    /// The front door over the hub's queues.
    pub ingress: ingress::Ingress,
}

/// Starts the hub over `store` and `logs` with the initial `settings`, the webhook
/// supervisor and the front door (through which webhooks dead-letter and cron publishes).
pub(crate) fn launch(
    settings: &crate::settings::SharedSettings,
    store: Arc<dyn crate::store::Store>,
    logs: Arc<dyn crate::log::Logs>,
    metrics: Arc<crate::metrics::Metrics>,
    registry: Addr<ConnectionRegistry>,
    fabric: Option<Arc<dyn crate::fabric::Fabric>>,
    deliveries: webhooks::Deliveries,
) -> Launched {
    let initial = settings.read().expect("settings lock").clone();
    let running = hub::Running::default();
    let mut parts = None;
    let hub = Hub::create(|ctx| {
        let queues = hub::Queues::new(running.clone(), ctx.address());
        // Replicas sharing the store also share which signed requests were seen.
        let shared = fabric.as_ref().map(|_| store.clone());
        let ingress = ingress::Ingress::new(
            settings.clone(),
            queues,
            registry,
            fabric,
            shared,
            metrics.clone(),
        );
        let leader = deliveries.leader.clone();
        let webhooks =
            webhooks::Webhooks::new(deliveries, ingress.clone(), store.clone(), metrics.clone())
                .start();
        parts = Some((ingress, webhooks.clone()));
        Hub::new(
            initial,
            store,
            metrics,
            running,
            leader,
            webhooks.recipient(),
            logs,
        )
    });
    let (ingress, webhooks) = parts.expect("created above");
    Launched {
        hub,
        webhooks,
        ingress,
    }
}

/// [`launch`] for a test: `settings` shared, a fresh connection registry.
#[cfg(test)]
pub(crate) fn launch_for_tests(
    settings: Arc<crate::settings::Settings>,
    store: Arc<dyn crate::store::Store>,
    metrics: Arc<crate::metrics::Metrics>,
    leader: Addr<Leader>,
    arbiter: ArbiterHandle,
) -> Launched {
    let shared = Arc::new(std::sync::RwLock::new(settings));
    let registry = ConnectionRegistry::new(metrics.clone()).start();
    let deliveries = webhooks::Deliveries::for_tests(leader, arbiter);
    let logs = Arc::new(crate::log::StoreLogs(store.clone()));
    launch(&shared, store, logs, metrics, registry, None, deliveries)
}
