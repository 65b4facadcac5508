//! Errors: [`BackendError`] for one model call, [`Error`] for everything the crate returns.

use std::error::Error as StdError;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// `Result<T, Error>`: what the crate's fallible functions return.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error that can cross threads.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A fieldless enum whose variants each have a stable name: `ALL` lists the
/// variants (crate-private unless the call starts with `pub ALL;`), `as_str` gives the name and
/// `Display` writes it. The caller gives the derives.
macro_rules! named_enum {
    ($(#[$attr:meta])* pub enum $($rest:tt)*) => {
        $crate::error::named_enum!(pub(crate) ALL; $(#[$attr])* pub enum $($rest)*);
    };
    ($all:vis ALL; $(#[$attr:meta])* pub enum $name:ident {
        $($(#[$vattr:meta])* $variant:ident = $text:literal,)*
    }) => {
        $(#[$attr])*
        pub enum $name {
            $($(#[$vattr])* $variant,)*
        }

        impl $name {
            /// Every variant, in a stable order (a slice, so that adding a variant breaks no
            /// one).
            #[allow(dead_code)]
            $all const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The stable name, as files, ledgers and summaries write it.
            #[must_use]
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use named_enum;

named_enum! {
/// What kind of failure a backend call met; decides whether it is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The server asked us to slow down (HTTP 429 without an exhausted quota). Retryable.
    RateLimited = "rate_limited",
    /// The call took longer than allowed. Retryable.
    Timeout = "timeout",
    /// The connection could not be made or broke. Retryable.
    Connection = "connection",
    /// The server failed (HTTP 5xx, overloaded). Retryable.
    Server = "server",
    /// The backend cannot answer now but may soon: busy, restarting, out of memory for the
    /// moment. Retryable; what [`BackendError::retryable`] makes.
    Unavailable = "unavailable",
    /// The response could not be understood (malformed JSON, missing fields). Retryable:
    /// proxies and overloaded servers produce these now and then.
    InvalidResponse = "invalid_response",
    /// The key is missing, wrong or lacks permission (HTTP 401, 403). Permanent and fatal.
    Authentication = "authentication",
    /// The account's quota or credit is exhausted. Permanent and fatal.
    QuotaExhausted = "quota_exhausted",
    /// The model or endpoint does not exist (HTTP 404). Permanent and fatal.
    NotFound = "not_found",
    /// The server rejected this request (HTTP 400, 413, 422: too long, bad parameter).
    /// Permanent for this request, but other requests may succeed.
    InvalidRequest = "invalid_request",
    /// The provider's content filter refused or cut the answer. Permanent for this request.
    ContentFilter = "content_filter",
    /// The answer hit the token limit and is unusable as it is. Permanent for this request.
    Length = "length",
    /// The backend itself failed in a way that will not change on retry (a local model that
    /// cannot run, a configuration error): the run stops. What [`BackendError::stops_run`]
    /// makes. Permanent and fatal.
    Fatal = "fatal",
    /// The server asked us to wait longer than the retry policy is willing to (an hourly or
    /// daily limit, a maintenance window): see `backend::RetryPolicy::max_retry_after`
    /// (feature `middleware`). Not retried, and fatal: every later request would be told the
    /// same, so the run stops (rerun it later to resume) instead of failing every prompt in
    /// turn. Its
    /// [`retry_after`](BackendError::retry_after) is the wait the server asked for.
    ///
    /// A kind of its own rather than [`QuotaExhausted`](Self::QuotaExhausted): the account
    /// need not be out of anything (a `503` with `Retry-After: 3600` is a maintenance window).
    RetryAfterTooLong = "retry_after_too_long",
    /// Anything else. Permanent for this request: the example fails, the run goes on. What
    /// [`BackendError::fails_example`] makes.
    Other = "other",
}
}

impl BackendErrorKind {
    /// Whether a call that failed this way may succeed if sent again.
    #[must_use]
    pub fn is_retryable(self) -> bool {
        use BackendErrorKind::*;
        matches!(
            self,
            RateLimited | Timeout | Connection | Server | Unavailable | InvalidResponse
        )
    }

    /// Whether this failure will hit every later request too (bad key, no quota, no such
    /// model), so a run should stop at once rather than fail example after example.
    #[must_use]
    pub fn is_fatal(self) -> bool {
        use BackendErrorKind::*;
        matches!(
            self,
            Authentication | QuotaExhausted | NotFound | Fatal | RetryAfterTooLong
        )
    }
}

/// A failed backend call: its kind, a message, the HTTP status and `Retry-After` where known.
///
/// The message is the server's own explanation where there is one; backends must never put a
/// key or other secret into it.
#[derive(Debug, thiserror::Error)]
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

    /// A failure worth sending the call again for (the backend is busy, restarting, out of
    /// memory for the moment): the retry wrapper retries it, and if it still fails the example
    /// fails and a rerun tries it again. Kind [`Unavailable`](BackendErrorKind::Unavailable).
    ///
    /// A backend author picks one of three by what the run should do: this,
    /// [`fails_example`](Self::fails_example) or [`stops_run`](Self::stops_run). The
    /// finer kinds ([`BackendError::new`]) decide the same three ways
    /// ([`is_retryable`](Self::is_retryable), [`is_fatal`](Self::is_fatal)).
    ///
    /// ```
    /// use rmboost::BackendError;
    ///
    /// assert!(BackendError::retryable("GPU busy").is_retryable());
    /// let e = BackendError::fails_example("prompt longer than the context");
    /// assert!(!e.is_retryable() && !e.is_fatal());
    /// assert!(BackendError::stops_run("model file missing").is_fatal());
    /// ```
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::new(BackendErrorKind::Unavailable, message)
    }

    /// A failure of this request alone that sending it again will not change (too long, a
    /// refusal): the example fails, the run goes on, and a rerun asks again. Kind
    /// [`Other`](BackendErrorKind::Other).
    pub fn fails_example(message: impl Into<String>) -> Self {
        Self::new(BackendErrorKind::Other, message)
    }

    /// A failure that every later call would meet too (no model, a bad setting, a key that
    /// does not work): the run stops at once, with nothing lost, and says why. Kind
    /// [`Fatal`](BackendErrorKind::Fatal).
    pub fn stops_run(message: impl Into<String>) -> Self {
        Self::new(BackendErrorKind::Fatal, message)
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

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        // A wait too long to make is in the message already.
        if let Some(ra) = self
            .retry_after
            .filter(|_| self.kind != BackendErrorKind::RetryAfterTooLong)
        {
            write!(f, " (retry after {:.1}s)", ra.as_secs_f64())?;
        }
        Ok(())
    }
}

/// Why the second (or first) response of an example could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum UnusableReason {
    /// Nothing was left after parsing.
    #[error("empty response")]
    Empty,
    /// The second response is the same as the first (after normalising white space and case).
    #[error("second response identical to the first")]
    SameAsFirst,
    /// The second response differs from the first only in a few words: its token Jaccard
    /// similarity with the first is at or above the limit
    /// ([`ResponseChecks::max_similarity`](crate::checks::ResponseChecks::max_similarity)).
    /// Such a pair carries no reliable preference.
    #[error("second response nearly identical to the first")]
    NearIdentical,
    /// The text repeats itself: too few of its word trigrams are distinct
    /// ([`ResponseChecks::min_distinct_trigrams`](crate::checks::ResponseChecks::min_distinct_trigrams)).
    /// Small models stuck in a loop produce these.
    #[error("response repeats itself")]
    Repetitive,
    /// The text talks about the task ("here is a worse version") instead of answering.
    #[error("meta-talk instead of a response: {0}")]
    MetaTalk(String),
    /// The backend stopped for a reason that leaves no usable text.
    #[error("response cut off before any usable text")]
    Truncated,
    /// A template-specific reason.
    #[error("{0}")]
    Other(String),
}

named_enum! {
/// What kind of failure an [`Error`] is; see [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A backend call for an example failed (after whatever retries its wrapper made); the
    /// [`BackendError`] is [`Error::backend_error`].
    Backend = "backend",
    /// The model's answers stayed unusable after every allowed re-ask; the last reason is
    /// [`Error::unusable_reason`].
    Unusable = "unusable",
    /// The builder, a flag or a configuration value is invalid, or a run's settings do not
    /// match the output it would append to.
    Config = "config",
    /// A file could not be read or written ([`Error::path`] names it; the operating system's
    /// error is the [`source`](std::error::Error::source)).
    Io = "io",
    /// A line of a JSONL file (or a JSON file) is invalid ([`Error::path`] and
    /// [`Error::line`] name it).
    Parse = "parse",
    /// The in-process model could not be found, fetched, loaded or started (feature `local`);
    /// the message lists what was tried and how to fix it.
    Model = "model",
}
}

/// Everything that can go wrong in this crate.
///
/// Opaque, like `std::io::Error`: [`kind`](Self::kind) says what happened, predicates
/// ([`is_fatal`](Self::is_fatal), [`is_retryable`](Self::is_retryable)) say what to do, and
/// accessors give the details ([`example_id`](Self::example_id), [`path`](Self::path),
/// [`line`](Self::line), [`backend_error`](Self::backend_error)). `Display` describes only this
/// layer; the cause (a [`BackendError`], an I/O error) is the
/// [`source`](std::error::Error::source), and [`error_chain`] prints the whole chain on one
/// line.
///
/// ```
/// use rmboost::{error_chain, Error, ErrorKind};
///
/// let e = Error::io("pairs.jsonl", std::io::Error::other("disk full"));
/// assert_eq!(e.kind(), ErrorKind::Io);
/// assert_eq!(e.to_string(), "i/o error on pairs.jsonl");
/// assert_eq!(error_chain(&e), "i/o error on pairs.jsonl: disk full");
/// ```
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(Box<Repr>);

/// What an [`Error`] holds, by kind: its `Display` describes this layer only, and its cause is
/// the `source`.
#[derive(Debug, thiserror::Error)]
enum Repr {
    /// The example's id, the call's name (`"first"`, `"second"`, `"judge"`, ...), the error.
    #[error("example {0}: {1} call failed")]
    Backend(String, &'static str, #[source] BackendError),
    /// The example's id, the call's name, the answers tried, why the last was rejected.
    #[error("example {0}: no usable {1} response after {2} attempts (last: {3})")]
    Unusable(String, &'static str, u32, UnusableReason),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("i/o error on {}", .0.display())]
    Io(PathBuf, #[source] std::io::Error),
    /// The file, the line (0: the whole file), what is wrong.
    #[error("{path}:{1}: {2}", path = .0.display())]
    Parse(PathBuf, u64, String),
    #[error("local model: {0}")]
    Model(String, #[source] Option<BoxError>),
}

impl Error {
    /// A failed backend call for example `id`; `call` names it (`"first"`, `"second"`,
    /// `"judge"`, ...).
    pub fn backend(id: impl Into<String>, call: &'static str, source: BackendError) -> Self {
        Error(Box::new(Repr::Backend(id.into(), call, source)))
    }

    /// No usable answer for `call` of example `id` after `attempts` answers; `reason` is why
    /// the last was rejected.
    pub fn unusable(
        id: impl Into<String>,
        call: &'static str,
        attempts: u32,
        reason: UnusableReason,
    ) -> Self {
        Error(Box::new(Repr::Unusable(id.into(), call, attempts, reason)))
    }

    /// An invalid setting; the message names it.
    pub fn config(message: impl Into<String>) -> Self {
        Error(Box::new(Repr::Config(message.into())))
    }

    /// A failed read or write of `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error(Box::new(Repr::Io(path.into(), source)))
    }

    /// An invalid line `line` (1-based; 0 for a whole JSON file) of `path`; the message says
    /// what is wrong, naming the field where there is one.
    pub fn parse(path: impl Into<PathBuf>, line: u64, message: impl Into<String>) -> Self {
        Error(Box::new(Repr::Parse(path.into(), line, message.into())))
    }

    /// The in-process model could not be had: `message` says what (several lines are fine,
    /// [`error_chain`] puts them on one), `source` why, where there is a cause.
    #[cfg_attr(not(feature = "local"), allow(dead_code))]
    pub(crate) fn model(message: impl Into<String>, source: Option<BoxError>) -> Self {
        Error(Box::new(Repr::Model(message.into(), source)))
    }

    /// What kind of failure this is.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match &*self.0 {
            Repr::Backend(..) => ErrorKind::Backend,
            Repr::Unusable(..) => ErrorKind::Unusable,
            Repr::Config(_) => ErrorKind::Config,
            Repr::Io(..) => ErrorKind::Io,
            Repr::Parse(..) => ErrorKind::Parse,
            Repr::Model(..) => ErrorKind::Model,
        }
    }

    /// The id of the example this error is about, if it is about one.
    #[must_use]
    pub fn example_id(&self) -> Option<&str> {
        self.example_call().map(|(id, _)| id)
    }

    /// Which call failed (`"first"`, `"second"`, `"judge"`, ...), for backend and unusable
    /// errors.
    #[must_use]
    pub fn call(&self) -> Option<&'static str> {
        self.example_call().map(|(_, call)| call)
    }

    fn example_call(&self) -> Option<(&str, &'static str)> {
        match &*self.0 {
            Repr::Backend(id, call, _) | Repr::Unusable(id, call, ..) => Some((id, call)),
            _ => None,
        }
    }

    /// The backend's error, for a [`ErrorKind::Backend`] error.
    #[must_use]
    pub fn backend_error(&self) -> Option<&BackendError> {
        match &*self.0 {
            Repr::Backend(.., source) => Some(source),
            _ => None,
        }
    }

    /// Why the last answer was rejected, for an [`ErrorKind::Unusable`] error.
    #[must_use]
    pub fn unusable_reason(&self) -> Option<&UnusableReason> {
        match &*self.0 {
            Repr::Unusable(.., reason) => Some(reason),
            _ => None,
        }
    }

    /// The file, for I/O and parse errors.
    #[must_use]
    pub fn path(&self) -> Option<&std::path::Path> {
        match &*self.0 {
            Repr::Io(path, _) | Repr::Parse(path, ..) => Some(path),
            _ => None,
        }
    }

    /// The 1-based line, for parse errors (0: the whole file).
    #[must_use]
    pub fn line(&self) -> Option<u64> {
        match &*self.0 {
            Repr::Parse(_, line, _) => Some(*line),
            _ => None,
        }
    }

    /// The operating system's error, for I/O errors.
    #[must_use]
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match &*self.0 {
            Repr::Io(_, source) => Some(source),
            _ => None,
        }
    }

    /// Whether this error means the run cannot go on: a fatal backend error (a bad key, an
    /// exhausted quota, a missing model; see [`BackendErrorKind::is_fatal`]) or an invalid
    /// configuration.
    #[must_use]
    pub fn is_fatal(&self) -> bool {
        match &*self.0 {
            Repr::Backend(.., source) => source.is_fatal(),
            Repr::Config(_) | Repr::Model(..) => true,
            _ => false,
        }
    }

    /// Whether the same work may succeed if tried again later: true for a retryable backend
    /// error (a timeout, a 429, a 5xx after the retry wrapper gave up: a rerun tries again).
    ///
    /// A failure is one of three classes: *fatal* ([`is_fatal`](Self::is_fatal): the run
    /// stops), *retryable* (this: the example fails now, a rerun may make it), or neither (an
    /// invalid request, a content filter, or an unusable answer, [`ErrorKind::Unusable`]: the
    /// example fails and the run goes on; a rerun asks again with the same seeds, through the
    /// cache, so only a changed model or template helps). This returns `false` for the third
    /// class.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        self.backend_error().is_some_and(BackendError::is_retryable)
    }

    /// A stable snake_case name of the kind of failure, for ledgers and summaries: the
    /// [`BackendErrorKind`] name for backend errors, else the [`ErrorKind`] name.
    #[must_use]
    pub fn kind_str(&self) -> &'static str {
        self.backend_error()
            .map_or(self.kind().as_str(), |b| b.kind().as_str())
    }
}

/// An error and its causes on one line: `outer: cause: root cause`, skipping a cause whose
/// text the outer message already contains, with line breaks (a server's message may have
/// some) turned into spaces.
///
/// ```
/// use rmboost::{error_chain, BackendError, Error};
///
/// let e = Error::backend("q1", "first", BackendError::server("overloaded").with_status(503));
/// assert_eq!(
///     error_chain(&e),
///     "example q1: first call failed: server (HTTP 503): overloaded"
/// );
/// ```
#[must_use]
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_once_with_its_own_name() {
        let names: std::collections::HashSet<&str> =
            BackendErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), BackendErrorKind::ALL.len());
        // This match has no `_` arm (inside the crate `#[non_exhaustive]` does not ask for
        // one), so a new kind does not compile until it is listed here, and the count below
        // then fails until it is in ALL too.
        for k in BackendErrorKind::ALL {
            let listed = match k {
                BackendErrorKind::RateLimited
                | BackendErrorKind::Timeout
                | BackendErrorKind::Connection
                | BackendErrorKind::Server
                | BackendErrorKind::Unavailable
                | BackendErrorKind::InvalidResponse
                | BackendErrorKind::Authentication
                | BackendErrorKind::QuotaExhausted
                | BackendErrorKind::NotFound
                | BackendErrorKind::InvalidRequest
                | BackendErrorKind::ContentFilter
                | BackendErrorKind::Length
                | BackendErrorKind::Fatal
                | BackendErrorKind::RetryAfterTooLong
                | BackendErrorKind::Other => true,
            };
            assert!(listed);
        }
        assert_eq!(BackendErrorKind::ALL.len(), 15);
    }

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
        let outer = Error::backend("a", "first", e);
        assert_eq!(outer.to_string(), "example a: first call failed");
        assert!(outer.source().is_some());
        assert_eq!(outer.example_id(), Some("a"));
        assert_eq!(outer.kind_str(), "rate_limited");
    }

    #[test]
    fn send_sync_and_small() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Error>();
        assert_send_sync::<BackendError>();
        // One pointer: a `Result<T, Error>` costs no more than the `T` and a word.
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn display_is_one_layer() {
        let io = Error::io("out.jsonl", std::io::Error::other("disk full"));
        assert_eq!(io.to_string(), "i/o error on out.jsonl");
        assert_eq!(io.source().unwrap().to_string(), "disk full");
        assert_eq!(error_chain(&io), "i/o error on out.jsonl: disk full");
        assert!(!io.is_fatal() && !io.is_retryable());
        let parse = Error::parse("in.jsonl", 3, "missing field `prompt`");
        assert_eq!(parse.to_string(), "in.jsonl:3: missing field `prompt`");
        assert_eq!((parse.kind(), parse.line()), (ErrorKind::Parse, Some(3)));
        assert!(parse.source().is_none());
        let un = Error::unusable("q", "second", 4, UnusableReason::Empty);
        assert_eq!(
            un.to_string(),
            "example q: no usable second response after 4 attempts (last: empty response)"
        );
        assert_eq!(un.kind_str(), "unusable");
        assert!(Error::config("x").is_fatal());
        let retry = Error::backend("q", "first", BackendError::server("down"));
        assert!(retry.is_retryable() && !retry.is_fatal());
        assert_eq!(
            retry.backend_error().unwrap().kind(),
            BackendErrorKind::Server
        );
    }
}
