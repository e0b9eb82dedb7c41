//! Random bytes from the operating system (ids, epochs, nonces, jitter).

use std::sync::Arc;

/// Fills `buf` from the OS random source.
pub fn fill(buf: &mut [u8]) {
    // The OS source failing is not something a broker can go on from.
    getrandom::fill(buf).expect("the operating system's random source failed");
}

/// A random 16-hex-digit id (queue epochs, connection ids).
pub fn id() -> Arc<str> {
    let mut b = [0u8; 8];
    fill(&mut b);
    hex::encode(b).into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_16_hex_digits_and_differ() {
        let (a, b) = (super::id(), super::id());
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
