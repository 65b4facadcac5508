//! A whole generation run into a file that survives crashes, restarts and Ctrl-C (feature
//! `run`): [`run_to_file`].
//!
//! What a run does, in order:
//!
//! 1. refuses paths that name the same file twice (input, output, ledger, recipe; compared by
//!    device and inode, see [`ensure_distinct_files`]);
//! 2. opens the output with [`OutputFile`]: locks it (a second run on the same file is
//!    refused) and cuts a torn last line left by a crash (saved to `<output>.torn`);
//! 3. **resumes** by default: scans the output for the ids already written ([`Resume`]);
//!    unreadable lines inside it (a power loss can leave some) are moved to
//!    `<output>.garbage`, so downstream loaders never meet them;
//! 4. checks the [`Recipe`] recorded beside the output (`PAIRS.run.json`): a run whose
//!    format or settings differ from those the examples were made with is refused, with a
//!    message naming each difference, instead of appending rows of another shape or recipe;
//! 5. reads the prompts lazily (nothing is collected), and for each record:
//!    - a bad line is skipped and reported, or stops the run ([`BadLinePolicy`]);
//!    - an id of another shard is passed over ([`Shard`]);
//!    - an id seen earlier in this input is a duplicate: the first wins, later ones are
//!      counted and skipped;
//!    - an id already in the output is skipped;
//!    - anything else goes to the generator;
//! 6. writes each example as one whole line as soon as it is done, and each failure (after
//!    whatever retries the backend wrapper made) to the [`FailureLedger`], never to the output;
//! 7. applies the run's policies as results come in: a [cost budget](RunOptions::max_cost)
//!    on the backend's [meter](RunOptions::meter), and a stop when the server
//!    [stays unreachable](RunOptions::stop_when_unreachable);
//! 8. on the [`StopSignal`] (see [`stop_on_ctrl_c`]), takes no new prompts, lets the
//!    examples in flight finish (dropping them after [`RunOptions::drain_deadline`], or at
//!    once on [`StopSignal::abort`]);
//! 9. compacts the ledger while the output is still locked (it then lists exactly the ids
//!    that still failed), syncs and closes the files, removes the output if this run created
//!    it and wrote nothing to it, and returns a [`RunSummary`] whose [`Outcome`] says how it
//!    ended.
//!
//! Every file is created with the user's umask; replacement files get random names beside
//! the original (never a fixed name a planted symlink could hold) and are renamed over it,
//! and the directory is synced after every create, rename and removal.
//!
//! Memory does not grow with the length of the examples or of the input file, only with its
//! number of ids: two sets of id hashes (ids already in the output when the run started, ids
//! seen in this input) of about 25 bytes per id.
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
//! use rmboost::{GeneratorExt, Prompt, RmBoost};
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
//!
//! Design notes and memory measurements: see ARCHITECTURE.md in the repository.

use std::fmt;
use std::future::Future;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{self, FutureExt, Shared};
use futures::stream::{BoxStream, Stream, StreamExt};

use serde::{Deserialize, Serialize};

use crate::backend::meter::CallMeter;
use crate::backend::{lock, Usage};
use crate::engine::Summary;
use crate::example::{ExampleFormat, PreferenceExample, Prompt};
pub use crate::io::append::ensure_distinct_files;
use crate::io::append::{if_exists, remove_if_exists, sidecar, write_replacing};
use crate::io::{FailureLedger, IdHash, IdSet, OutputFile, Resume, SyncPolicy};
use crate::{BackendErrorKind, Error, ErrorKind};

/// A cloneable one-way flag that can be awaited: setting it drops the sender, which completes
/// the receiver every waiter holds a clone of.
#[derive(Debug, Clone)]
struct Flag(
    Arc<Mutex<Option<oneshot::Sender<()>>>>,
    Shared<oneshot::Receiver<()>>,
);

impl Default for Flag {
    fn default() -> Self {
        let (tx, rx) = oneshot::channel();
        Flag(Arc::new(Mutex::new(Some(tx))), rx.shared())
    }
}

impl Flag {
    fn set(&self) {
        lock(&self.0).take();
    }

    fn is_set(&self) -> bool {
        lock(&self.0).is_none()
    }

    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        self.1.clone().map(drop)
    }
}

/// A cloneable "please stop" flag that can be awaited, with two levels.
///
/// [`stop`](Self::stop) asks every run holding a clone to take no new prompts and finish the
/// examples in flight (within [`RunOptions::drain_deadline`]); [`abort`](Self::abort) asks it
/// to drop the examples in flight and return at once (they are generated again by the next
/// run). Either can be called from any thread, any number of times.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    stop: Flag,
    abort: Flag,
    reason: Arc<Mutex<Option<Reason>>>,
}

/// The outcome and message of [`StopSignal::stop_with`].
type Reason = (Outcome, Option<String>);

impl StopSignal {
    /// A signal not yet given.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a graceful stop: no new prompts, the examples in flight finish.
    pub fn stop(&self) {
        self.stop.set();
    }

    /// Asks for a graceful stop for a reason a run should end with: a run given this signal
    /// ends with `outcome` (and `message` in [`RunSummary::message`]) instead of
    /// [`Outcome::Interrupted`]. The first reason given wins. Used by the run itself on its
    /// cost budget and when the server stays unreachable, and by the batch pipeline to stop a
    /// run on its cost budget ([`Outcome::CostLimit`]).
    pub fn stop_with(&self, outcome: Outcome, message: Option<String>) {
        lock(&self.reason).get_or_insert((outcome, message));
        self.stop();
    }

    /// The reason given with [`stop_with`](Self::stop_with), if any.
    #[must_use]
    pub fn reason(&self) -> Option<(Outcome, Option<String>)> {
        lock(&self.reason).clone()
    }

    /// Asks for an immediate stop: the examples in flight are dropped (implies
    /// [`stop`](Self::stop)).
    pub fn abort(&self) {
        self.stop();
        self.abort.set();
    }

    /// Whether a stop (graceful or not) was asked for.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.stop.is_set()
    }

    /// Whether an immediate stop was asked for.
    #[must_use]
    pub fn is_aborted(&self) -> bool {
        self.abort.is_set()
    }

    /// Completes once a stop is asked for (at once if it already was).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future has no effect.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        self.stop.wait()
    }
}

/// Turns Ctrl-C (SIGINT) into the stop signal: the first asks for a graceful
/// [`stop`](StopSignal::stop), the second for an immediate [`abort`](StopSignal::abort).
///
/// The process is never ended here: a run given this signal returns (with
/// [`RunSummary::outcome`] [`Outcome::Interrupted`]) and the program decides what to do (the
/// `rmboost` command exits with status 130). The handler is in place when this returns, and
/// it listens until the returned [`CtrlC`] is dropped. Must be called inside a tokio runtime.
///
/// # Errors
///
/// The operating system's error if the signal handler cannot be installed.
pub fn stop_on_ctrl_c(stop: StopSignal) -> std::io::Result<CtrlC> {
    #[cfg(unix)]
    let mut ctrl_c = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    #[cfg(windows)]
    let mut ctrl_c = tokio::signal::windows::ctrl_c()?;
    let task = tokio::spawn(async move {
        if ctrl_c.recv().await.is_none() {
            return;
        }
        tracing::warn!(
            "stopping: finishing the examples in flight (Ctrl-C again to drop them and stop now)"
        );
        stop.stop();
        if ctrl_c.recv().await.is_some() {
            tracing::warn!("stopping now: dropping the examples in flight");
            stop.abort();
        }
    });
    Ok(CtrlC { task })
}

/// Ctrl-C turned into a run's stop signal ([`stop_on_ctrl_c`]), for as long as this is kept.
#[derive(Debug)]
#[must_use = "Ctrl-C is listened for only while this is kept"]
pub struct CtrlC {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CtrlC {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What to do with an input line that is not a valid prompt record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum BadLinePolicy {
    /// Skip it, count it in [`RunSummary::bad_lines`] and keep its message (the first
    /// 20 in [`RunSummary::bad_line_messages`]; all are logged). The default.
    #[default]
    Skip,
    /// Stop taking prompts, finish the examples in flight, and return the line's
    /// [`ErrorKind::Parse`].
    Stop,
}

/// What to do when the output file already has examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
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
/// `hash(id) mod count`, where `hash` is the first 8 bytes of the SHA-256 of
/// `"rmboost/id/v1\0" + id`, little-endian. Stable across runs and releases,
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
    /// [`ErrorKind::Config`] if `count` is 0 or `index >= count`.
    pub fn new(index: u32, count: u32) -> Result<Self, Error> {
        if count == 0 || index >= count {
            return Err(Error::config(format!(
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

    /// The shard of this process from the scheduler that started it, read from the
    /// environment: a Slurm job array task or a Kubernetes Indexed Job pod. `shards` is the
    /// number of shards when the caller knows it (`rmboost generate --shards N`); Kubernetes
    /// needs it, as it does not export the Job's `completions`. See
    /// [`from_scheduler_vars`](Self::from_scheduler_vars) for the rules; this is that function
    /// over [`std::env::var`].
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`], with a message naming the variables, when neither scheduler's
    /// variables are set or their values do not make a shard; see
    /// [`from_scheduler_vars`](Self::from_scheduler_vars).
    pub fn from_scheduler(shards: Option<u32>) -> Result<(Shard, ShardSource), Error> {
        Shard::from_scheduler_vars(shards, |name| std::env::var(name).ok())
    }

    /// [`from_scheduler`](Self::from_scheduler) with the environment given as a function from
    /// a variable's name to its value (unset or empty is `None`), so it can be tested, or fed
    /// from elsewhere.
    ///
    /// - **Slurm job arrays** (`SLURM_ARRAY_TASK_ID` is set; `sbatch --array=0-3`, `--array=1-8`,
    ///   or a range with a step, `--array=0-6:2`): the shard is the task's place in the array,
    ///   `(ID - MIN) / STEP` of `SLURM_ARRAY_TASK_COUNT`, from `SLURM_ARRAY_TASK_MIN`,
    ///   `SLURM_ARRAY_TASK_MAX` and `SLURM_ARRAY_TASK_STEP` (Slurm sets all of them; for
    ///   `--array=0-6:2` the tasks are 0, 2, 4 and 6 with `COUNT=4`, `MIN=0`, `MAX=6`,
    ///   `STEP=2`, and take shards 0/4 to 3/4). Without `MIN`/`MAX`, the array must start at 0:
    ///   shard `ID` of `COUNT`. An array that is not an evenly spaced range (a list such as
    ///   `--array=1,2,5`) is refused: its tasks cannot be numbered from the variables alone.
    ///   `shards`, when given, must equal the array's count.
    /// - **Kubernetes Indexed Jobs** (`JOB_COMPLETION_INDEX` is set): shard
    ///   `JOB_COMPLETION_INDEX` of `shards`, which must be given (the Job's `completions`).
    ///
    /// Slurm's variables win when both are set.
    ///
    /// ```
    /// use rmboost::run::{Shard, ShardSource};
    ///
    /// // Task 4 of `sbatch --array=0-6:2` (tasks 0, 2, 4, 6):
    /// let slurm = |name: &str| match name {
    ///     "SLURM_ARRAY_TASK_ID" => Some("4".to_string()),
    ///     "SLURM_ARRAY_TASK_COUNT" => Some("4".to_string()),
    ///     "SLURM_ARRAY_TASK_MIN" => Some("0".to_string()),
    ///     "SLURM_ARRAY_TASK_MAX" => Some("6".to_string()),
    ///     "SLURM_ARRAY_TASK_STEP" => Some("2".to_string()),
    ///     _ => None,
    /// };
    /// let (shard, source) = Shard::from_scheduler_vars(None, slurm)?;
    /// assert_eq!((shard.index(), shard.count(), source), (2, 4, ShardSource::SlurmArray));
    ///
    /// // Pod 3 of a Kubernetes Indexed Job with `completions: 8`:
    /// let k8s = |name: &str| (name == "JOB_COMPLETION_INDEX").then(|| "3".to_string());
    /// let (shard, _) = Shard::from_scheduler_vars(Some(8), k8s)?;
    /// assert_eq!((shard.index(), shard.count()), (3, 8));
    /// assert!(Shard::from_scheduler_vars(None, k8s).is_err()); // the count is needed
    /// assert!(Shard::from_scheduler_vars(Some(4), |_| None).is_err()); // no scheduler
    /// # Ok::<(), rmboost::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`], naming the variables and their values, when:
    /// - neither `SLURM_ARRAY_TASK_ID` nor `JOB_COMPLETION_INDEX` is set;
    /// - a value is not a whole number (or a step is 0);
    /// - `shards` is `Some(0)`;
    /// - Slurm's variables disagree (the ID outside `MIN..=MAX` or off the step, a `COUNT`
    ///   that is not the range's), the array is not an evenly spaced range, or neither
    ///   `COUNT` nor `MIN`/`MAX` is set;
    /// - `shards` differs from the Slurm array's count;
    /// - `JOB_COMPLETION_INDEX` is set without `shards`, or is not below it.
    pub fn from_scheduler_vars(
        shards: Option<u32>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<(Shard, ShardSource), Error> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if shards == Some(0) {
            return Err(Error::config(
                "the number of shards must be at least 1, not 0",
            ));
        }
        if let Some(id) = var(SLURM_ID) {
            let shard = slurm_shard(&id, &var)?;
            if let Some(n) = shards.filter(|&n| n != shard.count) {
                return Err(Error::config(format!(
                    "{n} shards were asked for, but the Slurm array has {} tasks \
                     ({SLURM_ID}={id}, {}): give the array as many tasks as shards",
                    shard.count,
                    slurm_vars(&var),
                )));
            }
            return Ok((shard, ShardSource::SlurmArray));
        }
        if let Some(index) = var(K8S_INDEX) {
            let index = scheduler_number(K8S_INDEX, &index)?;
            let Some(count) = shards else {
                return Err(Error::config(format!(
                    "{K8S_INDEX}={index} (a Kubernetes Indexed Job) needs the number of shards \
                     given as well (`--shards N` on the command line: the Job's \
                     `completions`), as Kubernetes does not export it"
                )));
            };
            if index >= count {
                return Err(Error::config(format!(
                    "{K8S_INDEX}={index} is not below the {count} shards: the Job's \
                     `completions` and the number of shards must be the same"
                )));
            }
            return Ok((Shard { index, count }, ShardSource::KubernetesIndexedJob));
        }
        let hint = if var("SLURM_JOB_ID").is_some() {
            " (SLURM_JOB_ID is set: this Slurm job is not an array; submit it with \
             `sbatch --array=0-N`)"
        } else {
            ""
        };
        Err(Error::config(format!(
            "no shard from a scheduler: neither {SLURM_ID} (a Slurm job array task, \
             `sbatch --array`) nor {K8S_INDEX} (a Kubernetes Indexed Job pod) is set{hint}"
        )))
    }
}

impl fmt::Display for Shard {
    /// `I/N`, the form [`FromStr`](std::str::FromStr) reads back.
    ///
    /// ```
    /// use rmboost::run::Shard;
    ///
    /// let s = Shard::new(2, 4)?;
    /// assert_eq!(s.to_string(), "2/4");
    /// assert_eq!(s.to_string().parse::<Shard>()?, s);
    /// # Ok::<(), rmboost::Error>(())
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = Error;

    /// Parses `I/N` (0-based index `I` of `N` shards; spaces around the numbers are allowed).
    ///
    /// ```
    /// use rmboost::run::Shard;
    ///
    /// let s: Shard = " 1 / 4".parse()?;
    /// assert_eq!((s.index(), s.count()), (1, 4));
    /// assert!("4/4".parse::<Shard>().is_err());
    /// assert!("1/0".parse::<Shard>().is_err());
    /// assert!("x".parse::<Shard>().is_err());
    /// # Ok::<(), rmboost::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if `s` is not two numbers with
    /// `N >= 1` and `I < N`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::config(format!(
                "shard `{s}`: expected I/N with 0 <= I < N, e.g. 0/4"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index = i.trim().parse().map_err(|_| bad())?;
        let count = n.trim().parse().map_err(|_| bad())?;
        Shard::new(index, count).map_err(|_| bad())
    }
}

/// Where [`Shard::from_scheduler`] found the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShardSource {
    /// A task of a Slurm job array (`sbatch --array`): `SLURM_ARRAY_TASK_ID`.
    SlurmArray,
    /// A pod of a Kubernetes Indexed Job (`completionMode: Indexed`): `JOB_COMPLETION_INDEX`.
    KubernetesIndexedJob,
}

impl ShardSource {
    /// The environment variable the index came from.
    #[must_use]
    pub fn variable(self) -> &'static str {
        match self {
            ShardSource::SlurmArray => SLURM_ID,
            ShardSource::KubernetesIndexedJob => K8S_INDEX,
        }
    }
}

impl std::fmt::Display for ShardSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.variable())
    }
}

const SLURM_ID: &str = "SLURM_ARRAY_TASK_ID";
const SLURM_COUNT: &str = "SLURM_ARRAY_TASK_COUNT";
const SLURM_MIN: &str = "SLURM_ARRAY_TASK_MIN";
const SLURM_MAX: &str = "SLURM_ARRAY_TASK_MAX";
const SLURM_STEP: &str = "SLURM_ARRAY_TASK_STEP";
const K8S_INDEX: &str = "JOB_COMPLETION_INDEX";

/// A scheduler variable's value as a number.
fn scheduler_number(name: &str, value: &str) -> Result<u32, Error> {
    value.trim().parse().map_err(|_| {
        Error::config(format!(
            "{name}={value:?} is not a whole number (0 to {})",
            u32::MAX
        ))
    })
}

/// Slurm's array variables other than the ID, as `NAME=value` for messages.
fn slurm_vars(var: &dyn Fn(&str) -> Option<String>) -> String {
    let set: Vec<String> = [SLURM_COUNT, SLURM_MIN, SLURM_MAX, SLURM_STEP]
        .iter()
        .filter_map(|name| var(name).map(|v| format!("{name}={v}")))
        .collect();
    if set.is_empty() {
        format!("none of {SLURM_COUNT}, {SLURM_MIN}, {SLURM_MAX} set")
    } else {
        set.join(", ")
    }
}

/// The shard of a Slurm array task whose `SLURM_ARRAY_TASK_ID` is `id`.
fn slurm_shard(id: &str, var: &dyn Fn(&str) -> Option<String>) -> Result<Shard, Error> {
    let number = |name: &str| var(name).map(|v| scheduler_number(name, &v)).transpose();
    let id_value = scheduler_number(SLURM_ID, id)?;
    let (count, min, max) = (number(SLURM_COUNT)?, number(SLURM_MIN)?, number(SLURM_MAX)?);
    let step = number(SLURM_STEP)?.unwrap_or(1);
    let why = match (min, max, count) {
        _ if step == 0 => "a step of 0".to_string(),
        _ if count == Some(0) => "a count of 0".to_string(),
        (Some(min), Some(max), _) if min > max || id_value < min || id_value > max => {
            "the task ID is outside MIN..=MAX".to_string()
        }
        (Some(min), Some(max), _) if (id_value - min) % step != 0 || (max - min) % step != 0 => {
            "the task ID or MAX is not on the step from MIN".to_string()
        }
        (Some(min), Some(max), count) => {
            let span = (max - min) / step + 1;
            if count.is_none_or(|c| c == span) {
                return Ok(Shard {
                    index: (id_value - min) / step,
                    count: span,
                });
            }
            "the array is not an evenly spaced range (a list such as --array=1,2,5?); give it \
             as a range, --array=0-N or with a step, --array=0-N:S"
                .to_string()
        }
        (None, None, None) => format!(
            "the array's size is unknown: {SLURM_COUNT} or {SLURM_MIN} and {SLURM_MAX} must be set"
        ),
        (None, None, _) if step != 1 => {
            format!("a stepped array needs {SLURM_MIN} and {SLURM_MAX}")
        }
        (None, None, Some(count)) if id_value < count => {
            return Ok(Shard {
                index: id_value,
                count,
            })
        }
        (None, None, Some(_)) => format!(
            "the task ID is not below the count (without {SLURM_MIN}, the array must start at \
             0: --array=0-N)"
        ),
        _ => format!("{SLURM_MIN} and {SLURM_MAX} go together"),
    };
    Err(Error::config(format!(
        "the Slurm array variables do not make a shard ({SLURM_ID}={id}, {}): {why}",
        slurm_vars(var)
    )))
}

/// How many bad-line and duplicate messages a summary keeps.
pub(crate) const MAX_MESSAGES: usize = 20;

/// How a run ended; see [`RunSummary::outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// Every prompt of the input was taken (some examples may have failed: see
    /// [`Summary::failed`]).
    #[default]
    Completed,
    /// [`RunOptions::limit`] prompts were taken; others may remain for the next run.
    LimitReached,
    /// The [cost budget](RunOptions::max_cost) was reached: no new prompts were taken.
    CostLimit,
    /// The [`StopSignal`] was given (Ctrl-C).
    Interrupted,
    /// Calls kept failing to reach the server ([`RunOptions::stop_when_unreachable`]).
    Unreachable,
    /// The run ended with an error (the `Err` of [`run_to_file`]; the message is in
    /// [`RunSummary::message`] of the [`Progress`] snapshot).
    Failed,
}

impl Outcome {
    /// A short description (`"completed"`, `"stopped: cost budget reached"`, ...).
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::LimitReached => "stopped at the limit",
            Outcome::CostLimit => "stopped: cost budget reached",
            Outcome::Interrupted => "interrupted",
            Outcome::Unreachable => "stopped: the server is unreachable",
            Outcome::Failed => "failed",
        }
    }
}

/// Prices per million tokens, for a run's cost and its [budget](RunOptions::max_cost).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prices {
    input_per_million: f64,
    output_per_million: f64,
}

impl Prices {
    /// Prices per million input and output tokens.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if a price is negative or not finite.
    pub fn new(input_per_million: f64, output_per_million: f64) -> Result<Self, Error> {
        for (p, what) in [(input_per_million, "input"), (output_per_million, "output")] {
            if !(p.is_finite() && p >= 0.0) {
                return Err(Error::config(format!(
                    "the {what} price must be a number >= 0 per million tokens, not {p}"
                )));
            }
        }
        Ok(Prices {
            input_per_million,
            output_per_million,
        })
    }

    /// Price of a million prompt (input) tokens.
    #[must_use]
    pub fn input_per_million(&self) -> f64 {
        self.input_per_million
    }

    /// Price of a million completion (output) tokens.
    #[must_use]
    pub fn output_per_million(&self) -> f64 {
        self.output_per_million
    }

    /// The cost of `usage`.
    #[must_use]
    pub fn cost(&self, usage: Usage) -> f64 {
        (usage.prompt_tokens as f64 * self.input_per_million
            + usage.completion_tokens as f64 * self.output_per_million)
            / 1e6
    }
}

/// A cost budget: [`Prices`] and the most a run may spend at them ([`RunOptions::max_cost`]).
///
/// ```
/// use rmboost::run::{CostBudget, Prices};
///
/// let prices = Prices::new(0.15, 0.60)?;
/// assert_eq!(CostBudget::new(prices, 2.5)?.max(), 2.5);
/// for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
///     assert!(CostBudget::new(prices, bad).is_err());
/// }
/// # Ok::<(), rmboost::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostBudget {
    prices: Prices,
    max: f64,
}

impl CostBudget {
    /// At most `max` (in the prices' currency) at `prices`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] saying the amount, for zero, a negative amount, NaN or infinity.
    pub fn new(prices: Prices, max: f64) -> Result<Self, Error> {
        check_max_cost(max)?;
        Ok(CostBudget { prices, max })
    }

    /// The most the run may spend.
    #[must_use]
    pub fn max(&self) -> f64 {
        self.max
    }
}

/// Checks a cost budget: a positive, finite amount.
pub(crate) fn check_max_cost(max: f64) -> Result<(), Error> {
    if max.is_finite() && max > 0.0 {
        Ok(())
    } else {
        Err(Error::config(format!(
            "the cost budget must be a positive amount, not {max}"
        )))
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The totals of a run; see [`run_to_file`]. Serialises to JSON (durations in seconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RunSummary {
    /// How the run ended.
    pub outcome: Outcome,
    /// Why it stopped, for [`Outcome::Unreachable`] and [`Outcome::Failed`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
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
    /// Examples in flight dropped when the drain deadline passed or the run was aborted.
    pub dropped_in_flight: u64,
    /// Ids found in the output when the run started.
    pub resumed: u64,
    /// Bytes of a torn last line cut from the output when it was opened.
    pub torn_bytes: u64,
    /// Unreadable lines found inside the output when it was opened and moved to
    /// `<output>.garbage`.
    pub garbage_lines: u64,
    /// Ids left in the failure ledger after the run (still failing).
    pub ledger_pending: u64,
    /// Backend calls counted by the [meter](RunOptions::meter) (re-asks and failed examples
    /// included), if there is one.
    pub calls: u64,
    /// Tokens counted by the meter (else those of the examples written).
    pub usage: Usage,
    /// The cost of [`usage`](Self::usage) at the [budget](RunOptions::max_cost)'s prices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// Whether the run was stopped by its [`StopSignal`] before the input ran out.
    pub interrupted: bool,
    /// Whether the output file was removed at the end because this run created it and wrote
    /// nothing to it.
    pub output_removed: bool,
    /// Wall time of the run.
    #[serde(serialize_with = "secs")]
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
        for (n, what) in [
            (self.other_shard, "in other shards"),
            (self.dropped_in_flight, "dropped in flight"),
            (self.ledger_pending, "still failing (ledger)"),
        ] {
            if n > 0 {
                write!(f, ", {n} {what}")?;
            }
        }
        write!(
            f,
            "; {:.1}s, {:.1} examples/s; {}",
            self.elapsed.as_secs_f64(),
            self.examples_per_sec(),
            self.outcome.describe()
        )?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
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
        lock(&self.inner).clone()
    }
}

/// The settings a dataset was made with, recorded beside the output
/// (`PAIRS.run.json` beside `PAIRS.jsonl`, see [`Recipe::default_path`]) so that a rerun
/// with other settings cannot append rows of another shape or recipe to it.
///
/// The output format is always part of it; add whatever else changes the rows (method, seed,
/// aspects, labels, template, models). On resume, every setting named both in the file and
/// in this run must have the same value, or the run is refused with a message naming each
/// difference. A setting named on one side only is not compared.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    settings: std::collections::BTreeMap<String, String>,
}

impl Recipe {
    /// An empty recipe (only the format is recorded).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) one setting.
    #[must_use]
    pub fn with(mut self, name: impl Into<String>, value: impl fmt::Display) -> Self {
        self.settings.insert(name.into(), value.to_string());
        self
    }

    /// The value of a setting.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.settings.get(name).map(String::as_str)
    }

    /// Where the recipe of `output` is kept: `PAIRS.run.json` beside `PAIRS.jsonl` (or
    /// `OUT.run.json` beside a file without the `.jsonl` extension).
    #[must_use]
    pub fn default_path(output: &Path) -> PathBuf {
        sidecar(output, ".run.json")
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
    input: Option<PathBuf>,
    recipe: Option<Recipe>,
    pub(crate) drain_deadline: Option<Duration>,
    limit: Option<u64>,
    pub(crate) stop: StopSignal,
    progress: Option<Progress>,
    pub(crate) meter: Option<CallMeter>,
    pub(crate) budget: Option<(Prices, f64)>,
    unreachable_after: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// The default of [`RunOptions::drain_deadline`].
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// The default of [`RunOptions::stop_when_unreachable`].
pub const DEFAULT_UNREACHABLE_AFTER: u64 = 16;

/// How many examples in a row may fail to reach the server before a run with `concurrency`
/// examples in flight stops ([`RunOptions::stop_when_unreachable`]): as many as run at once,
/// and at least 3. A server that goes away fails every example in flight together, so one
/// such round says it is gone; fewer than 3 would stop a run at a single unlucky example.
/// The command line and the Python package use it.
///
/// ```
/// assert_eq!(rmboost::run::unreachable_after(64), 64);
/// assert_eq!(rmboost::run::unreachable_after(1), 3);
/// ```
#[must_use]
pub fn unreachable_after(concurrency: usize) -> u64 {
    u64::try_from(concurrency).unwrap_or(u64::MAX).max(3)
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
            input: None,
            recipe: None,
            drain_deadline: Some(DEFAULT_DRAIN_DEADLINE),
            limit: None,
            stop: StopSignal::new(),
            progress: None,
            meter: None,
            budget: None,
            unreachable_after: Some(DEFAULT_UNREACHABLE_AFTER),
        }
    }

    setters! {
        /// The output format. Default: [`ExampleFormat::Conversational`].
        format(format: ExampleFormat) => format = format;
        /// When the output and ledger are synced to disk. Default: [`SyncPolicy::default`].
        sync(sync: SyncPolicy) => sync = sync;
        /// What to do with examples already in the output. Default: [`ExistingOutput::Resume`].
        existing(existing: ExistingOutput) => existing = existing;
        /// What to do with a bad input line. Default: [`BadLinePolicy::Skip`].
        bad_lines(policy: BadLinePolicy) => bad_lines = policy;
        /// Only generate the ids of this shard. Default: all ids.
        shard(shard: Shard) => shard = Some(shard);
        /// The failure ledger's path. Default: [`FailureLedger::default_path`] of the output
        /// (`PAIRS.failures.jsonl` beside `PAIRS.jsonl`).
        ledger(path: impl Into<PathBuf>) => ledger = Some(path.into());
        /// The input file the prompts come from, so the run can refuse an output, ledger or
        /// recipe that is the same file (see [`ensure_distinct_files`]). Default: not known.
        input(path: impl Into<PathBuf>) => input = Some(path.into());
        /// The settings the rows are made with, recorded beside the output and checked on
        /// resume (see [`Recipe`]). Default: only the format is recorded and checked.
        recipe(recipe: Recipe) => recipe = Some(recipe);
        /// After a stop, how long to wait for the examples in flight before dropping them (they
        /// are generated again by the next run); `None` waits for them all. Default:
        /// [`DEFAULT_DRAIN_DEADLINE`] (60 s).
        drain_deadline(deadline: Option<Duration>) => drain_deadline = deadline;
        /// Hand at most `limit` prompts to the generator in this run. Default: no limit.
        limit(limit: u64) => limit = Some(limit);
        /// The signal that stops the run. Default: a signal nobody else holds.
        stop_signal(stop: StopSignal) => stop = stop;
        /// A view updated after every result. Default: none.
        progress(progress: Progress) => progress = Some(progress);
        /// The meter of the backend (see [`Metered`](crate::backend::meter::Metered)): the
        /// summary then counts every call and token the provider bills (re-asks and failed
        /// examples included), and the [budget](Self::max_cost) uses it. Default: none (the
        /// summary counts the tokens of the examples written).
        meter(meter: CallMeter) => meter = Some(meter);
        /// A cost budget: once the metered usage costs the budget's most or more at its prices,
        /// the run takes no new prompts, finishes the examples in flight and ends with
        /// [`Outcome::CostLimit`]. Needs a [meter](Self::meter) (a batch run has its own);
        /// checked after every result and every 100 ms. Default: none.
        max_cost(budget: CostBudget) => budget = Some((budget.prices, budget.max));
        /// Stop the run (gracefully, with [`Outcome::Unreachable`]) once this many examples in a
        /// row failed because the server could not be reached or timed out (after the backend's
        /// own retries), instead of failing every remaining prompt the same way; `None` never
        /// stops. Default: [`DEFAULT_UNREACHABLE_AFTER`] (16).
        stop_when_unreachable(after: Option<u64>) => unreachable_after = after;
    }
}

/// Checks the recipe recorded beside the output against this run's, or records it.
/// Returns whether this run created the recipe file.
fn check_recipe(
    path: &Path,
    output: &Path,
    recipe: &Recipe,
    has_examples: bool,
) -> Result<bool, Error> {
    let recorded: Option<Recipe> = if_exists(path, std::fs::read)?
        .map(|bytes| serde_json::from_slice(&bytes))
        .transpose()
        .map_err(|e| {
            Error::parse(
                path,
                e.line() as u64,
                format!("not a run recipe ({e}); remove it to record this run's settings"),
            )
        })?;
    if has_examples {
        // An output from before recipes were recorded: only the shape of its rows is known.
        let old = recorded.clone().unwrap_or_else(|| {
            let format = first_line_format(output);
            format.map_or_else(Recipe::new, |f| Recipe::new().with("format", f.as_str()))
        });
        let diffs: Vec<String> = (old.settings.iter())
            .filter_map(|(k, old)| match recipe.settings.get(k) {
                Some(new) if new != old => Some(format!("{k} was `{old}`, now `{new}`")),
                _ => None,
            })
            .collect();
        if !diffs.is_empty() {
            return Err(Error::config(format!(
                "{} holds examples made with other settings ({}): rerun with the same settings \
                 to resume it, write to a new output file, or overwrite it",
                output.display(),
                diffs.join("; ")
            )));
        }
    }
    // Kept when examples were made with it, or when it is this run's already.
    if recorded
        .as_ref()
        .is_some_and(|r| has_examples || r == recipe)
    {
        return Ok(false);
    }
    let mut json = serde_json::to_vec_pretty(recipe).expect("a recipe serialises");
    json.push(b'\n');
    write_replacing(path, &json)?;
    Ok(recorded.is_none())
}

/// The format of the first non-blank line of a file (read from at most 1 MiB of it).
fn first_line_format(path: &Path) -> Option<ExampleFormat> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut reader = BufReader::new(file.take(1 << 20));
    let mut line = Vec::new();
    crate::io::line::next_nonblank_line(&mut reader, &mut line).ok()?;
    ExampleFormat::of_line(&line)
}

/// The non-blank lines of a file (one line in memory at a time).
fn count_lines(path: &Path) -> Option<u64> {
    let mut reader = BufReader::with_capacity(1 << 16, std::fs::File::open(path).ok()?);
    let (mut lines, mut line) = (0, Vec::new());
    while crate::io::line::next_nonblank_line(&mut reader, &mut line).ok()? {
        lines += 1;
    }
    Some(lines)
}

/// How many examples a run with `options` into `output` is expected to write, for a progress
/// bar's total: the non-blank lines of the [input](RunOptions::input), divided among the
/// [shards](RunOptions::shard), less the lines already in the output (unless it is
/// [overwritten](ExistingOutput::Overwrite)), and at most the [limit](RunOptions::limit).
/// An estimate: bad lines, duplicates and failures are not foreseen. `None` when no input
/// was given or it cannot be read.
///
/// ```
/// use rmboost::run::{expected_examples, RunOptions, Shard};
///
/// let dir = tempfile::tempdir().unwrap();
/// let input = dir.path().join("prompts.jsonl");
/// std::fs::write(&input, "{\"prompt\": \"a\"}\n\n{\"prompt\": \"b\"}\n{\"prompt\": \"c\"}\n").unwrap();
/// let out = dir.path().join("pairs.jsonl");
/// assert_eq!(expected_examples(&out, &RunOptions::new()), None);
/// let options = RunOptions::new().input(&input);
/// assert_eq!(expected_examples(&out, &options), Some(3));
/// assert_eq!(expected_examples(&out, &options.clone().limit(2)), Some(2));
/// assert_eq!(expected_examples(&out, &options.shard(Shard::new(0, 2)?)), Some(2));
/// # Ok::<(), rmboost::Error>(())
/// ```
#[must_use]
pub fn expected_examples(output: impl AsRef<Path>, options: &RunOptions) -> Option<u64> {
    let mut todo = count_lines(options.input.as_deref()?)?;
    if let Some(shard) = options.shard {
        todo = todo.div_ceil(u64::from(shard.count));
    }
    if options.existing != ExistingOutput::Overwrite {
        todo = todo.saturating_sub(count_lines(output.as_ref()).unwrap_or(0));
    }
    Some(options.limit.map_or(todo, |l| todo.min(l)))
}

/// Runs a generation into the JSONL file `output`; see the [module docs](self).
///
/// `generate` turns the filtered stream of prompts into a stream of results (for
/// [`RmBoost`](crate::RmBoost): `|p| rmb.try_generate(p)`), so any generator with that shape
/// (a baseline, a wrapper) can be run. `prompts` is pulled lazily, only as fast as the
/// generator takes prompts; for a file use
/// `rmboost::read_prompts(path)?.into_stream()`, which reads on a thread of its own.
///
/// # Errors
///
/// - [`ErrorKind::Config`] if two of the files are the same file
///   ([`ensure_distinct_files`]), if the output holds examples made with another
///   [`Recipe`] or [`ExistingOutput::Fail`] was asked, or if a cost budget has no meter;
/// - [`ErrorKind::Io`] if the output or ledger cannot be opened (a
///   file locked by another run included), read or written;
/// - [`ErrorKind::Parse`] for a bad line under
///   [`BadLinePolicy::Stop`], and the reader's I/O error if reading the input fails, after
///   the examples in flight are written;
/// - a fatal error of the generator ([`Error::is_fatal`]: a bad key, an exhausted quota),
///   at once (examples in flight are dropped; the error is not written to the ledger, since
///   it is not about the example).
///
/// In every case the files are left valid, the examples finished so far are written, and
/// the totals so far are in the [`Progress`] given in the options (with
/// [`Outcome::Failed`] and the error's message).
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
    let (output, progress) = (
        output.as_ref(),
        options.progress.clone().unwrap_or_default(),
    );
    // The totals live in `live` (the `Progress`) from the start of the loop.
    let live = &progress.inner;
    let result: Result<RunSummary, Error> = async {
        let started = Instant::now();
        let ledger_path = options
            .ledger
            .clone()
            .unwrap_or_else(|| FailureLedger::default_path(output));
        let recipe_path = Recipe::default_path(output);
        let mut files = vec![
            ("output", output),
            ("failure ledger", ledger_path.as_path()),
            ("run recipe", recipe_path.as_path()),
        ];
        files.extend(options.input.as_deref().map(|input| ("input", input)));
        ensure_distinct_files(&files)?;
        // The budget itself was checked by `CostBudget::new`.
        if options.budget.is_some() && options.meter.is_none() {
            return Err(Error::config(
                "a cost budget needs the backend's meter (RunOptions::meter)",
            ));
        }
        let recipe = options
            .recipe
            .clone()
            .unwrap_or_default()
            .with("format", options.format.as_str());

        let mut out = OutputFile::open(output, options.format, options.sync)?;
        if options.existing == ExistingOutput::Overwrite {
            out.file.truncate()?;
            remove_if_exists(&ledger_path)?;
        }
        let resume = Resume::scan(output)?;
        if options.existing == ExistingOutput::Fail && resume.lines() > 0 {
            return Err(Error::config(format!(
                "{} already has {} lines; resume or overwrite it",
                output.display(),
                resume.lines()
            )));
        }
        let summary = RunSummary {
            torn_bytes: out.torn_bytes(),
            resumed: resume.len() as u64,
            garbage_lines: match resume.unreadable() {
                0 => 0,
                _ => out.set_aside_unreadable()?,
            },
            ..RunSummary::default()
        };
        let has_examples = resume.lines() > resume.unreadable();
        let recipe_created = check_recipe(&recipe_path, output, &recipe, has_examples)?;
        tracing::info!(
            path = %output.display(),
            resumed = summary.resumed,
            torn_bytes = summary.torn_bytes,
            garbage_lines = summary.garbage_lines,
            "run starting"
        );
        *lock(live) = summary;

        // The ids the ledger must keep at the end: those of earlier runs not done yet, and those
        // failing in this one, less those this run writes (memory only for failed ids).
        let done = resume.into_ids();
        let mut pending = IdSet::new();
        for record in FailureLedger::read(&ledger_path)?.iter().filter(|r| !done.contains(&r.id)) {
            pending.insert(&record.id);
        }

        // What becomes of each input item: the generator gets it (`Some(Some)`), it is passed
        // over (`Some(None)`), or the input ends there (`None`).
        let stop = &options.stop;
        let stop_error = Arc::new(Mutex::new(None));
        let (shard, policy, limit) = (options.shard, options.bad_lines, options.limit);
        let (filter_live, filter_error) = (live.clone(), stop_error.clone());
        let mut seen = IdSet::new();
        let mut admit = move |item: Result<Prompt, Error>| {
            let s = &mut *lock(&filter_live);
            let prompt = match item {
                Ok(_) if limit.is_some_and(|l| s.scheduled >= l) => return None,
                Ok(p) => p,
                Err(e) => {
                    if e.kind() == ErrorKind::Parse {
                        s.bad_lines += 1;
                        tracing::warn!(error = %e, "bad input line");
                        if s.bad_line_messages.len() < MAX_MESSAGES {
                            s.bad_line_messages.push(e.to_string());
                        }
                        if policy == BadLinePolicy::Skip {
                            return Some(None);
                        }
                    }
                    // A bad line under `BadLinePolicy::Stop`, or reading itself failed: nothing
                    // after it can be trusted.
                    *lock(&filter_error) = Some(e);
                    return None;
                }
            };
            s.read += 1;
            let hash = IdHash::of(&prompt.id);
            if shard.is_some_and(|sh| hash.shard(sh.count) != sh.index) {
                s.other_shard += 1;
            } else if !seen.insert(hash) {
                s.duplicates += 1;
                tracing::warn!(id = %prompt.id, "duplicate id in the input: keeping the first");
                if s.duplicate_ids.len() < MAX_MESSAGES {
                    s.duplicate_ids.push(prompt.id);
                }
            } else if done.contains(hash) {
                s.skipped_done += 1;
            } else {
                s.scheduled += 1;
                return Some(Some(prompt));
            }
            Some(None)
        };
        let filtered = prompts
            .take_until(stop.wait())
            .scan((), move |(), item| future::ready(admit(item)))
            .filter_map(|prompt| future::ready(prompt.map(Ok)))
            .boxed();

        let budget = options.budget;
        let metered = |s: &mut RunSummary| {
            (s.calls, s.usage) = match &options.meter {
                Some(m) => (m.calls(), m.usage()),
                None => (s.generation.calls, s.generation.usage),
            };
            s.cost = budget.map(|(prices, _)| prices.cost(s.usage));
        };
        let mut results = Box::pin(generate(filtered));
        let mut ledger: Option<FailureLedger> = None;
        let (mut in_a_row, mut received, mut stop_seen) = (0, 0u64, false);
        let mut deadline = pin!(future::Fuse::<tokio::time::Sleep>::terminated());
        let mut cost_tick = tokio::time::interval(Duration::from_millis(100));
        cost_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // `Err`: the output or the ledger failed; `Ok(Some)`: the generator's fatal error.
        let ended: Result<Option<Error>, Error> = async {
            loop {
                tokio::select! {
                    biased;
                    () = stop.abort.wait() => {
                        tracing::warn!("stopping now: dropping the examples in flight");
                        break;
                    }
                    item = results.next() => {
                        let Some(item) = item else { break };
                        received += 1;
                        // Examples in a row that failed to reach the server.
                        let unreachable = item.as_ref().err().and_then(Error::backend_error).filter(|e| {
                            matches!(e.kind(), BackendErrorKind::Connection | BackendErrorKind::Timeout)
                        });
                        in_a_row = if unreachable.is_some() { in_a_row + 1 } else { 0 };
                        if let Some(e) = unreachable.filter(|_| options.unreachable_after == Some(in_a_row)) {
                            let message = format!(
                                "the model server is unreachable ({in_a_row} calls in a row failed): {}",
                                crate::error_chain(e)
                            );
                            tracing::info!(%message, "stopping the run");
                            stop.stop_with(Outcome::Unreachable, Some(message));
                        }
                        if let Ok(example) = &item {
                            out.write(example)?;
                            pending.remove(&example.id);
                        }
                        lock(live).generation.record(&item);
                        // (No `continue` past the budget check below on success.)
                        if let Err(e) = item {
                            let chain = crate::error_chain(&e);
                            if e.is_fatal() {
                                // Returned to the caller, who reports it: not logged twice.
                                tracing::debug!(error = %chain, "fatal error: stopping the run");
                                return Ok(Some(e));
                            }
                            tracing::warn!(error = %chain, "example failed");
                            if let Some(id) = e.example_id() {
                                pending.insert(id);
                                let l = match &mut ledger {
                                    Some(l) => l,
                                    None => ledger.insert(FailureLedger::open(&ledger_path, options.sync)?),
                                };
                                l.record(id, &e)?;
                            }
                        }
                    }
                    _ = cost_tick.tick(), if budget.is_some() => {}
                    () = stop.wait(), if !stop_seen => {
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
                let s = &mut *lock(live);
                metered(s);
                let spent = matches!((budget, s.cost), (Some((_, max)), Some(cost)) if cost >= max);
                if spent && stop.reason().is_none() {
                    tracing::warn!(cost = ?s.cost, "cost budget reached: finishing the examples in flight");
                    stop.stop_with(Outcome::CostLimit, None);
                }
            }
            Ok(None)
        }
        .await;
        // Dropping the stream cancels whatever is still in flight.
        drop(results);

        let closed = ledger.map_or(Ok(()), FailureLedger::close);
        // Compacted while the output's lock is still held: no other run can append meanwhile.
        let compacted = FailureLedger::compact(&ledger_path, &pending);
        let removed = out.file.remove_if_created_and_empty().and_then(|removed| {
            if removed && recipe_created {
                remove_if_exists(&recipe_path)?;
            }
            Ok(removed)
        });
        let stopped_by = stop.reason();
        let summary = {
            let s = &mut *lock(live);
            metered(s);
            s.dropped_in_flight = s.scheduled.saturating_sub(received);
            s.interrupted = stop.is_stopped() && stopped_by.is_none();
            s.ledger_pending = *compacted.as_ref().unwrap_or(&0);
            s.output_removed = *removed.as_ref().unwrap_or(&false);
            (s.outcome, s.message) = match stopped_by {
                Some(reason) => reason,
                None if s.interrupted => (Outcome::Interrupted, None),
                None if limit.is_some_and(|l| s.scheduled >= l) => (Outcome::LimitReached, None),
                None => (Outcome::Completed, None),
            };
            s.elapsed = started.elapsed();
            s.clone()
        };
        tracing::info!(%summary, "run finished");
        let (io_error, fatal) = ended.map_or_else(|e| (Some(e), None), |fatal| (None, fatal));
        io_error
            .or(closed.err())
            .or(compacted.err())
            .or(removed.err())
            .or(fatal)
            .or_else(|| lock(&stop_error).take())
            .map_or(Ok(summary), Err)
    }
    .await;
    if let Err(e) = &result {
        let mut s = lock(live);
        s.outcome = Outcome::Failed;
        s.message = Some(crate::error_chain(e));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variables of `pairs` as [`Shard::from_scheduler_vars`] reads them.
    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn shard(
        shards: Option<u32>,
        pairs: &[(&str, &str)],
    ) -> Result<(u32, u32, ShardSource), String> {
        Shard::from_scheduler_vars(shards, env(pairs))
            .map(|(s, src)| (s.index(), s.count(), src))
            .map_err(|e| {
                assert_eq!(e.kind(), ErrorKind::Config);
                e.to_string()
            })
    }

    /// The variables Slurm 22.05 sets for each task of `sbatch --array=SPEC` (seen on a real
    /// cluster by `scripts/slurm-test.sh`'s `SLURM_TEST_PROBE`).
    fn slurm(id: u32, count: u32, min: u32, max: u32, step: u32) -> Vec<(&'static str, String)> {
        vec![
            (SLURM_ID, id.to_string()),
            (SLURM_COUNT, count.to_string()),
            (SLURM_MIN, min.to_string()),
            (SLURM_MAX, max.to_string()),
            (SLURM_STEP, step.to_string()),
            ("SLURM_ARRAY_JOB_ID", "17".to_string()),
            ("SLURM_JOB_ID", "18".to_string()),
        ]
    }

    fn refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        v.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    const SLURM: ShardSource = ShardSource::SlurmArray;
    const K8S: ShardSource = ShardSource::KubernetesIndexedJob;

    #[test]
    fn slurm_array_from_zero_each_task_takes_its_shard() {
        // sbatch --array=0-3
        for id in 0..4 {
            let vars = slurm(id, 4, 0, 3, 1);
            assert_eq!(shard(None, &refs(&vars)), Ok((id, 4, SLURM)));
            assert_eq!(shard(Some(4), &refs(&vars)), Ok((id, 4, SLURM)));
        }
    }

    #[test]
    fn slurm_array_not_from_zero_is_numbered_from_min() {
        // sbatch --array=3-5
        let got: Vec<_> = (3..=5)
            .map(|id| shard(None, &refs(&slurm(id, 3, 3, 5, 1))).unwrap())
            .collect();
        assert_eq!(got, vec![(0, 3, SLURM), (1, 3, SLURM), (2, 3, SLURM)]);
    }

    #[test]
    fn slurm_stepped_array_takes_dense_shards() {
        // sbatch --array=0-6:2 (and 0-7:2, for which Slurm also sets MAX=6): tasks 0, 2, 4, 6.
        let got: Vec<_> = [0, 2, 4, 6]
            .iter()
            .map(|&id| shard(Some(4), &refs(&slurm(id, 4, 0, 6, 2))).unwrap())
            .collect();
        assert_eq!(
            got,
            vec![(0, 4, SLURM), (1, 4, SLURM), (2, 4, SLURM), (3, 4, SLURM)]
        );
        // sbatch --array=1-7:3: tasks 1, 4, 7.
        assert_eq!(shard(None, &refs(&slurm(7, 3, 1, 7, 3))), Ok((2, 3, SLURM)));
    }

    #[test]
    fn slurm_with_only_id_and_count_or_only_min_max() {
        let only_count = [(SLURM_ID, "2"), (SLURM_COUNT, "4")];
        assert_eq!(shard(None, &only_count), Ok((2, 4, SLURM)));
        let only_range = [(SLURM_ID, "6"), (SLURM_MIN, "5"), (SLURM_MAX, "8")];
        assert_eq!(shard(None, &only_range), Ok((1, 4, SLURM)));
        // Spaces around the numbers are tolerated; empty values are unset.
        let spaced = [
            (SLURM_ID, " 1 "),
            (SLURM_COUNT, "2\n"),
            (SLURM_MIN, ""),
            (SLURM_MAX, ""),
        ];
        assert_eq!(shard(None, &spaced), Ok((1, 2, SLURM)));
    }

    #[test]
    fn slurm_list_arrays_and_inconsistent_values_are_refused() {
        // sbatch --array=1,2,5: Slurm sets COUNT=3, MIN=1, MAX=5, STEP=1.
        let e = shard(None, &refs(&slurm(5, 3, 1, 5, 1))).unwrap_err();
        assert!(e.contains("not an evenly spaced range"), "{e}");
        assert!(e.contains("SLURM_ARRAY_TASK_ID=5"), "{e}");
        assert!(e.contains("SLURM_ARRAY_TASK_COUNT=3"), "{e}");
        // ID outside the range, off the step, count 0, a step of 0.
        for (vars, why) in [
            (slurm(9, 4, 0, 3, 1), "outside MIN..=MAX"),
            (slurm(3, 4, 0, 6, 2), "not on the step"),
            (slurm(0, 0, 0, 3, 1), "a count of 0"),
            (slurm(0, 4, 0, 3, 0), "a step of 0"),
            (slurm(2, 4, 3, 1, 1), "outside MIN..=MAX"),
        ] {
            let e = shard(None, &refs(&vars)).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
        let e = shard(None, &[(SLURM_ID, "4"), (SLURM_COUNT, "4")]).unwrap_err();
        assert!(e.contains("start at 0"), "{e}");
        let e = shard(None, &[(SLURM_ID, "1")]).unwrap_err();
        assert!(e.contains("SLURM_ARRAY_TASK_COUNT"), "{e}");
        let e = shard(None, &[(SLURM_ID, "1"), (SLURM_MIN, "0")]).unwrap_err();
        assert!(e.contains("go together"), "{e}");
    }

    #[test]
    fn non_numbers_are_refused_naming_the_variable() {
        let e = shard(None, &[(SLURM_ID, "x"), (SLURM_COUNT, "4")]).unwrap_err();
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID=\"x\" is not a whole number"),
            "{e}"
        );
        let e = shard(None, &[(SLURM_ID, "1"), (SLURM_COUNT, "-4")]).unwrap_err();
        assert!(e.contains("SLURM_ARRAY_TASK_COUNT=\"-4\""), "{e}");
        let e = shard(Some(4), &[(K8S_INDEX, "1.0")]).unwrap_err();
        assert!(e.contains("JOB_COMPLETION_INDEX=\"1.0\""), "{e}");
    }

    #[test]
    fn shards_must_agree_with_slurm_and_be_positive() {
        let vars = slurm(1, 4, 0, 3, 1);
        let e = shard(Some(8), &refs(&vars)).unwrap_err();
        assert!(e.contains("8 shards were asked for"), "{e}");
        assert!(e.contains("has 4 tasks"), "{e}");
        let e = shard(Some(0), &refs(&vars)).unwrap_err();
        assert!(e.contains("at least 1"), "{e}");
        let e = shard(Some(0), &[(K8S_INDEX, "0")]).unwrap_err();
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn kubernetes_indexed_job_needs_the_count() {
        assert_eq!(shard(Some(8), &[(K8S_INDEX, "7")]), Ok((7, 8, K8S)));
        assert_eq!(shard(Some(1), &[(K8S_INDEX, "0")]), Ok((0, 1, K8S)));
        let e = shard(None, &[(K8S_INDEX, "3")]).unwrap_err();
        assert!(
            e.contains("JOB_COMPLETION_INDEX=3") && e.contains("--shards N"),
            "{e}"
        );
        let e = shard(Some(4), &[(K8S_INDEX, "4")]).unwrap_err();
        assert!(
            e.contains("JOB_COMPLETION_INDEX=4 is not below the 4 shards"),
            "{e}"
        );
    }

    #[test]
    fn slurm_wins_over_kubernetes() {
        let mut vars = slurm(2, 4, 0, 3, 1);
        vars.push((K8S_INDEX, "0".to_string()));
        assert_eq!(shard(Some(4), &refs(&vars)), Ok((2, 4, SLURM)));
    }

    #[test]
    fn no_scheduler_names_both_variables() {
        let e = shard(Some(4), &[]).unwrap_err();
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID") && e.contains("JOB_COMPLETION_INDEX"),
            "{e}"
        );
        assert!(!e.contains("not an array"), "{e}");
        // A Slurm job that is not an array says so.
        let e = shard(None, &[("SLURM_JOB_ID", "12")]).unwrap_err();
        assert!(e.contains("not an array"), "{e}");
        // Empty values count as unset.
        let e = shard(None, &[(SLURM_ID, ""), (K8S_INDEX, " ")]).unwrap_err();
        assert!(e.contains("no shard from a scheduler"), "{e}");
    }

    #[test]
    fn counts_non_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines.jsonl");
        std::fs::write(&path, b"a\n\n  \nb\nc").unwrap();
        assert_eq!(count_lines(&path), Some(3));
        assert_eq!(count_lines(&dir.path().join("none")), None);
    }

    #[test]
    fn source_names_its_variable() {
        assert_eq!(SLURM.to_string(), "SLURM_ARRAY_TASK_ID");
        assert_eq!(K8S.variable(), "JOB_COMPLETION_INDEX");
    }
}
