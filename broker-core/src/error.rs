//! The one error type of broker-core. Each error gets its public code here
//! ([`Error::code`]); broker-http maps codes to statuses in one table, broker-ws sends the
//! same codes (native) or maps them to WAMP URIs in one table.

use std::fmt;

/// A configuration problem at one key (`queues[0].auth.method`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// Dotted path of the offending key; empty for the document itself.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Why an ingest request was refused; also the `reason` label of `broker_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No queue of that name or pattern.
    UnknownQueue,
    /// Client address outside `allow_ips`.
    IpNotAllowed,
    /// The credential or signature header is absent or malformed.
    MissingCredentials,
    /// The secret or signature does not match.
    InvalidSignature,
    /// A signed timestamp outside the tolerance window.
    StaleTimestamp,
    /// Request body over `server.max_body_size` (not read).
    BodyTooLarge,
    /// Message over the queue's `max_message_size`.
    MessageTooLarge,
    /// Body is not valid JSON on a `content_type = "json"` queue, or a malformed batch.
    InvalidBody,
    /// The queue holds `max_delayed_messages` already.
    TooManyDelayed,
    /// The session may not publish into that queue (its grants).
    NotGranted,
    /// A delay longer than `limits.max_delay`, or a time that cannot be computed.
    DelayTooLong,
    /// A message header or content type the broker will not keep (not a token, the
    /// broker's own `x-broker-*`, control characters).
    InvalidHeader,
    /// A signed request received already, within its tolerance window.
    Replayed,
    /// Creating another queue from a pattern would pass `limits.max_queues` or the
    /// pattern's `max_queues`.
    TooManyQueues,
    /// A publish with the same idempotency key is still being stored.
    IdempotencyKeyInUse,
}

impl Rejection {
    /// Every reason (for tables that must cover them all).
    pub const ALL: [Rejection; 15] = [
        Rejection::UnknownQueue,
        Rejection::IpNotAllowed,
        Rejection::MissingCredentials,
        Rejection::InvalidSignature,
        Rejection::StaleTimestamp,
        Rejection::BodyTooLarge,
        Rejection::MessageTooLarge,
        Rejection::InvalidBody,
        Rejection::TooManyDelayed,
        Rejection::NotGranted,
        Rejection::DelayTooLong,
        Rejection::InvalidHeader,
        Rejection::Replayed,
        Rejection::TooManyQueues,
        Rejection::IdempotencyKeyInUse,
    ];

    /// The metric label and the error `code`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::UnknownQueue => "unknown_queue",
            Rejection::IpNotAllowed => "ip_not_allowed",
            Rejection::MissingCredentials => "missing_credentials",
            Rejection::InvalidSignature => "invalid_signature",
            Rejection::StaleTimestamp => "stale_timestamp",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::MessageTooLarge => "message_too_large",
            Rejection::InvalidBody => "invalid_body",
            Rejection::TooManyDelayed => "too_many_delayed",
            Rejection::NotGranted => "not_granted",
            Rejection::DelayTooLong => "delay_too_long",
            Rejection::InvalidHeader => "invalid_header",
            Rejection::Replayed => "replayed",
            Rejection::TooManyQueues => "too_many_queues",
            Rejection::IdempotencyKeyInUse => "idempotency_key_in_use",
        }
    }
}

/// Everything that can go wrong in broker-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read or written.
    #[error("config file {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        message: String,
    },
    /// The config file is not valid TOML/JSON/YAML.
    #[error("config does not parse: {0}")]
    Parse(String),
    /// One or more keys have bad values.
    #[error("invalid config:{}", .0.iter().map(|k| format!("\n  {k}")).collect::<String>())]
    Invalid(Vec<KeyError>),
    /// The config cannot be rewritten (setPassword).
    #[error("config is not writable: {0}")]
    NotWritable(String),
    /// An ingest request was refused.
    #[error("{message}")]
    Rejected {
        /// Why.
        reason: Rejection,
        /// Human explanation.
        message: String,
    },
    /// No queue of that name.
    #[error("unknown queue `{queue}`")]
    UnknownQueue {
        /// The name asked for.
        queue: String,
    },
    /// A reader asked for a position the queue no longer has (or never had).
    #[error("position {since} of queue `{queue}` is not available (epoch {epoch}, newest offset {offset})")]
    UnrecoverablePosition {
        /// The queue.
        queue: String,
        /// What was asked for.
        since: u64,
        /// The queue's newest offset.
        offset: u64,
        /// The queue's epoch.
        epoch: String,
    },
    /// A poll consumer missed messages; its cursor now points at the newest one.
    #[error("{reason}")]
    Refresh {
        /// The queue.
        queue: String,
        /// Why (webhook-queue's wording).
        reason: String,
        /// The newest offset, where the cursor now is.
        offset: u64,
        /// The queue's epoch.
        epoch: String,
    },
    /// No poll consumer of that name for this user.
    #[error("no client `{client}`")]
    ClientNotFound {
        /// The client name.
        client: String,
    },
    /// A consumer of that name exists already.
    #[error("client `{client}` is already listening to queue `{queue}`")]
    ClientExists {
        /// The client name.
        client: String,
        /// Its queue.
        queue: String,
    },
    /// A reload removed the consumer's queue or its grant.
    #[error("that client has been disconnected because: {reason}")]
    ClientDisconnected {
        /// The client name.
        client: String,
        /// Why.
        reason: String,
    },
    /// A redrive found nothing to republish.
    #[error("queue `{queue}` holds no dead letters after offset {since} (not redriven yet)")]
    NoDeadLetters {
        /// The queue.
        queue: String,
        /// Where the redrive started.
        since: u64,
    },
    /// A redrive stopped at an error: what it did before, and why it stopped.
    #[error(
        "redrive stopped after {redriven} message(s), at dead-letter offset {offset}: {cause}"
    )]
    RedriveStopped {
        /// Dead letters republished before the error.
        redriven: usize,
        /// The last dead-letter offset handled (pass it as `since` to go on).
        offset: u64,
        /// What stopped it.
        cause: Box<Error>,
    },
    /// A runtime definition would pass a quota (`limits.max_runtime_*`).
    #[error("at most {max} {what} may be defined at runtime (limits.max_runtime_{what})")]
    TooManyDefinitions {
        /// `queues`, `targets` or `crons`.
        what: &'static str,
        /// The quota.
        max: usize,
    },
    /// A webhook target defined at runtime points at an internal address.
    #[error("{0}")]
    TargetNotAllowed(String),
    /// Unknown user or wrong password.
    #[error("Unrecognized login")]
    BadLogin,
    /// Too many logins to check from this address or for this user name, or in all.
    #[error("too many login attempts; retry in {retry_after_secs} s")]
    TooManyLogins {
        /// When to try again, in whole seconds (`Retry-After`).
        retry_after_secs: u64,
    },
    /// The user may not read that queue.
    #[error("user may not read queue `{queue}`")]
    NotGranted {
        /// The queue.
        queue: String,
    },
    /// The user may not reload the configuration.
    #[error("User does not have reload permissions")]
    ReloadNotAllowed,
    /// A new password under the minimum length.
    #[error("Password must be at least {min} characters long")]
    PasswordTooShort {
        /// The minimum.
        min: usize,
    },
    /// A user already has `ws.max_connections_per_user` connections.
    #[error("user `{user}` has too many connections (at most {max})")]
    TooManyConnections {
        /// The user.
        user: String,
        /// The limit.
        max: usize,
    },
    /// No live connection with that id.
    #[error("no connection `{id}`")]
    UnknownConnection {
        /// The id asked for.
        id: String,
    },
    /// A queue or cron defined in the config file cannot be changed through the API.
    #[error("`{name}` is defined in the config file: change it there and reload")]
    DefinedInConfig {
        /// The name.
        name: String,
    },
    /// Something of that name exists already.
    #[error("`{name}` exists already")]
    Exists {
        /// The name.
        name: String,
    },
    /// No cron of that name.
    #[error("no cron `{name}`")]
    UnknownCron {
        /// The name.
        name: String,
    },
    /// The store could not take or give data.
    #[error("store unavailable: {0}")]
    Store(String),
    /// An actor is gone (shutting down).
    #[error("broker is shutting down")]
    ShuttingDown,
    /// The broker could not set itself up (e.g. its HTTP client for webhooks).
    #[error("cannot start: {0}")]
    Startup(String),
}

impl Error {
    /// The error's public `code` (snake_case), the same on every protocol: the `code` of
    /// HTTP error bodies and of native WebSocket `error` events. Assigned here, once;
    /// each protocol maps codes to its own statuses or URIs in one table.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Rejected { reason, .. } => reason.as_str(),
            Error::RedriveStopped { cause, .. } => cause.code(),
            Error::NoDeadLetters { .. } => "no_dead_letters",
            Error::UnknownQueue { .. } => "unknown_queue",
            Error::UnrecoverablePosition { .. } => "unrecoverable_position",
            Error::Refresh { .. } => "refresh",
            Error::ClientNotFound { .. } => "unknown_client",
            Error::ClientExists { .. } => "client_exists",
            Error::ClientDisconnected { .. } => "client_disconnected",
            Error::BadLogin => "bad_login",
            Error::TooManyDefinitions { .. } => "too_many_definitions",
            Error::TargetNotAllowed(_) => "target_not_allowed",
            Error::TooManyLogins { .. } => "too_many_logins",
            Error::NotGranted { .. } => "not_granted",
            Error::ReloadNotAllowed => "reload_not_allowed",
            Error::PasswordTooShort { .. } => "password_too_short",
            Error::NotWritable(_) => "config_not_writable",
            Error::Io { .. } | Error::Parse(_) | Error::Invalid(_) => "invalid_config",
            Error::TooManyConnections { .. } => "too_many_connections",
            Error::UnknownConnection { .. } => "unknown_connection",
            Error::DefinedInConfig { .. } => "defined_in_config",
            Error::Exists { .. } => "exists",
            Error::UnknownCron { .. } => "unknown_cron",
            Error::Store(_) => "store_unavailable",
            Error::ShuttingDown => "shutting_down",
            Error::Startup(_) => "internal",
        }
    }

    /// Whether the reader must start over (`refresh: true` in error bodies).
    pub fn refresh(&self) -> bool {
        matches!(
            self,
            Error::UnrecoverablePosition { .. } | Error::Refresh { .. }
        )
    }

    /// Shorthand for an ingest rejection.
    pub fn rejected(reason: Rejection, message: impl Into<String>) -> Self {
        Error::Rejected {
            reason,
            message: message.into(),
        }
    }
}

impl From<actix::MailboxError> for Error {
    fn from(_: actix::MailboxError) -> Self {
        Error::ShuttingDown
    }
}
