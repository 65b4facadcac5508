//! What the HTTP backends share: [`HttpBackend`], which sends a request and reads the answer
//! for any [`Provider`] (the provider gives its body shape and answer parsing), its builder,
//! the client, error classification and `Retry-After` parsing.

use std::borrow::Cow;
use std::env::VarError;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::ser::SerializeMap;
use serde::Serialize;
use serde_json::Value;
use tracing::field::Empty;
use tracing::Instrument;

use crate::backend::{Completion, CompletionRequest, FinishReason, LlmBackend, Usage};
use crate::error::{BackendError, BackendErrorKind, Error};

/// The longest wait a server can ask for ([`retry_after`]) that is kept as it is; a longer
/// one (`retry-after: 1e300`) is cut to this. One day: a daily limit's reset is the longest
/// wait a provider legitimately asks for, and it is far beyond any retry policy's limit.
pub(crate) const MAX_SERVER_WAIT: Duration = Duration::from_secs(86_400);

/// The most that can be given as a request timeout; longer ones are cut to this (a year is
/// as good as no limit, and stays far from what makes the timer's arithmetic overflow).
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 86_400);

/// The most of an error (non-2xx) body that is read: enough for any error message.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;

/// `base` with `path` added to its path after exactly one `/`, whatever slashes `base` ends
/// with and `path` starts with (unlike [`Url::join`], which drops the last segment of a base
/// without a trailing slash). The endpoints of the online backends and of the batch APIs are
/// all made so.
pub(crate) fn join_path(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    url.set_path(&format!(
        "{}/{}",
        base.path().trim_end_matches('/'),
        path.trim_start_matches('/')
    ));
    url
}

/// Whether `url`'s host is this machine (`localhost`, `127.0.0.0/8`, `::1`).
pub(crate) fn is_loopback(url: &Url) -> bool {
    url.host_str().is_some_and(|host| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip = host.parse::<IpAddr>();
        host.eq_ignore_ascii_case("localhost") || ip.is_ok_and(|ip| ip.is_loopback())
    })
}

/// A URL without its query and fragment, for messages.
pub(crate) fn display_url(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}

/// Removes the key from a text a server sent back, should it echo it.
pub(crate) fn redact(text: &str, key: Option<&SecretString>) -> String {
    match key.map(ExposeSecret::expose_secret) {
        Some(key) if !key.is_empty() => text.replace(key, "[redacted]"),
        _ => text.to_string(),
    }
}

/// Cuts `text` to at most `max` characters.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// Sends a request built by `request` and reads the answer as text, at most `max_bytes` of it.
///
/// Returns the status, the headers and the body; a status other than 2xx is the caller's to
/// classify ([`status_error`]), except a redirect, which is an error here
/// ([`redirect_error`]). Of an error body only the first 64 KiB are read (the rest is
/// dropped; its message is in the beginning). A 2xx body longer than `max_bytes` (declared in
/// `Content-Length`, or found so while reading it in chunks) is an error
/// ([`too_large`]): nothing past the cap is read or kept.
pub(crate) async fn send(
    method: &str,
    request: reqwest::RequestBuilder,
    url: &Url,
    max_bytes: usize,
) -> Result<(StatusCode, HeaderMap, String), BackendError> {
    // A transport failure: no HTTP response, or a broken body.
    let failed = |err: reqwest::Error| {
        let (kind, what) = if err.is_timeout() {
            (BackendErrorKind::Timeout, "timed out")
        } else if err.is_connect() {
            (BackendErrorKind::Connection, "could not connect")
        } else if err.is_body() || err.is_decode() {
            (BackendErrorKind::Connection, "failed reading the response")
        } else if err.is_builder() {
            (BackendErrorKind::Fatal, "could not build the request")
        } else {
            (BackendErrorKind::Connection, "request failed")
        };
        BackendError::new(kind, format!("{what}: {method} {}", display_url(url)))
            .with_source(err.without_url())
    };
    let mut response = request.send().await.map_err(failed)?;
    let status = response.status();
    // Moved out, not copied (`content_length` is the body's, not read from the headers).
    let headers = std::mem::take(response.headers_mut());
    if status.is_redirection() {
        return Err(redirect_error(status, &headers, url));
    }
    let ok = status.is_success();
    let limit = if ok {
        max_bytes
    } else {
        max_bytes.min(MAX_ERROR_BODY_BYTES)
    };
    let declared = response.content_length();
    if let Some(len) = declared.filter(|&len| ok && len > max_bytes as u64) {
        return Err(too_large(max_bytes, Some(len)));
    }
    let mut bytes = Vec::with_capacity(declared.map_or(16 << 10, |len| len as usize).min(limit));
    // Read chunk by chunk, so a body that never ends (or a huge one) costs at most the cap.
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        let room = limit - bytes.len();
        if chunk.len() > room {
            if ok {
                return Err(too_large(max_bytes, None));
            }
            // An error body: its beginning is enough to classify it.
            bytes.extend_from_slice(&chunk[..room]);
            break;
        }
        bytes.extend_from_slice(&chunk);
    }
    // Valid UTF-8 (every JSON body) is moved into the string as it is; anything else is
    // decoded lossily, as `Response::text` would.
    let text = String::from_utf8(bytes)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    Ok((status, headers, text))
}

/// The error for a 2xx body longer than the cap: kind [`BackendErrorKind::Other`], permanent
/// for this request but not fatal. Not [`InvalidResponse`](BackendErrorKind::InvalidResponse),
/// which is retried: the same request to the same server would most likely stream as much
/// again, each retry reading another cap's worth.
pub(crate) fn too_large(max_bytes: usize, declared: Option<u64>) -> BackendError {
    let cap = human_bytes(max_bytes as u64);
    let message = match declared {
        Some(len) => format!(
            "the response's Content-Length ({}) is over the limit of {cap} \
             (max_response_bytes); the body was not read",
            human_bytes(len)
        ),
        None => format!(
            "the response body is longer than the limit of {cap} (max_response_bytes); the \
             rest was not read"
        ),
    };
    BackendError::new(BackendErrorKind::Other, message)
}

/// A byte count for messages: `8 MiB`, `1.5 KiB`, `300 bytes`.
fn human_bytes(n: u64) -> String {
    match [(30, "GiB"), (20, "MiB"), (10, "KiB")]
        .into_iter()
        .find(|&(shift, _)| n >> shift > 0)
    {
        Some((shift, unit)) if n.trailing_zeros() >= shift => format!("{} {unit}", n >> shift),
        Some((shift, unit)) => format!("{:.1} {unit}", n as f64 / (1u64 << shift) as f64),
        None => format!("{n} bytes"),
    }
}

/// The error for a 3xx answer, which is not followed: kind
/// [`Fatal`](BackendErrorKind::Fatal), fatal (every request would be redirected alike; the
/// base URL needs fixing). It names the host the redirect pointed to, never its path or query
/// (which may hold a token) and never the key.
pub(crate) fn redirect_error(status: StatusCode, headers: &HeaderMap, url: &Url) -> BackendError {
    let target = headers
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|loc| url.join(loc.trim()).ok());
    let whither = match &target {
        Some(t) if t.host_str().is_some() => format!("to {}", t.origin().ascii_serialization()),
        Some(_) => "to a URL without a host".to_string(),
        None => "without a usable Location".to_string(),
    };
    BackendError::new(
        BackendErrorKind::Fatal,
        format!(
            "the server at {} answered with a redirect {whither}; redirects are not followed \
             (the API key and headers would go with them): set the base URL to where the API \
             really is",
            url.origin().ascii_serialization()
        ),
    )
    .with_status(status.as_u16())
}

/// The error for a 2xx body that is not the JSON we expect.
pub(crate) fn invalid_json(err: serde_json::Error, body: &str) -> BackendError {
    let what = if body.trim().is_empty() {
        "empty response body".to_string()
    } else {
        format!("malformed response body: {}", truncate(body.trim(), 200))
    };
    BackendError::new(BackendErrorKind::InvalidResponse, what).with_source(err)
}

/// The error object of a JSON error body, in the shapes servers use.
#[derive(Debug, Default)]
pub(crate) struct ServerError {
    pub(crate) message: Option<String>,
    /// `error.type` (OpenAI, Anthropic, llama.cpp) or top-level `type` (vLLM).
    pub(crate) kind: Option<String>,
    /// `error.code` as text.
    pub(crate) code: Option<String>,
}

impl ServerError {
    pub(crate) fn parse(body: &str) -> Option<ServerError> {
        let obj: serde_json::Map<String, Value> = serde_json::from_str(body).ok()?;
        let as_text = |v: Option<&Value>| match v? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let fields = |o: &serde_json::Map<String, Value>| ServerError {
            message: as_text(o.get("message")),
            kind: as_text(o.get("type")),
            code: as_text(o.get("code")),
        };
        match obj.get("error") {
            // OpenAI, Anthropic, llama.cpp: {"error": {"message", "type", "code"}}
            Some(Value::Object(e)) => Some(fields(e)),
            // Ollama and others: {"error": "text"}
            Some(Value::String(s)) => Some(ServerError {
                message: Some(s.clone()),
                ..ServerError::default()
            }),
            // vLLM: {"object": "error", "message", "type", "code"}
            _ => obj.contains_key("message").then(|| fields(&obj)),
        }
    }

    fn says(&self, words: &[&str]) -> bool {
        let fields = [&self.kind, &self.code, &self.message];
        fields.iter().filter_map(|f| f.as_deref()).any(|f| {
            let f = f.to_ascii_lowercase();
            words.iter().any(|w| f.contains(w))
        })
    }

    /// Whether the body speaks of a limit per day (OpenAI's "requests per day (RPD)" and "tokens
    /// per day (TPD)", Google's "PerDay" quotas, "daily"): a 429 for one will not pass within
    /// any wait a run makes.
    pub(crate) fn daily_limit(&self) -> bool {
        self.says(&["per day", "perday", "per_day", "(rpd)", "(tpd)", "daily"])
    }

    /// Whether the body says the account is out of quota or credit (not a passing limit).
    fn quota_exhausted(&self) -> bool {
        let structured = [&self.kind, &self.code].iter().any(|f| {
            matches!(
                f.as_deref(),
                Some("insufficient_quota" | "billing_error" | "billing_hard_limit_reached")
            )
        });
        // A per-minute "quota" (some gateways word their rate limits that way) passes.
        let passing = [
            "per minute",
            "per second",
            "rate_limit_error",
            "rate_limit_exceeded",
        ];
        let spent = [
            "quota",
            "billing",
            "credit balance",
            "insufficient credit",
            "out of credits",
        ];
        structured || (!self.says(&passing) && self.says(&spent))
    }
}

/// Classifies an HTTP error response. `no_key_note` (see [`HttpBackend`]'s field of that name)
/// is added to the message of a 401 or 403.
pub(crate) fn status_error(
    status: StatusCode,
    headers: &HeaderMap,
    body: &str,
    key: Option<&SecretString>,
    no_key_note: Option<&str>,
) -> BackendError {
    let server = ServerError::parse(body).unwrap_or_default();
    let reason = status.canonical_reason().unwrap_or("no message");
    let message = match (&server.message, body.trim()) {
        (Some(m), _) if !m.trim().is_empty() => m.clone(),
        (_, "") => reason.to_string(),
        (_, body) => format!("{reason}: {}", truncate(body, 300)),
    };
    let mut message = redact(&truncate(&message, 1000), key);
    let code = status.as_u16();
    let daily = code == 429 && server.daily_limit();
    if daily {
        message = format!("daily limit reached, the run cannot go on until it resets: {message}");
    }
    if let (401 | 403, Some(note)) = (code, no_key_note) {
        message = format!("{message} ({note})");
    }
    let kind = match code {
        429 if daily || server.quota_exhausted() => BackendErrorKind::QuotaExhausted,
        429 => BackendErrorKind::RateLimited,
        402 => BackendErrorKind::QuotaExhausted,
        400 | 403 if server.quota_exhausted() => BackendErrorKind::QuotaExhausted,
        400 | 413 | 422 => BackendErrorKind::InvalidRequest,
        401 | 403 => BackendErrorKind::Authentication,
        404 => BackendErrorKind::NotFound,
        408 => BackendErrorKind::Timeout,
        409 | 425 | 500..=599 => BackendErrorKind::Server,
        // An odd status: the error type in the body, if it names one.
        _ => server
            .kind
            .as_deref()
            .and_then(type_kind)
            .unwrap_or(BackendErrorKind::Other),
    };
    let mut err = BackendError::new(kind, message).with_status(code);
    // A spent limit's reset time is worth reporting even though it is not waited for.
    if kind.is_retryable() || code == 429 {
        if let Some(after) = retry_after(headers, SystemTime::now(), code == 429) {
            err = err.with_retry_after(after);
        }
    }
    err
}

/// Classifies an error object carried in a 2xx body (a proxy or a server that reports errors
/// with status 200).
pub(crate) fn body_error(server: &ServerError, key: Option<&SecretString>) -> BackendError {
    // A spent quota, or a daily limit as for a 429 (see `status_error`).
    let spent = server.daily_limit() && server.says(&["rate_limit", "rate limit"]);
    let kind = if server.quota_exhausted() || spent {
        BackendErrorKind::QuotaExhausted
    } else {
        let name = server.kind.as_deref().or(server.code.as_deref());
        name.and_then(type_kind)
            .unwrap_or(BackendErrorKind::InvalidResponse)
    };
    let message = server
        .message
        .as_deref()
        .unwrap_or("error in a successful response");
    BackendError::new(kind, redact(&truncate(message, 1000), key))
}

/// The kind of error an error object's `type` (or `code`) names, if it is one of the
/// providers' error types.
fn type_kind(name: &str) -> Option<BackendErrorKind> {
    Some(match name {
        "rate_limit_error" | "rate_limit_exceeded" => BackendErrorKind::RateLimited,
        "overloaded_error" | "api_error" | "server_error" => BackendErrorKind::Server,
        "authentication_error" | "permission_error" => BackendErrorKind::Authentication,
        "not_found_error" => BackendErrorKind::NotFound,
        "invalid_request_error" | "request_too_large" => BackendErrorKind::InvalidRequest,
        "timeout_error" => BackendErrorKind::Timeout,
        _ => return None,
    })
}

/// How long the server asked us to wait.
///
/// Looks at `retry-after-ms`, then `retry-after` (seconds or an HTTP date), then, when
/// `rate_limited`, at the reset headers of OpenAI (`x-ratelimit-reset-requests`, `-tokens`:
/// `"1s"`, `"6m0s"`, `"20ms"`) and Anthropic (`anthropic-ratelimit-*-reset`: RFC 3339 times).
/// Of the reset headers, those whose `remaining` is zero count, the longest of them; if none
/// says zero, the shortest.
pub(crate) fn retry_after(
    headers: &HeaderMap,
    now: SystemTime,
    rate_limited: bool,
) -> Option<Duration> {
    let get = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let until = |at: SystemTime| {
        at.duration_since(now)
            .unwrap_or_default()
            .min(MAX_SERVER_WAIT)
    };
    let asked = get("retry-after-ms")
        .and_then(|ms| server_wait(ms.parse::<f64>().ok()? / 1000.0))
        .or_else(|| {
            let v = get("retry-after")?;
            let date = |_| httpdate::parse_http_date(v).ok().map(until);
            v.parse::<f64>().map_or_else(date, server_wait)
        });
    if asked.is_some() || !rate_limited {
        return asked;
    }
    // Each reset header's wait, and whether its limit's remaining count is zero.
    let resets: Vec<(Duration, bool)> = headers
        .iter()
        .filter_map(|(name, value)| {
            let (name, value) = (name.as_str(), value.to_str().ok()?);
            let (kind, reset) = match name.strip_prefix("x-ratelimit-reset-") {
                Some(kind) => (kind, parse_go_duration(value)?),
                None => {
                    let kind = name.strip_prefix("anthropic-ratelimit-")?;
                    (kind.strip_suffix("-reset")?, until(parse_rfc3339(value)?))
                }
            };
            let remaining = get(&format!("x-ratelimit-remaining-{kind}"))
                .or_else(|| get(&format!("anthropic-ratelimit-{kind}-remaining")));
            Some((reset, remaining == Some("0")))
        })
        .collect();
    let exhausted = resets.iter().filter(|r| r.1).map(|r| r.0).max();
    exhausted.or_else(|| resets.iter().map(|r| r.0).min())
}

/// A wait of `secs` seconds a server asked for, checked: `None` for a negative or NaN number;
/// cut to [`MAX_SERVER_WAIT`] when longer, infinity included (never the panic of
/// `Duration::from_secs_f64` on a value past `u64::MAX` seconds).
pub(crate) fn server_wait(secs: f64) -> Option<Duration> {
    let wait = Duration::try_from_secs_f64(secs).unwrap_or(MAX_SERVER_WAIT);
    (secs >= 0.0).then(|| wait.min(MAX_SERVER_WAIT))
}

/// Parses durations like `1s`, `6m0s`, `20ms`, `1h2m3.5s` (the OpenAI reset headers), and a
/// bare number of seconds. Checked as [`server_wait`] is: cut to [`MAX_SERVER_WAIT`], `None`
/// for anything negative or unreadable.
///
/// Written here rather than taken from a crate: `humantime` and `jiff` read Go's units but
/// refuse a bare number and exponents (`1e3ms`), and refuse an overflow that this cuts.
pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if let Ok(secs) = rest.parse::<f64>() {
        return server_wait(secs);
    }
    let mut total = (!rest.is_empty()).then_some(0f64)?;
    while !rest.is_empty() {
        // A number (with its exponent: no unit has an `e`), then its unit.
        let unit = rest.find(|c: char| !(c.is_ascii_digit() || ".eE+-".contains(c)));
        let (number, tail) = rest.split_at(unit.unwrap_or(rest.len()));
        let end = tail.find(|c: char| c.is_ascii_digit() || c == '.');
        let (unit, tail) = tail.split_at(end.unwrap_or(tail.len()));
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number.parse::<f64>().ok()? * scale;
        rest = tail;
    }
    server_wait(total)
}

/// Parses an RFC 3339 time such as `2026-01-02T03:04:05Z` or `...05.5+01:00`; `None` for a
/// time before 1970.
pub(crate) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let at = chrono::DateTime::parse_from_rfc3339(text.trim()).ok()?;
    (at.timestamp() >= 0).then(|| at.into())
}

/// What one HTTP API adds to the shared core ([`HttpBackend`]): its names, the header its key
/// goes in, its own settings, its request body and how it reads an answer.
pub trait Provider: Clone + Default + fmt::Debug + Send + Sync + 'static {
    /// The backend's name (`openai`, `anthropic`).
    const NAME: &'static str;
    /// The endpoint's path under the base URL.
    const PATH: &'static str;
    /// The provider's own base URL, the default.
    const BASE_URL: &'static str;
    /// The variable the key is read from when none is named, for the provider's own URL only.
    const KEY_ENV: &'static str;

    /// The header the key goes in, and its value.
    fn key_header(key: &str) -> (HeaderName, String);

    /// Checks the provider's own settings, adds its fixed headers, and returns those of its
    /// settings that change the answers (for the identity).
    fn settings(&self, headers: &mut HeaderMap) -> Result<Vec<(&'static str, String)>, Error>;

    /// Writes the request's fields of the body (the extra body fields follow).
    fn write_body<M: SerializeMap>(
        &self,
        model: &str,
        request: &CompletionRequest,
        fields: &mut Fields<'_, M>,
    ) -> Result<(), M::Error>;

    /// The completion in a 2xx body (the online answer, or one result of a batch), or the
    /// error the body carries. `model` is the model asked for; `key` is removed from messages.
    fn completion(
        text: &str,
        model: &str,
        key: Option<&SecretString>,
    ) -> Result<Completion, BackendError>;
}

/// A backend for one HTTP API: `OpenAiBackend` (feature `openai`) or `AnthropicBackend`
/// (feature `anthropic`). Made with
/// [`HttpBackend::builder`].
///
/// Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct HttpBackend<P> {
    pub(crate) client: reqwest::Client,
    pub(crate) url: Url,
    /// The base URL (up to and including the version prefix), for the batch API.
    #[cfg_attr(not(feature = "batch"), allow(dead_code))]
    pub(crate) base: Url,
    pub(crate) model: String,
    pub(crate) api_key: Option<SecretString>,
    /// The extra headers and the key's header (marked sensitive).
    headers: HeaderMap,
    extra_body: serde_json::Map<String, Value>,
    pub(crate) max_response_bytes: usize,
    /// Added to a 401 or 403 when no key was sent to a custom URL.
    pub(crate) no_key_note: Option<String>,
    /// See [`LlmBackend::identity`].
    pub(crate) identity: String,
    provider: P,
}

impl<P: Provider> HttpBackend<P> {
    /// A builder with the defaults (the provider's base URL, no key, no model).
    pub fn builder() -> HttpBackendBuilder<P> {
        HttpBackendBuilder {
            base_url: P::BASE_URL.to_string(),
            model: String::new(),
            api_key: None,
            api_key_env: None,
            headers: Vec::new(),
            timeout: Some(Duration::from_secs(600)),
            connect_timeout: Duration::from_secs(10),
            extra_body: serde_json::Map::new(),
            client: None,
            max_response_bytes: crate::backend::DEFAULT_MAX_RESPONSE_BYTES,
            provider: P::default(),
        }
    }

    /// The full URL requests are sent to, as it may be shown in a log or a summary: without
    /// a user name, password, query or fragment, where credentials may hide.
    #[must_use]
    pub fn endpoint(&self) -> String {
        display_url(&self.url)
    }

    /// The JSON body of `request`, serialised straight from it (no intermediate JSON tree, no
    /// copy of the messages).
    pub(crate) fn body<'a>(&'a self, request: &'a CompletionRequest) -> Body<'a, P> {
        Body(self, request)
    }

    /// The headers of every request: the extra ones and the key's.
    pub(crate) fn headers(&self) -> HeaderMap {
        self.headers.clone()
    }

    /// The completion in a 2xx body, or the error it carries.
    pub(crate) fn completion_from_body(&self, text: &str) -> Result<Completion, BackendError> {
        P::completion(text, &self.model, self.api_key.as_ref())
    }

    async fn call(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let span = tracing::Span::current();
        tracing::trace!(messages = ?request.messages, "request");
        // Sized for the messages, so the buffer is not grown and copied as it is written.
        let size: usize = request.messages.iter().map(|m| m.content.len()).sum();
        let mut json = Vec::with_capacity(size + size / 16 + 512);
        serde_json::to_writer(&mut json, &self.body(&request)).map_err(|e| {
            BackendError::new(
                BackendErrorKind::InvalidRequest,
                format!("the request body cannot be written as JSON: {e}"),
            )
        })?;
        let mut headers = self.headers();
        // As `RequestBuilder::json` does: a content type set in the headers is kept.
        headers
            .entry(reqwest::header::CONTENT_TYPE)
            .or_insert(HeaderValue::from_static("application/json"));
        let post = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(json);
        let (status, headers, text) =
            send("POST", post, &self.url, self.max_response_bytes).await?;
        span.record("status", status.as_u16());
        if !status.is_success() {
            let key = self.api_key.as_ref();
            let note = self.no_key_note.as_deref();
            return Err(status_error(status, &headers, &text, key, note));
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

impl<P: Provider> fmt::Debug for HttpBackend<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: Vec<&String> = self.extra_body.keys().collect();
        f.debug_struct("HttpBackend")
            .field("backend", &P::NAME)
            .field("url", &display_url(&self.url))
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("extra_body_fields", &extra)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<P: Provider> LlmBackend for HttpBackend<P> {
    /// Sends one request.
    ///
    /// # Errors
    ///
    /// See the module docs of `rmboost::backend::openai` and `rmboost::backend::anthropic`
    /// for how failures are classified.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future aborts the HTTP request; the connection pool stays usable.
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let span = tracing::info_span!(
            "llm_call",
            backend = P::NAME,
            model = %self.model,
            status = Empty,
            finish_reason = Empty,
            prompt_tokens = Empty,
            completion_tokens = Empty,
        );
        self.call(request).instrument(span).await
    }

    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed(P::NAME)
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

/// A request body: the provider's fields, then the extra body fields, which replace set
/// fields of the same name.
pub(crate) struct Body<'a, P>(&'a HttpBackend<P>, &'a CompletionRequest);

impl<P: Provider> Serialize for Body<'_, P> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Body(b, request) = *self;
        let mut fields = Fields {
            map: serializer.serialize_map(None)?,
            extra: &b.extra_body,
        };
        b.provider.write_body(&b.model, request, &mut fields)?;
        for (k, v) in &b.extra_body {
            fields.map.serialize_entry(k, v)?;
        }
        fields.map.end()
    }
}

/// The fields of a request body being written; see [`Fields::set`].
#[derive(Debug)]
pub struct Fields<'a, M> {
    map: M,
    extra: &'a serde_json::Map<String, Value>,
}

impl<M: SerializeMap> Fields<'_, M> {
    /// Writes one field if it is set (`Some`), unless an extra body field of the same name
    /// replaces it. An `f32` setting is written as its shortest decimal (`0.7`), as
    /// `serde_json` writes an `f32`.
    pub(crate) fn set<V: Serialize>(
        &mut self,
        name: &str,
        value: Option<V>,
    ) -> Result<(), M::Error> {
        match value {
            Some(v) if !self.extra.contains_key(name) => self.map.serialize_entry(name, &v),
            _ => Ok(()),
        }
    }
}

/// Builds an [`HttpBackend`]. Setters consume and return the builder; [`build`](Self::build)
/// is the one place an error comes out. Its `Debug` shows neither the key nor the extra
/// headers' values.
#[derive(Debug)]
#[must_use]
pub struct HttpBackendBuilder<P> {
    base_url: String,
    model: String,
    api_key: Option<SecretString>,
    api_key_env: Option<String>,
    /// The extra headers; the values may be credentials.
    headers: Vec<(String, SecretString)>,
    timeout: Option<Duration>,
    connect_timeout: Duration,
    extra_body: serde_json::Map<String, Value>,
    client: Option<reqwest::Client>,
    max_response_bytes: usize,
    pub(crate) provider: P,
}

impl<P: Provider> HttpBackendBuilder<P> {
    setters! {
        /// The API's base URL, up to and including the version prefix, e.g.
        /// `http://127.0.0.1:8080/v1`; the provider's path (`/chat/completions`, `/messages`) is
        /// appended. A URL without a path gets `/v1`. Default: the provider's own
        /// (`openai::DEFAULT_BASE_URL`, `anthropic::DEFAULT_BASE_URL`).
        base_url(url: impl Into<String>) => base_url = url.into();
        /// The model name sent with every request. Required (any non-empty name for servers that
        /// ignore it, such as llama.cpp's).
        model(model: impl Into<String>) => model = model.into();
        /// The API key, given in code, sent to whatever base URL is set. It is held in a secret
        /// wrapper and never printed. Takes precedence over [`api_key_env`](Self::api_key_env).
        /// Default: none (see [`api_key_env`](Self::api_key_env) for where a key then comes from).
        api_key(key: impl Into<String>) => api_key = Some(SecretString::from(key.into()));
        /// Reads the API key from this environment variable when [`build`](Self::build) runs, and
        /// sends it to whatever base URL is set; `build` fails if it is unset or empty.
        ///
        /// Default: when neither this nor [`api_key`](Self::api_key) is given, the provider's own
        /// variable (`OPENAI_API_KEY`, `ANTHROPIC_API_KEY`) is read, and must be set, only if
        /// requests go to the provider's own host (the default base URL's scheme, host and port); a
        /// custom base URL then gets no key, so the provider's key is never handed to another
        /// server unless named here. `build` warns (`tracing`) when a key would go over plain
        /// `http://` to a host that is not loopback.
        api_key_env(var: impl Into<String>) => api_key_env = Some(var.into());
        /// The most one request may take, from sending to the end of the body; `None` for no limit.
        /// Default 600 s (slow local models need long). Anything over a year is cut to a year.
        timeout(timeout: impl Into<Option<Duration>>) => timeout = timeout.into();
        /// The most connecting may take. Default 10 s. Like the [`timeout`](Self::timeout),
        /// anything over a year is cut to a year.
        connect_timeout(timeout: Duration) => connect_timeout = timeout;
        /// The most bytes of a response body read (error bodies: at most 64 KiB of them, the rest
        /// is dropped). A longer answer, by its `Content-Length` or once the cap is passed while
        /// reading it in chunks, fails the call with an error of kind
        /// [`Other`](crate::BackendErrorKind::Other) (not retried, since the same request would
        /// most likely bring as much again; not fatal) and nothing past the cap is read. So a
        /// server that streams without end costs at most this much memory per call. Default
        /// [`DEFAULT_MAX_RESPONSE_BYTES`](crate::backend::DEFAULT_MAX_RESPONSE_BYTES) (8 MiB, far
        /// more than any chat answer); `build` rejects 0.
        max_response_bytes(max: usize) => max_response_bytes = max;
        /// Uses this client instead of building one (to share a pool between backends or set
        /// proxies and certificates). The timeout settings are then the client's, and so is its
        /// redirect policy: reqwest's default follows redirects, and the key and extra headers with
        /// them, so build it with `.redirect(reqwest::redirect::Policy::none())` (the backend then
        /// reports a redirect as an error, as with its own client).
        client(client: reqwest::Client) => client = Some(client);
    }

    /// Adds a header sent with every request (a gateway's routing or auth header, an
    /// organisation id, `anthropic-beta`). Values are treated as sensitive and not printed.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers
            .push((name.into(), SecretString::from(value.into())));
        self
    }

    /// Adds a field to every request body, for server-specific options (`top_k`,
    /// `repetition_penalty`, `response_format`, vLLM's `guided_json`, Anthropic's `metadata` or
    /// `thinking`, ...). It wins over a field of the same name set from the request.
    pub fn extra_body(mut self, name: impl Into<String>, value: Value) -> Self {
        self.extra_body.insert(name.into(), value);
        self
    }

    /// Whether `url` is on the provider's own host (scheme, host and port of the default base
    /// URL), where the default key variable may be sent.
    fn is_provider_url(&self, url: &Url) -> bool {
        Url::parse(P::BASE_URL).is_ok_and(|d| d.origin() == url.origin())
    }

    /// The key to send to `url`: the one given in code, else the one in the variable named with
    /// `api_key_env`, else, only when `url` is the provider's own
    /// ([`is_provider_url`](Self::is_provider_url)), the one in the provider's default variable
    /// (`OPENAI_API_KEY`, `ANTHROPIC_API_KEY`), which must then be set. A custom URL gets no
    /// key unless one is given explicitly: the provider's key is not handed to another server.
    fn resolve_key(&self, url: &Url) -> Result<Option<SecretString>, Error> {
        if let Some(key) = &self.api_key {
            return Ok(Some(key.clone()));
        }
        let var = match &self.api_key_env {
            Some(var) => var.as_str(),
            None if self.is_provider_url(url) => P::KEY_ENV,
            None => return Ok(None),
        };
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Some(SecretString::from(v.trim()))),
            Ok(_) => Err(format!("environment variable {var} is empty")),
            Err(VarError::NotPresent) => Err(format!(
                "environment variable {var} (the API key) is not set"
            )),
            Err(VarError::NotUnicode(_)) => {
                Err(format!("environment variable {var} is not valid UTF-8"))
            }
        }
        .map_err(Error::config)
    }

    /// The base URL, checked, without a trailing slash (`/v1` for a base URL without a path).
    fn base(&self) -> Result<Url, Error> {
        let mut url = Url::parse(self.base_url.trim())
            .map_err(|e| Error::config(format!("invalid base URL {:?}: {e}", self.base_url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::config(format!(
                "base URL {:?} must start with http:// or https://",
                self.base_url
            )));
        }
        let path = url.path().trim_end_matches('/').to_string();
        url.set_path(if path.is_empty() { "/v1" } else { &path });
        Ok(url)
    }

    /// Builds the backend and its HTTP client.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when the model is empty, a setting of
    /// the provider's own is invalid (see its setters), the base URL or a header is invalid,
    /// `max_response_bytes` is 0, the key's environment variable is unset or empty (the one
    /// named with [`api_key_env`](Self::api_key_env), or the provider's own when no key is
    /// given and requests go to its own host), or the HTTP client cannot be built.
    pub fn build(self) -> Result<HttpBackend<P>, Error> {
        let name = P::NAME;
        if self.model.trim().is_empty() {
            return Err(Error::config(format!("{name} backend: no model set")));
        }
        let mut headers = HeaderMap::new();
        for (header, value) in &self.headers {
            let name = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| Error::config(format!("invalid header name {header:?}")))?;
            let value = HeaderValue::from_str(value.expose_secret())
                .map_err(|_| Error::config(format!("invalid value for header {header}")))?;
            headers.append(name, value);
        }
        let settings = self.provider.settings(&mut headers)?;
        let base = self.base()?;
        let url = join_path(&base, P::PATH);
        if self.max_response_bytes == 0 {
            return Err(Error::config(format!(
                "{name} backend: max_response_bytes must be at least 1"
            )));
        }
        let api_key = self.resolve_key(&url)?;
        if api_key.is_some() && url.scheme() == "http" && !is_loopback(&url) {
            tracing::warn!(
                backend = name,
                url = %display_url(&url),
                "the API key is sent over plain http to a host that is not loopback: anyone on \
                 the way can read it; use https"
            );
        }
        if let Some(key) = &api_key {
            let (header, value) = P::key_header(key.expose_secret());
            let value = HeaderValue::from_str(&value).map_err(|_| {
                Error::config(format!(
                    "{name} backend: the API key contains characters not allowed in a header"
                ))
            })?;
            headers.insert(header, value);
        }
        // Values may be credentials (the key, a gateway's token): keep them out of Debug output.
        headers.values_mut().for_each(|v| v.set_sensitive(true));
        // A custom URL gets a key only when it is named explicitly: say so on a 401 or 403.
        let no_key_note = (api_key.is_none() && !self.is_provider_url(&url)).then(|| {
            format!(
                "no API key was sent: a key is sent to a custom base URL only when named with \
                 --api-key-env (api_key_env in code) or given with api_key; {} is sent only to {}",
                P::KEY_ENV,
                P::BASE_URL
            )
        });
        // What decides the answers, for cache keys: the endpoint (without credentials or
        // query), the model, the extra body fields, the names (not the values, which may be
        // credentials) of the extra headers and the provider's settings. Never the key.
        let mut header_names: Vec<String> = self
            .headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        header_names.sort();
        header_names.dedup();
        let mut identity = format!(
            "{name} {} model={:?} extra_body={} header_names={header_names:?}",
            display_url(&url),
            self.model,
            Value::Object(self.extra_body.clone()),
        );
        identity.extend(settings.iter().map(|(k, v)| format!(" {k}={v:?}")));
        // Without a client given, one that follows no redirects (the key and the extra headers
        // would go with them to wherever they point; a 3xx answer is an error instead, see
        // [`redirect_error`]). No timeout is a year's, as good as none.
        let client = match self.client {
            Some(client) => client,
            None => reqwest::Client::builder()
                .connect_timeout(self.connect_timeout.min(MAX_TIMEOUT))
                .timeout(self.timeout.unwrap_or(MAX_TIMEOUT).min(MAX_TIMEOUT))
                .tcp_keepalive(Duration::from_secs(60))
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("rmboost/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| Error::config(format!("cannot build the HTTP client: {e}")))?,
        };
        Ok(HttpBackend {
            client,
            no_key_note,
            identity,
            base,
            url,
            model: self.model,
            api_key,
            headers,
            extra_body: self.extra_body,
            max_response_bytes: self.max_response_bytes,
            provider: self.provider,
        })
    }
}

/// A completion of `text`, unless it has none (apart from white space) because of the token
/// limit or a filter: then an error of kind [`Length`](BackendErrorKind::Length) or
/// [`ContentFilter`](BackendErrorKind::ContentFilter) (with `filtered` as its message). The
/// model is the one the server named, else the one asked for.
///
/// The finish reason is the server's word for it, in either provider's terms: none, `stop`,
/// `eos`, `end_turn` or `stop_sequence` is [`FinishReason::Stop`]; `length` or `max_tokens`
/// is `Length`; `content_filter` or `refusal` is `ContentFilter`; any other is `Other`.
pub(crate) fn completion(
    text: String,
    reason: Option<&str>,
    usage: Usage,
    model: Option<String>,
    asked: &str,
    filtered: &str,
) -> Result<Completion, BackendError> {
    let finish_reason = match reason {
        None | Some("stop" | "eos" | "end_turn" | "stop_sequence") => FinishReason::Stop,
        Some("length" | "max_tokens") => FinishReason::Length,
        Some("content_filter" | "refusal") => FinishReason::ContentFilter,
        Some(other) => FinishReason::Other(other.to_string()),
    };
    let empty = text.trim().is_empty();
    match finish_reason {
        FinishReason::Length if empty => Err(BackendError::new(
            BackendErrorKind::Length,
            "the token limit was reached before any text",
        )),
        FinishReason::ContentFilter if empty => {
            Err(BackendError::new(BackendErrorKind::ContentFilter, filtered))
        }
        _ => Ok(Completion {
            text,
            finish_reason,
            usage,
            model: model
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| asked.to_string()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    type Config = HttpBackendBuilder<Example<0>>;

    /// A provider at `https://api.example.com/v1` whose key variable is
    /// `RMBOOST_TEST_HTTP_DEFAULT_KEY_VAR` (`N` = 0) or an unset one (1).
    #[derive(Debug, Clone, Default)]
    struct Example<const N: usize>;

    impl<const N: usize> Provider for Example<N> {
        const NAME: &'static str = "example";
        const PATH: &'static str = "x";
        const BASE_URL: &'static str = "https://api.example.com/v1";
        const KEY_ENV: &'static str = [
            "RMBOOST_TEST_HTTP_DEFAULT_KEY_VAR",
            "RMBOOST_TEST_SURELY_UNSET",
        ][N];
        fn key_header(key: &str) -> (HeaderName, String) {
            (HeaderName::from_static("x-key"), key.to_string())
        }
        fn settings(&self, _: &mut HeaderMap) -> Result<Vec<(&'static str, String)>, Error> {
            Ok(Vec::new())
        }
        fn write_body<M: SerializeMap>(
            &self,
            _: &str,
            _: &CompletionRequest,
            _: &mut Fields<'_, M>,
        ) -> Result<(), M::Error> {
            Ok(())
        }
        fn completion(
            _: &str,
            _: &str,
            _: Option<&SecretString>,
        ) -> Result<Completion, BackendError> {
            unreachable!()
        }
    }

    fn endpoint<P: Provider>(c: &HttpBackendBuilder<P>, path: &str) -> Result<Url, Error> {
        c.base().map(|base| join_path(&base, path))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_go_duration("2.5"), Some(Duration::from_secs_f64(2.5)));
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn absurd_waits_are_clamped_not_a_panic() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let day = Some(Duration::from_secs(86_400));
        for (k, v) in [
            ("retry-after-ms", "1e30"),
            ("retry-after-ms", "1e300"),
            ("retry-after", "1e300"),
            ("retry-after", "1e20"),
            ("x-ratelimit-reset-requests", "1e300"),
            ("x-ratelimit-reset-requests", "1e300s"),
            ("x-ratelimit-reset-tokens", "99999999999999999999h"),
            ("x-ratelimit-reset-tokens", "1e300h2m"),
            ("x-ratelimit-reset-tokens", "1e999s"),
            ("retry-after", "inf"),
        ] {
            assert_eq!(retry_after(&headers(&[(k, v)]), now, true), day, "{k}: {v}");
        }
        for (k, v) in [
            ("retry-after-ms", "-1"),
            ("retry-after-ms", "NaN"),
            ("retry-after", "-3"),
            ("x-ratelimit-reset-requests", "-1s"),
            ("x-ratelimit-reset-requests", "NaN"),
        ] {
            assert_eq!(
                retry_after(&headers(&[(k, v)]), now, true),
                None,
                "{k}: {v}"
            );
        }
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1e3ms"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("1e300"), day);
    }

    #[test]
    fn rfc3339() {
        let t = parse_rfc3339("1970-01-02T00:00:01Z").unwrap();
        assert_eq!(t, UNIX_EPOCH + Duration::from_secs(86_401));
        let t = parse_rfc3339("2000-03-01T00:00:00+01:00").unwrap();
        assert_eq!(t, UNIX_EPOCH + Duration::from_secs(951_868_800 - 3600));
        let t = parse_rfc3339("2000-03-01T00:00:00.5Z").unwrap();
        assert_eq!(t, UNIX_EPOCH + Duration::from_secs_f64(951_868_800.5));
        assert!(parse_rfc3339("yesterday").is_none());
        assert!(parse_rfc3339("2000-13-01T00:00:00Z").is_none());
    }

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let h = headers(&[("retry-after", "7")]);
        assert_eq!(retry_after(&h, now, true), Some(Duration::from_secs(7)));
        let h = headers(&[("retry-after-ms", "1500"), ("retry-after", "7")]);
        assert_eq!(
            retry_after(&h, now, true),
            Some(Duration::from_millis(1500))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let h = headers(&[("retry-after", &date)]);
        assert_eq!(retry_after(&h, now, true), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        let h = headers(&[("retry-after", &past)]);
        assert_eq!(retry_after(&h, now, true), Some(Duration::ZERO));
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(retry_after(&h, now, true), Some(Duration::from_secs(360)));
        assert_eq!(retry_after(&h, now, false), None);
        let h = headers(&[
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(retry_after(&h, now, true), Some(Duration::from_secs(1)));
        let h = headers(&[
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2001-09-09T01:47:00Z"),
        ]);
        // now is 2001-09-09T01:46:40Z
        assert_eq!(retry_after(&h, now, true), Some(Duration::from_secs(20)));
        assert_eq!(retry_after(&HeaderMap::new(), now, true), None);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "soon")]), now, true),
            None
        );
    }

    #[test]
    fn quota_words() {
        let q = |body: &str| ServerError::parse(body).unwrap().quota_exhausted();
        assert!(q(
            r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","code":"insufficient_quota"}}"#
        ));
        assert!(q(r#"{"error":{"type":"billing_error","message":"x"}}"#));
        assert!(q(
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the API."}}"#
        ));
        assert!(!q(
            r#"{"error":{"message":"Rate limit reached for requests","type":"requests","code":"rate_limit_exceeded"}}"#
        ));
        assert!(!q(
            r#"{"error":{"message":"Quota exceeded for requests per minute"}}"#
        ));
        assert!(!q(r#"{"error":"slow down"}"#));
        let daily = |body: &str| ServerError::parse(body).unwrap().daily_limit();
        assert!(daily(
            r#"{"error":{"message":"Rate limit reached for gpt-4o-mini on requests per day (RPD): Limit 200, Used 200","type":"requests","code":"rate_limit_exceeded"}}"#
        ));
        assert!(daily(
            r#"{"error":{"message":"tokens per day (TPD): Limit 1"}}"#
        ));
        assert!(daily(
            r#"{"error":{"message":"Quota exceeded for quota metric 'GenerateRequestsPerDayPerProjectPerModel'"}}"#
        ));
        assert!(!daily(
            r#"{"error":{"message":"Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3"}}"#
        ));
        let h = HeaderMap::new();
        let rpd = r#"{"error":{"message":"Rate limit reached on requests per day (RPD): Limit 200","code":"rate_limit_exceeded"}}"#;
        let e = status_error(StatusCode::TOO_MANY_REQUESTS, &h, rpd, None, None);
        assert_eq!(e.kind(), BackendErrorKind::QuotaExhausted);
        assert!(e.message().starts_with("daily limit reached"), "{e}");
        // The same error object in a 200 body.
        let server = ServerError::parse(rpd).unwrap();
        assert_eq!(
            body_error(&server, None).kind(),
            BackendErrorKind::QuotaExhausted
        );
        let rpm = r#"{"error":{"message":"Rate limit reached on requests per min (RPM)","code":"rate_limit_exceeded"}}"#;
        let server = ServerError::parse(rpm).unwrap();
        assert_eq!(
            body_error(&server, None).kind(),
            BackendErrorKind::RateLimited
        );
    }

    #[test]
    fn endpoints() {
        let mut c = HttpBackend::<Example<0>>::builder().base_url("http://127.0.0.1:8080");
        assert_eq!(
            endpoint(&c, "chat/completions").unwrap().as_str(),
            "http://127.0.0.1:8080/v1/chat/completions"
        );
        c.base_url = "http://h/v1/".into();
        assert_eq!(
            endpoint(&c, "messages").unwrap().as_str(),
            "http://h/v1/messages"
        );
        c.base_url = "http://h/openai/v1".into();
        assert_eq!(
            endpoint(&c, "/chat/completions").unwrap().as_str(),
            "http://h/openai/v1/chat/completions"
        );
        c.base_url = "http://h//".into();
        assert_eq!(endpoint(&c, "x").unwrap().as_str(), "http://h/v1/x");
        c.base_url = "ftp://h".into();
        assert!(endpoint(&c, "x").is_err());
        c.base_url = "not a url".into();
        assert!(endpoint(&c, "x").is_err());
    }

    #[test]
    fn paths_join_with_one_slash() {
        let join = |base: &str, path: &str| join_path(&Url::parse(base).unwrap(), path).to_string();
        for base in ["http://h/v1", "http://h/v1/", "http://h/v1//"] {
            for path in ["batches/b1", "/batches/b1"] {
                assert_eq!(
                    join(base, path),
                    "http://h/v1/batches/b1",
                    "{base} + {path}"
                );
            }
        }
        assert_eq!(join("http://h", "files"), "http://h/files");
        assert_eq!(
            join("https://u@h:8443/openai/v1?x=1", "messages/batches"),
            "https://u@h:8443/openai/v1/messages/batches?x=1"
        );
    }

    /// The provider's default key variable is read only for the provider's own host; a
    /// custom URL gets a key only from an explicit source.
    #[test]
    fn default_key_only_for_the_provider_url() {
        const VAR: &str = "RMBOOST_TEST_HTTP_DEFAULT_KEY_VAR";
        std::env::set_var(VAR, "sk-default");
        let config = |base: &str| HttpBackend::<Example<0>>::builder().base_url(base);
        let key_for = |c: &Config| {
            let url = endpoint(c, "x").unwrap();
            c.resolve_key(&url)
                .unwrap()
                .map(|k| k.expose_secret().to_string())
        };
        assert_eq!(
            key_for(&config("https://api.example.com/v1")).as_deref(),
            Some("sk-default")
        );
        assert_eq!(
            key_for(&config("https://api.example.com:443/other")).as_deref(),
            Some("sk-default")
        );
        assert_eq!(
            key_for(&config("http://api.example.com/v1")),
            None,
            "plain http"
        );
        assert_eq!(
            key_for(&config("https://api.example.com:8443/v1")),
            None,
            "other port"
        );
        assert_eq!(key_for(&config("http://127.0.0.1:8080/v1")), None);
        let mut explicit = config("http://127.0.0.1:8080/v1");
        explicit.api_key_env = Some(VAR.into());
        assert_eq!(key_for(&explicit).as_deref(), Some("sk-default"));
        let mut given = config("http://127.0.0.1:8080/v1");
        given.api_key = Some(SecretString::from("sk-given".to_string()));
        assert_eq!(key_for(&given).as_deref(), Some("sk-given"));
        // No key for the provider's own URL is an error naming the variable.
        let unset = HttpBackend::<Example<1>>::builder();
        let url = endpoint(&unset, "x").unwrap();
        let err = unset.resolve_key(&url).unwrap_err().to_string();
        assert!(err.contains("RMBOOST_TEST_SURELY_UNSET"), "{err}");
        // The note for a 401 without a key, on a custom URL only.
        let custom = config("http://127.0.0.1:8080/v1")
            .model("m")
            .build()
            .unwrap();
        let note = custom.no_key_note.unwrap();
        assert!(note.contains("--api-key-env"), "{note}");
        let own = config("https://api.example.com/v1")
            .model("m")
            .build()
            .unwrap();
        assert!(own.no_key_note.is_none());
    }

    #[test]
    fn loopback_hosts() {
        for (u, want) in [
            ("http://127.0.0.1:1/v1", true),
            ("http://127.3.4.5/v1", true),
            ("http://localhost:8080", true),
            ("http://[::1]:8080/v1", true),
            ("http://10.0.0.1/v1", false),
            ("http://example.com/v1", false),
        ] {
            assert_eq!(is_loopback(&Url::parse(u).unwrap()), want, "{u}");
        }
    }

    #[test]
    fn redirects_name_the_host_only() {
        let url = Url::parse("http://127.0.0.1:9/v1/chat/completions").unwrap();
        let h = headers(&[("location", "https://evil.example:8443/steal?token=abc")]);
        let e = redirect_error(StatusCode::TEMPORARY_REDIRECT, &h, &url);
        assert!(e.is_fatal() && !e.is_retryable());
        assert_eq!(e.status(), Some(307));
        let m = e.to_string();
        assert!(m.contains("https://evil.example:8443"), "{m}");
        assert!(!m.contains("token") && !m.contains("steal"), "{m}");
        let relative = headers(&[("location", "/v2/chat")]);
        let m = redirect_error(StatusCode::FOUND, &relative, &url).to_string();
        assert!(m.contains("to http://127.0.0.1:9"), "{m}");
        let m = redirect_error(StatusCode::FOUND, &HeaderMap::new(), &url).to_string();
        assert!(m.contains("without a usable Location"), "{m}");
    }

    #[test]
    fn sizes_for_messages() {
        assert_eq!(human_bytes(8 << 20), "8 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(300), "300 bytes");
        assert!(too_large(8 << 20, None).to_string().contains("8 MiB"));
        assert_eq!(too_large(1, Some(2)).kind(), BackendErrorKind::Other);
    }

    #[test]
    fn f32_settings_are_written_short() {
        // As serde_json writes an `f32`, which the request bodies rely on.
        assert_eq!(serde_json::to_string(&0.7f32).unwrap(), "0.7");
        assert_eq!(serde_json::to_string(&0.0f32).unwrap(), "0.0");
        assert_eq!(serde_json::to_string(&f32::NAN).unwrap(), "null");
    }

    #[test]
    fn redaction() {
        let key = SecretString::from("sk-secret-123".to_string());
        assert_eq!(
            redact("bad key sk-secret-123 given", Some(&key)),
            "bad key [redacted] given"
        );
        assert_eq!(truncate("abcdef", 3), "abc...");
        assert_eq!(truncate("abc", 3), "abc");
    }
}
