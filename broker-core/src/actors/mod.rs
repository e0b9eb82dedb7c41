//! The actors, one per file with the messages they handle above them: `Hub` (queue
//! registry), `Queue` (one log each), `Webhook` (one target each), `Cron`,
//! `ConnectionRegistry` (live connections by id and user) and `Leader`; `subscriber` is
//! the interface live subscribers implement.

pub mod cron;
mod cursors;
mod delayed;
pub mod hub;
pub mod leader;
pub mod queue;
pub mod registry;
pub mod subscriber;
pub mod webhook;
mod window;

pub use hub::{
    ApplySettings, GetQueue, Hub, Listen, QueueHandle, ResolveConsumer, SubscribePrefix, Unlisten,
    UnsubscribePrefix,
};
pub use queue::{
    Batch, ConsumerKey, ConsumerRead, Head, Publish, PublishAt, Published, Queue, Read, Scheduled,
    Subscribe, Subscribed, Unsubscribe,
};
pub use registry::{ConnectionInfo, ConnectionRegistry};
pub use subscriber::{Disconnect, Notify, Subscriber};
