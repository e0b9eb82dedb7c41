//! Publishing: `POST /v1/queues/{q}/messages`, `POST /v1/queues/{q}/batch`, and
//! webhook-queue's `POST /q/{name}`.
//!
//! Order of checks, cheapest first and nothing buffered before it must be: the checks
//! that need no body ([`Broker::admit_ingest`]: queue, client address, header-only
//! credentials) → body read up to `server.max_body_size` → [`Broker::publish`], the one
//! front door (signature over the raw body, content rules, notify shapes, the queue's
//! limits). Refusals are counted in broker-core, by queue and reason.

use std::sync::Arc;

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use broker_core::broker::{PublishOutcome, PublishRequest, Publisher};
use broker_core::message::NewMessage;
use broker_core::settings::QueueSpec;
use broker_core::{Broker, Error, Rejection};
use bytes::Bytes;

use crate::error::ApiError;
use crate::request::{client_ip, header_str, parse_duration, read_body};
use crate::wire::{BatchPublished, BatchReply, BatchRequest, PublishReply, Published, Scheduled};

/// A request that passed every check that does not depend on the message itself.
struct Admitted {
    spec: Arc<QueueSpec>,
    body: Bytes,
    content_type: Option<Arc<str>>,
}

/// The checks that need no body ([`Broker::admit_ingest`]), then the body, read up to
/// `server.max_body_size`.
async fn admit(
    req: &HttpRequest,
    payload: web::Payload,
    broker: &Broker,
    queue: &str,
) -> Result<Admitted, ApiError> {
    let settings = broker.settings();
    let lookup = |name: &str| header_str(req, name);
    let spec = broker.admit_ingest(queue, client_ip(req, &settings)?, &lookup)?;
    let body = read_body(req, payload, settings.config.server.max_body_size)
        .await
        .map_err(|e| broker.count_refusal(spec.label(), e))?;
    let content_type = header_str(req, header::CONTENT_TYPE.as_str()).map(Arc::from);
    Ok(Admitted {
        spec,
        body,
        content_type,
    })
}

/// Through the one front door, as an ingest request.
async fn publish(
    req: &HttpRequest,
    broker: &Broker,
    queue: &str,
    a: &Admitted,
    messages: Vec<NewMessage>,
    deliver_at_ms: Option<i64>,
) -> Result<PublishOutcome, ApiError> {
    let lookup = |name: &str| header_str(req, name);
    let publisher = Publisher::Ingest {
        client_ip: client_ip(req, &broker.settings())?,
        headers: &lookup,
        body: Some(&a.body),
    };
    Ok(broker
        .publish(PublishRequest {
            queue,
            publisher,
            messages,
            deliver_at_ms,
        })
        .await?)
}

fn single(a: &Admitted) -> Vec<NewMessage> {
    vec![NewMessage {
        id: None,
        audience: None,
        body: a.body.clone(),
        content_type: a.content_type.clone(),
        headers: Vec::new(),
    }]
}

/// Query parameters of a publish; unknown ones are refused rather than ignored.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
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
                let d = parse_duration("delay", d, "invalid_query")?;
                // Saturating: a client-supplied delay must not wrap into the past; one
                // too long is refused (and counted) by the front door (`max_delay`).
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                let at = broker_core::message::now_ms().saturating_add(ms);
                Ok(Some(at))
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
    let (p, delivered) = match out {
        PublishOutcome::Scheduled(s) => {
            let scheduled = Scheduled {
                success: true,
                queue,
                scheduled: true,
                count: s.count,
                deliver_at: chrono::DateTime::from_timestamp_millis(s.deliver_at_ms)
                    .unwrap_or_default()
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            };
            return if batch {
                HttpResponse::Ok().json(BatchReply::Scheduled(scheduled))
            } else {
                HttpResponse::Ok().json(PublishReply::Scheduled(scheduled))
            };
        }
        PublishOutcome::Published {
            published,
            delivered,
        } => (published, delivered),
    };
    if !batch {
        HttpResponse::Ok().json(PublishReply::Published(Published {
            success: true,
            offset: p.last_offset,
            epoch: p.epoch.to_string(),
            queue,
            delivered,
            duplicate: p.duplicates > 0,
        }))
    } else {
        HttpResponse::Ok().json(BatchReply::Published(BatchPublished {
            success: true,
            first_offset: p.first_offset,
            offset: p.last_offset,
            count,
            epoch: p.epoch.to_string(),
            queue,
            delivered,
            duplicates: p.duplicates,
        }))
    }
}

/// `POST /v1/queues/{q}/messages`
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/messages",
    tag = "publish",
    params(("queue" = String, Path, description = "Queue name (or a name a pattern covers)", example = "q"), PublishQuery),
    request_body(
        description = "The message body, kept as is (any content type)",
        content((String = "text/plain"), (serde_json::Value = "application/json"))
    ),
    responses(
        (status = 200, description = "Stored (or scheduled)", body = PublishReply),
        crate::openapi::PublishErrors
    )
)]
pub async fn publish_message(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<PublishQuery>,
    payload: web::Payload,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let queue = path.into_inner();
    let at = query.deliver_at_ms()?;
    let key = idempotency_key(&req)?;
    if key.is_some() && at.is_some() {
        return Err(ApiError::bad_request(
            "invalid_query",
            "an Idempotency-Key is for immediate publishes, not with `delay` or `at`",
        ));
    }
    let admitted = admit(&req, payload, &broker, &queue).await?;
    let mut messages = single(&admitted);
    messages[0].id = key;
    let out = publish(&req, &broker, &queue, &admitted, messages, at).await?;
    Ok(reply(queue, out, 1, false))
}

/// The `Idempotency-Key` header.
fn idempotency_key(req: &HttpRequest) -> Result<Option<std::sync::Arc<str>>, ApiError> {
    let Some(v) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    crate::wire::idempotency_key(v.as_bytes())
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_header",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
        })
}

/// `POST /v1/queues/{q}/batch`: all messages or none.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/batch",
    tag = "publish",
    params(("queue" = String, Path, description = "Queue name", example = "q"), PublishQuery),
    request_body(content = crate::wire::BatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "All stored (or scheduled), or none", body = BatchReply),
        crate::openapi::PublishErrors
    )
)]
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
    let invalid = |m: String| {
        ApiError::from(broker.count_refusal(&label, Error::rejected(Rejection::InvalidBody, m)))
    };
    let parsed: BatchRequest =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&a.body))
            .map_err(|e| invalid(format!("invalid batch at `{}`: {}", e.path(), e.inner())))?;
    if parsed.messages.is_empty() {
        return Err(invalid("`messages` is empty".into()));
    }
    if at.is_some() && parsed.messages.iter().any(|m| m.id.is_some()) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "idempotency keys (`id`) are for immediate publishes, not with `delay` or `at`",
        ));
    }
    let mut messages = Vec::with_capacity(parsed.messages.len());
    for (i, el) in parsed.messages.into_iter().enumerate() {
        messages.push(
            el.into_message()
                .map_err(|m| invalid(format!("messages[{i}]: {m}")))?,
        );
    }
    let count = messages.len();
    let out = publish(&req, &broker, &queue, &a, messages, at).await?;
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
    publish(&req, &broker, &path, &admitted, messages, None).await?;
    Ok(HttpResponse::Ok().finish())
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any `delay=`/`at=`: a due time that is never in the past for a delay (no
        /// wrap), or a 400; never a panic. (How far ahead is bounded by the front
        /// door's `limits.max_delay`.)
        #[test]
        fn delivery_times_are_computed_without_wrapping(
            delay in proptest::option::of(prop_oneof![".{0,24}", "[0-9]{1,25}(s|ms|m|h|d|y)?"]),
            at in proptest::option::of(prop_oneof![
                ".{0,30}",
                "[+-]?[0-9]{4,6}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})",
            ]),
        ) {
            let q = PublishQuery { delay: delay.clone(), at };
            let before = broker_core::message::now_ms();
            if let (Ok(Some(t)), Some(_)) = (q.deliver_at_ms(), delay) {
                prop_assert!(t >= before, "a delay wrapped into the past: {t}");
            }
        }
    }
}
