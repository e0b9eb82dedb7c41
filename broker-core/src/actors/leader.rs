//! `Leader`: runs the election (`crate::election`) and tells the actors whose work must
//! happen once across replicas when this node gains or loses leadership: `Cron` (ticks),
//! every `Webhook` (dispatch) and, through the `Hub`, every `Queue` (delayed releases).
//! The state is also published on a watch channel (`Broker::lost_leadership`).

use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::watch;

pub use crate::election::{Election, SingleNode};
use crate::metrics::Metrics;

/// This node gained (`true`) or lost (`false`) leadership.
#[derive(Message, Clone, Copy, Debug, PartialEq, Eq)]
#[rtype(result = "()")]
pub struct LeadershipChanged {
    /// Whether this node leads now.
    pub leader: bool,
}

/// Registers an actor for [`LeadershipChanged`]; it gets the current state at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Follow {
    /// Where changes go.
    pub recipient: Recipient<LeadershipChanged>,
}

/// Reported by the election.
#[derive(Message)]
#[rtype(result = "()")]
struct Elected(bool);

/// Whether this node leads.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct IsLeader;

/// The leadership actor.
pub struct Leader {
    election: Option<Box<dyn Election>>,
    leader: bool,
    followers: Vec<Recipient<LeadershipChanged>>,
    metrics: Arc<Metrics>,
    state: watch::Sender<bool>,
}

impl Leader {
    /// A leader actor running `election`.
    pub fn new(election: Box<dyn Election>, metrics: Arc<Metrics>) -> Self {
        Self {
            election: Some(election),
            leader: false,
            followers: Vec::new(),
            metrics,
            state: watch::channel(false).0,
        }
    }

    /// Whether this node leads, as it changes.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.state.subscribe()
    }
}

impl Actor for Leader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.metrics.leader.set(0);
        let addr = ctx.address();
        if let Some(election) = self.election.take() {
            // Elections report rarely: do_send cannot pile up here.
            election.run(Box::new(move |leader| addr.do_send(Elected(leader))));
        }
    }
}

impl Handler<Elected> for Leader {
    type Result = ();

    fn handle(&mut self, msg: Elected, _: &mut Self::Context) {
        if msg.0 == self.leader {
            return;
        }
        self.leader = msg.0;
        self.metrics.leader.set(i64::from(msg.0));
        self.metrics.leader_changes.inc();
        tracing::info!(leader = msg.0, "leadership changed");
        self.state.send_replace(msg.0);
        self.followers.retain(|f| f.connected());
        for f in &self.followers {
            f.do_send(LeadershipChanged { leader: msg.0 });
        }
    }
}

impl Handler<Follow> for Leader {
    type Result = ();

    fn handle(&mut self, msg: Follow, _: &mut Self::Context) {
        msg.recipient.do_send(LeadershipChanged {
            leader: self.leader,
        });
        self.followers.push(msg.recipient);
    }
}

impl Handler<IsLeader> for Leader {
    type Result = bool;

    fn handle(&mut self, _: IsLeader, _: &mut Self::Context) -> bool {
        self.leader
    }
}

/// An election tests drive by hand.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::Mutex;

    /// Where the election's report callback lands.
    pub type Hook = Arc<Mutex<Option<Box<dyn Fn(bool) + Send + Sync>>>>;

    /// The election; `elect(&hook, true)` makes the node leader.
    pub struct Manual(pub Hook);

    impl Election for Manual {
        fn run(self: Box<Self>, report: Box<dyn Fn(bool) + Send + Sync>) {
            *self.0.lock().unwrap() = Some(report);
        }
    }

    /// Reports a result of the election.
    pub fn elect(hook: &Hook, leader: bool) {
        (hook.lock().unwrap().as_ref().expect("election running"))(leader);
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{elect, Manual};
    use super::*;
    use std::sync::Mutex;

    struct Probe(Arc<Mutex<Vec<bool>>>);
    impl Actor for Probe {
        type Context = Context<Self>;
    }
    impl Handler<LeadershipChanged> for Probe {
        type Result = ();
        fn handle(&mut self, m: LeadershipChanged, _: &mut Self::Context) {
            self.0.lock().unwrap().push(m.leader);
        }
    }

    #[derive(Message)]
    #[rtype(result = "Vec<bool>")]
    struct Seen;
    impl Handler<Seen> for Probe {
        type Result = MessageResult<Seen>;
        fn handle(&mut self, _: Seen, _: &mut Self::Context) -> Self::Result {
            MessageResult(self.0.lock().unwrap().clone())
        }
    }

    #[actix::test]
    async fn followers_hear_every_change() {
        let metrics = Arc::new(Metrics::new());
        let hook = Arc::new(Mutex::new(None));
        let leader = Leader::new(Box::new(Manual(hook.clone())), metrics.clone()).start();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let probe = Probe(seen).start();
        leader
            .send(Follow {
                recipient: probe.clone().recipient(),
            })
            .await
            .unwrap();
        assert!(!leader.send(IsLeader).await.unwrap());
        elect(&hook, true);
        assert!(leader.send(IsLeader).await.unwrap());
        elect(&hook, false);
        assert!(!leader.send(IsLeader).await.unwrap());
        // The leader sent the changes before answering; the probe's mailbox is FIFO.
        assert_eq!(probe.send(Seen).await.unwrap(), vec![false, true, false]);
        assert_eq!(metrics.leader.get(), 0);
        assert_eq!(metrics.leader_changes.get(), 2);
    }

    #[actix::test]
    async fn single_node_leads() {
        let leader = Leader::new(Box::new(SingleNode), Arc::new(Metrics::new())).start();
        let _ = leader.send(IsLeader).await; // Elected is processed first (FIFO)
        assert!(leader.send(IsLeader).await.unwrap());
    }
}
