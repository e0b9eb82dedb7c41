//! broker-ws: WebSocket sessions.
//!
//! One session per connection: a session core (`session.rs`: authentication, connection
//! caps, subscriptions, publishing through the broker's front door, reloads) speaking
//! one dialect — the native JSON protocol ([`protocol`], `native.rs`), or WAMP v2
//! ([`wamp`], `wamp_dialect.rs`) when the client offers the `wamp.2.json` subprotocol —
//! over a transport (`transport.rs`, the only file that names actix-web-actors). The
//! rest of the broker sees a session only through the subscriber messages of
//! broker-core (`Deliver`, `Lagged`, `Notify`, `Disconnect`, `Regrant`), and the HTTP
//! layer only through [`connect`]: moving to another WebSocket implementation
//! (actix-ws) replaces `transport.rs` and nothing else.

mod native;
pub mod protocol;
mod session;
mod transport;
pub mod wamp;
mod wamp_dialect;

use std::net::IpAddr;
use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use broker_core::auth::token::{self, TokenError};
use broker_core::Broker;

pub use session::Identity;
use session::Session;

/// What went wrong before a connection became a session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From broker-core (a wrong Basic login, shutdown).
    #[error(transparent)]
    Core(#[from] broker_core::Error),
    /// The token given at connect is invalid or expired.
    #[error("{0}")]
    Token(TokenError),
    /// Not a valid WebSocket upgrade request.
    #[error("not a WebSocket handshake: {0}")]
    Handshake(String),
}

/// Credentials presented with the upgrade request.
#[derive(Debug)]
pub enum Credentials {
    /// `?token=` or `Authorization: Bearer`: a session token.
    Token(String),
    /// `Authorization: Basic`: a configured user.
    Basic(String, String),
    /// Nothing: anonymous if allowed, else the session must send `authorize`.
    None,
}

/// Authenticates an upgrade request and starts its session. A bad token or login is
/// refused before the upgrade (401/403); no credentials at all leave `ws.auth_timeout`
/// for an `authorize` action (or make an anonymous session where allowed).
pub async fn connect(
    req: &HttpRequest,
    payload: web::Payload,
    broker: Arc<Broker>,
    remote: IpAddr,
    credentials: Credentials,
) -> Result<HttpResponse, Error> {
    let settings = broker.settings();
    let identity = match credentials {
        Credentials::Token(t) => {
            let claims = token::verify(&t, &settings.ws.jwt_secrets).map_err(Error::Token)?;
            Some(Identity::from_claims(claims, &settings))
        }
        Credentials::Basic(user, password) => {
            let u = broker.authenticate(&user, &password, remote).await?;
            Some(Identity::of_user(&u))
        }
        Credentials::None if settings.ws.config.allow_anonymous => {
            Some(Identity::anonymous(&settings.ws))
        }
        Credentials::None => None,
    };
    let started = if offers_wamp(req) {
        // Credentials given with the upgrade are used once the client says HELLO.
        let wamp = wamp_dialect::Wamp::new(identity);
        transport::start(Session::new(broker, remote, None, wamp), req, payload)
    } else {
        let session = Session::new(broker, remote, identity, native::Native);
        transport::start(session, req, payload)
    };
    started.map_err(|e| Error::Handshake(e.to_string()))
}

/// Whether the client offers the `wamp.2.json` subprotocol.
fn offers_wamp(req: &HttpRequest) -> bool {
    req.headers()
        .get_all(actix_web::http::header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == wamp::SUBPROTOCOL)
}
