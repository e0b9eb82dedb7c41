//! Validated, compiled configuration: what the actors and the HTTP layer read at run time.
//! Built once per load or reload; swapped whole, so a request sees one consistent version.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;

use crate::auth::{parse_nets, IngestAuth, PasswordHash};
use crate::config::{
    self, Config, ContentRule, CronConfig, LimitsConfig, QueueConfig, QueueKind, Secret, Source,
};
use crate::delivery::WebhookSpec;
use crate::error::{Error, KeyError};
use crate::schedule::CronSpec;

/// The settings of the running broker, swapped whole by a reload; shared by the broker
/// and its front door.
pub(crate) type SharedSettings = Arc<RwLock<Arc<Settings>>>;

/// Everything about one configured queue or queue pattern.
#[derive(Debug)]
pub struct QueueSpec {
    /// The configured name: a queue name or a `prefix.*` pattern.
    pub name: String,
    /// Effective limits (defaults merged with overrides).
    pub limits: LimitsConfig,
    /// Client networks allowed to publish; empty allows all.
    pub allow_ips: Vec<IpNet>,
    /// Ingest verifier.
    pub auth: IngestAuth,
    /// Reject bodies that are not JSON (always for the notify kinds).
    pub json_only: bool,
    /// Ordinary queue or a notify route.
    pub kind: QueueKind,
    /// Webhook targets.
    pub webhooks: Vec<Arc<WebhookSpec>>,
    /// As configured (for the admin API).
    pub config: QueueConfig,
    /// Defined through the admin API rather than the config file.
    pub runtime: bool,
}

impl QueueSpec {
    /// Whether `ip` may publish here (`allow_ips` empty: anyone).
    pub fn allows_ip(&self, ip: &std::net::IpAddr) -> bool {
        self.allow_ips.is_empty() || self.allow_ips.iter().any(|n| n.contains(ip))
    }

    /// The `queue` label of metrics: the configured name, so that pattern queues share
    /// their pattern and label cardinality stays bounded by the config.
    pub fn label(&self) -> &str {
        &self.name
    }
}

/// A user that may read queues.
#[derive(Debug)]
pub struct UserSpec {
    /// Login name.
    pub name: String,
    /// Password verifier.
    pub password: PasswordHash,
    /// Granted queue names and patterns.
    pub grants: Vec<String>,
    /// May call /reload.
    pub can_reload: bool,
    /// Queues this user may publish into over WebSocket.
    pub publish: Vec<String>,
}

impl UserSpec {
    /// Whether this user may read `queue`.
    pub fn may_read(&self, queue: &str) -> bool {
        grants(&self.grants, queue)
    }
}

/// Whether a grant list (names and `prefix.*` patterns) covers `queue`.
pub fn grants(list: &[String], queue: &str) -> bool {
    list.iter().any(|g| name_matches(g, queue))
}

/// Queues and crons defined through the admin API (and the pg-hooks routes). They are
/// compiled together with the config file, so every lookup sees one consistent set.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Runtime {
    /// Runtime queues.
    pub queues: Vec<QueueConfig>,
    /// Runtime crons.
    pub crons: Vec<CronConfig>,
}

/// WebSocket settings with their secrets resolved.
#[derive(Debug)]
pub struct WsSettings {
    /// The `[ws]` section as configured.
    pub config: config::WsConfig,
    /// Resolved JWT secrets, signing first.
    pub jwt_secrets: Vec<Secret>,
    /// Resolved notify secrets.
    pub notify_secrets: Vec<Secret>,
}

/// `[pusher]` with its secret resolved and networks parsed.
#[derive(Debug)]
pub struct PusherSettings {
    /// The section as configured.
    pub config: config::PusherConfig,
    /// `key` and resolved `secret`, when requests must be signed.
    pub signing: Option<(String, Secret)>,
    /// Parsed `require_ip`.
    pub require_ip: Vec<IpNet>,
    /// Effective body limit in bytes.
    pub body_limit: usize,
}

/// The WAMP realm when `[pusher]` does not name one.
pub const DEFAULT_REALM: &str = "realm1";

/// The validated configuration.
#[derive(Debug)]
pub struct Settings {
    /// The model it was built from.
    pub config: Config,
    /// Where it came from.
    pub source: Source,
    /// Listen address.
    pub listen: SocketAddr,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// `webhooks.allow_targets`: internal networks runtime targets may reach.
    pub allow_targets: Vec<IpNet>,
    /// Admin bearer token.
    pub admin_token: Option<Secret>,
    /// Exact queue names.
    queues: HashMap<String, Arc<QueueSpec>>,
    /// `prefix.*` patterns, longest prefix first.
    patterns: Vec<(String, Arc<QueueSpec>)>,
    /// Users by name.
    pub users: HashMap<String, Arc<UserSpec>>,
    /// WebSocket settings.
    pub ws: Arc<WsSettings>,
    /// Cron entries (config and runtime).
    pub crons: Vec<Arc<CronSpec>>,
    /// The runtime definitions compiled in.
    pub runtime: Runtime,
    /// Crossbar's HTTP pusher, when configured.
    pub pusher: Option<Arc<PusherSettings>>,
}

/// Whether a queue name or `prefix.*` pattern covers `name`.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.len() > prefix.len() && name.starts_with(prefix),
        None => pattern == name,
    }
}

fn valid_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

impl Settings {
    /// Reads a file (or the built-in example) and validates it.
    pub fn load(path: Option<&Path>) -> Result<Settings, Error> {
        let (cfg, source) = config::read(path)?;
        Settings::compile(cfg, source)
    }

    /// Validates a parsed config. Collects every problem, each naming its key.
    pub fn compile(cfg: Config, source: Source) -> Result<Settings, Error> {
        Settings::compile_with(cfg, source, Runtime::default())
    }

    /// [`Settings::compile`] with runtime definitions added (keys `runtime.queues[i]`, …).
    pub fn compile_with(cfg: Config, source: Source, runtime: Runtime) -> Result<Settings, Error> {
        let mut errs = Vec::new();
        let mut err = |key: String, message: String| errs.push(KeyError { key, message });

        let listen = cfg.server.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
            err(
                "server.listen".into(),
                format!(
                    "`{}` is not an address like 127.0.0.1:8080",
                    cfg.server.listen
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let allow_targets = parse_nets(&cfg.webhooks.allow_targets).unwrap_or_else(|(i, m)| {
            err(format!("webhooks.allow_targets[{i}]"), m);
            Vec::new()
        });
        let trusted_proxies = parse_nets(&cfg.server.trusted_proxies).unwrap_or_else(|(i, m)| {
            err(format!("server.trusted_proxies[{i}]"), m);
            Vec::new()
        });
        if cfg.server.max_body_size == 0 {
            err(
                "server.max_body_size".into(),
                "must be greater than 0".into(),
            );
        }
        if cfg.storage.url != "memory://"
            && !crate::store::is_sql_url(&cfg.storage.url)
            && !crate::store::is_nats_url(&cfg.storage.url)
        {
            err(
                "storage.url".into(),
                format!(
                    "`{}` is not a storage URL: memory://, sqlite://PATH, postgres://… or nats://HOST:PORT",
                    crate::store::without_password(&cfg.storage.url)
                ),
            );
        }
        let nats = &cfg.storage.nats;
        if nats.prefix.is_empty()
            || nats.prefix.len() > 32
            || !nats
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            err(
                "storage.nats.prefix".into(),
                "must be 1 to 32 letters, digits or `-`".into(),
            );
        }
        let window = cfg.limits.idempotency_window;
        if window.is_zero() || window > std::time::Duration::from_secs(24 * 3600) {
            err(
                "limits.idempotency_window".into(),
                "must be more than 0s and at most 24h".into(),
            );
        }
        if nats.replicas > 5 {
            err(
                "storage.nats.replicas".into(),
                "JetStream keeps at most 5 replicas".into(),
            );
        }
        let admin_token = match &cfg.admin.token {
            Some(t) => match t.resolve() {
                Ok(t) if t.expose().len() >= 16 => Some(t),
                Ok(_) => {
                    err(
                        "admin.token".into(),
                        "must be at least 16 characters".into(),
                    );
                    None
                }
                Err(m) => {
                    err("admin.token".into(), m);
                    None
                }
            },
            None => None,
        };
        check_limits("limits", &cfg.limits, cfg.server.max_body_size, &mut err);

        let mut queues = HashMap::new();
        let mut patterns = Vec::new();
        let all_queues = cfg
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| (format!("queues[{i}]"), q, false))
            .chain(
                runtime
                    .queues
                    .iter()
                    .enumerate()
                    .map(|(i, q)| (format!("runtime.queues[{i}]"), q, true)),
            );
        for (key, q, is_runtime) in all_queues {
            let is_pattern = q.name.ends_with(".*");
            let base = q.name.strip_suffix(".*").unwrap_or(&q.name);
            if !valid_queue_name(base) {
                err(
                    format!("{key}.name"),
                    format!(
                        "`{}` is not a queue name (letters, digits, `.` `_` `-` `:`) or a \
                         pattern ending in `.*`",
                        q.name
                    ),
                );
                continue;
            }
            let limits = LimitsConfig {
                max_message_count: q.max_message_count.unwrap_or(cfg.limits.max_message_count),
                max_message_size: q.max_message_size.unwrap_or(cfg.limits.max_message_size),
                max_queue_size: q.max_queue_size.unwrap_or(cfg.limits.max_queue_size),
                ..cfg.limits
            };
            check_limits(&key, &limits, cfg.server.max_body_size, &mut err);
            let allow_ips = parse_nets(&q.allow_ips).unwrap_or_else(|(j, m)| {
                err(format!("{key}.allow_ips[{j}]"), m);
                Vec::new()
            });
            let auth = match q.auth.as_ref().map(resolve_auth).transpose() {
                Ok(a) => IngestAuth::compile(a.as_ref()).unwrap_or_else(|(sub, m)| {
                    err(format!("{key}.auth.{sub}"), m);
                    IngestAuth::None
                }),
                Err((sub, m)) => {
                    err(format!("{key}.auth.{sub}"), m);
                    IngestAuth::None
                }
            };
            let mut webhooks = Vec::new();
            for (j, w) in q.webhooks.iter().enumerate() {
                match WebhookSpec::compile(w) {
                    Ok(spec) => {
                        if q.webhooks[..j].iter().any(|o| o.url == w.url) {
                            err(
                                format!("{key}.webhooks[{j}].url"),
                                "the same URL twice".into(),
                            );
                        }
                        webhooks.push(Arc::new(spec));
                    }
                    Err((sub, m)) => err(format!("{key}.webhooks[{j}].{sub}"), m),
                }
            }
            let spec = Arc::new(QueueSpec {
                name: q.name.clone(),
                limits,
                allow_ips,
                auth,
                json_only: q.content_type == Some(ContentRule::Json) || q.kind != QueueKind::Queue,
                kind: q.kind,
                webhooks,
                config: q.clone(),
                runtime: is_runtime,
            });
            let dup = queues.contains_key(&q.name) || patterns.iter().any(|(p, _)| *p == q.name);
            if dup {
                err(
                    format!("{key}.name"),
                    format!("queue `{}` is defined twice", q.name),
                );
            } else if is_pattern {
                patterns.push((q.name.clone(), spec));
            } else {
                queues.insert(q.name.clone(), spec);
            }
        }
        patterns.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let exists = |name: &str| {
            queues.contains_key(name) || patterns.iter().any(|(p, _)| name_matches(p, name))
        };
        for (name, spec) in queues.iter().chain(patterns.iter().map(|(p, s)| (p, s))) {
            for (j, w) in spec.config.webhooks.iter().enumerate() {
                if let Some(dlq) = &w.dead_letter_queue {
                    if dlq == name || !exists(dlq) {
                        err(
                            format!("queue `{name}`: webhooks[{j}].dead_letter_queue"),
                            format!("`{dlq}` must be another defined queue"),
                        );
                    }
                }
            }
        }
        let mut crons: Vec<Arc<CronSpec>> = Vec::new();
        let all_crons = cfg
            .crons
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("crons[{i}]"), c))
            .chain(
                runtime
                    .crons
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (format!("runtime.crons[{i}]"), c)),
            );
        for (key, c) in all_crons {
            if crons.iter().any(|o| o.config.name == c.name) {
                err(
                    format!("{key}.name"),
                    format!("cron `{}` is defined twice", c.name),
                );
                continue;
            }
            if !exists(&c.queue) {
                err(
                    format!("{key}.queue"),
                    format!("`{}` is not a defined queue", c.queue),
                );
                continue;
            }
            match CronSpec::compile(c) {
                Ok(spec) => crons.push(spec),
                Err((sub, m)) => err(format!("{key}.{sub}"), m),
            }
        }

        let mut users = HashMap::new();
        for (i, u) in cfg.users.iter().enumerate() {
            let key = format!("users[{i}]");
            if u.name.is_empty() || u.name.contains(':') {
                err(
                    format!("{key}.name"),
                    "must be non-empty and contain no `:`".into(),
                );
                continue;
            }
            let password = match u.pass_hash.resolve().and_then(|s| PasswordHash::parse(&s)) {
                Ok(p) => p,
                Err(m) => {
                    err(format!("{key}.pass_hash"), m);
                    continue;
                }
            };
            if users.contains_key(&u.name) {
                err(
                    format!("{key}.name"),
                    format!("user `{}` is defined twice", u.name),
                );
                continue;
            }
            users.insert(
                u.name.clone(),
                Arc::new(UserSpec {
                    name: u.name.clone(),
                    password,
                    grants: u.queues.clone(),
                    can_reload: u.can_reload,
                    publish: u.publish.clone(),
                }),
            );
        }

        let w = &cfg.ws;
        let mut resolve_all = |key: &str, list: &[Secret]| -> Vec<Secret> {
            list.iter()
                .enumerate()
                .filter_map(|(i, k)| match k.resolve() {
                    Ok(k) if k.expose().len() >= 16 => Some(k),
                    Ok(_) => {
                        err(
                            format!("ws.{key}[{i}]"),
                            "must be at least 16 characters".into(),
                        );
                        None
                    }
                    Err(m) => {
                        err(format!("ws.{key}[{i}]"), m);
                        None
                    }
                })
                .collect()
        };
        let jwt_secrets = resolve_all("jwt_secrets", &w.jwt_secrets);
        let notify_secrets = resolve_all("notify_secrets", &w.notify_secrets);
        for (name, d) in [
            ("auth_timeout", w.auth_timeout),
            ("ping_interval", w.ping_interval),
            ("pong_timeout", w.pong_timeout),
        ] {
            if d.is_zero() {
                err(format!("ws.{name}"), "must be longer than 0s".into());
            }
        }
        for (name, v) in [
            ("max_frame_size", w.max_frame_size),
            ("max_subscriptions", w.max_subscriptions),
            ("max_connections_per_user", w.max_connections_per_user),
            ("max_pending_messages", w.max_pending_messages),
            ("max_pending_bytes", w.max_pending_bytes),
        ] {
            if v == 0 {
                err(format!("ws.{name}"), "must be greater than 0".into());
            }
        }
        let ws = Arc::new(WsSettings {
            config: w.clone(),
            jwt_secrets,
            notify_secrets,
        });
        let pusher = cfg
            .pusher
            .as_ref()
            .map(|p| compile_pusher(p, cfg.server.max_body_size, &mut err));

        if !errs.is_empty() {
            return Err(Error::Invalid(errs));
        }
        Ok(Settings {
            config: cfg,
            source,
            listen,
            trusted_proxies,
            allow_targets,
            admin_token,
            queues,
            patterns,
            users,
            ws,
            crons,
            runtime,
            pusher,
        })
    }

    /// The WAMP realm: `pusher.realm`, or `realm1`.
    pub fn realm(&self) -> &str {
        self.pusher
            .as_ref()
            .map_or(DEFAULT_REALM, |p| p.config.realm.as_str())
    }

    /// The spec of queue `name`: an exact entry, else the longest matching pattern.
    pub fn queue(&self, name: &str) -> Option<&Arc<QueueSpec>> {
        self.queues.get(name).or_else(|| {
            if !valid_queue_name(name) {
                return None;
            }
            self.patterns
                .iter()
                .find(|(p, _)| name_matches(p, name))
                .map(|(_, s)| s)
        })
    }

    /// Every configured queue and pattern, sorted by name.
    pub fn all_queues(&self) -> Vec<&Arc<QueueSpec>> {
        let mut v: Vec<&Arc<QueueSpec>> = self
            .queues
            .values()
            .chain(self.patterns.iter().map(|(_, s)| s))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Every exactly named queue (pattern queues exist only once used).
    pub fn named_queues(&self) -> impl Iterator<Item = &Arc<QueueSpec>> {
        self.queues.values()
    }

    /// Users whose hash format is weak (warned about at load).
    pub fn weak_password_users(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .users
            .values()
            .filter(|u| u.password.is_weak())
            .map(|u| u.name.as_str())
            .collect();
        v.sort_unstable();
        v
    }
}

fn resolve_auth(a: &config::AuthConfig) -> Result<config::AuthConfig, (String, String)> {
    let mut a = a.clone();
    if let Some(k) = &a.key {
        a.key = Some(k.resolve().map_err(|m| ("key".to_owned(), m))?);
    }
    for (i, k) in a.keys.iter_mut().enumerate() {
        *k = k.resolve().map_err(|m| (format!("keys[{i}]"), m))?;
    }
    Ok(a)
}

fn check_limits(
    key: &str,
    l: &LimitsConfig,
    max_body: usize,
    err: &mut impl FnMut(String, String),
) {
    for (name, v) in [
        ("max_message_count", l.max_message_count),
        ("max_message_size", l.max_message_size),
        ("max_queue_size", l.max_queue_size),
    ] {
        if v == 0 {
            err(format!("{key}.{name}"), "must be greater than 0".into());
        }
    }
    if l.max_message_size > l.max_queue_size {
        err(
            format!("{key}.max_message_size"),
            format!(
                "{} is larger than max_queue_size ({}): such a message could never be kept",
                l.max_message_size, l.max_queue_size
            ),
        );
    }
    if l.max_message_size > max_body {
        err(
            format!("{key}.max_message_size"),
            format!(
                "{} is larger than server.max_body_size ({max_body})",
                l.max_message_size
            ),
        );
    }
}

/// Routes of the broker that `pusher.path` must not shadow.
const RESERVED_PATHS: &[&str] = &[
    "/v1",
    "/q",
    "/listen",
    "/read",
    "/unlisten",
    "/setPassword",
    "/reload",
    "/time",
    "/metrics",
    "/healthz",
    "/readyz",
    "/queues",
    "/messages",
    "/cron",
    "/ws",
];

fn compile_pusher(
    p: &config::PusherConfig,
    max_body_size: usize,
    err: &mut impl FnMut(String, String),
) -> Arc<PusherSettings> {
    let path_ok = p.path.len() > 1
        && p.path.starts_with('/')
        && !p.path.ends_with('/')
        && p.path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.'));
    if !path_ok {
        err(
            "pusher.path".into(),
            format!("`{}` is not a path like /push", p.path),
        );
    } else if RESERVED_PATHS
        .iter()
        .any(|r| p.path == *r || p.path.starts_with(&format!("{r}/")))
    {
        err(
            "pusher.path".into(),
            format!("`{}` is a route of the broker already", p.path),
        );
    }
    if p.realm.is_empty() {
        err("pusher.realm".into(), "must not be empty".into());
    }
    let signing = match (&p.key, &p.secret) {
        (Some(k), Some(s)) => match s.resolve() {
            Ok(s) if !k.is_empty() && !s.expose().is_empty() => {
                if p.timestamp_delta_limit == 0 {
                    err(
                        "pusher.timestamp_delta_limit".into(),
                        "must be greater than 0 with a secret: nonces are remembered for \
                         that window to refuse replays"
                            .into(),
                    );
                }
                Some((k.clone(), s))
            }
            Ok(_) => {
                err(
                    "pusher.key".into(),
                    "key and secret must not be empty".into(),
                );
                None
            }
            Err(m) => {
                err("pusher.secret".into(), m);
                None
            }
        },
        (None, None) => None,
        (Some(_), None) => {
            err("pusher.secret".into(), "a key needs a secret".into());
            None
        }
        (None, Some(_)) => {
            err("pusher.key".into(), "a secret needs a key".into());
            None
        }
    };
    let require_ip = parse_nets(&p.require_ip).unwrap_or_else(|(i, m)| {
        err(format!("pusher.require_ip[{i}]"), m);
        Vec::new()
    });
    let body_limit = match p.post_body_limit {
        0 => max_body_size,
        n => n.min(max_body_size),
    };
    Arc::new(PusherSettings {
        config: p.clone(),
        signing,
        require_ip,
        body_limit,
    })
}
