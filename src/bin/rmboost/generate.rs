//! `rmboost generate`: flags to [`RunOptions`], the backend and its wrappers, the progress
//! display and the final summary. Every policy (file safety, resume checks, the cost budget,
//! the unreachable-server stop, Ctrl-C, exit statuses) is the library's `rmboost::run`.

use std::num::NonZeroUsize;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::future::FutureExt;
use futures::stream::StreamExt;
use rmboost::backend::cache::Cache;
use rmboost::batch::{run_batch_to_file, BatchBackend, BatchConfig, StateFile};
use rmboost::io::FailureLedger;
use rmboost::run::{
    ensure_distinct_files, expected_examples, run_to_file, stop_on_ctrl_c, unreachable_after,
    BadLinePolicy, CostBudget, ExistingOutput, Outcome, Prices, Progress, RunOptions, Shard,
    StopSignal,
};
use rmboost::{ExampleFormat, OutputOrder};

use crate::args::{BadLineKind, FormatKind, GenerateArgs, OrderKind};
use crate::backends::{self, BackendStats};
use crate::progress::{self, Display, Tick};
use crate::setup::{self, error_chain, CliError};
use crate::summary::{BatchReport, CacheReport, ConcurrencyReport, ReplicaReport, Report, Tokens};

/// Runs `rmboost generate`; returns the exit status.
pub(crate) async fn run(args: GenerateArgs) -> Result<u8, CliError> {
    let started = Instant::now();
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
    let (input, output) = (args.batch_price_input, args.batch_price_output);
    let prices = if args.batch {
        // Batch runs are billed at batch prices: given, else half the online ones.
        let half = online.map(rmboost::batch::batch_prices);
        price(
            input.or(half.map(|p| p.input_per_million())),
            output.or(half.map(|p| p.output_per_million())),
            "--batch-price-input/--batch-price-output",
        )?
    } else if input.is_some() || output.is_some() {
        return Err(CliError::usage(
            "--batch-price-input/--batch-price-output need --batch",
        ));
    } else {
        online
    };
    let budget = match (args.max_cost, prices) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(CliError::usage(
                "--max-cost needs --price-input and/or --price-output",
            ))
        }
        (Some(max), Some(prices)) => Some(
            CostBudget::new(prices, max)
                .map_err(|e| CliError::usage(format!("--max-cost: {}", error_chain(&e))))?,
        ),
    };
    if args.limit == Some(0) {
        return Err(CliError::usage("--limit must be at least 1"));
    }
    // The settings of a `--batch` run.
    let batch_config = if args.batch {
        let size = NonZeroUsize::new(args.batch_size)
            .ok_or_else(|| CliError::usage("--batch-size must be at least 1"))?;
        let poll = setup::seconds(args.poll_secs, "--poll-secs")?;
        Some(
            BatchConfig::new()
                .batch_size(size)
                .poll_interval(poll)
                .max_poll_interval((poll * 20).min(poll + Duration::from_secs(600)))
                .max_attempts(args.backend.retries.saturating_add(1)),
        )
    } else {
        None
    };
    // The shard of `--shard I/N` or `--shard auto` (the scheduler's, `--shards`), and how the
    // summary names it.
    let shard_of_run = match args.shard.as_deref().map(str::trim) {
        None => None,
        Some("auto") => {
            let (shard, source) = Shard::from_scheduler(args.shards)
                .map_err(|e| CliError::usage(format!("--shard auto: {}", error_chain(&e))))?;
            // The tasks' logs say which shard each took, before anything else can go wrong.
            let value = std::env::var(source.variable()).unwrap_or_default();
            progress::notice(&format!(
                "rmboost: shard {shard} from {source}={}",
                value.trim()
            ));
            Some((shard, format!("{shard} from {source}")))
        }
        Some(_) if args.shards.is_some() => {
            return Err(CliError::usage(
                "--shards goes with --shard auto (--shard I/N names the count itself)",
            ))
        }
        Some(spec) => {
            let shard = spec
                .parse::<Shard>()
                .map_err(|e| CliError::usage(format!("--shard: {e}")))?;
            Some((shard, shard.to_string()))
        }
    };
    if args.no_cache && (args.clear_cache || args.cache_dir.is_some()) {
        return Err(CliError::usage(
            "--no-cache cannot be combined with --clear-cache or --cache-dir",
        ));
    }
    let ledger_path = args
        .ledger
        .clone()
        .unwrap_or_else(|| FailureLedger::default_path(&args.output));
    let state = StateFile::default_path(&args.output);
    let results = StateFile::results_path(&args.output);
    let mut files = vec![
        ("input", &*args.input),
        ("output", &*args.output),
        ("failure ledger", &*ledger_path),
    ];
    files.extend(args.summary_json.as_deref().map(|p| ("summary", p)));
    if args.batch {
        files.extend([("batch state", &*state), ("batch results", &*results)]);
    }
    ensure_distinct_files(&files).map_err(|e| CliError::usage(error_chain(&e)))?;
    let prompts = rmboost::read_prompts(&args.input)
        .map_err(|e| CliError::fatal(format!("cannot read the input: {}", error_chain(&e))))?
        .into_stream();
    let order = match args.order {
        OrderKind::Completion => OutputOrder::Completion,
        OrderKind::Input => OutputOrder::Input,
    };
    let config = setup::method_config(&args.gen, order)?;
    let stop = StopSignal::new();
    let live = Progress::new();
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
        .recipe(config.recipe())
        .stop_signal(stop.clone())
        .progress(live.clone())
        .stop_when_unreachable(Some(unreachable_after(args.gen.concurrency)));
    if let Some(budget) = budget {
        options = options.max_cost(budget);
    }
    if let Some((shard, _)) = &shard_of_run {
        options = options.shard(*shard);
    }
    if let Some(limit) = args.limit {
        options = options.limit(limit);
    }
    let total = expected_examples(&args.output, &options);

    // An online run: the backend in its wrappers (and the cache), and the generator. A batch
    // run: the batch API; the library makes its backend (and then the generator) when the run
    // starts. Batch results are kept beside the output (PAIRS.batch-results.jsonl), not cached.
    let batch_backend = OnceLock::new();
    let mut setup_error = None;
    let (mut run, stats, description, cache) = match batch_config {
        Some(batch_config) => {
            let (api, description) = backends::batch_api(&args.backend, false)?;
            let make = |backend: BatchBackend, concurrency: NonZeroUsize| {
                let _ = batch_backend.set(backend.clone());
                let mut config = config.clone();
                config.concurrency = concurrency;
                config.build(backend).inspect_err(|e| {
                    setup_error = Some(CliError::usage(error_chain(e)));
                })
            };
            let run = run_batch_to_file(api, batch_config, make, prompts, &args.output, options);
            let run = run.map(|result| result.map(|(summary, _)| summary));
            (
                run.boxed_local(),
                BackendStats::default(),
                description,
                None,
            )
        }
        None => {
            let cache = open_cache(&args).await?;
            let (backend, stats, description) =
                backends::build(&args.backend, config.concurrency, cache.clone())?;
            let meter = backend.meter().clone();
            let generator = config
                .build(backend)
                .map_err(|e| CliError::usage(error_chain(&e)))?;
            let run = run_to_file(
                move |prompts| generator.generate_boxed(prompts).boxed(),
                prompts,
                &args.output,
                options.meter(meter),
            );
            (run.boxed_local(), stats, description, cache)
        }
    };
    let ctrl_c = stop_on_ctrl_c(stop.clone())
        .map_err(|e| CliError::fatal(format!("cannot handle Ctrl-C: {e}")))?;
    let tick = || {
        let p = live.snapshot();
        Tick {
            processed: p.generation.examples + p.generation.failed(),
            failed: p.generation.failed(),
            skipped: p.skipped_done,
            retries: stats.retries(),
            tokens: p.usage.total(),
            cost: prices.map(|pr| pr.cost(p.usage)),
            elapsed: started.elapsed(),
            limit: stats
                .limit()
                .map(|s| (s.limit, s.cap, s.rate_limited_share())),
            batch: batch_backend.get().map(|b| {
                let s = b.stats();
                (s.batches_created, s.waves, s.in_flight)
            }),
        }
    };
    // Drive the run to its end, showing `tick()` every 100 ms meanwhile and once at the end.
    let mut display = Display::new(args.progress, total);
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            _ = interval.tick() => display.update(&tick(), total),
        }
    };
    drop(run);
    display.update(&tick(), total);
    display.finish();
    drop(ctrl_c);
    if let Some(e) = setup_error {
        return Err(e);
    }
    if let Some(cache) = &cache {
        // A call returns once its completion is queued: commit the last ones now.
        if let Err(e) = cache.flush().await {
            tracing::warn!(error = %error_chain(&e), "response cache: the last commit failed");
        }
    }

    let summary = live.snapshot();
    let (status, error) = match (&result, summary.outcome) {
        (Err(e), _) => (Outcome::Failed, Some(error_chain(e))),
        (Ok(_), Outcome::Unreachable) => (Outcome::Failed, summary.message.clone()),
        (Ok(_), outcome) => (outcome, None),
    };
    let code = setup::exit_status(status, summary.generation.failed());
    let report = Report {
        status,
        error,
        examples_written: summary.generation.examples,
        better: summary.generation.better,
        worse: summary.generation.examples - summary.generation.better,
        skipped_done: summary.skipped_done,
        failed: summary.generation.failed(),
        failures: summary.generation.failures.clone(),
        bad_lines: summary.bad_lines,
        duplicates: summary.duplicates,
        other_shard: summary.other_shard,
        shard: shard_of_run.map(|(_, text)| text),
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
        backend: description,
        cache: cache.as_ref().map(|c| {
            let st = c.stats();
            CacheReport {
                path: c.path().to_path_buf(),
                hits: st.hits,
                hit_tokens: st.hit_tokens,
                misses: st.misses,
            }
        }),
        seed: args.gen.seed,
        output: args.output.clone(),
        ledger: ledger_path.exists().then_some(ledger_path),
        ledger_pending: summary.ledger_pending,
        bad_line_messages: summary.bad_line_messages.clone(),
        concurrency: stats.limit().map(|s| ConcurrencyReport {
            adaptive: !args.backend.fixed_concurrency,
            cap: s.cap,
            limit: s.limit,
            min_limit: s.min_limit,
            max_limit: s.max_limit,
            calls: s.calls,
            rate_limited: s.rate_limited,
            congestion: s.congestion,
        }),
        replicas: stats
            .replicas
            .iter()
            .flat_map(|set| set.stats())
            .map(|r| ReplicaReport {
                endpoint: r.name,
                calls: r.calls,
                errors: r.errors,
                rate_limited: r.limit.rate_limited,
                drains: r.drains,
                limit: r.limit.limit,
            })
            .collect(),
        batch: batch_backend
            .get()
            .map(BatchBackend::stats)
            .map(|stats| BatchReport {
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
    report
        .error
        .map_or(Ok(code), |message| Err(CliError { code, message }))
}

/// The response cache (unless `--no-cache`); a cache that cannot be opened (another run holds
/// it, a broken file) is reported and skipped, never fatal.
async fn open_cache(args: &GenerateArgs) -> Result<Option<Cache>, CliError> {
    if args.no_cache {
        return Ok(None);
    }
    // The per-user cache directory: `$XDG_CACHE_HOME/rmboost` or `~/.cache/rmboost` on Linux.
    let default = || dirs::cache_dir().map(|d| d.join("rmboost"));
    let Some(dir) = args.cache_dir.clone().or_else(default) else {
        tracing::warn!("no cache directory (HOME is not set): running without the response cache");
        return Ok(None);
    };
    std::fs::create_dir_all(&dir).map_err(|e| {
        CliError::fatal(format!(
            "cannot create the cache directory {}: {e}",
            dir.display()
        ))
    })?;
    let path = dir.join("responses.redb");
    let cache = match Cache::open(&path) {
        Ok(c) => c,
        Err(e) => {
            progress::notice(&format!(
                "rmboost: running without the response cache: {}",
                error_chain(&e)
            ));
            return Ok(None);
        }
    };
    if args.clear_cache {
        cache
            .clear()
            .await
            .map_err(|e| CliError::fatal(format!("cannot clear the cache: {}", error_chain(&e))))?;
    }
    Ok(Some(cache))
}
