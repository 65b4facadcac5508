//! [`BatchBackend`]: the bridge from the online engine to a [`BatchApi`], and the driver task
//! that gathers calls into waves, polls the batches and answers the calls.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::meter::CallMeter;
use crate::backend::{lock, Completion, CompletionRequest, LlmBackend, Usage};
use crate::batch::state::{adopt_intents, append_result, open_results};
use crate::batch::{
    check_id, copy_error, custom_id, BatchApi, BatchRecord, BatchRequest, BatchState, BatchStatus,
    StateFile,
};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::io::AppendFile;
use crate::run::{Outcome, Prices, RunSummary, StopSignal};

/// Polls of one batch that may fail in a row (5xx, connection) before the run stops.
const MAX_POLL_FAILURES: u32 = 30;

/// The collector is also sent once no request has arrived for this long (every live example
/// is waiting).
const QUIET_PERIOD: Duration = Duration::from_millis(200);

/// Settings of a [`BatchBackend`]; every setter documents its default.
#[derive(Debug, Clone)]
#[must_use]
pub struct BatchConfig {
    batch_size: NonZeroUsize,
    poll_interval: Duration,
    max_poll_interval: Duration,
    max_attempts: u32,
    /// The run's budget at batch prices; set by [`run_batch_to_file`](crate::batch::run_batch_to_file).
    pub(crate) budget: Option<(Prices, f64)>,
    /// The run's stop signal; set by [`run_batch_to_file`](crate::batch::run_batch_to_file).
    pub(crate) stop: StopSignal,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchConfig {
    /// The defaults.
    pub fn new() -> Self {
        BatchConfig {
            batch_size: NonZeroUsize::new(1000).expect("not zero"),
            poll_interval: Duration::from_secs(30),
            max_poll_interval: Duration::from_secs(600),
            max_attempts: 6,
            budget: None,
            stop: StopSignal::new(),
        }
    }

    setters! {
        /// Requests per wave: the collector is sent once it holds this many (a wave is split
        /// further under the provider's [limits](crate::batch::BatchLimits)). Default 1000.
        batch_size(n: NonZeroUsize) => batch_size = n;
        /// The first wait between two polls of a batch; it grows by half while the batch's
        /// state does not change, up to [`max_poll_interval`](Self::max_poll_interval).
        /// Default 30 s.
        poll_interval(d: Duration) => poll_interval = d;
        /// The longest wait between two polls. Default 600 s (never less than the poll
        /// interval).
        max_poll_interval(d: Duration) => max_poll_interval = d;
        /// The most times a request is sent when its line errors or expires (the online retry
        /// limit). Default 6; at least 1.
        max_attempts(n: u32) => max_attempts = n.max(1);
    }

    /// The generator's concurrency for this pipeline: twice `batch_size`, so that two chunks
    /// of examples are live at once.
    #[must_use]
    pub fn concurrency(&self) -> NonZeroUsize {
        self.batch_size.saturating_add(self.batch_size.get())
    }
}

/// The totals of a batch run. Serialises to JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BatchStats {
    /// Batches created by this run.
    pub batches_created: u64,
    /// Waves sent (a wave may be several batches).
    pub waves: u64,
    /// Requests sent in the batches created.
    pub requests_submitted: u64,
    /// Requests sent again after their line errored or expired, or their batch failed
    /// validation.
    pub resubmitted: u64,
    /// Batches of an earlier run (or created just before a crash) adopted by this one.
    pub adopted: u64,
    /// Calls answered from results saved by an earlier run.
    pub answered_from_saved: u64,
    /// Batches that failed validation.
    pub failed_validation: u64,
    /// Status polls made, and how many failed (retried).
    pub polls: u64,
    /// Status polls that failed and were retried.
    pub poll_errors: u64,
    /// Batches still running at the provider when the run ended (a rerun collects them).
    pub in_flight: u64,
    /// Whether a wave was held back by the cost budget.
    pub cost_limited: bool,
}

impl fmt::Display for BatchStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} batches in {} waves, {} requests sent ({} again), {} adopted, {} answered \
             from saved results, {} still in flight",
            self.batches_created,
            self.waves,
            self.requests_submitted,
            self.resubmitted,
            self.adopted,
            self.answered_from_saved,
            self.in_flight
        )
    }
}

struct Call {
    custom_id: String,
    request: CompletionRequest,
    reply: Reply,
}

type Reply = oneshot::Sender<Result<Completion, BackendError>>;

#[derive(Debug, Default)]
struct Shared {
    stats: Mutex<BatchStats>,
    /// The calls answered and their tokens (answers saved by an earlier run included).
    meter: CallMeter,
    /// The error that stopped the driver, if one did.
    fatal: OnceLock<BackendError>,
}

/// An [`LlmBackend`] that sends its calls through a [`BatchApi`]; see the
/// [module docs](crate::batch).
/// [`run_batch_to_file`](crate::batch::run_batch_to_file) makes one for the generator it
/// runs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BatchBackend {
    tx: mpsc::UnboundedSender<Call>,
    shared: Arc<Shared>,
    api: Arc<dyn BatchApi>,
}

/// Ends a batch pipeline and reports its totals; see [`BatchBackend::start`].
#[derive(Debug)]
pub(crate) struct BatchHandle {
    shutdown: oneshot::Sender<()>,
    /// The driver's end: whether the files beside the output hold nothing (no batch was ever
    /// recorded and no result saved).
    join: tokio::task::JoinHandle<Result<bool, Error>>,
    shared: Arc<Shared>,
    paths: [PathBuf; 2],
}

impl BatchBackend {
    /// The totals so far (for a progress display).
    #[must_use]
    pub fn stats(&self) -> BatchStats {
        lock(&self.shared.stats).clone()
    }

    /// The calls answered so far and their tokens.
    pub(crate) fn meter(&self) -> &CallMeter {
        &self.shared.meter
    }

    /// Starts the pipeline of a run writing `output`: reads (or creates) its
    /// [`StateFile`], opens and locks its results log, and spawns the driver task (on the
    /// current tokio runtime). Batches of an earlier run are adopted and their results
    /// collected as they end.
    ///
    /// The run needs a concurrency of [`BatchConfig::concurrency`], the same [`StopSignal`]
    /// as the config's and the drain deadline `DRAIN_DEADLINE`, and the pipeline ends with
    /// [`BatchHandle::finish`]: `run_batch_to_file` does all four.
    ///
    /// # Errors
    ///
    /// The state file's or results log's I/O and parse errors (a results log locked by
    /// another run included); [`ErrorKind::Config`](crate::ErrorKind::Config) if the state
    /// file records batches of another API, or if the cost budget is not a positive amount.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub(crate) fn start(
        api: Arc<dyn BatchApi>,
        output: &Path,
        config: BatchConfig,
    ) -> Result<(BatchBackend, BatchHandle), Error> {
        if let Some((_, max)) = &config.budget {
            crate::run::check_max_cost(*max)?;
        }
        let state_path = StateFile::default_path(output);
        let results_path = StateFile::results_path(output);
        let (log, saved) = open_results(&results_path)?;
        let state = StateFile::read_for(&state_path, &api.name())?;
        let state = state.unwrap_or_else(|| StateFile::new(api.name()));
        state.write(&state_path)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = oneshot::channel();
        let backend = BatchBackend {
            tx,
            shared: shared.clone(),
            api: api.clone(),
        };
        let driver = Driver {
            api,
            config,
            earlier: state.batches.iter().map(|b| b.key.clone()).collect(),
            state,
            state_path: state_path.clone(),
            log,
            shared: shared.clone(),
            pending: HashMap::new(),
            queue: Vec::new(),
            saved: saved.into_iter().collect(),
            flights: Vec::new(),
            in_flight_ids: HashSet::new(),
            last_arrival: Instant::now(),
            retry_at: None,
            submit_failures: 0,
            list_failures: 0,
            chunk_cap: usize::MAX,
            io_error: None,
        };
        let join = tokio::spawn(driver.run(rx, shutdown_rx));
        let paths = [results_path, state_path];
        let handle = BatchHandle {
            shutdown,
            join,
            shared,
            paths,
        };
        Ok((backend, handle))
    }
}

#[async_trait]
impl LlmBackend for BatchBackend {
    /// Queues the request for the next wave and waits for its answer.
    ///
    /// # Errors
    ///
    /// The line's error once it may not be sent again (see the [module docs](crate::batch)),
    /// or the fatal error that stopped the pipeline.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the wait; the request is still sent (its result is saved for
    /// a rerun). After a stop the future never completes: the run's drain deadline drops it.
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let (reply, rx) = oneshot::channel();
        let call = Call {
            custom_id: custom_id(&self.api.identity(), &request),
            request,
            reply,
        };
        if self.tx.send(call).is_ok() {
            if let Ok(result) = rx.await {
                self.shared.meter.record(&result);
                return result;
            }
        }
        if let Some(e) = self.shared.fatal.get() {
            return Err(copy_error(e));
        }
        // The pipeline stopped (Ctrl-C, the cost budget, the end of the run): this call waits
        // for a rerun; the run drops it.
        std::future::pending().await
    }

    fn name(&self) -> Cow<'_, str> {
        Cow::Owned(format!("{}-batch", self.api.name()))
    }

    fn model(&self) -> Cow<'_, str> {
        self.api.model()
    }

    /// The batch API's identity: the same as the online backend's, so cached and batch
    /// answers are interchangeable.
    fn identity(&self) -> Cow<'_, str> {
        self.api.identity()
    }
}

impl BatchHandle {
    /// Ends the pipeline after the run returned its `summary`: the driver saves its state and
    /// closes the results log. The state file and the results log are removed when the run
    /// [completed](Outcome::Completed) with no failed example and no batch left in flight
    /// (`summary` given), or when they hold nothing; otherwise they stay for the rerun.
    ///
    /// # Errors
    ///
    /// The driver's I/O error (the state or the log could not be written), or an I/O error
    /// removing the files.
    pub(crate) async fn finish(self, summary: Option<&RunSummary>) -> Result<BatchStats, Error> {
        let _ = self.shutdown.send(());
        let empty = self
            .join
            .await
            .map_err(|e| Error::config(format!("the batch driver failed: {e}")))??;
        let stats = lock(&self.shared.stats).clone();
        let clean = summary.is_some_and(|s| {
            s.outcome == Outcome::Completed && s.generation.failed() == 0 && stats.in_flight == 0
        });
        if empty || clean {
            for path in &self.paths {
                crate::io::append::remove_if_exists(path)?;
            }
        }
        Ok(stats)
    }
}

/// What the driver holds for a custom_id callers wait for (queued or in flight).
struct Pending {
    request: CompletionRequest,
    waiters: Vec<Reply>,
    /// Lines sent whose result was an error.
    attempts: u32,
    /// Whether a batch holding it failed validation once.
    invalid: bool,
}

/// One batch being polled (its record, with the provider's id, is in the state).
struct Flight {
    key: String,
    next_poll: Instant,
    interval: Duration,
    failures: u32,
    estimate: f64,
}

struct Driver {
    api: Arc<dyn BatchApi>,
    config: BatchConfig,
    state: StateFile,
    state_path: PathBuf,
    /// The results log (`PAIRS.batch-results.jsonl`).
    log: AppendFile,
    shared: Arc<Shared>,
    /// The custom_ids callers wait for.
    pending: HashMap<String, Pending>,
    /// custom_ids waiting for the next wave.
    queue: Vec<String>,
    /// Results with no caller yet (saved by an earlier run, or of an adopted batch).
    saved: HashMap<String, Result<Completion, BackendError>>,
    flights: Vec<Flight>,
    in_flight_ids: HashSet<String>,
    /// The keys of the batches an earlier run recorded.
    earlier: HashSet<String>,
    last_arrival: Instant,
    /// No submission before this (after a failed one).
    retry_at: Option<Instant>,
    submit_failures: u32,
    /// Listings that failed in a row.
    list_failures: u32,
    /// The most requests per batch, lowered when the provider refuses a batch as too large.
    chunk_cap: usize,
    /// The error writing the state or the log that stopped the driver.
    io_error: Option<Error>,
}

impl Driver {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Call>,
        mut shutdown: oneshot::Receiver<()>,
    ) -> Result<bool, Error> {
        let stop = self.config.stop.clone();
        // A stop drops the work under way at once.
        let result = tokio::select! {
            biased;
            () = stop.wait() => Ok(()),
            r = self.drive(&mut rx, &mut shutdown) => r,
        };
        self.count_in_flight();
        let log = std::fs::metadata(self.log.path()).map_or(1, |m| m.len()) + self.log.lines();
        let empty = self.state.batches.is_empty() && self.saved.is_empty() && log == 0;
        if let Err(fatal) = result {
            tracing::error!(error = %fatal, "batch pipeline stopped");
            let _ = self.shared.fatal.set(copy_error(&fatal));
            for w in self.pending.drain().flat_map(|(_, p)| p.waiters) {
                let _ = w.send(Err(copy_error(&fatal)));
            }
        }
        let saved = self.state.write(&self.state_path);
        let closed = self.log.close();
        // The waiters left (a stop) are dropped with the driver: their calls wait for the
        // run to drop them.
        match self.io_error {
            Some(e) => Err(e),
            None => saved.and(closed).map(|()| empty),
        }
    }

    /// Follows the batches of an earlier run, then gathers the calls into waves and polls the
    /// batches until shut down.
    async fn drive(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Call>,
        shutdown: &mut oneshot::Receiver<()>,
    ) -> Result<(), BackendError> {
        let earlier = self.state.batches.iter();
        let earlier = earlier.filter(|b| !b.downloaded && b.provider_id.is_some());
        for key in earlier.map(|b| b.key.clone()).collect::<Vec<_>>() {
            self.follow(&key);
        }
        loop {
            tokio::select! {
                biased;
                _ = &mut *shutdown => return Ok(()),
                call = rx.recv() => {
                    let Some(call) = call else { return Ok(()) };
                    self.accept(call);
                    // Take every call already waiting before acting.
                    while let Ok(call) = rx.try_recv() {
                        self.accept(call);
                    }
                }
                () = tokio::time::sleep_until(self.next_wake()) => {}
            }
            self.step().await?;
        }
    }

    /// Counts the batches whose results are not saved (followed, or not confirmed).
    fn count_in_flight(&self) {
        let in_flight = self.state.batches.iter().filter(|b| !b.downloaded).count();
        lock(&self.shared.stats).in_flight = in_flight as u64;
    }

    fn save(&mut self) -> Result<(), BackendError> {
        let written = self.state.write(&self.state_path);
        self.kept(written)
    }

    /// `written`, an I/O error kept for [`run`](Self::run) to return and turned into the
    /// fatal error that stops the driver.
    fn kept(&mut self, written: Result<(), Error>) -> Result<(), BackendError> {
        written.map_err(|e| {
            let message = format!("the batch state cannot be kept: {}", crate::error_chain(&e));
            self.io_error = Some(e);
            BackendError::new(BackendErrorKind::Fatal, message)
        })
    }

    /// The record of a batch being followed.
    fn record(&mut self, key: &str) -> &mut BatchRecord {
        let record = self.state.batches.iter_mut().find(|b| b.key == key);
        record.expect("a batch followed is recorded")
    }

    /// Whether a batch's creation is not confirmed (an intent without a provider id: written
    /// just before a crash, or a creation that failed in a way that may have created it).
    fn has_intents(&self) -> bool {
        self.state.batches.iter().any(|b| b.provider_id.is_none())
    }

    fn accept(&mut self, call: Call) {
        self.last_arrival = Instant::now();
        let mut attempts = 0;
        match self.saved.remove(&call.custom_id) {
            Some(Ok(c)) => {
                lock(&self.shared.stats).answered_from_saved += 1;
                let _ = call.reply.send(Ok(c));
                return;
            }
            Some(Err(e)) if !(e.is_retryable() && 1 < self.config.max_attempts) => {
                let _ = call.reply.send(Err(e));
                return;
            }
            Some(Err(_)) => {
                attempts = 1;
                lock(&self.shared.stats).resubmitted += 1;
            }
            None => {}
        }
        match self.pending.entry(call.custom_id) {
            Entry::Occupied(mut p) => p.get_mut().waiters.push(call.reply),
            Entry::Vacant(slot) => {
                if !self.in_flight_ids.contains(slot.key()) {
                    self.queue.push(slot.key().clone());
                }
                slot.insert(Pending {
                    request: call.request,
                    waiters: vec![call.reply],
                    attempts,
                    invalid: false,
                });
            }
        }
    }

    /// When the next wave may be due (after the quiet period and any back-off) or the next
    /// poll is (an hour from now if nothing waits).
    fn next_wake(&self) -> Instant {
        let quiet = self.last_arrival + QUIET_PERIOD;
        let send = (!self.queue.is_empty() || self.has_intents())
            .then(|| quiet.max(self.retry_at.unwrap_or(quiet)));
        let next = self.flights.iter().map(|f| f.next_poll).chain(send).min();
        next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    /// Sends the wave if it is due, and polls the batches whose time has come.
    async fn step(&mut self) -> Result<(), BackendError> {
        let now = Instant::now();
        let due = self.retry_at.is_none_or(|r| now >= r)
            && (self.has_intents()
                || self.queue.len() >= self.config.batch_size.get()
                || (!self.queue.is_empty() && now >= self.last_arrival + QUIET_PERIOD));
        if due {
            self.resolve_intents().await?;
            if !self.queue.is_empty() && self.retry_at.is_none() {
                self.send_wave().await?;
            }
        }
        let flights = std::mem::take(&mut self.flights);
        let (due, rest): (Vec<_>, Vec<_>) = flights.into_iter().partition(|f| f.next_poll <= now);
        self.flights = rest;
        for f in due {
            if let Some(f) = self.poll(f).await? {
                self.flights.push(f);
            }
        }
        self.count_in_flight();
        Ok(())
    }

    /// Looks for the batches of the intents by listing: each one found is followed, the
    /// requests of the others go in the next wave. Nothing is sent until they are all found or
    /// known not to exist; a listing that fails is tried again later, and after
    /// `max_attempts` (at least 3) failures in a row the run stops.
    async fn resolve_intents(&mut self) -> Result<(), BackendError> {
        if !self.has_intents() {
            return Ok(());
        }
        let (adopted, lost) = match adopt_intents(&*self.api, &mut self.state).await {
            Ok(found) => found,
            Err(e) => {
                self.list_failures += 1;
                if e.is_fatal() || self.list_failures >= self.config.max_attempts.max(3) {
                    return Err(BackendError::new(
                        e.kind(),
                        format!(
                            "cannot list the batches to find those whose creation was not \
                             confirmed (nothing is sent until they are found): {}",
                            e.message()
                        ),
                    ));
                }
                tracing::warn!(error = %e, "listing the batches failed: trying again later");
                self.back_off();
                return Ok(());
            }
        };
        self.list_failures = 0;
        self.save()?;
        self.retry_at = None;
        for key in adopted {
            self.follow(&key);
        }
        // Never created: the requests go out in the next wave.
        self.queue.extend(lost);
        Ok(())
    }

    fn back_off(&mut self) {
        self.submit_failures += 1;
        let exp = self.submit_failures.min(8);
        let wait = (self.config.poll_interval.min(Duration::from_secs(2)) * (1 << exp))
            .min(Duration::from_secs(300));
        self.retry_at = Some(Instant::now() + wait);
    }

    /// Polls the batch of `key` (its provider id known): one this run created (counted) after
    /// the poll interval, one of an earlier run (adopted) at once.
    fn follow(&mut self, key: &str) {
        let created = !self.earlier.contains(key);
        let record = self.state.batches.iter().find(|b| b.key == key);
        let record = record.expect("a batch followed is recorded");
        let estimate = self.estimate(&record.custom_ids);
        self.in_flight_ids.extend(record.custom_ids.iter().cloned());
        let mut st = lock(&self.shared.stats);
        if created {
            st.batches_created += 1;
            st.requests_submitted += record.custom_ids.len() as u64;
        } else {
            st.adopted += 1;
            tracing::info!(id = ?record.provider_id, wave = record.wave, "following a batch of an earlier run");
        }
        self.flights.push(Flight {
            key: key.to_string(),
            next_poll: Instant::now() + self.config.poll_interval * u32::from(created),
            interval: self.config.poll_interval,
            failures: 0,
            estimate,
        });
    }

    /// The estimated cost of sending `ids`, at the budget's prices (0 without a budget).
    fn estimate(&self, ids: &[String]) -> f64 {
        let Some((prices, _)) = &self.config.budget else {
            return 0.0;
        };
        let mut usage = Usage::default();
        for r in ids.iter().filter_map(|id| self.pending.get(id)) {
            let bytes = serde_json::to_vec(&r.request).map_or(0, |v| v.len() as u64);
            usage += Usage::new(bytes / 4, u64::from(r.request.max_tokens.unwrap_or(1024)));
        }
        prices.cost(usage)
    }

    /// Sends the queue as one wave (several batches if the limits ask for it).
    async fn send_wave(&mut self) -> Result<(), BackendError> {
        let mut ids = std::mem::take(&mut self.queue);
        // A request whose every caller is gone is still sent: its result is saved for a rerun.
        let mut seen = HashSet::new();
        ids.retain(|id| {
            self.pending.contains_key(id)
                && !self.in_flight_ids.contains(id)
                && seen.insert(id.clone())
        });
        if ids.is_empty() {
            return Ok(());
        }
        if let Some((prices, max)) = &self.config.budget {
            let spent = prices.cost(self.shared.meter.usage());
            let flying: f64 = self.flights.iter().map(|f| f.estimate).sum();
            let wave = self.estimate(&ids);
            if spent + flying + wave > *max {
                self.queue = ids;
                lock(&self.shared.stats).cost_limited = true;
                self.config.stop.stop_with(
                    Outcome::CostLimit,
                    Some(format!(
                        "the next wave would bring the estimated cost to {:.4} (spent {spent:.4}, \
                         in flight {flying:.4}, wave {wave:.4}), over the budget of {max}",
                        spent + flying + wave
                    )),
                );
                return Ok(());
            }
        }
        let limits = self.api.limits();
        let cap = self
            .config
            .batch_size
            .get()
            .min(limits.max_requests.max(1))
            .min(self.chunk_cap.max(1));
        let max_bytes = limits.max_bytes - limits.max_bytes / 20;
        let mut chunks: Vec<Vec<BatchRequest>> = Vec::new();
        let mut bytes = 0u64;
        for id in ids {
            let request = BatchRequest {
                request: self.pending[&id].request.clone(),
                custom_id: id,
            };
            let size = self.api.request_bytes(&request);
            let full = chunks
                .last()
                .is_none_or(|c| c.len() >= cap || (bytes + size > max_bytes && !c.is_empty()));
            if full {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            chunks.last_mut().expect("pushed above").push(request);
        }
        let wave = self.state.batches.iter().map(|b| b.wave).max().unwrap_or(0) + 1;
        let mut sent = 0usize;
        let mut rest: Vec<String> = Vec::new();
        for chunk in chunks {
            if !rest.is_empty() || self.retry_at.is_some() {
                rest.extend(chunk.into_iter().map(|r| r.custom_id));
                continue;
            }
            match self.submit(chunk, wave).await? {
                Some(back) => rest.extend(back),
                None => sent += 1,
            }
        }
        // Requests not sent go first in the next wave.
        rest.append(&mut self.queue);
        self.queue = rest;
        if sent > 0 {
            lock(&self.shared.stats).waves += 1;
            tracing::info!(wave, batches = sent, "wave sent");
        }
        Ok(())
    }

    /// Creates one batch; returns the ids to send again later if it was not created.
    async fn submit(
        &mut self,
        chunk: Vec<BatchRequest>,
        wave: u64,
    ) -> Result<Option<Vec<String>>, BackendError> {
        let key = format!("{:016x}", rand::random::<u64>());
        let ids: Vec<String> = chunk.iter().map(|r| r.custom_id.clone()).collect();
        // The intent is on disk before the batch can exist.
        self.state.batches.push(BatchRecord {
            key: key.clone(),
            provider_id: None,
            intent_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            wave,
            requests: ids.len() as u64,
            custom_ids: ids.clone(),
            state: None,
            downloaded: false,
        });
        self.save()?;
        let result = self.api.submit(&chunk, &self.state.tag(&key)).await;
        let e = match result.and_then(|id| check_id(&id).map(str::to_string)) {
            Ok(id) => {
                tracing::info!(wave, id = %id, requests = ids.len(), "batch created");
                self.record(&key).provider_id = Some(id);
                self.save()?;
                self.submit_failures = 0;
                self.chunk_cap = self.chunk_cap.saturating_mul(2);
                self.follow(&key);
                return Ok(None);
            }
            Err(e) if e.is_retryable() => {
                // The batch may exist all the same: look for it before sending again.
                tracing::warn!(error = %e, "creating a batch failed: looking for it before trying again");
                self.back_off();
                return Ok(Some(Vec::new()));
            }
            Err(e) => e,
        };
        // An answer refusing the request: the batch was not created.
        self.state.batches.retain(|b| b.key != key);
        self.save()?;
        if e.is_fatal() {
            return Err(e);
        }
        // Refused at creation (a validation the provider makes at once). The requests go again
        // in halves, down to single requests; a single request refused twice fails with the
        // provider's message.
        lock(&self.shared.stats).failed_validation += 1;
        if ids.len() > 1 {
            tracing::warn!(error = %e, requests = ids.len(), "a batch was refused: sending it again in halves");
            self.chunk_cap = ids.len() / 2;
            lock(&self.shared.stats).resubmitted += ids.len() as u64;
            return Ok(Some(ids));
        }
        Ok(Some(
            ids.into_iter().filter(|id| self.again(id, &e)).collect(),
        ))
    }

    /// Polls flight `f`; returns it unless its batch is done (results delivered).
    async fn poll(&mut self, mut f: Flight) -> Result<Option<Flight>, BackendError> {
        let record = self.record(&f.key);
        let (id, wave, last) = (record.provider_id.clone(), record.wave, record.state);
        let id = id.unwrap_or_default();
        let status = self.api.status(&id).await;
        lock(&self.shared.stats).polls += 1;
        let status = match status {
            Ok(s) => s,
            Err(e) => return self.poll_failed(f, &id, e, "polling"),
        };
        f.failures = 0;
        if last != Some(status.state) {
            tracing::info!(
                wave,
                batch = %id,
                state = %status.state,
                succeeded = status.counts.succeeded,
                failed = status.counts.failed,
                total = status.counts.total,
                "batch state"
            );
            self.record(&f.key).state = Some(status.state);
            self.save()?;
            f.interval = self.config.poll_interval;
        } else {
            let max = self.config.max_poll_interval.max(self.config.poll_interval);
            f.interval = (f.interval * 3 / 2).min(max);
        }
        if !status.state.is_ended() {
            f.next_poll = Instant::now() + f.interval;
            return Ok(Some(f));
        }
        self.collect(f, &id, status).await
    }

    /// After `what` failed for flight `f` (batch `id`) with `e`: the run stops on a fatal
    /// error or the [`MAX_POLL_FAILURES`]th in a row, else `f` is polled again soon.
    fn poll_failed(
        &mut self,
        mut f: Flight,
        id: &str,
        e: BackendError,
        what: &str,
    ) -> Result<Option<Flight>, BackendError> {
        if e.is_fatal() {
            return Err(e);
        }
        lock(&self.shared.stats).poll_errors += 1;
        f.failures += 1;
        if f.failures >= MAX_POLL_FAILURES {
            return Err(BackendError::new(
                BackendErrorKind::Fatal,
                format!(
                    "the batch API failed {} polls in a row of batch {id}: {e}",
                    f.failures
                ),
            ));
        }
        tracing::warn!(error = %e, batch = %id, "{what} failed: trying again");
        f.next_poll = Instant::now() + f.interval.min(Duration::from_secs(60));
        Ok(Some(f))
    }

    /// Reads the results of the ended batch of flight `f`, saves them, and answers the
    /// callers.
    async fn collect(
        &mut self,
        f: Flight,
        id: &str,
        status: BatchStatus,
    ) -> Result<Option<Flight>, BackendError> {
        let mut results = Vec::new();
        let custom_ids = self.record(&f.key).custom_ids.clone();
        if status.state == BatchState::Failed {
            lock(&self.shared.stats).failed_validation += 1;
            let message = status.message.as_deref().unwrap_or("no message");
            tracing::warn!(batch = %id, %message, "a batch failed validation");
            let e = BackendError::new(
                BackendErrorKind::InvalidRequest,
                format!("the batch failed validation twice: {message}"),
            );
            for cid in custom_ids {
                self.in_flight_ids.remove(&cid);
                if self.again(&cid, &e) {
                    self.queue.push(cid);
                }
            }
        } else {
            let outcomes = match self.api.results(id).await {
                Ok(o) => o,
                Err(e) => return self.poll_failed(f, id, e, "reading the results"),
            };
            let mut expected: HashSet<String> = custom_ids.into_iter().collect();
            for o in outcomes {
                if expected.remove(&o.custom_id) {
                    results.push((o.custom_id, o.result));
                } else {
                    tracing::warn!(batch = %id, "a result line for a request not in the batch: ignored");
                }
            }
            let state = status.state;
            results.extend(expected.into_iter().map(|cid| {
                let missing =
                    format!("batch {id} ended ({state}) without a result for this request");
                (cid, Err(BackendError::server(missing)))
            }));
            for (cid, result) in &results {
                let written = append_result(&mut self.log, cid, result);
                self.kept(written)?;
            }
        }
        let record = self.record(&f.key);
        record.downloaded = true;
        record.state = Some(status.state);
        record.custom_ids = Vec::new();
        self.save()?;
        for (cid, result) in results {
            self.deliver(cid, result);
        }
        Ok(None)
    }

    /// Answers the callers of `id` with its result, or sends it again (a retryable error,
    /// attempts left); a result no caller waits for is kept for one that may come.
    fn deliver(&mut self, id: String, result: Result<Completion, BackendError>) {
        self.in_flight_ids.remove(&id);
        let Some(p) = self.pending.get_mut(&id) else {
            self.saved.insert(id, result);
            return;
        };
        if let Err(e) = &result {
            p.attempts += 1;
            if e.is_retryable() && p.attempts < self.config.max_attempts {
                lock(&self.shared.stats).resubmitted += 1;
                self.queue.push(id);
                return;
            }
        }
        self.answer(&id, &result);
    }

    /// Counts a failed validation of `id`: the second one (or one no caller waits for) fails
    /// it with `e`; returns whether it is sent again.
    fn again(&mut self, id: &str, e: &BackendError) -> bool {
        match self.pending.get_mut(id) {
            Some(p) if !p.invalid => {
                p.invalid = true;
                lock(&self.shared.stats).resubmitted += 1;
                true
            }
            _ => {
                self.answer(id, &Err(copy_error(e)));
                false
            }
        }
    }

    /// Answers every caller of `id` with `result`.
    fn answer(&mut self, id: &str, result: &Result<Completion, BackendError>) {
        for w in self.pending.remove(id).into_iter().flat_map(|p| p.waiters) {
            let _ = w.send(match result {
                Ok(c) => Ok(c.clone()),
                Err(e) => Err(copy_error(e)),
            });
        }
    }
}
