//! The live subscribers of one queue: each new batch is offered to every one of them,
//! never waiting on any; one over its bounds (pending bytes, mailbox) is dropped and
//! handed back to be told once, one that is gone is forgotten. Plain data (generic over
//! what is offered to, so its rules are unit-tested without actix); the `Queue` actor
//! owns one.

use std::collections::HashMap;
use std::sync::Arc;

use super::subscriber::{Offer, Subscriber};
use crate::message::Message;

/// What a live subscription is offered batches through.
pub(crate) trait Offered {
    /// Offers `batch` (`bytes` body bytes) of queue `queue`, without waiting.
    fn offer(&self, queue: &Arc<str>, batch: &Arc<[Arc<Message>]>, bytes: usize) -> Offer;
}

impl Offered for Subscriber {
    fn offer(&self, queue: &Arc<str>, batch: &Arc<[Arc<Message>]>, bytes: usize) -> Offer {
        Subscriber::offer(self, queue, batch, bytes)
    }
}

/// The live subscriptions of a queue, by subscription id.
pub(crate) struct Subscribers<S = Subscriber> {
    by_id: HashMap<u64, S>,
}

impl<S> Default for Subscribers<S> {
    fn default() -> Self {
        Self {
            by_id: HashMap::new(),
        }
    }
}

impl<S: Offered> Subscribers<S> {
    /// Adds (or replaces) subscription `id`.
    pub(crate) fn insert(&mut self, id: u64, sub: S) {
        self.by_id.insert(id, sub);
    }

    /// Ends subscription `id`.
    pub(crate) fn remove(&mut self, id: u64) {
        self.by_id.remove(&id);
    }

    /// Whether there are none.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Ends every subscription, handing them back (each is told to start over).
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (u64, S)> + '_ {
        self.by_id.drain()
    }

    /// Offers new messages to every subscriber; those dropped for lagging are handed
    /// back (to be told), those that are gone are forgotten.
    pub(crate) fn offer(
        &mut self,
        queue: &Arc<str>,
        messages: &[Arc<Message>],
        bytes: usize,
    ) -> Vec<(u64, S)> {
        if self.by_id.is_empty() {
            return Vec::new();
        }
        let batch: Arc<[Arc<Message>]> = messages.into();
        let mut dropped = Vec::new();
        for (id, sub) in &self.by_id {
            match sub.offer(queue, &batch, bytes) {
                Offer::Sent => {}
                Offer::Lagging => dropped.push((*id, true)),
                Offer::Closed => dropped.push((*id, false)),
            }
        }
        dropped
            .into_iter()
            .filter_map(|(id, lagging)| {
                let sub = self.by_id.remove(&id)?;
                lagging.then_some((id, sub))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A subscriber that answers what it is told to and records what it got.
    struct Fake {
        answer: Offer,
        got: RefCell<Vec<u64>>,
    }

    impl Fake {
        fn new(answer: Offer) -> Self {
            Fake {
                answer,
                got: RefCell::default(),
            }
        }
    }

    impl Offered for &Fake {
        fn offer(&self, _: &Arc<str>, batch: &Arc<[Arc<Message>]>, _: usize) -> Offer {
            self.got.borrow_mut().extend(batch.iter().map(|m| m.offset));
            match self.answer {
                Offer::Sent => Offer::Sent,
                Offer::Lagging => Offer::Lagging,
                Offer::Closed => Offer::Closed,
            }
        }
    }

    fn msgs(offsets: &[u64]) -> Vec<Arc<Message>> {
        offsets
            .iter()
            .map(|o| {
                Arc::new(Message::new(
                    "q".into(),
                    *o,
                    bytes::Bytes::from_static(b"x"),
                ))
            })
            .collect()
    }

    #[test]
    fn every_subscriber_is_offered_and_only_laggards_are_handed_back() {
        let (ok, slow, gone) = (
            Fake::new(Offer::Sent),
            Fake::new(Offer::Lagging),
            Fake::new(Offer::Closed),
        );
        let mut subs = Subscribers::default();
        subs.insert(1, &ok);
        subs.insert(2, &slow);
        subs.insert(3, &gone);
        let dropped = subs.offer(&"q".into(), &msgs(&[1, 2]), 2);
        let ids: Vec<u64> = dropped.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![2], "the laggard is handed back to be told");
        for f in [&ok, &slow, &gone] {
            assert_eq!(
                *f.got.borrow(),
                vec![1, 2],
                "everyone was offered the batch"
            );
        }
        // The laggard and the gone one are no longer offered anything.
        subs.offer(&"q".into(), &msgs(&[3]), 1);
        assert_eq!(*ok.got.borrow(), vec![1, 2, 3]);
        assert_eq!(*slow.got.borrow(), vec![1, 2]);
        assert_eq!(*gone.got.borrow(), vec![1, 2]);
        subs.remove(1);
        assert!(subs.is_empty());
    }
}
