//! What handlers need from a request: the client address, the login, a size-limited
//! body, and a long-poll loop.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{http::header, web, HttpRequest};
use base64::Engine;
use broker_core::auth::secrets::matches_secrets;
use broker_core::settings::{Settings, UserSpec};
use broker_core::{Broker, Error};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::error::ApiError;

/// The client's address: the TCP peer, or `X-Forwarded-For` when the peer is trusted.
pub fn client_ip(req: &HttpRequest, settings: &Settings) -> Result<IpAddr, ApiError> {
    let peer = req
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    // Every line, in order: a proxy may append its own line after the client's.
    let lines = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok());
    broker_core::auth::client_ip(peer, lines, &settings.trusted_proxies)
        .map_err(|m| ApiError::bad_request("invalid_forwarded_for", m))
}

/// A header's value as text, by name.
pub fn header_str<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// `Authorization: Basic …` decoded into user and password.
pub fn basic_credentials(req: &HttpRequest) -> Option<(String, String)> {
    let value = header_str(req, header::AUTHORIZATION.as_str())?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// The logged-in user (HTTP Basic), or 401/403.
pub async fn require_user(req: &HttpRequest, broker: &Broker) -> Result<Arc<UserSpec>, ApiError> {
    let (user, pass) =
        basic_credentials(req).ok_or(ApiError::MissingLogin("Authorization: Basic"))?;
    let client = client_ip(req, &broker.settings())?;
    Ok(broker.authenticate(&user, &pass, client).await?)
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer_token(req: &HttpRequest) -> Option<&str> {
    let value = header_str(req, header::AUTHORIZATION.as_str())?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether the request carries the admin token (`Authorization: Bearer …`).
pub fn is_admin(req: &HttpRequest, settings: &Settings) -> bool {
    match (settings.admin_token.as_ref(), bearer_token(req)) {
        (Some(token), Some(given)) => matches_secrets(given, std::slice::from_ref(token)),
        _ => false,
    }
}

/// pg-hooks' admin credential header, accepted with the admin token as its value.
pub const PLATFORMATIC_ADMIN_SECRET: &str = "x-platformatic-admin-secret";

/// 401 without a credential, 403 unless it is the admin token (as a Bearer token or in
/// pg-hooks' `X-PLATFORMATIC-ADMIN-SECRET`).
pub fn require_admin(req: &HttpRequest, settings: &Settings) -> Result<(), ApiError> {
    let platformatic = header_str(req, PLATFORMATIC_ADMIN_SECRET);
    if bearer_token(req).is_none() && platformatic.is_none() {
        return Err(ApiError::MissingToken);
    }
    let by_header = match (settings.admin_token.as_ref(), platformatic) {
        (Some(token), Some(given)) => matches_secrets(given, std::slice::from_ref(token)),
        _ => false,
    };
    if by_header || is_admin(req, settings) {
        Ok(())
    } else {
        Err(ApiError::Forbidden("the admin token is required"))
    }
}

/// Like [`require_admin`], also accepting a `ws.notify_secrets` entry.
pub fn require_notifier(req: &HttpRequest, settings: &Settings) -> Result<(), ApiError> {
    let Some(given) = bearer_token(req) else {
        return Err(ApiError::MissingToken);
    };
    if is_admin(req, settings) || matches_secrets(given, &settings.ws.notify_secrets) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "the admin token or a notify secret is required",
        ))
    }
}

/// Reads a request body of at most `limit` bytes. A declared `Content-Length` over the
/// limit is refused before anything is read; a stream that grows past it stops there.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, Error> {
    let too_large = || {
        Error::rejected(
            broker_core::Rejection::BodyTooLarge,
            format!("request body is larger than server.max_body_size ({limit} bytes)"),
        )
    };
    let declared =
        header_str(req, header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            Error::rejected(
                broker_core::Rejection::InvalidBody,
                format!("cannot read body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Parses a duration given in a query (`wait=`, `delay=`): `20s`, `1m`, or a bare
/// number of seconds; refused with `code` otherwise.
pub fn parse_duration(name: &str, value: &str, code: &'static str) -> Result<Duration, ApiError> {
    let v = value.trim();
    match v.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(v).map_err(|_| {
            ApiError::bad_request(code, format!("`{name}={v}` is not a duration like 20s"))
        }),
    }
}

/// Parses `wait=` (empty or absent: no wait), at most `max`.
pub fn parse_wait(wait: Option<&str>, max: Duration) -> Result<Duration, ApiError> {
    let Some(w) = wait.map(str::trim).filter(|w| !w.is_empty()) else {
        return Ok(Duration::ZERO);
    };
    Ok(parse_duration("wait", w, "invalid_wait")?.min(max))
}

/// Whether the request came over TLS: this server does not terminate TLS itself, so only
/// a trusted proxy's `X-Forwarded-Proto: https` says so (anyone else's is ignored).
pub fn is_tls(req: &HttpRequest, settings: &Settings) -> bool {
    let peer = req.peer_addr().map(|a| a.ip());
    let trusted = peer.is_some_and(|ip| settings.trusted_proxies.iter().any(|n| n.contains(&ip)));
    // Every entry of every line must say https: a client's forged `https` followed by
    // the proxy's `http` is plain HTTP.
    let mut protos = req
        .headers()
        .get_all("x-forwarded-proto")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|l| l.split(','))
        .peekable();
    trusted && protos.peek().is_some() && protos.all(|p| p.trim().eq_ignore_ascii_case("https"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_parsing() {
        let max = Duration::from_secs(60);
        assert_eq!(parse_wait(None, max).unwrap(), Duration::ZERO);
        assert_eq!(
            parse_wait(Some("20s"), max).unwrap(),
            Duration::from_secs(20)
        );
        assert_eq!(parse_wait(Some("5"), max).unwrap(), Duration::from_secs(5));
        assert_eq!(parse_wait(Some("10m"), max).unwrap(), max, "clamped");
        assert!(parse_wait(Some("soon"), max).is_err());
    }

    #[test]
    fn basic_credentials_decode() {
        let req = actix_web::test::TestRequest::default()
            .insert_header(("Authorization", "Basic Sm9obiBEb2U6aW5zZWN1cmU="))
            .to_http_request();
        assert_eq!(
            basic_credentials(&req),
            Some(("John Doe".into(), "insecure".into()))
        );
        let req = actix_web::test::TestRequest::default()
            .insert_header(("Authorization", "Bearer x"))
            .to_http_request();
        assert_eq!(basic_credentials(&req), None);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any `wait=`/`delay=` text: a duration or a 400 naming the parameter.
        #[test]
        fn durations_parse_or_are_refused(v in prop_oneof![".{0,30}", "-?[0-9]{1,30}[a-z]{0,5}"]) {
            if let Err(e) = parse_duration("delay", &v, "invalid_query") {
                prop_assert!(e.to_string().contains("delay"));
            }
            let _ = parse_wait(Some(&v), Duration::from_secs(30));
        }

        /// Any `Authorization` header: Basic credentials or none, never a panic; real
        /// Basic credentials come back as sent.
        #[test]
        fn basic_headers_parse_or_are_ignored(
            raw in proptest::collection::vec(any::<u8>(), 0..60),
            user in "[a-z0-9]{1,10}",
            pass in "[ -~]{0,16}",
        ) {
            if let Ok(v) = actix_web::http::header::HeaderValue::from_bytes(&raw) {
                let req = actix_web::test::TestRequest::default()
                    .insert_header((actix_web::http::header::AUTHORIZATION, v))
                    .to_http_request();
                let _ = basic_credentials(&req);
            }
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            let req = actix_web::test::TestRequest::default()
                .insert_header(("Authorization", format!("Basic {encoded}")))
                .to_http_request();
            prop_assert_eq!(basic_credentials(&req), Some((user, pass)));
        }
    }
}
