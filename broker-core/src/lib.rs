//! broker-core: the model and the machinery of `broker`, without HTTP.
//!
//! - [`config`]: the configuration model (native shape and webhook-queue's), loading with
//!   environment overrides, and write-back for password changes;
//!   [`settings::Settings`] is its validated, compiled form.
//! - [`actors`]: `Hub` (name → queue, poll-consumer registry) and `Queue` (a bounded,
//!   ordered log with offsets, an epoch and drop-oldest limits).
//! - [`store`]: the `Store` trait behind every append, and its memory backend.
//! - [`auth`]: ingest verifiers, user passwords, client addresses behind proxies.
//! - [`metrics`]: the Prometheus registry.
//! - [`Broker`]: the running broker as the HTTP layer sees it — settings that can be
//!   reloaded, the hub, metrics, login checks, shutdown.

pub mod actors;
pub mod auth;
pub mod broker;
pub mod config;
pub mod crossbar;
pub mod delivery;
pub mod error;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod pg_hooks;
pub mod settings;
pub mod store;

pub use broker::Broker;
pub use error::{Error, Rejection};
