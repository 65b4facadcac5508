//! [`AnthropicBackend`]: Anthropic's Messages API (`/v1/messages`).
//!
//! ```no_run
//! use rmboost::backend::anthropic::AnthropicBackend;
//! use rmboost::backend::retry::Retry;
//! use rmboost::{CompletionRequest, LlmBackend, Message};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = AnthropicBackend::builder()
//!     .model("claude-sonnet-4-5")
//!     .api_key_env("ANTHROPIC_API_KEY")
//!     .build()?;
//! let backend = Retry::new(backend);
//! let request = CompletionRequest::new(vec![
//!     Message::system("Answer in one word."),
//!     Message::user("Name a prime number."),
//! ]);
//! let completion = backend.complete(request).await?;
//! println!("{}", completion.text);
//! # Ok(()) }
//! ```
//!
//! # What is sent
//!
//! The system messages, joined by blank lines, become the top-level `system` field; the other
//! messages go in `messages`. `max_tokens` is required by the API: a request without one gets
//! [`default_max_tokens`](AnthropicBackendBuilder::default_max_tokens) (1024). `temperature`,
//! `top_p` and `stop` (as `stop_sequences`) are sent when set; the API has no seed, so
//! [`CompletionRequest::seed`] is not sent. Then come the
//! [extra body fields](AnthropicBackendBuilder::extra_body). The key goes in `x-api-key`,
//! with the `anthropic-version` header.
//!
//! # Stop reasons
//!
//! `end_turn` and `stop_sequence` map to [`FinishReason::Stop`](crate::FinishReason::Stop),
//! `max_tokens` to [`Length`](crate::FinishReason::Length), `refusal` to
//! [`ContentFilter`](crate::FinishReason::ContentFilter) (OpenAI's words for these, which the
//! two backends share, too), anything else to [`Other`](crate::FinishReason::Other). As for the
//! OpenAI backend, a `Length` or `ContentFilter` answer with text is returned as a completion,
//! and one without text is an error of kind [`Length`](BackendErrorKind::Length) or
//! [`ContentFilter`](BackendErrorKind::ContentFilter).
//! `prompt_tokens` counts `input_tokens` plus the cache creation and cache read tokens.
//!
//! # Errors
//!
//! Error bodies have the shape `{"type": "error", "error": {"type": "...", "message": "..."}}`;
//! the message is kept. 429 is [`RateLimited`](BackendErrorKind::RateLimited) (with
//! `retry-after` or the `anthropic-ratelimit-*-reset` times) unless it speaks of credit or
//! billing; 402 (`billing_error`) and "credit balance is too low" are
//! [`QuotaExhausted`](BackendErrorKind::QuotaExhausted); 500, 529 (`overloaded_error`) and other
//! 5xx are [`Server`](BackendErrorKind::Server); 400, 413, 422 are
//! [`InvalidRequest`](BackendErrorKind::InvalidRequest); 401 and 403 are
//! [`Authentication`](BackendErrorKind::Authentication); 404 is
//! [`NotFound`](BackendErrorKind::NotFound); timeouts and connection failures are `Timeout` and
//! `Connection`; a malformed body is `InvalidResponse`. As for the OpenAI backend, a 429 for a
//! daily limit is `QuotaExhausted`; a redirect is not followed (the `x-api-key` header would go
//! along) and is a fatal [`Fatal`](BackendErrorKind::Fatal) error naming the host it
//! pointed to; a body over
//! [`max_response_bytes`](AnthropicBackendBuilder::max_response_bytes) (8 MiB) is an
//! [`Other`](BackendErrorKind::Other) error, not retried; waits the server asks for are read
//! with checked arithmetic and cut to a day; and a 401 or 403 from a custom base URL to which
//! no key was sent says how to send one.
//!
//! # Keys
//!
//! The key is the one given with [`api_key`](AnthropicBackendBuilder::api_key) or named with
//! [`api_key_env`](AnthropicBackendBuilder::api_key_env); without either,
//! `ANTHROPIC_API_KEY` is used only when requests go to Anthropic's own host
//! ([`DEFAULT_BASE_URL`]), and a custom base URL gets no key.
//!
//! # Tracing
//!
//! As for the OpenAI backend: an `info` span `llm_call` per call (`backend = "anthropic"`),
//! text only at `trace` level, the key never.

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use secrecy::SecretString;
use serde::Deserialize;

use crate::backend::http::{self, Fields, HttpBackend, HttpBackendBuilder, Provider, ServerError};
use crate::backend::{Completion, CompletionRequest, Message, Role, Usage};
use crate::error::{BackendError, BackendErrorKind, Error};

/// The default base URL, Anthropic's API.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com/v1";

/// The default `anthropic-version` header.
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// A backend for Anthropic's Messages API. Made with [`AnthropicBackend::builder`]; see the
/// [module docs](self).
///
/// Cheap to clone: clones share one connection pool.
pub type AnthropicBackend = HttpBackend<Anthropic>;

/// Builds an [`AnthropicBackend`]. Setters consume and return the builder;
/// [`build`](HttpBackendBuilder::build) is the one place an error comes out.
pub type AnthropicBackendBuilder = HttpBackendBuilder<Anthropic>;

/// A messages request body.
#[cfg(feature = "batch")]
pub(crate) type Body<'a> = http::Body<'a, Anthropic>;

/// The settings of an [`AnthropicBackend`] that are Anthropic's own (see
/// [`version`](AnthropicBackendBuilder::version) and
/// [`default_max_tokens`](AnthropicBackendBuilder::default_max_tokens)).
#[derive(Debug, Clone)]
pub struct Anthropic {
    version: String,
    default_max_tokens: u32,
}

impl Default for Anthropic {
    fn default() -> Self {
        Anthropic {
            version: DEFAULT_VERSION.to_string(),
            default_max_tokens: 1024,
        }
    }
}

impl AnthropicBackendBuilder {
    setters! {
        /// The `anthropic-version` header. Default [`DEFAULT_VERSION`].
        version(version: impl Into<String>) => provider.version = version.into();
        /// The `max_tokens` sent when a request sets none (the API requires one). Default 1024;
        /// `build` rejects 0.
        default_max_tokens(max_tokens: u32) => provider.default_max_tokens = max_tokens;
    }
}

impl Provider for Anthropic {
    const NAME: &'static str = "anthropic";
    const PATH: &'static str = "messages";
    const BASE_URL: &'static str = DEFAULT_BASE_URL;
    const KEY_ENV: &'static str = "ANTHROPIC_API_KEY";

    fn key_header(key: &str) -> (HeaderName, String) {
        (HeaderName::from_static("x-api-key"), key.to_string())
    }

    fn settings(&self, headers: &mut HeaderMap) -> Result<Vec<(&'static str, String)>, Error> {
        if self.default_max_tokens == 0 {
            return Err(Error::config(
                "anthropic backend: default_max_tokens must be at least 1",
            ));
        }
        let version = HeaderValue::from_str(&self.version).map_err(|_| {
            Error::config(format!(
                "anthropic backend: invalid version {:?}",
                self.version
            ))
        })?;
        headers.insert(HeaderName::from_static("anthropic-version"), version);
        Ok(vec![
            ("version", self.version.clone()),
            ("default_max_tokens", self.default_max_tokens.to_string()),
        ])
    }

    /// `model`, `max_tokens`, the system messages joined into `system`, the other messages,
    /// then the request's settings that are set.
    fn write_body<M: serde::ser::SerializeMap>(
        &self,
        model: &str,
        r: &CompletionRequest,
        fields: &mut Fields<'_, M>,
    ) -> Result<(), M::Error> {
        fields.set("model", Some(model))?;
        fields.set("max_tokens", r.max_tokens.or(Some(self.default_max_tokens)))?;
        let (system, messages): (Vec<&Message>, Vec<&Message>) =
            r.messages.iter().partition(|m| m.role == Role::System);
        let system: Vec<&str> = system.iter().map(|m| m.content.as_str()).collect();
        fields.set(
            "system",
            Some(system.join("\n\n")).filter(|_| !system.is_empty()),
        )?;
        fields.set("messages", Some(messages))?;
        fields.set("temperature", r.temperature)?;
        fields.set("top_p", r.top_p)?;
        fields.set("stop_sequences", Some(&r.stop).filter(|s| !s.is_empty()))
    }

    /// The completion in a 2xx Messages API body (the online answer, or the `message` of a
    /// batch result), or the error it carries.
    fn completion(
        text: &str,
        model: &str,
        key: Option<&SecretString>,
    ) -> Result<Completion, BackendError> {
        let wire: WireResponse = serde_json::from_str(text)
            .map_err(|e| http::invalid_json(e, &http::redact(text, key)))?;
        if wire.kind.as_deref() == Some("error") {
            let server = ServerError::parse(text).unwrap_or_default();
            return Err(http::body_error(&server, key));
        }
        let blocks = wire.content.ok_or_else(|| {
            BackendError::new(BackendErrorKind::InvalidResponse, "response has no content")
        })?;
        let text: String = blocks
            .iter()
            .filter(|b| b.kind == "text")
            .filter_map(|b| b.text.as_deref())
            .collect();
        let usage = wire.usage.map_or(Usage::default(), |u| {
            Usage::new(
                u.input_tokens
                    .unwrap_or(0)
                    .saturating_add(u.cache_creation_input_tokens.unwrap_or(0))
                    .saturating_add(u.cache_read_input_tokens.unwrap_or(0)),
                u.output_tokens.unwrap_or(0),
            )
        });
        http::completion(
            text,
            wire.stop_reason.as_deref(),
            usage,
            wire.model,
            model,
            "the model refused to answer",
        )
    }
}

#[derive(Debug, Deserialize)]
struct WireResponse {
    #[serde(rename = "type")]
    kind: Option<String>,
    model: Option<String>,
    content: Option<Vec<WireBlock>>,
    stop_reason: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireBlock {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn body_extracts_system_and_defaults_max_tokens() {
        let backend = AnthropicBackend::builder()
            .base_url("http://127.0.0.1:1")
            .model("m")
            .build()
            .unwrap();
        let req = CompletionRequest::new(vec![
            Message::system("a"),
            Message::user("u"),
            Message::system("b"),
        ])
        .with_seed(9);
        let body = serde_json::to_value(backend.body(&req)).unwrap();
        assert_eq!(
            body,
            json!({"model": "m", "max_tokens": 1024, "system": "a\n\nb",
                   "messages": [{"role": "user", "content": "u"}]})
        );
    }
}
