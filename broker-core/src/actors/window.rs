//! A queue's retained window: the messages a `Queue` keeps in memory for reads and
//! replays, in offset order, with their byte count and the newest visible offset. Plain
//! data (no actix), so its rules are unit-tested on their own; the `Queue` actor owns one.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::config::LimitsConfig;
use crate::message::Message;

/// Why a message left the window (`broker_dropped_total`'s `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// Over `max_message_count`.
    Count,
    /// Over `max_queue_size` (bytes).
    Size,
}

/// The retained window.
#[derive(Debug, Default)]
pub(crate) struct Window {
    log: VecDeque<Arc<Message>>,
    bytes: usize,
    /// Newest visible offset (0 when nothing was ever published).
    head: u64,
}

impl Window {
    /// Newest visible offset.
    pub(crate) fn head(&self) -> u64 {
        self.head
    }

    /// Messages retained.
    pub(crate) fn len(&self) -> usize {
        self.log.len()
    }

    /// Body bytes retained.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Oldest retained offset (`head + 1` when empty).
    pub(crate) fn first_retained(&self) -> u64 {
        self.log.front().map_or(self.head + 1, |m| m.offset)
    }

    /// Whether a reader that has seen up to `since` can go on without a gap.
    pub(crate) fn covers(&self, since: u64) -> bool {
        since <= self.head && since + 1 >= self.first_retained()
    }

    /// Appends messages that follow the head (contiguous, in offset order); the head
    /// moves to the last of them. Their count and body bytes.
    pub(crate) fn append(
        &mut self,
        messages: impl IntoIterator<Item = Arc<Message>>,
    ) -> (usize, usize) {
        let (mut n, mut size) = (0, 0);
        for m in messages {
            debug_assert!(m.offset > self.head, "the window only grows forward");
            self.head = m.offset;
            n += 1;
            size += m.body.len();
            self.bytes += m.body.len();
            self.log.push_back(m);
        }
        (n, size)
    }

    /// Moves the head forward without messages (offsets stored but not retained here).
    pub(crate) fn raise_head(&mut self, head: u64) {
        self.head = self.head.max(head);
    }

    /// Empties the window and sets the head (another history); what it held: count and
    /// bytes.
    pub(crate) fn reset(&mut self, head: u64) -> (usize, usize) {
        let held = (self.log.len(), self.bytes);
        self.log.clear();
        self.bytes = 0;
        self.head = head;
        held
    }

    /// The messages after `since`, at most `limit`, oldest first.
    pub(crate) fn after(&self, since: u64, limit: usize) -> Vec<Arc<Message>> {
        let start = self.log.partition_point(|m| m.offset <= since);
        self.log.range(start..).take(limit).cloned().collect()
    }

    /// Drops the oldest messages until the window is within `limits`: why and how many
    /// bytes, one entry per dropped message.
    pub(crate) fn enforce(&mut self, limits: &LimitsConfig) -> Vec<(DropReason, usize)> {
        let mut dropped = Vec::new();
        while let Some(front) = self.log.front() {
            let reason = if self.log.len() > limits.max_message_count {
                DropReason::Count
            } else if self.bytes > limits.max_queue_size {
                DropReason::Size
            } else {
                break;
            };
            let size = front.body.len();
            self.log.pop_front();
            self.bytes -= size;
            dropped.push((reason, size));
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(offset: u64, size: usize) -> Arc<Message> {
        Arc::new(Message {
            received_at_ms: 0,
            ..Message::new(Arc::from("q"), offset, Bytes::from(vec![b'x'; size]))
        })
    }

    fn limits(count: usize, total: usize) -> LimitsConfig {
        LimitsConfig {
            max_message_count: count,
            max_message_size: usize::MAX,
            max_queue_size: total,
            max_delayed_messages: 10,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn reads_after_a_position_and_knows_what_it_covers() {
        let mut w = Window::default();
        assert_eq!((w.head(), w.first_retained()), (0, 1));
        assert!(w.covers(0));
        assert_eq!(w.append((1..=4).map(|o| msg(o, 10))), (4, 40));
        assert_eq!(
            (w.head(), w.first_retained(), w.len(), w.bytes()),
            (4, 1, 4, 40)
        );
        let after =
            |since, limit| -> Vec<u64> { w.after(since, limit).iter().map(|m| m.offset).collect() };
        assert_eq!(after(0, 10), [1, 2, 3, 4]);
        assert_eq!(after(2, 1), [3]);
        assert_eq!(after(4, 10), Vec::<u64>::new());
        assert!(w.covers(4) && w.covers(0));
        assert!(!w.covers(5), "ahead of the head");
    }

    #[test]
    fn drops_the_oldest_past_count_then_size() {
        let mut w = Window::default();
        w.append((1..=5).map(|o| msg(o, 10)));
        assert_eq!(w.enforce(&limits(3, 1000)), [(DropReason::Count, 10); 2]);
        assert_eq!((w.first_retained(), w.len(), w.bytes()), (3, 3, 30));
        assert_eq!(w.enforce(&limits(3, 15)), [(DropReason::Size, 10); 2]);
        assert_eq!((w.first_retained(), w.head()), (5, 5));
        assert!(!w.covers(3), "3 and 4 rolled off");
        assert!(w.covers(4));
    }

    #[test]
    fn reset_and_raise_head() {
        let mut w = Window::default();
        w.append((1..=2).map(|o| msg(o, 3)));
        w.raise_head(7);
        assert_eq!((w.head(), w.len()), (7, 2));
        w.raise_head(5);
        assert_eq!(w.head(), 7, "never backwards");
        assert_eq!(w.reset(20), (2, 6));
        assert_eq!(
            (w.head(), w.first_retained(), w.len(), w.bytes()),
            (20, 21, 0, 0)
        );
    }
}
