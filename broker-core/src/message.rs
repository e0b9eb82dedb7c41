//! A message and what a publisher hands in to make one.

use std::sync::Arc;

use bytes::Bytes;

/// A message as kept in a queue. Shared as `Arc<Message>`: every subscriber and reader
/// gets the same allocation, and the body is `Bytes`, never copied after ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A message before the queue has given it an offset.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The body.
    pub body: Bytes,
    /// Its content type.
    pub content_type: Option<Arc<str>>,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
}

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(is_json_content_type("application/cloudevents+json"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/jsonx"));
    }
}
