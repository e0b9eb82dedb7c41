//! Comparing a presented secret with configured ones, in constant time.
//!
//! Both sides are reduced to SHA-256 digests first, so neither the content nor the
//! length of a secret leaks through timing, and every candidate is compared: the time
//! does not tell which one matched, or whether any did.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// The digest a secret is compared by (precompute it for secrets checked often).
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `given` matches one of the secrets whose digests are `digests`.
pub fn matches_digests(given: &str, digests: &[[u8; 32]]) -> bool {
    let got = digest(given);
    digests
        .iter()
        .fold(subtle::Choice::from(0), |acc, d| acc | d.ct_eq(&got))
        .into()
}

/// Whether `given` matches one of `secrets`.
pub fn matches_secrets<'a>(given: &str, secrets: impl IntoIterator<Item = &'a Secret>) -> bool {
    let digests: Vec<[u8; 32]> = secrets.into_iter().map(|s| digest(s.expose())).collect();
    matches_digests(given, &digests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_any_candidate_exactly() {
        let keys = [Secret::new("old-key"), Secret::new("new-key")];
        assert!(matches_secrets("new-key", &keys) && matches_secrets("old-key", &keys));
        assert!(!matches_secrets("new-ke", &keys) && !matches_secrets("new-key ", &keys));
        assert!(!matches_secrets("anything", &[]));
        assert!(matches_digests("x", &[digest("y"), digest("x")]));
    }
}
