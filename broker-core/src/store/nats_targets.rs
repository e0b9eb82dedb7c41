//! Webhook targets spread over the replicas of a NATS cluster
//! ([`crate::election::TargetElections`]).
//!
//! Each target has one preferred replica: the live replica (from the fabric's presence)
//! with the highest rendezvous score for the target (a hash of the replica's id and the
//! target's key), so targets spread evenly and, when a replica comes or goes, only its
//! own targets move. The preferred replica delivers a target only while it holds the
//! target's lease (a key in `<prefix>_leader`, which expires 6 s after its last renewal),
//! so two replicas never deliver one target at once: the previous holder releases the
//! lease when it sees it is no longer preferred, or its lease expires when it died.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::Recipient;
use async_nats::jetstream::kv;
use bytes::Bytes;
use sha2::Digest;

use crate::actors::leader::LeadershipChanged;
use crate::election::TargetElections;

/// How often a replica looks at each target: renews its lease, or campaigns.
const TICK: Duration = Duration::from_millis(1500);
/// How long a holder goes on without a successful renewal (under the lease's 6 s).
const GIVE_UP_AFTER: Duration = Duration::from_secs(4);

/// This replica's share of the webhook targets.
pub struct NatsTargets {
    pub(crate) bucket: kv::Store,
    pub(crate) node: Arc<str>,
    pub(crate) peers: Arc<RwLock<BTreeSet<String>>>,
}

/// The rendezvous score of `node` for target `key`.
fn score(node: &str, key: &str) -> u64 {
    let d = sha2::Sha256::new()
        .chain_update(node.as_bytes())
        .chain_update(b"\n")
        .chain_update(key.as_bytes())
        .finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Whether `node` is the preferred replica of `key` among `node` and `peers`.
fn preferred(node: &str, peers: &BTreeSet<String>, key: &str) -> bool {
    let mine = score(node, key);
    peers.iter().all(|p| score(p, key) < mine)
}

impl TargetElections for NatsTargets {
    fn follow(&self, key: String, recipient: Recipient<LeadershipChanged>) {
        let (bucket, node, peers) = (self.bucket.clone(), self.node.clone(), self.peers.clone());
        let lease = format!(
            "t-{}",
            hex::encode(&sha2::Sha256::digest(key.as_bytes())[..16])
        );
        tokio::spawn(async move {
            let value = Bytes::from(node.to_string());
            // The lease held: its revision and when it was last renewed.
            let mut held: Option<(u64, Instant)> = None;
            loop {
                if !recipient.connected() {
                    if let Some((rev, _)) = held {
                        let _ = bucket.delete_expect_revision(&lease, Some(rev)).await;
                    }
                    return;
                }
                let first = {
                    let peers = peers.read().expect("peers lock");
                    preferred(&node, &peers, &key)
                };
                held = match held {
                    Some((rev, _)) if !first => {
                        // Another replica is preferred now: hand the target over.
                        recipient.do_send(LeadershipChanged { leader: false });
                        let _ = bucket.delete_expect_revision(&lease, Some(rev)).await;
                        None
                    }
                    Some((rev, renewed)) => match bucket.update(&lease, value.clone(), rev).await {
                        Ok(r) => Some((r, Instant::now())),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            recipient.do_send(LeadershipChanged { leader: false });
                            None
                        }
                        Err(_) if renewed.elapsed() >= GIVE_UP_AFTER => {
                            recipient.do_send(LeadershipChanged { leader: false });
                            None
                        }
                        Err(_) => Some((rev, renewed)),
                    },
                    None if first => match bucket.create(&lease, value.clone()).await {
                        Ok(r) => {
                            recipient.do_send(LeadershipChanged { leader: true });
                            Some((r, Instant::now()))
                        }
                        // Still held by the previous replica (until it lets go or its
                        // lease expires).
                        Err(_) => None,
                    },
                    None => None,
                };
                tokio::time::sleep(TICK).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_spread_and_only_a_leaving_replicas_targets_move() {
        let nodes: Vec<String> = (0..3).map(|i| format!("node{i}")).collect();
        let owner = |live: &[String], key: &str| {
            live.iter()
                .find(|n| {
                    let others = live.iter().filter(|o| o != n).cloned().collect();
                    preferred(n, &others, key)
                })
                .cloned()
                .expect("exactly one is preferred")
        };
        let keys: Vec<String> = (0..300)
            .map(|i| format!("queue-{i}\nhttp://t/{i}"))
            .collect();
        let before: Vec<String> = keys.iter().map(|k| owner(&nodes, k)).collect();
        for n in &nodes {
            let share = before.iter().filter(|o| *o == n).count();
            assert!((60..=140).contains(&share), "{n} has {share} of 300");
        }
        // node2 leaves: its targets move, nobody else's.
        let after: Vec<String> = keys.iter().map(|k| owner(&nodes[..2], k)).collect();
        for (b, a) in before.iter().zip(&after) {
            if b != "node2" {
                assert_eq!(a, b);
            }
        }
    }
}
