//! The `rmboost` command line (feature `cli`).
//!
//! `rmboost generate` turns a JSONL file of prompts into a JSONL file of preference pairs,
//! resuming by default; `rmboost dry-run` shows the requests a run would send; `rmboost
//! report`, `export` and `merge` check, publish and join datasets. Run
//! `rmboost --help` for the flags, examples and exit statuses.
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, unreachable_pub)]

mod args;
mod backends;
mod batch;
mod dataset;
mod dry_run;
mod generate;
mod progress;
mod setup;
mod summary;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::setup::{CliError, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = Cli::parse();
    progress::init_tracing();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            progress::notice(&format!("error: {e}"));
            if e.code == EXIT_USAGE {
                progress::notice("For more information, try '--help'.");
            }
            e.code
        }
    };
    ExitCode::from(code)
}

/// `rmboost report`: the dataset report as text or JSON on stdout.
fn report(args: &args::ReportArgs) -> Result<u8, CliError> {
    use rmboost::io::FailureLedger;
    use rmboost::report::Report;
    let default = || Some(FailureLedger::default_path(&args.input)).filter(|p| p.exists());
    let report = match &args.ledger.clone().or_else(default) {
        Some(ledger) => Report::from_jsonl_with_ledger(&args.input, ledger),
        None => Report::from_jsonl(&args.input),
    }?;
    if args.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::fatal(format!("cannot write the report: {e}")))?;
        println!("{json}");
    } else {
        print!("{report}");
    }
    Ok(0)
}

fn run(cli: Cli) -> Result<u8, CliError> {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::fatal(format!("cannot start the async runtime: {e}")))
    };
    match cli.command {
        Command::DryRun(args) => dry_run::run(&args),
        Command::Report(args) => report(&args),
        Command::Batch(args) => runtime()?.block_on(batch::run(*args)),
        Command::Export(args) => dataset::export(&args),
        Command::Merge(args) => dataset::merge_shards(&args),
        Command::Generate(args) => {
            // One thread drives the run: the consuming task polls every example of the stream
            // anyway, and the model, the cache writer and blocking work have threads of their
            // own. A multi-thread runtime only added cross-thread wake-ups: at 256 requests in
            // flight it cost about 30% more CPU per example and 2-3% of throughput (see
            // benches/throughput.rs).
            let runtime = runtime()?;
            let result = runtime.block_on(generate::run(*args));
            // Do not wait for work a stop left behind (an abandoned in-flight call).
            runtime.shutdown_background();
            result
        }
    }
}
