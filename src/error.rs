//! Errors: [`BackendError`] for one model call, [`Error`] for everything the crate returns.

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A boxed error that can cross threads.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What kind of failure a backend call met; decides whether it is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The server asked us to slow down (HTTP 429 without an exhausted quota). Retryable.
    RateLimited,
    /// The call took longer than allowed. Retryable.
    Timeout,
    /// The connection could not be made or broke. Retryable.
    Connection,
    /// The server failed (HTTP 5xx, overloaded). Retryable.
    Server,
    /// The response could not be understood (malformed JSON, missing fields). Retryable:
    /// proxies and overloaded servers produce these now and then.
    InvalidResponse,
    /// The key is missing, wrong or lacks permission (HTTP 401, 403). Permanent and fatal.
    Authentication,
    /// The account's quota or credit is exhausted. Permanent and fatal.
    QuotaExhausted,
    /// The model or endpoint does not exist (HTTP 404). Permanent and fatal.
    NotFound,
    /// The server rejected this request (HTTP 400, 413, 422: too long, bad parameter).
    /// Permanent for this request, but other requests may succeed.
    InvalidRequest,
    /// The provider's content filter refused or cut the answer. Permanent for this request.
    ContentFilter,
    /// The answer hit the token limit and is unusable as it is. Permanent for this request.
    Length,
    /// The backend itself failed in a way that will not change on retry (a local model that
    /// cannot run, a configuration error). Permanent and fatal.
    Backend,
    /// The server asked us to wait longer than the retry policy is willing to (an hourly or
    /// daily limit, a maintenance window): see
    /// [`RetryPolicy::max_retry_after`](crate::backend::RetryPolicy::max_retry_after). Not
    /// retried, and fatal: every later request would be told the same, so the run stops (rerun
    /// it later to resume) instead of failing every prompt in turn. Its
    /// [`retry_after`](BackendError::retry_after) is the wait the server asked for.
    ///
    /// A kind of its own rather than [`QuotaExhausted`](Self::QuotaExhausted): the account
    /// need not be out of anything (a `503` with `Retry-After: 3600` is a maintenance window).
    RetryAfterTooLong,
    /// Anything else. Permanent for this request.
    Other,
}

impl BackendErrorKind {
    /// Whether a call that failed this way may succeed if sent again.
    #[must_use]
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            BackendErrorKind::RateLimited
                | BackendErrorKind::Timeout
                | BackendErrorKind::Connection
                | BackendErrorKind::Server
                | BackendErrorKind::InvalidResponse
        )
    }

    /// Whether this failure will hit every later request too (bad key, no quota, no such
    /// model), so a run should stop at once rather than fail example after example.
    #[must_use]
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            BackendErrorKind::Authentication
                | BackendErrorKind::QuotaExhausted
                | BackendErrorKind::NotFound
                | BackendErrorKind::Backend
                | BackendErrorKind::RetryAfterTooLong
        )
    }

    /// A stable snake_case name, used in failure ledgers and summaries.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            BackendErrorKind::RateLimited => "rate_limited",
            BackendErrorKind::Timeout => "timeout",
            BackendErrorKind::Connection => "connection",
            BackendErrorKind::Server => "server",
            BackendErrorKind::InvalidResponse => "invalid_response",
            BackendErrorKind::Authentication => "authentication",
            BackendErrorKind::QuotaExhausted => "quota_exhausted",
            BackendErrorKind::NotFound => "not_found",
            BackendErrorKind::InvalidRequest => "invalid_request",
            BackendErrorKind::ContentFilter => "content_filter",
            BackendErrorKind::Length => "length",
            BackendErrorKind::Backend => "backend",
            BackendErrorKind::RetryAfterTooLong => "retry_after_too_long",
            BackendErrorKind::Other => "other",
        }
    }
}

impl fmt::Display for BackendErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed backend call: its kind, a message, the HTTP status and `Retry-After` where known.
///
/// The message is the server's own explanation where there is one; backends must never put a
/// key or other secret into it.
pub struct BackendError {
    kind: BackendErrorKind,
    message: String,
    status: Option<u16>,
    retry_after: Option<Duration>,
    source: Option<BoxError>,
}

impl BackendError {
    /// An error of this kind with this message.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            message: message.into(),
            status: None,
            retry_after: None,
            source: None,
        }
    }

    /// Records the HTTP status.
    #[must_use]
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Records how long the server asked us to wait before trying again.
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Records the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The kind of failure.
    #[must_use]
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }

    /// The message (without the kind or status).
    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status, for HTTP backends.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// How long the server asked us to wait, if it said.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether the call may succeed if sent again.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// Whether every later call will fail the same way (see [`BackendErrorKind::is_fatal`]).
    #[must_use]
    pub fn is_fatal(&self) -> bool {
        self.kind.is_fatal()
    }

    /// Shorthand for a [`BackendErrorKind::Timeout`] error.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(BackendErrorKind::Timeout, message)
    }

    /// Shorthand for a [`BackendErrorKind::RateLimited`] error.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(BackendErrorKind::RateLimited, message)
    }

    /// Shorthand for a [`BackendErrorKind::Server`] error.
    pub fn server(message: impl Into<String>) -> Self {
        Self::new(BackendErrorKind::Server, message)
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("BackendError");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(status) = self.status {
            d.field("status", &status);
        }
        if let Some(ra) = self.retry_after {
            d.field("retry_after", &ra);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(ra) = self.retry_after {
            write!(f, " (retry after {:.1}s)", ra.as_secs_f64())?;
        }
        Ok(())
    }
}

impl StdError for BackendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// Why the second (or first) response of an example could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UnusableReason {
    /// Nothing was left after parsing.
    Empty,
    /// The second response is the same as the first (after normalising white space and case).
    SameAsFirst,
    /// The second response differs from the first only in a few words: its token Jaccard
    /// similarity with the first is at or above the limit
    /// ([`ResponseChecks::max_similarity`](crate::template::ResponseChecks::max_similarity)).
    /// Such a pair carries no reliable preference.
    NearIdentical,
    /// The text repeats itself: too few of its word trigrams are distinct
    /// ([`ResponseChecks::min_distinct_trigrams`](crate::template::ResponseChecks::min_distinct_trigrams)).
    /// Small models stuck in a loop produce these.
    Repetitive,
    /// The text talks about the task ("here is a worse version") instead of answering.
    MetaTalk(String),
    /// The backend stopped for a reason that leaves no usable text.
    Truncated,
    /// A template-specific reason.
    Other(String),
}

impl fmt::Display for UnusableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnusableReason::Empty => f.write_str("empty response"),
            UnusableReason::SameAsFirst => f.write_str("second response identical to the first"),
            UnusableReason::NearIdentical => {
                f.write_str("second response nearly identical to the first")
            }
            UnusableReason::Repetitive => f.write_str("response repeats itself"),
            UnusableReason::MetaTalk(what) => write!(f, "meta-talk instead of a response: {what}"),
            UnusableReason::Truncated => f.write_str("response cut off before any usable text"),
            UnusableReason::Other(what) => f.write_str(what),
        }
    }
}

/// Everything that can go wrong in this crate.
///
/// Errors about one example carry its id ([`Error::example_id`]); reading errors carry the file
/// and line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A backend call for an example failed (after whatever retries its wrapper made).
    #[error("example {id}: {call} call failed")]
    Backend {
        /// The example's id.
        id: String,
        /// Which call failed (`"first"`, `"second"`, `"judge"`, ...).
        call: &'static str,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// The model's answers stayed unusable after every allowed re-ask.
    #[error("example {id}: no usable {call} response after {attempts} attempts (last: {reason})")]
    Unusable {
        /// The example's id.
        id: String,
        /// Which response (`"first"`, `"second"`, ...).
        call: &'static str,
        /// How many answers were tried.
        attempts: u32,
        /// Why the last one was rejected.
        reason: UnusableReason,
    },
    /// The builder or a configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of a JSONL file (or a JSON file, `line` 0 meaning the whole file) is invalid.
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        /// The file (or `<input>` for a stream without a name).
        path: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// What is wrong, naming the field where there is one.
        message: String,
    },
}

impl Error {
    /// The id of the example this error is about, if it is about one.
    #[must_use]
    pub fn example_id(&self) -> Option<&str> {
        match self {
            Error::Backend { id, .. } | Error::Unusable { id, .. } => Some(id),
            _ => None,
        }
    }

    /// Whether this error means the run cannot go on (a fatal backend error such as a bad key;
    /// see [`BackendErrorKind::is_fatal`]).
    #[must_use]
    pub fn is_fatal(&self) -> bool {
        match self {
            Error::Backend { source, .. } => source.is_fatal(),
            Error::Config(_) => true,
            _ => false,
        }
    }

    /// A stable snake_case name of the kind of failure, for ledgers and summaries.
    #[must_use]
    pub fn kind_str(&self) -> &'static str {
        match self {
            Error::Backend { source, .. } => source.kind().as_str(),
            Error::Unusable { .. } => "unusable",
            Error::Config(_) => "config",
            Error::Io { .. } => "io",
            Error::Parse { .. } => "parse",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(BackendErrorKind::RateLimited.is_retryable());
        assert!(BackendErrorKind::Server.is_retryable());
        assert!(!BackendErrorKind::Authentication.is_retryable());
        assert!(BackendErrorKind::Authentication.is_fatal());
        assert!(!BackendErrorKind::InvalidRequest.is_fatal());
        assert!(!BackendErrorKind::RateLimited.is_fatal());
        assert!(BackendErrorKind::RetryAfterTooLong.is_fatal());
        assert!(!BackendErrorKind::RetryAfterTooLong.is_retryable());
        assert_eq!(
            BackendErrorKind::RetryAfterTooLong.as_str(),
            "retry_after_too_long"
        );
    }

    #[test]
    fn display_and_source() {
        let e = BackendError::rate_limited("slow down")
            .with_status(429)
            .with_retry_after(Duration::from_secs(2));
        assert_eq!(
            e.to_string(),
            "rate_limited (HTTP 429): slow down (retry after 2.0s)"
        );
        let outer = Error::Backend {
            id: "a".into(),
            call: "first",
            source: e,
        };
        assert_eq!(outer.to_string(), "example a: first call failed");
        assert!(outer.source().is_some());
        assert_eq!(outer.example_id(), Some("a"));
        assert_eq!(outer.kind_str(), "rate_limited");
    }

    #[test]
    fn send_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Error>();
        assert_send_sync::<BackendError>();
    }
}
