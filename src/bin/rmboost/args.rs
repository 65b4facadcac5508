//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXAMPLES: &str = "\
Examples:
  # A local OpenAI-compatible server (llama.cpp, vLLM, Ollama):
  rmboost generate --input prompts.jsonl --output pairs.jsonl \\
      --backend openai --base-url http://127.0.0.1:8080/v1 --model smollm2

  # OpenAI, with a cost limit (key from OPENAI_API_KEY):
  rmboost generate -i prompts.jsonl -o pairs.jsonl --backend openai --model gpt-4o-mini \\
      --price-input 0.15 --price-output 0.60 --max-cost 5

  # OpenAI's batch API (half the price; rerun the same command to resume):
  rmboost generate -i prompts.jsonl -o pairs.jsonl --backend openai --model gpt-4o-mini --batch

  # See what would be sent for the first three prompts, without calling a model:
  rmboost dry-run -i prompts.jsonl -n 3

  # One task of a job array takes its shard from the scheduler (`sbatch --array=0-7`, or a
  # Kubernetes Indexed Job with `completions: 8` and --shards 8); then `rmboost merge`.
  # Ready-made Slurm and Kubernetes files: deploy/ in the repository.
  rmboost generate -i prompts.jsonl -o parts/part-$SLURM_ARRAY_TASK_ID.jsonl --shard auto \\
      --backend openai --base-url http://gpu1:8000/v1 --model NAME

Rerunning the same `generate` command resumes: examples already in the output are skipped.

Exit status:
  0    every prompt was processed (or --limit reached) and no example failed
  1    a fatal error (bad key, exhausted or daily quota, unreachable server, unreadable
       input, settings that differ from the output's, ...): one line on stderr
  2    bad command-line flags (or two paths naming the same file)
  3    stopped by --max-cost (the output is valid; rerun with a higher limit to continue)
  4    every prompt was processed but some examples failed (they are listed in the failure
       ledger; rerun to retry them)
  130  interrupted by Ctrl-C (the first Ctrl-C finishes the examples in flight, for at most
       60 s, and prints the summary; a second one drops them and stops at once; with
       --batch the run stops at once and the batches keep running at the provider)

Environment:
  OPENAI_API_KEY, ANTHROPIC_API_KEY   API keys for the providers' own URLs (a custom
                                      --base-url gets a key only with --api-key-env VAR)
  RUST_LOG                            log filter for stderr (default: warn)
  SLURM_ARRAY_TASK_ID (_MIN, _MAX,    the shard of --shard auto in a Slurm job array
    _STEP, _COUNT)
  JOB_COMPLETION_INDEX                the shard of --shard auto in a Kubernetes Indexed
                                      Job (with --shards N, the Job's completions)";

/// Synthetic preference data for reward models (RMBoost).
#[derive(Debug, Parser)]
#[command(
    name = "rmboost",
    version,
    about = "Synthetic preference data for reward models (RMBoost)",
    long_about = "Synthetic preference data for reward models with RMBoost: for each prompt, a \
        first response, then a second response asked to be better or worse on a few drawn \
        aspects. The pairs are written as JSONL for TRL's reward and DPO trainers.",
    after_help = EXAMPLES,
    propagate_version = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Generate preference pairs from a JSONL file of prompts (resumes by default).
    #[command(after_help = EXAMPLES)]
    Generate(Box<GenerateArgs>),
    /// Show the requests a run would send for the first prompts, without calling any model.
    #[command(visible_alias = "inspect")]
    DryRun(Box<DryRunArgs>),
    /// Quality report of a preference dataset: balance, length bias, near-duplicates,
    /// diversity, aspects, failure rate.
    Report(ReportArgs),
    /// The provider batches of a `generate --batch` run: show them or cancel them.
    Batch(Box<BatchArgs>),
    /// Write a dataset as a folder for the Hugging Face Hub: Parquet files per split and a
    /// dataset card (README.md).
    #[command(after_help = EXPORT_EXAMPLES)]
    Export(ExportArgs),
    /// Merge the outputs of a sharded run (`generate --shard I/N`) into one file, checking
    /// that together they cover the input.
    #[command(after_help = MERGE_EXAMPLES)]
    Merge(MergeArgs),
}

const EXPORT_EXAMPLES: &str = "\
Examples:
  # A folder that `datasets.load_dataset(\"hub\")` and `hf upload` take as it is:
  rmboost export pairs.jsonl --to hub

  # With a test split of 5% (by a hash of each id: stable when the data grows):
  rmboost export pairs.jsonl --to hub --test-fraction 0.05

  # Then publish it:
  hf upload USER/NAME hub --repo-type dataset

The card uses pairs.run.json (the run's settings) and pairs.failures.jsonl (its failure
ledger) when they are beside the input. The input is only read.

Exit status:
  0    the folder was written
  1    an error (a bad input line, with its file and line; a folder that is not empty
       without --force; a file that cannot be written): nothing was left in the folder
  2    bad command-line flags";

const MERGE_EXAMPLES: &str = "\
Examples:
  # Four shards, run anywhere, then merged and checked against the prompts:
  rmboost generate -i prompts.jsonl -o part0.jsonl --shard 0/4   # ... and 1/4, 2/4, 3/4
  rmboost merge part0.jsonl part1.jsonl part2.jsonl part3.jsonl -o pairs.jsonl \\
      --input prompts.jsonl

The shards' failure ledgers (part0.failures.jsonl, ...) are merged into
pairs.failures.jsonl (ids that failed and never succeeded), and their recipe into
pairs.run.json when all shards have the same one.

Exit status:
  0    the merged file was written
  1    an error: a bad shard line (with its file and line), an id with different content in
       two places, prompts in no shard and no ledger, an output that exists without --force;
       nothing was written
  2    bad command-line flags";

/// Arguments of `rmboost export`.
#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// The dataset (JSONL, either format).
    #[arg(value_name = "PAIRS.jsonl")]
    pub(crate) input: PathBuf,

    /// The folder to write (created if missing; refused if not empty, unless --force).
    #[arg(long, value_name = "DIR")]
    pub(crate) to: PathBuf,

    /// Share of the examples in a `test` split, from 0 to 1 (by a hash of each id).
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub(crate) test_fraction: f64,

    /// At most N rows per Parquet file [default: files end at about 256 MiB].
    #[arg(long, value_name = "N")]
    pub(crate) rows_per_file: Option<u64>,

    /// At most N rows per row group.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub(crate) rows_per_group: usize,

    /// Write into a folder that is not empty, replacing its data/ and README.md (other
    /// files in it are left alone).
    #[arg(long)]
    pub(crate) force: bool,

    /// Failure ledger for the card's failure rate [default: PAIRS.failures.jsonl when it
    /// exists].
    #[arg(long, value_name = "FILE")]
    pub(crate) ledger: Option<PathBuf>,

    /// Title of the dataset card [default: the folder's name].
    #[arg(long, value_name = "TEXT")]
    pub(crate) title: Option<String>,
}

/// Arguments of `rmboost merge`.
#[derive(Debug, Args)]
pub(crate) struct MergeArgs {
    /// The shards' output files.
    #[arg(value_name = "SHARD.jsonl", required = true)]
    pub(crate) shards: Vec<PathBuf>,

    /// The merged file.
    #[arg(long, short, value_name = "PAIRS.jsonl")]
    pub(crate) output: PathBuf,

    /// The prompts the shards were made from: every prompt must be in the merged file once
    /// or in a shard's failure ledger.
    #[arg(long, short, value_name = "PROMPTS.jsonl")]
    pub(crate) input: Option<PathBuf>,

    /// Replace an existing output (never a shard or the input).
    #[arg(long)]
    pub(crate) force: bool,
}

/// `rmboost batch`.
#[derive(Debug, Args)]
pub(crate) struct BatchArgs {
    #[command(subcommand)]
    pub(crate) action: BatchAction,
}

/// What `rmboost batch` does.
#[derive(Debug, Subcommand)]
pub(crate) enum BatchAction {
    /// Show the batches of the run writing OUT (from PAIRS.batches.json, with the live
    /// status of those not yet collected).
    Status(BatchTarget),
    /// Cancel the batches of the run writing OUT that are still running.
    Cancel(BatchTarget),
}

/// The run whose batches `rmboost batch` acts on, and how to reach the provider.
#[derive(Debug, Args)]
pub(crate) struct BatchTarget {
    /// The output of the `generate --batch` run.
    #[arg(long, short, value_name = "PAIRS.jsonl")]
    pub(crate) output: PathBuf,

    #[command(flatten)]
    pub(crate) backend: BackendArgs,
}

/// Arguments of `rmboost report`.
#[derive(Debug, Args)]
pub(crate) struct ReportArgs {
    /// The dataset (JSONL, either format).
    #[arg(value_name = "PAIRS.jsonl")]
    pub(crate) input: PathBuf,

    /// Failure ledger to count failures from [default: PAIRS.failures.jsonl when it exists].
    #[arg(long, value_name = "FILE")]
    pub(crate) ledger: Option<PathBuf>,

    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Which model backend answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BackendKind {
    /// A GGUF model run in-process (feature `local`).
    Local,
    /// An OpenAI-compatible chat completions server (OpenAI, vLLM, llama.cpp, Ollama, ...).
    Openai,
    /// The Anthropic Messages API.
    Anthropic,
}

/// How labels are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LabelKind {
    /// Better or worse.
    Bernoulli,
    /// Slightly or much better or worse; fills the `margin` column.
    Graded,
}

/// Output line shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum FormatKind {
    /// `prompt`, `chosen`, `rejected` as lists of chat messages.
    Conversational,
    /// `prompt`, `chosen`, `rejected` as plain strings.
    Standard,
}

/// Output order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OrderKind {
    /// As each example finishes (fastest).
    Completion,
    /// In input order.
    Input,
}

/// What to do with a bad input line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BadLineKind {
    /// Report it and go on.
    Skip,
    /// Stop the run with an error.
    Stop,
}

/// How progress is shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProgressKind {
    /// A bar on a terminal, periodic log lines otherwise.
    Auto,
    /// Periodic log lines.
    Log,
    /// Nothing.
    Off,
}

/// The model and how to reach it.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Model")]
pub(crate) struct BackendArgs {
    /// Which backend answers [default: local when built with it, else openai].
    #[arg(long, value_enum)]
    pub(crate) backend: Option<BackendKind>,

    /// Base URL of the API (for openai: e.g. http://127.0.0.1:8080/v1). Give it more than
    /// once for several replicas of one model: the calls spread over them, both calls of an
    /// example on one replica, each replica with its own concurrency limit, a failing one
    /// drained and probed back.
    #[arg(long, value_name = "URL")]
    pub(crate) base_url: Vec<String>,

    /// A file of base URLs, one a line (blank lines and lines starting with # are skipped),
    /// added to those of --base-url.
    #[arg(long, value_name = "FILE")]
    pub(crate) base_url_file: Option<std::path::PathBuf>,

    /// Model name sent to the API.
    #[arg(long, value_name = "NAME")]
    pub(crate) model: Option<String>,

    /// Read the API key from this environment variable. Without it, OPENAI_API_KEY or
    /// ANTHROPIC_API_KEY is read for the provider's own URL only: a custom --base-url gets
    /// no key unless named here.
    #[arg(long, value_name = "VAR")]
    pub(crate) api_key_env: Option<String>,

    /// GGUF model file for --backend local [default: $RMBOOST_MODEL, then the cached default].
    #[arg(long, value_name = "FILE")]
    pub(crate) model_path: Option<PathBuf>,

    /// Transport retries per call on rate limits, server errors and timeouts.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub(crate) retries: u32,

    /// Timeout of one HTTP call, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub(crate) timeout: f64,

    /// Requests per minute at most.
    #[arg(long, value_name = "N")]
    pub(crate) rpm: Option<u32>,

    /// Tokens per minute at most (estimated before each call).
    #[arg(long, value_name = "N")]
    pub(crate) tpm: Option<u32>,

    /// Keep --concurrency calls in flight. By default an HTTP backend adapts: --concurrency
    /// is the cap, the limit starts at 16 or less and doubles until the server refuses
    /// calls, drops when many calls are answered 429 (not for a few random ones) and climbs
    /// back after successes. Either way a server that tells many calls to wait
    /// (Retry-After) pauses every call, and an outage pauses them (circuit breaker).
    #[arg(long)]
    pub(crate) fixed_concurrency: bool,
}

/// How the examples are drawn and sampled.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Generation")]
pub(crate) struct GenArgs {
    /// Generation method: rmboost, or one of the paper's baselines (rlcd, rlaif, west-of-n).
    #[arg(long, value_name = "METHOD", default_value = "rmboost")]
    pub(crate) method: rmboost::Method,

    /// West-of-N: samples per prompt (at least 2).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub(crate) samples: usize,

    /// Aspect set: qa, ultrafeedback, summarization, general, or a JSON file.
    #[arg(long, value_name = "PRESET|FILE", default_value = "general")]
    pub(crate) aspects: String,

    /// Aspects per example: all, K, MIN-MAX, or model-picks[:K] [default: the set's own].
    #[arg(long, value_name = "MODE")]
    pub(crate) aspect_sampling: Option<String>,

    /// Label sampler.
    #[arg(long, value_enum, default_value_t = LabelKind::Bernoulli)]
    pub(crate) labels: LabelKind,

    /// Probability that the second response is asked to be better.
    #[arg(long, value_name = "P", default_value_t = 0.5)]
    pub(crate) p_better: f64,

    /// Run seed: with each prompt's id it fixes every random draw.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) seed: u64,

    /// Sampling temperature of both calls.
    #[arg(long, value_name = "T", default_value_t = 0.7)]
    pub(crate) temperature: f32,

    /// Token limit of each answer [default: 512 for the first, 768 for the second].
    #[arg(long, value_name = "N")]
    pub(crate) max_tokens: Option<u32>,

    /// Times an unusable answer (empty, a copy, meta-talk) is asked again.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub(crate) max_reasks: u32,

    /// Examples generated at once.
    #[arg(long, short = 'j', value_name = "N", default_value_t = 8)]
    pub(crate) concurrency: usize,
}

/// `rmboost generate`.
#[derive(Debug, Clone, Args)]
pub(crate) struct GenerateArgs {
    /// Prompts, one JSON object per line: {"id": ..., "prompt": ...} or {"messages": [...]}.
    #[arg(long, short, value_name = "PROMPTS.jsonl")]
    pub(crate) input: PathBuf,

    /// Where the pairs go (appended to; resumed by default).
    #[arg(long, short, value_name = "PAIRS.jsonl")]
    pub(crate) output: PathBuf,

    /// Generate at most N examples in this run.
    #[arg(long, value_name = "N")]
    pub(crate) limit: Option<u64>,

    /// Output line shape.
    #[arg(long, value_enum, default_value_t = FormatKind::Conversational)]
    pub(crate) format: FormatKind,

    /// Output order.
    #[arg(long, value_enum, default_value_t = OrderKind::Completion)]
    pub(crate) order: OrderKind,

    /// Only the ids of shard I of N (0-based), e.g. 0/4; give each shard its own output.
    /// `auto`: the shard of this task of a Slurm job array (from SLURM_ARRAY_TASK_ID, MIN,
    /// MAX, STEP and COUNT: `sbatch --array=0-7` makes 8 shards) or of this pod of a
    /// Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with --shards).
    #[arg(long, value_name = "I/N|auto")]
    pub(crate) shard: Option<String>,

    /// With --shard auto: the number of shards. Needed for a Kubernetes Indexed Job (its
    /// `completions`, which Kubernetes does not export); with a Slurm array, checked against
    /// the array's size.
    #[arg(long, value_name = "N", requires = "shard")]
    pub(crate) shards: Option<u32>,

    /// Start the output afresh instead of resuming (deletes its examples and ledger).
    #[arg(long, visible_alias = "no-resume")]
    pub(crate) overwrite: bool,

    /// What to do with a bad input line.
    #[arg(long, value_enum, default_value_t = BadLineKind::Skip)]
    pub(crate) on_bad_line: BadLineKind,

    /// Where failed examples are listed [default: PAIRS.failures.jsonl beside the output].
    #[arg(long, value_name = "FILE")]
    pub(crate) ledger: Option<PathBuf>,

    /// Do not use the response cache.
    #[arg(long)]
    pub(crate) no_cache: bool,

    /// Response cache directory [default: the per-user cache directory].
    #[arg(long, value_name = "DIR")]
    pub(crate) cache_dir: Option<PathBuf>,

    /// Empty the response cache before the run.
    #[arg(long)]
    pub(crate) clear_cache: bool,

    /// Price of a million input (prompt) tokens, for the running cost.
    #[arg(long, value_name = "PRICE", help_heading = "Cost")]
    pub(crate) price_input: Option<f64>,

    /// Price of a million output (completion) tokens, for the running cost.
    #[arg(long, value_name = "PRICE", help_heading = "Cost")]
    pub(crate) price_output: Option<f64>,

    /// Stop gracefully once the cost reaches this (needs a price); exit status 3.
    #[arg(long, value_name = "AMOUNT", help_heading = "Cost")]
    pub(crate) max_cost: Option<f64>,

    /// Send the calls through the provider's batch API (half the price; results within
    /// hours): --backend openai or anthropic. Rerun the same command to resume; see
    /// `rmboost batch status|cancel`.
    #[arg(long, help_heading = "Batch")]
    pub(crate) batch: bool,

    /// Requests per batch wave (capped by the provider's limits).
    #[arg(long, value_name = "N", default_value_t = 1000, help_heading = "Batch")]
    pub(crate) batch_size: usize,

    /// First wait between two polls of a batch, in seconds; it grows while a batch does not
    /// change, up to 20 times this (at most 10 minutes more).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30.0,
        help_heading = "Batch"
    )]
    pub(crate) poll_secs: f64,

    /// Batch price of a million input tokens [default: half of --price-input].
    #[arg(long, value_name = "PRICE", help_heading = "Batch")]
    pub(crate) batch_price_input: Option<f64>,

    /// Batch price of a million output tokens [default: half of --price-output].
    #[arg(long, value_name = "PRICE", help_heading = "Batch")]
    pub(crate) batch_price_output: Option<f64>,

    /// Also write the final summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) summary_json: Option<PathBuf>,

    /// How progress is shown on stderr.
    #[arg(long, value_enum, default_value_t = ProgressKind::Auto)]
    pub(crate) progress: ProgressKind,

    #[command(flatten)]
    pub(crate) backend: BackendArgs,

    #[command(flatten)]
    pub(crate) gen: GenArgs,
}

/// `rmboost dry-run`.
#[derive(Debug, Clone, Args)]
pub(crate) struct DryRunArgs {
    /// Prompts, one JSON object per line.
    #[arg(long, short, value_name = "PROMPTS.jsonl")]
    pub(crate) input: PathBuf,

    /// How many prompts to show.
    #[arg(long, short = 'n', value_name = "N", default_value_t = 3)]
    pub(crate) count: usize,

    /// One JSON object per prompt instead of text.
    #[arg(long)]
    pub(crate) json: bool,

    #[command(flatten)]
    pub(crate) gen: GenArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
