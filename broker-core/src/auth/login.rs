//! Bounds on password checks, so that logins cannot be used to burn the broker's CPU
//! and memory (argon2 costs tens of milliseconds and 19 MiB per check, by design).
//!
//! - Verification runs at most one per core at once; a bounded number more wait their
//!   turn, beyond that a login is refused at once (429 `too_many_logins`).
//! - A login that must be verified (not a recently cached success) takes a token from
//!   its client address (IPv6: its /64) and from its user name, each refilled at
//!   `limits.login_attempts_per_minute` (`governor`); an empty bucket is a 429 with
//!   `Retry-After`. Only configured user names get a bucket of their own (an unknown
//!   name cannot grow the table); addresses are forgotten once their bucket is full again.
//! - An unknown user costs the same argon2 check as a known one (against a decoy hash),
//!   so timing does not tell which names exist.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::Semaphore;

use super::password::PasswordHash;
use crate::config::Secret;
use crate::error::Error;

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

/// Client addresses tracked at most; past it, addresses whose bucket is full again are
/// forgotten, and if that is not enough, logins from new addresses are refused.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// What bounds the logins of one broker.
pub struct LoginGuard {
    /// Checks running at once.
    running: Arc<Semaphore>,
    /// Checks running or waiting at once.
    admitted: Arc<Semaphore>,
    by_address: Keyed<IpAddr>,
    by_user: Keyed<String>,
    per_minute: u32,
}

/// A login admitted for verification: holds its place until dropped.
pub struct Admitted {
    _place: tokio::sync::OwnedSemaphorePermit,
    running: Arc<Semaphore>,
}

impl Admitted {
    /// Waits for a free core, then runs `check` on the blocking pool.
    pub async fn verify(
        self,
        check: impl FnOnce() -> bool + Send + 'static,
    ) -> Result<bool, Error> {
        let _core = self
            .running
            .acquire_owned()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        tokio::task::spawn_blocking(check)
            .await
            .map_err(|_| Error::ShuttingDown)
    }
}

impl LoginGuard {
    /// A guard allowing `per_minute` checks per address and per user name.
    pub fn new(per_minute: u32) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let rate = NonZeroU32::new(per_minute.max(1)).expect("at least 1");
        Self {
            running: Arc::new(Semaphore::new(cores)),
            admitted: Arc::new(Semaphore::new(cores * 16)),
            by_address: RateLimiter::keyed(Quota::per_minute(rate)),
            by_user: RateLimiter::keyed(Quota::per_minute(rate)),
            per_minute,
        }
    }

    /// The rate this guard was made with (a reload makes a new guard if it changed).
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Admits a check of `user`'s password from `client`, or refuses it (429) when the
    /// address or the (configured) user name is over its rate, or too many checks wait.
    pub fn admit(&self, client: IpAddr, user: Option<&str>) -> Result<Admitted, Error> {
        let key = address_key(client);
        if self.by_address.len() >= MAX_TRACKED_ADDRESSES {
            self.by_address.retain_recent();
            if self.by_address.len() >= MAX_TRACKED_ADDRESSES {
                return Err(too_many(Duration::from_secs(1)));
            }
        }
        let now = DefaultClock::default().now();
        self.by_address
            .check_key(&key)
            .map_err(|n| too_many(n.wait_time_from(now)))?;
        if let Some(user) = user {
            self.by_user
                .check_key(&user.to_owned())
                .map_err(|n| too_many(n.wait_time_from(now)))?;
        }
        let place = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| too_many(Duration::from_secs(1)))?;
        Ok(Admitted {
            _place: place,
            running: self.running.clone(),
        })
    }
}

fn too_many(wait: Duration) -> Error {
    // Whole seconds, at least one (what `Retry-After` carries).
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Error::TooManyLogins {
        retry_after_secs: secs.max(1),
    }
}

/// The bucket of a client address: IPv4 as is, IPv6 by its /64 (one host's share).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::from(o)
        }
    }
}

/// The hash an unknown user's password is checked against: argon2id with the
/// parameters `hash-password` writes, of a random password nobody knows.
pub fn decoy() -> &'static PasswordHash {
    static DECOY: OnceLock<PasswordHash> = OnceLock::new();
    DECOY.get_or_init(|| {
        let phc = super::password::hash_password(&crate::random::id());
        PasswordHash::parse(&Secret::new(phc)).expect("a PHC string just written")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_address_and_each_user_has_its_own_rate() {
        let g = LoginGuard::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            g.admit(a, None).unwrap();
        }
        match g.admit(a, None) {
            Err(Error::TooManyLogins { retry_after_secs }) => {
                assert!((1..=20).contains(&retry_after_secs), "{retry_after_secs}")
            }
            other => panic!("{:?}", other.err()),
        }
        // Another address is not limited by the first; a user name is, from anywhere.
        for _ in 0..3 {
            g.admit(b, Some("alice")).unwrap();
        }
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        assert!(g.admit(c, Some("alice")).is_err(), "alice is over her rate");
        assert!(g.admit(c, Some("bob")).is_ok());
    }

    #[test]
    fn ipv6_hosts_share_their_64() {
        let k = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("10.0.0.1"), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn checks_wait_for_a_core_and_too_many_waiting_are_refused() {
        let g = LoginGuard::new(1_000_000);
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let places: Vec<Admitted> = (0..g.admitted.available_permits())
            .map(|_| g.admit(ip, None).unwrap())
            .collect();
        assert!(
            matches!(g.admit(ip, None), Err(Error::TooManyLogins { .. })),
            "no place left"
        );
        drop(places);
        let ok = g.admit(ip, None).unwrap().verify(|| true).await.unwrap();
        assert!(ok);
    }

    #[test]
    fn the_decoy_is_an_argon2_hash_nobody_matches() {
        assert!(!decoy().is_weak());
        assert!(!decoy().verify(""));
    }
}
