//! Scale-out on NATS JetStream through the real binary: a 3-node `nats-server` cluster
//! on loopback and three `broker serve` replicas on it. Whatever is published through
//! one replica is seen, under the same offsets, through every other; acknowledged
//! messages survive `kill -9` of a broker replica and of a NATS server.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use broker_core::store::nats_testing::NatsCluster;

use crate::support::{
    assert_stored_once, read_all, recording_sink, send, spawn_broker, write_config, ws_connect,
    BrokerProcess, Load,
};

const ADMIN: &str = "cluster-admin-token-0123456789";

/// A broker config on `nats` with a plain queue, a pattern, a user reading both, an
/// admin token, and `extra`.
fn config(nats: &str, extra: &str) -> String {
    format!(
        "[storage]\nurl = \"{nats}\"\n\
         [admin]\ntoken = \"{ADMIN}\"\n\
         [webhooks]\nallow_targets = [\"127.0.0.1/32\"]\n\
         [limits]\nmax_message_count = 100000\nmax_queue_size = 100000000\n\
         [[users]]\nname = \"u\"\npass_hash = \"plain;;password1\"\nqueues = [\"*\"]\npublish = [\"*\"]\n\
         [[queues]]\nname = \"chat.*\"\n\
         [[queues]]\nname = \"events\"\n{extra}"
    )
}

/// A NATS cluster and `n` broker replicas on it (each connected to a different server
/// first). `None` without `nats-server` (skipped; a failure in CI).
async fn cluster(n: usize) -> Option<(NatsCluster, tempfile::TempDir, Vec<BrokerProcess>)> {
    cluster_with(n, "").await
}

/// [`cluster`] with `extra` config (queues, crons) at the end of every replica's file.
async fn cluster_with(
    n: usize,
    extra: &str,
) -> Option<(NatsCluster, tempfile::TempDir, Vec<BrokerProcess>)> {
    let nats = NatsCluster::start(3).await?;
    let (dir, _) = write_config("unused", "");
    let mut brokers = Vec::new();
    for i in 0..n {
        // Every replica knows every server; each starts with a different one.
        let mut urls: Vec<String> = nats.nodes.iter().map(|n| n.url.clone()).collect();
        let n = urls.len();
        urls.rotate_left(i % n);
        let path = dir.path().join(format!("broker{i}.toml"));
        std::fs::write(&path, config(&urls.join(","), extra)).unwrap();
        brokers.push(spawn_broker(&path));
    }
    Some((nats, dir, brokers))
}

/// `POST` `body` to `queue` through `b`: the acknowledged offset and epoch.
async fn publish(b: &BrokerProcess, queue: &str, body: &str) -> (u64, String) {
    let (s, v) = send(
        b.post(&format!("/v1/queues/{queue}/messages"))
            .body(body.to_owned()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    (
        v["offset"].as_u64().unwrap(),
        v["epoch"].as_str().unwrap().to_owned(),
    )
}

/// A WebSocket session of user `u` on replica `r`, past its `connected` event.
async fn connect(r: &BrokerProcess) -> crate::support::WsClient {
    let mut c = ws_connect(&r.url, "", Some("Basic dTpwYXNzd29yZDE="))
        .await
        .unwrap();
    assert_eq!(c.recv().await["event"], "connected");
    c
}

/// The next `n` message events of a WebSocket client: (offset, body).
async fn events(c: &mut crate::support::WsClient, n: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = c.recv().await;
        if v["event"] == "message" {
            got.push((
                v["offset"].as_u64().unwrap(),
                v["body"].as_str().unwrap().to_owned(),
            ));
        }
    }
    got
}

#[actix_web::test]
async fn a_message_published_through_any_replica_reaches_subscribers_on_every_replica() {
    let Some((_nats, _dir, b)) = cluster(3).await else {
        return;
    };
    for queue in ["events", "chat.room1"] {
        // Subscribers on B and C before anything is published.
        let mut subs = Vec::new();
        for r in &b[1..] {
            let mut c = connect(r).await;
            c.subscribe(queue, None).await;
            subs.push(c);
        }
        // 30 messages, through A, B and C in turn, 3 publishers at once.
        let mut acked = BTreeMap::new();
        let mut epochs = HashSet::new();
        for round in 0..10 {
            let sent = futures_util::future::join_all(b.iter().enumerate().map(|(i, r)| {
                let body = format!("{queue} r{round} via {i}");
                async move { (publish(r, queue, &body).await, body) }
            }))
            .await;
            for ((offset, epoch), body) in sent {
                assert!(
                    acked.insert(offset, body).is_none(),
                    "offset {offset} twice"
                );
                epochs.insert(epoch);
            }
        }
        assert_eq!(epochs.len(), 1, "one epoch through every replica");
        assert_eq!(
            acked.keys().copied().collect::<Vec<_>>(),
            (1..=30).collect::<Vec<u64>>(),
            "{queue}: offsets go up by one across replicas"
        );
        let expected: Vec<(u64, String)> = acked.clone().into_iter().collect();
        for c in &mut subs {
            assert_eq!(events(c, 30).await, expected, "{queue}: in order, no gap");
        }
        // Resuming on another replica with `since`/`epoch` replays exactly what followed.
        let epoch = epochs.into_iter().next().unwrap();
        let mut late = connect(&b[0]).await;
        let v = late.subscribe(queue, Some((25, &epoch))).await;
        assert_eq!(v["recovered"], true, "{v}");
        assert_eq!(events(&mut late, 5).await, expected[25..].to_vec());
        // A poll read on any replica sees the same history.
        for r in &b {
            let (stored, e) = read_all(r, queue).await;
            assert_eq!(e, epoch);
            assert_eq!(stored, acked);
        }
    }
    // The cluster's own metrics: every replica sees three, connected, and measured how
    // late the others' messages reached it.
    for r in &b {
        r.wait_for_metric("broker_cluster_replicas", 3.0).await;
        let text = r.metrics().await;
        assert_eq!(
            crate::support::metric(&text, "broker_cluster_connected"),
            Some(1.0)
        );
        let fed = crate::support::metric(&text, "broker_cluster_feed_delay_seconds_count");
        assert!(fed.is_some_and(|n| n >= 40.0), "{fed:?}");
    }
}

#[actix_web::test]
async fn acknowledged_messages_survive_kill_9_and_sigterm_of_replicas_and_kill_9_of_a_nats_server()
{
    let Some((mut nats, dir, mut b)) = cluster(3).await else {
        return;
    };
    // Publishers on replicas 0 and 1; refusals (a server lost, a replica killed) are
    // not acknowledged, and the publishers go on.
    let loads: Vec<Load> = b[..2]
        .iter()
        .enumerate()
        .map(|(r, replica)| {
            let url = format!("{}/v1/queues/events/messages", replica.url);
            Load::start(&replica.http, &url, 4, &format!("r{r}-"), true)
        })
        .collect();
    let acked_count = || loads.iter().map(Load::count).sum::<usize>();
    let wait_for = |n: usize| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while acked_count() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} acknowledged",
                acked_count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    wait_for(300).await;
    b[1].child.kill().unwrap(); // a broker replica, SIGKILL, mid-load
    b[1].child.wait().unwrap();
    wait_for(600).await;
    nats.nodes[0].kill(); // the NATS server replica 0 talks to first, SIGKILL
    let after = acked_count();
    wait_for(after + 300).await; // publishing goes on through the others
                                 // Replica 0 stopped gracefully (SIGTERM) while its publishers still run: what it
                                 // acknowledged before it stopped is stored too.
    b[0].signal("TERM");
    let status = b[0].child.wait().unwrap();
    assert!(status.success(), "a graceful stop exits 0: {status}");
    let mut acked = Vec::new();
    for l in loads {
        acked.extend(l.stop().await.into_iter().map(|(o, b, _)| (o, b)));
    }
    nats.nodes[0].restart();
    let newest = acked.iter().map(|(o, _)| *o).max().unwrap();
    // Read through the replica that saw neither loss, and through a replica started
    // afterwards (it loads the history from JetStream), once each shows the newest
    // acknowledged offset (a replica whose feed ran through the killed server follows
    // again within seconds).
    let fresh = spawn_broker(&dir.path().join("broker0.toml"));
    for r in [&b[2], &fresh] {
        let (s, v) = send(
            r.get(&format!(
                "/v1/queues/events/messages?since={}&wait=30s",
                newest - 1
            ))
            .basic_auth("u", Some("password1")),
        )
        .await;
        assert_eq!(
            (s, v["messages"][0]["offset"].as_u64()),
            (200, Some(newest)),
            "{v}"
        );
        let (stored, _) = read_all(r, "events").await;
        assert_stored_once(&stored, acked.iter().map(|(o, b)| (*o, b)));
        let offsets: Vec<u64> = stored.keys().copied().collect();
        assert_eq!(
            offsets,
            (1..=offsets.len() as u64).collect::<Vec<_>>(),
            "no gap"
        );
    }
}

#[actix_web::test]
async fn a_queue_defined_at_runtime_on_one_replica_is_in_force_on_all() {
    let Some((_nats, _dir, b)) = cluster(3).await else {
        return;
    };
    let def = serde_json::json!({"max_message_count": 5});
    let (s, v) = send(
        b[0].put("/v1/queues/runtime.q")
            .bearer_auth(ADMIN)
            .json(&def),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let defined = std::time::Instant::now();
    for r in &b[1..] {
        loop {
            let (s, v) = send(r.post("/v1/queues/runtime.q/messages").body("x")).await;
            if s == 200 {
                break;
            }
            // Not known there yet, or (a busy machine) its stream still being made.
            assert!(s == 404 || s == 503, "{s} {v}");
            assert!(
                defined.elapsed() < Duration::from_secs(10),
                "never defined on {}",
                r.url
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("defined on every replica after {:?}", defined.elapsed());
    // Its limits hold on every replica.
    for i in 0..10 {
        publish(&b[i % 3], "runtime.q", &format!("m{i}")).await;
    }
    for r in &b {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (s, v) = send(
                r.get("/v1/queues/runtime.q/messages?since=0")
                    .basic_auth("u", Some("password1")),
            )
            .await;
            // Past the oldest kept message minus one: 410, naming where to start.
            if s == 410 && v["offset"] == 12 {
                let (s, v) = send(
                    r.get("/v1/queues/runtime.q/messages?since=7")
                        .basic_auth("u", Some("password1")),
                )
                .await;
                assert_eq!(s, 200, "{v}");
                let offsets: Vec<u64> = v["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["offset"].as_u64().unwrap())
                    .collect();
                assert_eq!(offsets, vec![8, 9, 10, 11, 12], "the 5 newest are kept");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{s} {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[actix_web::test]
async fn cron_fires_once_per_tick_across_replicas_also_when_one_is_killed() {
    let cron = "[[crons]]\nname = \"every-second\"\nqueue = \"ticks\"\nschedule = \"* * * * * *\"\nbody = \"tick\"\n\
                [[queues]]\nname = \"ticks\"\n";
    let Some((_nats, _dir, mut b)) = cluster_with(3, cron).await else {
        return;
    };
    let first = wait_for_messages(&b[0], "ticks", 3).await;
    let leader = leader_of(&b).await;
    b[leader].child.kill().unwrap(); // SIGKILL the replica that leads
    b[leader].child.wait().unwrap();
    let reader = (leader + 1) % 3;
    let all = wait_for_messages(&b[reader], "ticks", first + 8).await;
    let (stored, _) = read_all(&b[reader], "ticks").await;
    let _ = all;
    // One message per second of schedule: the ticks are the `x-broker-cron` messages'
    // receive times, one per whole second, none twice, none skipped.
    let received = received_seconds(&b[reader], "ticks").await;
    assert_eq!(received.len(), stored.len());
    let unique: HashSet<i64> = received.iter().copied().collect();
    assert_eq!(
        unique.len(),
        received.len(),
        "a tick fired twice: {received:?}"
    );
    let (lo, hi) = (received[0], *received.last().unwrap());
    assert_eq!(
        (hi - lo + 1) as usize,
        received.len(),
        "a tick was skipped: {received:?}"
    );
}

/// Successful webhook deliveries of `queue` each replica made (0 for one that is gone).
async fn deliveries(b: &[BrokerProcess], queue: &str) -> Vec<f64> {
    let (q, ok) = (format!("queue=\"{queue}\""), "outcome=\"success\"");
    let mut out = Vec::new();
    for r in b {
        let text = match r.get("/metrics").send().await {
            Ok(res) => res.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let n = text
            .lines()
            .find(|l| {
                l.starts_with("broker_webhook_deliveries_total{")
                    && l.contains(&q)
                    && l.contains(ok)
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        out.push(n);
    }
    out
}

/// The replica delivering `queue`'s target.
async fn delivering(b: &[BrokerProcess], queue: &str) -> usize {
    let d = deliveries(b, queue).await;
    let senders: Vec<usize> = (0..d.len()).filter(|i| d[*i] > 0.0).collect();
    assert_eq!(senders.len(), 1, "one replica delivers a target: {d:?}");
    senders[0]
}

/// The index of the replica that leads (`broker_leader 1`).
async fn leader_of(b: &[BrokerProcess]) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        for (i, r) in b.iter().enumerate() {
            if crate::support::metric(&r.metrics().await, "broker_leader") == Some(1.0) {
                return i;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no replica leads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `queue` holds at least `n` messages (read through `r`); how many.
async fn wait_for_messages(r: &BrokerProcess, queue: &str, n: usize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (stored, _) = read_all(r, queue).await;
        if stored.len() >= n {
            return stored.len();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{queue}: {} of {n}",
            stored.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tick (whole second, Unix time) each cron message of `queue` stands for, in offset
/// order: the second its replica received it in (replicas fire a tick within
/// milliseconds of it).
async fn received_seconds(r: &BrokerProcess, queue: &str) -> Vec<i64> {
    let (s, v) = send(
        r.get(&format!("/v1/queues/{queue}/messages?since=0&limit=1000"))
            .basic_auth("u", Some("password1")),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let at = m["received_at"].as_str().unwrap();
            chrono::DateTime::parse_from_rfc3339(at)
                .unwrap()
                .timestamp()
        })
        .collect()
}

#[actix_web::test]
async fn each_webhook_message_reaches_its_target_once_with_kill_9_of_the_delivering_replica() {
    let (sink, seen) = recording_sink(200);
    let hooks = format!(
        "[[queues]]\nname = \"hooks\"\n[[queues.webhooks]]\nurl = \"{sink}/in\"\n\
         max_in_flight = 8\nsigning_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"
    );
    let Some((_nats, _dir, mut b)) = cluster_with(3, &hooks).await else {
        return;
    };
    let delivered = |n: usize| {
        let seen = seen.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let distinct: HashSet<String> = seen
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(_, _, b)| b.clone())
                    .collect();
                if distinct.len() >= n {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} of {n} delivered",
                    distinct.len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // 1,000 messages through the three replicas; the replica delivering is killed
    // once half of them arrived.
    for i in 0..500 {
        publish(&b[i % 3], "hooks", &format!("m{i}")).await;
    }
    delivered(300).await;
    let leader = delivering(&b, "hooks").await;
    let before_kill = seen.lock().unwrap().len();
    b[leader].child.kill().unwrap();
    b[leader].child.wait().unwrap();
    let alive: Vec<&BrokerProcess> = (0..3).filter(|i| *i != leader).map(|i| &b[i]).collect();
    for i in 500..1000 {
        publish(alive[i % 2], "hooks", &format!("m{i}")).await;
    }
    delivered(1000).await;
    let seen = seen.lock().unwrap().clone();
    // Before the kill, one replica delivered: every message once.
    let early: HashSet<&String> = seen[..before_kill].iter().map(|(_, _, b)| b).collect();
    assert_eq!(
        early.len(),
        before_kill,
        "delivered twice before any failure"
    );
    // After it, at least once: a repeat is a delivery the killed replica had in flight
    // (at most `max_in_flight`), and it carries the id of the first attempt, so the
    // receiver can drop it.
    let mut ids: BTreeMap<&String, &String> = BTreeMap::new();
    let mut repeats = 0;
    for (_, id, body) in &seen {
        if let Some(first) = ids.insert(body, id) {
            repeats += 1;
            assert_eq!(
                first, id,
                "{body}: a repeat has the first attempt's webhook-id"
            );
        }
    }
    assert_eq!(ids.len(), 1000, "every message delivered");
    assert!(repeats <= 8, "{repeats} repeats: more than were in flight");
    eprintln!("1000 messages, {repeats} delivered again after the kill");
}

#[actix_web::test]
async fn delayed_messages_are_released_once_also_when_the_replica_that_took_them_dies() {
    let Some((_nats, _dir, mut b)) = cluster(3).await else {
        return;
    };
    // Every replica has the queue open before anything is scheduled: they learn of
    // entries scheduled elsewhere as it happens, not from loading them.
    for r in &b {
        read_all(r, "events").await;
    }
    let due_after = std::time::Instant::now() + Duration::from_secs(2);
    for i in 0..10 {
        for (r, replica) in b[..2].iter().enumerate() {
            let (s, v) = send(
                replica
                    .post("/v1/queues/events/messages?delay=2s")
                    .body(format!("later r{r} {i}")),
            )
            .await;
            assert_eq!((s, v["scheduled"].as_bool()), (200, Some(true)), "{v}");
        }
    }
    // The replica that scheduled half of them dies before they are due.
    b[0].child.kill().unwrap();
    b[0].child.wait().unwrap();
    wait_for_messages(&b[2], "events", 20).await;
    assert!(
        std::time::Instant::now() >= due_after,
        "released before due"
    );
    let (stored, _) = read_all(&b[2], "events").await;
    let bodies: HashSet<&String> = stored.values().collect();
    assert_eq!(
        (stored.len(), bodies.len()),
        (20, 20),
        "each released once: {stored:?}"
    );
    // Nothing more comes (a second release would be a new offset).
    let (s, v) = send(
        b[1].get("/v1/queues/events/messages?since=20&wait=3s")
            .basic_auth("u", Some("password1")),
    )
    .await;
    assert_eq!(
        (s, v["messages"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{v}"
    );
}

#[actix_web::test]
async fn named_consumers_read_consistently_whichever_replica_each_request_hits() {
    let Some((_nats, _dir, b)) = cluster(3).await else {
        return;
    };
    let auth = |r: reqwest::RequestBuilder| r.basic_auth("u", Some("password1"));
    // `/v1/consumers`: created on A, read 4 at a time on A, B, C, A, …
    let (s, v) =
        send(auth(b[0].put("/v1/consumers/c1")).json(&serde_json::json!({"queue": "events"})))
            .await;
    assert_eq!(s, 200, "{v}");
    // webhook-queue's listen on B.
    let (s, _) = send(auth(b[1].get("/listen/w1/events"))).await;
    assert_eq!(s, 200);
    for i in 0..30 {
        publish(&b[i % 3], "events", &format!("m{i}")).await;
    }
    let mut read = Vec::new();
    let mut turn = 0;
    while read.len() < 30 {
        let r = &b[turn % 3];
        turn += 1;
        let (s, v) = send(auth(r.get("/v1/consumers/c1/messages?limit=4&wait=5s"))).await;
        assert_eq!(s, 200, "{v}");
        for m in v["messages"].as_array().unwrap() {
            read.push(m["body"].as_str().unwrap().to_owned());
        }
        assert!(turn < 40, "{read:?}");
    }
    let expected: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    assert_eq!(
        read, expected,
        "each message once, in order, across replicas"
    );
    // webhook-queue's read on C then A: the rest once.
    let mut ids = Vec::new();
    for r in [&b[2], &b[0], &b[1]] {
        let (s, v) = send(auth(r.get("/read/w1"))).await;
        assert_eq!(s, 200, "{v}");
        ids.extend(
            v["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_u64().unwrap()),
        );
    }
    assert_eq!(ids, (1..=30).collect::<Vec<u64>>());
    // Unlisten on A: the consumer is gone on every replica.
    let (s, _) = send(auth(b[0].get("/unlisten/w1"))).await;
    assert_eq!(s, 200);
    for r in &b {
        let (s, v) = send(auth(r.get("/read/w1"))).await;
        assert_eq!(s, 404, "{v}");
    }
    let (s, v) = send(auth(b[2].delete("/v1/consumers/c1"))).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = send(auth(b[1].get("/v1/consumers/c1/messages"))).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("unknown_client")),
        "{v}"
    );
}

#[actix_web::test]
async fn notifications_listing_and_closing_reach_connections_on_any_replica() {
    let Some((_nats, _dir, b)) = cluster(3).await else {
        return;
    };
    let admin = |r: reqwest::RequestBuilder| r.bearer_auth(ADMIN);
    // Replicas know each other within a heartbeat (2 s) of starting.
    for r in &b {
        r.wait_for_metric("broker_cluster_replicas", 3.0).await;
    }
    // Two sessions of `u`, on B and on C.
    let mut on_b = ws_connect(&b[1].url, "", Some("Basic dTpwYXNzd29yZDE="))
        .await
        .unwrap();
    let hello_b = on_b.recv().await;
    let mut on_c = ws_connect(&b[2].url, "", Some("Basic dTpwYXNzd29yZDE="))
        .await
        .unwrap();
    let id_c = on_c.recv().await["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(hello_b["event"], "connected");
    // Every replica's presence is known to A within a heartbeat or two.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let (s, v) = send(admin(b[0].get("/v1/connections"))).await;
        assert_eq!(s, 200, "{v}");
        let list = v["connections"].as_array().unwrap().clone();
        if list.len() == 2 {
            break list;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let replicas: HashSet<&str> = listed
        .iter()
        .map(|c| c["replica"].as_str().unwrap())
        .collect();
    assert_eq!(
        replicas.len(),
        2,
        "listed with the replica holding each: {listed:?}"
    );
    // NotifyUser through A reaches both sessions.
    let (s, v) = send(
        admin(b[0].post("/v1/users/u/notify"))
            .header("content-type", "application/json")
            .body(r#"{"hello":"u"}"#),
    )
    .await;
    assert_eq!((s, v["delivered"].as_u64()), (200, Some(2)), "{v}");
    for c in [&mut on_b, &mut on_c] {
        assert_eq!(
            c.recv().await,
            serde_json::json!({"event": "notify", "data": {"hello": "u"}})
        );
    }
    // NotifyConnection through A reaches the one on C; an unknown one is 404.
    let (s, v) = send(
        admin(b[0].post(&format!("/v1/connections/{id_c}/notify")))
            .header("content-type", "application/json")
            .body("[1,2]"),
    )
    .await;
    assert_eq!((s, v["delivered"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(on_c.recv().await["data"], serde_json::json!([1, 2]));
    let (s, v) = send(
        admin(b[0].post("/v1/connections/0123456789abcdef/notify"))
            .header("content-type", "application/json")
            .body("1"),
    )
    .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("unknown_connection")),
        "{v}"
    );
    // Closing it through B closes it on C.
    let (s, v) = send(admin(b[1].delete(&format!("/v1/connections/{id_c}")))).await;
    assert_eq!(s, 200, "{v}");
    assert!(matches!(
        on_c.next().await,
        crate::support::Next::Closed(4010, _)
    ));
}

#[actix_web::test]
async fn a_signed_request_replayed_to_another_replica_is_refused() {
    let slack =
        "[[queues]]\nname = \"slack\"\nauth = { method = \"slack\", key = \"slack-secret\" }\n";
    let Some((_nats, _dir, b)) = cluster_with(3, slack).await else {
        return;
    };
    let now = chrono::Utc::now().timestamp().to_string();
    let body = br#"{"event":"x"}"#;
    let mut signed = b"v0:".to_vec();
    signed.extend_from_slice(now.as_bytes());
    signed.push(b':');
    signed.extend_from_slice(body);
    let signature = format!(
        "v0={}",
        crate::support::hmac_sha256_hex(b"slack-secret", &signed)
    );
    let request = |r: &BrokerProcess| {
        r.post("/v1/queues/slack/messages")
            .header("x-slack-request-timestamp", now.clone())
            .header("x-slack-signature", signature.clone())
            .header("content-type", "application/json")
            .body(&body[..])
    };
    let (s, v) = send(request(&b[0])).await;
    assert_eq!(s, 200, "{v}");
    for r in &b {
        let (s, v) = send(request(r)).await;
        assert_eq!((s, v["code"].as_str()), (409, Some("replayed")), "{v}");
    }
}

#[actix_web::test]
async fn an_idempotency_key_holds_across_replicas() {
    let Some((_nats, _dir, b)) = cluster(3).await else {
        return;
    };
    let publish = |r: &BrokerProcess, queue: &str, body: &str| {
        r.post(&format!("/v1/queues/{queue}/messages"))
            .header("idempotency-key", "order-7")
            .body(body.to_owned())
    };
    for queue in ["events", "chat.room9"] {
        let (s, first) = send(publish(&b[0], queue, "first")).await;
        assert_eq!(s, 200, "{first}");
        // Retried through the other replicas: the first offset, nothing stored again
        // (JetStream's message id, or the replica's own record once its feed has it).
        for r in &b[1..] {
            let (s, again) = send(publish(r, queue, "retried")).await;
            assert_eq!(
                (s, &again["offset"]),
                (200, &first["offset"]),
                "{queue}: {again}"
            );
        }
        let (stored, _) = read_all(&b[2], queue).await;
        assert_eq!(stored.values().collect::<Vec<_>>(), ["first"], "{queue}");
    }
}

#[actix_web::test]
async fn webhook_targets_are_spread_over_the_replicas() {
    let (sink, seen) = recording_sink(200);
    let queues: String = (0..12)
        .map(|i| {
            format!(
                "[[queues]]\nname = \"spread{i}\"\n[[queues.webhooks]]\nurl = \"{sink}/q{i}\"\n\
                 signing_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"
            )
        })
        .collect();
    let Some((_nats, _dir, b)) = cluster_with(3, &queues).await else {
        return;
    };
    // Once every replica knows the others, the targets are handed out (the first
    // replica up took them all): wait until they are, with none delivered twice.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut owned = Vec::new();
        for r in &b {
            let text = r.metrics().await;
            owned.push(
                crate::support::metric(&text, "broker_webhook_targets_delivering").unwrap_or(0.0),
            );
        }
        if owned.iter().sum::<f64>() == 12.0 && owned.iter().filter(|n| **n > 0.0).count() >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "targets delivering per replica: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..12 {
        for n in 0..5 {
            publish(&b[(i + n) % 3], &format!("spread{i}"), &format!("s{i}-{n}")).await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < 60 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 60 delivered",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each target was delivered by exactly one replica, in order; the targets are
    // shared out (12 targets over 3 replicas: each replica has some, by the
    // rendezvous hash of the replicas' random ids — all on one has a chance of 3/3^12).
    let mut per_replica = vec![0usize; 3];
    for i in 0..12 {
        per_replica[delivering(&b, &format!("spread{i}")).await] += 1;
        let bodies: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, _, _)| *path == format!("/q{i}"))
            .map(|(_, _, body)| body.clone())
            .collect();
        let expected: Vec<String> = (0..5).map(|n| format!("s{i}-{n}")).collect();
        assert_eq!(bodies, expected, "target {i}: each once, in order");
    }
    assert!(
        per_replica.iter().filter(|n| **n > 0).count() >= 2,
        "targets per replica: {per_replica:?}"
    );
    eprintln!("webhook targets per replica: {per_replica:?}");
}

#[actix_web::test]
async fn readiness_follows_the_nats_connection() {
    let Some((mut nats, _dir, b)) = cluster(1).await else {
        return;
    };
    let ready = |r: &BrokerProcess| {
        let req = r.get("/readyz");
        async move {
            req.send()
                .await
                .map(|res| res.status().as_u16())
                .unwrap_or(0)
        }
    };
    let wait_until = |want: u16| {
        let r = &b[0];
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                if ready(r).await == want {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "/readyz never answered {want}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_until(200).await;
    // Every NATS server gone: not ready, and a publish is refused, not acknowledged.
    for n in &mut nats.nodes {
        n.kill();
    }
    wait_until(503).await;
    let (s, v) = send(b[0].post("/v1/queues/events/messages").body("while down")).await;
    assert_eq!(
        (s, v["code"].as_str()),
        (503, Some("store_unavailable")),
        "{v}"
    );
    b[0].wait_for_metric("broker_cluster_connected", 0.0).await;
    // Back: ready again, publishing again.
    for n in &mut nats.nodes {
        n.restart();
    }
    nats.wait_ready().await;
    wait_until(200).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, _) = send(b[0].post("/v1/queues/events/messages").body("after")).await;
        if s == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "publishing never resumed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[actix_web::test]
async fn every_kind_of_publish_through_any_replica_reaches_one_log() {
    let Some((_nats, _dir, b)) = cluster(3).await else {
        return;
    };
    let mut sub = connect(&b[2]).await;
    sub.subscribe("events", None).await;
    // HTTP through A, a batch through B, WebSocket through A, webhook-queue's /q
    // through B: one queue, one order.
    publish(&b[0], "events", "http").await;
    let (s, v) = send(
        b[1].post("/v1/queues/events/batch")
            .json(&serde_json::json!({
                "messages": [{"body": "batch-1"}, {"body": "batch-2"}]
            })),
    )
    .await;
    assert_eq!((s, v["offset"].as_u64()), (200, Some(3)), "{v}");
    let mut ws = connect(&b[0]).await;
    ws.send(serde_json::json!({"action": "publish", "queue": "events", "data": "ws"}))
        .await;
    loop {
        let v = ws.recv().await;
        if v["event"] == "published" {
            assert_eq!(v["offset"], 4, "{v}");
            break;
        }
        assert_ne!(v["event"], "error", "{v}");
    }
    let (s, body) =
        crate::support::text(b[1].post("/q/events").body("q").send().await.unwrap()).await;
    assert_eq!(s, 200, "{body}");
    let got: Vec<(u64, serde_json::Value)> = {
        let mut got = Vec::new();
        while got.len() < 5 {
            let v = sub.recv().await;
            if v["event"] == "message" {
                let value = if v["data"].is_null() {
                    v["body"].clone()
                } else {
                    v["data"].clone()
                };
                got.push((v["offset"].as_u64().unwrap(), value));
            }
        }
        got
    };
    let expected: Vec<(u64, serde_json::Value)> = ["http", "batch-1", "batch-2", "ws", "q"]
        .iter()
        .enumerate()
        .map(|(i, b)| (i as u64 + 1, serde_json::json!(b)))
        .collect();
    assert_eq!(got, expected);
}
