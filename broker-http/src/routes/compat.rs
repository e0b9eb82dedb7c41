//! webhook-queue's reader API, unchanged: `GET /listen/{client}/{queue}`,
//! `GET /read/{client}`, `GET /unlisten/{client}`, `POST /setPassword`,
//! `GET|POST /reload`, `GET /time`. Success bodies are webhook-queue's (empty, or a
//! `MessageList`); errors carry its `message` and `refresh` plus our `code`.

use actix_web::{web, HttpRequest, HttpResponse};
use broker_core::{Broker, ConsumerKey, Error};
use serde::Deserialize;

use crate::error::ApiError;
use crate::request::{is_admin, parse_wait, require_user};
use crate::wire::{MessageList, SetPassword};

/// `GET /listen/{client}/{queue}`: a new client starts after the newest message.
/// Listening again with a connected client is a 409; a disconnected one is replaced.
pub async fn listen(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let user = require_user(&req, &broker).await?;
    let (client, queue) = path.into_inner();
    if !user.may_read(&queue) {
        return Err(Error::NotGranted { queue }.into());
    }
    let key = ConsumerKey {
        user: user.name.clone(),
        client,
    };
    broker.listen(key, queue, true).await?;
    Ok(HttpResponse::Ok().finish())
}

/// Optional long-poll on `/read` (an extension; webhook-queue answers at once).
#[derive(Deserialize)]
pub struct CompatReadQuery {
    /// Long-poll up to this long.
    wait: Option<String>,
}

/// `GET /read/{client}`: every message since the last read, as a `MessageList`.
pub async fn read(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<CompatReadQuery>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let user = require_user(&req, &broker).await?;
    let wait = parse_wait(
        query.wait.as_deref(),
        broker.settings().config.server.max_wait,
    )?;
    let key = ConsumerKey {
        user: user.name.clone(),
        client: path.into_inner(),
    };
    // webhook-queue returns everything unread; the queue's own limits bound it.
    let (_, batch) = broker.consume(key, usize::MAX, wait).await?;
    Ok(HttpResponse::Ok().json(MessageList::of(broker.started_at(), &batch)))
}

/// `GET /unlisten/{client}`
pub async fn unlisten(
    req: HttpRequest,
    path: web::Path<String>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let user = require_user(&req, &broker).await?;
    broker
        .unlisten(ConsumerKey {
            user: user.name.clone(),
            client: path.into_inner(),
        })
        .await?;
    Ok(HttpResponse::Ok().finish())
}

/// `POST /setPassword` with `{"password"}`: stored as argon2id in the config file.
pub async fn set_password(
    req: HttpRequest,
    body: web::Json<SetPassword>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let user = require_user(&req, &broker).await?;
    broker.set_password(&user.name, &body.password).await?;
    tracing::info!(user = %user.name, "password changed");
    Ok(HttpResponse::Ok().finish())
}

/// `GET|POST /reload`: the admin token, or a user with `can_reload`. Queue contents stay;
/// an invalid file leaves the running configuration in place (500 naming the key).
pub async fn reload(req: HttpRequest, broker: web::Data<Broker>) -> Result<HttpResponse, ApiError> {
    if !is_admin(&req, &broker.settings()) {
        let user = require_user(&req, &broker).await?;
        if !user.can_reload {
            return Err(Error::ReloadNotAllowed.into());
        }
    }
    broker.reload().await?;
    Ok(HttpResponse::Ok().finish())
}

/// `GET /time`: the server's start time, Unix seconds, as plain text.
pub async fn time(broker: web::Data<Broker>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(broker.started_at().to_string())
}
