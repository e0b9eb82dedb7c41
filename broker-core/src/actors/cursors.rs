//! The named poll consumers of one queue and webhook-queue's refresh rules: a consumer
//! whose unread messages rolled off, or that missed a message refused for its size, is
//! told once to refresh and its cursor jumps to the newest message. Plain data (no
//! actix); the `Queue` actor owns one, so a read and its cursor move are one step.

use std::collections::HashMap;
use std::sync::Arc;

use super::window::Window;
use crate::message::Message;

/// Identifies a poll consumer: client names are unique per user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConsumerKey {
    /// The user that owns it.
    pub user: String,
    /// The client name the user chose.
    pub client: String,
}

/// webhook-queue's wording for a consumer whose unread messages rolled off.
pub(crate) const ROLLED_OFF: &str = "It's been too long since you've read from the queue. As such, at least one message has been discarded. Please refresh your local state";
/// webhook-queue's wording for a consumer that missed a message rejected for its size.
pub(crate) const SIZE_DROPPED: &str = "One or more messages have been dropped from the queue due to size constraints. If this continues to happen, consider reconfiguring your max queue sizes. Please refresh your local state";

#[derive(Debug, Clone, Copy)]
struct Cursor {
    last_seen: u64,
    losses_seen: u64,
}

/// What a consumer's read found.
#[derive(Debug)]
pub(crate) enum ConsumerRead {
    /// No consumer of that key here.
    Unknown,
    /// It must refresh (`reason`, webhook-queue's wording); its cursor is now at `at`.
    Refresh {
        /// Why.
        reason: &'static str,
        /// Where the cursor jumped (the newest offset).
        at: u64,
    },
    /// Its unread messages (at most the limit); the cursor moved to the last one, if any.
    Messages {
        /// The messages, oldest first.
        messages: Vec<Arc<Message>>,
        /// The cursor's new position, when it moved.
        moved_to: Option<u64>,
    },
}

/// The poll consumers of one queue.
#[derive(Debug, Default)]
pub(crate) struct Cursors {
    map: HashMap<ConsumerKey, Cursor>,
    /// Losses consumers must be told about (webhook-queue's rule: a message refused for
    /// its size puts every existing consumer into refresh).
    losses: u64,
}

impl Cursors {
    /// Adds (or resets) a consumer at `last_seen` (a restart), or after the newest
    /// message; never beyond it. Its position.
    pub(crate) fn add(&mut self, key: ConsumerKey, last_seen: Option<u64>, window: &Window) -> u64 {
        let head = window.head();
        let at = last_seen.unwrap_or(head).min(head);
        self.map.insert(
            key,
            Cursor {
                last_seen: at,
                losses_seen: self.losses,
            },
        );
        at
    }

    /// Moves a consumer to `last_seen` (another replica read it there), keeping what it
    /// was told of losses; adds it if missing.
    pub(crate) fn sync(&mut self, key: ConsumerKey, last_seen: u64, window: &Window) {
        let at = last_seen.min(window.head());
        match self.map.get_mut(&key) {
            Some(c) => c.last_seen = at,
            None => {
                self.add(key, Some(at), window);
            }
        }
    }

    /// Whether no consumer reads this queue.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forgets a consumer.
    pub(crate) fn remove(&mut self, key: &ConsumerKey) {
        self.map.remove(key);
    }

    /// A message every consumer must be told it missed (refused for its size, or a
    /// history replaced).
    pub(crate) fn note_loss(&mut self) {
        self.losses += 1;
    }

    /// Reads a consumer's unread messages from `window` and moves its cursor past them.
    pub(crate) fn read(
        &mut self,
        key: &ConsumerKey,
        window: &Window,
        limit: usize,
    ) -> ConsumerRead {
        let Some(cursor) = self.map.get_mut(key) else {
            return ConsumerRead::Unknown;
        };
        let reason = if cursor.losses_seen < self.losses {
            Some(SIZE_DROPPED)
        } else if cursor.last_seen + 1 < window.first_retained() {
            Some(ROLLED_OFF)
        } else {
            None
        };
        if let Some(reason) = reason {
            // Told once; the cursor jumps to the newest message.
            *cursor = Cursor {
                last_seen: window.head(),
                losses_seen: self.losses,
            };
            return ConsumerRead::Refresh {
                reason,
                at: window.head(),
            };
        }
        let messages = window.after(cursor.last_seen, limit);
        let moved_to = messages.last().map(|m| m.offset);
        if let Some(at) = moved_to {
            cursor.last_seen = at;
        }
        ConsumerRead::Messages { messages, moved_to }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;
    use bytes::Bytes;

    fn msg(offset: u64) -> Arc<Message> {
        Arc::new(Message {
            received_at_ms: 0,
            ..Message::new(Arc::from("q"), offset, Bytes::from_static(b"x"))
        })
    }

    fn key(c: &str) -> ConsumerKey {
        ConsumerKey {
            user: "u".into(),
            client: c.into(),
        }
    }

    fn offsets(r: ConsumerRead) -> Result<Vec<u64>, &'static str> {
        match r {
            ConsumerRead::Messages { messages, .. } => {
                Ok(messages.iter().map(|m| m.offset).collect())
            }
            ConsumerRead::Refresh { reason, .. } => Err(&reason[..10]),
            ConsumerRead::Unknown => Err("unknown"),
        }
    }

    #[test]
    fn a_new_consumer_reads_what_comes_after_it() {
        let (mut w, mut c) = (Window::default(), Cursors::default());
        w.append((1..=2).map(msg));
        assert_eq!(c.add(key("a"), None, &w), 2);
        assert_eq!(offsets(c.read(&key("a"), &w, 10)), Ok(vec![]));
        w.append((3..=5).map(msg));
        assert_eq!(offsets(c.read(&key("a"), &w, 2)), Ok(vec![3, 4]));
        assert_eq!(offsets(c.read(&key("a"), &w, 10)), Ok(vec![5]));
        assert_eq!(offsets(c.read(&key("b"), &w, 10)), Err("unknown"));
        assert_eq!(c.add(key("r"), Some(99), &w), 5, "never beyond the head");
    }

    #[test]
    fn roll_off_and_size_losses_mean_refresh_once() {
        let (mut w, mut c) = (Window::default(), Cursors::default());
        c.add(key("a"), None, &w);
        w.append((1..=4).map(msg));
        let limits = LimitsConfig {
            max_message_count: 2,
            max_message_size: 10,
            max_queue_size: 100,
            max_delayed_messages: 0,
            ..LimitsConfig::default()
        };
        w.enforce(&limits);
        assert_eq!(offsets(c.read(&key("a"), &w, 10)), Err("It's been "));
        assert_eq!(offsets(c.read(&key("a"), &w, 10)), Ok(vec![]), "told once");
        c.note_loss();
        assert_eq!(offsets(c.read(&key("a"), &w, 10)), Err("One or mor"));
        c.add(key("late"), None, &w);
        assert_eq!(
            offsets(c.read(&key("late"), &w, 10)),
            Ok(vec![]),
            "after the loss"
        );
    }
}
