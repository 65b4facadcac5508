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

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::http::{self, ServerError};
use crate::backend::AnthropicBackend;
use crate::batch::client::{self, to_json, Body, Client};
use crate::batch::{
    cancelled_error, expired_error, BatchApi, BatchCounts, BatchLimits, BatchOutcome, BatchRequest,
    BatchState, BatchStatus, BatchTag,
};
use crate::error::{BackendError, BackendErrorKind};

/// Anthropic's limits: 100,000 requests or 256 MB per batch.
pub(crate) const LIMITS: BatchLimits = BatchLimits {
    max_requests: 100_000,
    max_bytes: 256_000_000,
};

/// Anthropic's Message Batches API; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct AnthropicBatch {
    backend: AnthropicBackend,
    client: Client,
}

impl AnthropicBatch {
    /// The batch API at the backend's base URL, with its key, headers and model.
    #[must_use]
    pub fn new(backend: AnthropicBackend) -> Self {
        let client = Client::new(&backend, LIMITS);
        AnthropicBatch { backend, client }
    }

    setters! {
        /// Other limits per batch. Default: Anthropic's (100,000 requests and 256 MB a batch).
        #[must_use]
        with_limits(limits: BatchLimits) => client.limits = limits;
        /// The most bytes of one results file read (at least one). Default: 1 GiB.
        #[must_use]
        max_results_bytes(max: usize) => client.max_results_bytes = max.max(1);
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
    message: Option<Value>,
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct WireBatch {
    id: String,
    processing_status: String,
    request_counts: Option<WireCounts>,
    results_url: Option<String>,
    created_at: Option<Value>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(default)]
struct WireCounts {
    processing: u64,
    succeeded: u64,
    errored: u64,
    canceled: u64,
    expired: u64,
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
        let states = [
            ("in_progress", BatchState::InProgress),
            ("canceling", BatchState::Cancelling),
            ("ended", BatchState::Ended),
        ];
        let state = match client::state(&states, &self.processing_status)? {
            BatchState::Ended if c.canceled > 0 => BatchState::Cancelled,
            state => state,
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
        self.client.limits
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
        let body = to_json(&create)?;
        self.client.check(requests.len(), body.len())?;
        let url = self.client.url("messages/batches");
        let batch: WireBatch = self.client.json(url, Body::Json(body)).await?;
        Ok(batch.id)
    }

    async fn status(&self, id: &str) -> Result<BatchStatus, BackendError> {
        let url = self.client.id_url("messages/batches", id, "")?;
        self.client
            .json::<WireBatch>(url, Body::None)
            .await?
            .status()
    }

    async fn results(&self, id: &str) -> Result<Vec<BatchOutcome>, BackendError> {
        let url = self.client.id_url("messages/batches", id, "")?;
        let batch: WireBatch = self.client.json(url, Body::None).await?;
        let Some(results) = batch.results_url.filter(|u| !u.is_empty()) else {
            return Err(BackendError::new(
                BackendErrorKind::InvalidResponse,
                format!("batch {id} ended without a results_url"),
            ));
        };
        let base = &self.client.base;
        let results = base.join(&results).map_err(|_| {
            BackendError::new(
                BackendErrorKind::InvalidResponse,
                "the results_url is not a URL",
            )
        })?;
        if results.origin() != base.origin() {
            return Err(BackendError::new(
                BackendErrorKind::Fatal,
                format!(
                    "the results of batch {id} are on another host ({}): the API key is not \
                     sent there",
                    results.host_str().unwrap_or("none")
                ),
            ));
        }
        let mut out = Vec::new();
        let outcome = |line: &str| self.outcome(line);
        self.client.results(&results, id, &mut out, outcome).await?;
        Ok(out)
    }

    async fn cancel(&self, id: &str) -> Result<BatchStatus, BackendError> {
        let url = self.client.id_url("messages/batches", id, "/cancel")?;
        let batch: WireBatch = self.client.json(url, Body::Json(b"{}".to_vec())).await?;
        batch.status()
    }

    async fn list(&self, _tag: &BatchTag, since: u64) -> Result<Vec<BatchStatus>, BackendError> {
        let status = |b: WireBatch| b.status();
        self.client
            .list("messages/batches", "after_id", since, status)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::client::DEFAULT_MAX_RESULTS_BYTES;
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
            a.client.url("messages/batches").as_str(),
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
}
