//! [`Stack`]: the wrappers around a backend, put in the one order that works.
//!
//! The wrappers of this crate each do one job, and they only work together in one order,
//! from the outside in:
//!
//! 1. `cache::Cached` (feature `cache`): a request answered before is answered from
//!    the cache and goes no further (it costs nothing, waits for nothing, uses no slot);
//! 2. the [meter](CallMeter): counts the requests that reached the
//!    backend and their tokens, so what it shows is what was paid for;
//! 3. [`Retry`]: sends a failed call again, so every attempt
//!    passes through what is below it;
//! 4. [`Adaptive`]: the limit on calls in flight; it must
//!    see every attempt and every `429` to find the server's limit;
//! 5. [`RateLimit`]: requests and tokens per minute,
//!    spent per attempt, as the provider counts them;
//! 6. the backend.
//!
//! Nested otherwise they fail quietly: a retry outside the cache stores nothing new, a rate
//! limit outside the retry lets retries through unlimited, an adaptive limit outside the retry
//! never sees the `429`s the retry absorbed. A [`Stack`] takes the wrappers in any order and
//! builds them in this one:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> rmboost::Result<()> {
//! use std::num::{NonZeroU32, NonZeroUsize};
//! use rmboost::backend::{AdaptiveConfig, RetryPolicy, Stack};
//! use rmboost::testing::ScriptedBackend;
//! use rmboost::{Completion, CompletionRequest, LlmBackend, Message};
//!
//! let model = ScriptedBackend::from_fn(|_| Ok(Completion::new("hello")));
//! let backend = Stack::new()
//!     .retry(RetryPolicy::default())
//!     .requests_per_minute(NonZeroU32::new(600).unwrap())
//!     .adaptive(AdaptiveConfig::new(NonZeroUsize::new(64).unwrap()))
//!     .build(model);
//! backend.complete(CompletionRequest::new(vec![Message::user("hi")])).await.unwrap();
//! assert_eq!(backend.meter().calls(), 1);
//! assert_eq!(backend.retry_stats().unwrap().attempts(), 1);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;

use async_trait::async_trait;

use super::adaptive::{Adaptive, AdaptiveConfig, AdaptiveStats};
#[cfg(feature = "cache")]
use super::cache::{Cache, Cached};
use super::meter::{CallMeter, Metered};
use super::rate_limit::{Bucket, RateLimit};
use super::retry::{Retry, RetryPolicy, RetryStats};
use super::{Completion, CompletionRequest, LlmBackend};
use crate::error::BackendError;

/// The wrappers to put around a backend, named in any order, built in the one that works (see
/// the [module docs](self)). Each is left out unless asked for; the meter is always there.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Stack {
    #[cfg(feature = "cache")]
    cache: Option<Cache>,
    retry: Option<RetryPolicy>,
    adaptive: Option<AdaptiveConfig>,
    rpm: Option<NonZeroU32>,
    tpm: Option<NonZeroU32>,
}

impl Stack {
    /// No wrapper but the meter.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// Answers requests seen before from `cache`, and stores new answers in it.
        #[cfg(feature = "cache")]
        #[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
        cache(cache: Cache) => cache = Some(cache);
        /// Retries failed calls by `policy`.
        retry(policy: RetryPolicy) => retry = Some(policy);
        /// Bounds the calls in flight by `config`: an adaptive limit up to its cap, or a fixed
        /// one ([`AdaptiveConfigBuilder::adaptive`](crate::backend::adaptive::AdaptiveConfigBuilder::adaptive)),
        /// with `Retry-After` pauses and a circuit breaker.
        adaptive(config: AdaptiveConfig) => adaptive = Some(config);
        /// At most `rpm` requests a minute (every attempt counts).
        requests_per_minute(rpm: NonZeroU32) => rpm = Some(rpm);
        /// At most `tpm` tokens a minute, estimated before each call (see
        /// [`RateLimit::estimate_tokens`]).
        tokens_per_minute(tpm: NonZeroU32) => tpm = Some(tpm);
    }

    /// Wraps `backend`.
    pub fn build<B: LlmBackend + 'static>(self, backend: B) -> Stacked {
        let mut inner: Box<dyn LlmBackend> = Box::new(backend);
        if self.rpm.is_some() || self.tpm.is_some() {
            let mut limited = RateLimit::new(inner);
            limited.requests = self.rpm.map(Bucket::per_minute);
            limited.tokens = self.tpm.map(Bucket::per_minute);
            inner = Box::new(limited);
        }
        let mut adaptive_stats = None;
        if let Some(config) = self.adaptive {
            let adaptive = Adaptive::with_config(inner, config);
            adaptive_stats = Some(adaptive.stats());
            inner = Box::new(adaptive);
        }
        let mut retry_stats = None;
        if let Some(policy) = self.retry {
            let retry = Retry::with_policy(inner, policy);
            retry_stats = Some(retry.stats());
            inner = Box::new(retry);
        }
        let (metered, meter) = Metered::new(inner);
        inner = Box::new(metered);
        #[cfg(feature = "cache")]
        if let Some(cache) = &self.cache {
            inner = Box::new(Cached::new(inner, cache.clone()));
        }
        Stacked {
            inner: Arc::from(inner),
            meter,
            retry: retry_stats,
            adaptive: adaptive_stats,
            #[cfg(feature = "cache")]
            cache: self.cache,
        }
    }
}

/// A backend inside the wrappers of a [`Stack`], with their live statistics.
///
/// Cheap to clone (clones share the wrappers and their state).
#[derive(Clone)]
pub struct Stacked {
    inner: Arc<dyn LlmBackend>,
    meter: CallMeter,
    retry: Option<Arc<RetryStats>>,
    adaptive: Option<Arc<AdaptiveStats>>,
    #[cfg(feature = "cache")]
    cache: Option<Cache>,
}

impl Stacked {
    /// Requests that reached the backend (answers from the cache left out) and their tokens:
    /// what was paid for. Give it to `RunOptions::meter` (feature `run`) for
    /// a cost budget.
    #[must_use]
    pub fn meter(&self) -> &CallMeter {
        &self.meter
    }

    /// The retry wrapper's counters, if there is one.
    #[must_use]
    pub fn retry_stats(&self) -> Option<&Arc<RetryStats>> {
        self.retry.as_ref()
    }

    /// The concurrency limit's counters, if there is one.
    #[must_use]
    pub fn adaptive_stats(&self) -> Option<&Arc<AdaptiveStats>> {
        self.adaptive.as_ref()
    }

    /// The response cache, if there is one (its [`stats`](Cache::stats) count hits and
    /// misses).
    #[cfg(feature = "cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
    #[must_use]
    pub fn cache(&self) -> Option<&Cache> {
        self.cache.as_ref()
    }
}

impl fmt::Debug for Stacked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stacked")
            .field("backend", &self.inner.name())
            .field("model", &self.inner.model())
            .field("retry", &self.retry.is_some())
            .field("adaptive", &self.adaptive.is_some())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl LlmBackend for Stacked {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        self.inner.complete(request).await
    }

    crate::backend::forward_names!(inner);
}
