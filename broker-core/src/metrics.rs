//! The Prometheus registry and every metric the broker exports (prefix `broker_`).
//! Queue labels are configured names or patterns, so cardinality is bounded by the config.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
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
    /// `broker_ws_delivery_latency_seconds`: from accepting a message to writing it to a session.
    pub ws_delivery_latency: prometheus::Histogram,
    /// `broker_notifications_total{target}`: notifications delivered to connections.
    pub notifications: IntCounterVec,
}

/// Label used for requests to queues that do not exist (keeps cardinality bounded).
pub const UNKNOWN_QUEUE_LABEL: &str = "_unknown";

impl Metrics {
    /// Creates and registers every metric, plus the process collector (`process_*`).
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
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
        let poll_waiting = prometheus::IntGauge::new(
            "broker_poll_waiting",
            "Long-polls parked waiting for a message.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(poll_waiting.clone()))
            .expect("unique metric");
        let ws_connections =
            prometheus::IntGauge::new("broker_ws_connections", "Open WebSocket connections.")
                .expect("valid metric");
        registry
            .register(Box::new(ws_connections.clone()))
            .expect("unique metric");
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
        let ws_slow_consumers = prometheus::IntCounter::new(
            "broker_ws_slow_consumers_total",
            "Subscriptions dropped because the subscriber fell behind.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(ws_slow_consumers.clone()))
            .expect("unique metric");
        let ws_delivery_latency = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "broker_ws_delivery_latency_seconds",
                "From accepting a message to writing it to a WebSocket.",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.5, 1.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(ws_delivery_latency.clone()))
            .expect("unique metric");
        let notifications = counter(
            "broker_notifications_total",
            "Notifications delivered to connections.",
            &["target"],
        );
        let reloads = counter(
            "broker_config_reloads_total",
            "Configuration reloads, by outcome.",
            &["outcome"],
        );
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "broker_http_request_duration_seconds",
                "HTTP request duration.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                60.0,
            ]),
            &["route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_duration.clone()))
            .expect("unique metric");
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
            http_requests,
            http_duration,
            reloads,
            ws_connections,
            ws_frames,
            ws_disconnects,
            ws_slow_consumers,
            ws_delivery_latency,
            notifications,
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
