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
