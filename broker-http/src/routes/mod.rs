//! Route handlers, grouped by audience.

pub mod compat;
pub mod connections;
pub mod ingest;
pub mod ops;
pub mod read;
