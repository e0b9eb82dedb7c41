//! One conformance suite for every backend: memory, SQLite, PostgreSQL
//! (`BROKER_TEST_POSTGRES_URL`, or the local server when it answers: see
//! `store::test_postgres_url`; `.ci/run` starts PostgreSQL, and with `CI` set a missing
//! PostgreSQL fails the test instead of skipping it).

use std::sync::Arc;

use bytes::Bytes;

use super::{open, Store};
use crate::message::Message;
use crate::metrics::Metrics;

fn msg(queue: &str, offset: u64, body: &str) -> Arc<Message> {
    Arc::new(Message {
        content_type: Some(Arc::from("text/plain")),
        headers: vec![("h".into(), format!("v{offset}"))],
        received_at_ms: 1_700_000_000_000 + offset as i64,
        id: Some(Arc::from(format!("key-{offset}"))),
        ..Message::new(Arc::from(queue), offset, Bytes::from(body.to_owned()))
    })
}

fn offsets(ms: &[Arc<Message>]) -> Vec<u64> {
    ms.iter().map(|m| m.offset).collect()
}

/// The behaviour every backend shares; `durable` adds what must survive a reconnect.
async fn suite(url: &str, durable: bool) {
    let metrics = Arc::new(Metrics::new());
    let s: Arc<dyn Store> = open(url, metrics.clone()).await.unwrap();
    // Unique names: the PostgreSQL database is shared by concurrent test runs.
    let q = format!("conf.{}", crate::random::id());

    let fresh = s.open(&q).await.unwrap();
    assert_eq!(
        (fresh.next_offset, fresh.messages.len(), fresh.epoch.len()),
        (1, 0, 16)
    );
    s.append(&q, vec![msg(&q, 1, "a"), msg(&q, 2, "b"), msg(&q, 3, "c")])
        .await
        .unwrap();
    let again = s.open(&q).await.unwrap();
    assert_eq!(again.epoch, fresh.epoch);
    assert_eq!(
        (offsets(&again.messages), again.next_offset),
        (vec![1, 2, 3], 4)
    );
    let m = &again.messages[1];
    assert_eq!(
        (&m.body[..], m.content_type.as_deref(), m.received_at_ms),
        (&b"b"[..], Some("text/plain"), 1_700_000_000_002)
    );
    assert_eq!(m.headers, vec![("h".to_owned(), "v2".to_owned())]);
    assert_eq!(
        m.id.as_deref(),
        Some("key-2"),
        "the idempotency key is kept"
    );

    // Trims are applied in order with later appends (the append's ack orders them).
    s.trim(&q, 2);
    s.append(&q, vec![msg(&q, 4, "d")]).await.unwrap();
    assert_eq!(offsets(&s.open(&q).await.unwrap().messages), vec![2, 3, 4]);

    // An append that does not continue the stored history (a hole, or offsets written
    // before) is refused and changes nothing.
    for bad in [vec![msg(&q, 6, "hole")], vec![msg(&q, 3, "again")]] {
        assert!(s.append(&q, bad).await.is_err());
    }
    let tail = s.tail(&q, 2).await.unwrap();
    assert_eq!((offsets(&tail.messages), tail.next_offset), (vec![3, 4], 5));

    // Many concurrent appends: all acknowledged, all kept, in offset order.
    let appends = (5..69).map(|o| s.append(&q, vec![msg(&q, o, "x")]));
    for r in futures_util::future::join_all(appends).await {
        r.unwrap();
    }
    let after = s.open(&q).await.unwrap();
    assert_eq!(offsets(&after.messages), (2..69).collect::<Vec<_>>());
    assert_eq!(after.next_offset, 69);

    assert_eq!(s.delivery_cursor(&q, "http://t/1").await.unwrap(), None);
    s.set_delivery_cursor(&q, "http://t/1", 7).await.unwrap();
    s.set_delivery_cursor(&q, "http://t/1", 9).await.unwrap();
    s.set_delivery_cursor(&q, "http://t/2", 3).await.unwrap();
    assert_eq!(s.delivery_cursor(&q, "http://t/1").await.unwrap(), Some(9));
    s.remove_delivery_cursor(&q, "http://t/2");
    s.append(&q, vec![msg(&q, 69, "y")]).await.unwrap(); // orders the removal
    assert_eq!(s.delivery_cursor(&q, "http://t/2").await.unwrap(), None);

    // Delayed messages: kept until released; a release appends and forgets atomically.
    let delayed = |id: u64, body: &str| super::StoredDelayed {
        id,
        at_ms: 1_800_000_000_000 + id as i64,
        message: crate::message::NewMessage {
            id: None,
            audience: None,
            body: Bytes::from(body.to_owned()),
            content_type: None,
            headers: vec![("k".into(), "v".into())],
        },
    };
    s.schedule(&q, vec![delayed(1, "later-1"), delayed(2, "later-2")])
        .await
        .unwrap();
    let held = s.open(&q).await.unwrap().delayed;
    assert_eq!(held.iter().map(|d| d.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(
        (&held[1].message.body[..], held[1].at_ms),
        (&b"later-2"[..], 1_800_000_000_002)
    );
    assert_eq!(
        held[0].message.headers,
        vec![("k".to_owned(), "v".to_owned())]
    );
    s.release(&q, vec![msg(&q, 70, "later-1")], vec![1])
        .await
        .unwrap();
    let after = s.open(&q).await.unwrap();
    assert_eq!(
        after.delayed.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(after.messages.last().map(|m| m.offset), Some(70));
    // Released again (a duplicate release): refused, and nothing is appended.
    let again = s.release(&q, vec![msg(&q, 71, "later-1")], vec![1]).await;
    assert!(again.is_err(), "a delayed message is released once");
    let after = s.open(&q).await.unwrap();
    assert_eq!(after.messages.last().map(|m| m.offset), Some(70));
    assert_eq!(after.next_offset, 71);

    // Poll consumers: created, moved, removed; writes are ordered with later commits.
    let consumer = |client: &str, last_seen: u64| super::StoredConsumer {
        user: format!("{q}.user"),
        client: client.into(),
        queue: q.clone(),
        last_seen,
    };
    s.save_consumer(consumer("c1", 3));
    s.save_consumer(consumer("c1", 5));
    s.save_consumer(consumer("c2", 1));
    s.remove_consumer(&format!("{q}.user"), "c2");
    s.set_state(&format!("{q}.barrier"), String::new())
        .await
        .unwrap();
    let mine: Vec<_> = s
        .consumers()
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.queue == q)
        .collect();
    assert_eq!(mine, vec![consumer("c1", 5)]);

    // Webhook retries: saved, moved, cleared.
    let attempt = |offset: u64, attempts: u32| super::StoredAttempt {
        offset,
        attempts,
        next_attempt_ms: 1_800_000_000_000 + offset as i64,
    };
    s.save_attempt(&q, "http://t/1", attempt(4, 1));
    s.save_attempt(&q, "http://t/1", attempt(4, 2));
    s.save_attempt(&q, "http://t/1", attempt(5, 1));
    s.save_attempt(&q, "http://t/other", attempt(6, 1));
    s.clear_attempt(&q, "http://t/1", 5);
    s.set_state(&format!("{q}.barrier2"), String::new())
        .await
        .unwrap();
    assert_eq!(
        s.pending_attempts(&q, "http://t/1").await.unwrap(),
        vec![attempt(4, 2)]
    );

    // Named state: the last value wins.
    let key = format!("{q}.state");
    assert_eq!(s.state(&key).await.unwrap(), None);
    s.set_state(&key, "one".into()).await.unwrap();
    s.set_state(&key, "two".into()).await.unwrap();
    assert_eq!(s.state(&key).await.unwrap().as_deref(), Some("two"));
    assert!(s.healthy());

    if durable {
        // A new connection (a restart) finds everything acknowledged, same epoch.
        drop(s);
        let s2 = open(url, metrics).await.unwrap();
        let back = s2.open(&q).await.unwrap();
        assert_eq!(back.epoch, fresh.epoch);
        assert_eq!(offsets(&back.messages), (2..71).collect::<Vec<_>>());
        assert_eq!(back.next_offset, 71);
        assert_eq!(
            back.delayed.iter().map(|d| d.id).collect::<Vec<_>>(),
            vec![2],
            "delayed entries survive"
        );
        assert_eq!(s2.delivery_cursor(&q, "http://t/1").await.unwrap(), Some(9));
        s2.remove(&q);
        let q2 = format!("{q}.2");
        s2.open(&q2).await.unwrap(); // the writer processes the removal first
        s2.append(&q2, vec![msg(&q2, 1, "z")]).await.unwrap();
        let gone = s2.open(&q).await.unwrap();
        assert_ne!(
            gone.epoch, fresh.epoch,
            "a removed queue starts a new history"
        );
        assert_eq!((gone.next_offset, gone.messages.len()), (1, 0));
        assert_eq!(s2.delivery_cursor(&q, "http://t/1").await.unwrap(), None);
    } else {
        // memory://: a new store (a restart) has lost the history.
        let s2 = open(url, metrics).await.unwrap();
        let lost = s2.open(&q).await.unwrap();
        assert_ne!(lost.epoch, fresh.epoch);
        assert_eq!(lost.next_offset, 1);
    }
}

/// One operation the database refuses fails alone, not the others committed with it
/// (SQL backends commit whatever waits as one transaction): honest appends to other
/// queues, issued together with a bad one, are all stored. An operation nobody awaits
/// that fails is counted, not lost without a word.
async fn one_bad_operation_fails_alone(url: &str) {
    let metrics = Arc::new(Metrics::new());
    let s: Arc<dyn Store> = open(url, metrics.clone()).await.unwrap();
    let (good, bad) = (
        format!("conf.good.{}", crate::random::id()),
        format!("conf.bad.{}", crate::random::id()),
    );
    s.open(&good).await.unwrap();
    s.open(&bad).await.unwrap();
    // Issued back to back (queued at call time), so the writer takes them together.
    let mut honest = Vec::new();
    let mut culprit = None;
    for o in 1..=200u64 {
        honest.push(s.append(&good, vec![msg(&good, o, "ok")]));
        if o == 100 {
            // Offset 7 does not continue the bad queue's (empty) history.
            culprit = Some(s.append(&bad, vec![msg(&bad, 7, "bad")]));
        }
    }
    assert!(culprit.unwrap().await.is_err(), "the culprit fails");
    for (i, h) in honest.into_iter().enumerate() {
        h.await
            .unwrap_or_else(|e| panic!("honest append {} failed: {e}", i + 1));
    }
    let stored = s.open(&good).await.unwrap();
    assert_eq!((stored.messages.len(), stored.next_offset), (200, 201));
    // Nobody waits for an epoch change; one for a queue that is not stored fails, and
    // is counted.
    s.set_epoch(&format!("conf.none.{}", crate::random::id()), "e");
    s.append(&good, vec![msg(&good, 201, "after")])
        .await
        .unwrap();
    if url != "memory://" {
        assert_eq!(metrics.store_dropped_ops.get(), 1);
    }
}

#[actix::test]
async fn one_bad_operation_fails_alone_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    one_bad_operation_fails_alone(&format!("sqlite://{}/b.db", dir.path().display())).await;
}

#[actix::test]
async fn one_bad_operation_fails_alone_on_postgres() {
    if let Some(url) = super::test_postgres_url().await {
        one_bad_operation_fails_alone(&url).await;
    }
}

#[actix::test]
async fn memory_backend() {
    suite("memory://", false).await;
}

#[actix::test]
async fn sqlite_backend() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/nested/broker.db", dir.path().display());
    suite(&url, true).await;
}

#[actix::test]
async fn postgres_backend() {
    if let Some(url) = super::test_postgres_url().await {
        suite(&url, true).await;
    }
}

#[actix::test]
async fn nats_backend() {
    // A cluster of three: streams and buckets get three replicas.
    if let Some(cluster) = super::nats_testing::NatsCluster::start(3).await {
        suite(&cluster.urls(), true).await;
    }
}

#[actix::test]
async fn a_failing_store_refuses_and_recovers() {
    // A commit that fails (here: an offset stored twice) is refused and reported, and the
    // next good commit recovers without a restart.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let s = open(
        &format!("sqlite://{}", db.display()),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    let q = "fail.q";
    s.open(q).await.unwrap();
    s.append(q, vec![msg(q, 1, "kept")]).await.unwrap();
    let dup = s.append(q, vec![msg(q, 1, "duplicate")]).await;
    assert!(dup.is_err());
    assert!(!s.healthy(), "a failed commit is reported");
    s.append(q, vec![msg(q, 2, "next")]).await.unwrap();
    assert!(s.healthy(), "and recovery too");
    let back = s.open(q).await.unwrap();
    assert_eq!(
        back.messages
            .iter()
            .map(|m| &m.body[..])
            .collect::<Vec<_>>(),
        vec![&b"kept"[..], &b"next"[..]]
    );
}
