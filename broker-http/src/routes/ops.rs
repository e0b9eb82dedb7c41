//! Operations: `GET /metrics`, `GET /healthz` (the process answers), `GET /readyz`
//! (it should get traffic: not shutting down).

use actix_web::{web, HttpResponse};
use broker_core::Broker;

/// `GET /metrics` in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"))
)]
pub async fn metrics(broker: web::Data<Broker>) -> HttpResponse {
    // Refreshes broker_ready, so a scrape shows what /readyz would answer now.
    broker.unready_reason();
    exposition(broker.metrics())
}

/// The Prometheus text exposition of `metrics` (also a standby's `GET /metrics`).
pub fn exposition(metrics: &broker_core::metrics::Metrics) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics.render())
}

/// `GET /healthz`
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process answers", body = serde_json::Value))
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: 503 once shutdown has begun, or while the store's last write failed,
/// so load balancers route around this instance.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready for traffic", body = serde_json::Value),
        (status = 503, description = "Shutting down, or the store does not take writes", body = serde_json::Value)
    )
)]
pub async fn readyz(broker: web::Data<Broker>) -> HttpResponse {
    match broker.unready_reason() {
        Some(reason) => {
            HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": reason }))
        }
        None => HttpResponse::Ok().json(serde_json::json!({ "status": "ready" })),
    }
}
