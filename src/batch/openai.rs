//! [`OpenAiBatch`]: OpenAI's Batch API (files + batches) for chat completions.
//!
//! Made from an [`OpenAiBackend`], whose client, key, headers, body builder and answer parser
//! it uses: each line's `body` is exactly what the online backend would send, and each
//! output line is read as the online answer would be. The key goes where the online backend
//! sends it and nowhere else (no redirect is followed); every body read is capped.
//!
//! ```no_run
//! use std::sync::Arc;
//! use rmboost::backend::openai::OpenAiBackend;
//! use rmboost::batch::openai::OpenAiBatch;
//! use rmboost::batch::BatchApi;
//!
//! # fn f() -> Result<(), rmboost::Error> {
//! let backend = OpenAiBackend::builder().model("gpt-4o-mini").build()?;
//! let api: Arc<dyn BatchApi> = Arc::new(OpenAiBatch::new(backend));
//! # Ok(()) }
//! ```
//!
//! # What is sent
//!
//! `POST {base}/files` (multipart, `purpose=batch`, one line per request: `custom_id`,
//! `method: POST`, `url: /v1/chat/completions`, `body`), then `POST {base}/batches` with the
//! file, `endpoint`, `completion_window: 24h` and `metadata` `{"rmboost_run": run,
//! "rmboost_batch": key}`. Status with `GET {base}/batches/{id}`, results from the output and
//! error files (`GET {base}/files/{id}/content`; a batch whose every line failed has only an
//! error file), cancel with `POST {base}/batches/{id}/cancel`, list with `GET {base}/batches`.

use std::borrow::Cow;
use std::fmt;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::http;
use crate::backend::OpenAiBackend;
use crate::batch::{
    cancelled_error, check_id, expired_error, BatchApi, BatchCounts, BatchLimits, BatchOutcome,
    BatchRequest, BatchState, BatchStatus, BatchTag, ClientLimits,
};
use crate::error::{BackendError, BackendErrorKind};

/// The endpoint named in every line and in the batch.
pub(crate) const ENDPOINT: &str = "/v1/chat/completions";

/// OpenAI's limits: 50,000 requests and 200 MB per input file.
pub(crate) const LIMITS: BatchLimits = BatchLimits {
    max_requests: 50_000,
    max_bytes: 200_000_000,
};

/// OpenAI's Batch API; see the [module docs](self).
#[derive(Clone)]
pub struct OpenAiBatch {
    backend: OpenAiBackend,
    limits: ClientLimits,
}

impl fmt::Debug for OpenAiBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBatch")
            .field("backend", &self.backend)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl OpenAiBatch {
    /// The batch API at the backend's base URL, with its key, headers and model.
    #[must_use]
    pub fn new(backend: OpenAiBackend) -> Self {
        OpenAiBatch {
            backend,
            limits: ClientLimits::new(LIMITS),
        }
    }

    /// Other limits per batch (a self-hosted runner's). Default: OpenAI's (50,000 requests
    /// and 200 MB a batch).
    #[must_use]
    pub fn with_limits(mut self, limits: BatchLimits) -> Self {
        self.limits.batch = limits;
        self
    }

    /// The most bytes of one result file read. Default: 1 GiB.
    #[must_use]
    pub fn max_results_bytes(mut self, max: usize) -> Self {
        self.limits.set_max_results_bytes(max);
        self
    }

    fn url(&self, path: &str) -> Url {
        http::join_path(&self.backend.base, path)
    }

    fn error(&self, status: StatusCode, headers: &HeaderMap, text: &str) -> BackendError {
        http::status_error(
            status,
            headers,
            text,
            self.backend.api_key.as_ref(),
            self.backend.no_key_note.as_deref(),
        )
    }

    /// Sends a request and returns its 2xx body (an error otherwise).
    async fn call(
        &self,
        method: &str,
        builder: reqwest::RequestBuilder,
        url: &Url,
        max_bytes: usize,
    ) -> Result<String, BackendError> {
        let (status, headers, text) = http::send(method, builder, url, max_bytes).await?;
        if !status.is_success() {
            return Err(self.error(status, &headers, &text));
        }
        Ok(text)
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, url: Url) -> Result<T, BackendError> {
        let req = self
            .backend
            .client
            .get(url.clone())
            .headers(self.backend.headers());
        let text = self
            .call("GET", req, &url, self.backend.max_response_bytes)
            .await?;
        parse(&text, self.backend.api_key.as_ref())
    }

    async fn post_json<T: for<'de> Deserialize<'de>>(
        &self,
        url: Url,
        body: &Value,
    ) -> Result<T, BackendError> {
        let req = self
            .backend
            .client
            .post(url.clone())
            .headers(self.backend.headers())
            .json(body);
        let text = self
            .call("POST", req, &url, self.backend.max_response_bytes)
            .await?;
        parse(&text, self.backend.api_key.as_ref())
    }

    async fn file_lines(
        &self,
        file_id: &str,
        out: &mut Vec<BatchOutcome>,
    ) -> Result<(), BackendError> {
        let url = self.url(&format!("files/{}/content", check_id(file_id)?));
        let req = self
            .backend
            .client
            .get(url.clone())
            .headers(self.backend.headers());
        let text = self
            .call("GET", req, &url, self.limits.max_results_bytes)
            .await?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match self.outcome(line) {
                Some(o) => out.push(o),
                None => {
                    tracing::warn!(file = %file_id, line = i + 1, "unreadable batch result line: skipped")
                }
            }
        }
        Ok(())
    }

    /// One line of an output or error file.
    fn outcome(&self, line: &str) -> Option<BatchOutcome> {
        let wire: WireLine = serde_json::from_str(line).ok()?;
        let key = self.backend.api_key.as_ref();
        let result = match (wire.response, wire.error) {
            (Some(r), _) if (200..300).contains(&r.status_code) => {
                let body = r.body.unwrap_or(Value::Null).to_string();
                self.backend.completion_from_body(&body)
            }
            (Some(r), _) => {
                let status = StatusCode::from_u16(r.status_code).unwrap_or(StatusCode::BAD_GATEWAY);
                let body = r.body.map(|b| b.to_string()).unwrap_or_default();
                Err(http::status_error(
                    status,
                    &HeaderMap::new(),
                    &body,
                    key,
                    None,
                ))
            }
            (None, Some(e)) => Err(line_error(&e, key)),
            (None, None) => Err(BackendError::new(
                BackendErrorKind::InvalidResponse,
                "a result line with neither a response nor an error",
            )),
        };
        Some(BatchOutcome {
            custom_id: wire.custom_id,
            result,
        })
    }
}

fn line_error(e: &WireError, key: Option<&secrecy::SecretString>) -> BackendError {
    let code = e.code.as_deref().unwrap_or("");
    if code.contains("expired") {
        return expired_error();
    }
    if code.contains("cancel") {
        return cancelled_error();
    }
    let message = http::redact(e.message.as_deref().unwrap_or("no message"), key);
    BackendError::new(
        BackendErrorKind::Server,
        format!(
            "the line failed ({code}): {}",
            http::truncate(&message, 500)
        ),
    )
}

fn parse<T: for<'de> Deserialize<'de>>(
    text: &str,
    key: Option<&secrecy::SecretString>,
) -> Result<T, BackendError> {
    serde_json::from_str(text).map_err(|e| http::invalid_json(e, &http::redact(text, key)))
}

#[derive(Serialize)]
struct Line<'a> {
    custom_id: &'a str,
    method: &'static str,
    url: &'static str,
    body: crate::backend::openai::Body<'a>,
}

#[derive(Debug, Deserialize)]
struct WireLine {
    custom_id: String,
    #[serde(default)]
    response: Option<WireLineResponse>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
struct WireLineResponse {
    status_code: u16,
    #[serde(default)]
    body: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireFile {
    id: String,
}

#[derive(Debug, Deserialize)]
struct WireBatch {
    id: String,
    status: String,
    #[serde(default)]
    created_at: Option<u64>,
    #[serde(default)]
    output_file_id: Option<String>,
    #[serde(default)]
    error_file_id: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    request_counts: Option<WireCounts>,
    #[serde(default)]
    errors: Option<WireErrors>,
}

#[derive(Debug, Deserialize)]
struct WireCounts {
    #[serde(default)]
    total: u64,
    #[serde(default)]
    completed: u64,
    #[serde(default)]
    failed: u64,
}

#[derive(Debug, Deserialize)]
struct WireErrors {
    #[serde(default)]
    data: Vec<WireErrorItem>,
}

#[derive(Debug, Deserialize)]
struct WireErrorItem {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    line: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct WireList {
    #[serde(default)]
    data: Vec<WireBatch>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

impl WireBatch {
    fn into_status(self) -> Result<BatchStatus, BackendError> {
        let state = match self.status.as_str() {
            "validating" => BatchState::Validating,
            "in_progress" => BatchState::InProgress,
            "finalizing" => BatchState::Finalizing,
            "completed" => BatchState::Ended,
            "failed" => BatchState::Failed,
            "expired" => BatchState::Expired,
            "cancelling" => BatchState::Cancelling,
            "cancelled" => BatchState::Cancelled,
            other => {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidResponse,
                    format!("unknown batch status {:?}", http::truncate(other, 40)),
                ))
            }
        };
        let counts = self
            .request_counts
            .map_or(BatchCounts::default(), |c| BatchCounts {
                total: c.total,
                succeeded: c.completed,
                failed: c.failed,
                processing: c.total.saturating_sub(c.completed + c.failed),
            });
        let meta = self.metadata.unwrap_or_default();
        let text = |k: &str| meta.get(k).and_then(Value::as_str).map(str::to_string);
        let tag = match (text("rmboost_run"), text("rmboost_batch")) {
            (Some(run), Some(key)) => Some(BatchTag { run, key }),
            _ => None,
        };
        let message = self.errors.filter(|e| !e.data.is_empty()).map(|e| {
            e.data
                .iter()
                .take(5)
                .map(|d| {
                    let mut s = d.message.clone().unwrap_or_default();
                    if let Some(c) = &d.code {
                        s = format!("{c}: {s}");
                    }
                    if let Some(l) = d.line {
                        s = format!("line {l}: {s}");
                    }
                    http::truncate(&s, 300)
                })
                .collect::<Vec<_>>()
                .join("; ")
        });
        let mut status = BatchStatus::new(self.id, state, counts);
        status.created_at = self.created_at.unwrap_or(0);
        status.tag = tag;
        status.message = message;
        Ok(status)
    }
}

#[async_trait]
impl BatchApi for OpenAiBatch {
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed("openai")
    }

    fn identity(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.backend.identity)
    }

    fn model(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.backend.model)
    }

    fn limits(&self) -> BatchLimits {
        self.limits.batch
    }

    async fn submit(
        &self,
        requests: &[BatchRequest],
        tag: &BatchTag,
    ) -> Result<String, BackendError> {
        let mut jsonl = Vec::new();
        for r in requests {
            let line = Line {
                custom_id: &r.custom_id,
                method: "POST",
                url: ENDPOINT,
                body: self.backend.body(&r.request),
            };
            serde_json::to_writer(&mut jsonl, &line).map_err(|e| {
                BackendError::new(
                    BackendErrorKind::InvalidRequest,
                    format!("a request cannot be written as JSON: {e}"),
                )
            })?;
            jsonl.push(b'\n');
        }
        self.limits.check(requests.len(), jsonl.len())?;
        let part = reqwest::multipart::Part::bytes(jsonl)
            .file_name("rmboost-batch.jsonl")
            .mime_str("application/jsonl")
            .map_err(|e| BackendError::new(BackendErrorKind::Fatal, e.to_string()))?;
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part("file", part);
        let url = self.url("files");
        let req = self
            .backend
            .client
            .post(url.clone())
            .headers(self.backend.headers())
            .multipart(form);
        let text = self
            .call("POST", req, &url, self.backend.max_response_bytes)
            .await?;
        let file: WireFile = parse(&text, self.backend.api_key.as_ref())?;
        let body = serde_json::json!({
            "input_file_id": check_id(&file.id)?,
            "endpoint": ENDPOINT,
            "completion_window": "24h",
            "metadata": {"rmboost_run": tag.run, "rmboost_batch": tag.key},
        });
        let batch: WireBatch = self.post_json(self.url("batches"), &body).await?;
        Ok(batch.id)
    }

    async fn status(&self, id: &str) -> Result<BatchStatus, BackendError> {
        let url = self.url(&format!("batches/{}", check_id(id)?));
        self.get_json::<WireBatch>(url).await?.into_status()
    }

    async fn results(&self, id: &str) -> Result<Vec<BatchOutcome>, BackendError> {
        let url = self.url(&format!("batches/{}", check_id(id)?));
        let batch: WireBatch = self.get_json(url).await?;
        let mut out = Vec::new();
        for file in [&batch.output_file_id, &batch.error_file_id]
            .into_iter()
            .flatten()
        {
            if !file.is_empty() {
                self.file_lines(file, &mut out).await?;
            }
        }
        Ok(out)
    }

    async fn cancel(&self, id: &str) -> Result<BatchStatus, BackendError> {
        let url = self.url(&format!("batches/{}/cancel", check_id(id)?));
        let batch: WireBatch = self.post_json(url, &serde_json::json!({})).await?;
        batch.into_status()
    }

    async fn list(&self, tag: &BatchTag, since: u64) -> Result<Vec<BatchStatus>, BackendError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        // Newest first: stop at the first page that reaches past `since`.
        for _ in 0..100 {
            let mut url = self.url("batches");
            url.query_pairs_mut().append_pair("limit", "100");
            if let Some(a) = &after {
                url.query_pairs_mut().append_pair("after", a);
            }
            let page: WireList = self.get_json(url).await?;
            let mut older = false;
            for b in page.data {
                if b.created_at.is_some_and(|c| c < since) {
                    older = true;
                    continue;
                }
                let s = b.into_status()?;
                if s.tag.as_ref().is_some_and(|t| t.run == tag.run) {
                    out.push(s);
                }
            }
            match page.last_id {
                Some(last) if page.has_more && !older => after = Some(last),
                _ => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CompletionRequest, FinishReason, Message};

    fn api() -> OpenAiBatch {
        OpenAiBatch::new(
            OpenAiBackend::builder()
                .base_url("http://127.0.0.1:1/v1")
                .model("m")
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn urls_sit_under_the_base() {
        assert_eq!(
            api().url("batches/b1").as_str(),
            "http://127.0.0.1:1/v1/batches/b1"
        );
    }

    #[test]
    fn lines_carry_the_online_body() {
        let a = api();
        let req = CompletionRequest::new(vec![Message::user("u")]).with_seed(3);
        let line = Line {
            custom_id: "c1",
            method: "POST",
            url: ENDPOINT,
            body: a.backend.body(&req),
        };
        let v: Value = serde_json::to_value(&line).unwrap();
        let online = serde_json::to_value(a.backend.body(&req)).unwrap();
        assert_eq!(v["body"], online);
        assert_eq!(v["url"], "/v1/chat/completions");
        assert_eq!(v["custom_id"], "c1");
    }

    #[test]
    fn result_lines_map_to_outcomes() {
        let a = api();
        let ok = a
            .outcome(r#"{"id":"r1","custom_id":"a","response":{"status_code":200,"request_id":"q","body":{"model":"m","choices":[{"message":{"content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}},"error":null}"#)
            .unwrap();
        let c = ok.result.unwrap();
        assert_eq!(
            (c.text.as_str(), c.finish_reason),
            ("hi", FinishReason::Length)
        );
        let e5 = a
            .outcome(r#"{"custom_id":"b","response":{"status_code":500,"body":{"error":{"message":"boom"}}},"error":null}"#)
            .unwrap();
        assert_eq!(e5.result.unwrap_err().kind(), BackendErrorKind::Server);
        let e4 = a
            .outcome(r#"{"custom_id":"b","response":{"status_code":400,"body":{"error":{"message":"bad"}}},"error":null}"#)
            .unwrap();
        assert_eq!(
            e4.result.unwrap_err().kind(),
            BackendErrorKind::InvalidRequest
        );
        let exp = a
            .outcome(r#"{"custom_id":"c","response":null,"error":{"code":"batch_expired","message":"late"}}"#)
            .unwrap();
        let e = exp.result.unwrap_err();
        assert!(e.is_retryable() && e.kind() == BackendErrorKind::Timeout);
        assert!(a.outcome("not json").is_none());
    }

    #[test]
    fn batch_objects_map_to_status() {
        let b: WireBatch = serde_json::from_str(
            r#"{"id":"batch_1","object":"batch","status":"failed","created_at":7,
                "metadata":{"rmboost_run":"r","rmboost_batch":"k"},
                "request_counts":{"total":3,"completed":1,"failed":1},
                "errors":{"data":[{"code":"bad_line","message":"no","line":2}]}}"#,
        )
        .unwrap();
        let s = b.into_status().unwrap();
        assert_eq!(s.state, BatchState::Failed);
        assert_eq!(s.counts.processing, 1);
        assert_eq!(
            s.tag,
            Some(BatchTag {
                run: "r".into(),
                key: "k".into()
            })
        );
        assert_eq!(s.created_at, 7);
        assert!(s.message.unwrap().contains("line 2"));
        let b: WireBatch = serde_json::from_str(r#"{"id":"x","status":"weird"}"#).unwrap();
        assert!(b.into_status().is_err());
    }

    /// A batch over the limits is refused before anything is sent (the clients' shared test),
    /// and the limit setters set what the client keeps to.
    #[test]
    fn batches_over_the_limits_are_refused_before_sending() {
        crate::batch::assert_refuses_over_limits(|limits, requests, tag| {
            let api = api().with_limits(limits).max_results_bytes(0);
            assert_eq!(api.limits(), limits);
            assert_eq!(api.limits.max_results_bytes, 1);
            futures::executor::block_on(api.submit(requests, tag)).unwrap_err()
        });
        assert_eq!(api().limits(), LIMITS);
        assert_eq!(
            api().limits.max_results_bytes,
            crate::batch::DEFAULT_MAX_RESULTS_BYTES
        );
    }

    #[test]
    fn a_cost_budget_that_is_not_positive_is_refused_at_start() {
        use crate::batch::{BatchBackend, BatchConfig, StateFile};
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pairs.jsonl");
        for bad in [0.0, -1.0, f64::NAN] {
            let prices = crate::run::Prices::new(1.0, 1.0).unwrap();
            let mut config = BatchConfig::new();
            config.budget = Some((prices, bad));
            let err = BatchBackend::start(std::sync::Arc::new(api()), &out, config).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Config);
            assert!(
                err.to_string()
                    .contains("the cost budget must be a positive amount"),
                "{err}"
            );
        }
        assert!(!StateFile::default_path(&out).exists(), "nothing written");
    }
}
