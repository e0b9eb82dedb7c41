//! The interface between queues (and the connection registry) and live subscribers.
//!
//! A subscriber is any actor that handles these messages; today the WebSocket session of
//! broker-ws. Queues never block on a subscriber: they `try_send` into its bounded
//! mailbox and account the bytes it has not consumed yet. A subscriber over either bound
//! is dropped from the queue and sent one [`Lagged`] (a single message per lag, so the
//! unbounded `do_send` cannot pile up).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;

use crate::message::Message;

/// New messages of one queue, oldest first, shared by every subscriber of the queue.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    /// The subscription it is for.
    pub subscription: u64,
    /// The queue.
    pub queue: Arc<str>,
    /// The messages.
    pub messages: Arc<[Arc<Message>]>,
    /// Sum of their body sizes, to subtract from the subscriber's pending bytes.
    pub bytes: usize,
}

/// The queue dropped this subscription because the subscriber fell behind.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Lagged {
    /// The subscription that was dropped.
    pub subscription: u64,
    /// The queue.
    pub queue: Arc<str>,
    /// Its newest offset when the subscription was dropped.
    pub offset: u64,
    /// Its epoch.
    pub epoch: Arc<str>,
}

/// A notification for one connection: `data` is JSON text.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Notify {
    /// The JSON value to deliver as `{"event":"notify","data":…}`.
    pub data: Bytes,
}

/// Asks a connection to close.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Disconnect {
    /// WebSocket close code.
    pub code: u16,
    /// Close reason (short, public).
    pub reason: &'static str,
}

/// The configuration changed (a reload): a connection re-derives its rights from it and
/// closes if it lost any it is using.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Regrant {
    /// The new settings.
    pub settings: Arc<crate::settings::Settings>,
}

/// What a queue keeps of one live subscription.
#[derive(Clone)]
pub struct Subscriber {
    /// Unique id of this subscription.
    pub id: u64,
    /// Where new messages go.
    pub deliver: Recipient<Deliver>,
    /// Where the lag notice goes.
    pub lagged: Recipient<Lagged>,
    /// Bytes sent to the subscriber and not yet consumed by it (it subtracts).
    pub pending_bytes: Arc<AtomicUsize>,
    /// The bound on `pending_bytes`.
    pub max_pending_bytes: usize,
}

/// A process-unique subscription id.
pub fn next_subscription_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Outcome of offering a batch to a subscriber.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Queued in its mailbox.
    Sent,
    /// Over a bound: drop the subscription and tell it.
    Lagging,
    /// The subscriber is gone.
    Closed,
}

impl Subscriber {
    /// Offers a batch without ever waiting.
    pub fn offer(&self, queue: &Arc<str>, messages: &Arc<[Arc<Message>]>, bytes: usize) -> Offer {
        // Count first: the subscriber may consume (and subtract) before try_send returns.
        let before = self.pending_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before > 0 && before + bytes > self.max_pending_bytes {
            self.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Offer::Lagging;
        }
        let msg = Deliver {
            subscription: self.id,
            queue: queue.clone(),
            messages: messages.clone(),
            bytes,
        };
        match self.deliver.try_send(msg) {
            Ok(()) => Offer::Sent,
            Err(e) => {
                self.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
                match e {
                    SendError::Full(_) => Offer::Lagging,
                    SendError::Closed(_) => Offer::Closed,
                }
            }
        }
    }
}
