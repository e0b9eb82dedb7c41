//! The idempotency keys a queue stored recently: a publish whose key was stored within
//! `limits.idempotency_window`, and whose message is still retained, gets that message's
//! offset instead of a second message. Plain data (no actix); the `Queue` owns one.
//!
//! Bounded by what the queue retains: keys of messages dropped (limits) or older than the
//! window are pruned whenever the map has doubled since the last pruning.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::message::Message;

/// Keys seen and keys being stored.
#[derive(Debug)]
pub(crate) struct Recent {
    /// Key → (offset, received at ms).
    by_key: HashMap<Arc<str>, (u64, i64)>,
    /// Keys of publishes not acknowledged yet.
    in_flight: HashSet<Arc<str>>,
    /// Size at which the map is pruned next.
    prune_at: usize,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            in_flight: HashSet::new(),
            prune_at: 1024,
        }
    }
}

impl Recent {
    /// Remembers the keys of messages made visible.
    pub(crate) fn note(&mut self, messages: &[Arc<Message>]) {
        for m in messages {
            if let Some(k) = &m.id {
                self.by_key.insert(k.clone(), (m.offset, m.received_at_ms));
            }
        }
    }

    /// The offset of the message stored under `key`, if it is within the window and
    /// still retained (at or after `first_retained`).
    pub(crate) fn find(
        &self,
        key: &str,
        now_ms: i64,
        window_ms: i64,
        first_retained: u64,
    ) -> Option<u64> {
        let (offset, at) = *self.by_key.get(key)?;
        (now_ms.saturating_sub(at) <= window_ms && offset >= first_retained).then_some(offset)
    }

    /// Marks `key` as being stored; `false` if a publish with it is in flight already.
    pub(crate) fn begin(&mut self, key: Arc<str>) -> bool {
        self.in_flight.insert(key)
    }

    /// Whether a publish with `key` is in flight.
    pub(crate) fn in_flight(&self, key: &str) -> bool {
        self.in_flight.contains(key)
    }

    /// The publish with `key` settled.
    pub(crate) fn end(&mut self, key: &str) {
        self.in_flight.remove(key);
    }

    /// Forgets keys out of the window or of messages no longer retained, once the map
    /// has doubled since the last time.
    pub(crate) fn prune(&mut self, now_ms: i64, window_ms: i64, first_retained: u64) {
        if self.by_key.len() < self.prune_at {
            return;
        }
        self.by_key.retain(|_, (offset, at)| {
            now_ms.saturating_sub(*at) <= window_ms && *offset >= first_retained
        });
        self.prune_at = (self.by_key.len() * 2).max(1024);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(offset: u64, key: &str, at: i64) -> Arc<Message> {
        Arc::new(Message {
            id: Some(Arc::from(key)),
            received_at_ms: at,
            ..Message::new(Arc::from("q"), offset, bytes::Bytes::new())
        })
    }

    #[test]
    fn a_key_is_found_within_its_window_while_its_message_is_retained() {
        let mut r = Recent::default();
        r.note(&[keyed(5, "a", 1_000), keyed(6, "b", 2_000)]);
        assert_eq!(r.find("a", 1_500, 1_000, 1), Some(5));
        assert_eq!(r.find("a", 2_001, 1_000, 1), None, "out of the window");
        assert_eq!(r.find("b", 2_500, 1_000, 6), Some(6));
        assert_eq!(r.find("a", 1_500, 1_000, 6), None, "dropped by the limits");
        assert_eq!(r.find("c", 1_500, 1_000, 1), None);
        assert!(r.begin(Arc::from("c")));
        assert!(!r.begin(Arc::from("c")), "in flight");
        r.end("c");
        assert!(r.begin(Arc::from("c")));
    }

    #[test]
    fn pruning_keeps_the_map_bounded_by_what_is_retained() {
        let mut r = Recent::default();
        let many: Vec<_> = (1..=5_000).map(|o| keyed(o, &format!("k{o}"), 0)).collect();
        r.note(&many);
        r.prune(10, 1_000, 4_001);
        assert_eq!(r.by_key.len(), 1_000);
        r.prune(5_000, 1_000, 1);
        assert_eq!(r.by_key.len(), 1_000, "not pruned again before it doubles");
    }
}
