//! WAMP v2 Basic Profile, broker role, JSON serialization (`wamp.2.json`).
//!
//! Client → router: HELLO, AUTHENTICATE (WAMP-Ticket), GOODBYE, SUBSCRIBE, UNSUBSCRIBE,
//! PUBLISH. Router → client: WELCOME, ABORT, CHALLENGE, GOODBYE, SUBSCRIBED,
//! UNSUBSCRIBED, PUBLISHED, EVENT, ERROR. Each message is a JSON array whose first
//! element is its type code (spec §6).

use bytestring::ByteString;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use broker_core::crossbar::{event_arguments, publication_id};
use broker_core::message::Message;

/// Message type codes.
pub mod code {
    /// HELLO
    pub const HELLO: u64 = 1;
    /// WELCOME
    pub const WELCOME: u64 = 2;
    /// ABORT
    pub const ABORT: u64 = 3;
    /// CHALLENGE
    pub const CHALLENGE: u64 = 4;
    /// AUTHENTICATE
    pub const AUTHENTICATE: u64 = 5;
    /// GOODBYE
    pub const GOODBYE: u64 = 6;
    /// ERROR
    pub const ERROR: u64 = 8;
    /// PUBLISH
    pub const PUBLISH: u64 = 16;
    /// PUBLISHED
    pub const PUBLISHED: u64 = 17;
    /// SUBSCRIBE
    pub const SUBSCRIBE: u64 = 32;
    /// SUBSCRIBED
    pub const SUBSCRIBED: u64 = 33;
    /// UNSUBSCRIBE
    pub const UNSUBSCRIBE: u64 = 34;
    /// UNSUBSCRIBED
    pub const UNSUBSCRIBED: u64 = 35;
    /// EVENT
    pub const EVENT: u64 = 36;
}

/// Error and reason URIs the router uses.
pub mod uri {
    /// The realm is not served.
    pub const NO_SUCH_REALM: &str = "wamp.error.no_such_realm";
    /// A malformed or unexpected message.
    pub const PROTOCOL_VIOLATION: &str = "wamp.error.protocol_violation";
    /// Authentication failed or is required.
    pub const AUTHENTICATION_FAILED: &str = "wamp.error.authentication_failed";
    /// No permission for the topic.
    pub const NOT_AUTHORIZED: &str = "wamp.error.not_authorized";
    /// The topic is not a queue of this broker.
    pub const INVALID_URI: &str = "wamp.error.invalid_uri";
    /// Unsubscribing something not subscribed.
    pub const NO_SUCH_SUBSCRIPTION: &str = "wamp.error.no_such_subscription";
    /// Publication refused (limits, store failure).
    pub const PUBLISH_FAILED: &str = "broker.error.publish_failed";
    /// Subscription refused for another reason than the topic or the grant.
    pub const SUBSCRIBE_FAILED: &str = "broker.error.subscribe_failed";
    /// The broker cannot serve this now (store unavailable, shutting down): retry.
    pub const UNAVAILABLE: &str = "broker.error.unavailable";
    /// Too many subscriptions.
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "broker.error.too_many_subscriptions";
    /// Normal close.
    pub const GOODBYE_AND_OUT: &str = "wamp.close.goodbye_and_out";
    /// The router is shutting down.
    pub const SYSTEM_SHUTDOWN: &str = "wamp.close.system_shutdown";
    /// Closed by an admin or a policy.
    pub const CLOSE_REALM: &str = "wamp.close.close_realm";
}

/// The WAMP error URI of a core error (by its public code): the one mapping. `other` is
/// the URI of the request kind for errors without a WAMP meaning of their own
/// ([`uri::PUBLISH_FAILED`], [`uri::SUBSCRIBE_FAILED`]).
pub fn error_uri(e: &broker_core::Error, other: &'static str) -> &'static str {
    match e.code() {
        "unknown_queue" => uri::INVALID_URI,
        "not_granted"
        | "ip_not_allowed"
        | "missing_credentials"
        | "invalid_signature"
        | "stale_timestamp"
        | "bad_login" => uri::NOT_AUTHORIZED,
        "store_unavailable" | "shutting_down" => uri::UNAVAILABLE,
        _ => other,
    }
}

/// The WebSocket subprotocol.
pub const SUBPROTOCOL: &str = "wamp.2.json";

/// A client message.
#[derive(Debug, PartialEq)]
pub enum ClientMsg {
    /// `[HELLO, Realm, Details]`
    Hello {
        /// The realm.
        realm: String,
        /// `authmethods` offered.
        authmethods: Vec<String>,
        /// `authid`, for ticket authentication.
        authid: Option<String>,
    },
    /// `[AUTHENTICATE, Signature, Extra]`
    Authenticate {
        /// The ticket (password).
        ticket: String,
    },
    /// `[GOODBYE, Details, Reason]`
    Goodbye,
    /// `[SUBSCRIBE, Request, Options, Topic]`
    Subscribe {
        /// Request id.
        request: u64,
        /// Topic.
        topic: String,
        /// `options.match == "prefix"`.
        prefix: bool,
    },
    /// `[UNSUBSCRIBE, Request, Subscription]`
    Unsubscribe {
        /// Request id.
        request: u64,
        /// Subscription id.
        subscription: u64,
    },
    /// `[PUBLISH, Request, Options, Topic, Arguments?, ArgumentsKw?]`
    Publish {
        /// Request id.
        request: u64,
        /// Topic.
        topic: String,
        /// Positional arguments (JSON array text).
        args: Option<String>,
        /// Keyword arguments (JSON object text).
        kwargs: Option<String>,
        /// `options.acknowledge`.
        acknowledge: bool,
        /// `options.exclude_me` (default true).
        exclude_me: bool,
        /// `options.exclude`.
        exclude: Vec<u64>,
        /// `options.eligible`.
        eligible: Option<Vec<u64>>,
    },
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HelloDetails {
    authmethods: Vec<String>,
    authid: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SubscribeOptions {
    #[serde(rename = "match")]
    match_: Option<String>,
}

#[derive(Deserialize)]
#[serde(default)]
struct PublishOptions {
    acknowledge: bool,
    exclude_me: bool,
    exclude: Vec<u64>,
    eligible: Option<Vec<u64>>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        Self {
            acknowledge: false,
            exclude_me: true,
            exclude: Vec::new(),
            eligible: None,
        }
    }
}

/// Parses one client message; the error is the reason for an ABORT.
pub fn parse(text: &str) -> Result<ClientMsg, String> {
    let items: Vec<&RawValue> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON array: {e}"))?;
    let ty: u64 = item(&items, 0, "message type")?;
    let msg = match ty {
        code::HELLO => {
            let d: HelloDetails = item(&items, 2, "HELLO.Details")?;
            ClientMsg::Hello {
                realm: item(&items, 1, "HELLO.Realm")?,
                authmethods: d.authmethods,
                authid: d.authid,
            }
        }
        code::AUTHENTICATE => ClientMsg::Authenticate {
            ticket: item(&items, 1, "AUTHENTICATE.Signature")?,
        },
        code::GOODBYE => ClientMsg::Goodbye,
        code::SUBSCRIBE => {
            let o: SubscribeOptions = item(&items, 2, "SUBSCRIBE.Options")?;
            let prefix = match o.match_.as_deref() {
                None | Some("exact") => false,
                Some("prefix") => true,
                Some(other) => return Err(format!("match policy `{other}` is not supported")),
            };
            ClientMsg::Subscribe {
                request: item(&items, 1, "SUBSCRIBE.Request")?,
                topic: item(&items, 3, "SUBSCRIBE.Topic")?,
                prefix,
            }
        }
        code::UNSUBSCRIBE => ClientMsg::Unsubscribe {
            request: item(&items, 1, "UNSUBSCRIBE.Request")?,
            subscription: item(&items, 2, "UNSUBSCRIBE.Subscription")?,
        },
        code::PUBLISH => {
            let o: PublishOptions = item(&items, 2, "PUBLISH.Options")?;
            let args = items.get(4).map(|a| a.get().to_owned());
            let kwargs = items.get(5).map(|k| k.get().to_owned());
            if args.as_ref().is_some_and(|a| !a.starts_with('[')) {
                return Err("PUBLISH.Arguments must be a list".into());
            }
            if kwargs.as_ref().is_some_and(|k| !k.starts_with('{')) {
                return Err("PUBLISH.ArgumentsKw must be a dict".into());
            }
            ClientMsg::Publish {
                request: item(&items, 1, "PUBLISH.Request")?,
                topic: item(&items, 3, "PUBLISH.Topic")?,
                args,
                kwargs,
                acknowledge: o.acknowledge,
                exclude_me: o.exclude_me,
                exclude: o.exclude,
                eligible: o.eligible,
            }
        }
        other => {
            return Err(format!(
                "message type {other} is not handled by this router"
            ))
        }
    };
    Ok(msg)
}

fn item<'a, T: Deserialize<'a>>(items: &[&'a RawValue], i: usize, what: &str) -> Result<T, String> {
    let raw = items.get(i).ok_or_else(|| format!("{what} is missing"))?;
    serde_json::from_str(raw.get()).map_err(|e| format!("{what}: {e}"))
}

fn frame(v: Value) -> ByteString {
    ByteString::from(v.to_string())
}

/// `[WELCOME, Session, Details]`
pub fn welcome(session: u64, realm: &str, authid: &str, authmethod: &str) -> ByteString {
    let role = if authid.is_empty() {
        "anonymous"
    } else {
        "user"
    };
    frame(json!([code::WELCOME, session, {
        "realm": realm,
        "authid": authid,
        "authrole": role,
        "authmethod": authmethod,
        "authprovider": "static",
        "roles": {"broker": {"features": {
            "publisher_exclusion": true,
            "subscriber_blackwhite_listing": true,
            "pattern_based_subscription": true,
        }}},
    }]))
}

/// `[ABORT, Details, Reason]`
pub fn abort(reason: &str, message: &str) -> ByteString {
    frame(json!([code::ABORT, {"message": message}, reason]))
}

/// `[CHALLENGE, "ticket", {}]`
pub fn challenge_ticket() -> ByteString {
    frame(json!([code::CHALLENGE, "ticket", {}]))
}

/// `[GOODBYE, Details, Reason]`
pub fn goodbye(reason: &str) -> ByteString {
    frame(json!([code::GOODBYE, {}, reason]))
}

/// `[ERROR, REQUEST.Type, REQUEST.Request, Details, Error, [message]]`
pub fn error(request_type: u64, request: u64, error: &str, message: &str) -> ByteString {
    frame(json!([
        code::ERROR,
        request_type,
        request,
        {},
        error,
        [message]
    ]))
}

/// `[PUBLISHED, PUBLISH.Request, Publication]`
pub fn published(request: u64, publication: u64) -> ByteString {
    frame(json!([code::PUBLISHED, request, publication]))
}

/// `[SUBSCRIBED, SUBSCRIBE.Request, Subscription]`
pub fn subscribed(request: u64, subscription: u64) -> ByteString {
    frame(json!([code::SUBSCRIBED, request, subscription]))
}

/// `[UNSUBSCRIBED, UNSUBSCRIBE.Request]`
pub fn unsubscribed(request: u64) -> ByteString {
    frame(json!([code::UNSUBSCRIBED, request]))
}

/// The part of a message's EVENT after the subscription id, the same for every session:
/// `Publication, {"topic": queue}, Arguments[, ArgumentsKw]]`.
pub fn event_tail(m: &Message) -> String {
    let (args, kwargs) = event_arguments(m);
    let mut details = Map::new();
    details.insert("topic".into(), Value::String(m.queue.to_string()));
    let mut s = format!(
        "{},{},{}",
        publication_id(&m.queue, m.offset),
        Value::Object(details),
        args
    );
    if let Some(k) = kwargs {
        s.push(',');
        s.push_str(&k);
    }
    s.push(']');
    s
}

/// `[EVENT, Subscription, ` + [`event_tail`].
pub fn event(subscription: u64, tail: &str) -> ByteString {
    ByteString::from(format!("[{},{subscription},{tail}", code::EVENT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn parses_what_autobahn_sends() {
        // Frames as Autobahn|Python 2x sends them.
        let hello = r#"[1,"realm1",{"roles":{"subscriber":{"features":{}},"publisher":{"features":{}}},"authmethods":["ticket"],"authid":"alice"}]"#;
        assert_eq!(
            parse(hello),
            Ok(ClientMsg::Hello {
                realm: "realm1".into(),
                authmethods: vec!["ticket".into()],
                authid: Some("alice".into())
            })
        );
        assert_eq!(
            parse(r#"[5,"secret!",{}]"#),
            Ok(ClientMsg::Authenticate {
                ticket: "secret!".into()
            })
        );
        assert_eq!(
            parse(r#"[32,7814135,{"match":"prefix"},"com.myapp"]"#),
            Ok(ClientMsg::Subscribe {
                request: 7814135,
                topic: "com.myapp".into(),
                prefix: true
            })
        );
        assert_eq!(
            parse(r#"[34,85346237,5512315355]"#),
            Ok(ClientMsg::Unsubscribe {
                request: 85346237,
                subscription: 5512315355
            })
        );
        let ClientMsg::Publish {
            request,
            topic,
            args,
            kwargs,
            acknowledge,
            exclude_me,
            ..
        } = parse(
            r#"[16,239714735,{"acknowledge":true},"com.myapp.mytopic1",["Hello, world!"],{"a":1}]"#,
        )
        .unwrap()
        else {
            panic!()
        };
        assert_eq!((request, topic.as_str()), (239714735, "com.myapp.mytopic1"));
        assert_eq!(args.unwrap(), r#"["Hello, world!"]"#);
        assert_eq!(kwargs.unwrap(), r#"{"a":1}"#);
        assert!(acknowledge && exclude_me);
        assert_eq!(
            parse(r#"[6,{},"wamp.close.close_realm"]"#),
            Ok(ClientMsg::Goodbye)
        );
    }

    #[test]
    fn refuses_malformed_messages() {
        for bad in [
            "{}",
            "[]",
            "[1]",
            r#"[32,1,{"match":"wildcard"},"a..b"]"#,
            r#"[16,1,{},"t","not a list"]"#,
            r#"[48,1,{},"com.proc"]"#,
            "not json",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn encodes_router_messages() {
        assert_eq!(&*published(1, 2), "[17,1,2]");
        assert_eq!(&*subscribed(3, 4), "[33,3,4]");
        assert_eq!(&*unsubscribed(5), "[35,5]");
        assert_eq!(
            &*error(32, 9, uri::NOT_AUTHORIZED, "no"),
            r#"[8,32,9,{},"wamp.error.not_authorized",["no"]]"#
        );
        let w: Value = serde_json::from_str(&welcome(7, "realm1", "alice", "ticket")).unwrap();
        assert_eq!(w[0], 2);
        assert_eq!(w[2]["authid"], "alice");
        let m = Message {
            content_type: Some(Arc::from("application/json")),
            received_at_ms: 0,
            ..Message::new(
                Arc::from("com.t"),
                3,
                bytes::Bytes::from_static(br#"{"args":[1],"kwargs":{"k":"v"}}"#),
            )
        };
        let e: Value = serde_json::from_str(&event(11, &event_tail(&m))).unwrap();
        assert_eq!(
            e,
            json!([36, 11, publication_id("com.t", 3), {"topic": "com.t"}, [1], {"k": "v"}])
        );
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn item() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            any::<u64>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,10}".prop_map(serde_json::Value::from),
            Just(serde_json::json!({})),
            Just(
                serde_json::json!({"match": "prefix", "acknowledge": true, "exclude": [1], "eligible": "x"})
            ),
            Just(serde_json::json!([1, 2])),
            Just(serde_json::Value::Null),
        ]
    }

    proptest! {
        /// Any text, and any array led by a WAMP message code: a message or a typed
        /// error, never a panic.
        #[test]
        fn any_frame_is_parsed_or_refused(
            t in ".{0,120}",
            code in prop_oneof![Just(1u64), Just(5), Just(6), Just(16), Just(32), Just(34), any::<u64>()],
            rest in proptest::collection::vec(item(), 0..7),
        ) {
            let _ = parse(&t);
            let mut frame = vec![serde_json::Value::from(code)];
            frame.extend(rest);
            let _ = parse(&serde_json::Value::Array(frame).to_string());
        }
    }
}
