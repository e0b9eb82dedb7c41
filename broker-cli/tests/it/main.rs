//! End-to-end tests of the real `broker` binary: it is started as a child process on a
//! free loopback port and driven over HTTP and through its own subcommands.

mod cli;
mod cluster;
mod crossbar;
mod durability;
mod faults;
mod ha;
mod observability;
mod openapi;
mod pg_hooks;
mod publish_paths;
mod standard_webhooks;
mod support;
mod webhook_delivery;
mod webhook_queue;
mod ws;
