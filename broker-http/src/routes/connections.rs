//! WebSocket connections: the upgrade at `GET /v1/ws`, notifications
//! (`POST /v1/users/{user}/notify`, `POST /v1/connections/{id}/notify`), and the admin
//! view (`GET /v1/connections`, `DELETE /v1/connections/{id}`).

use actix_web::{web, HttpRequest, HttpResponse};
use broker_core::notify::Route;
use broker_core::subscriber::Disconnect;
use broker_core::Broker;
use broker_ws::Credentials;

use crate::error::ApiError;
use crate::request::{
    basic_credentials, bearer_token, client_ip, read_body, require_admin, require_notifier,
};

/// Largest notification body.
const NOTIFY_LIMIT: usize = 64 * 1024;

/// `GET /v1/ws`: token in `?token=` or `Authorization: Bearer`, or HTTP Basic, or none
/// (then `authorize` within `ws.auth_timeout`).
pub async fn upgrade(
    req: HttpRequest,
    payload: web::Payload,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let query =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?;
    let credentials = if let Some(t) = query.get("token") {
        Credentials::Token(t.clone())
    } else if let Some(t) = bearer_token(&req) {
        Credentials::Token(t.to_owned())
    } else if let Some((u, p)) = basic_credentials(&req) {
        Credentials::Basic(u, p)
    } else {
        Credentials::None
    };
    let remote = client_ip(&req, &broker.settings())?;
    Ok(broker_ws::connect(&req, payload, broker.into_inner(), remote, credentials).await?)
}

async fn notify(
    req: &HttpRequest,
    payload: web::Payload,
    broker: &Broker,
    route: Route,
) -> Result<HttpResponse, ApiError> {
    require_notifier(req, &broker.settings())?;
    let body = read_body(req, payload, NOTIFY_LIMIT).await?;
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        return Err(ApiError::bad_request(
            "invalid_json",
            format!("the notification must be JSON: {e}"),
        ));
    }
    let delivered = broker.notify(route, body).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "delivered": delivered })))
}

/// `POST /v1/users/{user}/notify`: the JSON body to every connection of the user.
#[utoipa::path(
    post,
    path = "/v1/users/{user}/notify",
    tag = "connections",
    description = "Push JSON to every connection of a user",
    params(("user" = String, Path, description = "User name", example = "u")),
    request_body(content = serde_json::Value, content_type = "application/json"),
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "Connections reached", body = serde_json::Value),
        crate::openapi::NotifyErrors
    )
)]
pub async fn notify_user(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    notify(&req, payload, &broker, Route::User(path.into_inner())).await
}

/// `POST /v1/connections/{id}/notify`: the JSON body to one connection (404 if unknown).
#[utoipa::path(
    post,
    path = "/v1/connections/{id}/notify",
    tag = "connections",
    description = "Push JSON to one connection",
    params(("id" = String, Path, description = "Connection id")),
    request_body(content = serde_json::Value, content_type = "application/json"),
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "Connections reached", body = serde_json::Value),
        crate::openapi::NotifyErrors
    )
)]
pub async fn notify_connection(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    notify(&req, payload, &broker, Route::Connection(path.into_inner())).await
}

/// `GET /v1/connections` (admin)
#[utoipa::path(
    get,
    path = "/v1/connections",
    tag = "connections",
    description = "Live WebSocket connections",
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "The connections", body = serde_json::Value),
        crate::openapi::NotifyErrors
    )
)]
pub async fn list(req: HttpRequest, broker: web::Data<Broker>) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &broker.settings())?;
    let connections = broker.connections().await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "connections": connections })))
}

/// `DELETE /v1/connections/{id}` (admin): closes it with code 4010.
#[utoipa::path(
    delete,
    path = "/v1/connections/{id}",
    tag = "connections",
    description = "Close a connection (code 4010)",
    params(("id" = String, Path, description = "Connection id")),
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "Closed", body = serde_json::Value),
        crate::openapi::NotifyErrors
    )
)]
pub async fn close(
    req: HttpRequest,
    path: web::Path<String>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &broker.settings())?;
    let id = path.into_inner();
    let disconnect = Disconnect {
        code: broker_ws::protocol::close::BY_ADMIN,
        reason: "closed_by_admin",
    };
    broker.close_connection(id.clone(), disconnect).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "id": id, "closed": true })))
}
