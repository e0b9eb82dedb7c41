//! `memory://`: contents live as long as the process, as with webhook-queue. A restart
//! gives every queue a new epoch, so readers that resume are told to refresh.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures_util::future::{self, BoxFuture, FutureExt};

use super::{random_epoch, Store, StoredAttempt, StoredConsumer, StoredDelayed, StoredQueue};
use crate::error::Error;
use crate::message::Message;

#[derive(Default)]
struct MemQueue {
    epoch: Option<Arc<str>>,
    messages: VecDeque<Arc<Message>>,
    next_offset: u64,
    cursors: HashMap<String, u64>,
    delayed: std::collections::BTreeMap<u64, StoredDelayed>,
    attempts: HashMap<(String, u64), StoredAttempt>,
}

/// The in-memory store. Messages are shared `Arc`s with the queue's window: no copies.
#[derive(Default)]
pub struct MemoryStore {
    queues: Mutex<HashMap<String, MemQueue>>,
    state: Mutex<HashMap<String, String>>,
    consumers: Mutex<HashMap<(String, String), StoredConsumer>>,
    /// Faults the next appends meet (tests of the queue's failure handling).
    #[cfg(test)]
    faults: Mutex<VecDeque<Fault>>,
}

/// A fault injected into the next append of a [`MemoryStore`].
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// The append is refused and nothing is kept.
    Refuse,
    /// The append is kept but reported as failed (a connection cut during `COMMIT`).
    KeepButReportFailure,
}

#[cfg(test)]
impl MemoryStore {
    /// Makes the next append meet `fault`.
    pub(crate) fn inject(&self, fault: Fault) {
        self.faults
            .lock()
            .expect("memory store lock")
            .push_back(fault);
    }
}

impl MemoryStore {
    fn with<R>(&self, queue: &str, f: impl FnOnce(&mut MemQueue) -> R) -> R {
        let mut map = self.queues.lock().expect("memory store lock");
        let q = map.entry(queue.to_owned()).or_insert_with(|| MemQueue {
            next_offset: 1,
            ..MemQueue::default()
        });
        f(q)
    }
}

impl Store for MemoryStore {
    fn open(&self, queue: &str) -> BoxFuture<'static, Result<StoredQueue, Error>> {
        let state = self.with(queue, |q| StoredQueue {
            epoch: q.epoch.get_or_insert_with(random_epoch).clone(),
            messages: q.messages.iter().cloned().collect(),
            next_offset: q.next_offset,
            delayed: q.delayed.values().cloned().collect(),
        });
        future::ready(Ok(state)).boxed()
    }

    fn append(
        &self,
        queue: &str,
        messages: Vec<Arc<Message>>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        #[cfg(test)]
        let fault = self.faults.lock().expect("memory store lock").pop_front();
        #[cfg(test)]
        if let Some(Fault::Refuse) = fault {
            return future::ready(Err(Error::Store("injected fault".into()))).boxed();
        }
        let res = self.with(queue, |q| {
            let continues = messages
                .iter()
                .enumerate()
                .all(|(i, m)| m.offset == q.next_offset + i as u64);
            if !continues {
                return Err(Error::Store(format!(
                    "queue `{queue}`: offsets do not continue the stored history"
                )));
            }
            if let Some(last) = messages.last() {
                q.next_offset = last.offset + 1;
            }
            q.messages.extend(messages);
            Ok(())
        });
        #[cfg(test)]
        if let Some(Fault::KeepButReportFailure) = fault {
            return future::ready(Err(Error::Store("injected fault after commit".into()))).boxed();
        }
        future::ready(res).boxed()
    }

    fn schedule(
        &self,
        queue: &str,
        delayed: Vec<StoredDelayed>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        self.with(queue, |q| {
            q.delayed.extend(delayed.into_iter().map(|d| (d.id, d)))
        });
        future::ready(Ok(())).boxed()
    }

    fn release(
        &self,
        queue: &str,
        messages: Vec<Arc<Message>>,
        ids: Vec<u64>,
    ) -> BoxFuture<'static, Result<(), Error>> {
        // Released twice would publish it twice: refused, nothing changed.
        let missing = self.with(queue, |q| {
            ids.iter().find(|id| !q.delayed.contains_key(id)).copied()
        });
        if let Some(id) = missing {
            let e = Error::Store(format!(
                "queue `{queue}`: delayed message {id} is not stored (released already?)"
            ));
            return future::ready(Err(e)).boxed();
        }
        self.with(queue, |q| {
            for id in &ids {
                q.delayed.remove(id);
            }
        });
        self.append(queue, messages)
    }

    fn consumers(&self) -> BoxFuture<'static, Result<Vec<StoredConsumer>, Error>> {
        let v = self
            .consumers
            .lock()
            .expect("memory store lock")
            .values()
            .cloned()
            .collect();
        future::ready(Ok(v)).boxed()
    }

    fn save_consumer(&self, c: StoredConsumer) {
        let key = (c.user.clone(), c.client.clone());
        self.consumers
            .lock()
            .expect("memory store lock")
            .insert(key, c);
    }

    fn remove_consumer(&self, user: &str, client: &str) {
        let key = (user.to_owned(), client.to_owned());
        self.consumers
            .lock()
            .expect("memory store lock")
            .remove(&key);
    }

    fn state(&self, key: &str) -> BoxFuture<'static, Result<Option<String>, Error>> {
        let v = self
            .state
            .lock()
            .expect("memory store lock")
            .get(key)
            .cloned();
        future::ready(Ok(v)).boxed()
    }

    fn set_state(&self, key: &str, value: String) -> BoxFuture<'static, Result<(), Error>> {
        self.state
            .lock()
            .expect("memory store lock")
            .insert(key.to_owned(), value);
        future::ready(Ok(())).boxed()
    }

    fn trim(&self, queue: &str, first_kept: u64) {
        self.with(queue, |q| {
            while q.messages.front().is_some_and(|m| m.offset < first_kept) {
                q.messages.pop_front();
            }
        });
    }

    fn remove(&self, queue: &str) {
        self.queues.lock().expect("memory store lock").remove(queue);
    }

    fn set_epoch(&self, queue: &str, epoch: &str) {
        self.with(queue, |q| q.epoch = Some(Arc::from(epoch)));
    }

    fn delivery_cursor(
        &self,
        queue: &str,
        target: &str,
    ) -> BoxFuture<'static, Result<Option<u64>, Error>> {
        let c = self.with(queue, |q| q.cursors.get(target).copied());
        future::ready(Ok(c)).boxed()
    }

    fn set_delivery_cursor(
        &self,
        queue: &str,
        target: &str,
        offset: u64,
    ) -> BoxFuture<'static, Result<(), Error>> {
        self.with(queue, |q| q.cursors.insert(target.to_owned(), offset));
        future::ready(Ok(())).boxed()
    }

    fn remove_delivery_cursor(&self, queue: &str, target: &str) {
        self.with(queue, |q| {
            q.cursors.remove(target);
            q.attempts.retain(|(t, _), _| t != target);
        });
    }

    fn pending_attempts(
        &self,
        queue: &str,
        target: &str,
    ) -> BoxFuture<'static, Result<Vec<StoredAttempt>, Error>> {
        let mut v: Vec<StoredAttempt> = self.with(queue, |q| {
            q.attempts
                .iter()
                .filter(|((t, _), _)| t == target)
                .map(|(_, a)| *a)
                .collect()
        });
        v.sort_by_key(|a| a.offset);
        future::ready(Ok(v)).boxed()
    }

    fn save_attempt(&self, queue: &str, target: &str, attempt: StoredAttempt) {
        self.with(queue, |q| {
            q.attempts
                .insert((target.to_owned(), attempt.offset), attempt)
        });
    }

    fn clear_attempt(&self, queue: &str, target: &str, offset: u64) {
        self.with(queue, |q| q.attempts.remove(&(target.to_owned(), offset)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(offset: u64) -> Arc<Message> {
        Arc::new(Message {
            received_at_ms: 0,
            ..Message::new("q".into(), offset, Bytes::from_static(b"x"))
        })
    }

    #[actix::test]
    async fn append_trim_reopen() {
        let s = MemoryStore::default();
        let first = s.open("q").await.unwrap();
        assert_eq!(first.next_offset, 1);
        s.append("q", vec![msg(1), msg(2), msg(3)]).await.unwrap();
        s.trim("q", 2);
        let again = s.open("q").await.unwrap();
        assert_eq!(again.epoch, first.epoch);
        assert_eq!(
            again.messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(again.next_offset, 4);
        assert_eq!(s.delivery_cursor("q", "http://t").await.unwrap(), None);
        s.set_delivery_cursor("q", "http://t", 2).await.unwrap();
        assert_eq!(s.delivery_cursor("q", "http://t").await.unwrap(), Some(2));
        s.remove("q");
        assert_eq!(
            s.delivery_cursor("q", "http://t").await.unwrap(),
            None,
            "removed with the queue"
        );
        let fresh = s.open("q").await.unwrap();
        assert_ne!(fresh.epoch, first.epoch);
        assert_eq!(fresh.next_offset, 1);
    }
}
