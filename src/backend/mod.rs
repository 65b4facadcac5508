//! The [`LlmBackend`] trait, the request and response types of one completion call, and the
//! wrappers that work around any backend.
//!
//! A backend takes a [`CompletionRequest`] by value and returns a [`Completion`] or a typed
//! [`BackendError`]. Everything the generator needs from a model goes
//! through this one method, so a user-written backend (a company gateway, a batch API, a model
//! running in the same process) plugs in with a few lines:
//!
//! ```
//! use rmboost::{async_trait, BackendError, Completion, CompletionRequest, LlmBackend};
//!
//! /// Answers every request by shouting the last message back.
//! #[derive(Debug)]
//! struct Shout;
//!
//! #[async_trait]
//! impl LlmBackend for Shout {
//!     async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
//!         let last = request.messages.last().map(|m| m.content.to_uppercase()).unwrap_or_default();
//!         Ok(Completion::new(last))
//!     }
//! }
//! ```
//!
//! # Backends and wrappers behind features
//!
//! | module | feature | what |
//! |---|---|---|
//! | `openai` | `openai` | `OpenAiBackend`, any OpenAI-compatible `/v1/chat/completions` server |
//! | `anthropic` | `anthropic` | `AnthropicBackend`, Anthropic's Messages API |
//! | `retry` | `middleware` | `Retry`, exponential backoff with full jitter and `Retry-After` |
//! | `rate_limit` | `middleware` | `RateLimit`, requests and tokens per minute |
//! | `adaptive` | `middleware` | `Adaptive`, an adaptive concurrency limit (AIMD), `Retry-After` pauses and a circuit breaker |
//! | `replicas` | `middleware` | `Replicas`, several replicas of one model as one backend (per-replica limits, affinity, failover) |
//! | `stack` | `middleware` | `Stack`, the wrappers above and the cache in the one order that works |
//! | `cache` | `cache` | `Cached`, a persistent response cache |
//! | `meter` | (always) | `Metered`, counts calls and tokens for a run's summary and cost budget |
//! | `local` | `local` | `LocalBackend`, a GGUF chat model in this process |
//!
//! The wrappers work around any [`LlmBackend`], a user's own included, and forward its
//! `name()`, `model()` and `identity()`. They work together in one order only, from the outside
//! in: cache, meter, retry, adaptive limit, rate limit (the retries are rate limited too, and
//! the adaptive limit sees every attempt). `Stack` (feature `middleware`) takes them in any
//! order and builds that one; the `rmboost` command uses it.

#[cfg(feature = "middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "middleware")))]
pub mod adaptive;
#[cfg(feature = "anthropic")]
#[cfg_attr(docsrs, doc(cfg(feature = "anthropic")))]
pub mod anthropic;
#[cfg(any(feature = "openai", feature = "anthropic"))]
pub(crate) mod http;
pub mod meter;
#[cfg(feature = "openai")]
#[cfg_attr(docsrs, doc(cfg(feature = "openai")))]
pub mod openai;
#[cfg(feature = "middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "middleware")))]
pub mod rate_limit;
#[cfg(feature = "middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "middleware")))]
pub mod replicas;
#[cfg(feature = "middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "middleware")))]
pub mod retry;
#[cfg(feature = "middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "middleware")))]
pub mod stack;

#[cfg(feature = "middleware")]
pub use adaptive::{Adaptive, AdaptiveConfig, AdaptiveStats};
#[cfg(feature = "anthropic")]
pub use anthropic::AnthropicBackend;
/// The core of the HTTP backends, generic over the provider: `OpenAiBackend` and
/// `AnthropicBackend` are aliases of it.
#[cfg(any(feature = "openai", feature = "anthropic"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "openai", feature = "anthropic"))))]
pub use http::{HttpBackend, HttpBackendBuilder};
pub use meter::{CallMeter, Metered};
#[cfg(feature = "openai")]
pub use openai::OpenAiBackend;
#[cfg(feature = "middleware")]
pub use rate_limit::RateLimit;
#[cfg(feature = "middleware")]
pub use replicas::{ReplicaStats, Replicas};
#[cfg(feature = "middleware")]
pub use retry::{Retry, RetryPolicy, RetryStats, DEFAULT_MAX_RETRY_AFTER};
#[cfg(feature = "middleware")]
pub use stack::{Stack, Stacked};

#[cfg(feature = "cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
pub mod cache;

use std::borrow::Cow;
use std::ops::Deref;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::BackendError;

#[cfg(feature = "local")]
#[cfg_attr(docsrs, doc(cfg(feature = "local")))]
pub mod local;

/// The default of the HTTP backends' `max_response_bytes`: the most bytes of a response body
/// read before the call fails (8 MiB).
#[cfg(any(feature = "openai", feature = "anthropic"))]
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 8 << 20;

crate::error::named_enum! {
/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Instructions that frame the conversation.
    System = "system",
    /// The person asking.
    User = "user",
    /// The model answering.
    Assistant = "assistant",
}
}

/// One chat message: a role and its text, in the shape TRL and the chat APIs use.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What was written.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// Sampling settings for one kind of call (the first or the second response).
///
/// `None` leaves the choice to the backend. The generator copies these into every
/// [`CompletionRequest`] it sends for that call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SamplingParams {
    /// Sampling temperature; `0.0` is greedy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold in `(0, 1]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// The most tokens the model may generate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sequences that end generation when produced (not included in the text).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl SamplingParams {
    setters! {
        /// Sets the temperature.
        #[must_use]
        temperature(t: f32) => temperature = Some(t);
        /// Sets top-p.
        #[must_use]
        top_p(p: f32) => top_p = Some(p);
        /// Sets the token limit.
        #[must_use]
        max_tokens(n: u32) => max_tokens = Some(n);
    }

    /// Adds a stop sequence.
    #[must_use]
    pub fn stop(mut self, stop: impl Into<String>) -> Self {
        self.stop.push(stop.into());
        self
    }

    /// Checks the values are in range; `what` names the setting in the error.
    pub(crate) fn validate(&self, what: &str) -> Result<(), String> {
        if let Some(t) = self.temperature.filter(|t| !t.is_finite() || *t < 0.0) {
            return Err(format!(
                "{what}: temperature must be a finite number >= 0, got {t}"
            ));
        }
        if let Some(p) = self
            .top_p
            .filter(|p| !p.is_finite() || *p <= 0.0 || *p > 1.0)
        {
            return Err(format!("{what}: top_p must be in (0, 1], got {p}"));
        }
        if self.max_tokens == Some(0) {
            return Err(format!("{what}: max_tokens must be at least 1"));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(format!("{what}: a stop sequence must not be empty"));
        }
        Ok(())
    }
}

/// One completion call: the conversation so far, sampling settings, seed and stop sequences.
///
/// Taken by value by [`LlmBackend::complete`], so wrappers can pass it on without cloning.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CompletionRequest {
    /// The conversation, oldest first; the model answers the last message.
    pub messages: Vec<Message>,
    /// Sampling temperature; `None` leaves it to the backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold; `None` leaves it to the backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Token limit for the answer; `None` leaves it to the backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Seed for backends that support reproducible sampling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl CompletionRequest {
    /// A request with these messages and no sampling settings.
    pub fn new(messages: Vec<Message>) -> Self {
        CompletionRequest {
            messages,
            ..Self::default()
        }
    }

    /// Copies the sampling settings of `params` into this request.
    #[must_use]
    pub fn with_params(mut self, params: &SamplingParams) -> Self {
        self.temperature = params.temperature;
        self.top_p = params.top_p;
        self.max_tokens = params.max_tokens;
        self.stop.clone_from(&params.stop);
        self
    }

    setters! {
        /// Sets the seed.
        #[must_use]
        with_seed(seed: u64) => seed = Some(seed);
    }
}

/// Why the model stopped generating.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FinishReason {
    /// A natural end or a stop sequence.
    #[default]
    Stop,
    /// The token limit was reached; the text may be cut off.
    Length,
    /// The provider's content filter removed or cut the text.
    ContentFilter,
    /// Any other reason the backend reported.
    #[serde(untagged)]
    Other(String),
}

/// Token counts of one call (or a sum of calls).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// Tokens in the request.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
}

impl Usage {
    /// Usage with these counts.
    #[must_use]
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
        }
    }

    /// Prompt plus completion tokens (saturating at `u64::MAX`).
    #[must_use]
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Adds the counts field by field, saturating at `u64::MAX`: the counts come from servers, and
/// an absurd one must not overflow a sum (a panic in debug builds).
impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, rhs: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens.saturating_add(rhs.prompt_tokens),
            completion_tokens: self.completion_tokens.saturating_add(rhs.completion_tokens),
        }
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, rhs: Usage) {
        *self = *self + rhs;
    }
}

/// What a backend returned for one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub struct Completion {
    /// The generated text.
    pub text: String,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Token counts, where the backend reports them (zero otherwise).
    pub usage: Usage,
    /// The model that answered, as the backend names it (may be empty).
    pub model: String,
}

impl Completion {
    /// A completion with this text, a natural stop, no usage and no model name.
    pub fn new(text: impl Into<String>) -> Self {
        Completion {
            text: text.into(),
            ..Completion::default()
        }
    }

    setters! {
        /// Sets the finish reason.
        #[must_use]
        with_finish_reason(reason: FinishReason) => finish_reason = reason;
        /// Sets the usage.
        #[must_use]
        with_usage(usage: Usage) => usage = usage;
        /// Sets the model name.
        #[must_use]
        with_model(model: impl Into<String>) => model = model.into();
    }
}

/// A language model that completes a chat.
///
/// Implementations must be safe to call from many tasks at once: the generator calls
/// [`complete`](LlmBackend::complete) from up to `concurrency` examples concurrently. Transport
/// retries belong in a wrapper around the backend, not in the generator.
///
/// The trait is object safe; `Arc<dyn LlmBackend>`, `Box<dyn LlmBackend>` and `&B` all
/// implement it by forwarding.
#[async_trait]
pub trait LlmBackend: Send + Sync {
    /// Completes one request.
    ///
    /// # Errors
    ///
    /// A [`BackendError`] whose [`kind`](BackendError::kind) says whether the call may be
    /// retried ([`BackendError::is_retryable`]) and, where the server said so, after how long
    /// ([`BackendError::retry_after`]).
    ///
    /// # Cancel safety
    ///
    /// The future may be dropped at any await point (the generator drops it when its stream is
    /// dropped); an implementation must not leave shared state inconsistent when that happens.
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError>;

    /// A short name of the kind of backend (`"openai"`, `"local"`, ...), used in metadata,
    /// logs and cache keys. Defaults to `"custom"`.
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed("custom")
    }

    /// The model this backend sends requests to, if it knows; used in metadata and cache keys.
    fn model(&self) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    /// What decides this backend's answers besides the request, for the response cache's
    /// keys: two backends with the same identity must answer a request alike. Defaults to
    /// `name/model`. The built-in backends say more: the HTTP ones their endpoint (without
    /// credentials or query), model and answer-changing settings (extra body fields, the names
    /// of extra headers), the local one the SHA-256 of its model file and its sampling
    /// defaults. Wrappers forward it. Must never hold a key or other secret.
    fn identity(&self) -> Cow<'_, str> {
        Cow::Owned(format!("{}/{}", self.name(), self.model()))
    }
}

/// `backend` behind an `Arc`, without a second one when it is an `Arc<dyn LlmBackend>`
/// already: so every builder takes any backend, a shared one included, through one setter.
pub(crate) fn shared<B: LlmBackend + 'static>(backend: B) -> Arc<dyn LlmBackend> {
    match (&backend as &dyn std::any::Any).downcast_ref::<Arc<dyn LlmBackend>>() {
        Some(arc) => Arc::clone(arc),
        None => Arc::new(backend),
    }
}

/// A duration in whole milliseconds (saturating), for log fields.
#[cfg(feature = "middleware")]
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Locks `mutex`, also when a thread panicked holding it (the data guarded stays usable).
#[cfg_attr(not(any(feature = "cache", feature = "middleware")), allow(dead_code))]
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `name`, `model` and `identity` of a wrapper: those of the backend it reaches with
/// `self.$inner` (a field, or `deref()`), so wrapping changes neither metadata nor cache keys.
macro_rules! forward_names {
    ($($inner:tt)+) => {
        fn name(&self) -> std::borrow::Cow<'_, str> {
            self.$($inner)+.name()
        }
        fn model(&self) -> std::borrow::Cow<'_, str> {
            self.$($inner)+.model()
        }
        fn identity(&self) -> std::borrow::Cow<'_, str> {
            self.$($inner)+.identity()
        }
    };
}
pub(crate) use forward_names;

macro_rules! forward_backend {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<B: LlmBackend + ?Sized> LlmBackend for $ty {
            async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
                (**self).complete(request).await
            }
            forward_names!(deref());
        }
    )*};
}

forward_backend!(Arc<B>, Box<B>, &B);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_backend_is_not_wrapped_again() {
        #[derive(Debug)]
        struct Echo;
        #[async_trait]
        impl LlmBackend for Echo {
            async fn complete(&self, _: CompletionRequest) -> Result<Completion, BackendError> {
                Ok(Completion::new("echo"))
            }
        }
        let arc: Arc<dyn LlmBackend> = Arc::new(Echo);
        let again = shared(Arc::clone(&arc));
        assert!(Arc::ptr_eq(&arc, &again));
        assert_eq!(shared(Echo).name(), "custom");
    }

    fn _object_safe(_: &dyn LlmBackend) {}

    #[test]
    fn request_takes_params() {
        let params = SamplingParams::default()
            .temperature(0.7)
            .top_p(0.9)
            .max_tokens(64)
            .stop("</response>");
        let req = CompletionRequest::new(vec![Message::user("hi")])
            .with_params(&params)
            .with_seed(7);
        assert_eq!(req.temperature, Some(0.7));
        assert_eq!(req.top_p, Some(0.9));
        assert_eq!(req.max_tokens, Some(64));
        assert_eq!(req.seed, Some(7));
        assert_eq!(req.stop, vec!["</response>".to_string()]);
    }

    #[test]
    fn params_validate() {
        assert!(SamplingParams::default().validate("x").is_ok());
        assert!(SamplingParams::default()
            .temperature(-1.0)
            .validate("x")
            .is_err());
        assert!(SamplingParams::default()
            .temperature(f32::NAN)
            .validate("x")
            .is_err());
        assert!(SamplingParams::default().top_p(0.0).validate("x").is_err());
        assert!(SamplingParams::default().top_p(1.5).validate("x").is_err());
        let err = SamplingParams::default()
            .max_tokens(0)
            .validate("second_params")
            .unwrap_err();
        assert!(err.contains("second_params"), "{err}");
    }

    #[test]
    fn usage_sums_saturate() {
        let big = Usage::new(u64::MAX, u64::MAX);
        assert_eq!(big + Usage::new(1, 1), big);
        assert_eq!(big.total(), u64::MAX);
        let mut u = Usage::new(u64::MAX - 1, 3);
        u += Usage::new(5, 4);
        assert_eq!(u, Usage::new(u64::MAX, 7));
    }

    #[test]
    fn finish_reason_serde() {
        let s = serde_json::to_string(&FinishReason::ContentFilter).unwrap();
        assert_eq!(s, "\"content_filter\"");
        let other: FinishReason = serde_json::from_str("\"tool_calls\"").unwrap();
        assert_eq!(other, FinishReason::Other("tool_calls".into()));
        let len: FinishReason = serde_json::from_str("\"length\"").unwrap();
        assert_eq!(len, FinishReason::Length);
    }
}
