//! [`Retry`]: retries failed calls of any backend with exponential backoff and full jitter.
//!
//! Only errors whose [`is_retryable`](BackendError::is_retryable) is true are retried (rate
//! limits, timeouts, connection failures, server errors, malformed responses); permanent errors
//! (a bad key, an exhausted quota, an invalid request) come back at once. A `Retry-After` the
//! server sent ([`BackendError::retry_after`]) is a floor for the wait. The number of attempts
//! and the total time spent (calls and waits together) are both bounded.
//!
//! A `Retry-After` longer than the policy will ever wait
//! ([`RetryPolicy::max_retry_after`], default 120 s, and never more than
//! [`max_elapsed`](RetryPolicy::max_elapsed)) is not slept on: the call fails at once with a
//! fatal [`RetryAfterTooLong`](BackendErrorKind::RetryAfterTooLong) error ("the server asks
//! to wait longer than the retry policy waits (120 s)", the server's error with its wait as
//! the source), so a run stops with that message rather than failing every prompt in turn
//! against an hourly or daily limit.
//!
//! ```
//! use std::num::NonZeroU32;
//! use std::time::Duration;
//! use rmboost::backend::retry::{Retry, RetryPolicy};
//! # use rmboost::{async_trait, BackendError, Completion, CompletionRequest, LlmBackend};
//! # #[derive(Debug)] struct MyBackend;
//! # #[async_trait] impl LlmBackend for MyBackend {
//! #     async fn complete(&self, _: CompletionRequest) -> Result<Completion, BackendError> {
//! #         Ok(Completion::new("hi"))
//! #     }
//! # }
//!
//! let policy = RetryPolicy::default()
//!     .max_attempts(NonZeroU32::new(4).unwrap())
//!     .initial_delay(Duration::from_millis(250))
//!     .max_elapsed(Some(Duration::from_secs(60)));
//! let backend = Retry::with_policy(MyBackend, policy);
//! let stats = backend.stats(); // read it after (or during) a run
//! # let _ = stats.retries();
//! ```
//!
//! The wait before retry `n` is drawn uniformly from zero to the capped exponential delay
//! ("full jitter"), and raised to the server's `Retry-After` when there is one; the time
//! bound counts the calls and the waits together. The clock is tokio's, so tests can run the
//! whole schedule in paused virtual time. Design notes: see ARCHITECTURE.md in the repository.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::{Completion, CompletionRequest, LlmBackend};
use crate::error::{BackendError, BackendErrorKind};

/// How [`Retry`] waits and when it gives up.
///
/// The wait before retry `n` (1-based) is drawn uniformly from
/// `[0, min(max_delay, initial_delay * 2^(n-1))]` (full jitter; without jitter it is the upper
/// end), and is never shorter than the `Retry-After` the server sent. A retry whose wait would
/// end after `max_elapsed` is not made: the last error is returned at once. A `Retry-After`
/// longer than [`max_retry_after`](Self::max_retry_after) (or than `max_elapsed`) is a fatal
/// error at once (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_attempts: NonZeroU32,
    initial_delay: Duration,
    max_delay: Duration,
    max_elapsed: Option<Duration>,
    max_retry_after: Duration,
    jitter: bool,
}

/// The default of [`RetryPolicy::max_retry_after`]: two minutes, more than any per-minute
/// limit asks for, far less than an hourly or daily one.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: NonZeroU32::new(6).expect("6 is not zero"),
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_elapsed: Some(Duration::from_secs(300)),
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    setters! {
        /// The most calls made for one request, the first included. Default 6; 1 disables retries.
        #[must_use]
        max_attempts(max_attempts: NonZeroU32) => max_attempts = max_attempts;
        /// The cap on the wait before the first retry; it doubles for each later one. Default 500 ms.
        #[must_use]
        initial_delay(delay: Duration) => initial_delay = delay;
        /// The most the exponential wait grows to. Default 30 s. A longer `Retry-After` from the
        /// server still wins.
        #[must_use]
        max_delay(delay: Duration) => max_delay = delay;
        /// The most time one request may take, all attempts and waits together, measured from the
        /// first call. `None` means no limit. Default 300 s.
        #[must_use]
        max_elapsed(max_elapsed: Option<Duration>) => max_elapsed = max_elapsed;
        /// The longest `Retry-After` the wrapper waits for. A failed call whose server asks for a
        /// longer wait (or a longer one than [`max_elapsed`](Self::max_elapsed)) is not retried:
        /// it comes back at once as a fatal
        /// [`RetryAfterTooLong`](BackendErrorKind::RetryAfterTooLong) error, since every later
        /// request would be told to wait too. Default [`DEFAULT_MAX_RETRY_AFTER`] (120 s).
        #[must_use]
        max_retry_after(max: Duration) => max_retry_after = max;
        /// Whether to draw the wait at random from `[0, d]` (full jitter, the default) or always
        /// wait `d`.
        #[must_use]
        jitter(jitter: bool) => jitter = jitter;
    }

    /// The longest `Retry-After` waited for: [`max_retry_after`](Self::max_retry_after), but
    /// never more than [`max_elapsed`](Self::max_elapsed).
    #[must_use]
    pub fn retry_after_limit(&self) -> Duration {
        self.max_elapsed.map_or(self.max_retry_after, |budget| {
            self.max_retry_after.min(budget)
        })
    }

    /// The upper end of the wait before retry number `retry` (1-based), before jitter.
    fn ceiling(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1).min(30));
        self.initial_delay
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max_delay)
    }

    /// The wait before retry number `retry`, honouring `retry_after` as a floor.
    fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.ceiling(retry);
        let backoff = if self.jitter && !ceiling.is_zero() {
            let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(rand::rng().random_range(0..=nanos))
        } else {
            ceiling
        };
        backoff.max(retry_after.unwrap_or(Duration::ZERO))
    }
}

/// Counters of a [`Retry`] wrapper, shared through an `Arc` and cheap to read at any time.
///
/// All counts are totals since the wrapper was made, over all requests.
#[derive(Debug, Default)]
pub struct RetryStats {
    requests: AtomicU64,
    attempts: AtomicU64,
    rate_limited: AtomicU64,
    failures: AtomicU64,
}

impl RetryStats {
    /// Requests passed to the wrapper.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Calls made to the inner backend (first attempts and retries).
    #[must_use]
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Calls that were retries: `attempts - requests`.
    #[must_use]
    pub fn retries(&self) -> u64 {
        // A request counts its first attempt right after itself (no await between); attempts
        // are read first, so a request starting in between is not read as a retry.
        self.attempts().saturating_sub(self.requests())
    }

    /// Failed attempts whose error was [`RateLimited`](crate::BackendErrorKind::RateLimited).
    #[must_use]
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// Requests that failed in the end (a permanent error, or the retry budget ran out).
    #[must_use]
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// Wraps a backend and retries the calls that fail with a retryable error.
///
/// See the [module docs](self) for the policy. `name()` and `model()` are the inner backend's.
///
/// Every attempt runs in an `info` span `llm_attempt` with the field `attempt` (1-based), so
/// the inner backend's own span nests under it; each retry logs a `warn` event with the error
/// and the wait.
#[derive(Debug)]
pub struct Retry<B> {
    inner: B,
    policy: RetryPolicy,
    stats: Arc<RetryStats>,
}

impl<B> Retry<B> {
    /// Wraps `inner` with the default [`RetryPolicy`].
    pub fn new(inner: B) -> Self {
        Self::with_policy(inner, RetryPolicy::default())
    }

    /// Wraps `inner` with this policy.
    pub fn with_policy(inner: B, policy: RetryPolicy) -> Self {
        Retry {
            inner,
            policy,
            stats: Arc::new(RetryStats::default()),
        }
    }

    /// The shared counters; they keep counting after this call.
    #[must_use]
    pub fn stats(&self) -> Arc<RetryStats> {
        Arc::clone(&self.stats)
    }
}

#[async_trait]
impl<B: LlmBackend> LlmBackend for Retry<B> {
    /// Calls the inner backend until it succeeds, fails permanently, or the budget runs out.
    ///
    /// # Errors
    ///
    /// The first non-retryable error, or the last retryable one when `max_attempts` calls have
    /// failed or the next wait would pass `max_elapsed`; a fatal
    /// [`RetryAfterTooLong`](BackendErrorKind::RetryAfterTooLong) error (the server's error as
    /// its source) when the server asks to wait longer than
    /// [`RetryPolicy::retry_after_limit`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops waiting and drops the call in flight; nothing is shared but
    /// the counters.
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let start = Instant::now();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut attempt: u32 = 1;
        loop {
            self.stats.attempts.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!("llm_attempt", attempt);
            let result = self.inner.complete(request.clone()).instrument(span).await;
            let Err(err) = result else { return result };
            if err.kind() == BackendErrorKind::RateLimited {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            let limit = self.policy.retry_after_limit();
            let delay = self.policy.delay(attempt, err.retry_after());
            let over_budget = (self.policy.max_elapsed)
                .is_some_and(|budget| start.elapsed().saturating_add(delay) > budget);
            let (why, err) = match err.retry_after() {
                _ if !err.is_retryable() => ("", err),
                Some(wait) if wait > limit => (
                    "the server asks to wait too long",
                    too_long(err, wait, limit),
                ),
                _ if attempt >= self.policy.max_attempts.get() => ("attempts exhausted", err),
                _ if over_budget => ("the next wait would pass the time budget", err),
                _ => {
                    tracing::warn!(
                        attempt,
                        error = %err,
                        delay_ms = super::millis(delay),
                        "retrying backend call"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                    continue;
                }
            };
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            if !why.is_empty() {
                // The caller reports the error; a warning here would say it twice.
                tracing::debug!(attempts = attempt, error = %err, "giving up: {why}");
            }
            return Err(err);
        }
    }

    crate::backend::forward_names!(inner);
}

/// The fatal error for a server that asks to wait `wait`, longer than `limit`.
fn too_long(err: BackendError, wait: Duration, limit: Duration) -> BackendError {
    // The wait, the status and the server's own words are the source's: said once, in the
    // chain (`error_chain`), where the source follows this message.
    // The limit as whole seconds (`3600 s`), or with a decimal under ten seconds.
    let limit = if limit < Duration::from_secs(10) {
        format!("{:.1}", limit.as_secs_f64())
    } else {
        limit.as_secs().to_string()
    };
    let message = format!(
        "the server asks to wait longer than the retry policy waits ({limit} s); stopping \
         (rerun later to resume)"
    );
    BackendError::new(BackendErrorKind::RetryAfterTooLong, message)
        .with_retry_after(wait)
        .with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_and_caps() {
        let p = RetryPolicy::default()
            .initial_delay(Duration::from_millis(100))
            .max_delay(Duration::from_millis(1000));
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(4), Duration::from_millis(800));
        assert_eq!(p.ceiling(5), Duration::from_millis(1000));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn jitter_stays_in_range_and_retry_after_is_a_floor() {
        let p = RetryPolicy::default()
            .initial_delay(Duration::from_millis(100))
            .max_delay(Duration::from_secs(10));
        for retry in 1..8 {
            let d = p.delay(retry, None);
            assert!(d <= p.ceiling(retry), "{d:?}");
            let floor = Duration::from_secs(7);
            assert!(p.delay(retry, Some(floor)) >= floor);
        }
        let fixed = p.clone().jitter(false);
        assert_eq!(fixed.delay(3, None), Duration::from_millis(400));
        assert_eq!(
            fixed.delay(1, Some(Duration::from_secs(20))),
            Duration::from_secs(20)
        );
    }
}
