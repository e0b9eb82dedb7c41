//! A message and what a publisher hands in to make one.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use base64::Engine;
use bytes::Bytes;
use bytestring::ByteString;
use serde::Serialize;
use serde_json::value::RawValue;

/// A message as kept in a queue. Shared as `Arc<Message>`: every subscriber and reader
/// gets the same allocation, and the body is `Bytes`, never copied after ingest.
#[derive(Debug, Clone)]
pub struct Message {
    /// The queue it belongs to.
    pub queue: Arc<str>,
    /// Position in the queue: 1 for the first message, +1 per message.
    pub offset: u64,
    /// The body as received.
    pub body: Bytes,
    /// The `Content-Type` it was published with, if any.
    pub content_type: Option<Arc<str>>,
    /// Headers given with the message (batch elements may carry some).
    pub headers: Vec<(String, String)>,
    /// Unix time in milliseconds at which the broker accepted it.
    pub received_at_ms: i64,
    /// When this process accepted it (for delivery latency; not persisted).
    pub accepted: Instant,
    /// The WebSocket `message` event of this message, encoded by the first session that
    /// sends it and shared by all others: a broadcast to N sessions encodes once.
    pub ws_frame: OnceLock<ByteString>,
    /// The session-independent part of its WAMP `EVENT`, encoded once like `ws_frame`.
    pub wamp_event: OnceLock<String>,
    /// Which WebSocket sessions it is for, when not all (not persisted).
    pub audience: Option<Arc<Audience>>,
    /// Its idempotency key, if it was published with one (kept with the message).
    pub id: Option<Arc<str>>,
}

impl Message {
    /// A message at `offset` of `queue` with `body`: no content type, headers or
    /// audience, received now (set fields with struct update syntax to change them).
    pub fn new(queue: Arc<str>, offset: u64, body: Bytes) -> Self {
        Message {
            queue,
            offset,
            body,
            content_type: None,
            headers: Vec::new(),
            received_at_ms: now_ms(),
            accepted: Instant::now(),
            ws_frame: OnceLock::new(),
            wamp_event: OnceLock::new(),
            audience: None,
            id: None,
        }
    }
}

/// The WebSocket sessions a message is for, by numeric session id: Crossbar's
/// `exclude` / `eligible` publish options and WAMP's `exclude_me`. It concerns live
/// sessions only (session ids do not outlive a connection), so it is not persisted;
/// HTTP readers and webhooks get every message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Audience {
    /// Sessions that must not receive it.
    pub exclude: Vec<u64>,
    /// When set, only these sessions receive it.
    pub eligible: Option<Vec<u64>>,
}

impl Audience {
    /// Whether session `id` receives the message.
    pub fn admits(&self, id: u64) -> bool {
        !self.exclude.contains(&id) && self.eligible.as_ref().is_none_or(|e| e.contains(&id))
    }
}

impl Message {
    /// Whether the body is declared as JSON (`application/json` or `…+json`).
    pub fn is_json(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(is_json_content_type)
    }
}

/// Whether a `Content-Type` value declares JSON.
pub fn is_json_content_type(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// How a body appears in JSON: a JSON body (declared by its content type, and valid) as
/// `"data": <value>`, other UTF-8 as `"body"`, anything else as `"body_base64"`.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyRepr<'a> {
    /// JSON, embedded as is (no re-encoding).
    Data(&'a RawValue),
    /// UTF-8 text.
    Body(&'a str),
    /// Anything else.
    BodyBase64(String),
}

impl<'a> BodyRepr<'a> {
    /// Picks the representation of a message body.
    pub fn of(m: &'a Message) -> Self {
        if m.is_json() {
            if let Ok(raw) = serde_json::from_slice::<&RawValue>(&m.body) {
                return BodyRepr::Data(raw);
            }
        }
        match std::str::from_utf8(&m.body) {
            Ok(s) => BodyRepr::Body(s),
            Err(_) => {
                BodyRepr::BodyBase64(base64::engine::general_purpose::STANDARD.encode(&m.body))
            }
        }
    }
}

/// A message before the queue has given it an offset.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Its idempotency key: a publish repeated with the same key (within the store's
    /// window) is not stored again (JetStream's message id on a NATS cluster).
    pub id: Option<Arc<str>>,
    /// The body.
    pub body: Bytes,
    /// Its content type.
    pub content_type: Option<Arc<str>>,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Which WebSocket sessions it is for, when not all.
    pub audience: Option<Arc<Audience>>,
}

impl NewMessage {
    /// The message once its log has given it `offset` in `queue`, received at `at_ms`.
    pub fn into_message(self, queue: Arc<str>, offset: u64, at_ms: i64) -> Message {
        Message {
            content_type: self.content_type,
            headers: self.headers,
            received_at_ms: at_ms,
            audience: self.audience,
            id: self.id,
            ..Message::new(queue, offset, self.body)
        }
    }
}

impl From<Bytes> for NewMessage {
    fn from(body: Bytes) -> Self {
        NewMessage {
            id: None,
            body,
            content_type: None,
            headers: Vec::new(),
            audience: None,
        }
    }
}

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The prefix of the headers the broker itself sets (dead-letter provenance).
pub const BROKER_HEADER_PREFIX: &str = "x-broker-";
/// Headers a redrive sets for the webhook actors (which target, which id): never sent on.
pub const REDRIVE_HEADER_PREFIX: &str = "x-broker-redrive-";

/// `headers` without the broker's own (`x-broker-*`).
pub fn without_broker_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !k.starts_with(BROKER_HEADER_PREFIX))
        .cloned()
        .collect()
}

/// The value of a `content-type` header among `headers` (any case).
pub fn content_type_of(headers: &[(String, String)]) -> Option<std::sync::Arc<str>> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| std::sync::Arc::from(v.as_str()))
}

/// Headers a message's own headers never set on a webhook delivery: connection-level
/// and hop-by-hop ones (the HTTP client sets them), credentials, the body's type (the
/// message's content type is sent as such), and the Standard Webhooks headers the broker
/// signs with (`webhook-*`).
const NOT_FORWARDED: &[&str] = &[
    "host",
    "authorization",
    "proxy-authorization",
    "cookie",
    "content-length",
    "content-type",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// Whether a message's header `name` is forwarded to webhook targets.
pub fn forwardable(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !NOT_FORWARDED.contains(&lower.as_str())
        && !lower.starts_with("webhook-")
        && !lower.starts_with(REDRIVE_HEADER_PREFIX)
}

/// Why a publisher-supplied header or content type cannot be kept, if it cannot: header
/// names are HTTP tokens and not the broker's own (`x-broker-*`); values and content
/// types hold no control characters (a store could refuse them, and they would be sent
/// on as HTTP headers).
pub fn header_problem(headers: &[(String, String)], content_type: Option<&str>) -> Option<String> {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let clean = |v: &str| !v.chars().any(|c| c.is_control() && c != '\t');
    for (k, v) in headers {
        if k.is_empty() || !k.chars().all(is_tchar) {
            return Some(format!(
                "header name `{}` is not an HTTP token",
                k.escape_debug()
            ));
        }
        if k.to_ascii_lowercase().starts_with(BROKER_HEADER_PREFIX) {
            return Some(format!(
                "header `{k}`: `{BROKER_HEADER_PREFIX}*` headers are the broker's own"
            ));
        }
        if !clean(v) {
            return Some(format!("header `{k}` holds a control character"));
        }
    }
    match content_type {
        Some(ct) if !clean(ct) => Some("the content type holds a control character".to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publisher_headers_are_tokens_not_the_brokers_and_clean() {
        let h = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        assert_eq!(
            header_problem(&h("X-Trace", "a\tb"), Some("text/plain")),
            None
        );
        for (headers, ct) in [
            (h("x-broker-original-queue", "q"), None),
            (h("X-Broker-Target", "t"), None),
            (h("bad name", "v"), None),
            (h("", "v"), None),
            (h("x", "a\u{0}"), None),
            (h("x", "a\r\nInjected: 1"), None),
            (vec![], Some("a\u{0}")),
        ] {
            assert!(header_problem(&headers, ct).is_some(), "{headers:?} {ct:?}");
        }
    }

    #[test]
    fn only_end_to_end_headers_are_forwarded() {
        for name in [
            "Host",
            "authorization",
            "Cookie",
            "Content-Length",
            "Content-Type",
            "Transfer-Encoding",
            "webhook-id",
            "Webhook-Signature",
            "x-broker-redrive-for",
        ] {
            assert!(!forwardable(name), "{name}");
        }
        for name in ["x-trace", "x-broker-original-queue", "user-agent-hint"] {
            assert!(forwardable(name), "{name}");
        }
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(is_json_content_type("application/cloudevents+json"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/jsonx"));
    }
}
