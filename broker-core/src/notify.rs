//! The `notify-user` and `notify-connection` queue kinds: API Gateway's NotifyUser and
//! NotifyConnection message shapes, routed to live connections.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::QueueKind;
use crate::error::{Error, Rejection};

/// Where a notification goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Every connection of a user.
    User(String),
    /// One connection.
    Connection(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ToUser<'a> {
    user_id: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ToConnection<'a> {
    connection_id: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// For a notify-kind queue, checks that `body` is exactly `{"userId","data"}` or
/// `{"connectionId","data"}` and returns the route and the `data` JSON (a slice of
/// `body`, not a copy). `None` for ordinary queues.
pub fn route(kind: QueueKind, body: &Bytes) -> Result<Option<(Route, Bytes)>, Error> {
    let bad = |shape: &str, e: serde_json::Error| {
        Error::rejected(
            Rejection::InvalidBody,
            format!("this queue accepts exactly {shape}: {e}"),
        )
    };
    let (route, data) = match kind {
        QueueKind::Queue => return Ok(None),
        QueueKind::NotifyUser => {
            let m: ToUser =
                serde_json::from_slice(body).map_err(|e| bad(r#"{"userId":"…","data":…}"#, e))?;
            (Route::User(m.user_id), m.data)
        }
        QueueKind::NotifyConnection => {
            let m: ToConnection = serde_json::from_slice(body)
                .map_err(|e| bad(r#"{"connectionId":"…","data":…}"#, e))?;
            (Route::Connection(m.connection_id), m.data)
        }
    };
    Ok(Some((route, body.slice_ref(data.get().as_bytes()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_exact() {
        let b = Bytes::from_static(br#"{"userId":"u1","data":{"x":[1,2]}}"#);
        let (r, d) = route(QueueKind::NotifyUser, &b).unwrap().unwrap();
        assert_eq!(r, Route::User("u1".into()));
        assert_eq!(&d[..], br#"{"x":[1,2]}"#);
        let b = Bytes::from_static(br#"{"connectionId":"c1","data":"hi"}"#);
        let (r, d) = route(QueueKind::NotifyConnection, &b).unwrap().unwrap();
        assert_eq!(
            (r, &d[..]),
            (Route::Connection("c1".into()), &b"\"hi\""[..])
        );
        for bad in [
            r#"{"userId":"u1"}"#,
            r#"{"userId":"u1","data":1,"extra":2}"#,
            r#"{"connectionId":"c","data":1}"#,
            r#"not json"#,
        ] {
            assert!(
                route(QueueKind::NotifyUser, &Bytes::from(bad)).is_err(),
                "{bad}"
            );
        }
        assert!(route(QueueKind::Queue, &Bytes::from_static(b"anything"))
            .unwrap()
            .is_none());
    }
}
