//! JSON shapes of the HTTP API. A message body is rendered by what it is: JSON (declared
//! by its content type, and valid) as `"data": <value>`, other UTF-8 as `"body"`,
//! anything else as `"body_base64"`. Batch elements use the same three keys, so what a
//! reader gets can be published again unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use broker_core::message::{BodyRepr, Message, NewMessage};
use broker_core::Batch;
use bytes::Bytes;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use utoipa::ToSchema;

/// `200` of a single publish.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Published {
    /// Always true.
    pub success: bool,
    /// The queue.
    pub queue: String,
    /// Offset given to the message (the last one for a batch).
    pub offset: u64,
    /// The queue's epoch.
    pub epoch: String,
    /// Connections notified (notify-kind queues only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delivered: Option<usize>,
    /// True when the `Idempotency-Key` was stored before: `offset` is the first
    /// publish's, nothing new was stored.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub duplicate: bool,
}

/// `200` of a batch publish.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct BatchPublished {
    /// Always true.
    pub success: bool,
    /// The queue.
    pub queue: String,
    /// Offset of the first message.
    pub first_offset: u64,
    /// Offset of the last message.
    pub offset: u64,
    /// How many were published.
    pub count: usize,
    /// The queue's epoch.
    pub epoch: String,
    /// Connections notified (notify-kind queues only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delivered: Option<usize>,
    /// Elements not stored again: their `id` was stored before (or repeated in the
    /// batch). When nothing new was stored, the offsets are the first publish's.
    #[serde(skip_serializing_if = "is_zero", default)]
    pub duplicates: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// An idempotency key: 1 to 255 visible ASCII characters.
pub fn idempotency_key(bytes: &[u8]) -> Option<Arc<str>> {
    let ok =
        !bytes.is_empty() && bytes.len() <= 255 && bytes.iter().all(|b| (0x21..=0x7e).contains(b));
    ok.then(|| Arc::from(std::str::from_utf8(bytes).expect("checked ASCII")))
}

/// `200` of a delayed publish (`delay=` or `at=`): offsets are given when due.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Scheduled {
    /// Always true.
    pub success: bool,
    /// The queue.
    pub queue: String,
    /// Always true.
    pub scheduled: bool,
    /// How many messages wait.
    pub count: usize,
    /// When they become visible (RFC 3339, UTC).
    pub deliver_at: String,
}

/// What a single publish answers.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum PublishReply {
    /// Stored.
    Published(Published),
    /// Scheduled (`delay=`, `at=`).
    Scheduled(Scheduled),
}

/// What a batch publish answers.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchReply {
    /// Stored.
    Published(BatchPublished),
    /// Scheduled (`delay=`, `at=`).
    Scheduled(Scheduled),
}

/// `POST /v1/queues/{q}/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The messages, in order.
    pub messages: Vec<BatchElement>,
}

/// One message of a batch: exactly one of `data`, `body`, `body_base64`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchElement {
    /// A JSON value (stored as its JSON text, content type `application/json`).
    #[serde(default)]
    #[schema(value_type = Option<serde_json::Value>)]
    pub data: Option<Box<RawValue>>,
    /// A UTF-8 body.
    #[serde(default)]
    pub body: Option<String>,
    /// A binary body, base64.
    #[serde(default)]
    pub body_base64: Option<String>,
    /// Content type to record.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Headers to keep with the message.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Its idempotency key (as the `Idempotency-Key` header of a single publish).
    #[serde(default)]
    pub id: Option<String>,
}

impl BatchElement {
    /// Converts to a message; the error says what is wrong with this element.
    pub fn into_message(self) -> Result<NewMessage, String> {
        let given = [
            self.data.is_some(),
            self.body.is_some(),
            self.body_base64.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err("needs exactly one of `data`, `body`, `body_base64`".into());
        }
        let (body, default_ct) = if let Some(d) = self.data {
            let raw: Box<str> = d.into();
            (Bytes::from(raw.into_string()), Some("application/json"))
        } else if let Some(b) = self.body {
            (Bytes::from(b), None)
        } else {
            let b64 = self.body_base64.unwrap_or_default();
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|_| "`body_base64` is not valid base64".to_owned())?;
            (Bytes::from(raw), None)
        };
        let content_type = self.content_type.as_deref().or(default_ct).map(Arc::from);
        let id = match &self.id {
            Some(k) => Some(
                idempotency_key(k.as_bytes())
                    .ok_or("`id` must be 1 to 255 visible ASCII characters")?,
            ),
            None => None,
        };
        Ok(NewMessage {
            id,
            audience: None,
            body,
            content_type,
            headers: self.headers.into_iter().collect(),
        })
    }
}

/// A message as readers get it: its body as exactly one of `data` (JSON), `body`
/// (UTF-8 text) or `body_base64` (anything else).
#[derive(Serialize, ToSchema)]
pub struct WireMessage<'a> {
    /// Its offset.
    pub offset: u64,
    /// When the broker accepted it (RFC 3339, UTC, milliseconds).
    pub received_at: String,
    /// Its content type, if it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<&'a str>,
    /// Its headers, if any.
    #[serde(skip_serializing_if = "Headers::is_empty")]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub headers: Headers<'a>,
    /// The body.
    #[serde(flatten)]
    #[schema(value_type = BodyForms)]
    pub body: BodyRepr<'a>,
}

/// How a body is written (one of the three).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct BodyForms {
    /// A JSON body (declared JSON by its content type, and valid), as is.
    data: Option<serde_json::Value>,
    /// A UTF-8 body.
    body: Option<String>,
    /// Any other body, base64.
    body_base64: Option<String>,
}

/// Headers as a JSON object.
pub struct Headers<'a>(&'a [(String, String)]);

impl Headers<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'a> WireMessage<'a> {
    /// Renders one message.
    pub fn of(m: &'a Message) -> Self {
        let received_at = chrono::DateTime::from_timestamp_millis(m.received_at_ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        WireMessage {
            offset: m.offset,
            received_at,
            content_type: m.content_type.as_deref(),
            headers: Headers(&m.headers),
            body: BodyRepr::of(m),
        }
    }
}

/// A native read's reply.
#[derive(Serialize, ToSchema)]
pub struct ReadReply<'a> {
    /// The queue.
    pub queue: &'a str,
    /// Its epoch; pass it back with `since` to resume.
    pub epoch: &'a str,
    /// Its newest offset.
    pub offset: u64,
    /// The messages after `since`.
    pub messages: Vec<WireMessage<'a>>,
}

impl<'a> ReadReply<'a> {
    /// Renders a batch of `queue`.
    pub fn of(queue: &'a str, b: &'a Batch) -> Self {
        ReadReply {
            queue,
            epoch: &b.epoch,
            offset: b.head,
            messages: b.messages.iter().map(|m| WireMessage::of(m)).collect(),
        }
    }
}

/// webhook-queue's `MessageList`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageList {
    /// Server start time, Unix seconds, as a string.
    pub time: String,
    /// The newest message's id.
    pub current_message: u64,
    /// The messages since the last read.
    pub messages: Vec<ListedMessage>,
}

/// One entry of a `MessageList`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListedMessage {
    /// The message's id (its offset).
    pub id: u64,
    /// The body as text (invalid UTF-8 is replaced, as the format has only strings).
    pub message: String,
}

impl MessageList {
    /// Renders a consumer read in webhook-queue's shape.
    pub fn of(started_at: i64, b: &Batch) -> Self {
        MessageList {
            time: started_at.to_string(),
            current_message: b.head,
            messages: b
                .messages
                .iter()
                .map(|m| ListedMessage {
                    id: m.offset,
                    message: String::from_utf8_lossy(&m.body).into_owned(),
                })
                .collect(),
        }
    }
}

/// `PUT /v1/consumers/{client}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerRequest {
    /// The queue to read.
    #[schema(example = "q")]
    pub queue: String,
}

/// webhook-queue's `POST /setPassword`.
#[derive(Deserialize)]
pub struct SetPassword {
    /// The new password.
    pub password: String,
}

/// The error body: `{"code","message","refresh"}` plus the queue position on 410.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable, snake_case.
    pub code: String,
    /// For people.
    pub message: String,
    /// Whether the client should refresh any state derived from the stream.
    pub refresh: bool,
    /// The queue's newest offset (410 only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offset: Option<u64>,
    /// The queue's epoch (410 only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub epoch: Option<String>,
    /// Dead letters republished before a redrive stopped (with `offset`: the last
    /// dead-letter offset handled).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub redriven: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &[u8], ct: Option<&str>) -> Message {
        Message {
            content_type: ct.map(Arc::from),
            headers: vec![("x-a".into(), "1".into())],
            received_at_ms: 1_700_000_000_123,
            ..Message::new("q".into(), 7, Bytes::copy_from_slice(body))
        }
    }

    #[test]
    fn bodies_render_by_kind() {
        let j = msg(br#"{"a": [1, 2]}"#, Some("application/json"));
        let v = serde_json::to_value(WireMessage::of(&j)).unwrap();
        assert_eq!(v["data"], serde_json::json!({"a": [1, 2]}));
        assert_eq!(v["received_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["headers"]["x-a"], "1");
        let bad_json = msg(b"{nope", Some("application/json"));
        assert_eq!(
            serde_json::to_value(WireMessage::of(&bad_json)).unwrap()["body"],
            "{nope"
        );
        let text = msg(b"hello", None);
        assert_eq!(
            serde_json::to_value(WireMessage::of(&text)).unwrap()["body"],
            "hello"
        );
        let bin = msg(&[0xff, 0x00], Some("application/octet-stream"));
        assert_eq!(
            serde_json::to_value(WireMessage::of(&bin)).unwrap()["body_base64"],
            "/wA="
        );
    }

    #[test]
    fn batch_elements_roundtrip_what_readers_get() {
        let req: BatchRequest = serde_json::from_str(
            r#"{"messages":[{"data":{"k":1}},{"body":"hi","content_type":"text/plain"},{"body_base64":"/wA=","headers":{"h":"v"}}]}"#,
        )
        .unwrap();
        let msgs: Vec<NewMessage> = req
            .messages
            .into_iter()
            .map(|e| e.into_message().unwrap())
            .collect();
        assert_eq!(&msgs[0].body[..], br#"{"k":1}"#);
        assert_eq!(msgs[0].content_type.as_deref(), Some("application/json"));
        assert_eq!(&msgs[1].body[..], b"hi");
        assert_eq!(&msgs[2].body[..], &[0xff, 0x00]);
        assert_eq!(msgs[2].headers, vec![("h".to_owned(), "v".to_owned())]);
    }

    #[test]
    fn malformed_batch_elements_are_refused() {
        let two: BatchElement = serde_json::from_str(r#"{"data":1,"body":"x"}"#).unwrap();
        assert!(two.into_message().is_err());
        let none: BatchElement = serde_json::from_str(r#"{}"#).unwrap();
        assert!(none.into_message().is_err());
        let b64: BatchElement = serde_json::from_str(r#"{"body_base64":"***"}"#).unwrap();
        assert!(b64.into_message().is_err());
        assert!(serde_json::from_str::<BatchElement>(r#"{"dat":1}"#).is_err());
        assert!(serde_json::from_str::<BatchRequest>(r#"{"messages":{}}"#).is_err());
    }

    #[test]
    fn message_list_has_webhook_queue_shape() {
        let b = Batch {
            epoch: "e".into(),
            head: 9,
            messages: vec![Arc::new(msg(b"hello", None))],
        };
        let v = serde_json::to_value(MessageList::of(1600000000, &b)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"time":"1600000000","current_message":9,"messages":[{"id":7,"message":"hello"}]})
        );
    }

    #[test]
    fn error_body_roundtrip() {
        let e = ErrorBody {
            code: "refresh".into(),
            message: "m".into(),
            refresh: true,
            offset: Some(3),
            epoch: Some("e".into()),
            redriven: None,
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<ErrorBody>(&s).unwrap(), e);
        let plain = ErrorBody {
            offset: None,
            epoch: None,
            ..e
        };
        assert!(!serde_json::to_string(&plain).unwrap().contains("offset"));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![".{0,24}", "[\\x00-\\x1f\\x7f a-z:/;=-]{0,24}"]
    }

    fn element() -> impl Strategy<Value = serde_json::Value> {
        (
            proptest::option::of(prop_oneof![
                Just(serde_json::json!({"a": 1})),
                any::<i64>().prop_map(serde_json::Value::from),
                text().prop_map(serde_json::Value::from),
            ]),
            proptest::option::of(text()),
            proptest::option::of("[A-Za-z0-9+/=!]{0,16}"),
            proptest::option::of(text()),
            proptest::collection::btree_map(text(), text(), 0..3),
        )
            .prop_map(|(data, body, b64, ct, headers)| {
                let mut o = serde_json::Map::new();
                if let Some(d) = data {
                    o.insert("data".into(), d);
                }
                if let Some(b) = body {
                    o.insert("body".into(), b.into());
                }
                if let Some(b) = b64 {
                    o.insert("body_base64".into(), b.into());
                }
                if let Some(c) = ct {
                    o.insert("content_type".into(), c.into());
                }
                o.insert("headers".into(), serde_json::json!(headers));
                serde_json::Value::Object(o)
            })
    }

    proptest! {
        /// Any batch element: a message whose headers and content type a store can hold
        /// (or a reason it is refused), never a panic; with exactly one body field.
        #[test]
        fn batch_elements_become_messages_or_reasons(v in element()) {
            let Ok(e) = serde_json::from_value::<BatchElement>(v.clone()) else {
                return Ok(());
            };
            let bodies = ["data", "body", "body_base64"].iter().filter(|k| v.get(**k).is_some()).count();
            match e.into_message() {
                Ok(m) => {
                    prop_assert_eq!(bodies, 1);
                    if broker_core::message::header_problem(&m.headers, m.content_type.as_deref()).is_none() {
                        for (k, val) in &m.headers {
                            prop_assert!(!k.is_empty() && !k.to_ascii_lowercase().starts_with("x-broker-"));
                            prop_assert!(!val.chars().any(|c| c.is_control() && c != '\t'));
                        }
                    }
                }
                Err(reason) => prop_assert!(!reason.is_empty()),
            }
        }

        /// Any text as a batch body: parsed or refused, never a panic.
        #[test]
        fn any_batch_body_parses_or_is_refused(t in ".{0,200}") {
            let _ = serde_json::from_str::<Vec<BatchElement>>(&t);
        }
    }
}
