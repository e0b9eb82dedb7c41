//! The fabric of a NATS cluster ([`crate::fabric::Fabric`]): each replica puts its id in
//! the bucket `<prefix>_replicas` every [`HEARTBEAT`] (entries expire after
//! [`PRESENCE_TTL`]) and re-reads the live ids; it answers asks on the subject
//! `<prefix>.replica.<id>`.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};

use super::nats::{bucket, Inner};
use crate::error::Error;
use crate::fabric::{Answer, Ask, Fabric, Responder};

/// How long a replica's presence lasts without a heartbeat.
const PRESENCE_TTL: Duration = Duration::from_secs(10);
/// How often a replica announces itself (and re-reads the others).
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long an ask waits for a replica's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// This replica's view of the cluster.
pub struct NatsFabric {
    client: async_nats::Client,
    prefix: String,
    node: Arc<str>,
    /// The other live replicas.
    peers: Arc<RwLock<BTreeSet<String>>>,
}

impl NatsFabric {
    /// Announces replica `node` and keeps announcing it while the fabric lives.
    pub(crate) async fn start(
        inner: &Inner,
        node: Arc<str>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Self>, Error> {
        let presence = bucket(
            &inner.js,
            format!("{}_replicas", inner.prefix),
            inner.replicas,
            Some(PRESENCE_TTL),
        )
        .await?;
        let fabric = Arc::new(NatsFabric {
            client: inner.client.clone(),
            prefix: inner.prefix.clone(),
            node: node.clone(),
            peers: Arc::default(),
        });
        beat(&presence, &node, &fabric.peers).await?;
        let count =
            |peers: &RwLock<BTreeSet<String>>| 1 + peers.read().expect("peers lock").len() as i64;
        metrics.cluster_replicas.set(count(&fabric.peers));
        let (peers, weak) = (fabric.peers.clone(), Arc::downgrade(&fabric));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                if weak.strong_count() == 0 {
                    let _ = presence.purge(&*node).await;
                    return;
                }
                if let Err(e) = beat(&presence, &node, &peers).await {
                    tracing::warn!(error = %e, "cannot announce this replica; retrying");
                }
                metrics.cluster_replicas.set(count(&peers));
            }
        });
        Ok(fabric)
    }

    /// The webhook targets' share of this replica, by the live replicas this fabric sees,
    /// with their leases in `bucket`.
    pub(crate) fn targets(&self, bucket: kv::Store) -> super::NatsTargets {
        super::NatsTargets {
            bucket,
            node: self.node.clone(),
            peers: self.peers.clone(),
        }
    }

    fn subject(&self, node: &str) -> String {
        format!("{}.replica.{node}", self.prefix)
    }
}

/// Puts this replica's id and reads the live ones.
async fn beat(
    presence: &kv::Store,
    node: &str,
    peers: &RwLock<BTreeSet<String>>,
) -> Result<(), Error> {
    let err = |e: &dyn std::fmt::Display| Error::Store(format!("NATS: presence: {e}"));
    presence
        .put(node, Bytes::from(crate::message::now_ms().to_string()))
        .await
        .map_err(|e| err(&e))?;
    let mut keys = presence.keys().await.map_err(|e| err(&e))?;
    let mut live = BTreeSet::new();
    while let Some(k) = keys.next().await {
        let k = k.map_err(|e| err(&e))?;
        if k != node {
            live.insert(k);
        }
    }
    *peers.write().expect("peers lock") = live;
    Ok(())
}

impl Fabric for NatsFabric {
    fn node(&self) -> Arc<str> {
        self.node.clone()
    }

    fn ask_all(&self, ask: Ask) -> BoxFuture<'static, Vec<Answer>> {
        let peers: Vec<String> = self
            .peers
            .read()
            .expect("peers lock")
            .iter()
            .cloned()
            .collect();
        let payload = Bytes::from(serde_json::to_vec(&ask).expect("asks serialise"));
        let asks: Vec<_> = peers
            .into_iter()
            .map(|peer| {
                (
                    self.client.clone(),
                    self.subject(&peer),
                    payload.clone(),
                    peer,
                )
            })
            .collect();
        let asks = asks.into_iter().map(|(client, subject, payload, peer)| {
            async move {
                let reply = tokio::time::timeout(ANSWER_WITHIN, client.request(subject, payload)).await;
                match reply {
                    Ok(Ok(m)) => match serde_json::from_slice::<Answer>(&m.payload) {
                        Ok(a) => Some(a),
                        Err(e) => {
                            tracing::warn!(replica = %peer, error = %e, "unreadable answer from a replica");
                            None
                        }
                    },
                    // Gone since the last heartbeat: nobody listens any more.
                    Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => None,
                    Ok(Err(e)) => {
                        tracing::warn!(replica = %peer, error = %e, "a replica did not answer");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(replica = %peer, "a replica did not answer within a second");
                        None
                    }
                }
            }
        });
        async move {
            futures_util::future::join_all(asks)
                .await
                .into_iter()
                .flatten()
                .collect()
        }
        .boxed()
    }

    fn serve(&self, responder: Responder) {
        let (client, subject) = (self.client.clone(), self.subject(&self.node));
        tokio::spawn(async move {
            let mut asks = match client.subscribe(subject).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot answer other replicas: notifications and connection lists stay local");
                    return;
                }
            };
            while let Some(m) = asks.next().await {
                let (Some(reply), Ok(ask)) = (m.reply, serde_json::from_slice::<Ask>(&m.payload))
                else {
                    continue;
                };
                let (client, responder) = (client.clone(), responder.clone());
                tokio::spawn(async move {
                    let answer = responder(ask).await;
                    let body = Bytes::from(serde_json::to_vec(&answer).expect("answers serialise"));
                    let _ = client.publish(reply, body).await;
                });
            }
        });
    }
}
