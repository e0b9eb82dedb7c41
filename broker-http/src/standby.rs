//! What a standby broker serves while another broker holds the database's active lock
//! (broker_core::store::ActiveLock): liveness, readiness, metrics, and a 503 `standby`
//! JSON error with `Retry-After: 1` for everything else.
//!
//! `GET /readyz` answers 503 `{"status":"standby"}`, so a load balancer that routes by
//! readiness sends nothing here. `GET /readyz?standby=ok` answers 200 for a standby:
//! for orchestrators that route by another signal (the Helm chart's `ha` profile routes
//! by the pod label `broker.io/role=active`) and only need to know the process is well.

use std::sync::Arc;

use actix_web::dev::{Server, Service};
use actix_web::{web, App, HttpResponse, HttpServer};
use broker_core::metrics::Metrics;

use crate::error::ApiError;

/// Query of `GET /readyz` on a standby.
#[derive(serde::Deserialize)]
struct ReadyQuery {
    /// `ok`: a standby counts as ready.
    standby: Option<String>,
}

async fn readyz(q: web::Query<ReadyQuery>) -> HttpResponse {
    let body = serde_json::json!({ "status": "standby" });
    if q.standby.as_deref() == Some("ok") {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics_route(metrics: web::Data<Metrics>) -> HttpResponse {
    crate::routes::ops::exposition(&metrics)
}

async fn standby() -> Result<&'static str, ApiError> {
    Err(ApiError::Standby)
}

/// The standby's routes; everything else is [`standby`]. Every answer closes its
/// connection (`Connection: close`): a client's next attempt goes through its load
/// balancer again, or reaches this process's own server once it is active, never a
/// pooled connection to a standby that has gone.
fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::QueryConfig::default()
            .error_handler(|e, _| ApiError::bad_request("invalid_query", e.to_string()).into()),
    )
    .service(
        web::scope("")
            .wrap_fn(|req, srv| {
                let fut = srv.call(req);
                async move {
                    let mut res = fut.await?;
                    res.response_mut()
                        .head_mut()
                        .set_connection_type(actix_web::http::ConnectionType::Close);
                    Ok(res)
                }
            })
            .route("/healthz", web::get().to(crate::routes::ops::healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics_route))
            .default_service(web::to(standby)),
    );
}

/// The standby server on `listener`. `metrics` should say `broker_leader 0` and
/// `broker_ready 0`; the caller stops the server once this process becomes active.
pub fn standby_server(
    metrics: Arc<Metrics>,
    listener: std::net::TcpListener,
) -> std::io::Result<Server> {
    let metrics = web::Data::from(metrics);
    Ok(
        HttpServer::new(move || App::new().app_data(metrics.clone()).configure(configure))
            .workers(1)
            .listen(listener)?
            .shutdown_timeout(1)
            .disable_signals()
            .run(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test;

    #[actix_web::test]
    async fn a_standby_is_alive_not_ready_and_refuses_the_rest() {
        let m = Arc::new(Metrics::new());
        m.leader.set(0);
        m.observe_ready(false);
        let app =
            test::init_service(App::new().app_data(web::Data::from(m)).configure(configure)).await;
        let call = |uri: &'static str| test::TestRequest::get().uri(uri).to_request();
        assert_eq!(
            test::call_service(&app, call("/healthz")).await.status(),
            200
        );
        assert_eq!(
            test::call_service(&app, call("/readyz")).await.status(),
            503
        );
        assert_eq!(
            test::call_service(&app, call("/readyz?standby=ok"))
                .await
                .status(),
            200
        );
        let res = test::call_service(&app, call("/v1/queues/q/messages?since=0")).await;
        assert_eq!(res.status(), 503);
        assert_eq!(
            res.response().head().connection_type(),
            actix_web::http::ConnectionType::Close
        );
        assert_eq!(res.headers().get("retry-after").unwrap(), "1");
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["code"], "standby");
        let text = test::read_body(test::call_service(&app, call("/metrics")).await).await;
        let text = String::from_utf8(text.to_vec()).unwrap();
        assert!(text.contains("broker_leader 0"), "{text}");
        assert!(text.contains("broker_ready 0"), "{text}");
    }
}
