//! The native WebSocket protocol: JSON text frames.
//!
//! Client → server: `{"action": …, "id"?: …, …}`. Every reply to a frame that carried an
//! `id` echoes it. Unknown or missing actions get `{"event":"error","code":"not_implemented"}`
//! (API Gateway's `$default` route); malformed JSON gets an error event and the
//! connection stays open.

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use broker_core::message::{BodyRepr, Message};

/// Close codes the server uses (documented in docs/websocket.md).
pub mod close {
    /// Server shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Malformed WebSocket framing.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A message over `ws.max_frame_size`.
    pub const TOO_BIG: u16 = 1009;
    /// Invalid or expired token in `authorize`.
    pub const INVALID_TOKEN: u16 = 4001;
    /// No `authorize` within `ws.auth_timeout`.
    pub const AUTH_TIMEOUT: u16 = 4002;
    /// The user has `ws.max_connections_per_user` connections already.
    pub const TOO_MANY_CONNECTIONS: u16 = 4003;
    /// No pong (or any frame) within `ws.pong_timeout` after a ping.
    pub const NO_PONG: u16 = 4004;
    /// The connection fell behind and `ws.slow_consumer = "close"`.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Closed by an admin (`DELETE /v1/connections/{id}`).
    pub const BY_ADMIN: u16 = 4010;
    /// A reload removed the user, or a grant of a subscription the session holds.
    pub const REVOKED: u16 = 4011;
}

/// A client frame as received; which fields matter depends on `action`.
#[derive(Debug, Deserialize)]
pub struct ClientFrame {
    /// What to do.
    #[serde(default)]
    pub action: Option<String>,
    /// Correlation id, echoed in the reply.
    #[serde(default)]
    pub id: Option<Box<RawValue>>,
    /// `authorize`: the JWT.
    #[serde(default)]
    pub token: Option<String>,
    /// `subscribe`, `unsubscribe`, `publish`: the queue.
    #[serde(default)]
    pub queue: Option<String>,
    /// `subscribe`: last offset seen.
    #[serde(default)]
    pub since: Option<u64>,
    /// `subscribe`: the epoch of `since`.
    #[serde(default)]
    pub epoch: Option<String>,
    /// `publish`: the message, a JSON value.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// What a client frame asks for.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Authenticate with a token.
    Authorize(String),
    /// Subscribe, optionally resuming.
    Subscribe {
        /// Queue.
        queue: String,
        /// Last offset seen.
        since: Option<u64>,
        /// Its epoch.
        epoch: Option<String>,
    },
    /// Unsubscribe.
    Unsubscribe(String),
    /// Publish a JSON value.
    Publish {
        /// Queue.
        queue: String,
        /// The JSON text.
        data: String,
    },
    /// Application-level ping.
    Ping,
    /// Anything else (the `$default` route).
    Unknown(String),
}

/// A frame that could not be understood: `(code, message)`.
pub type FrameError = (&'static str, String);

/// A frame's correlation id (any JSON value), echoed in replies.
pub type FrameId = Option<Box<RawValue>>;

/// Parses a text frame into its correlation id and action. The id is taken first, so
/// every reply echoes it — also when a field is missing or of the wrong type, which is
/// `invalid_frame` naming the field.
pub fn parse(text: &str) -> Result<(FrameId, Action), (FrameId, FrameError)> {
    let mut fields: std::collections::BTreeMap<String, Box<RawValue>> = serde_json::from_str(text)
        .map_err(|e| {
            (
                None,
                ("invalid_json", format!("frame is not a JSON object: {e}")),
            )
        })?;
    let id = fields.remove("id").filter(|v| v.get() != "null");
    match frame_of(&fields) {
        Ok(frame) => parse_frame(id, frame),
        Err(e) => Err((id, e)),
    }
}

/// The typed fields of a frame; a mistyped one is named.
fn frame_of(
    fields: &std::collections::BTreeMap<String, Box<RawValue>>,
) -> Result<ClientFrame, FrameError> {
    fn field<T: serde::de::DeserializeOwned>(
        fields: &std::collections::BTreeMap<String, Box<RawValue>>,
        name: &str,
        what: &str,
    ) -> Result<Option<T>, FrameError> {
        match fields.get(name) {
            None => Ok(None),
            Some(raw) => serde_json::from_str::<Option<T>>(raw.get()).map_err(|_| {
                (
                    "invalid_frame",
                    format!("`{name}` must be {what}, not {}", raw.get()),
                )
            }),
        }
    }
    Ok(ClientFrame {
        action: field(fields, "action", "a string")?,
        id: None,
        token: field(fields, "token", "a string")?,
        queue: field(fields, "queue", "a string")?,
        since: field(fields, "since", "an offset (a non-negative integer)")?,
        epoch: field(fields, "epoch", "a string")?,
        data: fields.get("data").filter(|v| v.get() != "null").cloned(),
    })
}

fn parse_frame(
    id: FrameId,
    frame: ClientFrame,
) -> Result<(FrameId, Action), (FrameId, FrameError)> {
    let need = |field: Option<String>, name: &str, action: &str| {
        field.ok_or_else(|| ("invalid_frame", format!("`{action}` needs `{name}`")))
    };
    let action = frame.action.unwrap_or_default();
    let parsed = match action.as_str() {
        "authorize" => need(frame.token, "token", "authorize").map(Action::Authorize),
        "subscribe" => need(frame.queue, "queue", "subscribe").map(|queue| Action::Subscribe {
            queue,
            since: frame.since,
            epoch: frame.epoch,
        }),
        "unsubscribe" => need(frame.queue, "queue", "unsubscribe").map(Action::Unsubscribe),
        "publish" => match (frame.queue, frame.data) {
            (Some(queue), Some(data)) => Ok(Action::Publish {
                queue,
                data: String::from(Box::<str>::from(data)),
            }),
            _ => Err((
                "invalid_frame",
                "`publish` needs `queue` and `data`".to_owned(),
            )),
        },
        "ping" => Ok(Action::Ping),
        _ => Ok(Action::Unknown(action)),
    };
    match parsed {
        Ok(a) => Ok((id, a)),
        Err(e) => Err((id, e)),
    }
}

fn encode<T: Serialize>(v: &T) -> ByteString {
    ByteString::from(serde_json::to_string(v).expect("events always serialize"))
}

/// `{"event":"connected","connection_id","user"}`
pub fn connected(connection_id: &str, user: &str) -> ByteString {
    #[derive(Serialize)]
    struct E<'a> {
        event: &'static str,
        connection_id: &'a str,
        user: &'a str,
    }
    encode(&E {
        event: "connected",
        connection_id,
        user,
    })
}

/// `{"event":"subscribed","queue","offset","epoch","recovered"}`
pub fn subscribed(
    id: Option<&RawValue>,
    queue: &str,
    offset: u64,
    epoch: &str,
    recovered: bool,
) -> ByteString {
    #[derive(Serialize)]
    struct E<'a> {
        event: &'static str,
        queue: &'a str,
        offset: u64,
        epoch: &'a str,
        recovered: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    }
    encode(&E {
        event: "subscribed",
        queue,
        offset,
        epoch,
        recovered,
        id,
    })
}

/// `{"event":"unsubscribed","queue"}`
pub fn unsubscribed(id: Option<&RawValue>, queue: &str) -> ByteString {
    #[derive(Serialize)]
    struct E<'a> {
        event: &'static str,
        queue: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    }
    encode(&E {
        event: "unsubscribed",
        queue,
        id,
    })
}

/// `{"event":"message","queue","offset","data"|"body"|"body_base64"}`; identical for every
/// session, so callers cache it in [`Message::ws_frame`].
pub fn message(m: &Message) -> ByteString {
    #[derive(Serialize)]
    struct E<'a> {
        event: &'static str,
        queue: &'a str,
        offset: u64,
        #[serde(flatten)]
        body: BodyRepr<'a>,
    }
    encode(&E {
        event: "message",
        queue: &m.queue,
        offset: m.offset,
        body: BodyRepr::of(m),
    })
}

/// `{"event":"notify","data":…}`; `data` is JSON text.
pub fn notify(data: &[u8]) -> Option<ByteString> {
    let raw: &RawValue = serde_json::from_slice(data).ok()?;
    #[derive(Serialize)]
    struct E<'a> {
        event: &'static str,
        data: &'a RawValue,
    }
    Some(encode(&E {
        event: "notify",
        data: raw,
    }))
}

/// `{"event":"refresh","queue","reason","offset","epoch"}`
pub fn refresh(queue: &str, reason: &str, offset: u64, epoch: &str) -> ByteString {
    #[derive(Serialize)]
    struct E<'a> {
        event: &'static str,
        queue: &'a str,
        reason: &'a str,
        offset: u64,
        epoch: &'a str,
    }
    encode(&E {
        event: "refresh",
        queue,
        reason,
        offset,
        epoch,
    })
}

/// `{"event":"published","queue","offset","epoch"}` (+`delivered` for notify queues)
pub fn published(
    id: Option<&RawValue>,
    queue: &str,
    offset: u64,
    epoch: &str,
    delivered: Option<usize>,
) -> ByteString {
    #[derive(Serialize)]
    struct E<'a> {
        event: &'static str,
        queue: &'a str,
        offset: u64,
        epoch: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        delivered: Option<usize>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    }
    encode(&E {
        event: "published",
        queue,
        offset,
        epoch,
        delivered,
        id,
    })
}

/// `{"action":"pong"}`
pub fn pong(id: Option<&RawValue>) -> ByteString {
    #[derive(Serialize)]
    struct E<'a> {
        action: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    }
    encode(&E { action: "pong", id })
}

/// `{"event":"error","code","message"}`
pub fn error(id: Option<&RawValue>, code: &str, message: &str) -> ByteString {
    #[derive(Serialize)]
    struct E<'a> {
        event: &'static str,
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    }
    encode(&E {
        event: "error",
        code,
        message,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn v(b: &ByteString) -> serde_json::Value {
        serde_json::from_str(b).unwrap()
    }

    #[test]
    fn parses_every_action_and_keeps_the_id() {
        let (id, a) =
            parse(r#"{"action":"subscribe","queue":"q","since":3,"epoch":"e","id":7}"#).unwrap();
        assert_eq!(id.unwrap().get(), "7");
        assert_eq!(
            a,
            Action::Subscribe {
                queue: "q".into(),
                since: Some(3),
                epoch: Some("e".into())
            }
        );
        let (_, a) = parse(r#"{"action":"publish","queue":"q","data":{"a":[1, 2]}}"#).unwrap();
        assert_eq!(
            a,
            Action::Publish {
                queue: "q".into(),
                data: r#"{"a":[1, 2]}"#.into()
            }
        );
        assert_eq!(parse(r#"{"action":"ping"}"#).unwrap().1, Action::Ping);
        assert_eq!(
            parse(r#"{"action":"authorize","token":"t"}"#).unwrap().1,
            Action::Authorize("t".into())
        );
        assert_eq!(
            parse(r#"{"action":"unsubscribe","queue":"q"}"#).unwrap().1,
            Action::Unsubscribe("q".into())
        );
        assert_eq!(
            parse(r#"{"action":"sendmessage"}"#).unwrap().1,
            Action::Unknown("sendmessage".into())
        );
        assert_eq!(
            parse(r#"{"hello":1}"#).unwrap().1,
            Action::Unknown(String::new())
        );
    }

    #[test]
    fn malformed_frames() {
        let (id, (code, _)) = parse("{nope").unwrap_err();
        assert_eq!((id.is_none(), code), (true, "invalid_json"));
        let (id, (code, _)) = parse(r#"{"action":"subscribe","id":"x"}"#).unwrap_err();
        assert_eq!((id.unwrap().get(), code), (r#""x""#, "invalid_frame"));
        assert!(parse("[1,2]").is_err());
    }

    #[test]
    fn a_mistyped_field_is_named_and_the_id_still_echoed() {
        for (frame, field) in [
            (
                r#"{"action":"subscribe","queue":"q","since":"x","id":7}"#,
                "`since`",
            ),
            (
                r#"{"action":"subscribe","queue":"q","since":-1,"id":7}"#,
                "`since`",
            ),
            (r#"{"action":"subscribe","queue":5,"id":7}"#, "`queue`"),
            (r#"{"action":["subscribe"],"id":7}"#, "`action`"),
        ] {
            let (id, (code, message)) = parse(frame).unwrap_err();
            assert_eq!(
                (id.map(|i| i.get().to_owned()), code),
                (Some("7".into()), "invalid_frame"),
                "{frame}"
            );
            assert!(message.contains(field), "{frame}: {message}");
        }
        let (id, a) = parse(r#"{"action":"ping","id":{"k":[1]}}"#).unwrap();
        assert_eq!((id.unwrap().get(), a), (r#"{"k":[1]}"#, Action::Ping));
    }

    #[test]
    fn events_have_the_documented_shape() {
        let id = RawValue::from_string("\"r1\"".into()).unwrap();
        assert_eq!(
            v(&subscribed(Some(&id), "q", 4, "e", true)),
            serde_json::json!({"event":"subscribed","queue":"q","offset":4,"epoch":"e","recovered":true,"id":"r1"})
        );
        assert_eq!(v(&pong(None)), serde_json::json!({"action":"pong"}));
        assert_eq!(
            v(&error(Some(&id), "not_implemented", "m")),
            serde_json::json!({"event":"error","code":"not_implemented","message":"m","id":"r1"})
        );
        assert_eq!(
            v(&notify(br#"{"x":1}"#).unwrap()),
            serde_json::json!({"event":"notify","data":{"x":1}})
        );
        assert!(notify(b"{broken").is_none());
        let m = Message {
            content_type: Some(Arc::from("application/json")),
            received_at_ms: 0,
            ..Message::new(
                Arc::from("q"),
                9,
                bytes::Bytes::from_static(br#"{"k":true}"#),
            )
        };
        assert_eq!(
            v(&message(&m)),
            serde_json::json!({"event":"message","queue":"q","offset":9,"data":{"k":true}})
        );
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn field_value() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            ".{0,12}".prop_map(serde_json::Value::from),
            Just(serde_json::json!([1, "x"])),
            Just(serde_json::json!({"k": 1})),
        ]
    }

    fn action() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::json!("subscribe")),
            Just(serde_json::json!("unsubscribe")),
            Just(serde_json::json!("publish")),
            Just(serde_json::json!("authorize")),
            Just(serde_json::json!("ping")),
            field_value(),
        ]
    }

    proptest! {
        /// Any text: parsed or a typed error, never a panic.
        #[test]
        fn any_text_is_parsed_or_refused(t in ".{0,200}") {
            let _ = parse(&t);
        }

        /// Any object with an `id`: the id comes back with the action or the error,
        /// whatever the other fields hold (a mistyped field is `invalid_frame`).
        #[test]
        fn every_reply_echoes_the_id(
            id in any::<u32>(),
            act in action(),
            fields in proptest::collection::btree_map(
                prop_oneof![
                    Just("queue".to_owned()),
                    Just("since".to_owned()),
                    Just("epoch".to_owned()),
                    Just("data".to_owned()),
                    Just("token".to_owned()),
                    "[a-z]{1,6}",
                ],
                field_value(),
                0..4,
            ),
        ) {
            let mut o = serde_json::Map::new();
            o.insert("action".into(), act);
            for (k, v) in fields {
                o.insert(k, v);
            }
            o.insert("id".into(), id.into());
            let text = serde_json::Value::Object(o).to_string();
            let got = match parse(&text) {
                Ok((got, _)) => got,
                Err((got, (code, msg))) => {
                    prop_assert!(!msg.is_empty());
                    prop_assert!(code == "invalid_frame" || code == "invalid_json", "{code}");
                    got
                }
            };
            prop_assert_eq!(got.map(|r| r.get().to_owned()), Some(id.to_string()));
        }
    }
}
