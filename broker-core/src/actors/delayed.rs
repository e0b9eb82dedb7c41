//! A queue's delayed messages: held until their time, then appended (in due order, then
//! arrival order) as one batch. Plain data (no actix): the `Queue` actor owns one and
//! keeps the single timer for [`DelayedSet::earliest`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::message::NewMessage;
use crate::store::StoredDelayed;

/// A message waiting for its time; ordered by due time, then arrival.
#[derive(Debug, Clone)]
pub(crate) struct Delayed {
    /// When it is due, Unix ms.
    pub(crate) at_ms: i64,
    /// Its id within the queue (the store's key; grows).
    pub(crate) id: u64,
    /// The message.
    pub(crate) message: NewMessage,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.at_ms, self.id) == (o.at_ms, o.id)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at_ms, self.id).cmp(&(o.at_ms, o.id))
    }
}

/// The delayed messages of one queue: one heap, not a timer each.
#[derive(Debug, Default)]
pub(crate) struct DelayedSet {
    heap: BinaryHeap<Reverse<Delayed>>,
    /// The last id given.
    last_id: u64,
    /// Messages being saved (they count against the limit already).
    saving: usize,
}

impl DelayedSet {
    /// Messages held (not counting those being saved).
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Takes back what the store kept.
    pub(crate) fn restore(&mut self, stored: Vec<StoredDelayed>) {
        for d in stored {
            self.last_id = self.last_id.max(d.id);
            self.heap.push(Reverse(Delayed {
                at_ms: d.at_ms,
                id: d.id,
                message: d.message,
            }));
        }
    }

    /// Gives ids to `messages` due at `at_ms` and counts them as being saved, if they
    /// fit under `max` together with what is held and being saved; `None` otherwise.
    pub(crate) fn reserve(
        &mut self,
        messages: Vec<NewMessage>,
        at_ms: i64,
        max: usize,
    ) -> Option<Vec<StoredDelayed>> {
        let fits = self
            .heap
            .len()
            .checked_add(self.saving)
            .and_then(|n| n.checked_add(messages.len()))
            .is_some_and(|n| n <= max);
        if !fits {
            return None;
        }
        self.saving += messages.len();
        Some(
            messages
                .into_iter()
                .map(|message| {
                    self.last_id += 1;
                    StoredDelayed {
                        id: self.last_id,
                        at_ms,
                        message,
                    }
                })
                .collect(),
        )
    }

    /// The store answered for `count` reserved messages; `saved` are held from now on
    /// (empty when the store refused).
    pub(crate) fn settle(&mut self, count: usize, saved: Vec<StoredDelayed>) {
        self.saving -= count;
        self.restore(saved);
    }

    /// When the earliest held message is due.
    pub(crate) fn earliest(&self) -> Option<i64> {
        self.heap.peek().map(|Reverse(d)| d.at_ms)
    }

    /// Takes every message due at `now`, in due order.
    pub(crate) fn take_due(&mut self, now: i64) -> Vec<Delayed> {
        let mut due = Vec::new();
        while self.heap.peek().is_some_and(|Reverse(d)| d.at_ms <= now) {
            due.push(self.heap.pop().expect("peeked").0);
        }
        due
    }

    /// Holds messages again (a release the store refused), due at `at_ms`.
    pub(crate) fn retry(&mut self, due: Vec<Delayed>, at_ms: i64) {
        for d in due {
            self.heap.push(Reverse(Delayed { at_ms, ..d }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn m(body: &str) -> NewMessage {
        NewMessage {
            audience: None,
            body: Bytes::from(body.to_owned()),
            content_type: None,
            headers: Vec::new(),
        }
    }

    fn bodies(d: &[Delayed]) -> Vec<&[u8]> {
        d.iter().map(|d| &d.message.body[..]).collect()
    }

    #[test]
    fn releases_in_due_order_then_arrival_order() {
        let mut set = DelayedSet::default();
        let late = set.reserve(vec![m("late")], 300, 10).unwrap();
        let early = set.reserve(vec![m("a"), m("b")], 100, 10).unwrap();
        assert_eq!(early.iter().map(|d| d.id).collect::<Vec<_>>(), [2, 3]);
        set.settle(1, late);
        set.settle(2, early);
        assert_eq!((set.len(), set.earliest()), (3, Some(100)));
        assert!(set.take_due(99).is_empty());
        assert_eq!(bodies(&set.take_due(100)), [b"a", b"b"]);
        assert_eq!(set.earliest(), Some(300));
        let due = set.take_due(1000);
        assert_eq!(bodies(&due), [b"late"]);
        set.retry(due, 2000);
        assert_eq!(set.earliest(), Some(2000));
    }

    #[test]
    fn the_limit_counts_what_is_being_saved() {
        let mut set = DelayedSet::default();
        let two = set.reserve(vec![m("1"), m("2")], 5, 3).unwrap();
        assert!(
            set.reserve(vec![m("3"), m("4")], 5, 3).is_none(),
            "2 saving + 2 > 3"
        );
        set.settle(2, Vec::new()); // the store refused them
        assert_eq!(set.len(), 0);
        assert!(set.reserve(vec![m("3"), m("4"), m("5")], 5, 3).is_some());
        assert!(two.iter().all(|d| d.at_ms == 5));
    }

    #[test]
    fn ids_go_on_after_a_restore() {
        let mut set = DelayedSet::default();
        set.restore(vec![StoredDelayed {
            id: 41,
            at_ms: 1,
            message: m("kept"),
        }]);
        let next = set.reserve(vec![m("new")], 2, 10).unwrap();
        assert_eq!(next[0].id, 42);
    }
}
