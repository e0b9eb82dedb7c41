//! Publishing: `POST /v1/queues/{q}/messages`, `POST /v1/queues/{q}/batch`, and
//! webhook-queue's `POST /q/{name}`.
//!
//! Order of checks, cheapest first and nothing buffered before it must be: queue exists
//! → client address allowed → header-only credentials → body read up to
//! `server.max_body_size` → signature over the raw body → [`Broker::publish`] (content
//! rules, notify shapes, the queue's limits; shared with WebSocket publish). Every
//! refusal is counted by reason.

use std::sync::Arc;

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use broker_core::broker::PublishOutcome;
use broker_core::message::NewMessage;
use broker_core::metrics::UNKNOWN_QUEUE_LABEL;
use broker_core::settings::QueueSpec;
use broker_core::{Broker, Error, Rejection};
use bytes::Bytes;

use crate::error::ApiError;
use crate::request::{client_ip, header_str, read_body};
use crate::wire::{BatchPublished, BatchRequest, Published, Scheduled};

/// A request that passed every check that does not depend on the message itself.
struct Admitted {
    spec: Arc<QueueSpec>,
    body: Bytes,
    content_type: Option<Arc<str>>,
}

/// Counts a refusal under its reason, then returns it.
fn counted(broker: &Broker, label: &str, e: Error) -> ApiError {
    match &e {
        Error::Rejected { reason, .. } => broker.metrics().reject(label, *reason),
        Error::UnknownQueue { .. } => broker
            .metrics()
            .reject(UNKNOWN_QUEUE_LABEL, Rejection::UnknownQueue),
        _ => {}
    }
    e.into()
}

async fn admit(
    req: &HttpRequest,
    payload: web::Payload,
    broker: &Broker,
    queue: &str,
) -> Result<Admitted, ApiError> {
    let settings = broker.settings();
    let Some(spec) = settings.queue(queue).cloned() else {
        return Err(counted(
            broker,
            UNKNOWN_QUEUE_LABEL,
            Error::UnknownQueue {
                queue: queue.to_owned(),
            },
        ));
    };
    let label = spec.label();
    let reject = |reason, msg: String| counted(broker, label, Error::rejected(reason, msg));
    if !spec.allow_ips.is_empty() {
        let ip = client_ip(req, &settings);
        if !spec.allow_ips.iter().any(|n| n.contains(&ip)) {
            return Err(reject(
                Rejection::IpNotAllowed,
                format!("address {ip} may not publish to this queue"),
            ));
        }
    }
    let now = chrono::Utc::now().timestamp();
    let lookup = |name: &str| header_str(req, name);
    if !spec.auth.needs_body() {
        spec.auth
            .verify(lookup, b"", now)
            .map_err(|e| counted(broker, label, e))?;
    }
    let body = read_body(req, payload, settings.config.server.max_body_size)
        .await
        .map_err(|e| counted(broker, label, e))?;
    if spec.auth.needs_body() {
        spec.auth
            .verify(lookup, &body, now)
            .map_err(|e| counted(broker, label, e))?;
    }
    let content_type = header_str(req, header::CONTENT_TYPE.as_str()).map(Arc::from);
    Ok(Admitted {
        spec,
        body,
        content_type,
    })
}

async fn publish(
    broker: &Broker,
    queue: &str,
    a: Admitted,
    messages: Vec<NewMessage>,
    deliver_at_ms: Option<i64>,
) -> Result<PublishOutcome, ApiError> {
    Ok(broker
        .publish(queue, &a.spec, messages, deliver_at_ms)
        .await?)
}

fn single(a: &Admitted) -> Vec<NewMessage> {
    vec![NewMessage {
        audience: None,
        body: a.body.clone(),
        content_type: a.content_type.clone(),
        headers: Vec::new(),
    }]
}

/// Query parameters of a publish; unknown ones are refused rather than ignored.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishQuery {
    /// Deliver after this long (`30s`, `5m`, or seconds).
    delay: Option<String>,
    /// Deliver at this time (RFC 3339).
    at: Option<String>,
}

impl PublishQuery {
    /// When the message becomes visible, if delayed.
    fn deliver_at_ms(&self) -> Result<Option<i64>, ApiError> {
        match (&self.delay, &self.at) {
            (Some(_), Some(_)) => Err(ApiError::bad_request(
                "invalid_query",
                "give `delay` or `at`, not both",
            )),
            (Some(d), None) => {
                let d = match d.trim().parse::<u64>() {
                    Ok(secs) => std::time::Duration::from_secs(secs),
                    Err(_) => humantime::parse_duration(d.trim()).map_err(|_| {
                        ApiError::bad_request(
                            "invalid_query",
                            format!("`delay={d}` is not a duration like 30s"),
                        )
                    })?,
                };
                Ok(Some(broker_core::message::now_ms() + d.as_millis() as i64))
            }
            (None, Some(at)) => chrono::DateTime::parse_from_rfc3339(at)
                .map(|t| Some(t.timestamp_millis()))
                .map_err(|_| {
                    ApiError::bad_request(
                        "invalid_query",
                        format!("`at={at}` is not an RFC 3339 time"),
                    )
                }),
            (None, None) => Ok(None),
        }
    }
}

/// The reply of a publish: offsets, or when delayed messages become visible.
fn reply(queue: String, out: PublishOutcome, count: usize, batch: bool) -> HttpResponse {
    if let Some(s) = out.scheduled {
        return HttpResponse::Ok().json(Scheduled {
            success: true,
            queue,
            scheduled: true,
            count: s.count,
            deliver_at: chrono::DateTime::from_timestamp_millis(s.deliver_at_ms)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
    }
    let p = out.published.expect("an immediate publish has offsets");
    if !batch {
        HttpResponse::Ok().json(Published {
            success: true,
            offset: p.last_offset,
            epoch: p.epoch.to_string(),
            queue,
            delivered: out.delivered,
        })
    } else {
        HttpResponse::Ok().json(BatchPublished {
            success: true,
            first_offset: p.first_offset,
            offset: p.last_offset,
            count,
            epoch: p.epoch.to_string(),
            queue,
            delivered: out.delivered,
        })
    }
}

/// `POST /v1/queues/{q}/messages`
pub async fn publish_message(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<PublishQuery>,
    payload: web::Payload,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let queue = path.into_inner();
    let at = query.deliver_at_ms()?;
    let admitted = admit(&req, payload, &broker, &queue).await?;
    let messages = single(&admitted);
    let out = publish(&broker, &queue, admitted, messages, at).await?;
    Ok(reply(queue, out, 1, false))
}

/// `POST /v1/queues/{q}/batch`: all messages or none.
pub async fn publish_batch(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<PublishQuery>,
    payload: web::Payload,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let queue = path.into_inner();
    let at = query.deliver_at_ms()?;
    let a = admit(&req, payload, &broker, &queue).await?;
    let label = a.spec.label().to_owned();
    let invalid = |m: String| counted(&broker, &label, Error::rejected(Rejection::InvalidBody, m));
    let parsed: BatchRequest =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&a.body))
            .map_err(|e| invalid(format!("invalid batch at `{}`: {}", e.path(), e.inner())))?;
    if parsed.messages.is_empty() {
        return Err(invalid("`messages` is empty".into()));
    }
    let mut messages = Vec::with_capacity(parsed.messages.len());
    for (i, el) in parsed.messages.into_iter().enumerate() {
        messages.push(
            el.into_message()
                .map_err(|m| invalid(format!("messages[{i}]: {m}")))?,
        );
    }
    let count = messages.len();
    let out = publish(&broker, &queue, a, messages, at).await?;
    Ok(reply(queue, out, count, true))
}

/// webhook-queue's `POST /q/{name}`: an empty 200 body on success. Unlike webhook-queue,
/// an unknown queue is a 404 rather than a silent drop (see docs/compatibility.md).
pub async fn webhook_queue_enqueue(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let admitted = admit(&req, payload, &broker, &path).await?;
    let messages = single(&admitted);
    publish(&broker, &path, admitted, messages, None).await?;
    Ok(HttpResponse::Ok().finish())
}
