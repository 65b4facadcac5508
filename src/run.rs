//! A whole generation run into a file that survives crashes, restarts and Ctrl-C (feature
//! `run`): [`run_to_file`].
//!
//! What a run does, in order:
//!
//! 1. opens the output with [`OutputFile`]: locks it (a second run on the same file is
//!    refused) and cuts a torn last line left by a crash;
//! 2. **resumes** by default: scans the output for the ids already written ([`Resume`]);
//! 3. reads the prompts lazily (nothing is collected), and for each record:
//!    - a bad line is skipped and reported, or stops the run ([`BadLinePolicy`]);
//!    - an id of another shard is passed over ([`Shard`]);
//!    - an id seen earlier in this input is a duplicate: the first wins, later ones are
//!      counted and skipped;
//!    - an id already in the output is skipped;
//!    - anything else goes to the generator;
//! 4. writes each example as one whole line as soon as it is done, and each failure (after
//!    whatever retries the backend wrapper made) to the [`FailureLedger`], never to the output;
//! 5. on the [`StopSignal`], takes no new prompts, lets the examples in flight finish (or drops
//!    them after [`RunOptions::drain_deadline`]), and returns with
//!    [`RunSummary::interrupted`] set;
//! 6. syncs and closes the files, compacts the ledger (it then lists exactly the ids that
//!    still failed), and returns a [`RunSummary`].
//!
//! Memory does not grow with the length of the examples or of the input file, only with its
//! number of ids: two [`IdSet`]s (ids already in the output when the run started, ids seen in
//! this input) of about 18 bytes per id, so about 18 MB for a million prompts into a new file
//! and 36 MB when resuming a file that already holds a million.
//!
//! Every id of the input therefore ends up in the output exactly once after any number of
//! crashes and reruns (ids that keep failing stay in the ledger), and since every random draw of
//! an example comes from [`example_rng`](crate::example_rng)`(seed, id)`, a resumed run writes
//! the same labels and aspects as an uninterrupted one.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rmboost::Error> {
//! use futures::stream;
//! use rmboost::run::{run_to_file, RunOptions};
//! use rmboost::testing::FakeBackend;
//! use rmboost::{Prompt, RmBoost};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let out = dir.path().join("pairs.jsonl");
//! let rmb = RmBoost::builder().backend(FakeBackend::new()).seed(1).build()?;
//! let prompts = || stream::iter((0..10).map(|i| Ok(Prompt::with_id(format!("q{i}"), "Hi?"))));
//!
//! let first = run_to_file(|p| rmb.try_generate(p), prompts(), &out, RunOptions::new()).await?;
//! assert_eq!(first.generation.examples, 10);
//! // Running again skips everything already written.
//! let again = run_to_file(|p| rmb.try_generate(p), prompts(), &out, RunOptions::new()).await?;
//! assert_eq!((again.generation.examples, again.skipped_done), (0, 10));
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{self, FutureExt, Shared};
use futures::stream::{BoxStream, Stream, StreamExt};

use crate::example::{ExampleFormat, PreferenceExample, Prompt};
use crate::generator::Summary;
use crate::io::{FailureLedger, IdHash, IdSet, OutputFile, Resume, SyncPolicy};
use crate::Error;

/// A cloneable "please stop" flag that can be awaited.
///
/// [`stop`](Self::stop) asks every run holding a clone to stop taking new prompts and finish;
/// it can be called from any thread, any number of times.
#[derive(Clone)]
pub struct StopSignal {
    inner: Arc<StopInner>,
}

struct StopInner {
    stopped: AtomicBool,
    tx: Mutex<Option<oneshot::Sender<()>>>,
    rx: Shared<oneshot::Receiver<()>>,
}

impl fmt::Debug for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopSignal")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl Default for StopSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl StopSignal {
    /// A signal not yet given.
    #[must_use]
    pub fn new() -> Self {
        let (tx, rx) = oneshot::channel();
        StopSignal {
            inner: Arc::new(StopInner {
                stopped: AtomicBool::new(false),
                tx: Mutex::new(Some(tx)),
                rx: rx.shared(),
            }),
        }
    }

    /// Gives the signal.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let tx = self
            .inner
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }

    /// Whether the signal was given.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// Completes once the signal is given (at once if it already was).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future has no effect.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            let rx = inner.rx.clone();
            let _ = rx.await;
        }
    }
}

/// Gives `stop` on the first Ctrl-C (SIGINT) and exits the process at once, with status 130,
/// on the second.
///
/// After the first Ctrl-C a run finishes the examples in flight and returns; a second Ctrl-C
/// leaves a valid file too, since every line is written whole. On Unix the handler is in place
/// when this returns. Must be called inside a tokio runtime.
///
/// # Errors
///
/// The operating system's error if the signal handler cannot be installed.
pub fn stop_on_ctrl_c(stop: StopSignal) -> std::io::Result<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigint = signal(SignalKind::interrupt())?;
        Ok(tokio::spawn(async move {
            if sigint.recv().await.is_none() {
                return;
            }
            tracing::warn!("stopping: finishing the examples in flight (Ctrl-C again to quit now)");
            stop.stop();
            if sigint.recv().await.is_some() {
                std::process::exit(130);
            }
        }))
    }
    #[cfg(not(unix))]
    {
        Ok(tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            tracing::warn!("stopping: finishing the examples in flight (Ctrl-C again to quit now)");
            stop.stop();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }))
    }
}

/// What to do with an input line that is not a valid prompt record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BadLinePolicy {
    /// Skip it, count it in [`RunSummary::bad_lines`] and keep its message (the first
    /// [`MAX_MESSAGES`] in [`RunSummary::bad_line_messages`]; all are logged). The default.
    #[default]
    Skip,
    /// Stop taking prompts, finish the examples in flight, and return the line's
    /// [`Error::Parse`].
    Stop,
}

/// What to do when the output file already has examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ExistingOutput {
    /// Skip the ids already written and append the rest. The default.
    #[default]
    Resume,
    /// Empty the output and delete the ledger, then generate everything.
    Overwrite,
    /// Return an error if the output has any line.
    Fail,
}

/// One shard of a run split across processes or machines: an id belongs to shard
/// `IdHash::of(id).shard(count)` ([`IdHash::shard`]: the first 8 bytes of the SHA-256 of
/// `"rmboost/id/v1\0" + id`, little-endian, modulo `count`). Stable across runs and releases,
/// independent of input order; each shard should write its own output file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    index: u32,
    count: u32,
}

impl Shard {
    /// Shard `index` of `count` (0-based).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if `count` is 0 or `index >= count`.
    pub fn new(index: u32, count: u32) -> Result<Self, Error> {
        if count == 0 || index >= count {
            return Err(Error::Config(format!(
                "shard {index} of {count}: need count >= 1 and index < count"
            )));
        }
        Ok(Shard { index, count })
    }

    /// The 0-based index.
    #[must_use]
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The number of shards.
    #[must_use]
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether `id` belongs to this shard.
    #[must_use]
    pub fn contains(&self, id: &str) -> bool {
        IdHash::of(id).shard(self.count) == self.index
    }
}

/// How many bad-line and duplicate messages a summary keeps.
pub const MAX_MESSAGES: usize = 20;

/// The totals of a run; see [`run_to_file`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Examples written by this run and failures by kind, with their calls, re-asks and tokens.
    pub generation: Summary,
    /// Valid prompt records read.
    pub read: u64,
    /// Input lines that were not valid prompt records.
    pub bad_lines: u64,
    /// The messages of the first bad lines (each names the file and line).
    pub bad_line_messages: Vec<String>,
    /// Records skipped because their id was already in the output.
    pub skipped_done: u64,
    /// Records skipped because their id came earlier in the input (the first wins).
    pub duplicates: u64,
    /// The first duplicate ids.
    pub duplicate_ids: Vec<String>,
    /// Records of other shards.
    pub other_shard: u64,
    /// Records handed to the generator.
    pub scheduled: u64,
    /// Examples in flight dropped when the drain deadline passed after a stop.
    pub dropped_in_flight: u64,
    /// Ids found in the output when the run started.
    pub resumed: u64,
    /// Bytes of a torn last line cut from the output when it was opened.
    pub torn_bytes: u64,
    /// Ids left in the failure ledger after the run (still failing).
    pub ledger_pending: u64,
    /// Whether the run was stopped by its [`StopSignal`] before the input ran out.
    pub interrupted: bool,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl RunSummary {
    /// Examples written per second of wall time.
    #[must_use]
    pub fn examples_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.generation.examples as f64 / s
        } else {
            0.0
        }
    }
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; {} read, {} already done, {} duplicates, {} bad lines",
            self.generation, self.read, self.skipped_done, self.duplicates, self.bad_lines
        )?;
        if self.other_shard > 0 {
            write!(f, ", {} in other shards", self.other_shard)?;
        }
        if self.dropped_in_flight > 0 {
            write!(f, ", {} dropped in flight", self.dropped_in_flight)?;
        }
        if self.ledger_pending > 0 {
            write!(f, ", {} still failing (ledger)", self.ledger_pending)?;
        }
        write!(
            f,
            "; {:.1}s, {:.1} examples/s",
            self.elapsed.as_secs_f64(),
            self.examples_per_sec()
        )?;
        if self.interrupted {
            f.write_str(" (interrupted)")?;
        }
        Ok(())
    }
}

/// A live view of a run's [`RunSummary`], for progress bars and for the totals of a run that
/// ended in an error. Cheap to clone; pass a clone in [`RunOptions::progress`].
#[derive(Debug, Clone, Default)]
pub struct Progress {
    inner: Arc<Mutex<RunSummary>>,
}

impl Progress {
    /// A fresh view.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The totals so far.
    #[must_use]
    pub fn snapshot(&self) -> RunSummary {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, summary: &RunSummary) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = summary.clone();
    }
}

/// Settings of [`run_to_file`]; every setter documents its default.
#[derive(Debug, Clone)]
#[must_use]
pub struct RunOptions {
    format: ExampleFormat,
    sync: SyncPolicy,
    existing: ExistingOutput,
    bad_lines: BadLinePolicy,
    shard: Option<Shard>,
    ledger: Option<PathBuf>,
    drain_deadline: Option<Duration>,
    limit: Option<u64>,
    stop: StopSignal,
    progress: Option<Progress>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl RunOptions {
    /// The defaults.
    pub fn new() -> Self {
        RunOptions {
            format: ExampleFormat::default(),
            sync: SyncPolicy::default(),
            existing: ExistingOutput::default(),
            bad_lines: BadLinePolicy::default(),
            shard: None,
            ledger: None,
            drain_deadline: None,
            limit: None,
            stop: StopSignal::new(),
            progress: None,
        }
    }

    /// The output format. Default: [`ExampleFormat::Conversational`].
    pub fn format(mut self, format: ExampleFormat) -> Self {
        self.format = format;
        self
    }

    /// When the output and ledger are synced to disk. Default: [`SyncPolicy::default`].
    pub fn sync(mut self, sync: SyncPolicy) -> Self {
        self.sync = sync;
        self
    }

    /// What to do with examples already in the output. Default: [`ExistingOutput::Resume`].
    pub fn existing(mut self, existing: ExistingOutput) -> Self {
        self.existing = existing;
        self
    }

    /// What to do with a bad input line. Default: [`BadLinePolicy::Skip`].
    pub fn bad_lines(mut self, policy: BadLinePolicy) -> Self {
        self.bad_lines = policy;
        self
    }

    /// Only generate the ids of this shard. Default: all ids.
    pub fn shard(mut self, shard: Shard) -> Self {
        self.shard = Some(shard);
        self
    }

    /// The failure ledger's path. Default: [`FailureLedger::default_path`] of the output
    /// (`PAIRS.failures.jsonl` beside `PAIRS.jsonl`).
    pub fn ledger(mut self, path: impl Into<PathBuf>) -> Self {
        self.ledger = Some(path.into());
        self
    }

    /// After a stop, how long to wait for the examples in flight before dropping them (they
    /// are generated again by the next run). Default: no limit.
    pub fn drain_deadline(mut self, deadline: Duration) -> Self {
        self.drain_deadline = Some(deadline);
        self
    }

    /// Hand at most `limit` prompts to the generator in this run. Default: no limit.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// The signal that stops the run gracefully. Default: a signal nobody else holds.
    pub fn stop_signal(mut self, stop: StopSignal) -> Self {
        self.stop = stop;
        self
    }

    /// A view updated after every result. Default: none.
    pub fn progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }
}

/// What the input filter shares with the writing loop.
struct Admission {
    done: IdSet,
    seen: IdSet,
    summary: RunSummary,
    shard: Option<Shard>,
    policy: BadLinePolicy,
    limit: Option<u64>,
    stop_error: Option<Error>,
}

enum Admit {
    Take(Prompt),
    Skip,
    End,
}

impl Admission {
    fn admit(&mut self, item: Result<Prompt, Error>) -> Admit {
        let prompt = match item {
            Ok(p) => p,
            Err(e @ Error::Parse { .. }) => {
                self.summary.bad_lines += 1;
                tracing::warn!(error = %e, "bad input line");
                if self.summary.bad_line_messages.len() < MAX_MESSAGES {
                    self.summary.bad_line_messages.push(e.to_string());
                }
                return match self.policy {
                    BadLinePolicy::Skip => Admit::Skip,
                    BadLinePolicy::Stop => {
                        self.stop_error = Some(e);
                        Admit::End
                    }
                };
            }
            Err(e) => {
                // Reading itself failed: nothing after it can be trusted.
                self.stop_error = Some(e);
                return Admit::End;
            }
        };
        if self.limit.is_some_and(|l| self.summary.scheduled >= l) {
            return Admit::End;
        }
        self.summary.read += 1;
        let hash = IdHash::of(&prompt.id);
        if let Some(shard) = self.shard {
            if hash.shard(shard.count) != shard.index {
                self.summary.other_shard += 1;
                return Admit::Skip;
            }
        }
        if !self.seen.insert_hash(hash) {
            self.summary.duplicates += 1;
            tracing::warn!(id = %prompt.id, "duplicate id in the input: keeping the first");
            if self.summary.duplicate_ids.len() < MAX_MESSAGES {
                self.summary.duplicate_ids.push(prompt.id);
            }
            return Admit::Skip;
        }
        if self.done.contains_hash(hash) {
            self.summary.skipped_done += 1;
            return Admit::Skip;
        }
        self.summary.scheduled += 1;
        Admit::Take(prompt)
    }
}

fn lock(m: &Mutex<Admission>) -> MutexGuard<'_, Admission> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a generation into the JSONL file `output`; see the [module docs](self).
///
/// `generate` turns the filtered stream of prompts into a stream of results (for
/// [`RmBoost`](crate::RmBoost): `|p| rmb.try_generate(p)`), so any generator with that shape
/// (a baseline, a wrapper) can be run. `prompts` is pulled lazily, only as fast as the
/// generator takes prompts; for a file use
/// `futures::stream::iter(rmboost::read_prompts(path)?)`.
///
/// # Errors
///
/// - [`Error::Io`] if the output or ledger cannot be opened (a file locked by another run
///   included), read or written;
/// - [`Error::Config`] if the output has examples and [`ExistingOutput::Fail`] was asked;
/// - [`Error::Parse`] for a bad line under [`BadLinePolicy::Stop`], and the reader's
///   [`Error::Io`] if reading the input fails, after the examples in flight are written;
/// - a fatal error of the generator ([`Error::is_fatal`]: a bad key, an exhausted quota),
///   at once (examples in flight are dropped; the error is not written to the ledger, since
///   it is not about the example).
///
/// In every case the files are left valid, the examples finished so far are written, and
/// the totals so far are in the [`Progress`] given in the options.
///
/// # Cancel safety
///
/// Dropping the future stops the run like a crash would, except that no line is torn: the
/// next run resumes.
pub async fn run_to_file<F, S, P>(
    generate: F,
    prompts: P,
    output: impl AsRef<Path>,
    options: RunOptions,
) -> Result<RunSummary, Error>
where
    F: FnOnce(BoxStream<'static, Result<Prompt, Error>>) -> S,
    S: Stream<Item = Result<PreferenceExample, Error>> + Send,
    P: Stream<Item = Result<Prompt, Error>> + Send + 'static,
{
    let started = Instant::now();
    let output = output.as_ref();
    let ledger_path = options
        .ledger
        .clone()
        .unwrap_or_else(|| FailureLedger::default_path(output));
    let progress = options.progress.clone().unwrap_or_default();

    let mut out = OutputFile::open(output, options.format, options.sync)?;
    let mut summary = RunSummary {
        torn_bytes: out.repair().torn_bytes,
        ..RunSummary::default()
    };
    let resume = match options.existing {
        ExistingOutput::Resume => Resume::scan(output)?,
        ExistingOutput::Overwrite => {
            out.truncate()?;
            remove_if_exists(&ledger_path)?;
            Resume::new()
        }
        ExistingOutput::Fail => {
            let r = Resume::scan(output)?;
            if r.lines() > 0 {
                return Err(Error::Config(format!(
                    "{} already has {} lines; resume or overwrite it",
                    output.display(),
                    r.lines()
                )));
            }
            r
        }
    };
    if resume.unreadable() > 0 {
        tracing::warn!(
            path = %output.display(),
            lines = resume.unreadable(),
            "output lines without a readable id: their ids are generated again"
        );
    }
    summary.resumed = resume.len() as u64;
    tracing::info!(
        path = %output.display(),
        resumed = summary.resumed,
        torn_bytes = summary.torn_bytes,
        "run starting"
    );

    // Compaction at the end drops the ledger records of ids that are done. Of the ids written
    // by this run, only those with a record from an earlier run can have one (an id is
    // generated once per run), so only they are added to `done`: remembering every written id
    // would double the memory per id (`seen` has them all already).
    let mut failed_before = IdSet::new();
    for record in FailureLedger::read(&ledger_path)? {
        failed_before.insert(&record.id);
    }

    let admission = Arc::new(Mutex::new(Admission {
        done: resume.into_ids(),
        seen: IdSet::new(),
        summary,
        shard: options.shard,
        policy: options.bad_lines,
        limit: options.limit,
        stop_error: None,
    }));

    let stop = options.stop.clone();
    let filter_state = admission.clone();
    let filtered = prompts
        .take_until(stop.wait())
        .scan((), move |(), item| {
            let next = match lock(&filter_state).admit(item) {
                Admit::Take(p) => Some(Some(Ok(p))),
                Admit::Skip => Some(None),
                Admit::End => None,
            };
            future::ready(next)
        })
        .filter_map(future::ready)
        .boxed();

    let mut results = Box::pin(generate(filtered));
    let mut ledger: Option<FailureLedger> = None;
    let mut fatal: Option<Error> = None;
    let mut io_error: Option<Error> = None;
    let mut received: u64 = 0;
    let mut stop_seen = false;
    let mut deadline = pin!(future::Fuse::<tokio::time::Sleep>::terminated());
    loop {
        let stop_wait = stop.wait();
        tokio::select! {
            biased;
            item = results.next() => {
                let Some(item) = item else { break };
                received += 1;
                let mut st = lock(&admission);
                match item {
                    Ok(example) => {
                        if let Err(e) = out.write(&example) {
                            io_error = Some(e);
                            break;
                        }
                        if !failed_before.is_empty() && failed_before.contains(&example.id) {
                            st.done.insert(&example.id);
                        }
                        st.summary.generation.record(&Ok(example));
                    }
                    Err(e) => {
                        let result: Result<PreferenceExample, Error> = Err(e);
                        st.summary.generation.record(&result);
                        let Err(e) = result else { unreachable!("built as Err above") };
                        let chain = crate::io::error_chain(&e);
                        if e.is_fatal() {
                            tracing::error!(error = %chain, "fatal error: stopping the run");
                            fatal = Some(e);
                            break;
                        }
                        tracing::warn!(error = %chain, "example failed");
                        if let Some(id) = e.example_id() {
                            if let Err(err) = record_failure(&mut ledger, &ledger_path, options.sync, id, &e) {
                                io_error = Some(err);
                                break;
                            }
                        }
                    }
                }
                progress.set(&st.summary);
            }
            () = stop_wait, if !stop_seen => {
                stop_seen = true;
                tracing::info!("stop requested: finishing the examples in flight");
                if let Some(d) = options.drain_deadline {
                    deadline.set(tokio::time::sleep(d).fuse());
                }
            }
            () = &mut deadline => {
                tracing::warn!("drain deadline passed: dropping the examples in flight");
                break;
            }
        }
    }
    // Dropping the stream cancels whatever is still in flight.
    drop(results);

    let (mut summary, done, stop_error) = {
        let mut st = lock(&admission);
        (
            std::mem::take(&mut st.summary),
            std::mem::take(&mut st.done),
            st.stop_error.take(),
        )
    };
    summary.dropped_in_flight = summary.scheduled.saturating_sub(received);
    summary.interrupted = stop.is_stopped();
    if let Err(e) = out.close() {
        io_error.get_or_insert(e);
    }
    if let Some(l) = ledger {
        if let Err(e) = l.close() {
            io_error.get_or_insert(e);
        }
    }
    match FailureLedger::compact(&ledger_path, &done) {
        Ok(pending) => summary.ledger_pending = pending,
        Err(e) => {
            io_error.get_or_insert(e);
        }
    }
    summary.elapsed = started.elapsed();
    progress.set(&summary);
    tracing::info!(%summary, "run finished");
    match io_error.or(fatal).or(stop_error) {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

fn record_failure(
    ledger: &mut Option<FailureLedger>,
    path: &Path,
    sync: SyncPolicy,
    id: &str,
    error: &Error,
) -> Result<(), Error> {
    let l = match ledger {
        Some(l) => l,
        None => ledger.insert(FailureLedger::open(path, sync)?),
    };
    l.record(id, error)
}

fn remove_if_exists(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}
