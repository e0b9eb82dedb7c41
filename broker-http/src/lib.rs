//! broker-http: the actix-web application of `broker`.
//!
//! It holds no state of its own: every handler works through the [`Broker`] of
//! broker-core. Routes:
//!
//! - native: `POST /v1/queues/{q}/messages`, `POST /v1/queues/{q}/batch`,
//!   `GET /v1/queues/{q}/messages`, `PUT|DELETE /v1/consumers/{client}`,
//!   `GET /v1/consumers/{client}/messages`;
//! - WebSocket and notifications: `GET /v1/ws`, `POST /v1/users/{user}/notify`,
//!   `POST /v1/connections/{id}/notify`, `GET /v1/connections`,
//!   `DELETE /v1/connections/{id}`;
//! - webhook-queue compatible: `POST /q/{name}`, `GET /listen/{client}/{queue}`,
//!   `GET /read/{client}`, `GET /unlisten/{client}`, `POST /setPassword`,
//!   `GET|POST /reload`, `GET /time`;
//! - Crossbar.io compatible: `POST|PUT pusher.path` (default `/push`) when `[pusher]` is
//!   configured, and WAMP v2 (`wamp.2.json`) on `GET /v1/ws` and `GET /ws`;
//! - operations: `GET /metrics`, `GET /healthz`, `GET /readyz`.
//!
//! A standby (another broker holds the database's active lock) serves
//! [`standby_server`] instead: health, metrics, and 503 `standby` for the rest.
//!
//! Every error, including those of extractors and unknown routes, is the JSON of
//! [`error::ApiError`], mapped in one place.

pub mod error;
pub mod openapi;
mod request;
mod routes;
mod standby;
pub mod wire;

pub use standby::standby_server;

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, Service, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{web, App, HttpRequest, HttpServer};
use broker_core::Broker;

use error::ApiError;
use routes::{admin, compat, connections, ingest, ops, pg_hooks, pusher, read};

/// Largest JSON body of the small JSON endpoints (setPassword, consumers).
const JSON_LIMIT: usize = 64 * 1024;

/// The application, ready for `HttpServer::new` or `actix_web::test::init_service`.
pub fn app(
    broker: Arc<Broker>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let metrics = broker.metrics().clone();
    // The pusher's route is fixed at start (a reload can turn it off, not move it).
    let pusher_path = broker
        .settings()
        .pusher
        .as_ref()
        .map(|p| p.config.path.clone());
    App::new()
        .app_data(web::Data::from(broker))
        .app_data(
            web::JsonConfig::default()
                .limit(JSON_LIMIT)
                .error_handler(|e, _| match e {
                    actix_web::error::JsonPayloadError::OverflowKnownLength { .. }
                    | actix_web::error::JsonPayloadError::Overflow { .. } => {
                        ApiError::BodyTooLarge(JSON_LIMIT).into()
                    }
                    other => ApiError::bad_request("invalid_json", other.to_string()).into(),
                }),
        )
        .app_data(
            web::QueryConfig::default()
                .error_handler(|e, _| ApiError::bad_request("invalid_query", e.to_string()).into()),
        )
        .app_data(
            web::PathConfig::default()
                .error_handler(|e, _| ApiError::bad_request("invalid_path", e.to_string()).into()),
        )
        .wrap_fn(move |req, srv| {
            let start = Instant::now();
            let metrics = metrics.clone();
            let method = method_label(req.method());
            let fut = srv.call(req);
            async move {
                let res = fut.await?;
                let route = res
                    .request()
                    .match_pattern()
                    .unwrap_or_else(|| "unmatched".to_owned());
                let status = res.status().as_u16().to_string();
                metrics
                    .http_requests
                    .with_label_values(&[&route, method, &status])
                    .inc();
                metrics
                    .http_duration
                    .with_label_values(&[&route])
                    .observe(start.elapsed().as_secs_f64());
                Ok(res)
            }
        })
        .configure(routes)
        .configure(move |cfg| {
            if let Some(path) = &pusher_path {
                pusher::configure(cfg, path);
            }
        })
        .default_service(web::to(not_found))
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        resource("/v1/queues/{queue}/messages")
            .route(web::post().to(ingest::publish_message))
            .route(web::get().to(read::read_queue)),
    )
    .service(resource("/v1/queues/{queue}/batch").route(web::post().to(ingest::publish_batch)))
    .service(resource("/v1/queues/{queue}/redrive").route(web::post().to(admin::redrive)))
    .service(resource("/v1/queues").route(web::get().to(admin::list_queues)))
    .service(
        resource("/v1/queues/{queue}")
            .route(web::get().to(admin::get_queue))
            .route(web::put().to(admin::put_queue))
            .route(web::delete().to(admin::delete_queue)),
    )
    .service(
        resource("/v1/crons")
            .route(web::get().to(admin::list_crons))
            .route(web::post().to(admin::create_cron)),
    )
    .service(resource("/v1/crons/{name}").route(web::delete().to(admin::delete_cron)))
    .service(
        resource("/v1/consumers/{client}")
            .route(web::put().to(read::put_consumer))
            .route(web::delete().to(read::delete_consumer)),
    )
    .service(resource("/v1/consumers/{client}/messages").route(web::get().to(read::read_consumer)))
    .service(resource("/v1/ws").route(web::get().to(connections::upgrade)))
    // Crossbar's conventional WebSocket path, for WAMP clients.
    .service(resource("/ws").route(web::get().to(connections::upgrade)))
    .service(resource("/v1/users/{user}/notify").route(web::post().to(connections::notify_user)))
    .service(resource("/v1/connections").route(web::get().to(connections::list)))
    .service(resource("/v1/connections/{id}").route(web::delete().to(connections::close)))
    .service(
        resource("/v1/connections/{id}/notify")
            .route(web::post().to(connections::notify_connection)),
    )
    .service(resource("/q/{queue}").route(web::post().to(ingest::webhook_queue_enqueue)))
    .service(resource("/listen/{client}/{queue}").route(web::get().to(compat::listen)))
    .service(resource("/read/{client}").route(web::get().to(compat::read)))
    .service(resource("/unlisten/{client}").route(web::get().to(compat::unlisten)))
    .service(resource("/setPassword").route(web::post().to(compat::set_password)))
    .service(
        resource("/reload")
            .route(web::get().to(compat::reload))
            .route(web::post().to(compat::reload)),
    )
    .service(resource("/time").route(web::get().to(compat::time)))
    .service(
        resource("/queues")
            .route(web::post().to(pg_hooks::create_queue))
            .route(web::get().to(pg_hooks::list_queues)),
    )
    .service(
        resource("/queues/")
            .route(web::post().to(pg_hooks::create_queue))
            .route(web::get().to(pg_hooks::list_queues)),
    )
    .service(resource("/messages").route(web::post().to(pg_hooks::create_message)))
    .service(resource("/messages/").route(web::post().to(pg_hooks::create_message)))
    .service(resource("/cron").route(web::post().to(pg_hooks::create_cron)))
    .service(resource("/cron/").route(web::post().to(pg_hooks::create_cron)))
    .service(resource("/v1/openapi.json").route(web::get().to(openapi::openapi_json)))
    .service(resource("/metrics").route(web::get().to(ops::metrics)))
    .service(resource("/healthz").route(web::get().to(ops::healthz)))
    .service(resource("/readyz").route(web::get().to(ops::readyz)));
}

/// A resource whose unmatched methods get a JSON 405.
fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

async fn not_found(_: HttpRequest) -> Result<&'static str, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed(_: HttpRequest) -> Result<&'static str, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

/// Bounded method label: unknown (extension) methods share one value.
fn method_label(m: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

/// An HTTP server for `broker` on an already bound listener. Signals are left to the
/// caller (the CLI turns SIGTERM/SIGINT into a graceful stop of the returned server).
pub fn server(broker: Arc<Broker>, listener: std::net::TcpListener) -> std::io::Result<Server> {
    let timeout = broker.settings().config.server.shutdown_timeout;
    let factory_broker = broker.clone();
    Ok(HttpServer::new(move || app(factory_broker.clone()))
        .listen(listener)?
        .shutdown_timeout(timeout.as_secs())
        .disable_signals()
        .run())
}
