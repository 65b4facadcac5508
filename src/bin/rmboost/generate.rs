//! `rmboost generate`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use rmboost::{BackendErrorKind, Error, ExampleFormat, OutputOrder, PreferenceExample};

use crate::args::{BadLineKind, FormatKind, GenerateArgs, OrderKind};
use crate::backends::{self, BackendStats};
use crate::progress::{self, Display, Tick};
use rmboost::backend::cache::{Cache, Cached};
use rmboost::io::FailureLedger;
use rmboost::run::{
    run_to_file, BadLinePolicy, ExistingOutput, Progress, RunOptions, RunSummary, Shard, StopSignal,
};

use crate::runner;
use crate::setup::{self, error_chain, CliError, EXIT_COST, EXIT_FATAL, EXIT_INTERRUPTED};
use crate::summary::{CacheReport, Report, Status, Tokens};

/// Prices per million tokens.
#[derive(Debug, Clone, Copy)]
struct Prices {
    input: f64,
    output: f64,
}

impl Prices {
    fn cost(&self, usage: rmboost::Usage) -> f64 {
        (usage.prompt_tokens as f64 * self.input + usage.completion_tokens as f64 * self.output)
            / 1e6
    }
}

/// Stops the run when the server stays unreachable: this many connection or timeout failures
/// in a row (after the backend's own retries) end the run with a fatal error.
struct Watchdog {
    threshold: u64,
    in_a_row: AtomicU64,
    reason: Mutex<Option<String>>,
    stop: StopSignal,
}

impl Watchdog {
    fn observe(&self, result: &Result<PreferenceExample, Error>) {
        let unreachable = match result {
            Err(Error::Backend { source, .. }) => matches!(
                source.kind(),
                BackendErrorKind::Connection | BackendErrorKind::Timeout
            ),
            _ => false,
        };
        if !unreachable {
            self.in_a_row.store(0, Ordering::Relaxed);
            return;
        }
        let n = self.in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold {
            let mut reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
            if reason.is_none() {
                if let Err(Error::Backend { source, .. }) = result {
                    *reason = Some(format!(
                        "the model server is unreachable ({n} calls in a row failed): {}",
                        error_chain(source)
                    ));
                }
                self.stop.stop();
            }
        }
    }

    fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn validate(args: &GenerateArgs) -> Result<(Option<Prices>, Option<Shard>), CliError> {
    let price = |v: Option<f64>, flag: &str| match v {
        Some(p) if !(p.is_finite() && p >= 0.0) => Err(CliError::usage(format!(
            "{flag} must be a price >= 0 per million tokens"
        ))),
        other => Ok(other),
    };
    let input = price(args.price_input, "--price-input")?;
    let output = price(args.price_output, "--price-output")?;
    let prices = (input.is_some() || output.is_some()).then(|| Prices {
        input: input.unwrap_or(0.0),
        output: output.unwrap_or(0.0),
    });
    if let Some(max) = args.max_cost {
        if !(max.is_finite() && max > 0.0) {
            return Err(CliError::usage("--max-cost must be a positive amount"));
        }
        if prices.is_none() {
            return Err(CliError::usage(
                "--max-cost needs --price-input and/or --price-output",
            ));
        }
    }
    if args.limit == Some(0) {
        return Err(CliError::usage("--limit must be at least 1"));
    }
    let shard = args
        .shard
        .as_deref()
        .map(runner::parse_shard)
        .transpose()
        .map_err(|m| CliError::usage(format!("--shard {m}")))?;
    if args.input == args.output {
        return Err(CliError::usage("--input and --output are the same file"));
    }
    Ok((prices, shard))
}

/// How many examples this run is expected to generate, for the bar (an estimate).
fn expected_total(args: &GenerateArgs, shard: Option<Shard>) -> Option<u64> {
    let lines = runner::count_lines(&args.input)?;
    let mut todo = match shard {
        Some(s) => lines.div_ceil(u64::from(s.count())),
        None => lines,
    };
    if !args.overwrite {
        todo = todo.saturating_sub(runner::count_lines(&args.output).unwrap_or(0));
    }
    Some(match args.limit {
        Some(l) => todo.min(l),
        None => todo,
    })
}

fn tick(p: &RunSummary, stats: &BackendStats, prices: Option<Prices>, t0: Instant) -> Tick {
    let usage = stats.meter.usage();
    Tick {
        processed: p.generation.examples + p.generation.failed(),
        failed: p.generation.failed(),
        skipped: p.skipped_done,
        retries: stats.retries(),
        tokens: usage.total(),
        cost: prices.map(|pr| pr.cost(usage)),
        elapsed: t0.elapsed(),
    }
}

/// Runs `rmboost generate`; returns the exit status.
pub(crate) async fn run(args: GenerateArgs) -> Result<u8, CliError> {
    let started = Instant::now();
    let (prices, shard) = validate(&args)?;
    if args.no_cache && (args.clear_cache || args.cache_dir.is_some()) {
        return Err(CliError::usage(
            "--no-cache cannot be combined with --clear-cache or --cache-dir",
        ));
    }
    let reader = rmboost::read_prompts(&args.input)
        .map_err(|e| CliError::fatal(format!("cannot read the input: {}", error_chain(&e))))?;
    let built = backends::build(&args.backend)?;
    let order = match args.order {
        OrderKind::Completion => OutputOrder::Completion,
        OrderKind::Input => OutputOrder::Input,
    };
    let (backend, cache) = with_cache(&args, &built).await?;
    let rmb = setup::method_generator(&args.gen, backend, order)?;
    let stats = built.stats.clone();
    let ledger_path = args
        .ledger
        .clone()
        .unwrap_or_else(|| FailureLedger::default_path(&args.output));
    let existed = args.output.exists();
    let total = expected_total(&args, shard);

    let stop = StopSignal::new();
    let interrupted = Arc::new(AtomicBool::new(false));
    let ctrl_c = {
        let stop = stop.clone();
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            interrupted.store(true, Ordering::SeqCst);
            stop.stop();
            progress::notice(
                "rmboost: stopping: finishing the examples in flight (Ctrl-C again to quit now)",
            );
            if tokio::signal::ctrl_c().await.is_ok() {
                progress::notice("rmboost: quit");
                std::process::exit(i32::from(EXIT_INTERRUPTED));
            }
        })
    };

    let live = Progress::new();
    let finished = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    let cost_hit = Arc::new(AtomicBool::new(false));
    let ticker = {
        let live = live.clone();
        let stats = stats.clone();
        let finished = finished.clone();
        let wake = wake.clone();
        let cost_hit = cost_hit.clone();
        let stop = stop.clone();
        let max_cost = args.max_cost;
        let mut display = Display::new(args.progress, total);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    () = wake.notified() => {}
                }
                let t = tick(&live.snapshot(), &stats, prices, started);
                if let (Some(max), Some(cost)) = (max_cost, t.cost) {
                    if cost >= max && !cost_hit.swap(true, Ordering::SeqCst) {
                        progress::notice(&format!(
                            "rmboost: cost ${cost:.4} reached --max-cost ${max:.2}: finishing the examples in flight"
                        ));
                        stop.stop();
                    }
                }
                display.update(&t, total);
                if finished.load(Ordering::SeqCst) {
                    break;
                }
            }
            display.finish();
        })
    };

    let watchdog = Arc::new(Watchdog {
        threshold: (args.gen.concurrency as u64).max(3),
        in_a_row: AtomicU64::new(0),
        reason: Mutex::new(None),
        stop: stop.clone(),
    });
    let mut options = RunOptions::new()
        .format(match args.format {
            FormatKind::Conversational => ExampleFormat::Conversational,
            FormatKind::Standard => ExampleFormat::Standard,
        })
        .existing(if args.overwrite {
            ExistingOutput::Overwrite
        } else {
            ExistingOutput::Resume
        })
        .bad_lines(match args.on_bad_line {
            BadLineKind::Skip => BadLinePolicy::Skip,
            BadLineKind::Stop => BadLinePolicy::Stop,
        })
        .ledger(ledger_path.clone())
        .stop_signal(stop.clone())
        .progress(live.clone());
    if let Some(shard) = shard {
        options = options.shard(shard);
    }
    if let Some(limit) = args.limit {
        options = options.limit(limit);
    }
    let wd = watchdog.clone();
    let result = run_to_file(
        move |prompts| rmb.generate_boxed(prompts).inspect(move |r| wd.observe(r)),
        stream::iter(reader),
        &args.output,
        options,
    )
    .await;
    finished.store(true, Ordering::SeqCst);
    wake.notify_one();
    let _ = ticker.await;
    ctrl_c.abort();
    if let Some(cache) = &cache {
        // A call returns once its completion is queued: commit the last ones now.
        if let Err(e) = cache.flush().await {
            tracing::warn!(error = %error_chain(&e), "response cache: the last commit failed");
        }
    }

    let snapshot = live.snapshot();
    let wall = started.elapsed();
    let (status, error, code) = match (&result, watchdog.reason()) {
        (Err(e), _) => (Status::Failed, Some(error_chain(e)), EXIT_FATAL),
        (Ok(_), Some(reason)) => (Status::Failed, Some(reason), EXIT_FATAL),
        (Ok(_), None) if cost_hit.load(Ordering::SeqCst) => (Status::CostLimit, None, EXIT_COST),
        (Ok(_), None) if interrupted.load(Ordering::SeqCst) => {
            (Status::Interrupted, None, EXIT_INTERRUPTED)
        }
        (Ok(s), None) if args.limit.is_some_and(|l| s.scheduled >= l) => {
            (Status::LimitReached, None, 0)
        }
        (Ok(_), None) => (Status::Completed, None, 0),
    };
    if !existed && is_empty_file(&args.output) {
        // Nothing was written: leave no empty file behind.
        let _ = std::fs::remove_file(&args.output);
    }
    let report = report(
        &args,
        &snapshot,
        &built.stats,
        prices,
        wall,
        status,
        error.clone(),
    );
    let report = Report {
        backend: built.description.clone(),
        cache: cache.as_ref().map(|c| {
            let st = c.stats();
            CacheReport {
                path: c.path().to_path_buf(),
                hits: st.hits,
                misses: st.misses,
            }
        }),
        ledger: ledger_path.exists().then_some(ledger_path),
        ..report
    };
    print!("{report}");
    if let Some(path) = &args.summary_json {
        let json = serde_json::to_string_pretty(&report).expect("a report serialises");
        std::fs::write(path, json + "\n")
            .map_err(|e| CliError::fatal(format!("cannot write {}: {e}", path.display())))?;
    }
    match error {
        Some(message) => Err(CliError { code, message }),
        None => Ok(code),
    }
}

/// The per-user cache directory: `$XDG_CACHE_HOME/rmboost` or `~/.cache/rmboost`.
fn default_cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    Some(base.join("rmboost"))
}

/// Wraps a real backend in the response cache (unless `--no-cache`); a cache that cannot be
/// opened (another run holds it, a broken file) is reported and skipped, never fatal.
async fn with_cache(
    args: &GenerateArgs,
    built: &backends::Built,
) -> Result<(Arc<dyn rmboost::LlmBackend>, Option<Cache>), CliError> {
    if args.no_cache || !built.real {
        return Ok((built.backend.clone(), None));
    }
    let Some(dir) = args.cache_dir.clone().or_else(default_cache_dir) else {
        tracing::warn!("no cache directory (HOME is not set): running without the response cache");
        return Ok((built.backend.clone(), None));
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return Err(CliError::fatal(format!(
            "cannot create the cache directory {}: {e}",
            dir.display()
        )));
    }
    let path = dir.join("responses.redb");
    let cache = match Cache::open(&path) {
        Ok(c) => c,
        Err(e) => {
            progress::notice(&format!(
                "rmboost: running without the response cache: {}",
                error_chain(&e)
            ));
            return Ok((built.backend.clone(), None));
        }
    };
    if args.clear_cache {
        cache
            .clear()
            .await
            .map_err(|e| CliError::fatal(format!("cannot clear the cache: {}", error_chain(&e))))?;
    }
    let cached: Arc<dyn rmboost::LlmBackend> =
        Arc::new(Cached::new(built.backend.clone(), cache.clone()));
    Ok((cached, Some(cache)))
}

fn is_empty_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0)
}

fn report(
    args: &GenerateArgs,
    s: &RunSummary,
    stats: &BackendStats,
    prices: Option<Prices>,
    wall: Duration,
    status: Status,
    error: Option<String>,
) -> Report {
    let usage = stats.meter.usage();
    let g = &s.generation;
    let secs = wall.as_secs_f64();
    Report {
        status,
        error,
        examples_written: g.examples,
        better: g.better,
        worse: g.examples - g.better,
        skipped_done: s.skipped_done,
        failed: g.failed(),
        failures: g
            .failures
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect(),
        bad_lines: s.bad_lines,
        duplicates: s.duplicates,
        other_shard: s.other_shard,
        reasks: g.reasks,
        retries: stats.retries(),
        calls: stats.meter.calls(),
        tokens: Tokens {
            prompt: usage.prompt_tokens,
            completion: usage.completion_tokens,
            total: usage.total(),
        },
        cost: prices.map(|p| p.cost(usage)),
        max_cost: args.max_cost,
        examples_per_sec: if secs > 0.0 {
            g.examples as f64 / secs
        } else {
            0.0
        },
        wall_time_secs: secs,
        backend: String::new(),
        cache: None,
        seed: args.gen.seed,
        output: args.output.clone(),
        ledger: None,
        ledger_pending: s.ledger_pending,
        bad_line_messages: s.bad_line_messages.clone(),
    }
}
