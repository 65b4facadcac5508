//! [`BatchBackend`]: the bridge from the online engine to a [`BatchApi`], and the driver task
//! that gathers calls into waves, polls the batches and answers the calls.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::meter::CallMeter;
use crate::backend::{Completion, CompletionRequest, LlmBackend, Usage};
use crate::batch::state::{adopt_intents, now_secs, ResultsLog};
use crate::batch::{
    check_id, copy_error, custom_id, BatchApi, BatchRecord, BatchRequest, BatchState, BatchStatus,
    StateFile,
};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::run::{Outcome, Prices, RunSummary, StopSignal};

/// Polls of one batch that may fail in a row (5xx, connection) before the run stops.
const MAX_POLL_FAILURES: u32 = 30;

/// Settings of a [`BatchBackend`]; every setter documents its default.
#[derive(Debug, Clone)]
#[must_use]
pub struct BatchConfig {
    batch_size: NonZeroUsize,
    depth: NonZeroUsize,
    quiet_period: Duration,
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
            depth: NonZeroUsize::new(2).expect("not zero"),
            quiet_period: Duration::from_millis(200),
            poll_interval: Duration::from_secs(30),
            max_poll_interval: Duration::from_secs(600),
            max_attempts: 6,
            budget: None,
            stop: StopSignal::new(),
        }
    }

    /// Requests per wave: the collector is sent once it holds this many (a wave is split
    /// further under the provider's [limits](crate::batch::BatchLimits)). Default 1000.
    pub fn batch_size(mut self, n: NonZeroUsize) -> Self {
        self.batch_size = n;
        self
    }

    /// How many chunks of `batch_size` examples are live at once (the pipeline depth): see
    /// [`concurrency`](Self::concurrency). Default 2.
    pub fn depth(mut self, depth: NonZeroUsize) -> Self {
        self.depth = depth;
        self
    }

    /// The generator's concurrency for this pipeline: `batch_size × depth`.
    #[must_use]
    pub fn concurrency(&self) -> NonZeroUsize {
        self.batch_size.saturating_mul(self.depth)
    }

    /// The collector is also sent once no request has arrived for this long (every live
    /// example is waiting). Default 200 ms.
    pub fn quiet_period(mut self, d: Duration) -> Self {
        self.quiet_period = d;
        self
    }

    /// The first wait between two polls of a batch; it grows by half while the batch's state
    /// does not change, up to [`max_poll_interval`](Self::max_poll_interval). Default 30 s.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// The longest wait between two polls. Default 600 s (never less than the poll
    /// interval).
    pub fn max_poll_interval(mut self, d: Duration) -> Self {
        self.max_poll_interval = d;
        self
    }

    /// The most times a request is sent when its line errors or expires (the online retry
    /// limit). Default 6; at least 1.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
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
    reply: oneshot::Sender<Result<Completion, BackendError>>,
}

#[derive(Debug, Default)]
struct Shared {
    stats: Mutex<BatchStats>,
    /// The calls answered and their tokens (answers saved by an earlier run included).
    meter: CallMeter,
    /// The error that stopped the driver, if one did.
    fatal: OnceLock<BackendError>,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, BatchStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fatal(&self) -> Option<BackendError> {
        self.fatal.get().map(copy_error)
    }
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
    state_path: PathBuf,
    results_path: PathBuf,
}

impl BatchBackend {
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
        let (log, saved_lines) = ResultsLog::open(&results_path)?;
        let state = match StateFile::read_for(&state_path, &api.name())? {
            Some(s) => s,
            None => {
                let s = StateFile::new(api.name());
                s.write(&state_path)?;
                s
            }
        };
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let backend = BatchBackend {
            tx,
            shared: shared.clone(),
            api: api.clone(),
        };
        let driver = Driver {
            api,
            config,
            state,
            state_path: state_path.clone(),
            log,
            shared: shared.clone(),
            waiters: HashMap::new(),
            requests: HashMap::new(),
            queue: Vec::new(),
            attempts: HashMap::new(),
            invalid: HashMap::new(),
            saved: saved_lines.into_iter().collect(),
            flights: Vec::new(),
            in_flight_ids: HashSet::new(),
            unconfirmed: Vec::new(),
            last_arrival: Instant::now(),
            retry_at: None,
            submit_failures: 0,
            chunk_cap: usize::MAX,
        };
        let join = tokio::spawn(driver.run(rx, shutdown_rx));
        Ok((
            backend,
            BatchHandle {
                shutdown: shutdown_tx,
                join,
                shared,
                state_path,
                results_path,
            },
        ))
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
        if let Some(e) = self.shared.fatal() {
            return Err(e);
        }
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
        if let Some(e) = self.shared.fatal() {
            return Err(e);
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

impl BatchBackend {
    /// The totals so far (for a progress display).
    #[must_use]
    pub fn stats(&self) -> BatchStats {
        self.shared.stats().clone()
    }

    /// The calls answered so far and their tokens.
    pub(crate) fn meter(&self) -> &CallMeter {
        &self.shared.meter
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
        let driver = match self.join.await {
            Ok(r) => r,
            Err(e) => Err(Error::config(format!("the batch driver failed: {e}"))),
        };
        let stats = self.shared.stats().clone();
        let empty = driver?;
        let clean = empty
            || summary.is_some_and(|s| {
                s.outcome == Outcome::Completed
                    && s.generation.failed() == 0
                    && stats.in_flight == 0
            });
        if clean {
            for path in [&self.results_path, &self.state_path] {
                match std::fs::remove_file(path) {
                    Ok(()) => crate::io::sync_parent(path)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(path, e)),
                }
            }
        }
        Ok(stats)
    }
}

/// One batch being polled.
struct Flight {
    key: String,
    id: String,
    custom_ids: Vec<String>,
    wave: u64,
    next_poll: Instant,
    interval: Duration,
    last: Option<BatchState>,
    failures: u32,
    estimate: f64,
}

/// Why the driver stopped early.
enum Halt {
    /// A fatal error: every caller gets it.
    Fatal(BackendError),
    /// The state or the log could not be written.
    Io(Error),
}

impl From<Error> for Halt {
    fn from(e: Error) -> Self {
        Halt::Io(e)
    }
}

struct Driver {
    api: Arc<dyn BatchApi>,
    config: BatchConfig,
    state: StateFile,
    state_path: PathBuf,
    log: ResultsLog,
    shared: Arc<Shared>,
    /// Callers waiting for each custom_id.
    waiters: HashMap<String, Vec<oneshot::Sender<Result<Completion, BackendError>>>>,
    /// The request of each custom_id queued or in flight with a caller.
    requests: HashMap<String, CompletionRequest>,
    /// custom_ids waiting for the next wave.
    queue: Vec<String>,
    /// Lines sent per custom_id whose result was an error.
    attempts: HashMap<String, u32>,
    /// Validation failures per custom_id.
    invalid: HashMap<String, u32>,
    /// Results with no caller yet (saved by an earlier run, or of an adopted batch).
    saved: HashMap<String, Result<Completion, BackendError>>,
    flights: Vec<Flight>,
    in_flight_ids: HashSet<String>,
    /// Keys of batches whose creation failed in a way that may have created them.
    unconfirmed: Vec<String>,
    last_arrival: Instant,
    /// No submission before this (after a failed one).
    retry_at: Option<Instant>,
    submit_failures: u32,
    /// The most requests per batch, lowered when the provider refuses a batch as too large.
    chunk_cap: usize,
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
        let in_flight = self.state.batches.iter().filter(|b| !b.downloaded).count() as u64;
        self.shared.stats().in_flight = in_flight;
        let empty = self.state.batches.is_empty() && self.saved.is_empty() && self.log.is_empty();
        let mut outcome = Ok(empty);
        if let Err(halt) = result {
            let fatal = match halt {
                Halt::Fatal(e) => e,
                Halt::Io(e) => {
                    let b = BackendError::new(
                        BackendErrorKind::Fatal,
                        format!("the batch state cannot be kept: {}", crate::error_chain(&e)),
                    );
                    outcome = Err(e);
                    b
                }
            };
            tracing::error!(error = %fatal, "batch pipeline stopped");
            let _ = self.shared.fatal.set(copy_error(&fatal));
            for w in self.waiters.drain().flat_map(|(_, w)| w) {
                let _ = w.send(Err(copy_error(&fatal)));
            }
        }
        if let Err(e) = self.state.write(&self.state_path) {
            outcome = outcome.and(Err(e));
        }
        if let Err(e) = self.log.close() {
            outcome = outcome.and(Err(e));
        }
        // The waiters left (a stop) are dropped with the driver: their calls wait for the
        // run to drop them.
        outcome
    }

    /// Starts up, then gathers the calls into waves and polls the batches until shut down.
    async fn drive(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Call>,
        shutdown: &mut oneshot::Receiver<()>,
    ) -> Result<(), Halt> {
        self.startup().await?;
        loop {
            let wake = self.next_wake();
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
                () = sleep_until(wake) => {}
            }
            self.step().await?;
        }
    }

    /// Adopts the intents of an earlier run and polls its batches.
    async fn startup(&mut self) -> Result<(), Halt> {
        // Intents are looked for by listing (which leaves none), passing failures retried a
        // few times.
        let mut wait = self.config.poll_interval.min(Duration::from_secs(5));
        let mut attempt = 1;
        while self.state.batches.iter().any(|b| b.provider_id.is_none()) {
            match adopt_intents(&*self.api, &mut self.state).await {
                Ok(adopted) => {
                    self.shared.stats().adopted += adopted;
                    self.save()?;
                }
                Err(e) if e.is_retryable() && attempt < self.config.max_attempts.max(3) => {
                    tracing::warn!(error = %e, "listing the batches failed: retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(60));
                    attempt += 1;
                }
                Err(e) => {
                    return Err(Halt::Fatal(BackendError::new(
                        e.kind(),
                        format!(
                            "cannot list the batches to find those created just before the \
                             last run stopped (nothing is sent until they are found): {}",
                            e.message()
                        ),
                    )))
                }
            }
        }
        let earlier: Vec<BatchRecord> = self
            .state
            .batches
            .iter()
            .filter(|b| !b.downloaded && b.provider_id.is_some() && !b.custom_ids.is_empty())
            .cloned()
            .collect();
        for record in earlier {
            tracing::info!(id = ?record.provider_id, wave = record.wave, "following a batch of an earlier run");
            self.follow(&record, false, 0.0);
        }
        let followed = self.flights.len() as u64;
        let mut st = self.shared.stats();
        st.adopted = st.adopted.max(followed);
        Ok(())
    }

    fn save(&self) -> Result<(), Error> {
        self.state.write(&self.state_path)
    }

    fn accept(&mut self, call: Call) {
        self.last_arrival = Instant::now();
        let id = call.custom_id;
        match self.saved.remove(&id) {
            Some(Ok(c)) => {
                self.shared.stats().answered_from_saved += 1;
                let _ = call.reply.send(Ok(c));
                return;
            }
            Some(Err(e)) => {
                let n = self.attempts.entry(id.clone()).or_insert(1);
                if !(e.is_retryable() && *n < self.config.max_attempts) {
                    let _ = call.reply.send(Err(e));
                    return;
                }
                self.shared.stats().resubmitted += 1;
            }
            None => {}
        }
        self.waiters.entry(id.clone()).or_default().push(call.reply);
        if let Entry::Vacant(slot) = self.requests.entry(id.clone()) {
            slot.insert(call.request);
            if !self.in_flight_ids.contains(&id) {
                self.queue.push(id);
            }
        }
    }

    /// When the next wave may be due (after the quiet period and any back-off) or the next
    /// poll is.
    fn next_wake(&self) -> Option<Instant> {
        let quiet = self.last_arrival + self.config.quiet_period;
        let send = (!self.queue.is_empty() || !self.unconfirmed.is_empty())
            .then(|| quiet.max(self.retry_at.unwrap_or(quiet)));
        self.flights.iter().map(|f| f.next_poll).chain(send).min()
    }

    /// Sends the wave if it is due, and polls the batches whose time has come.
    async fn step(&mut self) -> Result<(), Halt> {
        let now = Instant::now();
        let due = self.retry_at.is_none_or(|r| now >= r)
            && (!self.unconfirmed.is_empty()
                || self.queue.len() >= self.config.batch_size.get()
                || (!self.queue.is_empty() && now >= self.last_arrival + self.config.quiet_period));
        if due {
            self.resolve_unconfirmed().await?;
            if !self.queue.is_empty() && self.retry_at.is_none() {
                self.send_wave().await?;
            }
        }
        let mut i = 0;
        while i < self.flights.len() {
            if self.flights[i].next_poll <= Instant::now() && self.poll(i).await? {
                self.flights.swap_remove(i);
            } else {
                i += 1;
            }
        }
        self.shared.stats().in_flight = (self.flights.len() + self.unconfirmed.len()) as u64;
        Ok(())
    }

    /// After a creation that failed in a way that may have created the batch: finds it by
    /// listing (then follows it) or sends its requests again.
    async fn resolve_unconfirmed(&mut self) -> Result<(), Halt> {
        if self.unconfirmed.is_empty() {
            return Ok(());
        }
        let keys = std::mem::take(&mut self.unconfirmed);
        let before: HashMap<String, Vec<String>> = self
            .state
            .batches
            .iter()
            .filter(|b| keys.contains(&b.key))
            .map(|b| (b.key.clone(), b.custom_ids.clone()))
            .collect();
        match adopt_intents(&*self.api, &mut self.state).await {
            Ok(_) => {}
            Err(e) if e.is_fatal() => return Err(Halt::Fatal(e)),
            Err(e) => {
                tracing::warn!(error = %e, "listing the batches failed: trying again later");
                self.unconfirmed = keys;
                self.back_off();
                return Ok(());
            }
        }
        self.save()?;
        self.retry_at = None;
        for (key, ids) in before {
            let found = self.state.batches.iter().find(|b| b.key == key);
            match found.filter(|b| b.provider_id.is_some()).cloned() {
                Some(record) => self.follow(&record, true, 0.0),
                // Never created: the requests go out in the next wave.
                None => self.queue.extend(ids),
            }
        }
        Ok(())
    }

    fn back_off(&mut self) {
        self.submit_failures += 1;
        let exp = self.submit_failures.min(8);
        let wait = (self.config.poll_interval.min(Duration::from_secs(2)) * (1 << exp))
            .min(Duration::from_secs(300));
        self.retry_at = Some(Instant::now() + wait);
    }

    /// Polls the batch of `record` (its provider id known): one this run `created` (counted)
    /// after the poll interval, one of an earlier run at once.
    fn follow(&mut self, record: &BatchRecord, created: bool, estimate: f64) {
        let first_poll = if created {
            let mut st = self.shared.stats();
            st.batches_created += 1;
            st.requests_submitted += record.custom_ids.len() as u64;
            self.config.poll_interval
        } else {
            Duration::ZERO
        };
        self.in_flight_ids.extend(record.custom_ids.iter().cloned());
        self.flights.push(Flight {
            key: record.key.clone(),
            id: record.provider_id.clone().unwrap_or_default(),
            custom_ids: record.custom_ids.clone(),
            wave: record.wave,
            next_poll: Instant::now() + first_poll,
            interval: self.config.poll_interval,
            last: record.state,
            failures: 0,
            estimate,
        });
    }

    /// The estimated cost of sending `ids`, at the budget's prices.
    fn estimate(&self, prices: Prices, ids: &[String]) -> f64 {
        let mut usage = Usage::default();
        for id in ids {
            if let Some(r) = self.requests.get(id) {
                let bytes = serde_json::to_vec(r).map_or(0, |v| v.len() as u64);
                usage += Usage::new(bytes / 4, u64::from(r.max_tokens.unwrap_or(1024)));
            }
        }
        prices.cost(usage)
    }

    /// Sends the queue as one wave (several batches if the limits ask for it).
    async fn send_wave(&mut self) -> Result<(), Halt> {
        let mut ids = std::mem::take(&mut self.queue);
        // A request whose every caller is gone and has no other use is still sent: its
        // result is saved for a rerun.
        let mut seen = HashSet::new();
        ids.retain(|id| self.requests.contains_key(id) && seen.insert(id.clone()));
        if ids.is_empty() {
            return Ok(());
        }
        if let Some((prices, max)) = &self.config.budget {
            let spent = prices.cost(self.shared.meter.usage());
            let flying: f64 = self.flights.iter().map(|f| f.estimate).sum();
            let wave = self.estimate(*prices, &ids);
            if spent + flying + wave > *max {
                tracing::warn!(
                    spent,
                    in_flight = flying,
                    wave,
                    max,
                    "cost budget: the next wave is not sent"
                );
                self.queue = ids;
                self.shared.stats().cost_limited = true;
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
                custom_id: id.clone(),
                request: self.requests[&id].clone(),
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
            let mut st = self.shared.stats();
            st.waves += 1;
            tracing::info!(wave, batches = sent, "wave sent");
        }
        Ok(())
    }

    /// Creates one batch; returns the ids to send again later if it was not created.
    async fn submit(
        &mut self,
        chunk: Vec<BatchRequest>,
        wave: u64,
    ) -> Result<Option<Vec<String>>, Halt> {
        let key = format!("{:016x}", rand::random::<u64>());
        let ids: Vec<String> = chunk.iter().map(|r| r.custom_id.clone()).collect();
        let estimate = match &self.config.budget {
            Some((prices, _)) => self.estimate(*prices, &ids),
            None => 0.0,
        };
        let record = BatchRecord {
            key: key.clone(),
            provider_id: None,
            intent_at: now_secs(),
            wave,
            requests: ids.len() as u64,
            custom_ids: ids.clone(),
            state: None,
            downloaded: false,
        };
        // The intent is on disk before the batch can exist.
        self.state.batches.push(record);
        self.save()?;
        let tag = self.state.tag(&key);
        let result = self.api.submit(&chunk, &tag).await;
        let result = result.and_then(|id| check_id(&id).map(str::to_string));
        let e = match result {
            Ok(id) => {
                let intent = self.state.batches.iter_mut().find(|b| b.key == key);
                let intent = intent.expect("the intent was pushed above");
                intent.provider_id = Some(id.clone());
                let record = intent.clone();
                self.save()?;
                self.submit_failures = 0;
                self.chunk_cap = self.chunk_cap.saturating_mul(2);
                tracing::info!(wave, id = %id, requests = ids.len(), "batch created");
                self.follow(&record, true, estimate);
                return Ok(None);
            }
            Err(e) if e.is_retryable() => {
                // The batch may exist all the same: look for it before sending again.
                tracing::warn!(error = %e, "creating a batch failed: looking for it before trying again");
                self.unconfirmed.push(key);
                self.back_off();
                return Ok(Some(Vec::new()));
            }
            Err(e) => e,
        };
        // An answer refusing the request: the batch was not created.
        self.state.batches.retain(|b| b.key != key);
        self.save()?;
        if e.is_fatal() {
            return Err(Halt::Fatal(e));
        }
        // Refused at creation (a validation the provider makes at once). The requests go again
        // in halves, down to single requests; a single request refused twice fails with the
        // provider's message.
        self.shared.stats().failed_validation += 1;
        if ids.len() > 1 {
            tracing::warn!(error = %e, requests = ids.len(), "a batch was refused: sending it again in halves");
            self.chunk_cap = ids.len() / 2;
            self.shared.stats().resubmitted += ids.len() as u64;
            return Ok(Some(ids));
        }
        Ok(Some(
            ids.into_iter().filter(|id| self.again(id, &e)).collect(),
        ))
    }

    /// Polls flight `i`; returns whether it is done (results delivered).
    async fn poll(&mut self, i: usize) -> Result<bool, Halt> {
        let id = self.flights[i].id.clone();
        let status = self.api.status(&id).await;
        self.shared.stats().polls += 1;
        let status = match status {
            Ok(s) => s,
            Err(e) => return self.poll_failed(i, e, "polling"),
        };
        let f = &mut self.flights[i];
        f.failures = 0;
        if f.last != Some(status.state) {
            tracing::info!(
                wave = f.wave,
                batch = %id,
                state = %status.state,
                succeeded = status.counts.succeeded,
                failed = status.counts.failed,
                total = status.counts.total,
                "batch state"
            );
            f.last = Some(status.state);
            f.interval = self.config.poll_interval;
            let key = f.key.clone();
            if let Some(r) = self.state.batches.iter_mut().find(|b| b.key == key) {
                r.state = Some(status.state);
            }
            self.save()?;
        } else {
            let max = self.config.max_poll_interval.max(self.config.poll_interval);
            f.interval = (f.interval * 3 / 2).min(max);
        }
        let f = &mut self.flights[i];
        if !status.state.is_ended() {
            f.next_poll = Instant::now() + f.interval;
            return Ok(false);
        }
        self.collect(i, status).await
    }

    /// After `what` failed for flight `i` with `e`: the run stops on a fatal error or the
    /// [`MAX_POLL_FAILURES`]th in a row, else flight `i` is polled again soon.
    fn poll_failed(&mut self, i: usize, e: BackendError, what: &str) -> Result<bool, Halt> {
        if e.is_fatal() {
            return Err(Halt::Fatal(e));
        }
        self.shared.stats().poll_errors += 1;
        let f = &mut self.flights[i];
        f.failures += 1;
        if f.failures >= MAX_POLL_FAILURES {
            return Err(Halt::Fatal(BackendError::new(
                BackendErrorKind::Fatal,
                format!(
                    "the batch API failed {} polls in a row of batch {}: {e}",
                    f.failures, f.id
                ),
            )));
        }
        tracing::warn!(error = %e, batch = %f.id, "{what} failed: trying again");
        f.next_poll = Instant::now() + f.interval.min(Duration::from_secs(60));
        Ok(false)
    }

    /// Reads the results of ended flight `i`, saves them, and answers the callers.
    async fn collect(&mut self, i: usize, status: BatchStatus) -> Result<bool, Halt> {
        let (key, id) = (self.flights[i].key.clone(), self.flights[i].id.clone());
        let mut results = Vec::new();
        if status.state == BatchState::Failed {
            self.shared.stats().failed_validation += 1;
            let message = status
                .message
                .clone()
                .unwrap_or_else(|| "no message".to_string());
            tracing::warn!(batch = %id, %message, "a batch failed validation");
            let e = BackendError::new(
                BackendErrorKind::InvalidRequest,
                format!("the batch failed validation twice: {message}"),
            );
            for cid in std::mem::take(&mut self.flights[i].custom_ids) {
                self.in_flight_ids.remove(&cid);
                if self.again(&cid, &e) {
                    self.queue.push(cid);
                }
            }
        } else {
            let outcomes = match self.api.results(&id).await {
                Ok(o) => o,
                Err(e) => return self.poll_failed(i, e, "reading the results"),
            };
            let mut expected: HashSet<String> =
                self.flights[i].custom_ids.iter().cloned().collect();
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
                (
                    cid,
                    Err(BackendError::new(BackendErrorKind::Server, missing)),
                )
            }));
            for (cid, result) in &results {
                self.log.append(cid, result)?;
            }
        }
        if let Some(r) = self.state.batches.iter_mut().find(|b| b.key == key) {
            r.downloaded = true;
            r.state = Some(status.state);
            r.custom_ids = Vec::new();
        }
        self.save()?;
        for (cid, result) in results {
            self.in_flight_ids.remove(&cid);
            self.deliver(cid, result);
        }
        Ok(true)
    }

    fn deliver(&mut self, id: String, result: Result<Completion, BackendError>) {
        match result {
            Ok(c) => {
                self.attempts.remove(&id);
                self.requests.remove(&id);
                match self.waiters.remove(&id) {
                    Some(waiters) => {
                        for w in waiters {
                            let _ = w.send(Ok(c.clone()));
                        }
                    }
                    None => {
                        self.saved.insert(id, Ok(c));
                    }
                }
            }
            Err(e) => {
                let n = self.attempts.entry(id.clone()).or_insert(0);
                *n += 1;
                if e.is_retryable()
                    && *n < self.config.max_attempts
                    && self.requests.contains_key(&id)
                {
                    self.shared.stats().resubmitted += 1;
                    self.queue.push(id);
                } else if self.waiters.contains_key(&id) {
                    self.fail(&id, e);
                } else {
                    self.saved.insert(id, Err(e));
                }
            }
        }
    }

    /// Counts a failed validation of `id`: the second one (or one no caller waits for) fails
    /// it with `e`; returns whether it is sent again.
    fn again(&mut self, id: &str, e: &BackendError) -> bool {
        let n = self.invalid.entry(id.to_string()).or_insert(0);
        *n += 1;
        if *n >= 2 || !self.requests.contains_key(id) {
            self.fail(id, copy_error(e));
            return false;
        }
        self.shared.stats().resubmitted += 1;
        true
    }

    fn fail(&mut self, id: &str, e: BackendError) {
        self.requests.remove(id);
        self.attempts.remove(id);
        for w in self.waiters.remove(id).unwrap_or_default() {
            let _ = w.send(Err(copy_error(&e)));
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
