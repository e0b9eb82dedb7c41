//! Route handlers, grouped by audience.

pub mod admin;
pub mod compat;
pub mod connections;
pub mod ingest;
pub mod ops;
pub mod pg_hooks;
pub mod pusher;
pub mod read;
