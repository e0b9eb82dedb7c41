//! broker-http integration tests: a real server on a loopback port, driven over HTTP.

mod delayed;
mod ingest;
mod ops;
mod pusher;
mod read;
mod support;
mod webhooks;
