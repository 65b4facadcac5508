//! [`RateLimit`]: keeps any backend under a requests-per-minute and a tokens-per-minute limit.
//!
//! Both limits are GCRA token buckets ([`governor`]) whose burst is one minute's allowance:
//! a run may start with a minute's worth of requests at once and then goes on at the steady
//! rate. A call waits (asynchronously) until both buckets allow it.
//!
//! The tokens a call will use are not known before it is made, so the token limit charges an
//! estimate up front: about one token per four characters of the messages, plus four per
//! message, plus the request's `max_tokens` (or [`RateLimit::default_max_tokens`] when the
//! request sets none). As `max_tokens` is an upper bound on the answer, the estimate is
//! usually on the safe side; it is not corrected after the call. An estimate larger than the
//! whole per-minute allowance is charged as the whole allowance.
//!
//! Put it inside a [`Retry`](super::retry::Retry) so retries are limited too:
//!
//! ```
//! use std::num::NonZeroU32;
//! use rmboost::backend::rate_limit::RateLimit;
//! use rmboost::backend::retry::Retry;
//! # use rmboost::{async_trait, BackendError, Completion, CompletionRequest, LlmBackend};
//! # #[derive(Debug)] struct MyBackend;
//! # #[async_trait] impl LlmBackend for MyBackend {
//! #     async fn complete(&self, _: CompletionRequest) -> Result<Completion, BackendError> {
//! #         Ok(Completion::new("hi"))
//! #     }
//! # }
//!
//! let limited = RateLimit::new(MyBackend)
//!     .requests_per_minute(NonZeroU32::new(500).unwrap())
//!     .tokens_per_minute(NonZeroU32::new(200_000).unwrap());
//! let backend = Retry::new(limited);
//! # let _ = backend;
//! ```
//!
//! The clock is tokio's, so tests can run the limiter in paused virtual time.

use std::num::NonZeroU32;
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{InsufficientCapacity, Quota};

use crate::backend::{Completion, CompletionRequest, LlmBackend};
use crate::error::BackendError;

/// tokio's clock (paused and advanced in tests), for governor: the time since the bucket was
/// made.
#[derive(Debug, Clone)]
struct TokioClock(tokio::time::Instant);

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

type Limiter = governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// One bucket, whose capacity is a minute's allowance.
#[derive(Debug)]
pub(super) struct Bucket(Limiter);

impl Bucket {
    pub(super) fn per_minute(capacity: NonZeroU32) -> Self {
        let clock = TokioClock(tokio::time::Instant::now());
        Bucket(Limiter::direct_with_clock(
            Quota::per_minute(capacity),
            clock,
        ))
    }

    /// Waits until `n` cells (at most the capacity) conform, then takes them.
    ///
    /// Cancel safe: cells are only taken when the check succeeds.
    async fn acquire(&self, n: u64) {
        let Some(mut n) = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else {
            return;
        };
        loop {
            match self.0.check_n(n) {
                Ok(Ok(())) => return,
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.0.clock().now());
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                }
                // More than the whole allowance: charged as the whole allowance.
                Err(InsufficientCapacity(capacity)) => match NonZeroU32::new(capacity) {
                    Some(capacity) => n = capacity,
                    None => return,
                },
            }
        }
    }
}

/// Wraps a backend and keeps its calls under a requests-per-minute and a tokens-per-minute
/// limit. See the [module docs](self).
///
/// With neither limit set it passes calls straight through. `name()` and `model()` are the
/// inner backend's.
#[derive(Debug)]
pub struct RateLimit<B> {
    inner: B,
    pub(super) requests: Option<Bucket>,
    pub(super) tokens: Option<Bucket>,
    default_max_tokens: u32,
}

impl<B> RateLimit<B> {
    /// Wraps `inner` with no limits set yet.
    pub fn new(inner: B) -> Self {
        RateLimit {
            inner,
            requests: None,
            tokens: None,
            default_max_tokens: 1024,
        }
    }

    setters! {
        /// Allows at most this many calls per minute (a minute's worth may go at once).
        #[must_use]
        requests_per_minute(rpm: NonZeroU32) => requests = Some(Bucket::per_minute(rpm));
        /// Allows at most this many (estimated) tokens per minute, prompt and answer together.
        #[must_use]
        tokens_per_minute(tpm: NonZeroU32) => tokens = Some(Bucket::per_minute(tpm));
        /// The answer length assumed for requests without `max_tokens`. Default 1024.
        #[must_use]
        default_max_tokens(max_tokens: u32) => default_max_tokens = max_tokens;
    }

    /// The token estimate charged for `request` (see the [module docs](self)).
    #[must_use]
    pub fn estimate_tokens(&self, request: &CompletionRequest) -> u64 {
        let chars: usize = request
            .messages
            .iter()
            .map(|m| m.content.chars().count())
            .sum();
        let prompt = (chars as u64).div_ceil(4) + 4 * request.messages.len() as u64;
        prompt + u64::from(request.max_tokens.unwrap_or(self.default_max_tokens))
    }
}

#[async_trait]
impl<B: LlmBackend> LlmBackend for RateLimit<B> {
    /// Waits for both limits, then calls the inner backend.
    ///
    /// # Errors
    ///
    /// Whatever the inner backend returns; the wrapper adds none.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while it waits takes nothing from the token bucket; a request slot
    /// already taken is not given back.
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        if let Some(bucket) = &self.requests {
            bucket.acquire(1).await;
        }
        if let Some(bucket) = &self.tokens {
            bucket.acquire(self.estimate_tokens(&request)).await;
        }
        self.inner.complete(request).await
    }

    crate::backend::forward_names!(inner);
}
