//! Turning flags into library values: aspects, labels, the generator.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use rmboost::engine::{default_first_params, default_second_params};
use rmboost::{
    Aspects, Bernoulli, Generator, Graded, LabelSampler, LlmBackend, Method, OutputOrder, Rlaif,
    Rlcd, RmBoost, WestOfN,
};

use crate::args::{GenArgs, LabelKind};

/// Exit status: a fatal error.
pub(crate) const EXIT_FATAL: u8 = 1;
/// Exit status: bad flags (what clap uses too).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit status: the cost budget was reached.
const EXIT_COST_LIMIT: u8 = 3;
/// Exit status: done, but some examples failed (a rerun retries them).
const EXIT_EXAMPLES_FAILED: u8 = 4;
/// Exit status: interrupted (Ctrl-C).
const EXIT_INTERRUPTED: u8 = 130;

/// The exit status of a run that returned `summary`, so that scripts can tell the endings
/// apart: 0 every prompt done (or `--limit` reached) with no failed example; 4 the same but
/// some examples failed; 3 the cost budget was reached; 130 interrupted; 1 the server was
/// unreachable or the run failed. (2 is for bad flags.)
pub(crate) fn exit_status(summary: &rmboost::run::RunSummary) -> u8 {
    use rmboost::run::Outcome;
    match summary.outcome {
        Outcome::Completed | Outcome::LimitReached if summary.generation.failed() > 0 => {
            EXIT_EXAMPLES_FAILED
        }
        Outcome::Completed | Outcome::LimitReached => 0,
        Outcome::CostLimit => EXIT_COST_LIMIT,
        Outcome::Interrupted => EXIT_INTERRUPTED,
        _ => EXIT_FATAL,
    }
}

/// An error that ends the program: a one-line message and an exit status.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl CliError {
    pub(crate) fn fatal(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_FATAL,
            message: message.into(),
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<rmboost::Error> for CliError {
    fn from(e: rmboost::Error) -> Self {
        CliError::fatal(error_chain(&e))
    }
}

pub(crate) use rmboost::error_chain;

/// The aspect set of `--aspects` and `--aspect-sampling`.
pub(crate) fn aspects(gen: &GenArgs) -> Result<Aspects, CliError> {
    let set = match Aspects::preset(&gen.aspects) {
        Some(set) => set,
        None => {
            let path = std::path::Path::new(&gen.aspects);
            if !path.exists() && !gen.aspects.contains(['/', '.', '\\']) {
                return Err(CliError::usage(format!(
                    "--aspects {}: not a preset ({}) nor a file",
                    gen.aspects,
                    Aspects::PRESETS.join(", ")
                )));
            }
            Aspects::from_json_file(path)?
        }
    };
    match &gen.aspect_sampling {
        None => Ok(set),
        Some(mode) => set
            .with_sampling_mode(mode)
            .map_err(|e| CliError::usage(format!("--aspect-sampling: {}", error_chain(&e)))),
    }
}

fn labels(gen: &GenArgs) -> Result<Arc<dyn LabelSampler>, CliError> {
    let bad = |e: rmboost::Error| CliError::usage(format!("--p-better: {}", error_chain(&e)));
    Ok(match gen.labels {
        LabelKind::Bernoulli => Arc::new(Bernoulli::new(gen.p_better).map_err(bad)?),
        LabelKind::Graded => {
            // "Much" as often as "slightly", the library's default.
            Arc::new(Graded::new(gen.p_better, 0.5).map_err(bad)?)
        }
    })
}

/// Builds the generator of these flags around `backend`.
pub(crate) fn generator(
    gen: &GenArgs,
    backend: Arc<dyn LlmBackend>,
    order: OutputOrder,
) -> Result<RmBoost, CliError> {
    let concurrency = NonZeroUsize::new(gen.concurrency)
        .ok_or_else(|| CliError::usage("--concurrency must be at least 1"))?;
    let mut first = default_first_params().temperature(gen.temperature);
    let mut second = default_second_params().temperature(gen.temperature);
    if let Some(n) = gen.max_tokens {
        first = first.max_tokens(n);
        second = second.max_tokens(n);
    }
    let builder = RmBoost::builder()
        .backend(backend)
        .aspects(aspects(gen)?)
        .concurrency(concurrency)
        .order(order)
        .seed(gen.seed)
        .first_params(first)
        .second_params(second)
        .max_reasks(gen.max_reasks);
    let labels = labels(gen)?;
    builder
        .labels(labels)
        .build()
        .map_err(|e| CliError::usage(error_chain(&e)))
}

/// The generator of `--method`: RMBoost (see [`generator`]) or a baseline on the same backend,
/// aspects, concurrency, order, seed and re-ask limit.
pub(crate) fn method_generator(
    gen: &GenArgs,
    backend: Arc<dyn LlmBackend>,
    order: OutputOrder,
) -> Result<Arc<dyn Generator>, CliError> {
    let usage = |e: rmboost::Error| CliError::usage(error_chain(&e));
    let concurrency = NonZeroUsize::new(gen.concurrency)
        .ok_or_else(|| CliError::usage("--concurrency must be at least 1"))?;
    let mut params = default_first_params().temperature(gen.temperature);
    if let Some(n) = gen.max_tokens {
        params = params.max_tokens(n);
    }
    Ok(match gen.method {
        Method::RmBoost => Arc::new(generator(gen, backend, order)?),
        Method::Rlcd => Arc::new(
            Rlcd::builder()
                .backend(backend)
                .aspects(aspects(gen)?)
                .params(params)
                .concurrency(concurrency)
                .order(order)
                .seed(gen.seed)
                .max_reasks(gen.max_reasks)
                .build()
                .map_err(usage)?,
        ),
        Method::Rlaif => Arc::new(
            Rlaif::builder()
                .backend(backend)
                .params(params)
                .concurrency(concurrency)
                .order(order)
                .seed(gen.seed)
                .max_reasks(gen.max_reasks)
                .build()
                .map_err(usage)?,
        ),
        Method::WestOfN => Arc::new(
            WestOfN::builder()
                .backend(backend)
                .n(gen.samples)
                .params(params)
                .concurrency(concurrency)
                .order(order)
                .seed(gen.seed)
                .max_reasks(gen.max_reasks)
                .build()
                .map_err(usage)?,
        ),
        other => {
            return Err(CliError::usage(format!(
                "--method {other}: not available from the command line"
            )))
        }
    })
}
