//! A queue's delayed messages: held until their time, then appended (in due order, then
//! arrival order) as one batch. Plain data (no actix): the `Queue` actor owns one and
//! keeps the single timer for [`DelayedSet::earliest`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

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
    /// Ids held, so an entry learnt twice (saved here, and heard of from the shared
    /// store) is held once.
    ids: HashSet<u64>,
    /// Ids are random rather than counted: replicas sharing the store give ids too.
    random_ids: bool,
    /// Messages being saved (they count against the limit already).
    saving: usize,
    /// Body bytes held.
    bytes: usize,
    /// Body bytes being saved.
    saving_bytes: usize,
}

/// Which limit a delayed publish would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// `max_delayed_messages`.
    Count,
    /// `max_delayed_bytes`.
    Bytes,
}

fn body_bytes<'a>(messages: impl IntoIterator<Item = &'a NewMessage>) -> usize {
    messages
        .into_iter()
        .fold(0usize, |n, m| n.saturating_add(m.body.len()))
}

impl DelayedSet {
    /// Messages held (not counting those being saved).
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Body bytes held (not counting those being saved).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// A set whose ids are random (a cluster's replicas give ids to the same queue).
    pub(crate) fn with_random_ids() -> Self {
        Self {
            random_ids: true,
            ..Self::default()
        }
    }

    /// Takes back what the store kept (entries held already are skipped); how many
    /// were added.
    pub(crate) fn restore(&mut self, stored: Vec<StoredDelayed>) -> usize {
        let mut added = 0;
        for d in stored {
            if !self.ids.insert(d.id) {
                continue;
            }
            added += 1;
            self.last_id = self.last_id.max(d.id);
            self.bytes = self.bytes.saturating_add(d.message.body.len());
            self.heap.push(Reverse(Delayed {
                at_ms: d.at_ms,
                id: d.id,
                message: d.message,
            }));
        }
        added
    }

    /// Drops the entry `id` (another replica released it); whether it was held.
    pub(crate) fn forget(&mut self, id: u64) -> bool {
        if !self.ids.remove(&id) {
            return false;
        }
        let mut size = 0;
        self.heap.retain(|Reverse(d)| {
            let keep = d.id != id;
            if !keep {
                size = d.message.body.len();
            }
            keep
        });
        self.bytes -= size;
        true
    }

    /// Gives ids to `messages` due at `at_ms` and counts them as being saved, if they
    /// fit under `max` messages and `max_bytes` body bytes together with what is held
    /// and being saved; which limit they would pass otherwise.
    pub(crate) fn reserve(
        &mut self,
        messages: Vec<NewMessage>,
        at_ms: i64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredDelayed>, Full> {
        let fits = self
            .heap
            .len()
            .checked_add(self.saving)
            .and_then(|n| n.checked_add(messages.len()))
            .is_some_and(|n| n <= max);
        if !fits {
            return Err(Full::Count);
        }
        let size = body_bytes(&messages);
        let fits = self
            .bytes
            .checked_add(self.saving_bytes)
            .and_then(|n| n.checked_add(size))
            .is_some_and(|n| n <= max_bytes);
        if !fits {
            return Err(Full::Bytes);
        }
        self.saving += messages.len();
        self.saving_bytes += size;
        Ok(messages
            .into_iter()
            .map(|message| {
                self.last_id = if self.random_ids {
                    let mut b = [0u8; 8];
                    crate::random::fill(&mut b);
                    u64::from_le_bytes(b) >> 1 // stays a positive i64 in SQL stores
                } else {
                    self.last_id + 1
                };
                StoredDelayed {
                    id: self.last_id,
                    at_ms,
                    message,
                }
            })
            .collect())
    }

    /// The store answered for `reserved` (what [`DelayedSet::reserve`] gave); they are
    /// held from now on if `saved` (not when the store refused).
    pub(crate) fn settle(&mut self, reserved: Vec<StoredDelayed>, saved: bool) -> usize {
        self.saving -= reserved.len();
        self.saving_bytes -= body_bytes(reserved.iter().map(|d| &d.message));
        if saved {
            self.restore(reserved)
        } else {
            0
        }
    }

    /// When the earliest held message is due.
    pub(crate) fn earliest(&self) -> Option<i64> {
        self.heap.peek().map(|Reverse(d)| d.at_ms)
    }

    /// Takes every message due at `now`, in due order.
    pub(crate) fn take_due(&mut self, now: i64) -> Vec<Delayed> {
        let mut due = Vec::new();
        while self.heap.peek().is_some_and(|Reverse(d)| d.at_ms <= now) {
            let d = self.heap.pop().expect("peeked").0;
            self.ids.remove(&d.id);
            self.bytes -= d.message.body.len();
            due.push(d);
        }
        due
    }

    /// Holds messages again (a release the store refused), due at `at_ms`.
    pub(crate) fn retry(&mut self, due: Vec<Delayed>, at_ms: i64) {
        for d in due {
            if !self.ids.insert(d.id) {
                continue;
            }
            self.bytes = self.bytes.saturating_add(d.message.body.len());
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
            id: None,
            audience: None,
            body: Bytes::from(body.to_owned()),
            content_type: None,
            headers: Vec::new(),
        }
    }

    fn bodies(d: &[Delayed]) -> Vec<&[u8]> {
        d.iter().map(|d| &d.message.body[..]).collect()
    }

    const NO_BYTE_LIMIT: usize = usize::MAX;

    #[test]
    fn releases_in_due_order_then_arrival_order() {
        let mut set = DelayedSet::default();
        let late = set
            .reserve(vec![m("late")], 300, 10, NO_BYTE_LIMIT)
            .unwrap();
        let early = set
            .reserve(vec![m("a"), m("b")], 100, 10, NO_BYTE_LIMIT)
            .unwrap();
        assert_eq!(early.iter().map(|d| d.id).collect::<Vec<_>>(), [2, 3]);
        set.settle(late, true);
        set.settle(early, true);
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
        let two = set
            .reserve(vec![m("1"), m("2")], 5, 3, NO_BYTE_LIMIT)
            .unwrap();
        assert_eq!(
            set.reserve(vec![m("3"), m("4")], 5, 3, NO_BYTE_LIMIT).err(),
            Some(Full::Count),
            "2 saving + 2 > 3"
        );
        assert!(two.iter().all(|d| d.at_ms == 5));
        set.settle(two, false); // the store refused them
        assert_eq!(set.len(), 0);
        assert!(set
            .reserve(vec![m("3"), m("4"), m("5")], 5, 3, NO_BYTE_LIMIT)
            .is_ok());
    }

    /// Body bytes count as well as messages: held, being saved, and released again.
    #[test]
    fn the_byte_limit_counts_bodies_held_and_being_saved() {
        let mut set = DelayedSet::default();
        let first = set.reserve(vec![m("12345")], 5, 100, 8).unwrap();
        assert_eq!(
            set.reserve(vec![m("1234")], 5, 100, 8).err(),
            Some(Full::Bytes),
            "5 saving + 4 > 8"
        );
        set.settle(first, true);
        assert_eq!(set.bytes(), 5);
        assert_eq!(
            set.reserve(vec![m("1234")], 5, 100, 8).err(),
            Some(Full::Bytes),
            "5 held + 4 > 8"
        );
        let three = set.reserve(vec![m("123")], 6, 100, 8).unwrap();
        set.settle(three, true);
        assert_eq!(set.bytes(), 8);
        let due = set.take_due(5);
        assert_eq!(set.bytes(), 3, "released bodies no longer count");
        set.retry(due, 7);
        assert_eq!(set.bytes(), 8, "retried ones count again");
    }

    #[test]
    fn ids_go_on_after_a_restore() {
        let mut set = DelayedSet::default();
        set.restore(vec![StoredDelayed {
            id: 41,
            at_ms: 1,
            message: m("kept"),
        }]);
        let next = set.reserve(vec![m("new")], 2, 10, NO_BYTE_LIMIT).unwrap();
        assert_eq!(next[0].id, 42);
    }
}
