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
//! `end_turn` and `stop_sequence` map to [`FinishReason::Stop`], `max_tokens` to
//! [`FinishReason::Length`], `refusal` to [`FinishReason::ContentFilter`], anything else to
//! [`FinishReason::Other`]. As for the OpenAI backend, a `Length` or `ContentFilter` answer
//! with text is returned as a completion, and one without text is an error of kind
//! [`Length`](BackendErrorKind::Length) or [`ContentFilter`](BackendErrorKind::ContentFilter).
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

use std::borrow::Cow;
use std::fmt;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::field::Empty;
use tracing::Instrument;

use crate::backend::http::{self, HttpConfig, ServerError};
use crate::backend::{
    Completion, CompletionRequest, FinishReason, LlmBackend, Message, Role, Usage,
};
use crate::error::{BackendError, BackendErrorKind, Error};

/// The default base URL, Anthropic's API.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com/v1";

/// The default `anthropic-version` header.
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// A backend for Anthropic's Messages API. Made with [`AnthropicBackend::builder`]; see the
/// [module docs](self).
///
/// Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct AnthropicBackend {
    pub(crate) client: reqwest::Client,
    pub(crate) url: Url,
    /// The base URL (up to and including the version prefix), for the batch API.
    #[cfg_attr(not(feature = "batch"), allow(dead_code))]
    pub(crate) base: Url,
    pub(crate) model: String,
    pub(crate) api_key: Option<SecretString>,
    headers: HeaderMap,
    extra_body: serde_json::Map<String, Value>,
    pub(crate) max_response_bytes: usize,
    /// Added to a 401 or 403 when no key was sent to a custom URL.
    pub(crate) no_key_note: Option<String>,
    /// See [`LlmBackend::identity`].
    pub(crate) identity: String,
    default_max_tokens: u32,
}

impl AnthropicBackend {
    /// A builder with the defaults (Anthropic's base URL, no key, no model).
    pub fn builder() -> AnthropicBackendBuilder {
        AnthropicBackendBuilder {
            config: HttpConfig::new(DEFAULT_BASE_URL, "ANTHROPIC_API_KEY"),
            version: DEFAULT_VERSION.to_string(),
            default_max_tokens: 1024,
        }
    }

    /// The full URL requests are sent to, as it may be shown in a log or a summary: without
    /// a user name, password, query or fragment, where credentials may hide.
    #[must_use]
    pub fn endpoint(&self) -> String {
        crate::backend::http::display_url(&self.url)
    }

    /// The JSON body of `request`, serialised straight from it (no intermediate JSON tree, no
    /// copy of the messages).
    pub(crate) fn body<'a>(&'a self, request: &'a CompletionRequest) -> Body<'a> {
        Body {
            backend: self,
            request,
        }
    }

    pub(crate) fn headers(&self) -> HeaderMap {
        let mut headers = self.headers.clone();
        if let Some(key) = &self.api_key {
            if let Ok(mut value) = HeaderValue::from_str(key.expose_secret()) {
                value.set_sensitive(true);
                headers.insert(HeaderName::from_static("x-api-key"), value);
            }
        }
        headers
    }

    async fn call(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let span = tracing::Span::current();
        tracing::trace!(messages = ?request.messages, "request");
        let body = self.body(&request);
        let (status, headers, text) = http::post_json(
            &self.client,
            &self.url,
            self.headers(),
            &body,
            request.text_len(),
            self.max_response_bytes,
        )
        .await?;
        span.record("status", status.as_u16());
        let key = self.api_key.as_ref();
        if !status.is_success() {
            return Err(http::status_error(
                status,
                &headers,
                &text,
                key,
                self.no_key_note.as_deref(),
            ));
        }
        let completion = self.completion_from_body(&text)?;
        span.record(
            "finish_reason",
            tracing::field::debug(&completion.finish_reason),
        );
        span.record("prompt_tokens", completion.usage.prompt_tokens);
        span.record("completion_tokens", completion.usage.completion_tokens);
        tracing::trace!(text = %completion.text, "response");
        Ok(completion)
    }
}

impl AnthropicBackend {
    /// The completion in a 2xx Messages API body (the online answer, or the `message` of a
    /// batch result), or the error it carries.
    pub(crate) fn completion_from_body(&self, text: &str) -> Result<Completion, BackendError> {
        let key = self.api_key.as_ref();
        let wire: WireResponse = match serde_json::from_str(text) {
            Ok(wire) => wire,
            Err(e) => return Err(http::invalid_json(e, &http::redact(text, key))),
        };
        if wire.kind.as_deref() == Some("error") {
            let server = ServerError::parse(text).unwrap_or_default();
            return Err(http::body_error(&server, key));
        }
        wire.into_completion(&self.model)
    }
}

/// A messages request body: the system messages joined into `system`, the other messages,
/// the set fields, then the extra body fields, which replace set fields of the same name.
pub(crate) struct Body<'a> {
    backend: &'a AnthropicBackend,
    request: &'a CompletionRequest,
}

/// The messages of a conversation but its system messages.
struct NonSystem<'a>(&'a [Message]);

impl Serialize for NonSystem<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().filter(|m| m.role != Role::System))
    }
}

impl Serialize for Body<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (b, r) = (self.backend, self.request);
        let extra = &b.extra_body;
        let mut map = serializer.serialize_map(None)?;
        http::body_field(&mut map, extra, "model", &b.model)?;
        let max_tokens = r.max_tokens.unwrap_or(b.default_max_tokens);
        http::body_field(&mut map, extra, "max_tokens", &max_tokens)?;
        let mut system = r.messages.iter().filter(|m| m.role == Role::System);
        if let Some(first) = system.next() {
            let mut joined = first.content.clone();
            for m in system {
                joined.push_str("\n\n");
                joined.push_str(&m.content);
            }
            http::body_field(&mut map, extra, "system", &joined)?;
        }
        http::body_field(&mut map, extra, "messages", &NonSystem(&r.messages))?;
        if let Some(t) = r.temperature {
            http::body_field(&mut map, extra, "temperature", &http::f32_json(t))?;
        }
        if let Some(p) = r.top_p {
            http::body_field(&mut map, extra, "top_p", &http::f32_json(p))?;
        }
        if !r.stop.is_empty() {
            http::body_field(&mut map, extra, "stop_sequences", &r.stop)?;
        }
        for (k, v) in extra {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl fmt::Debug for AnthropicBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicBackend")
            .field("url", &http::display_url(&self.url))
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field(
                "extra_body_fields",
                &self.extra_body.keys().collect::<Vec<_>>(),
            )
            .field("default_max_tokens", &self.default_max_tokens)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl LlmBackend for AnthropicBackend {
    /// Sends one Messages API request.
    ///
    /// # Errors
    ///
    /// See the [module docs](self) for how failures are classified.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future aborts the HTTP request; the connection pool stays usable.
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let span = tracing::info_span!(
            "llm_call",
            backend = "anthropic",
            model = %self.model,
            status = Empty,
            finish_reason = Empty,
            prompt_tokens = Empty,
            completion_tokens = Empty,
        );
        self.call(request).instrument(span).await
    }

    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed("anthropic")
    }

    fn model(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.model)
    }

    /// The name, the endpoint (without credentials or query), the model and every other
    /// setting that changes the answers (extra body fields, the names of extra headers, ...);
    /// never the key.
    fn identity(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.identity)
    }
}

/// Builds an [`AnthropicBackend`]. Setters consume and return the builder;
/// [`build`](Self::build) is the one place an error comes out.
#[must_use]
pub struct AnthropicBackendBuilder {
    config: HttpConfig,
    version: String,
    default_max_tokens: u32,
}

impl fmt::Debug for AnthropicBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicBackendBuilder")
            .field("config", &self.config)
            .field("version", &self.version)
            .field("default_max_tokens", &self.default_max_tokens)
            .finish()
    }
}

impl AnthropicBackendBuilder {
    http::http_config_setters! {
        base_url: "The API's base URL including the version prefix; `/messages` is appended. A
    URL without a path gets `/v1`. Default [`DEFAULT_BASE_URL`].",
        model: "The model name sent with every request. Required.",
        header: "Adds a header sent with every request (e.g. `anthropic-beta`). Values are
    treated as sensitive and not printed.",
        timeout: "The most one request may take, from sending to the end of the body; `None` for
    no limit. Default 600 s. Anything over a year is cut to a year.",
        extra_body: "Adds a field to every request body (`top_k`, `metadata`, `thinking`, ...).
    It wins over a field of the same name set from the request.",
        client: "Uses this client instead of building one. The timeout settings are then the
    client's, and so is its redirect policy: reqwest's default follows redirects, and the
    `x-api-key` header with them, so build it with
    `.redirect(reqwest::redirect::Policy::none())`.",
    }

    /// The `anthropic-version` header. Default [`DEFAULT_VERSION`].
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// The `max_tokens` sent when a request sets none (the API requires one). Default 1024.
    pub fn default_max_tokens(mut self, max_tokens: u32) -> Self {
        self.default_max_tokens = max_tokens;
        self
    }

    /// Builds the backend and its HTTP client.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when the model is empty, `default_max_tokens` or `max_response_bytes`
    /// is 0, the base URL, the version or a header is invalid, the key's environment variable
    /// is unset or empty (the one named with [`api_key_env`](Self::api_key_env), or
    /// `ANTHROPIC_API_KEY` when no key is given and requests go to Anthropic's own host), or
    /// the HTTP client cannot be built.
    pub fn build(self) -> Result<AnthropicBackend, Error> {
        let config = self.config;
        if config.model.trim().is_empty() {
            return Err(Error::config("anthropic backend: no model set"));
        }
        if self.default_max_tokens == 0 {
            return Err(Error::config(
                "anthropic backend: default_max_tokens must be at least 1",
            ));
        }
        let url = config.endpoint("messages")?;
        let api_key = config.checked_key("anthropic", &url)?;
        if let Some(key) = &api_key {
            if HeaderValue::from_str(key.expose_secret()).is_err() {
                return Err(Error::config(
                    "anthropic backend: the API key contains characters not allowed in a header",
                ));
            }
        }
        let mut headers = config.header_map()?;
        let version = HeaderValue::from_str(&self.version).map_err(|_| {
            Error::config(format!(
                "anthropic backend: invalid version {:?}",
                self.version
            ))
        })?;
        headers.insert(HeaderName::from_static("anthropic-version"), version);
        let client = config.client()?;
        let no_key_note = config.no_key_note(&url, api_key.as_ref());
        let identity = config.identity(
            "anthropic",
            &url,
            &[
                ("version", &self.version),
                ("default_max_tokens", &self.default_max_tokens.to_string()),
            ],
        );
        let mut base = url.clone();
        base.set_path(url.path().strip_suffix("/messages").unwrap_or(url.path()));
        Ok(AnthropicBackend {
            client,
            base,
            url,
            model: config.model,
            api_key,
            headers,
            extra_body: config.extra_body,
            max_response_bytes: config.max_response_bytes,
            no_key_note,
            identity,
            default_max_tokens: self.default_max_tokens,
        })
    }
}

#[derive(Debug, Deserialize)]
struct WireResponse {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Option<Vec<WireBlock>>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl WireResponse {
    fn into_completion(self, requested_model: &str) -> Result<Completion, BackendError> {
        let Some(blocks) = self.content else {
            return Err(BackendError::new(
                BackendErrorKind::InvalidResponse,
                "response has no content",
            ));
        };
        let text: String = blocks
            .iter()
            .filter(|b| b.kind == "text")
            .filter_map(|b| b.text.as_deref())
            .collect();
        let finish_reason = match self.stop_reason.as_deref() {
            None | Some("end_turn" | "stop_sequence") => FinishReason::Stop,
            Some("max_tokens") => FinishReason::Length,
            Some("refusal") => FinishReason::ContentFilter,
            Some(other) => FinishReason::Other(other.to_string()),
        };
        if text.trim().is_empty() {
            match finish_reason {
                FinishReason::Length => {
                    return Err(BackendError::new(
                        BackendErrorKind::Length,
                        "the token limit was reached before any text",
                    ))
                }
                FinishReason::ContentFilter => {
                    return Err(BackendError::new(
                        BackendErrorKind::ContentFilter,
                        "the model refused to answer",
                    ))
                }
                _ => {}
            }
        }
        let usage = self.usage.map_or(Usage::default(), |u| {
            Usage::new(
                u.input_tokens
                    .unwrap_or(0)
                    .saturating_add(u.cache_creation_input_tokens.unwrap_or(0))
                    .saturating_add(u.cache_read_input_tokens.unwrap_or(0)),
                u.output_tokens.unwrap_or(0),
            )
        });
        let model = self
            .model
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| requested_model.to_string());
        Ok(Completion {
            text,
            finish_reason,
            usage,
            model,
        })
    }
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
