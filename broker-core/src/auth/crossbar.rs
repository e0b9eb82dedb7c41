//! Crossbar.io's signed HTTP bridge requests.
//!
//! A signed request carries the query parameters `key`, `timestamp`, `seq`, `nonce` and
//! `signature`, where `signature` is the base64 of HMAC-SHA256(secret, key ‖ timestamp ‖
//! seq ‖ nonce ‖ body) over the parameters exactly as sent. Crossbar's server encodes with
//! the URL-safe alphabet and parses `timestamp` as `%Y-%m-%dT%H:%M:%S.%fZ` (1 to 6
//! fractional digits). This verifier is at least as liberal — either base64 alphabet,
//! padding optional, 0 to 9 fractional digits — and stricter where Crossbar leaves a
//! FIXME: a nonce is accepted once within the timestamp window ([`NonceCache`]).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use base64::Engine;

use super::ingest::{verify_mac, HmacAlgo};
use crate::config::Secret;

/// Why a pusher request is refused, with Crossbar's status and wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A mandatory field is missing (400).
    #[error("REST bridge signature was invalid (missing mandatory field - '{0}' field missing).")]
    Missing(&'static str),
    /// `timestamp` is not ISO 8601 UTC (400).
    #[error("REST bridge signature was invalid (invalid timestamp '{0}' (must be UTC/ISO-8601, e.g. '2011-10-14T16:59:51.123Z')).")]
    BadTimestamp(String),
    /// `seq` or `nonce` is not an integer (400).
    #[error("REST bridge signature was invalid (invalid {0} '{1}' (must be an integer)).")]
    NotAnInteger(&'static str, String),
    /// `timestamp` is outside `timestamp_delta_limit` (400).
    #[error("Request expired, too old timestamp.")]
    Expired,
    /// The nonce was used before within the window (400).
    #[error("REST bridge signature was invalid (nonce already used).")]
    Replayed,
    /// Too many signed requests within the window to remember their nonces (503).
    #[error("too many signed requests within timestamp_delta_limit to remember their nonces")]
    NoncesFull,
    /// `key` is not the configured key (401).
    #[error("REST bridge signature key not valid.")]
    UnknownKey,
    /// The signature does not match (401).
    #[error("REST bridge signature secret not valid.")]
    BadSignature,
}

impl SignatureError {
    /// The HTTP status Crossbar answers with.
    pub fn status(&self) -> u16 {
        match self {
            SignatureError::UnknownKey | SignatureError::BadSignature => 401,
            SignatureError::NoncesFull => 503,
            _ => 400,
        }
    }
}

/// The signing parameters of one request, as sent (URL-decoded).
#[derive(Debug, Default)]
pub struct SignedParams<'a> {
    /// `key`
    pub key: Option<&'a str>,
    /// `timestamp`
    pub timestamp: Option<&'a str>,
    /// `seq`
    pub seq: Option<&'a str>,
    /// `nonce`
    pub nonce: Option<&'a str>,
    /// `signature`
    pub signature: Option<&'a str>,
}

/// Parses Crossbar's timestamp (`2011-10-14T16:59:51.123Z`) into Unix milliseconds.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let t = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.fZ").ok()?;
    Some(t.and_utc().timestamp_millis())
}

/// Checks a signed request: fields present and well formed, key known, signature valid,
/// timestamp within `delta_limit_s` of `now_ms`, nonce not seen in that window.
pub fn verify(
    params: &SignedParams<'_>,
    body: &[u8],
    key: &str,
    secret: &Secret,
    delta_limit_s: u64,
    now_ms: i64,
    nonces: &NonceCache,
) -> Result<(), SignatureError> {
    let given_key = params.key.ok_or(SignatureError::Missing("key"))?;
    let timestamp = params
        .timestamp
        .ok_or(SignatureError::Missing("timestamp"))?;
    let ts_ms = parse_timestamp(timestamp)
        .ok_or_else(|| SignatureError::BadTimestamp(timestamp.to_owned()))?;
    let window_ms = i64::try_from(delta_limit_s)
        .unwrap_or(i64::MAX / 2_000)
        .saturating_mul(1000);
    // Checked: a client-supplied timestamp must not wrap.
    let skew = ts_ms.checked_sub(now_ms).map(i64::unsigned_abs);
    if skew.is_none_or(|s| s > window_ms.unsigned_abs()) {
        return Err(SignatureError::Expired);
    }
    let seq = params.seq.ok_or(SignatureError::Missing("seq"))?;
    if seq.parse::<i128>().is_err() {
        return Err(SignatureError::NotAnInteger("sequence number", seq.into()));
    }
    let nonce = params.nonce.ok_or(SignatureError::Missing("nonce"))?;
    if nonce.parse::<i128>().is_err() {
        return Err(SignatureError::NotAnInteger("nonce", nonce.into()));
    }
    let signature = params
        .signature
        .ok_or(SignatureError::Missing("signature"))?;
    if !super::secrets::matches_secrets(given_key, [&Secret::new(key)]) {
        return Err(SignatureError::UnknownKey);
    }
    let sig = decode_base64(signature).ok_or(SignatureError::BadSignature)?;
    let parts: [&[u8]; 5] = [
        given_key.as_bytes(),
        timestamp.as_bytes(),
        seq.as_bytes(),
        nonce.as_bytes(),
        body,
    ];
    if !verify_mac(HmacAlgo::Sha256, secret.expose().as_bytes(), &parts, &sig) {
        return Err(SignatureError::BadSignature);
    }
    // Only a verified request spends its nonce: nobody else can burn one.
    // Saturating: a huge window must not wrap negative and switch the cache off.
    nonces.check_and_remember(nonce, now_ms, window_ms.saturating_mul(2))
}

/// Base64 in either alphabet, padded or not.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let s = s.trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(s)
        .or_else(|_| STANDARD_NO_PAD.decode(s))
        .ok()
}

/// Nonces of verified requests, each kept for twice the timestamp window from when it
/// was seen (a request is accepted while its timestamp is within ± the window of now, so
/// that covers every moment it could be replayed). Bounded: beyond `capacity` live
/// nonces, new signed requests are refused rather than a nonce forgotten early.
pub struct NonceCache {
    inner: Mutex<Nonces>,
    capacity: usize,
}

#[derive(Default)]
struct Nonces {
    seen: HashSet<String>,
    /// (forget at, nonce), in insertion order: forget times only grow.
    order: VecDeque<(i64, String)>,
}

impl std::fmt::Debug for NonceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Default for NonceCache {
    fn default() -> Self {
        Self::new(1_000_000)
    }
}

impl NonceCache {
    /// A cache holding at most `capacity` live nonces.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            capacity,
        }
    }

    /// Remembers `nonce` for `keep_ms`, or says it was seen already.
    pub fn check_and_remember(
        &self,
        nonce: &str,
        now_ms: i64,
        keep_ms: i64,
    ) -> Result<(), SignatureError> {
        let mut n = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while n.order.front().is_some_and(|(until, _)| *until <= now_ms) {
            let (_, old) = n.order.pop_front().expect("checked above");
            n.seen.remove(&old);
        }
        if n.seen.contains(nonce) {
            return Err(SignatureError::Replayed);
        }
        if n.seen.len() >= self.capacity {
            return Err(SignatureError::NoncesFull);
        }
        n.seen.insert(nonce.to_owned());
        let until = now_ms.saturating_add(keep_ms);
        let until = n.order.back().map_or(until, |(last, _)| until.max(*last));
        n.order.push_back((until, nonce.to_owned()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Computed with Python's hmac/base64, as Crossbar's server does:
    // base64.urlsafe_b64encode(hmac.new(b"bar", b"foo" + ts + b"1" + b"123456" + body,
    // hashlib.sha256).digest())
    const BODY: &[u8] = br#"{"topic":"com.myapp.topic1","args":["Hello, world"]}"#;
    const TS: &str = "2011-10-14T16:59:51.123Z";
    const SIG_URLSAFE: &str = "CcN42sOGUj_woO7pB1DvEtK3-rlAdbIpkm0PsyEasBY=";
    const SIG_STANDARD: &str = "CcN42sOGUj/woO7pB1DvEtK3+rlAdbIpkm0PsyEasBY=";

    fn now() -> i64 {
        parse_timestamp(TS).unwrap() + 10_000
    }

    fn params(sig: &str) -> SignedParams<'_> {
        SignedParams {
            key: Some("foo"),
            timestamp: Some(TS),
            seq: Some("1"),
            nonce: Some("123456"),
            signature: Some(sig),
        }
    }

    fn check(p: &SignedParams<'_>, body: &[u8], cache: &NonceCache) -> Result<(), SignatureError> {
        verify(p, body, "foo", &Secret::new("bar"), 300, now(), cache)
    }

    #[test]
    fn accepts_crossbars_signature_in_either_alphabet_once() {
        for sig in [SIG_URLSAFE, SIG_STANDARD, SIG_URLSAFE.trim_end_matches('=')] {
            let cache = NonceCache::default();
            assert_eq!(check(&params(sig), BODY, &cache), Ok(()));
            assert_eq!(
                check(&params(sig), BODY, &cache),
                Err(SignatureError::Replayed)
            );
        }
    }

    #[test]
    fn refuses_what_crossbar_refuses() {
        let cache = NonceCache::default();
        let mut body = BODY.to_vec();
        body[3] ^= 1;
        assert_eq!(
            check(&params(SIG_URLSAFE), &body, &cache),
            Err(SignatureError::BadSignature)
        );
        let p = SignedParams {
            key: Some("other"),
            ..params(SIG_URLSAFE)
        };
        assert_eq!(check(&p, BODY, &cache), Err(SignatureError::UnknownKey));
        let p = SignedParams {
            nonce: None,
            ..params(SIG_URLSAFE)
        };
        assert_eq!(
            check(&p, BODY, &cache),
            Err(SignatureError::Missing("nonce"))
        );
        let p = SignedParams {
            seq: Some("x"),
            ..params(SIG_URLSAFE)
        };
        assert!(matches!(
            check(&p, BODY, &cache),
            Err(SignatureError::NotAnInteger(..))
        ));
        let p = SignedParams {
            timestamp: Some("2011-10-14 16:59:51"),
            ..params(SIG_URLSAFE)
        };
        assert!(matches!(
            check(&p, BODY, &cache),
            Err(SignatureError::BadTimestamp(_))
        ));
        let late = parse_timestamp(TS).unwrap() + 301_000;
        let r = verify(
            &params(SIG_URLSAFE),
            BODY,
            "foo",
            &Secret::new("bar"),
            300,
            late,
            &cache,
        );
        assert_eq!(r, Err(SignatureError::Expired));
        // A refused request spent no nonce.
        assert_eq!(check(&params(SIG_URLSAFE), BODY, &cache), Ok(()));
    }

    #[test]
    fn timestamps_with_any_fraction() {
        let base = parse_timestamp("2011-10-14T16:59:51Z").unwrap();
        for (s, ms) in [
            ("2011-10-14T16:59:51.1Z", 100),
            ("2011-10-14T16:59:51.123Z", 123),
            ("2011-10-14T16:59:51.123456Z", 123),
            ("2011-10-14T16:59:51.123456789Z", 123),
        ] {
            assert_eq!(parse_timestamp(s), Some(base + ms), "{s}");
        }
        for bad in [
            "2011-10-14T16:59:51.123",
            "2011-10-14T16:59:51.123+01:00",
            "x",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn nonces_are_forgotten_after_their_window_and_bounded() {
        let cache = NonceCache::new(2);
        assert_eq!(cache.check_and_remember("1", 0, 1000), Ok(()));
        assert_eq!(cache.check_and_remember("2", 10, 1000), Ok(()));
        assert_eq!(
            cache.check_and_remember("3", 20, 1000),
            Err(SignatureError::NoncesFull)
        );
        assert_eq!(
            cache.check_and_remember("1", 999, 1000),
            Err(SignatureError::Replayed)
        );
        assert_eq!(cache.check_and_remember("1", 1000, 1000), Ok(()));
        assert_eq!(cache.check_and_remember("3", 1010, 1000), Ok(()));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any timestamp, key, sequence, nonce, signature, window and clock: a typed
        /// outcome, never a panic (no arithmetic on client values wraps).
        #[test]
        fn any_signed_request_is_handled(
            key in proptest::option::of(".{0,20}"),
            timestamp in proptest::option::of(prop_oneof![
                ".{0,40}",
                "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?Z",
            ]),
            seq in proptest::option::of("-?[0-9]{0,45}"),
            nonce in proptest::option::of("-?[0-9]{0,45}"),
            signature in proptest::option::of("[A-Za-z0-9+/=_-]{0,60}"),
            body in proptest::collection::vec(any::<u8>(), 0..64),
            window in any::<u64>(),
            now in any::<i64>(),
        ) {
            let params = SignedParams {
                key: key.as_deref(),
                timestamp: timestamp.as_deref(),
                seq: seq.as_deref(),
                nonce: nonce.as_deref(),
                signature: signature.as_deref(),
            };
            let nonces = NonceCache::new(16);
            let secret = Secret::new("pusher-secret");
            // Without the right signature nothing passes.
            prop_assert!(verify(&params, &body, "key", &secret, window, now, &nonces).is_err());
            let _ = parse_timestamp(timestamp.as_deref().unwrap_or_default());
        }
    }
}
