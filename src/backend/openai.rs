//! [`OpenAiBackend`]: any server with an OpenAI-compatible `/v1/chat/completions` endpoint
//! (OpenAI, vLLM, llama.cpp's `llama-server`, Ollama, LM Studio, most gateways).
//!
//! ```no_run
//! use std::time::Duration;
//! use rmboost::backend::openai::OpenAiBackend;
//! use rmboost::backend::retry::Retry;
//! use rmboost::{CompletionRequest, LlmBackend, Message};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = OpenAiBackend::builder()
//!     .base_url("http://127.0.0.1:8080/v1")
//!     .model("qwen2.5-7b-instruct")
//!     .api_key_env("OPENAI_API_KEY")
//!     .timeout(Duration::from_secs(120))
//!     .build()?;
//! let backend = Retry::new(backend);
//! let request = CompletionRequest::new(vec![Message::user("Name a prime number.")]);
//! let completion = backend.complete(request).await?;
//! println!("{} ({} tokens)", completion.text, completion.usage.total());
//! # Ok(()) }
//! ```
//!
//! # What is sent
//!
//! `model`, `messages`, and of the request's settings those that are set: `temperature`,
//! `top_p`, `max_tokens` (or the name set with
//! [`max_tokens_field`](OpenAiBackendBuilder::max_tokens_field)), `seed`, `stop`; then the
//! [extra body fields](OpenAiBackendBuilder::extra_body), which win over the fields above.
//! The key goes in `Authorization: Bearer ...`.
//!
//! # Truncated and filtered answers
//!
//! A response whose `finish_reason` is `length` or `content_filter` is returned as a
//! [`Completion`] with that [`FinishReason`] when it has any text (apart from white space), so
//! the caller decides whether a cut-off answer is usable. When it has no text, it is an error
//! of kind [`Length`](BackendErrorKind::Length) or
//! [`ContentFilter`](BackendErrorKind::ContentFilter) (a `refusal` with no content is a
//! `ContentFilter` error too). Neither is retried by [`Retry`](super::retry::Retry).
//!
//! # Errors
//!
//! HTTP failures are classified as follows (the server's message is kept, the key never):
//!
//! | response | kind | retried |
//! |---|---|---|
//! | 429 | [`RateLimited`](BackendErrorKind::RateLimited), with `Retry-After` or the rate-limit reset headers | yes |
//! | 429 saying the quota or credit is exhausted (`insufficient_quota`, "billing", ...), 402 | [`QuotaExhausted`](BackendErrorKind::QuotaExhausted) | no, fatal |
//! | 429 for a daily limit ("requests per day (RPD)", "tokens per day (TPD)", "per day", "daily") | [`QuotaExhausted`](BackendErrorKind::QuotaExhausted), the message starting "daily limit reached" | no, fatal |
//! | 3xx (redirects are not followed: the key would go along) | [`Fatal`](BackendErrorKind::Fatal), naming the host it pointed to | no, fatal |
//! | a body over [`max_response_bytes`](OpenAiBackendBuilder::max_response_bytes) (8 MiB) | [`Other`](BackendErrorKind::Other) | no |
//! | 5xx, 529, 408, timeouts, connection errors | `Server`, `Timeout`, `Connection` | yes |
//! | 2xx with malformed JSON or no choices | [`InvalidResponse`](BackendErrorKind::InvalidResponse) | yes |
//! | 400, 413, 422 | [`InvalidRequest`](BackendErrorKind::InvalidRequest) | no |
//! | 401, 403 | [`Authentication`](BackendErrorKind::Authentication) | no, fatal |
//! | 404 | [`NotFound`](BackendErrorKind::NotFound) | no, fatal |
//!
//! A 401 or 403 from a custom base URL to which no key was sent says so, and how to send one
//! ([`api_key_env`](OpenAiBackendBuilder::api_key_env)). The waits servers ask for
//! (`retry-after-ms`, `retry-after`, `x-ratelimit-reset-*`) are read with checked arithmetic:
//! negative or NaN values are ignored, and anything over a day is cut to a day. A wait longer
//! than the retry policy's limit makes [`Retry`](super::retry::Retry) stop with a fatal
//! [`RetryAfterTooLong`](BackendErrorKind::RetryAfterTooLong) error.
//!
//! # Keys
//!
//! The key is the one given with [`api_key`](OpenAiBackendBuilder::api_key) or named with
//! [`api_key_env`](OpenAiBackendBuilder::api_key_env); without either, `OPENAI_API_KEY` is
//! used only when requests go to OpenAI's own host ([`DEFAULT_BASE_URL`]), and a custom base
//! URL gets no key.
//!
//! # Tracing
//!
//! Each call runs in an `info` span `llm_call` with the fields `backend`, `model`, and, once
//! known, `status`, `finish_reason`, `prompt_tokens` and `completion_tokens`. Under
//! [`Retry`](super::retry::Retry) it nests in the `llm_attempt` span that carries the attempt
//! number. The messages and the answer are logged only at `trace` level; the key never.

use std::borrow::Cow;
use std::fmt;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::field::Empty;
use tracing::Instrument;

use crate::backend::http::{self, HttpConfig, ServerError};
use crate::backend::{Completion, CompletionRequest, FinishReason, LlmBackend, Usage};
use crate::error::{BackendError, BackendErrorKind, Error};

/// The default base URL, OpenAI's own API.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// A backend for OpenAI-compatible chat completion endpoints. Made with
/// [`OpenAiBackend::builder`]; see the [module docs](self).
///
/// Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct OpenAiBackend {
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
    max_tokens_field: String,
}

impl OpenAiBackend {
    /// A builder with the defaults (OpenAI's base URL, no key, no model).
    pub fn builder() -> OpenAiBackendBuilder {
        OpenAiBackendBuilder {
            config: HttpConfig::new(DEFAULT_BASE_URL, "OPENAI_API_KEY"),
            max_tokens_field: "max_tokens".to_string(),
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
            if let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
            {
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
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

impl OpenAiBackend {
    /// The completion in a 2xx chat completion body (the online answer, or one line of a batch
    /// output), or the error it carries.
    pub(crate) fn completion_from_body(&self, text: &str) -> Result<Completion, BackendError> {
        let key = self.api_key.as_ref();
        let wire: WireResponse = match serde_json::from_str(text) {
            Ok(wire) => wire,
            Err(e) => {
                if let Some(server) = ServerError::parse(text) {
                    return Err(http::body_error(&server, key));
                }
                return Err(http::invalid_json(e, &http::redact(text, key)));
            }
        };
        if wire.choices.is_empty() {
            if let Some(server) = ServerError::parse(text) {
                return Err(http::body_error(&server, key));
            }
        }
        wire.into_completion(&self.model)
    }
}

/// A chat completion request body: the set fields in a fixed order, then the extra body
/// fields, which replace set fields of the same name.
pub(crate) struct Body<'a> {
    backend: &'a OpenAiBackend,
    request: &'a CompletionRequest,
}

impl Serialize for Body<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (b, r) = (self.backend, self.request);
        let extra = &b.extra_body;
        let mut map = serializer.serialize_map(None)?;
        http::body_field(&mut map, extra, "model", &b.model)?;
        http::body_field(&mut map, extra, "messages", &r.messages)?;
        if let Some(t) = r.temperature {
            http::body_field(&mut map, extra, "temperature", &http::f32_json(t))?;
        }
        if let Some(p) = r.top_p {
            http::body_field(&mut map, extra, "top_p", &http::f32_json(p))?;
        }
        if let Some(n) = r.max_tokens {
            http::body_field(&mut map, extra, &b.max_tokens_field, &n)?;
        }
        if let Some(seed) = r.seed {
            http::body_field(&mut map, extra, "seed", &seed)?;
        }
        if !r.stop.is_empty() {
            http::body_field(&mut map, extra, "stop", &r.stop)?;
        }
        for (k, v) in extra {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("url", &http::display_url(&self.url))
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field(
                "extra_body_fields",
                &self.extra_body.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl LlmBackend for OpenAiBackend {
    /// Sends one chat completion request.
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
            backend = "openai",
            model = %self.model,
            status = Empty,
            finish_reason = Empty,
            prompt_tokens = Empty,
            completion_tokens = Empty,
        );
        self.call(request).instrument(span).await
    }

    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed("openai")
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

/// Builds an [`OpenAiBackend`]. Setters consume and return the builder; [`build`](Self::build)
/// is the one place an error comes out.
#[must_use]
pub struct OpenAiBackendBuilder {
    config: HttpConfig,
    max_tokens_field: String,
}

impl fmt::Debug for OpenAiBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackendBuilder")
            .field("config", &self.config)
            .field("max_tokens_field", &self.max_tokens_field)
            .finish()
    }
}

impl OpenAiBackendBuilder {
    http::http_config_setters! {
        base_url: "The API's base URL, up to and including the version prefix, e.g.
`http://127.0.0.1:8080/v1`; `/chat/completions` is appended. A URL without a path gets `/v1`.
Default [`DEFAULT_BASE_URL`].",
        model: "The model name sent with every request. Required (any non-empty name for servers
    that ignore it, such as llama.cpp's).",
        header: "Adds a header sent with every request (a gateway's routing or auth header, an
    organisation id). Values are treated as sensitive and not printed.",
        timeout: "The most one request may take, from sending to the end of the body; `None` for
    no limit. Default 600 s (slow local models need long). Anything over a year is cut to a year.",
        extra_body: "Adds a field to every request body, for server-specific options (`top_k`,
`repetition_penalty`, `response_format`, vLLM's `guided_json`, ...). It wins over a field of
the same name set from the request.",
        client: "Uses this client instead of building one (to share a pool between backends or
    set proxies and certificates). The timeout settings are then the client's, and so is its
    redirect policy: reqwest's default follows redirects, and the key and extra headers with
    them, so build it with `.redirect(reqwest::redirect::Policy::none())` (the backend then
    reports a redirect as an error, as with its own client).",
    }

    /// The name of the field the token limit is sent in. Default `max_tokens`; OpenAI's
    /// reasoning models want `max_completion_tokens`.
    pub fn max_tokens_field(mut self, name: impl Into<String>) -> Self {
        self.max_tokens_field = name.into();
        self
    }

    /// Builds the backend and its HTTP client.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when the model is empty, the base URL or a header is invalid,
    /// `max_response_bytes` is 0, the key's environment variable is unset or empty (the one
    /// named with [`api_key_env`](Self::api_key_env), or `OPENAI_API_KEY` when no key is given
    /// and requests go to OpenAI's own host), or the HTTP client cannot be built.
    pub fn build(self) -> Result<OpenAiBackend, Error> {
        let config = self.config;
        if config.model.trim().is_empty() {
            return Err(Error::config("openai backend: no model set"));
        }
        if self.max_tokens_field.is_empty() {
            return Err(Error::config("openai backend: empty max_tokens field name"));
        }
        let url = config.endpoint("chat/completions")?;
        let api_key = config.checked_key("openai", &url)?;
        if let Some(key) = &api_key {
            if HeaderValue::from_str(&format!("Bearer {}", key.expose_secret())).is_err() {
                return Err(Error::config(
                    "openai backend: the API key contains characters not allowed in a header",
                ));
            }
        }
        let headers = config.header_map()?;
        let client = config.client()?;
        let no_key_note = config.no_key_note(&url, api_key.as_ref());
        let identity = config.identity(
            "openai",
            &url,
            &[("max_tokens_field", &self.max_tokens_field)],
        );
        let mut base = url.clone();
        base.set_path(
            url.path()
                .strip_suffix("/chat/completions")
                .unwrap_or(url.path()),
        );
        Ok(OpenAiBackend {
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
            max_tokens_field: self.max_tokens_field,
        })
    }
}

#[derive(Debug, Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireChoice {
    #[serde(default)]
    message: Option<WireMessage>,
    /// Legacy completions-style text, which a few servers put here.
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

impl WireResponse {
    fn into_completion(self, requested_model: &str) -> Result<Completion, BackendError> {
        let Some(choice) = self.choices.into_iter().next() else {
            return Err(BackendError::new(
                BackendErrorKind::InvalidResponse,
                "response has no choices",
            ));
        };
        let (content, refusal) = match choice.message {
            Some(m) => (m.content, m.refusal),
            None => (choice.text, None),
        };
        let text = content.unwrap_or_default();
        let finish_reason = match choice.finish_reason.as_deref() {
            None | Some("stop" | "eos" | "end_turn" | "stop_sequence") => FinishReason::Stop,
            Some("length" | "max_tokens") => FinishReason::Length,
            Some("content_filter") => FinishReason::ContentFilter,
            Some(other) => FinishReason::Other(other.to_string()),
        };
        if text.trim().is_empty() {
            if let Some(refusal) = refusal.filter(|r| !r.trim().is_empty()) {
                return Err(BackendError::new(
                    BackendErrorKind::ContentFilter,
                    format!("the model refused: {}", http::truncate(&refusal, 300)),
                ));
            }
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
                        "the content filter removed the answer",
                    ))
                }
                _ => {}
            }
        }
        let usage = self.usage.map_or(Usage::default(), |u| {
            Usage::new(
                u.prompt_tokens.unwrap_or(0),
                u.completion_tokens.unwrap_or(0),
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
    use crate::Message;
    use serde_json::json;

    #[test]
    fn body_has_the_set_fields_and_extra() {
        let backend = OpenAiBackend::builder()
            .base_url("http://127.0.0.1:1")
            .model("m")
            .extra_body("top_k", json!(40))
            .build()
            .unwrap();
        let req = CompletionRequest {
            messages: vec![Message::system("s"), Message::user("u")],
            temperature: Some(0.7),
            top_p: None,
            max_tokens: Some(8),
            seed: Some(3),
            stop: vec!["END".into()],
        };
        let body = serde_json::to_value(backend.body(&req)).unwrap();
        assert_eq!(
            body,
            json!({"model": "m", "messages": [{"role": "system", "content": "s"},
                {"role": "user", "content": "u"}], "temperature": 0.7, "max_tokens": 8,
                "seed": 3, "stop": ["END"], "top_k": 40})
        );
        // An extra field replaces a set field of the same name, once.
        let backend = OpenAiBackend::builder()
            .base_url("http://127.0.0.1:1")
            .model("m")
            .extra_body("seed", json!(99))
            .build()
            .unwrap();
        let text = serde_json::to_string(&backend.body(&req)).unwrap();
        assert_eq!(text.matches("\"seed\"").count(), 1, "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["seed"], json!(99));
        assert_eq!(body["max_tokens"], json!(8));
    }

    #[test]
    fn wire_mapping() {
        let w: WireResponse = serde_json::from_str(
            r#"{"model":"x","choices":[{"message":{"content":"hi"},"finish_reason":"length"}],
               "usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
        )
        .unwrap();
        let c = w.into_completion("m").unwrap();
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(c.usage, Usage::new(3, 1));
        assert_eq!(c.model, "x");
        let w: WireResponse = serde_json::from_str(
            r#"{"choices":[{"message":{"content":null},"finish_reason":"content_filter"}]}"#,
        )
        .unwrap();
        assert_eq!(
            w.into_completion("m").unwrap_err().kind(),
            BackendErrorKind::ContentFilter
        );
    }
}
