//! The configuration model, loading and validation.
//!
//! One file (TOML, YAML or JSON, chosen by extension; a `.conf` or other extension is
//! sniffed: `{` means JSON) is read with the `config` crate and overridden by
//! `BROKER__SECTION__KEY` environment variables. A file in webhook-queue's shape (it has
//! `listen_host`/`listen_port` at the top level) is converted to the native shape first,
//! so both shapes accept the same environment overrides. Every struct rejects unknown
//! keys, and [`Settings::compile`](crate::settings::Settings::compile) validates the
//! values with errors that name the key.

mod legacy;
mod secret;
mod writeback;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use secret::Secret;
pub use writeback::{set_user_pass_hash, with_user_pass_hash, write_atomically};

use crate::error::Error;

/// The commented example configuration: what `broker config example` prints and what
/// `broker serve` runs when no file is given.
pub const EXAMPLE: &str = include_str!("example.toml");

/// The whole configuration, native shape.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener, proxies, request limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where messages are kept.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Admin API credentials.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Default limits of every queue.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// WebSocket subscribers.
    #[serde(default)]
    pub ws: WsConfig,
    /// Users that read queues (HTTP Basic).
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// Queues and queue patterns.
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
    /// Scheduled publishes.
    #[serde(default)]
    pub crons: Vec<CronConfig>,
    /// @platformatic/pg-hooks compatible routes.
    #[serde(default)]
    pub pg_hooks: PgHooksConfig,
    /// Crossbar's HTTP pusher (`POST /push`) and the WAMP realm; absent: no pusher route.
    #[serde(default)]
    pub pusher: Option<PusherConfig>,
    /// Outbound webhook deliveries.
    #[serde(default)]
    pub webhooks: WebhooksConfig,
}

/// `[webhooks]`: rules for outbound deliveries.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Networks (CIDRs) that targets created at runtime (admin API, pg-hooks routes) may
    /// reach although they are loopback, private, link-local or otherwise internal.
    /// Targets in the config file are trusted and not checked.
    pub allow_targets: Vec<String>,
}

/// `[pusher]`: Crossbar.io's HTTP Publisher bridge, with Crossbar's option names.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PusherConfig {
    /// Route of the pusher.
    pub path: String,
    /// The WAMP realm (sessions must `HELLO` with it).
    pub realm: String,
    /// Key of signed requests (`key` query parameter); with `secret`.
    pub key: Option<String>,
    /// Secret of signed requests: with it, every request must be signed.
    pub secret: Option<Secret>,
    /// Largest body in bytes (0: `server.max_body_size`).
    pub post_body_limit: usize,
    /// Largest difference between a signed request's `timestamp` and now, in seconds.
    pub timestamp_delta_limit: u64,
    /// Addresses or networks allowed to push (empty: any).
    pub require_ip: Vec<String>,
    /// Refuse requests that did not arrive over TLS.
    pub require_tls: bool,
    /// Log each request's outcome at info level.
    pub debug: bool,
    /// Browser origins allowed to push with credentials (`https://app.example`; `*` for
    /// any). Others get `Access-Control-Allow-Origin: *` without credentials.
    pub allowed_origins: Vec<String>,
}

impl Default for PusherConfig {
    fn default() -> Self {
        Self {
            path: "/push".into(),
            realm: "realm1".into(),
            key: None,
            secret: None,
            post_body_limit: 0,
            timestamp_delta_limit: 300,
            require_ip: Vec::new(),
            require_tls: false,
            debug: false,
            allowed_origins: Vec::new(),
        }
    }
}

/// `[pg_hooks]`: the `POST /queues`, `/messages`, `/cron` routes of @platformatic/pg-hooks.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgHooksConfig {
    /// Open them without credentials, as pg-hooks without `adminSecret` is. Otherwise they
    /// need the admin token (Bearer, or `X-PLATFORMATIC-ADMIN-SECRET`).
    pub allow_anonymous: bool,
}

/// `[[queues.webhooks]]`: a target every message of the queue is delivered to.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Callback URL (http or https).
    pub url: String,
    /// HTTP method.
    #[serde(default = "default_method")]
    pub method: String,
    /// Headers sent with every delivery.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Per-attempt timeout.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries after the first attempt (0: one attempt only).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Delays between attempts.
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// Deliveries in flight at once; 1 delivers strictly in order.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Signs deliveries with Standard Webhooks headers: base64, optionally `whsec_`-prefixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<Secret>,
    /// Queue that receives messages whose retries are exhausted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,
}

fn default_method() -> String {
    "POST".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_retries() -> u32 {
    5
}
fn default_max_in_flight() -> usize {
    16
}

/// `backoff`: an explicit `schedule`, or exponential from `initial` doubling up to `max`;
/// without either, Svix's schedule (5s, 5m, 30m, 2h, 5h, 10h, 10h).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// First delay of the exponential schedule (each next one doubles).
    #[serde(
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub initial: Option<Duration>,
    /// Cap of the exponential delays.
    #[serde(
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max: Option<Duration>,
    /// Explicit delays: retry n waits `schedule[n-1]` (the last entry repeats).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<HumanDuration>,
    /// Random spread of every delay, as a fraction (0.2 = ±20 %).
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: None,
            max: None,
            schedule: Vec::new(),
            jitter: 0.2,
        }
    }
}

/// A duration written as `30s`, `5m`, … in lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct HumanDuration(#[serde(with = "humantime_serde")] pub Duration);

/// `[[crons]]`: publish `body` into `queue` on `schedule`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CronConfig {
    /// Unique name.
    pub name: String,
    /// Target queue.
    pub queue: String,
    /// 5 fields (minute precision) or 6 (with seconds first).
    pub schedule: String,
    /// IANA time zone of the schedule (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The message body.
    #[serde(default)]
    pub body: String,
    /// Headers kept with the message (and sent by webhooks).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on, `host:port`.
    pub listen: String,
    /// Peers (IPs or CIDRs) whose `X-Forwarded-For` header is believed.
    pub trusted_proxies: Vec<String>,
    /// Largest request body read at all, in bytes; larger bodies get 413 before buffering.
    pub max_body_size: usize,
    /// Longest `wait=` a long-poll may ask for; longer values are clamped.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// How long a shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            trusted_proxies: Vec::new(),
            max_body_size: 1024 * 1024,
            max_wait: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Where `broker serve` keeps queues unless `storage.url` says otherwise.
pub const DEFAULT_STORAGE_URL: &str = "sqlite://./data/broker.db";

/// `[storage]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `sqlite://PATH` (the default, `./data/broker.db`, relative to the working
    /// directory), `postgres://…`, `memory://` (nothing survives a restart), or
    /// `nats://HOST:PORT[,nats://…]` (a cluster of equal replicas on NATS JetStream).
    pub url: String,
    /// `[storage.nats]`: how to use NATS when `url` names it.
    pub nats: NatsConfig,
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("url", &crate::store::without_password(&self.url))
            .field("nats", &self.nats)
            .finish()
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_STORAGE_URL.into(),
            nats: NatsConfig::default(),
        }
    }
}

/// `[storage.nats]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// A NATS credentials file (`.creds`: user JWT and NKey seed).
    pub credentials: Option<std::path::PathBuf>,
    /// A PEM file of CA certificates to verify the servers with (TLS required).
    pub ca_file: Option<std::path::PathBuf>,
    /// Replicas of every stream and bucket; 0 (the default): 3 when the cluster has at
    /// least 3 servers, else 1.
    pub replicas: usize,
    /// Prefix of every stream, subject and bucket the broker makes (letters, digits,
    /// `-`): two brokers on one NATS account need different prefixes.
    pub prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            credentials: None,
            ca_file: None,
            replicas: 0,
            prefix: "broker".into(),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token of the admin API and `/reload`; no token disables both for admins.
    pub token: Option<Secret>,
}

/// `[limits]`: per-queue defaults; a queue may override each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most messages a queue keeps; past it the oldest are dropped.
    pub max_message_count: usize,
    /// Largest message body in bytes; larger ones are rejected with 413.
    pub max_message_size: usize,
    /// Most bytes of bodies a queue keeps; past it the oldest are dropped.
    pub max_queue_size: usize,
    /// Most delayed messages a queue holds before they are due.
    pub max_delayed_messages: usize,
    /// Most body bytes of delayed messages a queue holds before they are due.
    pub max_delayed_bytes: usize,
    /// Longest a publish may be delayed (`delay=`, `at=`, pg-hooks `when`); later is a 400.
    #[serde(with = "humantime_serde")]
    pub max_delay: std::time::Duration,
    /// Most live queues (configured ones included); creating another from a pattern is
    /// refused with 429 `too_many_queues`.
    pub max_queues: usize,
    /// A queue created from a pattern that has held nothing (no message, delayed message,
    /// subscriber or consumer) for this long is stopped and forgotten; `0s`: never.
    #[serde(with = "humantime_serde")]
    pub idle_queue_timeout: std::time::Duration,
    /// Password checks per minute for one client address, and for one user name (a
    /// recently verified login is not checked again); past it 429 `too_many_logins`.
    pub login_attempts_per_minute: u32,
    /// Most queues defined at runtime (admin API, pg-hooks routes); past it 429
    /// `too_many_definitions`.
    pub max_runtime_queues: usize,
    /// Most webhook targets of runtime queues, in all.
    pub max_runtime_targets: usize,
    /// Most crons defined at runtime.
    pub max_runtime_crons: usize,
    /// How long a publish's `Idempotency-Key` is remembered: the same key again within
    /// it returns the first publish's offset instead of storing a second message (all
    /// queues; on a NATS cluster it is also JetStream's duplicate window).
    #[serde(with = "humantime_serde")]
    pub idempotency_window: std::time::Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        // webhook-queue's defaults, so its configs without limits behave the same.
        Self {
            max_message_count: 100,
            max_message_size: 20_000,
            max_queue_size: 1_000_000,
            max_delayed_messages: 100_000,
            max_delayed_bytes: 64 * 1024 * 1024,
            max_delay: std::time::Duration::from_secs(30 * 24 * 3600),
            max_queues: 10_000,
            idle_queue_timeout: std::time::Duration::from_secs(600),
            login_attempts_per_minute: 30,
            max_runtime_queues: 1000,
            max_runtime_targets: 1000,
            max_runtime_crons: 1000,
            idempotency_window: std::time::Duration::from_secs(120),
        }
    }
}

/// `[[users]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Login name.
    pub name: String,
    /// `$argon2id$…` (PHC), or webhook-queue's `sha512;SALT;HEX` / `plain;;PASSWORD`.
    pub pass_hash: Secret,
    /// Queue names or patterns (`chat.*`) this user may read.
    #[serde(default)]
    pub queues: Vec<String>,
    /// Whether this user may call `/reload`.
    #[serde(default)]
    pub can_reload: bool,
    /// Queue names or patterns this user may publish into over WebSocket.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
}

/// `[ws]`: the WebSocket endpoint `GET /v1/ws`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// HS256 secrets that sign session tokens (JWT); the first signs `broker token`,
    /// all verify (rotation).
    pub jwt_secrets: Vec<Secret>,
    /// Bearer secrets that may call the notify routes (besides the admin token).
    pub notify_secrets: Vec<Secret>,
    /// Whether a connection without credentials is a session of its own.
    pub allow_anonymous: bool,
    /// Queues (or patterns) anonymous sessions may subscribe to.
    pub anonymous_queues: Vec<String>,
    /// How long a connection may take to send `authorize` when it connected without credentials.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Interval of server pings.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// How long after a ping a silent connection is closed.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// Largest client message (frame or reassembled fragments) in bytes.
    pub max_frame_size: usize,
    /// Most subscriptions of one connection.
    pub max_subscriptions: usize,
    /// Most connections of one user.
    pub max_connections_per_user: usize,
    /// Most anonymous connections, all together (`allow_anonymous`).
    pub max_anonymous_connections: usize,
    /// Most deliveries waiting for one connection before it counts as slow.
    pub max_pending_messages: usize,
    /// Most bytes waiting for one connection before it counts as slow.
    pub max_pending_bytes: usize,
    /// What happens to a slow connection: `refresh` (it is told, and skips forward) or `close` (code 4008).
    pub slow_consumer: SlowConsumer,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            jwt_secrets: Vec::new(),
            notify_secrets: Vec::new(),
            allow_anonymous: false,
            anonymous_queues: Vec::new(),
            auth_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            max_frame_size: 64 * 1024,
            max_subscriptions: 100,
            max_connections_per_user: 100,
            max_anonymous_connections: 1000,
            max_pending_messages: 256,
            max_pending_bytes: 4 * 1024 * 1024,
            slow_consumer: SlowConsumer::Refresh,
        }
    }
}

/// Policy for a WebSocket connection that does not keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// Send `{"event":"refresh","reason":"slow_consumer"}` and continue from the newest message.
    Refresh,
    /// Close the connection with code 4008.
    Close,
}

/// What a queue does with what is published into it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueKind {
    /// An ordinary queue.
    #[default]
    Queue,
    /// Accepts exactly `{"userId","data"}` and pushes `data` to every connection of that user.
    NotifyUser,
    /// Accepts exactly `{"connectionId","data"}` and pushes `data` to that connection.
    NotifyConnection,
}

/// `[[queues]]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Queue name, or a pattern ending in `.*` whose queues are created on first use.
    pub name: String,
    /// Ingest authentication; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// Client addresses (IPs or CIDRs) allowed to publish; empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_ips: Vec<String>,
    /// `queue` (default), `notify-user` or `notify-connection`.
    #[serde(default, skip_serializing_if = "is_default_kind")]
    pub kind: QueueKind,
    /// `json` rejects bodies that are not valid JSON with 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<ContentRule>,
    /// Overrides `limits.max_message_count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_count: Option<usize>,
    /// Overrides `limits.max_message_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_size: Option<usize>,
    /// Overrides `limits.max_queue_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue_size: Option<usize>,
    /// For a pattern (`chat.*`): most live queues created from it (429 beyond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queues: Option<usize>,
    /// Webhook targets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookConfig>,
}

fn is_default_kind(k: &QueueKind) -> bool {
    *k == QueueKind::Queue
}

/// Body validation of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentRule {
    /// Any bytes.
    Any,
    /// Valid JSON only.
    Json,
}

/// Ingest authentication of a queue.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `none`, `bearer`, `hmac-sha256`, `hmac-sha512`, `github`, `stripe`, `slack`,
    /// `standard-webhooks`.
    pub method: String,
    /// The secret (or one of them, see `keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Secret>,
    /// More accepted secrets, for rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<Secret>,
    /// Header carrying the signature (`hmac-*` methods only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_name: Option<String>,
    /// Accepted clock skew of signed timestamps (`stripe`, `slack`, `standard-webhooks`).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub tolerance: Option<Duration>,
}

/// On-disk format of a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML.
    Toml,
    /// JSON (also webhook-queue's `options.conf`).
    Json,
    /// YAML.
    Yaml,
}

impl Format {
    fn detect(path: Option<&Path>, text: &str) -> Format {
        let ext = path
            .and_then(|p| p.extension())
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("toml") => Format::Toml,
            Some("json") => Format::Json,
            Some("yaml" | "yml") => Format::Yaml,
            _ if text.trim_start().starts_with('{') => Format::Json,
            _ => Format::Toml,
        }
    }

    fn file_format(self) -> config::FileFormat {
        match self {
            Format::Toml => config::FileFormat::Toml,
            Format::Json => config::FileFormat::Json,
            Format::Yaml => config::FileFormat::Yaml,
        }
    }
}

/// Where the running configuration came from, so reload and setPassword can go back to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The file, or `None` for the built-in example.
    pub path: Option<PathBuf>,
    /// Its format.
    pub format: Format,
    /// Whether it was in webhook-queue's shape.
    pub legacy: bool,
}

/// Reads and parses a config file (or the built-in example), applies environment
/// overrides, and returns the raw model. Call [`crate::settings::Settings::load`] to get
/// validated settings.
pub fn read(path: Option<&Path>) -> Result<(Config, Source), Error> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| Error::Io {
            path: p.display().to_string(),
            message: e.to_string(),
        })?,
        None => EXAMPLE.to_owned(),
    };
    parse(path, &text, std::env::vars())
}

/// [`read`] with the text and environment given: the testable core.
pub fn parse(
    path: Option<&Path>,
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Config, Source), Error> {
    let format = Format::detect(path, text);
    let file = config::Config::builder()
        .add_source(config::File::from_str(text, format.file_format()))
        .build()
        .map_err(|e| Error::Parse(e.to_string()))?;
    let legacy = legacy::is_legacy(&file);
    let base = if legacy {
        let old: legacy::LegacyConfig = deserialize(file)?;
        let native = old.into_native();
        config::Config::try_from(&native).map_err(|e| Error::Parse(e.to_string()))?
    } else {
        file
    };
    let overrides: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("BROKER__"))
        .collect();
    let merged = config::Config::builder()
        .add_source(base)
        .add_source(
            config::Environment::with_prefix("BROKER")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        )
        .build()
        .map_err(|e| Error::Parse(e.to_string()))?;
    let cfg: Config = deserialize(merged)?;
    Ok((
        cfg,
        Source {
            path: path.map(Path::to_path_buf),
            format,
            legacy,
        },
    ))
}

/// Deserializes with the path of the failing key in the error.
fn deserialize<T: serde::de::DeserializeOwned>(c: config::Config) -> Result<T, Error> {
    // `config` keeps values as a tree; going through serde_path_to_error names the key
    // (`queues[0].auth.method`) in unknown-field and wrong-type errors.
    let value: config::Value = c
        .try_deserialize()
        .map_err(|e| Error::Parse(e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        Error::Invalid(vec![crate::error::KeyError {
            key: if path == "." { String::new() } else { path },
            message: inner,
        }])
    })
}

#[cfg(test)]
mod tests;
