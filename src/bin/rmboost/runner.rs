//! The run loop behind `rmboost generate`: resume, filter, generate, append, ledger, stop.
//!
//! Kept to the shape of a library run-to-file function (a generator closure, a prompt stream,
//! an output path, options with a stop signal and a live progress view) so that it can be
//! replaced by the library's own when that lands.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future;
use futures::stream::{BoxStream, Stream, StreamExt};
use rmboost::{Error, ExampleFormat, PreferenceExample, Prompt, Summary};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

/// A cloneable "please stop" flag that can be awaited.
#[derive(Debug, Clone, Default)]
pub(crate) struct StopSignal {
    inner: Arc<(AtomicBool, Notify)>,
}

impl StopSignal {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn stop(&self) {
        self.inner.0.store(true, Ordering::SeqCst);
        self.inner.1.notify_waiters();
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.inner.0.load(Ordering::SeqCst)
    }

    /// Completes once the signal is given.
    pub(crate) fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            loop {
                let notified = inner.1.notified();
                if inner.0.load(Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        }
    }
}

/// What to do with an input line that is not a prompt record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum BadLinePolicy {
    #[default]
    Skip,
    Stop,
}

/// Shard `index` of `count`: an id belongs to shard
/// `u64::from_le_bytes(sha256("rmboost/id/v1\0" + id)[..8]) % count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shard {
    pub(crate) index: u32,
    pub(crate) count: u32,
}

impl Shard {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: expected I/N, e.g. 0/4"))?;
        let index: u32 = i
            .trim()
            .parse()
            .map_err(|_| format!("`{i}` is not a number"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("`{n}` is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("{index}/{count}: need N >= 1 and 0 <= I < N"));
        }
        Ok(Shard { index, count })
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        let mut h = Sha256::new();
        h.update(b"rmboost/id/v1\0");
        h.update(id.as_bytes());
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        u64::from_le_bytes(first) % u64::from(self.count) == u64::from(self.index)
    }
}

/// How many bad-line messages a summary keeps.
const MAX_MESSAGES: usize = 20;

/// The totals of a run.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunSummary {
    pub(crate) generation: Summary,
    pub(crate) read: u64,
    pub(crate) bad_lines: u64,
    pub(crate) bad_line_messages: Vec<String>,
    pub(crate) skipped_done: u64,
    pub(crate) duplicates: u64,
    pub(crate) other_shard: u64,
    pub(crate) scheduled: u64,
    pub(crate) resumed: u64,
    pub(crate) torn_bytes: u64,
    pub(crate) ledger_pending: u64,
    pub(crate) interrupted: bool,
    pub(crate) elapsed: Duration,
}

/// A live view of a run's totals.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    inner: Arc<Mutex<RunSummary>>,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn snapshot(&self) -> RunSummary {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, RunSummary> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Settings of [`run_to_file`].
#[derive(Debug, Clone)]
pub(crate) struct RunOptions {
    pub(crate) format: ExampleFormat,
    pub(crate) overwrite: bool,
    pub(crate) bad_lines: BadLinePolicy,
    pub(crate) shard: Option<Shard>,
    pub(crate) ledger: PathBuf,
    pub(crate) limit: Option<u64>,
    pub(crate) stop: StopSignal,
    pub(crate) progress: Progress,
}

/// The default ledger path: `PAIRS.failures.jsonl` beside `PAIRS.jsonl`.
pub(crate) fn default_ledger(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    output.with_file_name(format!("{stem}.failures.jsonl"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Option<serde_json::Value>,
}

fn id_of(line: &[u8]) -> Option<String> {
    match serde_json::from_slice::<IdOnly>(line).ok()?.id? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads the ids of an output (or ledger) file; cuts a torn last line (one without a newline,
/// left by a crash mid-write) from an output when `repair` is set. Returns the ids and the
/// bytes cut.
fn scan_ids(path: &Path, repair: bool) -> Result<(HashSet<String>, u64), Error> {
    let mut ids = HashSet::new();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((ids, 0)),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut complete_end: u64 = 0;
    let mut torn: u64 = 0;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            torn = n as u64;
            break;
        }
        complete_end += n as u64;
        if let Some(id) = id_of(&line) {
            ids.insert(id);
        }
    }
    if torn > 0 && repair {
        tracing::warn!(path = %path.display(), bytes = torn, "cutting a torn last line");
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(complete_end).map_err(io_err(path))?;
    }
    Ok((ids, torn))
}

struct Sets {
    done: HashSet<String>,
    seen: HashSet<String>,
    stop_error: Option<Error>,
}

/// Runs a generation into the JSONL file `output`, resuming by default.
///
/// # Errors
///
/// An I/O error on the output or ledger, a bad line under [`BadLinePolicy::Stop`], a read error
/// of the input, or a fatal generator error (a bad key). The totals so far are in the options'
/// progress view in every case.
pub(crate) async fn run_to_file<F, S, P>(
    generate: F,
    prompts: P,
    output: &Path,
    options: RunOptions,
) -> Result<RunSummary, Error>
where
    F: FnOnce(BoxStream<'static, Result<Prompt, Error>>) -> S,
    S: Stream<Item = Result<PreferenceExample, Error>> + Send,
    P: Stream<Item = Result<Prompt, Error>> + Send + 'static,
{
    let started = Instant::now();
    let progress = options.progress.clone();
    if options.overwrite {
        for path in [output, options.ledger.as_path()] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(path)(e)),
            }
        }
    }
    let (done, torn) = scan_ids(output, true)?;
    {
        let mut p = progress.lock();
        p.resumed = done.len() as u64;
        p.torn_bytes = torn;
    }
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(output)
        .map_err(io_err(output))?;

    let sets = Arc::new(Mutex::new(Sets {
        done,
        seen: HashSet::new(),
        stop_error: None,
    }));
    let filter_sets = sets.clone();
    let filter_progress = progress.clone();
    let shard = options.shard;
    let limit = options.limit;
    let policy = options.bad_lines;
    let filtered = prompts
        .take_until(options.stop.wait())
        .scan((), move |(), item| {
            let mut sets = filter_sets.lock().unwrap_or_else(|p| p.into_inner());
            let mut p = filter_progress.lock();
            let next = match item {
                Err(e @ Error::Parse { .. }) => {
                    p.bad_lines += 1;
                    tracing::warn!(error = %e, "bad input line");
                    if p.bad_line_messages.len() < MAX_MESSAGES {
                        p.bad_line_messages.push(e.to_string());
                    }
                    match policy {
                        BadLinePolicy::Skip => Some(None),
                        BadLinePolicy::Stop => {
                            sets.stop_error = Some(e);
                            None
                        }
                    }
                }
                Err(e) => {
                    sets.stop_error = Some(e);
                    None
                }
                Ok(_) if limit.is_some_and(|l| p.scheduled >= l) => None,
                Ok(prompt) => {
                    p.read += 1;
                    if shard.is_some_and(|s| !s.contains(&prompt.id)) {
                        p.other_shard += 1;
                        Some(None)
                    } else if !sets.seen.insert(prompt.id.clone()) {
                        p.duplicates += 1;
                        tracing::warn!(id = %prompt.id, "duplicate id in the input: keeping the first");
                        Some(None)
                    } else if sets.done.contains(&prompt.id) {
                        p.skipped_done += 1;
                        Some(None)
                    } else {
                        p.scheduled += 1;
                        Some(Some(Ok(prompt)))
                    }
                }
            };
            future::ready(next)
        })
        .filter_map(future::ready)
        .boxed();

    let mut results = Box::pin(generate(filtered));
    let mut ledger: Option<File> = None;
    let mut failed_error: Option<Error> = None;
    let mut line = Vec::with_capacity(4096);
    while let Some(item) = results.next().await {
        match item {
            Ok(example) => {
                line.clear();
                serde_json::to_writer(&mut line, &example.formatted(options.format))
                    .map_err(|e| io_err(output)(std::io::Error::other(e)))?;
                line.push(b'\n');
                // One write of a whole line: a crash leaves at most a torn last line, which
                // the next run cuts.
                if let Err(e) = out.write_all(&line) {
                    failed_error = Some(io_err(output)(e));
                    break;
                }
                sets.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .done
                    .insert(example.id.clone());
                progress.lock().generation.record(&Ok(example));
            }
            Err(e) => {
                let result: Result<PreferenceExample, Error> = Err(e);
                progress.lock().generation.record(&result);
                let Err(e) = result else {
                    unreachable!("built as Err above")
                };
                if e.is_fatal() {
                    failed_error = Some(e);
                    break;
                }
                tracing::warn!(error = %crate::setup::error_chain(&e), "example failed");
                if let Some(id) = e.example_id() {
                    if let Err(err) = append_failure(&mut ledger, &options.ledger, id, &e) {
                        failed_error = Some(err);
                        break;
                    }
                }
            }
        }
    }
    // Dropping the stream cancels whatever is still in flight (after a fatal error).
    drop(results);
    out.flush().map_err(io_err(output))?;
    if let Err(e) = out.sync_data() {
        tracing::warn!(error = %e, "could not sync the output");
    }
    drop(ledger);
    let (done, stop_error) = {
        let mut s = sets.lock().unwrap_or_else(|p| p.into_inner());
        (std::mem::take(&mut s.done), s.stop_error.take())
    };
    let pending = compact_ledger(&options.ledger, &done)?;
    let summary = {
        let mut p = progress.lock();
        p.ledger_pending = pending;
        p.interrupted = options.stop.is_stopped();
        p.elapsed = started.elapsed();
        p.clone()
    };
    match failed_error.or(stop_error) {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

fn append_failure(
    ledger: &mut Option<File>,
    path: &Path,
    id: &str,
    error: &Error,
) -> Result<(), Error> {
    let file = match ledger {
        Some(f) => f,
        None => ledger.insert(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io_err(path))?,
        ),
    };
    let record = serde_json::json!({
        "id": id,
        "kind": error.kind_str(),
        "error": crate::setup::error_chain(error),
    });
    let mut line = record.to_string();
    line.push('\n');
    file.write_all(line.as_bytes()).map_err(io_err(path))
}

/// Rewrites the ledger keeping the last record of each id not done; returns how many are
/// left (0 and no file when none).
fn compact_ledger(path: &Path, done: &HashSet<String>) -> Result<u64, Error> {
    let mut text = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut text).map_err(io_err(path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(path)(e)),
    }
    let mut last: Vec<(String, &[u8])> = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let Some(id) = id_of(line) else { continue };
        if done.contains(&id) {
            continue;
        }
        match last.iter_mut().find(|(i, _)| *i == id) {
            Some(slot) => slot.1 = line,
            None => last.push((id, line)),
        }
    }
    if last.is_empty() {
        std::fs::remove_file(path).map_err(io_err(path))?;
        return Ok(0);
    }
    let tmp = path.with_extension("jsonl.tmp");
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        for (_, line) in &last {
            f.write_all(line).map_err(io_err(&tmp))?;
            f.write_all(b"\n").map_err(io_err(&tmp))?;
        }
        f.sync_data().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(last.len() as u64)
}

/// Counts the non-blank lines of a file quickly (for the progress bar's total).
pub(crate) fn count_lines(path: &Path) -> Option<u64> {
    let mut f = File::open(path).ok()?;
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0u64;
    let mut in_line = false;
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            if b == b'\n' {
                if in_line {
                    lines += 1;
                }
                in_line = false;
            } else if !b.is_ascii_whitespace() {
                in_line = true;
            }
        }
    }
    if in_line {
        lines += 1;
    }
    let _ = f.seek(SeekFrom::Start(0));
    Some(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_parse_and_partition() {
        assert!(Shard::parse("1/0").is_err());
        assert!(Shard::parse("2/2").is_err());
        assert!(Shard::parse("x").is_err());
        let shards: Vec<Shard> = (0..3).map(|i| Shard { index: i, count: 3 }).collect();
        for n in 0..100 {
            let id = format!("q{n}");
            assert_eq!(shards.iter().filter(|s| s.contains(&id)).count(), 1);
        }
        assert_eq!(
            Shard::parse(" 1 / 3").unwrap(),
            Shard { index: 1, count: 3 }
        );
    }

    #[test]
    fn counts_lines() {
        let dir = std::env::temp_dir().join(format!("rmboost-cli-count-{}", std::process::id()));
        std::fs::write(&dir, b"a\n\n  \nb\nc").unwrap();
        assert_eq!(count_lines(&dir), Some(3));
        std::fs::remove_file(&dir).unwrap();
    }
}
