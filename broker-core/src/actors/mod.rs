//! The actors: `Hub` (queue registry), `Queue` (one log each) and `ConnectionRegistry`
//! (live connections by id and user), one per file with the messages they handle above
//! them; `subscriber` is the interface live subscribers implement.

pub mod cron;
pub mod hub;
pub mod leader;
pub mod queue;
pub mod registry;
pub mod subscriber;
pub mod webhook;

pub use hub::{
    ApplySettings, GetQueue, Hub, Listen, QueueHandle, ResolveConsumer, SubscribePrefix, Unlisten,
    UnsubscribePrefix,
};
pub use queue::{
    AddConsumer, Batch, ConsumerKey, ConsumerRead, Head, Publish, PublishAt, Published, Queue,
    Read, Reconfigure, RemoveConsumer, Scheduled, Subscribe, Subscribed, Unsubscribe,
};
pub use registry::{ConnectionInfo, ConnectionRegistry};
pub use subscriber::{Deliver, Disconnect, Lagged, Notify, Subscriber};
