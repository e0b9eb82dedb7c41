//! Reading, native API: `GET /v1/queues/{q}/messages?since=&limit=&wait=&epoch=` and the
//! named cursors `PUT|DELETE /v1/consumers/{client}`, `GET /v1/consumers/{client}/messages`.

use actix_web::{web, HttpRequest, HttpResponse};
use broker_core::{Broker, ConsumerKey, Error};
use serde::Deserialize;

use crate::error::ApiError;
use crate::request::{parse_wait, require_user};
use crate::wire::{ConsumerRequest, ReadReply};

/// Default and largest `limit`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// Query of a native read.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// Last offset the reader has seen (0: from the oldest retained).
    #[serde(default)]
    since: u64,
    /// The epoch `since` belongs to; a different epoch is a 410.
    epoch: Option<String>,
    /// Most messages (default 100, at most 1000).
    limit: Option<usize>,
    /// Long-poll up to this long when nothing is there yet.
    wait: Option<String>,
}

/// Query of a consumer read.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConsumerQuery {
    /// Most messages (default 100, at most 1000).
    limit: Option<usize>,
    /// Long-poll up to this long.
    wait: Option<String>,
}

fn limit(l: Option<usize>) -> Result<usize, ApiError> {
    match l.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be at least 1",
        )),
        n => Ok(n.min(MAX_LIMIT)),
    }
}

/// `GET /v1/queues/{q}/messages`
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/messages",
    tag = "read",
    params(("queue" = String, Path, description = "Queue name", example = "q"), ReadQuery),
    security(("BasicAuth" = [])),
    responses(
        (status = 200, description = "The messages after `since`", body = crate::wire::ReadReply),
        crate::openapi::ReadErrors
    )
)]
pub async fn read_queue(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<ReadQuery>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let queue = path.into_inner();
    let user = require_user(&req, &broker).await?;
    if !user.may_read(&queue) {
        return Err(Error::NotGranted { queue }.into());
    }
    let q = query.into_inner();
    let limit = limit(q.limit)?;
    let wait = parse_wait(q.wait.as_deref(), broker.settings().config.server.max_wait)?;
    let batch = broker.read(&queue, q.since, q.epoch, limit, wait).await?;
    Ok(HttpResponse::Ok().json(ReadReply::of(&queue, &batch)))
}

/// `PUT /v1/consumers/{client}` with `{"queue"}`: creates the cursor, positioned after
/// the newest message. Idempotent for the same queue; another queue is a 409.
#[utoipa::path(
    put,
    path = "/v1/consumers/{client}",
    tag = "read",
    params(("client" = String, Path, description = "The consumer's name (per user)", example = "c1")),
    request_body(content = crate::wire::ConsumerRequest, content_type = "application/json"),
    security(("BasicAuth" = [])),
    responses(
        (status = 200, description = "Created, positioned after the newest message", body = serde_json::Value),
        crate::openapi::ReadErrors
    )
)]
pub async fn put_consumer(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<ConsumerRequest>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let user = require_user(&req, &broker).await?;
    let queue = body.into_inner().queue;
    if !user.may_read(&queue) {
        return Err(Error::NotGranted { queue }.into());
    }
    let client = path.into_inner();
    let key = ConsumerKey {
        user: user.name.clone(),
        client: client.clone(),
    };
    broker.listen(key, queue.clone(), false).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "client": client, "queue": queue })))
}

/// `DELETE /v1/consumers/{client}`
#[utoipa::path(
    delete,
    path = "/v1/consumers/{client}",
    tag = "read",
    params(("client" = String, Path, description = "The consumer's name", example = "c1")),
    security(("BasicAuth" = [])),
    responses(
        (status = 200, description = "Deleted", body = serde_json::Value),
        crate::openapi::ReadErrors
    )
)]
pub async fn delete_consumer(
    req: HttpRequest,
    path: web::Path<String>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let user = require_user(&req, &broker).await?;
    let client = path.into_inner();
    broker
        .unlisten(ConsumerKey {
            user: user.name.clone(),
            client: client.clone(),
        })
        .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "client": client, "deleted": true })))
}

/// `GET /v1/consumers/{client}/messages`: the unread messages; the cursor moves past them.
#[utoipa::path(
    get,
    path = "/v1/consumers/{client}/messages",
    tag = "read",
    params(("client" = String, Path, description = "The consumer's name", example = "c1"), ConsumerQuery),
    security(("BasicAuth" = [])),
    responses(
        (status = 200, description = "The unread messages; the cursor moves past them", body = crate::wire::ReadReply),
        crate::openapi::ReadErrors
    )
)]
pub async fn read_consumer(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<ConsumerQuery>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let user = require_user(&req, &broker).await?;
    let q = query.into_inner();
    let limit = limit(q.limit)?;
    let wait = parse_wait(q.wait.as_deref(), broker.settings().config.server.max_wait)?;
    let key = ConsumerKey {
        user: user.name.clone(),
        client: path.into_inner(),
    };
    let (queue, batch) = broker.consume(key, limit, wait).await?;
    Ok(HttpResponse::Ok().json(ReadReply::of(&queue, &batch)))
}
