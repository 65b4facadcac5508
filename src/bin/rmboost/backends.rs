//! Choosing and wrapping the backend of `--backend`.
//!
//! Each backend plugs in with one arm of [`build`]; wrappers (retry, rate limit, cache) are
//! applied around it in [`build`] too, and the [`Meter`] outermost-but-cache so that it counts
//! exactly the tokens the provider bills.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmboost::testing::{FakeBackend, ScriptedBackend};
use rmboost::{
    async_trait, BackendError, BackendErrorKind, Completion, CompletionRequest, LlmBackend, Usage,
};

use crate::args::{BackendArgs, BackendKind};
use crate::setup::CliError;

/// Counts every completion that comes back from the provider: calls and tokens, re-asks and
/// examples that later failed included (what the provider bills).
#[derive(Debug, Default)]
pub(crate) struct MeterCounts {
    calls: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

impl MeterCounts {
    pub(crate) fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens.load(Ordering::Relaxed),
            self.completion_tokens.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// A backend wrapper that counts calls and tokens into [`MeterCounts`].
pub(crate) struct Meter<B> {
    inner: B,
    counts: Arc<MeterCounts>,
}

impl<B> Meter<B> {
    pub(crate) fn new(inner: B) -> (Self, Arc<MeterCounts>) {
        let counts = Arc::new(MeterCounts::default());
        (
            Meter {
                inner,
                counts: counts.clone(),
            },
            counts,
        )
    }
}

#[async_trait]
impl<B: LlmBackend> LlmBackend for Meter<B> {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let result = self.inner.complete(request).await;
        let c = &self.counts;
        c.calls.fetch_add(1, Ordering::Relaxed);
        if let Ok(done) = &result {
            c.prompt_tokens
                .fetch_add(done.usage.prompt_tokens, Ordering::Relaxed);
            c.completion_tokens
                .fetch_add(done.usage.completion_tokens, Ordering::Relaxed);
        }
        result
    }

    fn name(&self) -> Cow<'_, str> {
        self.inner.name()
    }

    fn model(&self) -> Cow<'_, str> {
        self.inner.model()
    }
}

/// Counts transport retries, where the backend has a retry wrapper.
pub(crate) type RetryCounter = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Live statistics of the wrappers, for progress and the summary.
#[derive(Clone, Default)]
pub(crate) struct BackendStats {
    pub(crate) meter: Arc<MeterCounts>,
    /// Transport retries made, where the backend has a retry wrapper.
    pub(crate) retries: Option<RetryCounter>,
}

impl BackendStats {
    pub(crate) fn retries(&self) -> u64 {
        self.retries.as_ref().map_or(0, |f| f())
    }
}

/// The backend ready to use, its description for the summary, and its live statistics.
pub(crate) struct Built {
    pub(crate) backend: Arc<dyn LlmBackend>,
    pub(crate) stats: BackendStats,
    /// `name` / `model` / where, for the summary (never a key).
    pub(crate) description: String,
}

/// The default backend when `--backend` is not given.
fn default_kind() -> BackendKind {
    BackendKind::Openai
}

fn fake_latency() -> Option<Duration> {
    std::env::var("RMBOOST_FAKE_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

/// Builds the backend of `args`, wrapped in the meter (and retry, rate limit where
/// available).
pub(crate) fn build(args: &BackendArgs) -> Result<Built, CliError> {
    let kind = args.backend.unwrap_or_else(default_kind);
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(CliError::usage(
            "--timeout must be a positive number of seconds",
        ));
    }
    let latency = fake_latency();
    let (inner, retries): (Arc<dyn LlmBackend>, Option<RetryCounter>) = match kind {
        BackendKind::Fake => {
            let mut fake = FakeBackend::new();
            if let Some(l) = latency {
                fake = fake.with_latency(l);
            }
            (Arc::new(fake), None)
        }
        BackendKind::FakeUnauthorized => (
            Arc::new(ScriptedBackend::from_fn(|_| {
                Err(
                    BackendError::new(BackendErrorKind::Authentication, "invalid API key")
                        .with_status(401),
                )
            })),
            None,
        ),
        BackendKind::FakeUnreachable => (
            Arc::new(ScriptedBackend::from_fn(|_| {
                Err(BackendError::new(
                    BackendErrorKind::Connection,
                    "connection refused",
                ))
            })),
            None,
        ),
        BackendKind::FakeFlaky => {
            let fake = FakeBackend::new();
            let flaky = Flaky { inner: fake };
            (Arc::new(flaky), None)
        }
        BackendKind::Openai | BackendKind::Anthropic | BackendKind::Local => {
            return Err(CliError::fatal(format!(
                "backend `{}` is not available in this build of rmboost",
                kind.name()
            )));
        }
    };
    let description = describe(kind, args, &*inner);
    let (metered, meter) = Meter::new(inner);
    Ok(Built {
        backend: Arc::new(metered),
        stats: BackendStats { meter, retries },
        description,
    })
}

fn describe(kind: BackendKind, args: &BackendArgs, backend: &dyn LlmBackend) -> String {
    let model = backend.model();
    let mut s = kind.name().to_string();
    if !model.is_empty() {
        s.push_str(" / ");
        s.push_str(&model);
    }
    if let Some(url) = &args.base_url {
        s.push_str(" at ");
        s.push_str(url);
    }
    s
}

/// The fake backend, but the first call of one seed in four is rejected as an invalid request
/// (a permanent, non-fatal failure: the example fails and the run goes on).
struct Flaky {
    inner: FakeBackend,
}

#[async_trait]
impl LlmBackend for Flaky {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let second = request
            .messages
            .last()
            .is_some_and(|m| m.content.contains("</response>"));
        if !second && request.seed.unwrap_or(0) % 4 == 0 {
            return Err(BackendError::new(
                BackendErrorKind::InvalidRequest,
                "rejected by the fake",
            )
            .with_status(400));
        }
        self.inner.complete(request).await
    }

    fn name(&self) -> Cow<'_, str> {
        "fake".into()
    }

    fn model(&self) -> Cow<'_, str> {
        "fake-flaky".into()
    }
}
