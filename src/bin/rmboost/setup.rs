//! Turning flags into library values: aspects, labels, the generator.

use std::num::NonZeroUsize;
use std::sync::Arc;

use rmboost::{Aspects, Generator, LlmBackend, MethodConfig, OutputOrder};

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

/// The exit status of a run that ended so with `failed` examples, so that scripts can tell
/// the endings apart: 0 every prompt done (or `--limit` reached) with no failed example; 4
/// the same but some examples failed; 3 the cost budget was reached; 130 interrupted; 1 the
/// server was unreachable or the run failed. (2 is for bad flags.)
pub(crate) fn exit_status(outcome: rmboost::run::Outcome, failed: u64) -> u8 {
    use rmboost::run::Outcome;
    match outcome {
        Outcome::Completed | Outcome::LimitReached if failed > 0 => EXIT_EXAMPLES_FAILED,
        Outcome::Completed | Outcome::LimitReached => 0,
        Outcome::CostLimit => EXIT_COST_LIMIT,
        Outcome::Interrupted => EXIT_INTERRUPTED,
        _ => EXIT_FATAL,
    }
}

/// An error that ends the program: a one-line message and an exit status.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
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

impl From<rmboost::Error> for CliError {
    fn from(e: rmboost::Error) -> Self {
        CliError::fatal(error_chain(&e))
    }
}

pub(crate) use rmboost::error_chain;

/// The aspect set of `--aspects` and `--aspect-sampling`.
fn aspects(gen: &GenArgs) -> Result<Aspects, CliError> {
    let set = Aspects::from_spec(&gen.aspects).map_err(|e| match e.kind() {
        // A word that is neither a preset nor a file is a bad flag; a bad file is not.
        rmboost::ErrorKind::Config => CliError::usage(format!("--aspects: {}", error_chain(&e))),
        _ => CliError::from(e),
    })?;
    match &gen.aspect_sampling {
        None => Ok(set),
        Some(mode) => set
            .with_sampling_mode(mode)
            .map_err(|e| CliError::usage(format!("--aspect-sampling: {}", error_chain(&e)))),
    }
}

/// The method and settings of these flags (see [`MethodConfig`]).
pub(crate) fn method_config(gen: &GenArgs, order: OutputOrder) -> Result<MethodConfig, CliError> {
    let mut config = MethodConfig::new(gen.method);
    config.concurrency = NonZeroUsize::new(gen.concurrency)
        .ok_or_else(|| CliError::usage("--concurrency must be at least 1"))?;
    config.aspects = aspects(gen)?;
    config.graded = gen.labels == LabelKind::Graded;
    config.p_better = gen.p_better;
    config.seed = gen.seed;
    config.order = order;
    config.temperature = gen.temperature;
    config.max_tokens = gen.max_tokens;
    config.max_reasks = gen.max_reasks;
    config.samples = gen.samples;
    Ok(config)
}

/// The generator of `--method` around `backend`: RMBoost or a baseline on the same backend,
/// aspects, concurrency, order, seed and re-ask limit.
pub(crate) fn method_generator(
    gen: &GenArgs,
    backend: Arc<dyn LlmBackend>,
    order: OutputOrder,
) -> Result<Arc<dyn Generator>, CliError> {
    method_config(gen, order)?
        .build(backend)
        .map_err(|e| CliError::usage(error_chain(&e)))
}
