//! `rmboost generate`: flags to [`RunOptions`], the backend and its wrappers, the progress
//! display and the final summary. Every policy (file safety, resume checks, the cost budget,
//! the unreachable-server stop, Ctrl-C, exit statuses) is the library's `rmboost::run`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::StreamExt;
use rmboost::{ExampleFormat, OutputOrder};

use crate::args::{BadLineKind, FormatKind, GenerateArgs, LabelKind, OrderKind};
use crate::backends::{self, BackendStats};
use crate::progress::{self, Display, Tick};
use rmboost::backend::cache::{Cache, Cached};
use rmboost::io::FailureLedger;
use rmboost::run::{
    ensure_distinct_files, run_to_file, stop_on_ctrl_c, BadLinePolicy, ExistingOutput, Outcome,
    Prices, Progress, Recipe, RunOptions, RunSummary, Shard, StopSignal,
};

use crate::setup::{self, error_chain, CliError};
use crate::summary::{BatchReport, CacheReport, ConcurrencyReport, Report, Status, Tokens};
use rmboost::backend::meter::{CallMeter, Metered};
use rmboost::batch::{BatchBackend, BatchConfig, BatchHandle, StateFile};
use std::num::NonZeroUsize;

fn validate(args: &GenerateArgs) -> Result<(Option<Prices>, Option<Shard>), CliError> {
    let price = |i: Option<f64>, o: Option<f64>, flags: &str| match (i, o) {
        (None, None) => Ok(None),
        (i, o) => Prices::new(i.unwrap_or(0.0), o.unwrap_or(0.0))
            .map(Some)
            .map_err(|e| CliError::usage(format!("{flags}: {e}"))),
    };
    let online = price(
        args.price_input,
        args.price_output,
        "--price-input/--price-output",
    )?;
    let batch = price(
        args.batch_price_input,
        args.batch_price_output,
        "--batch-price-input/--batch-price-output",
    )?;
    if !args.batch && batch.is_some() {
        return Err(CliError::usage(
            "--batch-price-input/--batch-price-output need --batch",
        ));
    }
    // Batch runs are billed at batch prices: given, else half the online ones.
    let prices = if args.batch {
        rmboost::batch::billed_prices(online, args.batch_price_input, args.batch_price_output)
            .map_err(|e| {
                CliError::usage(format!("--batch-price-input/--batch-price-output: {e}"))
            })?
    } else {
        online
    };
    if let Some(max) = args.max_cost {
        rmboost::run::check_max_cost(max)
            .map_err(|e| CliError::usage(format!("--max-cost: {}", error_chain(&e))))?;
        if prices.is_none() {
            return Err(CliError::usage(
                "--max-cost needs --price-input and/or --price-output",
            ));
        }
    }
    if args.limit == Some(0) {
        return Err(CliError::usage("--limit must be at least 1"));
    }
    if args.batch {
        if args.batch_size == 0 {
            return Err(CliError::usage("--batch-size must be at least 1"));
        }
        if !(args.poll_secs.is_finite() && args.poll_secs > 0.0) {
            return Err(CliError::usage(
                "--poll-secs must be a positive number of seconds",
            ));
        }
    }
    let shard = args
        .shard
        .as_deref()
        .map(str::parse::<Shard>)
        .transpose()
        .map_err(|e| CliError::usage(format!("--shard: {e}")))?;
    Ok((prices, shard))
}

/// How many examples this run is expected to generate, for the bar (an estimate).
fn expected_total(args: &GenerateArgs, shard: Option<Shard>) -> Option<u64> {
    let lines = crate::runner::count_lines(&args.input)?;
    let mut todo = match shard {
        Some(s) => lines.div_ceil(u64::from(s.count())),
        None => lines,
    };
    if !args.overwrite {
        todo = todo.saturating_sub(crate::runner::count_lines(&args.output).unwrap_or(0));
    }
    Some(match args.limit {
        Some(l) => todo.min(l),
        None => todo,
    })
}

fn tick(
    p: &RunSummary,
    stats: &BackendStats,
    batch: Option<&BatchBackend>,
    prices: Option<Prices>,
    t0: Instant,
) -> Tick {
    let usage = stats.meter.usage();
    Tick {
        processed: p.generation.examples + p.generation.failed(),
        failed: p.generation.failed(),
        skipped: p.skipped_done,
        retries: stats.retries(),
        tokens: usage.total(),
        cost: prices.map(|pr| pr.cost(usage)),
        elapsed: t0.elapsed(),
        limit: stats.adaptive.as_ref().map(|a| {
            let s = a.snapshot();
            (s.limit, s.cap, s.rate_limited_share())
        }),
        batch: batch.map(|b| {
            let s = b.stats();
            (s.batches_created, s.waves, s.in_flight)
        }),
    }
}

/// The settings that change the rows, recorded beside the output so a rerun with others is
/// refused rather than mixed in.
fn recipe(args: &GenerateArgs) -> Recipe {
    let g = &args.gen;
    let mut r = Recipe::new()
        .with("method", g.method)
        .with("seed", g.seed)
        .with("aspects", &g.aspects)
        .with(
            "aspect_sampling",
            g.aspect_sampling.as_deref().unwrap_or("default"),
        )
        .with(
            "labels",
            match g.labels {
                LabelKind::Bernoulli => "bernoulli",
                LabelKind::Graded => "graded",
            },
        )
        .with("p_better", g.p_better);
    if g.method == rmboost::Method::WestOfN {
        r = r.with("samples", g.samples);
    }
    r
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
    let ledger_path = args
        .ledger
        .clone()
        .unwrap_or_else(|| FailureLedger::default_path(&args.output));
    let mut files = vec![
        ("input", args.input.as_path()),
        ("output", args.output.as_path()),
        ("failure ledger", ledger_path.as_path()),
    ];
    if let Some(summary) = &args.summary_json {
        files.push(("summary", summary.as_path()));
    }
    let state_path = StateFile::default_path(&args.output);
    let results_path = StateFile::results_path(&args.output);
    if args.batch {
        files.push(("batch state", state_path.as_path()));
        files.push(("batch results", results_path.as_path()));
    }
    ensure_distinct_files(&files).map_err(|e| CliError::usage(error_chain(&e)))?;
    let prompts = rmboost::read_prompts(&args.input)
        .map_err(|e| CliError::fatal(format!("cannot read the input: {}", error_chain(&e))))?
        .into_stream();
    let stop = StopSignal::new();
    let (built, batch, gen) = if args.batch {
        batch_backend(&args, prices, &stop)?
    } else {
        (
            backends::build(&args.backend, args.gen.concurrency)?,
            None,
            args.gen.clone(),
        )
    };
    let order = match args.order {
        OrderKind::Completion => OutputOrder::Completion,
        OrderKind::Input => OutputOrder::Input,
    };
    let (backend, cache) = if batch.is_some() {
        // Batch results are kept beside the output (PAIRS.batch-results.jsonl) instead.
        (built.backend.clone(), None)
    } else {
        with_cache(&args, &built).await?
    };
    let generator = setup::method_generator(&gen, backend, order)?;
    let stats = built.stats.clone();
    let total = expected_total(&args, shard);

    let ctrl_c = stop_on_ctrl_c(stop.clone())
        .map_err(|e| CliError::fatal(format!("cannot handle Ctrl-C: {e}")))?;

    let live = Progress::new();
    let finished = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    let ticker = {
        let live = live.clone();
        let stats = stats.clone();
        let finished = finished.clone();
        let wake = wake.clone();
        let batch = batch.as_ref().map(|(b, _)| b.clone());
        let mut display = Display::new(args.progress, total);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    () = wake.notified() => {}
                }
                display.update(
                    &tick(&live.snapshot(), &stats, batch.as_ref(), prices, started),
                    total,
                );
                if finished.load(Ordering::SeqCst) {
                    break;
                }
            }
            display.finish();
        })
    };

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
        .input(args.input.clone())
        .recipe(recipe(&args))
        .stop_signal(stop.clone())
        .progress(live.clone())
        .meter(stats.meter.clone())
        .stop_when_unreachable(Some((args.gen.concurrency as u64).max(3)));
    if let (Some(prices), Some(max)) = (prices, args.max_cost) {
        options = options.max_cost(prices, max);
    }
    if batch.is_some() {
        // Examples waiting on batches (hours) are dropped at a stop, not waited for.
        options = options.drain_deadline(Some(rmboost::batch::DRAIN_DEADLINE));
    }
    if let Some(shard) = shard {
        options = options.shard(shard);
    }
    if let Some(limit) = args.limit {
        options = options.limit(limit);
    }
    let result = run_to_file(
        move |prompts| generator.generate_boxed(prompts).boxed(),
        prompts,
        &args.output,
        options,
    )
    .await;
    finished.store(true, Ordering::SeqCst);
    wake.notify_one();
    let _ = ticker.await;
    ctrl_c.abort();
    let (batch_stats, batch_error) = match batch {
        Some((backend, handle)) => {
            drop(backend);
            match handle.finish(result.as_ref().ok()).await {
                Ok(s) => (Some(s), None),
                Err(e) => (None, Some(error_chain(&e))),
            }
        }
        None => (None, None),
    };
    if let Some(cache) = &cache {
        // A call returns once its completion is queued: commit the last ones now.
        if let Err(e) = cache.flush().await {
            tracing::warn!(error = %error_chain(&e), "response cache: the last commit failed");
        }
    }

    let summary = live.snapshot();
    let code = match (&result, &batch_error) {
        (Ok(s), None) => s.exit_code(),
        _ => rmboost::run::EXIT_FAILED,
    };
    let error = match (&result, summary.outcome) {
        (Err(e), _) => Some(error_chain(e)),
        (Ok(_), Outcome::Unreachable) => summary.message.clone(),
        _ => batch_error.clone(),
    };
    let report = Report {
        status: match (&result, summary.outcome) {
            (Err(_), _) | (_, Outcome::Unreachable | Outcome::Failed) => Status::Failed,
            _ if batch_error.is_some() => Status::Failed,
            (Ok(_), Outcome::CostLimit) => Status::CostLimit,
            (Ok(_), Outcome::Interrupted) => Status::Interrupted,
            (Ok(_), Outcome::LimitReached) => Status::LimitReached,
            (Ok(_), _) => Status::Completed,
        },
        error: error.clone(),
        examples_written: summary.generation.examples,
        better: summary.generation.better,
        worse: summary.generation.examples - summary.generation.better,
        skipped_done: summary.skipped_done,
        failed: summary.generation.failed(),
        failures: summary
            .generation
            .failures
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect(),
        bad_lines: summary.bad_lines,
        duplicates: summary.duplicates,
        other_shard: summary.other_shard,
        reasks: summary.generation.reasks,
        retries: stats.retries(),
        calls: summary.calls,
        tokens: Tokens {
            prompt: summary.usage.prompt_tokens,
            completion: summary.usage.completion_tokens,
            total: summary.usage.total(),
        },
        cost: prices.map(|p| p.cost(summary.usage)),
        max_cost: args.max_cost,
        examples_per_sec: summary.generation.examples as f64
            / started.elapsed().as_secs_f64().max(1e-9),
        wall_time_secs: started.elapsed().as_secs_f64(),
        exit_status: code,
        backend: built.description.clone(),
        cache: cache.as_ref().map(|c| {
            let st = c.stats();
            CacheReport {
                path: c.path().to_path_buf(),
                hits: st.hits,
                misses: st.misses,
            }
        }),
        seed: args.gen.seed,
        output: args.output.clone(),
        ledger: ledger_path.exists().then_some(ledger_path),
        ledger_pending: summary.ledger_pending,
        bad_line_messages: summary.bad_line_messages.clone(),
        concurrency: stats.adaptive.as_ref().map(|a| {
            let s = a.snapshot();
            ConcurrencyReport {
                adaptive: !args.backend.fixed_concurrency,
                cap: s.cap,
                limit: s.limit,
                min_limit: s.min_limit,
                max_limit: s.max_limit,
                calls: s.calls,
                rate_limited: s.rate_limited,
                congestion: s.congestion,
            }
        }),
        batch: batch_stats.map(|stats| BatchReport {
            resume_hint: (stats.in_flight > 0).then(|| {
                format!(
                    "{} batches still run at the provider: rerun the same command to collect \
                     them, or cancel them with `rmboost batch cancel -o {}` (and the same \
                     --backend, --base-url and --api-key-env)",
                    stats.in_flight,
                    args.output.display()
                )
            }),
            stats,
        }),
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

/// The backend of a `--batch` run: the batch pipeline of the provider's batch API, metered;
/// its handle; and the generation settings with the pipeline's concurrency.
type BatchParts = (
    backends::Built,
    Option<(BatchBackend, BatchHandle)>,
    crate::args::GenArgs,
);

fn batch_backend(
    args: &GenerateArgs,
    prices: Option<Prices>,
    stop: &StopSignal,
) -> Result<BatchParts, CliError> {
    let api = backends::batch_api(&args.backend, false)?;
    let size = NonZeroUsize::new(args.batch_size)
        .ok_or_else(|| CliError::usage("--batch-size must be at least 1"))?;
    let poll = rmboost::backend::duration_from_secs_f64(args.poll_secs)
        .map_err(|e| CliError::usage(format!("--poll-secs: {}", error_chain(&e))))?;
    let max_poll = (poll * 20).min(poll + Duration::from_secs(600));
    let meter = CallMeter::new();
    let mut config = BatchConfig::new()
        .batch_size(size)
        .poll_interval(poll)
        .max_poll_interval(max_poll)
        .max_attempts(args.backend.retries.saturating_add(1))
        .stop_signal(stop.clone());
    if let (Some(prices), Some(max)) = (prices, args.max_cost) {
        config = config.max_cost(prices, max, meter.clone());
    }
    let mut gen = args.gen.clone();
    gen.concurrency = config.concurrency().get();
    let description = format!(
        "{} (batch API)",
        backends::description(&args.backend, &api.model())
    );
    let (backend, handle) = BatchBackend::start(api, &args.output, config)
        .map_err(|e| CliError::fatal(error_chain(&e)))?;
    let metered: Arc<dyn rmboost::LlmBackend> =
        Arc::new(Metered::with_meter(backend.clone(), meter.clone()));
    let built = backends::Built {
        backend: metered,
        stats: BackendStats {
            meter,
            retries: None,
            adaptive: None,
        },
        description,
    };
    Ok((built, Some((backend, handle)), gen))
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
    if args.no_cache {
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
