//! The admin API (`Authorization: Bearer <admin.token>`, or pg-hooks'
//! `X-PLATFORMATIC-ADMIN-SECRET: <admin.token>`): runtime queues with their webhooks,
//! crons, delivery status, and redrive of dead letters.

use actix_web::{web, HttpRequest, HttpResponse};
use broker_core::config::{CronConfig, QueueConfig};
use broker_core::settings::{QueueSpec, Runtime};
use broker_core::{Broker, Error};
use serde::Deserialize;

use crate::error::ApiError;
use crate::request::require_admin;

/// A definition error is the caller's (400), not the server's.
fn definition_error(e: Error) -> ApiError {
    match e {
        Error::Invalid(_) => ApiError::bad_request("invalid_definition", e.to_string()),
        other => other.into(),
    }
}

/// Secrets never leave the broker, not even to admins.
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if k == "url" {
                    // Webhook targets: no user info, query or token-like path segments.
                    if let Some(u) = val.as_str().and_then(broker_core::delivery::shown_url_text) {
                        *val = u.into();
                    }
                } else if k == "headers" {
                    // A target's own headers (Authorization, API keys): names only.
                    if let serde_json::Value::Object(h) = val {
                        for v in h.values_mut() {
                            *v = "***".into();
                        }
                    }
                } else if matches!(
                    k.as_str(),
                    "key" | "keys" | "signing_secret" | "token" | "pass_hash"
                ) {
                    *val = match val {
                        serde_json::Value::Array(a) => {
                            serde_json::Value::Array(vec!["***".into(); a.len()])
                        }
                        _ => "***".into(),
                    };
                } else {
                    redact(val);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

async fn describe(broker: &Broker, spec: &QueueSpec) -> serde_json::Value {
    let mut definition = serde_json::to_value(&spec.config).unwrap_or_default();
    redact(&mut definition);
    let mut v = serde_json::json!({
        "name": spec.name,
        "runtime": spec.runtime,
        "kind": spec.kind,
        "limits": spec.limits,
        "definition": definition,
    });
    if !spec.name.ends_with('*') {
        if let Ok(info) = broker.head(&spec.name).await {
            v["epoch"] = info.epoch.to_string().into();
            v["offset"] = info.head.into();
            v["retained"] = (info.head + 1 - info.first).into();
        }
        v["webhooks"] =
            serde_json::to_value(broker.webhook_status(&spec.name).await).unwrap_or_default();
    }
    v
}

/// `GET /v1/queues`
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "admin",
    description = "Every queue and pattern, with position and webhook status",
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "The queues", body = serde_json::Value),
        crate::openapi::AdminErrors
    )
)]
pub async fn list_queues(
    req: HttpRequest,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &broker.settings())?;
    let settings = broker.settings();
    let mut out = Vec::new();
    for spec in settings.all_queues() {
        out.push(describe(&broker, spec).await);
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "queues": out })))
}

/// `GET /v1/queues/{q}`: definition, position and delivery status per webhook target.
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}",
    tag = "admin",
    description = "One queue",
    params(("queue" = String, Path, description = "Queue name", example = "q")),
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "Definition, position and targets", body = serde_json::Value),
        crate::openapi::AdminErrors
    )
)]
pub async fn get_queue(
    req: HttpRequest,
    path: web::Path<String>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &broker.settings())?;
    let settings = broker.settings();
    let name = path.into_inner();
    let spec = settings.queue(&name).ok_or(Error::UnknownQueue {
        queue: name.clone(),
    })?;
    Ok(HttpResponse::Ok().json(describe(&broker, spec).await))
}

/// `PUT /v1/queues/{q}` with a queue definition (the `[[queues]]` keys but `name`).
#[utoipa::path(
    put,
    path = "/v1/queues/{queue}",
    tag = "admin",
    description = "Create or replace a runtime queue",
    params(("queue" = String, Path, description = "Queue name", example = "q")),
    request_body(content = serde_json::Value, content_type = "application/json"),
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "The queue as defined", body = serde_json::Value),
        crate::openapi::AdminErrors
    )
)]
pub async fn put_queue(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<serde_json::Value>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &broker.settings())?;
    let name = path.into_inner();
    let mut def = body.into_inner();
    let Some(obj) = def.as_object_mut() else {
        return Err(ApiError::bad_request(
            "invalid_definition",
            "the body must be a JSON object",
        ));
    };
    obj.insert("name".into(), name.clone().into());
    let cfg: QueueConfig = serde_path_to_error::deserialize(def).map_err(|e| {
        ApiError::bad_request("invalid_definition", format!("{}: {}", e.path(), e.inner()))
    })?;
    define_queue(&broker, cfg).await?;
    let settings = broker.settings();
    let spec = settings.queue(&name).ok_or(Error::UnknownQueue {
        queue: name.clone(),
    })?;
    Ok(HttpResponse::Ok().json(describe(&broker, spec).await))
}

/// Adds or replaces a runtime queue (shared with the pg-hooks routes).
pub async fn define_queue(broker: &Broker, cfg: QueueConfig) -> Result<(), ApiError> {
    if broker
        .settings()
        .config
        .queues
        .iter()
        .any(|q| q.name == cfg.name)
    {
        return Err(Error::DefinedInConfig { name: cfg.name }.into());
    }
    broker
        .redefine(|rt| {
            rt.queues.retain(|q| q.name != cfg.name);
            rt.queues.push(cfg);
            Ok(())
        })
        .await
        .map_err(definition_error)
}

/// `DELETE /v1/queues/{q}`: runtime queues only.
#[utoipa::path(
    delete,
    path = "/v1/queues/{queue}",
    tag = "admin",
    description = "Delete a runtime queue",
    params(("queue" = String, Path, description = "Queue name", example = "q")),
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "Deleted", body = serde_json::Value),
        crate::openapi::AdminErrors
    )
)]
pub async fn delete_queue(
    req: HttpRequest,
    path: web::Path<String>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &broker.settings())?;
    let name = path.into_inner();
    let s = broker.settings();
    let in_config = s.config.queues.iter().any(|q| q.name == name);
    let in_runtime = s.runtime.queues.iter().any(|q| q.name == name);
    let missing = Error::UnknownQueue {
        queue: name.clone(),
    };
    delete_runtime(&broker, name, in_config, in_runtime, missing, |rt, n| {
        rt.queues.retain(|q| q.name != n)
    })
    .await
}

/// Removes a runtime definition, refusing config-file ones and unknown names.
async fn delete_runtime(
    broker: &Broker,
    name: String,
    in_config: bool,
    in_runtime: bool,
    missing: Error,
    remove: impl FnOnce(&mut Runtime, &str),
) -> Result<HttpResponse, ApiError> {
    if in_config {
        return Err(Error::DefinedInConfig { name }.into());
    }
    if !in_runtime {
        return Err(missing.into());
    }
    broker
        .redefine(|rt| {
            remove(rt, &name);
            Ok(())
        })
        .await
        .map_err(definition_error)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "deleted": true })))
}

/// `GET /v1/crons`
#[utoipa::path(
    get,
    path = "/v1/crons",
    tag = "admin",
    description = "Every cron",
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "The crons", body = serde_json::Value),
        crate::openapi::AdminErrors
    )
)]
pub async fn list_crons(
    req: HttpRequest,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &broker.settings())?;
    let crons = broker.crons().await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "crons": crons })))
}

/// `POST /v1/crons` with `{name, queue, schedule, timezone?, body?, headers?}`.
#[utoipa::path(
    post,
    path = "/v1/crons",
    tag = "admin",
    description = "Define a runtime cron",
    request_body(content = serde_json::Value, content_type = "application/json"),
    security(("BearerAuth" = [])),
    responses(
        (status = 201, description = "Defined", body = serde_json::Value),
        crate::openapi::AdminErrors
    )
)]
pub async fn create_cron(
    req: HttpRequest,
    body: web::Json<CronConfig>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &broker.settings())?;
    let cfg = body.into_inner();
    let name = cfg.name.clone();
    define_cron(&broker, cfg).await?;
    let crons = broker.crons().await?;
    let created = crons.into_iter().find(|c| c.name == name);
    Ok(HttpResponse::Created().json(created))
}

/// Adds a runtime cron (shared with the pg-hooks routes).
pub async fn define_cron(broker: &Broker, cfg: CronConfig) -> Result<(), ApiError> {
    if broker
        .settings()
        .crons
        .iter()
        .any(|c| c.config.name == cfg.name)
    {
        return Err(Error::Exists { name: cfg.name }.into());
    }
    broker
        .redefine(|rt| {
            rt.crons.push(cfg);
            Ok(())
        })
        .await
        .map_err(definition_error)
}

/// `DELETE /v1/crons/{name}`: runtime crons only.
#[utoipa::path(
    delete,
    path = "/v1/crons/{name}",
    tag = "admin",
    description = "Delete a runtime cron",
    params(("name" = String, Path, description = "Cron name")),
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "Deleted", body = serde_json::Value),
        crate::openapi::AdminErrors
    )
)]
pub async fn delete_cron(
    req: HttpRequest,
    path: web::Path<String>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &broker.settings())?;
    let name = path.into_inner();
    let s = broker.settings();
    let in_config = s.config.crons.iter().any(|c| c.name == name);
    let in_runtime = s.runtime.crons.iter().any(|c| c.name == name);
    let missing = Error::UnknownCron { name: name.clone() };
    delete_runtime(&broker, name, in_config, in_runtime, missing, |rt, n| {
        rt.crons.retain(|c| c.name != n)
    })
    .await
}

/// Body of a redrive.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    /// Start after this offset of the dead-letter queue (default 0: from the oldest).
    #[serde(default)]
    since: u64,
    /// Most messages (default 1000).
    limit: Option<usize>,
}

/// `POST /v1/queues/{dlq}/redrive`: republishes dead letters to their original queues.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/redrive",
    tag = "admin",
    description = "Republish dead letters to their original queues",
    params(("queue" = String, Path, description = "The dead-letter queue", example = "dlq")),
    request_body(content = RedriveRequest, content_type = "application/json"),
    security(("BearerAuth" = [])),
    responses(
        (status = 200, description = "How many, and the last dead-letter offset handled", body = serde_json::Value),
        crate::openapi::AdminErrors
    )
)]
pub async fn redrive(
    req: HttpRequest,
    path: web::Path<String>,
    body: Option<web::Json<RedriveRequest>>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&req, &broker.settings())?;
    let r = body.map(web::Json::into_inner).unwrap_or_default();
    let (n, last) = broker
        .redrive(&path, r.since, r.limit.unwrap_or(1000).clamp(1, 10_000))
        .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "redriven": n, "offset": last })))
}
