//! The actors, one per file with the messages they handle above them: `Hub` (queue
//! registry), `Queue` (one log each), `Webhooks` (supervises the targets), `Webhook`
//! (one target each), `Cron`, `ConnectionRegistry` (live connections by id and user)
//! and `Leader`; `subscriber` is the interface live subscribers implement.

pub mod cron;
mod cursors;
mod delayed;
pub mod hub;
pub mod leader;
pub mod queue;
pub mod registry;
pub mod subscriber;
pub mod webhook;
pub mod webhooks;
mod window;

pub use hub::{
    ApplySettings, Hub, Listen, ResolveConsumer, SubscribePrefix, Unlisten, UnsubscribePrefix,
};
pub use leader::Leader;
pub use queue::{
    Batch, ConsumerKey, ConsumerRead, Head, Publish, PublishAt, Published, Queue, QueueHandle,
    Read, Scheduled, Subscribe, Subscribed, Unsubscribe,
};
pub use registry::{ConnectionInfo, ConnectionRegistry};
pub use subscriber::{Disconnect, Notify, Subscriber};
