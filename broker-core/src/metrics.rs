//! The Prometheus registry and every metric the broker exports (prefix `broker_`).
//! Queue labels are configured names or patterns, so cardinality is bounded by the config.

use prometheus::{
    core::Collector, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All metrics, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// `broker_published_total{queue}`: messages accepted.
    pub published: IntCounterVec,
    /// `broker_rejected_total{queue,reason}`: ingest requests refused.
    pub rejected: IntCounterVec,
    /// `broker_dropped_total{queue,reason}`: retained messages dropped (`count`, `size`).
    pub dropped: IntCounterVec,
    /// `broker_queue_depth{queue}`: messages retained.
    pub depth: IntGaugeVec,
    /// `broker_queue_bytes{queue}`: body bytes retained.
    pub bytes: IntGaugeVec,
    /// `broker_queue_limit_messages{queue}`: configured `max_message_count`.
    pub limit_messages: IntGaugeVec,
    /// `broker_queue_limit_bytes{queue}`: configured `max_queue_size`.
    pub limit_bytes: IntGaugeVec,
    /// `broker_delayed_messages{queue}`: messages waiting for their time.
    pub delayed: IntGaugeVec,
    /// `broker_poll_reads_total{queue,outcome}`: poll reads (`messages`, `empty`, `refresh`).
    pub poll_reads: IntCounterVec,
    /// `broker_poll_waiting`: long-polls parked waiting for a message.
    pub poll_waiting: prometheus::IntGauge,
    /// `broker_queues`: live queues (configured and created from patterns).
    pub queues: prometheus::IntGauge,
    /// `broker_http_requests_total{route,method,status}`.
    pub http_requests: IntCounterVec,
    /// `broker_http_request_duration_seconds{route}`.
    pub http_duration: HistogramVec,
    /// `broker_config_reloads_total{outcome}`.
    pub reloads: IntCounterVec,
    /// `broker_ws_connections`: open WebSocket sessions (authenticated or not).
    pub ws_connections: prometheus::IntGauge,
    /// `broker_ws_frames_total{direction}`: frames received (`in`) and sent (`out`).
    pub ws_frames: IntCounterVec,
    /// `broker_ws_disconnects_total{reason}`.
    pub ws_disconnects: IntCounterVec,
    /// `broker_ws_slow_consumers_total`: subscriptions dropped for falling behind.
    pub ws_slow_consumers: prometheus::IntCounter,
    /// `broker_login_refusals_total`: logins refused unchecked (rate or concurrency).
    pub login_refusals: prometheus::IntCounter,
    /// `broker_ws_delivery_latency_seconds`: from accepting a message to writing it to a session.
    pub ws_delivery_latency: prometheus::Histogram,
    /// `broker_notifications_total{target}`: notifications delivered to connections.
    pub notifications: IntCounterVec,
    /// `broker_leader`: 1 while this node is the leader.
    pub leader: prometheus::IntGauge,
    /// `broker_webhook_targets_delivering`: webhook targets this broker delivers now (a
    /// cluster shares them out; elsewhere the leader has them all).
    pub webhook_targets_delivering: prometheus::IntGauge,
    /// `broker_cluster_replicas`: replicas this one sees live, itself included (1 without
    /// a cluster).
    pub cluster_replicas: prometheus::IntGauge,
    /// `broker_cluster_connected`: 1 while the link to the cluster's store (NATS) is up
    /// (always 1 without a cluster).
    pub cluster_connected: prometheus::IntGauge,
    /// `broker_cluster_feed_delay_seconds`: from another replica accepting a message to
    /// this replica making it visible (the lag of its view of the streams).
    pub cluster_feed_delay: prometheus::Histogram,
    /// `broker_leader_changes_total`.
    pub leader_changes: prometheus::IntCounter,
    /// `broker_webhook_deliveries_total{queue,outcome}`: attempts by outcome
    /// (`success`, `retry`, `dead_lettered`, `dropped`).
    pub webhook_deliveries: IntCounterVec,
    /// `broker_webhook_delivery_duration_seconds{queue}`: one attempt.
    pub webhook_duration: HistogramVec,
    /// `broker_webhook_in_flight{queue}`: messages being delivered (including waiting retries).
    pub webhook_in_flight: IntGaugeVec,
    /// `broker_webhook_pending{queue}`: messages not yet handed to a delivery.
    pub webhook_pending: IntGaugeVec,
    /// `broker_webhook_skipped_total{queue}`: messages rolled off before delivery began.
    pub webhook_skipped: IntCounterVec,
    /// `broker_dead_lettered_total{queue}`: messages moved to a dead-letter queue.
    pub dead_lettered: IntCounterVec,
    /// `broker_cron_runs_total{cron,outcome}`.
    pub cron_runs: IntCounterVec,
    /// `broker_cron_next_run_timestamp_seconds{cron}`.
    pub cron_next_run: prometheus::GaugeVec,
    /// `broker_store_commit_duration_seconds`: one store transaction.
    pub store_commit: prometheus::Histogram,
    /// `broker_store_batch_size`: operations per store transaction.
    pub store_batch: prometheus::Histogram,
    /// `broker_webhook_dead_letter_failures_total{queue}`: dead-letter appends refused
    /// (the message stays pending and is tried again).
    pub webhook_dead_letter_failures: IntCounterVec,
    /// `broker_store_errors_total`: failed store transactions.
    pub store_errors: prometheus::IntCounter,
    /// `broker_store_dropped_ops_total`: operations nobody awaits (cursor moves, trims,
    /// retry records, removals) that were dropped: the write queue was full, or they
    /// failed on their own.
    pub store_dropped_ops: prometheus::IntCounter,
    /// `broker_ready`: 1 while `/readyz` answers 200 (as of the last probe or scrape).
    pub ready: prometheus::IntGauge,
    /// `broker_readiness_changes_total`: times readiness turned, as probes and scrapes saw it.
    pub readiness_changes: prometheus::IntCounter,
    /// Readiness last reported (the gauge alone cannot be swapped atomically).
    ready_state: std::sync::atomic::AtomicI64,
}

/// Label used for requests to queues that do not exist (keeps cardinality bounded).
pub const UNKNOWN_QUEUE_LABEL: &str = "_unknown";

/// A new metric, registered with `registry` (either step fails only on a programming
/// error: a bad name or a name used twice).
fn registered<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Metrics {
    /// Creates and registers every metric, plus the process collector (`process_*`).
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            registered(&registry, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let published = counter(
            "broker_published_total",
            "Messages accepted into a queue.",
            &["queue"],
        );
        let rejected = counter(
            "broker_rejected_total",
            "Ingest requests refused, by reason.",
            &["queue", "reason"],
        );
        let dropped = counter(
            "broker_dropped_total",
            "Retained messages dropped by queue limits.",
            &["queue", "reason"],
        );
        let depth = gauge(
            "broker_queue_depth",
            "Messages retained in a queue.",
            &["queue"],
        );
        let bytes = gauge(
            "broker_queue_bytes",
            "Body bytes retained in a queue.",
            &["queue"],
        );
        let limit_messages = gauge(
            "broker_queue_limit_messages",
            "Configured max_message_count of a queue.",
            &["queue"],
        );
        let limit_bytes = gauge(
            "broker_queue_limit_bytes",
            "Configured max_queue_size of a queue.",
            &["queue"],
        );
        let delayed = gauge(
            "broker_delayed_messages",
            "Delayed messages waiting for their time.",
            &["queue"],
        );
        let poll_reads = counter(
            "broker_poll_reads_total",
            "HTTP poll reads, by outcome.",
            &["queue", "outcome"],
        );
        let http_requests = counter(
            "broker_http_requests_total",
            "HTTP requests, by route and status.",
            &["route", "method", "status"],
        );
        let poll_waiting = registered(
            &registry,
            prometheus::IntGauge::new(
                "broker_poll_waiting",
                "Long-polls parked waiting for a message.",
            ),
        );
        let queues = registered(
            &registry,
            prometheus::IntGauge::new(
                "broker_queues",
                "Live queues (configured and created from patterns).",
            ),
        );
        let ws_connections = registered(
            &registry,
            prometheus::IntGauge::new("broker_ws_connections", "Open WebSocket connections."),
        );
        let ws_frames = counter(
            "broker_ws_frames_total",
            "WebSocket frames, by direction.",
            &["direction"],
        );
        let ws_disconnects = counter(
            "broker_ws_disconnects_total",
            "WebSocket disconnects, by reason.",
            &["reason"],
        );
        let ws_slow_consumers = registered(
            &registry,
            prometheus::IntCounter::new(
                "broker_ws_slow_consumers_total",
                "Subscriptions dropped because the subscriber fell behind.",
            ),
        );
        let ws_delivery_latency = registered(
            &registry,
            prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "broker_ws_delivery_latency_seconds",
                    "From accepting a message to writing it to a WebSocket.",
                )
                .buckets(vec![
                    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.5, 1.0,
                ]),
            ),
        );
        let notifications = counter(
            "broker_notifications_total",
            "Notifications delivered to connections.",
            &["target"],
        );
        let leader = registered(
            &registry,
            prometheus::IntGauge::new("broker_leader", "1 while this node is the leader."),
        );
        let webhook_targets_delivering = registered(
            &registry,
            prometheus::IntGauge::new(
                "broker_webhook_targets_delivering",
                "Webhook targets this broker delivers now.",
            ),
        );
        let cluster_replicas = registered(
            &registry,
            prometheus::IntGauge::new(
                "broker_cluster_replicas",
                "Replicas this broker sees live, itself included (1 without a cluster).",
            ),
        );
        cluster_replicas.set(1);
        let cluster_connected = registered(
            &registry,
            prometheus::IntGauge::new(
                "broker_cluster_connected",
                "1 while the connection to the cluster's NATS is up (1 without a cluster).",
            ),
        );
        cluster_connected.set(1);
        let cluster_feed_delay = registered(
            &registry,
            prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "broker_cluster_feed_delay_seconds",
                    "From another replica accepting a message to this replica making it visible.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
            ),
        );
        let login_refusals = registered(
            &registry,
            prometheus::IntCounter::new(
                "broker_login_refusals_total",
                "Logins refused without a check: over the rate of their address or user name, or too many checks at once.",
            ),
        );
        let leader_changes = registered(
            &registry,
            prometheus::IntCounter::new(
                "broker_leader_changes_total",
                "Leadership changes of this node.",
            ),
        );
        let webhook_deliveries = counter(
            "broker_webhook_deliveries_total",
            "Webhook delivery attempts, by outcome.",
            &["queue", "outcome"],
        );
        let webhook_duration = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "broker_webhook_delivery_duration_seconds",
                    "Duration of one webhook delivery attempt.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["queue"],
            ),
        );
        let webhook_in_flight = gauge(
            "broker_webhook_in_flight",
            "Messages being delivered to webhooks, retries included.",
            &["queue"],
        );
        let webhook_pending = gauge(
            "broker_webhook_pending",
            "Messages not yet handed to a webhook delivery.",
            &["queue"],
        );
        let webhook_skipped = counter(
            "broker_webhook_skipped_total",
            "Messages rolled off before their webhook delivery began.",
            &["queue"],
        );
        let dead_lettered = counter(
            "broker_dead_lettered_total",
            "Messages moved to a dead-letter queue.",
            &["queue"],
        );
        let cron_runs = counter(
            "broker_cron_runs_total",
            "Cron runs, by outcome.",
            &["cron", "outcome"],
        );
        let cron_next_run = registered(
            &registry,
            prometheus::GaugeVec::new(
                Opts::new(
                    "broker_cron_next_run_timestamp_seconds",
                    "Unix time of each cron's next run.",
                ),
                &["cron"],
            ),
        );
        let store_commit = registered(
            &registry,
            prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "broker_store_commit_duration_seconds",
                    "Duration of one store transaction (group commit).",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ]),
            ),
        );
        let store_batch = registered(
            &registry,
            prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "broker_store_batch_size",
                    "Operations per store transaction.",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ]),
            ),
        );
        let webhook_dead_letter_failures = counter(
            "broker_webhook_dead_letter_failures_total",
            "Dead-letter appends refused; the message stays pending and is tried again.",
            &["queue"],
        );
        let store_dropped_ops = registered(
            &registry,
            prometheus::IntCounter::new(
                "broker_store_dropped_ops_total",
                "Store operations nobody awaits that were dropped (write queue full, or failed on their own).",
            ),
        );
        let store_errors = registered(
            &registry,
            prometheus::IntCounter::new("broker_store_errors_total", "Failed store transactions."),
        );
        let ready = registered(
            &registry,
            prometheus::IntGauge::new(
                "broker_ready",
                "1 while /readyz answers 200 (as of the last probe or scrape).",
            ),
        );
        ready.set(1);
        let readiness_changes = registered(&registry, prometheus::IntCounter::new(
            "broker_readiness_changes_total",
            "Times readiness turned (ready to not ready or back), as probes and scrapes saw it.",
        ));
        let reloads = counter(
            "broker_config_reloads_total",
            "Configuration reloads, by outcome.",
            &["outcome"],
        );
        let http_duration = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "broker_http_request_duration_seconds",
                    "HTTP request duration.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                    30.0, 60.0,
                ]),
                &["route"],
            ),
        );
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Self {
            registry,
            published,
            rejected,
            dropped,
            depth,
            bytes,
            limit_messages,
            limit_bytes,
            delayed,
            poll_reads,
            poll_waiting,
            queues,
            http_requests,
            http_duration,
            reloads,
            ws_connections,
            ws_frames,
            ws_disconnects,
            ws_slow_consumers,
            login_refusals,
            ws_delivery_latency,
            notifications,
            leader,
            webhook_targets_delivering,
            cluster_replicas,
            cluster_connected,
            cluster_feed_delay,
            leader_changes,
            webhook_deliveries,
            webhook_duration,
            webhook_in_flight,
            webhook_pending,
            webhook_skipped,
            dead_lettered,
            cron_runs,
            cron_next_run,
            store_commit,
            store_batch,
            store_errors,
            store_dropped_ops,
            webhook_dead_letter_failures,
            ready,
            readiness_changes,
            ready_state: std::sync::atomic::AtomicI64::new(1),
        }
    }

    /// Records what readiness was just reported; counts a change.
    pub fn observe_ready(&self, ready: bool) {
        let now = i64::from(ready);
        // Probes and scrapes can race; only one of them counts a given turn.
        if self
            .ready_state
            .swap(now, std::sync::atomic::Ordering::AcqRel)
            != now
        {
            self.readiness_changes.inc();
        }
        self.ready.set(now);
    }

    /// One queue's handles, looked up once per queue rather than per message.
    pub fn queue(&self, label: &str) -> QueueMetrics {
        QueueMetrics {
            published: self.published.with_label_values(&[label]),
            depth: self.depth.with_label_values(&[label]),
            bytes: self.bytes.with_label_values(&[label]),
            delayed: self.delayed.with_label_values(&[label]),
            limit_messages: self.limit_messages.with_label_values(&[label]),
            limit_bytes: self.limit_bytes.with_label_values(&[label]),
            dropped_count: self.dropped.with_label_values(&[label, "count"]),
            dropped_size: self.dropped.with_label_values(&[label, "size"]),
        }
    }

    /// Counts an ingest rejection.
    pub fn reject(&self, queue: &str, reason: crate::error::Rejection) {
        self.rejected
            .with_label_values(&[queue, reason.as_str()])
            .inc();
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One queue's metric handles (see [`Metrics::queue`]).
#[derive(Clone)]
pub struct QueueMetrics {
    /// `broker_published_total{queue}`.
    pub published: prometheus::IntCounter,
    /// `broker_queue_depth{queue}`.
    pub depth: prometheus::IntGauge,
    /// `broker_queue_bytes{queue}`.
    pub bytes: prometheus::IntGauge,
    /// `broker_delayed_messages{queue}`.
    pub delayed: prometheus::IntGauge,
    /// `broker_queue_limit_messages{queue}`.
    pub limit_messages: prometheus::IntGauge,
    /// `broker_queue_limit_bytes{queue}`.
    pub limit_bytes: prometheus::IntGauge,
    /// `broker_dropped_total{queue,reason="count"}`.
    pub dropped_count: prometheus::IntCounter,
    /// `broker_dropped_total{queue,reason="size"}`.
    pub dropped_size: prometheus::IntCounter,
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn readiness_turns_are_counted_once_each() {
        let m = Metrics::new();
        assert_eq!((m.ready.get(), m.readiness_changes.get()), (1, 0));
        m.observe_ready(true);
        assert_eq!((m.ready.get(), m.readiness_changes.get()), (1, 0));
        m.observe_ready(false);
        m.observe_ready(false);
        assert_eq!((m.ready.get(), m.readiness_changes.get()), (0, 1));
        m.observe_ready(true);
        assert_eq!((m.ready.get(), m.readiness_changes.get()), (1, 2));
        let text = m.render();
        assert!(text.contains("broker_ready 1"), "{text}");
        assert!(text.contains("broker_readiness_changes_total 2"), "{text}");
    }
}
