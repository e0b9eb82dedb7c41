//! A configuration value that must never reach a log line.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret string from the config file: a token, a signing key or a password hash.
///
/// `Debug` and `Display` print `***`. A value of the form `env:NAME` is read from the
/// environment variable `NAME`, and `file:PATH` from a file (trailing newline removed),
/// which is how Kubernetes Secrets are mounted; [`Secret::resolve`] does that once at load.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a literal secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call sites are the few places that compare or sign with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Replaces an `env:NAME` or `file:PATH` reference by the value it points to.
    pub fn resolve(&self) -> Result<Secret, String> {
        if let Some(var) = self.0.strip_prefix("env:") {
            return std::env::var(var)
                .map(Secret)
                .map_err(|_| format!("environment variable `{var}` is not set"));
        }
        if let Some(path) = self.0.strip_prefix("file:") {
            return std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\r', '\n']).to_owned()))
                .map_err(|e| format!("cannot read secret file `{path}`: {e}"));
        }
        Ok(self.clone())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn resolves_file_references() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "s3cret\n").unwrap();
        let s = Secret::new(format!("file:{}", p.display()));
        assert_eq!(s.resolve().unwrap().expose(), "s3cret");
        assert!(Secret::new("file:/nonexistent/x").resolve().is_err());
        assert!(Secret::new("env:BROKER_TEST_SURELY_UNSET_VAR")
            .resolve()
            .is_err());
        assert_eq!(Secret::new("plain").resolve().unwrap().expose(), "plain");
    }
}
