//! [`AnthropicBatch`]: Anthropic's Message Batches API.
//!
//! Made from an [`AnthropicBackend`], whose client, key, headers (`anthropic-version`
//! included), body builder and answer parser it uses: each request's `params` is exactly what
//! the online backend would send. The key goes only to the backend's own host: a
//! `results_url` on another host is refused. No redirect is followed; every body read is
//! capped.
//!
//! The API keeps no metadata on a batch, so a batch created just before a crash is found by
//! its creation time and request count, and its `custom_id`s are checked when its results are
//! read (see the [batch module](crate::batch)).
//!
//! ```no_run
//! use std::sync::Arc;
//! use rmboost::backend::anthropic::AnthropicBackend;
//! use rmboost::batch::anthropic::AnthropicBatch;
//! use rmboost::batch::BatchApi;
//!
//! # fn f() -> Result<(), rmboost::Error> {
//! let backend = AnthropicBackend::builder().model("claude-sonnet-4-5").build()?;
//! let api: Arc<dyn BatchApi> = Arc::new(AnthropicBatch::new(backend));
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::fmt;

use async_trait::async_trait;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::http::{self, ServerError};
use crate::backend::AnthropicBackend;
use crate::batch::{
    cancelled_error, check_id, expired_error, BatchApi, BatchCounts, BatchLimits, BatchOutcome,
    BatchRequest, BatchState, BatchStatus, BatchTag, ClientLimits,
};
use crate::error::{BackendError, BackendErrorKind};

/// Anthropic's limits: 100,000 requests or 256 MB per batch.
pub(crate) const LIMITS: BatchLimits = BatchLimits {
    max_requests: 100_000,
    max_bytes: 256_000_000,
};

/// Anthropic's Message Batches API; see the [module docs](self).
#[derive(Clone)]
pub struct AnthropicBatch {
    backend: AnthropicBackend,
    limits: ClientLimits,
}

impl fmt::Debug for AnthropicBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicBatch")
            .field("backend", &self.backend)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl AnthropicBatch {
    /// The batch API at the backend's base URL, with its key, headers and model.
    #[must_use]
    pub fn new(backend: AnthropicBackend) -> Self {
        AnthropicBatch {
            backend,
            limits: ClientLimits::new(LIMITS),
        }
    }

    /// Other limits per batch. Default: Anthropic's (100,000 requests and 256 MB a batch).
    #[must_use]
    pub fn with_limits(mut self, limits: BatchLimits) -> Self {
        self.limits.batch = limits;
        self
    }

    /// The most bytes of one results file read. Default: 1 GiB.
    #[must_use]
    pub fn max_results_bytes(mut self, max: usize) -> Self {
        self.limits.set_max_results_bytes(max);
        self
    }

    fn url(&self, path: &str) -> Url {
        http::join_path(&self.backend.base, path)
    }

    async fn call(
        &self,
        method: &str,
        builder: reqwest::RequestBuilder,
        url: &Url,
        max_bytes: usize,
    ) -> Result<String, BackendError> {
        let (status, headers, text) = http::send(method, builder, url, max_bytes).await?;
        if !status.is_success() {
            return Err(http::status_error(
                status,
                &headers,
                &text,
                self.backend.api_key.as_ref(),
                self.backend.no_key_note.as_deref(),
            ));
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

    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        url: Url,
        body: Vec<u8>,
    ) -> Result<T, BackendError> {
        let mut headers = self.backend.headers();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/json"),
        );
        let req = self
            .backend
            .client
            .post(url.clone())
            .headers(headers)
            .body(body);
        let text = self
            .call("POST", req, &url, self.backend.max_response_bytes)
            .await?;
        parse(&text, self.backend.api_key.as_ref())
    }

    /// One line of a results file.
    fn outcome(&self, line: &str) -> Option<BatchOutcome> {
        let wire: WireResultLine = serde_json::from_str(line).ok()?;
        let key = self.backend.api_key.as_ref();
        let result = match wire.result.kind.as_str() {
            "succeeded" => {
                let message = wire.result.message.unwrap_or(Value::Null).to_string();
                self.backend.completion_from_body(&message)
            }
            "errored" => {
                let error = wire.result.error.unwrap_or(Value::Null).to_string();
                let server = ServerError::parse(&error).unwrap_or_default();
                Err(http::body_error(&server, key))
            }
            "expired" => Err(expired_error()),
            "canceled" | "cancelled" => Err(cancelled_error()),
            other => Err(BackendError::new(
                BackendErrorKind::InvalidResponse,
                format!("unknown result type {:?}", http::truncate(other, 40)),
            )),
        };
        Some(BatchOutcome {
            custom_id: wire.custom_id,
            result,
        })
    }
}

fn parse<T: for<'de> Deserialize<'de>>(
    text: &str,
    key: Option<&secrecy::SecretString>,
) -> Result<T, BackendError> {
    serde_json::from_str(text).map_err(|e| http::invalid_json(e, &http::redact(text, key)))
}

#[derive(Serialize)]
struct Params<'a> {
    custom_id: &'a str,
    params: crate::backend::anthropic::Body<'a>,
}

#[derive(Serialize)]
struct Create<'a> {
    requests: Vec<Params<'a>>,
}

#[derive(Debug, Deserialize)]
struct WireResultLine {
    custom_id: String,
    result: WireResult,
}

#[derive(Debug, Deserialize)]
struct WireResult {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct WireBatch {
    id: String,
    processing_status: String,
    #[serde(default)]
    request_counts: Option<WireCounts>,
    #[serde(default)]
    results_url: Option<String>,
    #[serde(default)]
    created_at: Option<Value>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct WireCounts {
    #[serde(default)]
    processing: u64,
    #[serde(default)]
    succeeded: u64,
    #[serde(default)]
    errored: u64,
    #[serde(default)]
    canceled: u64,
    #[serde(default)]
    expired: u64,
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
    fn created(&self) -> u64 {
        match &self.created_at {
            Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
            Some(Value::String(s)) => http::parse_rfc3339(s)
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs()),
            _ => 0,
        }
    }

    fn status(&self) -> Result<BatchStatus, BackendError> {
        let c = self.request_counts.unwrap_or_default();
        let state = match self.processing_status.as_str() {
            "in_progress" => BatchState::InProgress,
            "canceling" => BatchState::Cancelling,
            "ended" if c.canceled > 0 => BatchState::Cancelled,
            "ended" => BatchState::Ended,
            other => {
                return Err(BackendError::new(
                    BackendErrorKind::InvalidResponse,
                    format!("unknown processing_status {:?}", http::truncate(other, 40)),
                ))
            }
        };
        let failed = c.errored + c.canceled + c.expired;
        let counts = BatchCounts {
            total: c.processing + c.succeeded + failed,
            succeeded: c.succeeded,
            failed,
            processing: c.processing,
        };
        let mut status = BatchStatus::new(self.id.clone(), state, counts);
        status.created_at = self.created();
        Ok(status)
    }
}

#[async_trait]
impl BatchApi for AnthropicBatch {
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed("anthropic")
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
        _tag: &BatchTag,
    ) -> Result<String, BackendError> {
        let create = Create {
            requests: requests
                .iter()
                .map(|r| Params {
                    custom_id: &r.custom_id,
                    params: self.backend.body(&r.request),
                })
                .collect(),
        };
        let body = serde_json::to_vec(&create).map_err(|e| {
            BackendError::new(
                BackendErrorKind::InvalidRequest,
                format!("a request cannot be written as JSON: {e}"),
            )
        })?;
        self.limits.check(requests.len(), body.len())?;
        let batch: WireBatch = self.post(self.url("messages/batches"), body).await?;
        Ok(batch.id)
    }

    async fn status(&self, id: &str) -> Result<BatchStatus, BackendError> {
        let url = self.url(&format!("messages/batches/{}", check_id(id)?));
        self.get_json::<WireBatch>(url).await?.status()
    }

    async fn results(&self, id: &str) -> Result<Vec<BatchOutcome>, BackendError> {
        let url = self.url(&format!("messages/batches/{}", check_id(id)?));
        let batch: WireBatch = self.get_json(url).await?;
        let Some(results) = batch.results_url.filter(|u| !u.is_empty()) else {
            return Err(BackendError::new(
                BackendErrorKind::InvalidResponse,
                format!("batch {id} ended without a results_url"),
            ));
        };
        let results = self.backend.base.join(&results).map_err(|_| {
            BackendError::new(
                BackendErrorKind::InvalidResponse,
                "the results_url is not a URL",
            )
        })?;
        let base = &self.backend.base;
        if (
            results.scheme(),
            results.host_str(),
            results.port_or_known_default(),
        ) != (base.scheme(), base.host_str(), base.port_or_known_default())
        {
            return Err(BackendError::new(
                BackendErrorKind::Fatal,
                format!(
                    "the results of batch {id} are on another host ({}): the API key is not \
                     sent there",
                    results.host_str().unwrap_or("none")
                ),
            ));
        }
        let req = self
            .backend
            .client
            .get(results.clone())
            .headers(self.backend.headers());
        let text = self
            .call("GET", req, &results, self.limits.max_results_bytes)
            .await?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match self.outcome(line) {
                Some(o) => out.push(o),
                None => {
                    tracing::warn!(batch = %id, line = i + 1, "unreadable batch result line: skipped")
                }
            }
        }
        Ok(out)
    }

    async fn cancel(&self, id: &str) -> Result<BatchStatus, BackendError> {
        let url = self.url(&format!("messages/batches/{}/cancel", check_id(id)?));
        let batch: WireBatch = self.post(url, b"{}".to_vec()).await?;
        batch.status()
    }

    async fn list(&self, _tag: &BatchTag, since: u64) -> Result<Vec<BatchStatus>, BackendError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..100 {
            let mut url = self.url("messages/batches");
            url.query_pairs_mut().append_pair("limit", "100");
            if let Some(a) = &after {
                url.query_pairs_mut().append_pair("after_id", a);
            }
            let page: WireList = self.get_json(url).await?;
            let mut older = false;
            for b in &page.data {
                let created = b.created();
                if created != 0 && created < since {
                    older = true;
                    continue;
                }
                out.push(b.status()?);
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
    use crate::{CompletionRequest, Message};

    fn api() -> AnthropicBatch {
        AnthropicBatch::new(
            AnthropicBackend::builder()
                .base_url("http://127.0.0.1:1/v1")
                .model("m")
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn params_are_the_online_body() {
        let a = api();
        let req = CompletionRequest::new(vec![Message::system("s"), Message::user("u")]);
        let v = serde_json::to_value(Params {
            custom_id: "c",
            params: a.backend.body(&req),
        })
        .unwrap();
        assert_eq!(
            v["params"],
            serde_json::to_value(a.backend.body(&req)).unwrap()
        );
        assert_eq!(
            a.url("messages/batches").as_str(),
            "http://127.0.0.1:1/v1/messages/batches"
        );
    }

    #[test]
    fn result_lines_map_to_outcomes() {
        let a = api();
        let ok = a
            .outcome(r#"{"custom_id":"a","result":{"type":"succeeded","message":{"type":"message","model":"m","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":2,"output_tokens":1}}}}"#)
            .unwrap();
        assert_eq!(ok.result.unwrap().text, "hi");
        let bad = a
            .outcome(r#"{"custom_id":"b","result":{"type":"errored","error":{"type":"error","error":{"type":"invalid_request_error","message":"no"}}}}"#)
            .unwrap();
        assert_eq!(
            bad.result.unwrap_err().kind(),
            BackendErrorKind::InvalidRequest
        );
        let busy = a
            .outcome(r#"{"custom_id":"b","result":{"type":"errored","error":{"type":"error","error":{"type":"api_error","message":"oops"}}}}"#)
            .unwrap();
        assert!(busy.result.unwrap_err().is_retryable());
        for t in ["expired", "canceled"] {
            let o = a
                .outcome(&format!(r#"{{"custom_id":"c","result":{{"type":"{t}"}}}}"#))
                .unwrap();
            assert!(o.result.unwrap_err().is_retryable(), "{t}");
        }
    }

    #[test]
    fn batch_objects_map_to_status() {
        let b: WireBatch = serde_json::from_str(
            r#"{"id":"msgbatch_1","type":"message_batch","processing_status":"ended",
                "request_counts":{"processing":0,"succeeded":2,"errored":1,"canceled":0,"expired":1},
                "created_at":"1970-01-02T00:00:01Z","results_url":"http://127.0.0.1:1/v1/x"}"#,
        )
        .unwrap();
        let s = b.status().unwrap();
        assert_eq!(s.state, BatchState::Ended);
        assert_eq!((s.counts.total, s.counts.failed), (4, 2));
        assert_eq!(s.created_at, 86_401);
        assert_eq!(s.tag, None);
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
}
