//! Compiled webhook targets (validated from config), the backoff arithmetic of retries,
//! and how target URLs are shown.

use std::time::Duration;

use crate::config::WebhookConfig;

/// Svix's retry schedule: rides out a multi-hour outage.
pub const DEFAULT_SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// Longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How long to wait before retry n (n ≥ 1).
#[derive(Debug, Clone, PartialEq)]
pub enum Backoff {
    /// `schedule[n-1]`, the last entry repeating.
    Schedule(Vec<Duration>),
    /// `initial × 2^(n-1)`, capped.
    Exponential {
        /// First delay.
        initial: Duration,
        /// Cap.
        max: Duration,
    },
}

impl Backoff {
    /// The delay before retry `n` (1-based), before jitter.
    pub fn base(&self, n: u32) -> Duration {
        let n = n.max(1);
        match self {
            Backoff::Schedule(s) => s[((n - 1) as usize).min(s.len() - 1)],
            Backoff::Exponential { initial, max } => {
                let factor = 2u32.saturating_pow((n - 1).min(30));
                initial.saturating_mul(factor).min(*max)
            }
        }
    }

    /// The delay with ±`jitter` spread; `unit` is uniform in [0, 1).
    pub fn delay(&self, n: u32, jitter: f64, unit: f64) -> Duration {
        let base = self.base(n).as_secs_f64();
        let spread = 1.0 + jitter * (2.0 * unit - 1.0);
        Duration::from_secs_f64((base * spread).max(0.0))
    }
}

/// A validated webhook target.
#[derive(Debug)]
pub struct WebhookSpec {
    /// As configured (compared on reload).
    pub config: WebhookConfig,
    /// Parsed URL.
    pub url: reqwest::Url,
    /// Parsed method.
    pub method: reqwest::Method,
    /// Retry delays.
    pub backoff: Backoff,
    /// HMAC key for Standard Webhooks signatures.
    pub signing_key: Option<Vec<u8>>,
}

impl WebhookSpec {
    /// Validates a target; errors are `(sub-key, message)`.
    pub fn compile(c: &WebhookConfig) -> Result<Self, (String, String)> {
        let url = reqwest::Url::parse(&c.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or((
                "url".to_owned(),
                format!("`{}` is not an http(s) URL", c.url),
            ))?;
        let method = reqwest::Method::from_bytes(c.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| {
                (
                    "method".to_owned(),
                    format!("`{}` is not an HTTP method", c.method),
                )
            })?;
        if c.max_in_flight == 0 {
            return Err(("max_in_flight".into(), "must be at least 1".into()));
        }
        if c.timeout.is_zero() {
            return Err(("timeout".into(), "must be longer than 0s".into()));
        }
        if !(0.0..=1.0).contains(&c.backoff.jitter) {
            return Err(("backoff.jitter".into(), "must be between 0 and 1".into()));
        }
        for (name, value) in &c.headers {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(value).is_err()
            {
                return Err((format!("headers.{name}"), "not a valid HTTP header".into()));
            }
        }
        let backoff = if !c.backoff.schedule.is_empty() {
            Backoff::Schedule(c.backoff.schedule.iter().map(|d| d.0).collect())
        } else if let Some(initial) = c.backoff.initial {
            Backoff::Exponential {
                initial,
                max: c.backoff.max.unwrap_or(Duration::from_secs(10 * 3600)),
            }
        } else {
            Backoff::Schedule(DEFAULT_SCHEDULE.to_vec())
        };
        let signing_key = match &c.signing_secret {
            None => None,
            Some(s) => {
                let s = s.resolve().map_err(|m| ("signing_secret".to_owned(), m))?;
                Some(
                    crate::auth::standard_webhooks_key(s.expose())
                        .map_err(|m| ("signing_secret".to_owned(), m))?,
                )
            }
        };
        Ok(WebhookSpec {
            config: c.clone(),
            url,
            method,
            backoff,
            signing_key,
        })
    }
}

/// [`shown_url`] of a URL given as text (`None` if it does not parse).
pub fn shown_url_text(url: &str) -> Option<String> {
    reqwest::Url::parse(url).ok().map(|u| shown_url(&u))
}

/// A target URL as the broker shows it (dead-letter headers, logs, the admin API):
/// without user info, query or fragment, and with path segments of 16 characters or more
/// (tokens, as in Slack's `/services/T…/B…/<secret>`) replaced by `***`.
pub fn shown_url(url: &reqwest::Url) -> String {
    let mut shown = format!("{}://", url.scheme());
    if let Some(host) = url.host_str() {
        shown.push_str(host);
    }
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    for segment in url.path().split('/').skip(1) {
        shown.push('/');
        shown.push_str(if segment.len() >= 16 { "***" } else { segment });
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_carry_no_credentials() {
        let shown = |u: &str| shown_url(&reqwest::Url::parse(u).unwrap());
        assert_eq!(
            shown("https://user:pa55@hooks.example:8443/in/orders?token=abc#x"),
            "https://hooks.example:8443/in/orders"
        );
        assert_eq!(
            shown("https://hooks.slack.com/services/T0001/B0001/XXXXXXXXXXXXXXXXXXXXXXXX"),
            "https://hooks.slack.com/services/T0001/B0001/***"
        );
        assert_eq!(shown("http://127.0.0.1:9/"), "http://127.0.0.1:9/");
    }

    #[test]
    fn backoff_schedules() {
        let svix = Backoff::Schedule(DEFAULT_SCHEDULE.to_vec());
        assert_eq!(svix.base(1), Duration::from_secs(5));
        assert_eq!(svix.base(7), Duration::from_secs(36000));
        assert_eq!(
            svix.base(20),
            Duration::from_secs(36000),
            "the last entry repeats"
        );
        let exp = Backoff::Exponential {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(exp.base(1), Duration::from_millis(100));
        assert_eq!(exp.base(3), Duration::from_millis(400));
        assert_eq!(exp.base(10), Duration::from_secs(1));
        assert_eq!(exp.delay(1, 0.2, 0.0), Duration::from_millis(80));
        assert_eq!(exp.delay(1, 0.2, 0.5), Duration::from_millis(100));
    }
}

/// Why an address is internal (no target created at runtime may reach it unless
/// `webhooks.allow_targets` lets it): `None` for a public address.
pub fn internal_address(ip: std::net::IpAddr) -> Option<&'static str> {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local (cloud metadata)")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("unspecified")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("shared (carrier-grade NAT)")
            } else if v4.is_multicast() || v4.is_broadcast() || o[0] >= 240 {
                Some("multicast or reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_address(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if (first & 0xfe00) == 0xfc00 {
                Some("unique local (private)")
            } else if (first & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast or reserved")
            } else {
                None
            }
        }
    }
}

/// Whether a target created at runtime may connect to `ip`: a public address, or one
/// `allow` (`webhooks.allow_targets`) lets through; else why not.
pub fn target_address_allowed(
    ip: std::net::IpAddr,
    allow: &[ipnet::IpNet],
) -> Result<(), &'static str> {
    match internal_address(ip) {
        Some(why) if !allow.iter().any(|n| n.contains(&ip)) => Err(why),
        _ => Ok(()),
    }
}

/// The networks runtime targets may reach although internal; swapped by a reload.
pub type AllowedTargets = std::sync::Arc<std::sync::RwLock<Vec<ipnet::IpNet>>>;

/// The DNS resolver of the client that delivers to targets created at runtime: names
/// resolve as usual, minus internal addresses (see [`target_address_allowed`]), so a
/// name that was public when the target was defined cannot later point it inward.
pub struct GuardedResolver {
    /// What may be reached although internal.
    pub allow: AllowedTargets,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let allow = allow.read().expect("allowed targets lock").clone();
            let mut refused = None;
            let ok: Vec<std::net::SocketAddr> = found
                .filter(|a| match target_address_allowed(a.ip(), &allow) {
                    Ok(()) => true,
                    Err(why) => {
                        refused = Some(why);
                        false
                    }
                })
                .collect();
            if ok.is_empty() {
                let why = refused.unwrap_or("no address");
                let msg = format!("`{host}` resolves to a {why} address, which targets defined at runtime may not reach (webhooks.allow_targets)");
                return Err(msg.into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Checks a target being defined at runtime: its host, a literal address or a name
/// resolved now, must not be internal (see [`target_address_allowed`]). A name that does
/// not resolve yet is accepted; every connection is checked again ([`GuardedResolver`]).
pub async fn check_runtime_target(url: &str, allow: &[ipnet::IpNet]) -> Result<(), String> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Ok(()); // compiling the definition reports it
    };
    let shown = shown_url(&parsed);
    let refuse = |why: &str| {
        format!("target {shown} is a {why} address, which targets defined at runtime may not reach unless webhooks.allow_targets lets it")
    };
    let Some(host) = parsed.host_str() else {
        return Ok(());
    };
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<std::net::IpAddr>() {
        return target_address_allowed(ip, allow).map_err(refuse);
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    let Ok(found) = tokio::net::lookup_host((host, port)).await else {
        return Ok(());
    };
    for a in found {
        target_address_allowed(a.ip(), allow).map_err(refuse)?;
    }
    Ok(())
}

#[cfg(test)]
mod guard_tests {
    use super::*;
    use reqwest::dns::Resolve;

    #[test]
    fn internal_addresses_are_named_and_public_ones_pass() {
        for (ip, internal) in [
            ("127.0.0.1", true),
            ("10.0.0.1", true),
            ("172.16.0.1", true),
            ("192.168.1.1", true),
            ("169.254.169.254", true),
            ("100.64.0.1", true),
            ("0.0.0.0", true),
            ("224.0.0.1", true),
            ("::1", true),
            ("::ffff:10.0.0.1", true),
            ("fd00:ec2::254", true),
            ("fe80::1", true),
            ("192.0.2.10", false),
            ("8.8.8.8", false),
            ("2001:4860:4860::8888", false),
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(internal_address(ip).is_some(), internal, "{ip}");
        }
        let allow = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(target_address_allowed("10.1.1.1".parse().unwrap(), &allow).is_ok());
        assert!(target_address_allowed("10.1.1.1".parse().unwrap(), &[]).is_err());
    }

    /// At connection time a name is resolved without its internal addresses: a name
    /// that points inward cannot be reached, whatever it resolved to when defined.
    #[tokio::test]
    async fn the_guarded_resolver_drops_internal_addresses() {
        let guarded = GuardedResolver {
            allow: Default::default(),
        };
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let err = match guarded.resolve(name).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("loopback"), "{err}");
        let open = GuardedResolver {
            allow: std::sync::Arc::new(std::sync::RwLock::new(vec![
                "127.0.0.0/8".parse().unwrap(),
                "::1/128".parse().unwrap(),
            ])),
        };
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(open.resolve(name).await.is_ok());
    }
}
