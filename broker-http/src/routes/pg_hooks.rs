//! @platformatic/pg-hooks compatible routes: `POST /queues`, `POST /messages`,
//! `POST /cron` (with or without the trailing slash its tutorial uses). A pg-hooks queue
//! becomes the runtime queue `pg-hooks.<id>` with one webhook target, keeping pg-hooks'
//! retry timing (100 ms × 2^n) and numeric ids; replies are its camelCase entities.

use std::collections::BTreeMap;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use broker_core::broker::{PublishRequest, Publisher};
use broker_core::config::{BackoffConfig, CronConfig, QueueConfig, WebhookConfig};
use broker_core::message::NewMessage;
use broker_core::pg_hooks::{cron_name, queue_name};
use broker_core::{Broker, Error};
use serde::Deserialize;

use crate::error::ApiError;
use crate::request::{client_ip, require_admin};
use crate::routes::admin::{define_cron, define_queue};

fn authorize(req: &HttpRequest, broker: &Broker) -> Result<(), ApiError> {
    let settings = broker.settings();
    if settings.config.pg_hooks.allow_anonymous {
        return Ok(());
    }
    require_admin(req, &settings)
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// pg-hooks' queue entity, as created.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateQueue {
    name: String,
    callback_url: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    max_retries: Option<u32>,
    #[serde(default)]
    dead_letter_queue_id: Option<u64>,
}

/// `POST /queues`
pub async fn create_queue(
    req: HttpRequest,
    body: web::Json<CreateQueue>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &broker)?;
    let q = body.into_inner();
    let id = broker.pg_hooks.next_queue_id();
    let method = q.method.clone().unwrap_or_else(|| "POST".into());
    let max_retries = q.max_retries.unwrap_or(5);
    let webhook = WebhookConfig {
        url: q.callback_url.clone(),
        method: method.clone(),
        headers: q.headers.clone().unwrap_or_default(),
        timeout: Duration::from_secs(10),
        max_retries,
        // pg-hooks' own timing: 100 ms × 2^n.
        backoff: BackoffConfig {
            initial: Some(Duration::from_millis(100)),
            max: Some(Duration::from_secs(24 * 3600)),
            schedule: Vec::new(),
            jitter: 0.0,
        },
        max_in_flight: 16,
        signing_secret: None,
        dead_letter_queue: q.dead_letter_queue_id.map(queue_name),
    };
    let cfg: QueueConfig = serde_json::from_value(serde_json::json!({ "name": queue_name(id) }))
        .expect("a name is a valid queue definition");
    define_queue(
        &broker,
        QueueConfig {
            webhooks: vec![webhook],
            ..cfg
        },
    )
    .await?;
    let at = now();
    let entity = serde_json::json!({
        "id": id,
        "name": q.name,
        "callbackUrl": q.callback_url,
        "method": method,
        "headers": q.headers,
        "deadLetterQueueId": q.dead_letter_queue_id,
        "maxRetries": max_retries,
        "createdAt": at,
        "updatedAt": at,
    });
    broker.pg_hooks.put_queue(id, entity.clone());
    broker.persist_state().await?;
    Ok(HttpResponse::Ok().json(entity))
}

/// `GET /queues`
pub async fn list_queues(
    req: HttpRequest,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &broker)?;
    Ok(HttpResponse::Ok().json(broker.pg_hooks.queues()))
}

/// pg-hooks' message entity, as created.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateMessage {
    queue_id: u64,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    when: Option<String>,
}

/// `POST /messages`: `when` delays delivery (a time without zone is UTC).
pub async fn create_message(
    req: HttpRequest,
    body: web::Json<CreateMessage>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &broker)?;
    let m = body.into_inner();
    let name = queue_name(m.queue_id);
    let deliver_at = match &m.when {
        None => None,
        Some(w) => Some(parse_when(w).ok_or_else(|| {
            ApiError::bad_request("invalid_body", format!("`when` is not a timestamp: {w}"))
        })?),
    };
    let headers: Vec<(String, String)> =
        m.headers.clone().unwrap_or_default().into_iter().collect();
    let content_type = broker_core::message::content_type_of(&headers);
    let message = NewMessage {
        id: None,
        audience: None,
        body: bytes::Bytes::from(m.body.clone().unwrap_or_default()),
        content_type,
        headers,
    };
    broker
        .publish(PublishRequest {
            queue: &name,
            publisher: Publisher::Authenticated {
                client_ip: client_ip(&req, &broker.settings())?,
            },
            messages: vec![message],
            deliver_at_ms: deliver_at,
        })
        .await?;
    let id = broker.pg_hooks.next_message_id();
    broker.persist_state().await?; // ids are never reused, even across restarts
    let at = now();
    let when = deliver_at
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || at.clone(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": id,
        "queueId": m.queue_id,
        "body": m.body,
        "headers": m.headers,
        "when": when,
        "failed": false,
        "sentAt": null,
        "retries": 0,
        "cronId": null,
        "createdAt": at,
        "updatedAt": at,
    })))
}

fn parse_when(w: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(w) {
        return Some(t.timestamp_millis());
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(w, f).ok())
        .map(|t| t.and_utc().timestamp_millis())
}

/// pg-hooks' cron entity, as created.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateCron {
    queue_id: u64,
    schedule: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
}

/// `POST /cron`
pub async fn create_cron(
    req: HttpRequest,
    body: web::Json<CreateCron>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &broker)?;
    let c = body.into_inner();
    let queue = queue_name(c.queue_id);
    if broker.settings().queue(&queue).is_none() {
        return Err(Error::UnknownQueue { queue }.into());
    }
    let id = broker.pg_hooks.next_cron_id();
    define_cron(
        &broker,
        CronConfig {
            name: cron_name(id),
            queue,
            schedule: c.schedule.clone(),
            timezone: None,
            body: c.body.clone().unwrap_or_default(),
            headers: c.headers.clone().unwrap_or_default(),
        },
    )
    .await?;
    let at = now();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": id,
        "queueId": c.queue_id,
        "schedule": c.schedule,
        "body": c.body,
        "headers": c.headers,
        "createdAt": at,
        "updatedAt": at,
    })))
}

#[cfg(test)]
mod tests {
    #[test]
    fn when_formats() {
        assert_eq!(
            super::parse_when("2026-01-01T00:00:00Z"),
            Some(1767225600000)
        );
        assert_eq!(
            super::parse_when("2026-01-01T00:00:00.000"),
            Some(1767225600000)
        );
        assert_eq!(
            super::parse_when("2026-01-01 00:00:00"),
            Some(1767225600000)
        );
        assert_eq!(super::parse_when("tomorrow"), None);
    }
}
