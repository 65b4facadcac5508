//! Provider batch APIs (feature `batch`): half the price, separate rate limits, the provider's
//! own scheduling.
//!
//! Two parts:
//!
//! - [`BatchApi`], a trait for one provider's batch API (submit, status, results, cancel,
//!   list), with `openai::OpenAiBatch` (feature `openai`) and `anthropic::AnthropicBatch`
//!   (feature `anthropic`). A user adds another provider, or a self-hosted batch runner, by
//!   implementing it; nothing else changes.
//! - [`BatchBackend`], an [`LlmBackend`](crate::LlmBackend) that gathers the calls of a run
//!   into batches ("waves") and answers each call when its batch has ended. The generator and
//!   [`run_to_file`](crate::run::run_to_file) are the online ones, unchanged: labels, aspects,
//!   seeds, templates and request bodies are those of an online run by construction.
//!
//! # Waves
//!
//! The generator calls [`complete`](crate::LlmBackend::complete) as it would online; each call
//! waits in a collector. The collector is sent as one wave when it holds
//! [`batch_size`](BatchConfig::batch_size) requests, or when no new request arrived for a
//! quiet period of 200 ms (every live example is waiting). Give the
//! generator a concurrency of about twice the batch size ([`BatchConfig::concurrency`]):
//! the first calls of the next chunk of prompts then go out while the second calls of the
//! previous chunk wait. When a batch ends, the accepted first answers ask their second calls,
//! and the unusable answers their re-asks (the engine's own loop): they form the next wave.
//!
//! A wave larger than the provider's [limits](BatchLimits) is sent as several batches.
//!
//! # Failures
//!
//! - An errored, expired or cancelled line whose error is retryable is sent again in a later
//!   wave, up to [`max_attempts`](BatchConfig::max_attempts) in all (the online retry limit);
//!   then, or at once for an error that is not retryable (an invalid request), the call fails
//!   and the example goes to the failure ledger, as online.
//! - A batch that failed validation is sent again once, as it was (validation failures are
//!   often passing: a file not yet ready, a limit hit); if the same requests fail validation a
//!   second time they fail with the provider's message. A batch the provider refuses at
//!   creation (Anthropic validates at once; OpenAI checks the file at upload) was never
//!   created: its requests go again in halves, down to single requests, and a single request
//!   refused twice fails. So nothing loops forever.
//! - 5xx answers and connection failures while polling are retried at the next poll; a
//!   failure that is fatal (a bad key, an exhausted quota) stops the run.
//!
//! # Durable state, resume and "never twice"
//!
//! Beside the output (`PAIRS.jsonl`) the pipeline keeps:
//!
//! - `PAIRS.batches.json` ([`StateFile`]): a random run identity, created once and kept, and
//!   per batch its local key, the provider's id once known, its `custom_id`s (until its
//!   results are saved), wave, state and whether the results were downloaded. Rewritten
//!   atomically (a new file renamed over the old) at every change. An **intent** (key and
//!   `custom_id`s) is written *before* the batch is created, and the batch is tagged with the
//!   key and the run identity (OpenAI's `metadata`).
//! - `PAIRS.batch-results.jsonl`: every result line, appended as soon as it is downloaded
//!   (providers expire them), through the crate's crash-safe append (locked while a run holds
//!   it: two runs cannot drive the same batches).
//!
//! The `custom_id` of a request is a hash of the backend's identity and the request, so
//! identical requests are sent once and answer every caller, and a rerun computes the same ids.
//! A rerun (after a crash, a SIGKILL or Ctrl-C) re-drives the unfinished examples (the run's
//! resume skips those written); a request whose result was saved is answered from it; one
//! that belongs to a batch still in flight waits for that batch; only the rest are sent. An
//! intent without a provider id (the process died between creating the batch and recording
//! it) is looked up by [listing](BatchApi::list) and adopted if found: by its tag where the
//! provider keeps one, else (Anthropic has no batch metadata) by creation time (not before the
//! intent) and request count, its `custom_id`s then checked when the results are read (a line
//! that is not ours is ignored). So nothing is submitted twice.
//!
//! Both files are removed when a run [completes](crate::run::Outcome::Completed) with no
//! failed example and no batch left in flight; otherwise they stay for the rerun (and for
//! `rmboost batch status` / `cancel`).
//!
//! # Stopping
//!
//! On the run's [`StopSignal`](crate::run::StopSignal) (Ctrl-C) the pipeline stops at once: no
//! new batch is created, polling stops, and the batches in flight keep running at the
//! provider. The calls waiting on them never return, so [`run_batch_to_file`] gives the run a
//! drain deadline of half a second: the waiting examples are dropped, not failed (they are not
//! in the ledger), and the next run picks them up. Rerun the same command to resume, or cancel the
//! batches with [`cancel_batches`] (`rmboost batch cancel -o OUT`).
//!
//! # Cost
//!
//! Batch prices are half the online ones at both providers ([`batch_prices`]). With a
//! [budget](crate::run::RunOptions::max_cost), the cost of each wave is estimated before it is sent
//! (input tokens about a quarter of the request's bytes, output tokens its `max_tokens`) and
//! added to what was spent and what is in flight; over the budget, the wave is not sent and
//! the run stops with [`Outcome::CostLimit`](crate::run::Outcome::CostLimit).
//!
//! ```
//! use rmboost::batch::{custom_id, BatchState};
//! use rmboost::{CompletionRequest, Message};
//!
//! let request = CompletionRequest::new(vec![Message::user("Hi")]).with_seed(1);
//! let id = custom_id("openai http://127.0.0.1:1/v1/chat/completions model=\"m\"", &request);
//! assert_eq!(id.len(), 64);
//! assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
//! assert!(BatchState::Expired.is_ended());
//! ```

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backend::{Completion, CompletionRequest};
use crate::error::{BackendError, BackendErrorKind};
use crate::run::Prices;

#[cfg(feature = "anthropic")]
#[cfg_attr(docsrs, doc(cfg(feature = "anthropic")))]
pub mod anthropic;
#[cfg(any(feature = "openai", feature = "anthropic"))]
mod client;
#[cfg(feature = "openai")]
#[cfg_attr(docsrs, doc(cfg(feature = "openai")))]
pub mod openai;
mod pipeline;
mod state;

pub use pipeline::{BatchBackend, BatchConfig, BatchStats};
pub use state::{cancel_batches, BatchRecord, StateFile};

/// The drain deadline of a batch run: on a stop, the answers already downloaded are written,
/// the examples waiting on batches (which may take hours) are dropped and picked up by the
/// next run.
pub(crate) const DRAIN_DEADLINE: Duration = Duration::from_millis(500);

/// Runs a generator through a provider's batch API into `output`: the batch counterpart of
/// [`run_to_file`](crate::run::run_to_file), with everything a batch run needs wired in.
///
/// It starts the [`BatchBackend`] of `output` (adopting the batches and saved results of an
/// earlier run), calls `make_generator` with it and the concurrency the pipeline needs
/// ([`BatchConfig::concurrency`]), runs the generator with `options`, and ends the pipeline
/// (removing its files beside the output when the run completed with nothing left to do).
/// `options`' [stop signal](crate::run::RunOptions::stop_signal) stops the pipeline too (a
/// Ctrl-C leaves the batches running at the provider for the next run), its
/// [cost budget](crate::run::RunOptions::max_cost) (give batch prices, [`batch_prices`])
/// also holds back a wave whose estimate would pass it, and its drain deadline becomes half a
/// second (examples waiting on batches are dropped, not failed).
/// Without a [meter](crate::run::RunOptions::meter) the run counts the answers the pipeline
/// gives.
///
/// Returns the run's summary and the pipeline's totals.
///
/// # Errors
///
/// What [`run_to_file`](crate::run::run_to_file) returns; the pipeline's own I/O errors
/// (its state file or results log cannot be read, written or locked); a
/// [`Config`](crate::ErrorKind::Config) error if the state beside `output` records batches of
/// another API; the error of `make_generator`. When the run fails, the pipeline is still
/// ended and its state kept for the rerun.
///
/// # Panics
///
/// Outside a tokio runtime.
pub async fn run_batch_to_file<G, F, P>(
    api: std::sync::Arc<dyn BatchApi>,
    mut config: BatchConfig,
    make_generator: F,
    prompts: P,
    output: impl AsRef<std::path::Path>,
    mut options: crate::run::RunOptions,
) -> Result<(crate::run::RunSummary, BatchStats), crate::Error>
where
    G: crate::Generator + 'static,
    F: FnOnce(BatchBackend, std::num::NonZeroUsize) -> Result<G, crate::Error>,
    P: futures::Stream<Item = Result<crate::Prompt, crate::Error>> + Send + 'static,
{
    let output = output.as_ref();
    config.stop = options.stop.clone();
    config.budget = options.budget;
    let concurrency = config.concurrency();
    let (backend, handle) = BatchBackend::start(api, output, config)?;
    if options.meter.is_none() {
        options.meter = Some(backend.meter().clone());
    }
    options.drain_deadline = Some(DRAIN_DEADLINE);
    let result = async {
        let generator = make_generator(backend, concurrency)?;
        let generate = move |prompts| generator.generate_boxed(prompts);
        crate::run::run_to_file(generate, prompts, output, options).await
    }
    .await;
    let ended = handle.finish(result.as_ref().ok()).await;
    if let (Err(_), Err(end)) = (&result, &ended) {
        tracing::warn!(error = %crate::error_chain(end), "the batch pipeline did not end cleanly");
    }
    Ok((result?, ended?))
}

/// The share of the online price the providers charge for batches (OpenAI and Anthropic
/// both charge half).
pub const BATCH_PRICE_FACTOR: f64 = 0.5;

/// Batch prices from online ones: [`BATCH_PRICE_FACTOR`] of each.
///
/// ```
/// use rmboost::run::Prices;
/// let batch = rmboost::batch::batch_prices(Prices::new(2.0, 8.0).unwrap());
/// assert_eq!((batch.input_per_million(), batch.output_per_million()), (1.0, 4.0));
/// ```
#[must_use]
pub fn batch_prices(online: Prices) -> Prices {
    Prices::new(
        online.input_per_million() * BATCH_PRICE_FACTOR,
        online.output_per_million() * BATCH_PRICE_FACTOR,
    )
    .expect("half of a valid price is a valid price")
}

/// The `custom_id` of a request: the hex SHA-256 of the backend's identity
/// ([`LlmBackend::identity`](crate::LlmBackend::identity)) and the request as JSON. 64
/// characters of `[0-9a-f]`, which both providers accept; identical requests to the same
/// model share it, and a rerun computes the same one.
#[must_use]
pub fn custom_id(identity: &str, request: &CompletionRequest) -> String {
    let mut h = Sha256::new();
    h.update(b"rmboost/batch/v1\0");
    h.update(identity.as_bytes());
    h.update(b"\0");
    h.update(serde_json::to_vec(request).expect("a request serialises"));
    format!("{:x}", h.finalize())
}

/// One request of a batch: the id it is known by in the results, and the request.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRequest {
    /// Unique within the batch; see [`custom_id`].
    pub custom_id: String,
    /// The request, turned into the provider's body by the same code as the online backend.
    pub request: CompletionRequest,
}

/// What a batch is tagged with, so that a run finds its own batches by
/// [listing](BatchApi::list) them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchTag {
    /// The run's identity (random, kept in the [`StateFile`]).
    pub run: String,
    /// The batch's local key (in the [`StateFile`]).
    pub key: String,
}

crate::error::named_enum! {
/// Where a batch is in its life, in words common to the providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BatchState {
    /// The input is being checked (OpenAI `validating`).
    Validating = "validating",
    /// Requests are being processed.
    InProgress = "in_progress",
    /// Processing is over, the results are being prepared (OpenAI `finalizing`).
    Finalizing = "finalizing",
    /// Ended: every request has a result (OpenAI `completed`, Anthropic `ended`).
    Ended = "ended",
    /// The input failed validation: no request ran (OpenAI `failed`).
    Failed = "failed",
    /// The completion window passed; unfinished requests expired (OpenAI `expired`).
    Expired = "expired",
    /// Being cancelled.
    Cancelling = "cancelling",
    /// Cancelled; unfinished requests were cancelled.
    Cancelled = "cancelled",
}
}

impl BatchState {
    /// Whether the batch will not change any more (its results can be read).
    #[must_use]
    pub fn is_ended(self) -> bool {
        matches!(
            self,
            BatchState::Ended | BatchState::Failed | BatchState::Expired | BatchState::Cancelled
        )
    }
}

/// Request counts of a batch, as far as the provider reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCounts {
    /// Requests in the batch.
    pub total: u64,
    /// Requests that succeeded.
    pub succeeded: u64,
    /// Requests that failed (errored, expired or cancelled).
    pub failed: u64,
    /// Requests not yet processed.
    pub processing: u64,
}

/// A batch as the provider describes it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BatchStatus {
    /// The provider's id.
    pub id: String,
    /// Its state.
    pub state: BatchState,
    /// Its request counts.
    pub counts: BatchCounts,
    /// When it was created, in seconds since the Unix epoch (0 if not reported).
    pub created_at: u64,
    /// Its tag, where the provider keeps one (OpenAI's `metadata`; Anthropic has none).
    pub tag: Option<BatchTag>,
    /// The provider's message for a failed validation.
    pub message: Option<String>,
}

impl BatchStatus {
    /// A status with these fields and no tag or message.
    #[must_use]
    pub fn new(id: impl Into<String>, state: BatchState, counts: BatchCounts) -> Self {
        BatchStatus {
            id: id.into(),
            state,
            counts,
            created_at: 0,
            tag: None,
            message: None,
        }
    }
}

/// The result of one request of an ended batch.
#[derive(Debug)]
pub struct BatchOutcome {
    /// The request's id.
    pub custom_id: String,
    /// Its completion, or why it has none: an errored line keeps the provider's error
    /// (classified as online: a 5xx is retryable, a 400 is not), an expired line is a
    /// retryable [`Timeout`](BackendErrorKind::Timeout), a cancelled line a retryable
    /// [`Server`](BackendErrorKind::Server) error.
    pub result: Result<Completion, BackendError>,
}

/// The error of a line that expired before it ran.
#[must_use]
pub fn expired_error() -> BackendError {
    BackendError::timeout("the batch's completion window passed before this request ran")
}

/// The error of a line cancelled before it ran.
#[must_use]
pub fn cancelled_error() -> BackendError {
    BackendError::server("the batch was cancelled before this request ran")
}

/// What one batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Requests per batch.
    pub max_requests: usize,
    /// Bytes of the batch's input.
    pub max_bytes: u64,
}

/// One provider's batch API; see the [module docs](self).
///
/// Errors are [`BackendError`]s classified as for online calls: a retryable one (5xx,
/// connection, timeout) is retried by the pipeline, a fatal one (a bad key) stops the run.
/// The trait is object safe.
#[async_trait]
pub trait BatchApi: Send + Sync + fmt::Debug {
    /// A short name (`"openai"`, `"anthropic"`).
    fn name(&self) -> Cow<'_, str>;

    /// What decides the answers besides the request, as
    /// [`LlmBackend::identity`](crate::LlmBackend::identity) of the online backend; hashed
    /// into every [`custom_id`]. Never a secret.
    fn identity(&self) -> Cow<'_, str>;

    /// The model requests go to (may be empty).
    fn model(&self) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    /// What one batch may hold.
    fn limits(&self) -> BatchLimits;

    /// About how many bytes `request` takes in a batch's input, for splitting a wave under
    /// [`limits`](Self::limits). The default is the length of the request as JSON plus 512.
    fn request_bytes(&self, request: &BatchRequest) -> u64 {
        serde_json::to_vec(&request.request).map_or(0, |v| v.len() as u64) + 512
    }

    /// Creates a batch of `requests` (unique `custom_id`s, at most [`limits`](Self::limits))
    /// tagged with `tag` where the provider allows; returns the provider's id.
    ///
    /// # Errors
    ///
    /// The provider's refusal, or a transport error (after which the batch may or may not
    /// exist: the pipeline looks for it by [listing](Self::list) before sending it again).
    async fn submit(
        &self,
        requests: &[BatchRequest],
        tag: &BatchTag,
    ) -> Result<String, BackendError>;

    /// The batch's state and counts.
    ///
    /// # Errors
    ///
    /// As for [`submit`](Self::submit).
    async fn status(&self, id: &str) -> Result<BatchStatus, BackendError>;

    /// The results of an ended batch, in any order (at most one per `custom_id`).
    ///
    /// # Errors
    ///
    /// As for [`submit`](Self::submit); a result file that cannot be read at all.
    async fn results(&self, id: &str) -> Result<Vec<BatchOutcome>, BackendError>;

    /// Asks the provider to cancel the batch; returns its status after the request.
    ///
    /// # Errors
    ///
    /// As for [`submit`](Self::submit).
    async fn cancel(&self, id: &str) -> Result<BatchStatus, BackendError>;

    /// The batches created at or after `since` (seconds since the Unix epoch) that may be
    /// this run's: those tagged with `tag.run`, and, where the provider keeps no tag, every
    /// batch (with [`BatchStatus::tag`] `None`).
    ///
    /// # Errors
    ///
    /// As for [`submit`](Self::submit).
    async fn list(&self, tag: &BatchTag, since: u64) -> Result<Vec<BatchStatus>, BackendError>;
}

/// Checks an id from a provider before it goes into a URL path.
pub(crate) fn check_id(id: &str) -> Result<&str, BackendError> {
    if !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        Ok(id)
    } else {
        Err(BackendError::new(
            BackendErrorKind::InvalidResponse,
            format!(
                "the batch id {:?} is not an id (letters, digits, _ and -)",
                id.chars().take(80).collect::<String>()
            ),
        ))
    }
}

/// A copy of an error (kind, message, status, wait), for answering several callers.
pub(crate) fn copy_error(e: &BackendError) -> BackendError {
    let mut out = BackendError::new(e.kind(), e.message());
    if let Some(s) = e.status() {
        out = out.with_status(s);
    }
    if let Some(d) = e.retry_after() {
        out = out.with_retry_after(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    fn _object_safe(_: &dyn BatchApi) {}

    #[test]
    fn custom_ids_are_stable_and_distinct() {
        let a = CompletionRequest::new(vec![Message::user("a")]).with_seed(1);
        let b = CompletionRequest::new(vec![Message::user("a")]).with_seed(2);
        assert_eq!(custom_id("x", &a), custom_id("x", &a));
        assert_ne!(custom_id("x", &a), custom_id("x", &b));
        assert_ne!(custom_id("x", &a), custom_id("y", &a));
        assert!(custom_id("x", &a)
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
    }

    #[test]
    fn ids_in_paths_are_checked() {
        assert!(check_id("batch_abc-1").is_ok());
        for bad in ["", "../x", "a/b", "a?b", "a b", "é"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
