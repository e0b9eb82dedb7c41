//! The lead of a NATS cluster of brokers: a lease in a key-value bucket whose entries
//! expire ([`LEASE_TTL`] after their last write). The replica that creates the key
//! leads and renews it by revision (compare-and-set) every [`RENEW_EVERY`]; it stops
//! leading the moment a renewal is refused, or once no renewal succeeded for
//! [`GIVE_UP_AFTER`] (shorter than the TTL, so it has stopped before anyone else can
//! take the key). A replica that dies loses the lead when the key expires.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;

use crate::election::Election;
use crate::error::Error;

/// How long a lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// How often the leader renews it.
const RENEW_EVERY: Duration = Duration::from_millis(1500);
/// How long the leader goes on without a successful renewal.
const GIVE_UP_AFTER: Duration = Duration::from_secs(4);
/// How often a follower tries to take the lease.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(1000);
/// The key.
const KEY: &str = "leader";

/// A replica's campaign for the lead.
pub struct NatsLease {
    bucket: kv::Store,
    /// This replica's id (the key's value while it leads).
    node: String,
}

impl NatsLease {
    /// The lease in bucket `<prefix>_leader` (created if missing) for replica `node`.
    pub(crate) async fn new(
        js: &async_nats::jetstream::Context,
        prefix: &str,
        replicas: usize,
        node: String,
    ) -> Result<Self, Error> {
        let bucket =
            super::nats::bucket(js, format!("{prefix}_leader"), replicas, Some(LEASE_TTL)).await?;
        Ok(Self { bucket, node })
    }
}

impl Election for NatsLease {
    fn run(self: Box<Self>, report: Box<dyn Fn(bool) + Send + Sync>) {
        tokio::spawn(async move {
            let value = Bytes::from(self.node.clone());
            loop {
                // Follower: try to take the key (it is free once expired or purged).
                let Ok(mut revision) = self.bucket.create(KEY, value.clone()).await else {
                    tokio::time::sleep(CAMPAIGN_EVERY).await;
                    continue;
                };
                let mut renewed = Instant::now();
                tracing::info!(node = %self.node, "leading the cluster's singleton work");
                report(true);
                loop {
                    tokio::time::sleep(RENEW_EVERY).await;
                    match tokio::time::timeout(
                        RENEW_EVERY,
                        self.bucket.update(KEY, value.clone(), revision),
                    )
                    .await
                    {
                        Ok(Ok(r)) => {
                            revision = r;
                            renewed = Instant::now();
                        }
                        // Someone else holds it now: stop at once.
                        Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            break;
                        }
                        _ if renewed.elapsed() >= GIVE_UP_AFTER => break,
                        _ => {}
                    }
                }
                tracing::warn!(node = %self.node, "lost the lead of the cluster's singleton work");
                report(false);
            }
        });
    }
}
