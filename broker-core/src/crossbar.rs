//! How Crossbar.io's model maps onto queues: a WAMP topic is a queue, a publication's
//! positional and keyword arguments are a message whose data is
//! `{"args":[…],"kwargs":{…}}`, and a publication id is derived from the message's queue
//! and offset, so the pusher's answer and every subscriber's `EVENT` carry the same id.

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::message::{Audience, Message, NewMessage};

/// Largest id WAMP allows (2^53).
pub const MAX_ID: u64 = 1 << 53;

/// The message a publication with `args` and `kwargs` (JSON text, or absent) becomes.
pub fn publication(
    args: Option<&RawValue>,
    kwargs: Option<&RawValue>,
    audience: Option<Audience>,
) -> NewMessage {
    #[derive(Serialize)]
    struct Data<'a> {
        args: &'a RawValue,
        kwargs: &'a RawValue,
    }
    let empty_args: &RawValue = serde_json::from_str("[]").expect("valid JSON");
    let empty_kwargs: &RawValue = serde_json::from_str("{}").expect("valid JSON");
    let data = Data {
        args: args.filter(|a| a.get() != "null").unwrap_or(empty_args),
        kwargs: kwargs.filter(|k| k.get() != "null").unwrap_or(empty_kwargs),
    };
    NewMessage {
        id: None,
        body: Bytes::from(serde_json::to_vec(&data).expect("raw JSON serializes")),
        content_type: Some(Arc::from("application/json")),
        headers: Vec::new(),
        audience: audience
            .filter(|a| !a.exclude.is_empty() || a.eligible.is_some())
            .map(Arc::new),
    }
}

/// The publication id of the message at `offset` in `queue`: 1 ..= 2^53.
pub fn publication_id(queue: &str, offset: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(queue.as_bytes());
    h.update([0]);
    h.update(offset.to_be_bytes());
    let d = h.finalize();
    let n = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    n % MAX_ID + 1
}

/// A random session id: 1 ..= 2^53.
pub fn random_session_id() -> u64 {
    let mut b = [0u8; 8];
    crate::random::fill(&mut b);
    u64::from_le_bytes(b) % MAX_ID + 1
}

/// A message as WAMP `args` and `kwargs` (JSON text): a message published as
/// `{"args":[…],"kwargs":{…}}` (by the pusher or a WAMP client) gives them back; any
/// other JSON value is `[value]`, other text `["text"]`, and bytes Autobahn's JSON
/// convention for binary, `["\u0000" + base64]`.
pub fn event_arguments(m: &Message) -> (String, Option<String>) {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Data<'a> {
        #[serde(borrow, default)]
        args: Option<&'a RawValue>,
        #[serde(borrow, default)]
        kwargs: Option<&'a RawValue>,
    }
    if m.is_json() {
        if let Ok(d) = serde_json::from_slice::<Data<'_>>(&m.body) {
            let args_ok = d.args.is_none_or(|a| a.get().starts_with('['));
            let kwargs_ok = d.kwargs.is_none_or(|k| k.get().starts_with('{'));
            if args_ok && kwargs_ok && (d.args.is_some() || d.kwargs.is_some()) {
                let args = d
                    .args
                    .map_or_else(|| "[]".to_owned(), |a| a.get().to_owned());
                let kwargs = d.kwargs.map(|k| k.get().to_owned()).filter(|k| k != "{}");
                return (args, kwargs);
            }
        }
        if let Ok(v) = serde_json::from_slice::<&RawValue>(&m.body) {
            return (format!("[{}]", v.get()), None);
        }
    }
    let value = match std::str::from_utf8(&m.body) {
        Ok(s) => s.to_owned(),
        Err(_) => format!(
            "\u{0}{}",
            base64::engine::general_purpose::STANDARD.encode(&m.body)
        ),
    };
    let args = serde_json::to_string(&[value]).expect("strings serialize");
    (args, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &str, json: bool) -> Message {
        Message {
            content_type: json.then(|| Arc::from("application/json")),
            received_at_ms: 0,
            ..Message::new(Arc::from("com.example.t"), 1, Bytes::from(body.to_owned()))
        }
    }

    #[test]
    fn publications_round_trip_to_event_arguments() {
        let raw = |s: &str| serde_json::from_str::<&RawValue>(s).unwrap().to_owned();
        let args = raw(r#"["Hello", 1]"#);
        let kwargs = raw(r#"{"a": true}"#);
        let p = publication(Some(&args), Some(&kwargs), None);
        assert_eq!(
            &p.body[..],
            br#"{"args":["Hello", 1],"kwargs":{"a": true}}"#
        );
        assert!(p.audience.is_none());
        let m = message(std::str::from_utf8(&p.body).unwrap(), true);
        assert_eq!(
            event_arguments(&m),
            (
                r#"["Hello", 1]"#.to_owned(),
                Some(r#"{"a": true}"#.to_owned())
            )
        );
        let p = publication(None, None, Some(Audience::default()));
        assert_eq!(&p.body[..], br#"{"args":[],"kwargs":{}}"#);
        assert!(p.audience.is_none(), "an empty audience is everyone");
    }

    #[test]
    fn other_messages_become_one_argument() {
        for (body, json, args) in [
            (r#"{"hello":"world"}"#, true, r#"[{"hello":"world"}]"#),
            (
                r#"{"args":"not a list"}"#,
                true,
                r#"[{"args":"not a list"}]"#,
            ),
            ("42", true, "[42]"),
            ("plain text", false, r#"["plain text"]"#),
            ("{not json", true, r#"["{not json"]"#),
        ] {
            assert_eq!(
                event_arguments(&message(body, json)),
                (args.to_owned(), None)
            );
        }
        let mut m = message("", false);
        m.body = Bytes::from_static(&[0xff, 0x00]);
        assert_eq!(event_arguments(&m).0, r#"["\u0000/wA="]"#);
    }

    #[test]
    fn ids_are_in_wamps_range_and_stable() {
        let a = publication_id("q", 1);
        assert_eq!(a, publication_id("q", 1));
        assert_ne!(a, publication_id("q", 2));
        assert_ne!(a, publication_id("r", 1));
        for i in 0..1000 {
            assert!((1..=MAX_ID).contains(&publication_id("q", i)));
            assert!((1..=MAX_ID).contains(&random_session_id()));
        }
    }
}
