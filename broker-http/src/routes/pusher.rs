//! Crossbar.io's HTTP Publisher bridge at `pusher.path` (default `/push`).
//!
//! `POST|PUT` a JSON object `{"topic","args","kwargs","options"}`; the topic names a
//! queue (patterns allowed) and the message's data is `{"args":[…],"kwargs":{…}}`.
//! Checks run in Crossbar's order and answer with Crossbar's statuses and bodies
//! (`{"id": <publication>}` or `{"error","args","kwargs"}`), plus Crossbar's CORS headers.
//! Differences: `require_ip`/`require_tls` are checked before the signature (so a refused
//! address spends no nonce), a nonce is accepted once, an unknown topic is a 404, and a
//! queue with its own ingest authentication accepts pusher requests only when they are
//! signed.

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use broker_core::auth::crossbar::{self, SignedParams};
use broker_core::auth::IngestAuth;
use broker_core::broker::{PublishOutcome, PublishRequest, Publisher};
use broker_core::crossbar::{publication, publication_id};
use broker_core::message::Audience;
use broker_core::settings::PusherSettings;
use broker_core::Broker;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::PusherError;
use crate::request::{client_ip, header_str, is_tls, read_body};

/// Registers the pusher at `path`.
pub fn configure(cfg: &mut web::ServiceConfig, path: &str) {
    cfg.service(web::resource(path).to(push));
}

#[derive(Deserialize)]
struct Event<'a> {
    topic: Option<String>,
    #[serde(borrow, default)]
    args: Option<&'a RawValue>,
    #[serde(borrow, default)]
    kwargs: Option<&'a RawValue>,
    #[serde(default)]
    options: Option<Options>,
}

#[derive(Deserialize, Default)]
struct Options {
    #[serde(default)]
    exclude: Option<Vec<u64>>,
    #[serde(default)]
    eligible: Option<Vec<u64>>,
    /// Crossbar's pusher always acknowledges; accepted and ignored.
    #[serde(default, rename = "acknowledge")]
    _acknowledge: Option<bool>,
}

/// CORS and caching headers as Crossbar sets them, except that an origin is reflected
/// with `Allow-Credentials: true` only when `allowed` lists it (Crossbar reflects any):
/// other origins get `*` without credentials.
fn crossbar_headers(
    req: &HttpRequest,
    status: StatusCode,
    allowed: &[String],
) -> HttpResponseBuilder {
    let mut res = HttpResponse::build(status);
    let listed = header_str(req, "origin")
        .filter(|o| *o != "null")
        .filter(|o| allowed.iter().any(|a| a == "*" || a == o));
    match listed {
        Some(origin) => res
            .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin))
            .insert_header((header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true"))
            .insert_header((header::VARY, "Origin")),
        None => res.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")),
    };
    res.insert_header((
        header::CACHE_CONTROL,
        "no-store,no-cache,must-revalidate,max-age=0",
    ))
    .insert_header((header::CONTENT_TYPE, "application/json; charset=UTF-8"));
    if let Some(h) = header_str(req, "access-control-request-headers") {
        res.insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, h));
    }
    res
}

async fn push(req: HttpRequest, payload: web::Payload, broker: web::Data<Broker>) -> HttpResponse {
    let pusher = broker.settings().pusher.clone();
    let debug = pusher.as_ref().is_some_and(|p| p.config.debug);
    let allowed = pusher
        .as_ref()
        .map(|p| p.config.allowed_origins.clone())
        .unwrap_or_default();
    let outcome = match pusher {
        None => Err(PusherError::new(404, "the pusher is not configured")),
        Some(p) => handle(&req, payload, &broker, &p).await,
    };
    match outcome {
        Ok(None) => {
            let mut res = crossbar_headers(&req, StatusCode::OK, &allowed);
            res.insert_header((header::ALLOW, "POST,PUT,OPTIONS"))
                .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "POST,PUT,OPTIONS"));
            res.finish()
        }
        Ok(Some(id)) => {
            if debug {
                tracing::info!(publication = id, "pusher: published");
            }
            crossbar_headers(&req, StatusCode::OK, &allowed).body(format!("{{\"id\":{id}}}"))
        }
        Err(e) => {
            if debug {
                tracing::info!(status = e.status.as_u16(), error = %e, "pusher: refused");
            }
            crossbar_headers(&req, e.status, &allowed).body(e.body().to_string())
        }
    }
}

/// `Ok(None)`: a CORS preflight; `Ok(Some(id))`: published.
async fn handle(
    req: &HttpRequest,
    payload: web::Payload,
    broker: &Broker,
    p: &PusherSettings,
) -> Result<Option<u64>, PusherError> {
    match *req.method() {
        Method::OPTIONS => return Ok(None),
        Method::POST | Method::PUT => {}
        ref m => {
            return Err(PusherError::new(
                405,
                format!(
                    "Method not accepted by the REST bridge. ({m} not allowed, only POST, PUT)"
                ),
            ))
        }
    }
    // Required (Crossbar accepts none): without it a browser's cross-origin POST is a
    // "simple request" that skips the CORS preflight.
    {
        let ct = header_str(req, "content-type").unwrap_or_default();
        let mut parts = ct.split(';').map(|s| s.trim().to_ascii_lowercase());
        let essence = parts.next().unwrap_or_default();
        if essence != "application/json" {
            return Err(PusherError::new(
                400,
                format!(
                    "Non-accepted content type. (must be one of '[b'application/json']', not '{essence}')"
                ),
            ));
        }
        for param in parts {
            if let Some(("charset", v)) = param.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                if v != "utf-8" && v != "utf8" {
                    return Err(PusherError::new(
                        400,
                        "Non-accepted request encoding, must be UTF-8.",
                    ));
                }
            }
        }
    }
    let settings = broker.settings();
    let body = read_body(req, payload, p.body_limit).await.map_err(|e| {
        if matches!(
            e,
            broker_core::Error::Rejected {
                reason: broker_core::Rejection::BodyTooLarge,
                ..
            }
        ) {
            let length = header_str(req, "content-length").unwrap_or("the body");
            PusherError::new(
                413,
                format!(
                    "Request too long. ({length} is longer than accepted {})",
                    p.body_limit
                ),
            )
        } else {
            PusherError::from(e)
        }
    })?;
    let ip = client_ip(req, &settings)
        .map_err(|_| PusherError::new(400, "Request denied based on IP address."))?;
    if !p.require_ip.is_empty() && !p.require_ip.iter().any(|n| n.contains(&ip)) {
        return Err(PusherError::new(400, "Request denied based on IP address."));
    }
    if p.config.require_tls && !is_tls(req, &settings) {
        return Err(PusherError::new(
            400,
            "Malformed request to the REST bridge. (request denied because not using TLS)",
        ));
    }
    if let Some((key, secret)) = &p.signing {
        let query = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .map(|q| q.into_inner())
            .unwrap_or_default();
        let get = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let params = SignedParams {
            key: get("key"),
            timestamp: get("timestamp"),
            seq: get("seq"),
            nonce: get("nonce"),
            signature: get("signature"),
        };
        crossbar::verify(
            &params,
            &body,
            key,
            secret,
            p.config.timestamp_delta_limit,
            broker_core::message::now_ms(),
            broker.pusher_nonces(),
        )?;
        // The other replicas of a cluster have not seen it either.
        let nonce = params.nonce.unwrap_or_default();
        let window = std::time::Duration::from_secs(p.config.timestamp_delta_limit);
        if !broker
            .claim_signed(&format!("pusher\n{key}\n{nonce}"), window.saturating_mul(2))
            .await?
        {
            return Err(broker_core::auth::crossbar::SignatureError::Replayed.into());
        }
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| PusherError::new(400, "Non-decodable request body, was not UTF-8."))?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|_| PusherError::new(400, "Request body was invalid JSON."))?;
    if !value.is_object() {
        return Err(PusherError::new(
            400,
            "Request body was valid JSON, but not well formed (must be a dict).",
        ));
    }
    let event: Event<'_> = serde_json::from_str(text).map_err(|e| {
        PusherError::new(
            400,
            format!("Request body was valid JSON, but not well formed ({e})."),
        )
    })?;
    let topic = event.topic.ok_or_else(|| {
        PusherError::new(
            400,
            "Request body was valid JSON, but not well formed (missing key 'topic').",
        )
    })?;
    let list_or_null = |v: Option<&RawValue>, open: char| {
        v.is_none_or(|v| v.get() == "null" || v.get().starts_with(open))
    };
    if !list_or_null(event.args, '[') || !list_or_null(event.kwargs, '{') {
        return Err(PusherError::new(
            400,
            "Request body was valid JSON, but not well formed ('args' must be a list and 'kwargs' a dict).",
        ));
    }
    let spec = settings
        .queue(&topic)
        .cloned()
        .ok_or_else(|| PusherError::new(404, format!("no queue for topic '{topic}'")))?;
    if !matches!(spec.auth, IngestAuth::None) && p.signing.is_none() {
        return Err(PusherError::new(
            401,
            "Request denied based on failed authentication. (the queue requires authentication: configure pusher.key and pusher.secret)",
        ));
    }
    let options = event.options.unwrap_or_default();
    let audience = Audience {
        exclude: options.exclude.unwrap_or_default(),
        eligible: options.eligible,
    };
    let message = publication(event.args, event.kwargs, Some(audience));
    let out = broker
        .publish(PublishRequest {
            queue: &topic,
            publisher: Publisher::Authenticated { client_ip: ip },
            messages: vec![message],
            deliver_at_ms: None,
        })
        .await
        .map_err(PusherError::from)?;
    match out {
        PublishOutcome::Published { published, .. } => {
            Ok(Some(publication_id(&topic, published.last_offset)))
        }
        PublishOutcome::Scheduled(_) => Err(PusherError::new(500, "the message was not published")),
    }
}
