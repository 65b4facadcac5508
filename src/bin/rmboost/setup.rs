//! Turning flags into library values (the method's settings, durations) and outcomes into
//! exit statuses; the program's error.

use std::num::NonZeroUsize;
use std::time::Duration;

use rmboost::{Aspects, MethodConfig, OutputOrder};

use crate::args::{GenArgs, LabelKind};

/// Exit status: a fatal error.
pub(crate) const EXIT_FATAL: u8 = 1;
/// Exit status: bad flags (what clap uses too).
pub(crate) const EXIT_USAGE: u8 = 2;

/// The exit status of a run that ended so with `failed` examples, so that scripts can tell
/// the endings apart: 0 every prompt done (or `--limit` reached) with no failed example; 4
/// the same but some examples failed (a rerun retries them); 3 the cost budget was reached;
/// 130 interrupted (Ctrl-C); 1 the server was unreachable or the run failed. (2 is for bad
/// flags.)
pub(crate) fn exit_status(outcome: rmboost::run::Outcome, failed: u64) -> u8 {
    use rmboost::run::Outcome;
    match outcome {
        Outcome::Completed | Outcome::LimitReached if failed > 0 => 4,
        Outcome::Completed | Outcome::LimitReached => 0,
        Outcome::CostLimit => 3,
        Outcome::Interrupted => 130,
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

/// `secs` of the flag `flag` as a duration: a positive number of seconds.
pub(crate) fn seconds(secs: f64, flag: &str) -> Result<Duration, CliError> {
    if !(secs.is_finite() && secs > 0.0) {
        return Err(CliError::usage(format!(
            "{flag} must be a positive number of seconds"
        )));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| CliError::usage(format!("{flag}: {e}")))
}

/// The method and settings of these flags (see [`MethodConfig`]), with the aspect set of
/// `--aspects` and `--aspect-sampling`.
pub(crate) fn method_config(gen: &GenArgs, order: OutputOrder) -> Result<MethodConfig, CliError> {
    let mut config = MethodConfig::new(gen.method);
    config.concurrency = NonZeroUsize::new(gen.concurrency)
        .ok_or_else(|| CliError::usage("--concurrency must be at least 1"))?;
    config.aspects = Aspects::from_spec(&gen.aspects).map_err(|e| match e.kind() {
        // A word that is neither a preset nor a file is a bad flag; a bad file is not.
        rmboost::ErrorKind::Config => CliError::usage(format!("--aspects: {}", error_chain(&e))),
        _ => CliError::from(e),
    })?;
    if let Some(mode) = &gen.aspect_sampling {
        config.aspects = config
            .aspects
            .with_sampling_mode(mode)
            .map_err(|e| CliError::usage(format!("--aspect-sampling: {}", error_chain(&e))))?;
    }
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
