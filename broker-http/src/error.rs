//! The one error type of the HTTP layer and the one place that turns errors into
//! responses: `{"code","message","refresh"}` with the statuses of the contract.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use broker_core::Error;

use crate::wire::ErrorBody;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// From broker-core.
    #[error(transparent)]
    Core(#[from] Error),
    /// No `Authorization` header where a login is required.
    #[error("credentials required: HTTP Basic ({0})")]
    MissingLogin(&'static str),
    /// No `Authorization: Bearer` where a token is required.
    #[error("credentials required: Authorization: Bearer <token>")]
    MissingToken,
    /// The token does not grant this.
    #[error("{0}")]
    Forbidden(&'static str),
    /// A WebSocket session token given at connect is invalid or expired.
    #[error("{0}")]
    InvalidToken(broker_core::auth::token::TokenError),
    /// The request is not a valid WebSocket upgrade.
    #[error("{0}")]
    Handshake(String),
    /// Malformed input.
    #[error("{message}")]
    BadRequest {
        /// snake_case code.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A JSON request body over its limit.
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    /// No route.
    #[error("no such route")]
    NotFound,
    /// Route exists, method does not.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// This process is a standby: another broker holds the database's active lock.
    #[error("this broker is a standby: another broker serves this database; retry")]
    Standby,
}

impl ApiError {
    /// Shorthand for a 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, bool) {
        use StatusCode as S;
        match self {
            ApiError::Core(e) => (status_of(e.code()), e.code(), e.refresh()),
            ApiError::MissingLogin(_) | ApiError::MissingToken => {
                (S::UNAUTHORIZED, "missing_credentials", false)
            }
            ApiError::Forbidden(_) => (S::FORBIDDEN, "forbidden", false),
            ApiError::InvalidToken(_) => (S::UNAUTHORIZED, "invalid_token", false),
            ApiError::Handshake(_) => (S::BAD_REQUEST, "bad_handshake", false),
            ApiError::BadRequest { code, .. } => (S::BAD_REQUEST, code, false),
            ApiError::BodyTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "body_too_large", false),
            ApiError::NotFound => (S::NOT_FOUND, "not_found", false),
            ApiError::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "method_not_allowed", false),
            ApiError::Standby => (S::SERVICE_UNAVAILABLE, "standby", false),
        }
    }
}

/// The HTTP status of each core error code: the one table.
fn status_of(code: &str) -> StatusCode {
    use StatusCode as S;
    match code {
        "unknown_queue" | "no_dead_letters" | "unknown_client" | "unknown_connection"
        | "unknown_cron" => S::NOT_FOUND,
        "missing_credentials" => S::UNAUTHORIZED,
        "ip_not_allowed" | "invalid_signature" | "stale_timestamp" | "bad_login"
        | "not_granted" | "reload_not_allowed" => S::FORBIDDEN,
        "body_too_large" | "message_too_large" => S::PAYLOAD_TOO_LARGE,
        "invalid_body" | "password_too_short" | "delay_too_long" | "invalid_header"
        | "target_not_allowed" => S::BAD_REQUEST,
        "too_many_delayed"
        | "too_many_connections"
        | "too_many_queues"
        | "too_many_logins"
        | "too_many_definitions" => S::TOO_MANY_REQUESTS,
        // webhook-queue answers 410 without `refresh` for a disconnected client.
        "unrecoverable_position" | "refresh" | "client_disconnected" => S::GONE,
        "client_exists"
        | "config_not_writable"
        | "defined_in_config"
        | "exists"
        | "replayed"
        | "idempotency_key_in_use" => S::CONFLICT,
        "store_unavailable" | "shutting_down" => S::SERVICE_UNAVAILABLE,
        _ => S::INTERNAL_SERVER_ERROR,
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.parts().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, code, refresh) = self.parts();
        let (offset, epoch, redriven) = match self {
            ApiError::Core(
                Error::UnrecoverablePosition { offset, epoch, .. }
                | Error::Refresh { offset, epoch, .. },
            ) => (Some(*offset), Some(epoch.clone()), None),
            ApiError::Core(Error::RedriveStopped {
                redriven, offset, ..
            }) => (Some(*offset), None, Some(*redriven)),
            _ => (None, None, None),
        };
        let mut res = HttpResponse::build(status);
        if matches!(self, ApiError::MissingLogin(_)) {
            res.insert_header((header::WWW_AUTHENTICATE, r#"Basic realm="broker""#));
        }
        if matches!(self, ApiError::Standby) {
            res.insert_header((header::RETRY_AFTER, "1"));
        }
        if let ApiError::Core(Error::TooManyLogins { retry_after_secs }) = self {
            res.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
        }
        res.json(ErrorBody {
            code: code.to_owned(),
            message: self.to_string(),
            refresh,
            offset,
            epoch,
            redriven,
        })
    }
}

/// An error on Crossbar's pusher path, answered as Crossbar does:
/// `{"error": <message>, "args": [], "kwargs": {}}` with Crossbar's status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PusherError {
    /// HTTP status.
    pub status: StatusCode,
    /// The `error` text (Crossbar's wording where Crossbar has the case).
    pub message: String,
}

impl PusherError {
    /// An error with `status`.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            message: message.into(),
        }
    }

    /// The body Crossbar sends.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": self.message, "args": [], "kwargs": {}})
    }
}

impl From<broker_core::auth::crossbar::SignatureError> for PusherError {
    fn from(e: broker_core::auth::crossbar::SignatureError) -> Self {
        PusherError::new(e.status(), e.to_string())
    }
}

impl From<Error> for PusherError {
    fn from(e: Error) -> Self {
        if e.code() == "ip_not_allowed" {
            // Crossbar's wording and status for an address refusal.
            return PusherError {
                status: StatusCode::BAD_REQUEST,
                message: "Request denied based on IP address.".into(),
            };
        }
        let api = ApiError::Core(e);
        PusherError {
            status: api.parts().0,
            message: api.to_string(),
        }
    }
}

impl From<broker_ws::Error> for ApiError {
    fn from(e: broker_ws::Error) -> Self {
        match e {
            broker_ws::Error::Core(e) => ApiError::Core(e),
            broker_ws::Error::Token(t) => ApiError::InvalidToken(t),
            broker_ws::Error::Handshake(m) => ApiError::Handshake(m),
        }
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> Self {
        ApiError::Core(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::Rejection;

    #[test]
    fn every_rejection_has_a_client_status() {
        for r in Rejection::ALL {
            let s = status_of(r.as_str());
            assert!(s.is_client_error(), "{r:?}: {s}");
        }
    }

    #[test]
    fn statuses_follow_the_contract() {
        let cases: Vec<(ApiError, u16, &str, bool)> = vec![
            (
                Error::rejected(Rejection::MissingCredentials, "m").into(),
                401,
                "missing_credentials",
                false,
            ),
            (
                Error::rejected(Rejection::InvalidSignature, "m").into(),
                403,
                "invalid_signature",
                false,
            ),
            (
                Error::rejected(Rejection::IpNotAllowed, "m").into(),
                403,
                "ip_not_allowed",
                false,
            ),
            (
                Error::rejected(Rejection::MessageTooLarge, "m").into(),
                413,
                "message_too_large",
                false,
            ),
            (
                Error::rejected(Rejection::InvalidBody, "m").into(),
                400,
                "invalid_body",
                false,
            ),
            (
                Error::UnknownQueue { queue: "q".into() }.into(),
                404,
                "unknown_queue",
                false,
            ),
            (
                Error::Refresh {
                    queue: "q".into(),
                    reason: "r".into(),
                    offset: 1,
                    epoch: "e".into(),
                }
                .into(),
                410,
                "refresh",
                true,
            ),
            (
                Error::ClientExists {
                    client: "c".into(),
                    queue: "q".into(),
                }
                .into(),
                409,
                "client_exists",
                false,
            ),
            (
                Error::Store("x".into()).into(),
                503,
                "store_unavailable",
                false,
            ),
            (
                ApiError::MissingLogin("x"),
                401,
                "missing_credentials",
                false,
            ),
        ];
        for (err, status, code, refresh) in cases {
            let res = err.error_response();
            assert_eq!(res.status().as_u16(), status, "{err}");
            let (_, c, r) = err.parts();
            assert_eq!((c, r), (code, refresh));
        }
    }
}
