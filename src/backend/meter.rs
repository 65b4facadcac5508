//! [`Metered`]: counts every call that reaches a backend and the tokens of its answers, into a
//! shared [`CallMeter`] that a run reads for its summary and its cost budget.
//!
//! Put it where the provider's bill is decided: outside the retry wrapper counts what the
//! generator asked for; inside it (around the HTTP backend) counts every attempt; outside the
//! response cache counts cached answers too. The `rmboost` command puts it around the retry
//! wrapper and inside the cache, so it counts exactly the calls that went to the provider,
//! re-asks and examples that later failed included.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rmboost::BackendError> {
//! use rmboost::backend::meter::Metered;
//! use rmboost::testing::FakeBackend;
//! use rmboost::{CompletionRequest, LlmBackend, Message};
//!
//! let (backend, meter) = Metered::new(FakeBackend::new());
//! backend.complete(CompletionRequest::new(vec![Message::user("Hi?")])).await?;
//! assert_eq!(meter.calls(), 1);
//! assert!(meter.usage().total() > 0);
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::{Completion, CompletionRequest, LlmBackend, Usage};
use crate::error::BackendError;

/// Calls and tokens counted by a [`Metered`] backend, from zero ([`Default`]). Cheap to clone;
/// every clone reads the same counts. Counts saturate at `u64::MAX` (a server may report absurd token counts).
#[derive(Debug, Clone, Default)]
pub struct CallMeter {
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    calls: AtomicU64,
    failed: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_add(n))
    });
}

impl CallMeter {
    /// Calls made (answered or failed).
    #[must_use]
    pub fn calls(&self) -> u64 {
        self.counts.calls.load(Ordering::Relaxed)
    }

    /// Calls that returned an error.
    #[must_use]
    pub fn failed_calls(&self) -> u64 {
        self.counts.failed.load(Ordering::Relaxed)
    }

    /// Tokens of every answered call.
    #[must_use]
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.counts.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.counts.completion_tokens.load(Ordering::Relaxed),
        }
    }

    /// Records one call and its result.
    pub fn record(&self, result: &Result<Completion, BackendError>) {
        add(&self.counts.calls, 1);
        match result {
            Ok(done) => {
                add(&self.counts.prompt_tokens, done.usage.prompt_tokens);
                add(&self.counts.completion_tokens, done.usage.completion_tokens);
            }
            Err(_) => add(&self.counts.failed, 1),
        }
    }
}

/// A backend wrapper that counts calls and tokens into a [`CallMeter`]; see the
/// [module docs](self).
#[derive(Debug)]
pub struct Metered<B> {
    inner: B,
    meter: CallMeter,
}

impl<B> Metered<B> {
    /// Wraps `inner`; returns the wrapper and its meter.
    pub fn new(inner: B) -> (Self, CallMeter) {
        let meter = CallMeter::default();
        let metered = Metered {
            inner,
            meter: meter.clone(),
        };
        (metered, meter)
    }
}

#[async_trait]
impl<B: LlmBackend> LlmBackend for Metered<B> {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let result = self.inner.complete(request).await;
        self.meter.record(&result);
        result
    }

    crate::backend::forward_names!(inner);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_saturate() {
        let meter = CallMeter::default();
        let big = Completion::new("x").with_usage(Usage::new(u64::MAX, u64::MAX - 1));
        meter.record(&Ok(big.clone()));
        meter.record(&Ok(big));
        meter.record(&Err(BackendError::server("down")));
        assert_eq!(meter.calls(), 3);
        assert_eq!(meter.failed_calls(), 1);
        assert_eq!(meter.usage().prompt_tokens, u64::MAX);
        assert_eq!(meter.usage().completion_tokens, u64::MAX);
    }
}
