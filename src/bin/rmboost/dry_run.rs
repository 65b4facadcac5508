//! `rmboost dry-run`: the requests a run would send, without calling any model.

use std::fmt::Write as _;
use std::io::Write as _;

use rmboost::methods::ExamplePlan;
use rmboost::{
    async_trait, BackendError, BackendErrorKind, Completion, CompletionRequest, LlmBackend,
    OutputOrder,
};
use serde_json::json;

use crate::args::DryRunArgs;
use crate::setup::{self, error_chain, CliError};

/// What stands in for the first response in the second request shown.
pub(crate) const FIRST_PLACEHOLDER: &str = "<first response goes here>";

/// The backend of the generator that plans the requests: a generator needs one to be built,
/// and a dry run never calls it.
#[derive(Debug)]
struct NoModel;

#[async_trait]
impl LlmBackend for NoModel {
    async fn complete(&self, _request: CompletionRequest) -> Result<Completion, BackendError> {
        Err(BackendError::new(
            BackendErrorKind::InvalidRequest,
            "a dry run calls no model",
        ))
    }
}

/// Runs `rmboost dry-run`; returns the exit status.
pub(crate) fn run(args: &DryRunArgs) -> Result<u8, CliError> {
    if args.gen.method != rmboost::Method::RmBoost {
        return Err(CliError::usage(format!(
            "dry-run shows the requests of --method rmboost only, not {}",
            args.gen.method
        )));
    }
    let rmb = setup::method_config(&args.gen, OutputOrder::Input)?
        .rmboost(NoModel)
        .map_err(|e| CliError::usage(error_chain(&e)))?;
    let reader = rmboost::read_prompts(&args.input)
        .map_err(|e| CliError::fatal(format!("cannot read the input: {}", error_chain(&e))))?;
    let mut out = std::io::stdout().lock();
    let mut shown = 0usize;
    let mut bad = 0u64;
    for item in reader {
        if shown >= args.count {
            break;
        }
        let prompt = match item {
            Ok(p) => p,
            Err(e) if e.kind() == rmboost::ErrorKind::Parse => {
                bad += 1;
                crate::progress::notice(&format!("rmboost: skipping a bad line: {e}"));
                continue;
            }
            Err(e) => return Err(CliError::fatal(error_chain(&e))),
        };
        shown += 1;
        let plan = rmb.plan(prompt);
        let first = rmb.first_request(&plan);
        let second = rmb.second_request(&plan, FIRST_PLACEHOLDER);
        let text = if args.json {
            json!({
                "id": plan.id,
                "seed": rmb.seed(),
                "label": plan.label.label,
                "grade": plan.label.grade,
                "margin": plan.label.margin,
                "aspects": plan.aspects.aspects,
                "model_picks": plan.aspects.model_picks,
                "variant": plan.variant,
                "first_seed": plan.first_seed,
                "second_seed": plan.second_seed,
                "first_request": &first,
                "second_request": &second,
                "first_placeholder": FIRST_PLACEHOLDER,
            })
            .to_string()
        } else {
            text_block(shown, &plan, &first, &second)
        };
        if writeln!(out, "{text}").is_err() {
            // A closed pipe (`| head`): stop quietly.
            return Ok(0);
        }
    }
    if shown == 0 && bad == 0 {
        crate::progress::notice("rmboost: the input has no prompts");
    }
    Ok(0)
}

fn params(r: &CompletionRequest) -> String {
    let parts = [
        r.temperature.map(|t| format!("temperature {t}")),
        r.top_p.map(|p| format!("top_p {p}")),
        r.max_tokens.map(|m| format!("max_tokens {m}")),
        r.seed.map(|seed| format!("seed {seed}")),
        (!r.stop.is_empty()).then(|| format!("stop {:?}", r.stop)),
    ];
    parts.into_iter().flatten().collect::<Vec<_>>().join(", ")
}

fn messages(out: &mut String, r: &CompletionRequest) {
    for m in &r.messages {
        let _ = writeln!(out, "[{}]\n{}", m.role, m.content.trim_end());
    }
}

fn text_block(
    n: usize,
    plan: &ExamplePlan,
    first: &CompletionRequest,
    second: &CompletionRequest,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "=== prompt {n}: id {}", plan.id);
    let mut label = plan.label.label.to_string();
    if let Some(g) = plan.label.grade {
        let _ = write!(label, " ({})", g.as_str());
    }
    if let Some(m) = plan.label.margin {
        let _ = write!(label, ", margin {m}");
    }
    let _ = writeln!(out, "label:   {label}");
    let names: Vec<&str> = plan
        .aspects
        .aspects
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    let names = names.join(", ");
    let _ = match plan.aspects.model_picks {
        Some(k) => writeln!(out, "aspects: the model picks up to {k} of {names}"),
        None => writeln!(out, "aspects: {names}"),
    };
    let _ = writeln!(out, "variant: {}", plan.variant);
    let _ = writeln!(out, "--- first request ({})", params(first));
    messages(&mut out, first);
    let _ = writeln!(
        out,
        "--- second request ({}; the first response is shown as {FIRST_PLACEHOLDER})",
        params(second)
    );
    messages(&mut out, second);
    out
}
