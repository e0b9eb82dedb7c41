//! Session tokens: JWT HS256 minted by the application (or `broker token`).
//!
//! Claims: `sub` (the user, required), `exp` (required), and optional `queues` and
//! `publish` grant lists (names or `prefix.*` patterns). Without `queues`/`publish`, the
//! grants of the configured user of that name apply (none if there is no such user).
//! Several secrets verify (rotation); the first one signs.

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Secret;

/// The claims of a session token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Queues the session may subscribe to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<String>>,
    /// Queues the session may publish into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// No secret is configured (`ws.jwt_secrets`).
    NotConfigured,
    /// Signature, format or claims are wrong.
    Invalid,
    /// `exp` has passed.
    Expired,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenError::NotConfigured => "tokens are not enabled (ws.jwt_secrets is empty)",
            TokenError::Invalid => "invalid token",
            TokenError::Expired => "token expired",
        })
    }
}

/// Verifies a token against every secret; no clock leeway: a token is expired from the
/// start of its `exp` second (compared in milliseconds, not in whole seconds).
pub fn verify(token: &str, secrets: &[Secret]) -> Result<Claims, TokenError> {
    verify_at(token, secrets, crate::message::now_ms())
}

/// [`verify`] at `now_ms`.
pub fn verify_at(token: &str, secrets: &[Secret], now_ms: i64) -> Result<Claims, TokenError> {
    let claims = verify_signature(token, secrets)?;
    if claims.exp.saturating_mul(1000) <= now_ms {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

/// The claims of a token signed by one of `secrets`; `exp` is checked by the caller.
fn verify_signature(token: &str, secrets: &[Secret]) -> Result<Claims, TokenError> {
    if secrets.is_empty() {
        return Err(TokenError::NotConfigured);
    }
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.validate_exp = false;
    validation.leeway = 0;
    let mut outcome = TokenError::Invalid;
    for s in secrets {
        match jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_secret(s.expose().as_bytes()),
            &validation,
        ) {
            Ok(data) => return Ok(data.claims),
            // The signature matched this key; only the expiry is wrong.
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => {
                outcome = TokenError::Expired
            }
            Err(_) => {}
        }
    }
    Err(outcome)
}

/// Signs claims with a secret (HS256).
pub fn mint(claims: &Claims, secret: &Secret) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .expect("HS256 signing of serializable claims cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_expired_from_the_start_of_its_exp_second() {
        let secret = Secret::new("token-test-secret-0123456789");
        let claims = Claims {
            sub: "u".into(),
            exp: 1_000,
            iat: None,
            queues: None,
            publish: None,
        };
        let t = mint(&claims, &secret);
        let s = [secret];
        assert!(verify_at(&t, &s, 999_999).is_ok());
        assert_eq!(verify_at(&t, &s, 1_000_000), Err(TokenError::Expired));
        assert_eq!(
            verify_at(&t, &s, 1_000_060),
            Err(TokenError::Expired),
            "0.06 s past"
        );
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            sub: "alice".into(),
            exp,
            iat: None,
            queues: Some(vec!["chat.*".into()]),
            publish: None,
        }
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[test]
    fn roundtrip_rotation_and_expiry() {
        let old = Secret::new("old-secret-0123456789");
        let new = Secret::new("new-secret-0123456789");
        let c = claims(now() + 60);
        let t = mint(&c, &old);
        assert_eq!(verify(&t, &[new.clone(), old.clone()]), Ok(c));
        assert_eq!(verify(&t, &[new]), Err(TokenError::Invalid));
        let expired = mint(&claims(now() - 5), &old);
        assert_eq!(
            verify(&expired, std::slice::from_ref(&old)),
            Err(TokenError::Expired)
        );
        assert_eq!(verify("not.a.token", &[old]), Err(TokenError::Invalid));
        assert_eq!(verify(&t, &[]), Err(TokenError::NotConfigured));
    }

    #[test]
    fn token_signed_by_python_verifies() {
        // Built with the standard library only:
        // python3 -c 'import hmac,hashlib,base64,json;e=lambda b:base64.urlsafe_b64encode(b).rstrip(b"=");h=e(json.dumps({"alg":"HS256","typ":"JWT"},separators=(",",":")).encode());p=e(json.dumps({"sub":"bob","exp":4102444800,"queues":["q"]},separators=(",",":")).encode());print((h+b"."+p+b"."+e(hmac.new(b"python-secret-0123",h+b"."+p,hashlib.sha256).digest())).decode())'
        let t = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJib2IiLCJleHAiOjQxMDI0NDQ4MDAsInF1ZXVlcyI6WyJxIl19.gbMhz07AwB34HozqLp_cIoHUljf-9Npf5t-4GH1hqd4";
        let c = verify(t, &[Secret::new("python-secret-0123")]).unwrap();
        assert_eq!(
            (c.sub.as_str(), c.exp, c.queues),
            ("bob", 4102444800, Some(vec!["q".to_owned()]))
        );
        assert_eq!(
            verify(t, &[Secret::new("python-secret-0124")]),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn a_token_without_exp_is_refused() {
        #[derive(Serialize)]
        struct NoExp {
            sub: &'static str,
        }
        let s = Secret::new("some-secret-0123456789");
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &NoExp { sub: "x" },
            &EncodingKey::from_secret(s.expose().as_bytes()),
        )
        .unwrap();
        assert_eq!(verify(&t, &[s]), Err(TokenError::Invalid));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn secret() -> Secret {
        Secret::new("a-jwt-secret-of-enough-length-0123")
    }

    proptest! {
        /// Any text as a token: a typed refusal, never a panic.
        #[test]
        fn any_text_is_refused_cleanly(t in ".{0,300}", now in any::<i64>()) {
            prop_assert!(verify_at(&t, &[secret()], now).is_err());
        }

        /// A minted token verifies until its expiry, to the millisecond, and not after;
        /// any change to it is refused.
        #[test]
        fn minted_tokens_verify_until_expiry_and_not_when_altered(
            sub in "[a-z]{1,12}",
            exp in 1i64..4_000_000_000,
            before in 1i64..1_000_000,
            flip in any::<prop::sample::Index>(),
        ) {
            let claims = Claims { sub, exp, iat: None, queues: None, publish: None };
            let token = mint(&claims, &secret());
            let exp_ms = exp * 1000;
            prop_assert!(verify_at(&token, &[secret()], exp_ms - before).is_ok());
            prop_assert!(verify_at(&token, &[secret()], exp_ms).is_err());
            let mut bytes = token.into_bytes();
            let i = flip.index(bytes.len());
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).unwrap();
            prop_assert!(verify_at(&altered, &[secret()], exp_ms - before).is_err());
        }
    }
}
