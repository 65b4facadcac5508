//! The HTTP core the provider batch clients share: the online backend's client, headers and
//! key, the size limits, JSON calls, results files and paged lists. Each provider gives only
//! its request shape, endpoints and line parsing.

use std::fmt;

use reqwest::header::{HeaderMap, CONTENT_TYPE};
use reqwest::Url;
use secrecy::SecretString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::http::{self, HttpBackend, Provider};
use crate::batch::{check_id, BatchLimits, BatchOutcome, BatchState, BatchStatus};
use crate::error::{BackendError, BackendErrorKind};

/// The default cap on one results download: 1 GiB.
pub(crate) const DEFAULT_MAX_RESULTS_BYTES: usize = 1 << 30;

/// What a provider batch client takes from its online backend (made by the provider's `new`),
/// and the sizes it keeps to.
#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) base: Url,
    /// The online backend's headers, the key's included (marked sensitive).
    pub(crate) headers: HeaderMap,
    pub(crate) key: Option<SecretString>,
    pub(crate) no_key_note: Option<String>,
    pub(crate) max_response_bytes: usize,
    /// What one batch may hold, checked before it is sent.
    pub(crate) limits: BatchLimits,
    /// The most bytes of one results download read.
    pub(crate) max_results_bytes: usize,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("limits", &self.limits)
            .field("max_results_bytes", &self.max_results_bytes)
            .finish_non_exhaustive()
    }
}

/// The body of a call: none (a GET), JSON or a multipart upload (a POST).
pub(crate) enum Body {
    None,
    Json(Vec<u8>),
    #[cfg(feature = "openai")]
    Form(reqwest::multipart::Form),
}

/// A page of a provider's list of batches.
#[derive(Deserialize)]
struct Page<W> {
    #[serde(default = "Vec::new")]
    data: Vec<W>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// The state named `name` in a provider's `table` of its names, or an
/// [`InvalidResponse`](BackendErrorKind::InvalidResponse) error naming it.
pub(crate) fn state(table: &[(&str, BatchState)], name: &str) -> Result<BatchState, BackendError> {
    let found = table.iter().find(|(n, _)| *n == name).map(|&(_, s)| s);
    found.ok_or_else(|| {
        BackendError::new(
            BackendErrorKind::InvalidResponse,
            format!("unknown batch status {:?}", http::truncate(name, 40)),
        )
    })
}

/// `value` as JSON, or an [`InvalidRequest`](BackendErrorKind::InvalidRequest) error.
pub(crate) fn to_json(value: &impl Serialize) -> Result<Vec<u8>, BackendError> {
    serde_json::to_vec(value).map_err(|e| {
        BackendError::new(
            BackendErrorKind::InvalidRequest,
            format!("a request cannot be written as JSON: {e}"),
        )
    })
}

impl Client {
    /// The client of `backend`'s batch API: its HTTP client, base URL, headers and key.
    pub(crate) fn new<P: Provider>(backend: &HttpBackend<P>, limits: BatchLimits) -> Self {
        Client {
            http: backend.client.clone(),
            base: backend.base.clone(),
            headers: backend.headers(),
            key: backend.api_key.clone(),
            no_key_note: backend.no_key_note.clone(),
            max_response_bytes: backend.max_response_bytes,
            limits,
            max_results_bytes: DEFAULT_MAX_RESULTS_BYTES,
        }
    }

    pub(crate) fn url(&self, path: &str) -> Url {
        http::join_path(&self.base, path)
    }

    /// `{base}/{path}/{id}{suffix}`, the provider's `id` checked first.
    pub(crate) fn id_url(&self, path: &str, id: &str, suffix: &str) -> Result<Url, BackendError> {
        Ok(self.url(&format!("{path}/{}{suffix}", check_id(id)?)))
    }

    /// Sends `body` to `url` with the backend's headers (no redirect followed) and returns the
    /// 2xx body, read up to `max_bytes`, or the answer's error classified as online.
    pub(crate) async fn text(
        &self,
        url: &Url,
        body: Body,
        max_bytes: usize,
    ) -> Result<String, BackendError> {
        let (method, request) = match body {
            Body::None => ("GET", self.http.get(url.clone())),
            Body::Json(bytes) => {
                let post = self.http.post(url.clone());
                let post = post.header(CONTENT_TYPE, "application/json").body(bytes);
                ("POST", post)
            }
            #[cfg(feature = "openai")]
            Body::Form(form) => ("POST", self.http.post(url.clone()).multipart(form)),
        };
        // The backend's headers replace those set above (a content type of its own is kept).
        let request = request.headers(self.headers.clone());
        let (status, headers, text) = http::send(method, request, url, max_bytes).await?;
        if !status.is_success() {
            return Err(http::status_error(
                status,
                &headers,
                &text,
                self.key.as_ref(),
                self.no_key_note.as_deref(),
            ));
        }
        Ok(text)
    }

    /// [`text`](Self::text) read up to `max_response_bytes` and parsed as `T`.
    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        url: Url,
        body: Body,
    ) -> Result<T, BackendError> {
        let text = self.text(&url, body, self.max_response_bytes).await?;
        serde_json::from_str(&text)
            .map_err(|e| http::invalid_json(e, &http::redact(&text, self.key.as_ref())))
    }

    /// Refuses a batch of `requests` requests and `bytes` bytes over [`limits`](Self::limits)
    /// with an [`InvalidRequest`](BackendErrorKind::InvalidRequest) error saying both.
    pub(crate) fn check(&self, requests: usize, bytes: usize) -> Result<(), BackendError> {
        let limits = self.limits;
        if requests > limits.max_requests || bytes as u64 > limits.max_bytes {
            return Err(BackendError::new(
                BackendErrorKind::InvalidRequest,
                format!(
                    "a batch of {requests} requests and {bytes} bytes is over the limits \
                     ({} requests, {} bytes)",
                    limits.max_requests, limits.max_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Reads the results file at `url` (up to `max_results_bytes`) into `out`, each line by
    /// `outcome`; an unreadable line is skipped with a warning naming `source` and the line.
    pub(crate) async fn results(
        &self,
        url: &Url,
        source: &str,
        out: &mut Vec<BatchOutcome>,
        outcome: impl Fn(&str) -> Option<BatchOutcome>,
    ) -> Result<(), BackendError> {
        let text = self.text(url, Body::None, self.max_results_bytes).await?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match outcome(line) {
                Some(o) => out.push(o),
                None => {
                    tracing::warn!(
                        source,
                        line = i + 1,
                        "unreadable batch result line: skipped"
                    )
                }
            }
        }
        Ok(())
    }

    /// The batches listed at `path` (newest first, 100 a page, the next page `after` the last
    /// id) created at or after `since` or at a time not reported, each read by `status`.
    pub(crate) async fn list<W: DeserializeOwned>(
        &self,
        path: &str,
        after: &str,
        since: u64,
        status: impl Fn(W) -> Result<BatchStatus, BackendError>,
    ) -> Result<Vec<BatchStatus>, BackendError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let mut url = self.url(path);
            url.query_pairs_mut().append_pair("limit", "100");
            if let Some(c) = &cursor {
                url.query_pairs_mut().append_pair(after, c);
            }
            let page: Page<W> = self.json(url, Body::None).await?;
            let mut older = false;
            for b in page.data {
                let s = status(b)?;
                if s.created_at != 0 && s.created_at < since {
                    older = true;
                } else {
                    out.push(s);
                }
            }
            // Stop at the first page that reaches past `since`.
            match page.last_id {
                Some(last) if page.has_more && !older => cursor = Some(last),
                _ => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch over the limits is refused, naming the sizes and the limits.
    #[test]
    fn batches_over_the_limits_are_refused() {
        let client = |max_requests, max_bytes| Client {
            http: reqwest::Client::new(),
            base: Url::parse("http://127.0.0.1:1/v1").unwrap(),
            headers: HeaderMap::new(),
            key: None,
            no_key_note: None,
            max_response_bytes: 1 << 20,
            limits: BatchLimits {
                max_requests,
                max_bytes,
            },
            max_results_bytes: DEFAULT_MAX_RESULTS_BYTES,
        };
        let e = client(1, u64::MAX).check(2, 10).unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::InvalidRequest);
        assert!(e.to_string().contains("a batch of 2 requests and "), "{e}");
        assert!(
            e.to_string().contains("over the limits (1 requests, "),
            "{e}"
        );
        let e = client(10, 20).check(1, 21).unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::InvalidRequest);
        assert!(e.to_string().ends_with("(10 requests, 20 bytes)"), "{e}");
        assert!(client(10, 20).check(10, 20).is_ok());
    }
}
