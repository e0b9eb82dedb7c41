//! webhook-queue's `options.conf` shape, accepted unchanged and converted to the native one.

use serde::Deserialize;

use super::{AuthConfig, Config, LimitsConfig, QueueConfig, Secret, ServerConfig, UserConfig};

/// A file is in webhook-queue's shape when it has its top-level listener keys.
pub(super) fn is_legacy(c: &config::Config) -> bool {
    c.get_string("listen_host").is_ok() || c.get_int("listen_port").is_ok()
}

/// webhook-queue's top-level object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LegacyConfig {
    /// Listen host.
    listen_host: String,
    /// Listen port.
    listen_port: u16,
    /// Users.
    #[serde(default)]
    users: Vec<LegacyUser>,
    /// Queues.
    #[serde(default)]
    queues: Vec<LegacyQueue>,
    /// Global `max_message_count`.
    max_message_count: Option<usize>,
    /// Global `max_message_size`.
    max_message_size: Option<usize>,
    /// Global `max_queue_size`.
    max_queue_size: Option<usize>,
}

/// webhook-queue's user object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyUser {
    /// Login name.
    name: String,
    /// `TYPE;SALT;HASH`.
    pass_hash: Secret,
    /// Queues the user may listen to (null allowed).
    #[serde(default)]
    queues: Option<Vec<String>>,
    /// May call /reload.
    #[serde(default)]
    can_reload: Option<bool>,
}

/// webhook-queue's queue object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyQueue {
    /// Queue name.
    name: String,
    /// Allowed client IPs (null or empty allows all).
    #[serde(default)]
    whitelist_ip: Option<Vec<String>>,
    /// `{method, key, header_name}` (null allowed).
    #[serde(default)]
    auth: Option<LegacyAuth>,
    /// Override.
    max_message_count: Option<usize>,
    /// Override.
    max_message_size: Option<usize>,
    /// Override.
    max_queue_size: Option<usize>,
}

/// webhook-queue's auth object; every field optional as there.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyAuth {
    /// `hmac-sha256`, `hmac-sha512`, …
    method: Option<String>,
    /// The HMAC key.
    key: Option<Secret>,
    /// Header carrying the hex signature.
    header_name: Option<String>,
}

impl LegacyConfig {
    /// The same configuration in the native shape.
    pub(super) fn into_native(self) -> Config {
        let defaults = LimitsConfig::default();
        let host = if self.listen_host.contains(':') {
            format!("[{}]", self.listen_host)
        } else {
            self.listen_host
        };
        Config {
            server: ServerConfig {
                listen: format!("{host}:{}", self.listen_port),
                ..ServerConfig::default()
            },
            limits: LimitsConfig {
                max_message_count: self.max_message_count.unwrap_or(defaults.max_message_count),
                max_message_size: self.max_message_size.unwrap_or(defaults.max_message_size),
                max_queue_size: self.max_queue_size.unwrap_or(defaults.max_queue_size),
                ..defaults
            },
            users: self
                .users
                .into_iter()
                .map(|u| UserConfig {
                    name: u.name,
                    pass_hash: u.pass_hash,
                    queues: u.queues.unwrap_or_default(),
                    can_reload: u.can_reload.unwrap_or(false),
                    publish: Vec::new(),
                })
                .collect(),
            queues: self
                .queues
                .into_iter()
                .map(|q| QueueConfig {
                    name: q.name,
                    // webhook-queue ignores an auth block without a method.
                    auth: q.auth.and_then(|a| {
                        a.method.map(|method| AuthConfig {
                            method,
                            key: a.key,
                            keys: Vec::new(),
                            header_name: a.header_name,
                            tolerance: None,
                        })
                    }),
                    allow_ips: q.whitelist_ip.unwrap_or_default(),
                    kind: Default::default(),
                    content_type: None,
                    max_message_count: q.max_message_count,
                    max_message_size: q.max_message_size,
                    max_queue_size: q.max_queue_size,
                    max_queues: None,
                    webhooks: Vec::new(),
                })
                .collect(),
            ..Config::default()
        }
    }
}
