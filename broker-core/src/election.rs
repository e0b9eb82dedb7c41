//! Which replica does the work that must happen once: cron ticks, delayed releases and
//! webhook dispatch. An [`Election`] reports this node's leadership as it changes; the
//! `Leader` actor passes it on to that work.
//!
//! Implementations: [`SingleNode`] (an embedded store: one broker, always the leader) and
//! the database's active lock (`store::ActiveLock`: the broker holding it leads until it
//! loses it). The scale-out work adds one whose replicas share the lead.

/// How leadership is decided.
pub trait Election: Send + 'static {
    /// Starts campaigning; calls `report(true)` on becoming leader and `report(false)` on
    /// losing it, as often as that happens.
    fn run(self: Box<Self>, report: Box<dyn Fn(bool) + Send + Sync>);
}

/// One node with an embedded store: always the leader.
pub struct SingleNode;

impl Election for SingleNode {
    fn run(self: Box<Self>, report: Box<dyn Fn(bool) + Send + Sync>) {
        report(true);
    }
}

/// Who delivers each webhook target, where that is decided per target (a NATS cluster
/// spreads the targets over its replicas); without it every target follows the
/// `Leader`.
pub trait TargetElections: Send + Sync + 'static {
    /// Tells `recipient` whether this replica delivers target `key` (its queue and
    /// URL), as that changes, for as long as the recipient runs.
    fn follow(
        &self,
        key: String,
        recipient: actix::Recipient<crate::actors::leader::LeadershipChanged>,
    );
}
