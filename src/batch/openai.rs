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

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::http;
use crate::backend::OpenAiBackend;
use crate::batch::client::{self, to_json, Body, Client};
use crate::batch::{
    cancelled_error, check_id, expired_error, BatchApi, BatchCounts, BatchLimits, BatchOutcome,
    BatchRequest, BatchState, BatchStatus, BatchTag,
};
use crate::error::{BackendError, BackendErrorKind};

/// The endpoint named in every line and in the batch.
pub(crate) const ENDPOINT: &str = "/v1/chat/completions";

/// OpenAI's limits: 50,000 requests and 200 MB per input file.
pub(crate) const LIMITS: BatchLimits = BatchLimits {
    max_requests: 50_000,
    max_bytes: 200_000_000,
};

/// OpenAI's batch statuses.
const STATES: [(&str, BatchState); 8] = [
    ("validating", BatchState::Validating),
    ("in_progress", BatchState::InProgress),
    ("finalizing", BatchState::Finalizing),
    ("completed", BatchState::Ended),
    ("failed", BatchState::Failed),
    ("expired", BatchState::Expired),
    ("cancelling", BatchState::Cancelling),
    ("cancelled", BatchState::Cancelled),
];

/// OpenAI's Batch API; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct OpenAiBatch {
    backend: OpenAiBackend,
    client: Client,
}

impl OpenAiBatch {
    /// The batch API at the backend's base URL, with its key, headers and model.
    #[must_use]
    pub fn new(backend: OpenAiBackend) -> Self {
        let client = Client::new(&backend, LIMITS);
        OpenAiBatch { backend, client }
    }

    setters! {
        /// Other limits per batch (a self-hosted runner's). Default: OpenAI's (50,000 requests
        /// and 200 MB a batch).
        #[must_use]
        with_limits(limits: BatchLimits) => client.limits = limits;
        /// The most bytes of one result file read (at least one). Default: 1 GiB.
        #[must_use]
        max_results_bytes(max: usize) => client.max_results_bytes = max.max(1);
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
    response: Option<WireLineResponse>,
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
struct WireLineResponse {
    status_code: u16,
    body: Option<Value>,
}

/// A failed line's error, or one of a batch's errors (with the input `line` it is about).
#[derive(Debug, Deserialize)]
struct WireError {
    code: Option<String>,
    message: Option<String>,
    line: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct WireFile {
    id: String,
}

#[derive(Debug, Deserialize)]
struct WireBatch {
    id: String,
    status: String,
    created_at: Option<u64>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    metadata: Option<serde_json::Map<String, Value>>,
    request_counts: Option<WireCounts>,
    errors: Option<WireErrors>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WireCounts {
    total: u64,
    completed: u64,
    failed: u64,
}

#[derive(Debug, Deserialize)]
struct WireErrors {
    #[serde(default)]
    data: Vec<WireError>,
}

impl WireBatch {
    fn into_status(self) -> Result<BatchStatus, BackendError> {
        let state = client::state(&STATES, &self.status)?;
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
        let tag = text("rmboost_run")
            .zip(text("rmboost_batch"))
            .map(|(run, key)| BatchTag { run, key });
        let message = self.errors.filter(|e| !e.data.is_empty()).map(|e| {
            e.data
                .iter()
                .take(5)
                .map(|d| {
                    let line = d.line.map(|l| format!("line {l}: ")).unwrap_or_default();
                    let code = d
                        .code
                        .as_ref()
                        .map(|c| format!("{c}: "))
                        .unwrap_or_default();
                    let message = d.message.as_deref().unwrap_or_default();
                    http::truncate(&format!("{line}{code}{message}"), 300)
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
        self.client.limits
    }

    async fn submit(
        &self,
        requests: &[BatchRequest],
        tag: &BatchTag,
    ) -> Result<String, BackendError> {
        let mut jsonl = Vec::new();
        for r in requests {
            jsonl.extend(to_json(&Line {
                custom_id: &r.custom_id,
                method: "POST",
                url: ENDPOINT,
                body: self.backend.body(&r.request),
            })?);
            jsonl.push(b'\n');
        }
        self.client.check(requests.len(), jsonl.len())?;
        let part = reqwest::multipart::Part::bytes(jsonl)
            .file_name("rmboost-batch.jsonl")
            .mime_str("application/jsonl")
            .map_err(|e| BackendError::new(BackendErrorKind::Fatal, e.to_string()))?;
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part("file", part);
        let file: WireFile = self
            .client
            .json(self.client.url("files"), Body::Form(form))
            .await?;
        let body = serde_json::json!({
            "input_file_id": check_id(&file.id)?,
            "endpoint": ENDPOINT,
            "completion_window": "24h",
            "metadata": {"rmboost_run": tag.run, "rmboost_batch": tag.key},
        });
        let url = self.client.url("batches");
        let batch: WireBatch = self.client.json(url, Body::Json(to_json(&body)?)).await?;
        Ok(batch.id)
    }

    async fn status(&self, id: &str) -> Result<BatchStatus, BackendError> {
        let url = self.client.id_url("batches", id, "")?;
        self.client
            .json::<WireBatch>(url, Body::None)
            .await?
            .into_status()
    }

    async fn results(&self, id: &str) -> Result<Vec<BatchOutcome>, BackendError> {
        let url = self.client.id_url("batches", id, "")?;
        let batch: WireBatch = self.client.json(url, Body::None).await?;
        let mut out = Vec::new();
        for file in [batch.output_file_id, batch.error_file_id]
            .into_iter()
            .flatten()
            .filter(|f| !f.is_empty())
        {
            let url = self.client.id_url("files", &file, "/content")?;
            let outcome = |line: &str| self.outcome(line);
            self.client.results(&url, &file, &mut out, outcome).await?;
        }
        Ok(out)
    }

    async fn cancel(&self, id: &str) -> Result<BatchStatus, BackendError> {
        let url = self.client.id_url("batches", id, "/cancel")?;
        let batch: WireBatch = self.client.json(url, Body::Json(b"{}".to_vec())).await?;
        batch.into_status()
    }

    async fn list(&self, tag: &BatchTag, since: u64) -> Result<Vec<BatchStatus>, BackendError> {
        let mut out = self
            .client
            .list("batches", "after", since, WireBatch::into_status)
            .await?;
        out.retain(|s| s.tag.as_ref().is_some_and(|t| t.run == tag.run));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::client::DEFAULT_MAX_RESULTS_BYTES;
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
            api().client.url("batches/b1").as_str(),
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

    /// A batch over the limits is refused before anything is sent (the base URL is port 1: a
    /// connection error otherwise), and the limit setters set what the client keeps to.
    #[test]
    fn batches_over_the_limits_are_refused_before_sending() {
        let limits = BatchLimits {
            max_requests: 1,
            max_bytes: u64::MAX,
        };
        let small = api().with_limits(limits).max_results_bytes(0);
        assert_eq!(
            (small.limits(), small.client.max_results_bytes),
            (limits, 1)
        );
        let request = |id: &str| BatchRequest {
            custom_id: id.into(),
            request: CompletionRequest::new(vec![Message::user("u")]),
        };
        let tag = BatchTag {
            run: "r".into(),
            key: "k".into(),
        };
        let e = futures::executor::block_on(small.submit(&[request("a"), request("b")], &tag));
        let e = e.unwrap_err();
        assert!(e.to_string().contains("a batch of 2 requests and "), "{e}");
        assert_eq!(
            (api().limits(), api().client.max_results_bytes),
            (LIMITS, DEFAULT_MAX_RESULTS_BYTES)
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
