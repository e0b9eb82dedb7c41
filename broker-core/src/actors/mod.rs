//! The actors: `Hub` (queue registry) and `Queue` (one log each), one per file with the
//! messages they handle above them.

pub mod hub;
pub mod queue;

pub use hub::{ApplySettings, GetQueue, Hub, Listen, QueueHandle, ResolveConsumer, Unlisten};
pub use queue::{
    AddConsumer, Batch, ConsumerKey, ConsumerRead, Publish, Published, Queue, Read, Reconfigure,
    RemoveConsumer,
};
