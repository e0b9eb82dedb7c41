//! Authentication: ingest verifiers (who may publish), user passwords (who may read),
//! and the client address behind trusted proxies.

pub mod client_ip;
pub mod crossbar;
pub mod ingest;
pub mod login;
pub mod password;
pub mod secrets;
pub mod token;

pub use client_ip::{client_ip, parse_nets};
pub use ingest::{sign_hex, standard_webhooks_key, HmacAlgo, IngestAuth};
pub use password::{hash_password, CredentialCache, PasswordHash};
