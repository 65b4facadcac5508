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
//! A response whose `finish_reason` is `length` or `content_filter` (or Anthropic's words for
//! these, `max_tokens` and `refusal`, which the two backends share) is returned as a
//! [`Completion`] with that [`FinishReason`](crate::FinishReason) when it has any text (apart
//! from white space), so the caller decides whether a cut-off answer is usable. When it has no text, it is an error
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

use reqwest::header::{HeaderMap, HeaderName, AUTHORIZATION};
use secrecy::SecretString;
use serde::Deserialize;

use crate::backend::http::{self, Fields, HttpBackend, HttpBackendBuilder, Provider, ServerError};
use crate::backend::{Completion, CompletionRequest, Usage};
use crate::error::{BackendError, BackendErrorKind, Error};

/// The default base URL, OpenAI's own API.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// A backend for OpenAI-compatible chat completion endpoints. Made with
/// [`OpenAiBackend::builder`]; see the [module docs](self).
///
/// Cheap to clone: clones share one connection pool.
pub type OpenAiBackend = HttpBackend<OpenAi>;

/// Builds an [`OpenAiBackend`]. Setters consume and return the builder;
/// [`build`](HttpBackendBuilder::build) is the one place an error comes out.
pub type OpenAiBackendBuilder = HttpBackendBuilder<OpenAi>;

/// A chat completion request body.
#[cfg(feature = "batch")]
pub(crate) type Body<'a> = http::Body<'a, OpenAi>;

/// The settings of an [`OpenAiBackend`] that are OpenAI's own (see
/// [`max_tokens_field`](OpenAiBackendBuilder::max_tokens_field)).
#[derive(Debug, Clone)]
pub struct OpenAi {
    max_tokens_field: String,
}

impl Default for OpenAi {
    fn default() -> Self {
        OpenAi {
            max_tokens_field: "max_tokens".to_string(),
        }
    }
}

impl OpenAiBackendBuilder {
    setters! {
        /// The name of the field the token limit is sent in. Default `max_tokens`; OpenAI's
        /// reasoning models want `max_completion_tokens`. `build` rejects an empty name.
        max_tokens_field(name: impl Into<String>) => provider.max_tokens_field = name.into();
    }
}

impl Provider for OpenAi {
    const NAME: &'static str = "openai";
    const PATH: &'static str = "chat/completions";
    const BASE_URL: &'static str = DEFAULT_BASE_URL;
    const KEY_ENV: &'static str = "OPENAI_API_KEY";

    fn key_header(key: &str) -> (HeaderName, String) {
        (AUTHORIZATION, format!("Bearer {key}"))
    }

    fn settings(&self, _: &mut HeaderMap) -> Result<Vec<(&'static str, String)>, Error> {
        if self.max_tokens_field.is_empty() {
            return Err(Error::config("openai backend: empty max_tokens field name"));
        }
        Ok(vec![("max_tokens_field", self.max_tokens_field.clone())])
    }

    /// `model`, `messages`, then the request's settings that are set.
    fn write_body<M: serde::ser::SerializeMap>(
        &self,
        model: &str,
        r: &CompletionRequest,
        fields: &mut Fields<'_, M>,
    ) -> Result<(), M::Error> {
        fields.set("model", Some(model))?;
        fields.set("messages", Some(&r.messages))?;
        fields.set("temperature", r.temperature)?;
        fields.set("top_p", r.top_p)?;
        fields.set(&self.max_tokens_field, r.max_tokens)?;
        fields.set("seed", r.seed)?;
        fields.set("stop", Some(&r.stop).filter(|s| !s.is_empty()))
    }

    /// The completion in a 2xx chat completion body (the online answer, or one line of a
    /// batch output), or the error it carries.
    fn completion(
        text: &str,
        model: &str,
        key: Option<&SecretString>,
    ) -> Result<Completion, BackendError> {
        let server_error = || ServerError::parse(text).map(|s| http::body_error(&s, key));
        let wire: WireResponse = serde_json::from_str(text).map_err(|e| {
            server_error().unwrap_or_else(|| http::invalid_json(e, &http::redact(text, key)))
        })?;
        let Some(choice) = wire.choices.into_iter().next() else {
            return Err(server_error().unwrap_or_else(|| {
                BackendError::new(BackendErrorKind::InvalidResponse, "response has no choices")
            }));
        };
        let (content, refusal) = match choice.message {
            Some(m) => (m.content, m.refusal),
            None => (choice.text, None),
        };
        let text = content.unwrap_or_default();
        if let Some(refusal) = refusal.filter(|r| text.trim().is_empty() && !r.trim().is_empty()) {
            return Err(BackendError::new(
                BackendErrorKind::ContentFilter,
                format!("the model refused: {}", http::truncate(&refusal, 300)),
            ));
        }
        let usage = wire.usage.map_or(Usage::default(), |u| {
            Usage::new(
                u.prompt_tokens.unwrap_or(0),
                u.completion_tokens.unwrap_or(0),
            )
        });
        http::completion(
            text,
            choice.finish_reason.as_deref(),
            usage,
            wire.model,
            model,
            "the content filter removed the answer",
        )
    }
}

#[derive(Debug, Deserialize)]
struct WireResponse {
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WireChoice>,
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireChoice {
    message: Option<WireMessage>,
    /// Legacy completions-style text, which a few servers put here.
    text: Option<String>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    content: Option<String>,
    refusal: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FinishReason, Message};
    use serde_json::{json, Value};

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
        // As sent: an `f32` is written as its shortest decimal only by the JSON writer.
        let body: Value =
            serde_json::from_slice(&serde_json::to_vec(&backend.body(&req)).unwrap()).unwrap();
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
        let c = OpenAi::completion(
            r#"{"model":"x","choices":[{"message":{"content":"hi"},"finish_reason":"length"}],
               "usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            "m",
            None,
        )
        .unwrap();
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(c.usage, Usage::new(3, 1));
        assert_eq!(c.model, "x");
        let w = r#"{"choices":[{"message":{"content":null},"finish_reason":"content_filter"}]}"#;
        assert_eq!(
            OpenAi::completion(w, "m", None).unwrap_err().kind(),
            BackendErrorKind::ContentFilter
        );
    }
}
