//! User passwords: argon2id (what we write) and webhook-queue's `sha512;SALT;HEX` and
//! `plain;;PASSWORD` (accepted, with a warning at load).
//!
//! Argon2 verification costs tens of milliseconds of CPU by design, and poll clients
//! authenticate on every request; [`CredentialCache`] remembers successful logins for a
//! short time, keyed by a keyed hash of user and password (never the password).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// How long a verified login is remembered.
const CACHE_TTL: Duration = Duration::from_secs(300);
/// Most remembered logins; the cache is emptied when full.
const CACHE_CAPACITY: usize = 10_000;

/// A parsed `pass_hash`.
#[derive(Clone)]
pub enum PasswordHash {
    /// A PHC string, `$argon2id$v=19$…`.
    Argon2(Secret),
    /// webhook-queue: lowercase hex of SHA-256/512(password ‖ salt).
    Salted {
        /// `sha256` or `sha512`.
        sha512: bool,
        /// The salt as written.
        salt: String,
        /// The digest.
        digest: Vec<u8>,
    },
    /// webhook-queue's bootstrap format: the password itself.
    Plain(Secret),
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PasswordHash::Argon2(_) => "argon2",
            PasswordHash::Salted { sha512: true, .. } => "sha512",
            PasswordHash::Salted { .. } => "sha256",
            PasswordHash::Plain(_) => "plain",
        })
    }
}

impl PasswordHash {
    /// Parses a `pass_hash` value; the error says what formats exist.
    pub fn parse(s: &Secret) -> Result<Self, String> {
        let raw = s.expose();
        if raw.starts_with("$argon2") {
            argon2::PasswordHash::new(raw)
                .map_err(|e| format!("not a valid argon2 PHC string: {e}"))?;
            return Ok(PasswordHash::Argon2(s.clone()));
        }
        let parts: Vec<&str> = raw.splitn(3, ';').collect();
        match parts.as_slice() {
            ["plain", "", pw] => Ok(PasswordHash::Plain(Secret::new(*pw))),
            [algo @ ("sha256" | "sha512"), salt, hex] => Ok(PasswordHash::Salted {
                sha512: *algo == "sha512",
                salt: (*salt).to_owned(),
                digest: hex::decode(hex).map_err(|_| "the digest is not hex".to_owned())?,
            }),
            _ => Err("expected an argon2id PHC string (`broker hash-password`), \
                 `sha512;SALT;HEX` or `plain;;PASSWORD`"
                .to_owned()),
        }
    }

    /// Whether this format should be replaced (a warning is logged at load).
    pub fn is_weak(&self) -> bool {
        !matches!(self, PasswordHash::Argon2(_))
    }

    /// Checks a password. CPU-heavy for argon2: call it off the async workers.
    pub fn verify(&self, password: &str) -> bool {
        match self {
            PasswordHash::Argon2(phc) => Argon2::default()
                .verify_password(password.as_bytes(), phc.expose())
                .is_ok(),
            PasswordHash::Salted {
                sha512,
                salt,
                digest,
            } => {
                let got = if *sha512 {
                    Sha512::new()
                        .chain_update(password)
                        .chain_update(salt)
                        .finalize()
                        .to_vec()
                } else {
                    Sha256::new()
                        .chain_update(password)
                        .chain_update(salt)
                        .finalize()
                        .to_vec()
                };
                bool::from(got.ct_eq(digest))
            }
            PasswordHash::Plain(pw) => super::secrets::matches_secrets(password, [pw]),
        }
    }
}

/// Hashes a new password with argon2id and default parameters; returns the PHC string.
pub fn hash_password(password: &str) -> String {
    Argon2::default()
        .hash_password(password.as_bytes())
        .expect("argon2 with default parameters and a system RNG cannot fail")
        .to_string()
}

/// Remembers recently verified logins so that polling does not pay argon2 every time.
pub struct CredentialCache {
    key: [u8; 32],
    entries: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Default for CredentialCache {
    fn default() -> Self {
        let mut key = [0u8; 32];
        crate::random::fill(&mut key);
        Self {
            key,
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl CredentialCache {
    fn fingerprint(&self, user: &str, password: &str) -> [u8; 32] {
        let mac = super::ingest::compute_mac(
            super::ingest::HmacAlgo::Sha256,
            &self.key,
            &[user.as_bytes(), b"\0", password.as_bytes()],
        );
        mac.try_into().expect("SHA-256 output is 32 bytes")
    }

    /// Whether this user logged in with this password recently.
    pub fn contains(&self, user: &str, password: &str) -> bool {
        let fp = self.fingerprint(user, password);
        let entries = self.entries.lock().expect("cache lock");
        entries.get(&fp).is_some_and(|t| t.elapsed() < CACHE_TTL)
    }

    /// Records a successful login.
    pub fn insert(&self, user: &str, password: &str) {
        let fp = self.fingerprint(user, password);
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= CACHE_CAPACITY {
            entries.clear();
        }
        entries.insert(fp, Instant::now());
    }

    /// Forgets everything (after a reload or a password change).
    pub fn clear(&self) {
        self.entries.lock().expect("cache lock").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_queue_sha512_vector_from_python() {
        // python3 -c 'import hashlib;print("sha512;5551212;"+hashlib.sha512(b"insecure5551212").hexdigest())'
        let h = PasswordHash::parse(&Secret::new("sha512;5551212;226c6977e15f682ead2e12e9f10200d5d958c5fd6bf27ce25933895249d07238a9145e374c76d1d1de130b5113855cdafd79df979253e5c7470d815d0079564c")).unwrap();
        assert!(h.verify("insecure"));
        assert!(!h.verify("insecure5551212"));
        assert!(h.is_weak());
    }

    #[test]
    fn plain_and_argon2() {
        let p = PasswordHash::parse(&Secret::new("plain;;insecure")).unwrap();
        assert!(p.verify("insecure") && !p.verify("Insecure"));
        let phc = hash_password("correct horse");
        assert!(phc.starts_with("$argon2id$"));
        let a = PasswordHash::parse(&Secret::new(phc)).unwrap();
        assert!(a.verify("correct horse") && !a.verify("wrong horse"));
        assert!(!a.is_weak());
        assert!(PasswordHash::parse(&Secret::new("md5;;x")).is_err());
        assert!(PasswordHash::parse(&Secret::new("$argon2id$garbage")).is_err());
    }

    #[test]
    fn cache_is_keyed_by_user_and_password() {
        let c = CredentialCache::default();
        c.insert("a", "pw");
        assert!(c.contains("a", "pw"));
        assert!(!c.contains("a", "pw2") && !c.contains("b", "pw"));
        c.clear();
        assert!(!c.contains("a", "pw"));
    }
}
