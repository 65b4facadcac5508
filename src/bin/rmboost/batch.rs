//! `rmboost batch status|cancel`: the provider batches of a `generate --batch` run. The state
//! and the cancelling are the library's (`rmboost::batch`); this shows them.

use crate::args::{BatchAction, BatchArgs};
use crate::backends;
use crate::setup::{error_chain, CliError};
use rmboost::batch::StateFile;

/// Runs `rmboost batch`: shows the batches of the state file (with the live status of those
/// not yet collected) or cancels those still running; returns the exit status: 1 when a
/// provider call failed.
pub(crate) async fn run(args: BatchArgs) -> Result<u8, CliError> {
    let (BatchAction::Status(t) | BatchAction::Cancel(t)) = &args.action;
    let path = StateFile::default_path(&t.output);
    let Some(state) = StateFile::read(&path)? else {
        match args.action {
            BatchAction::Status(_) => println!(
                "no batch run recorded for {} ({} does not exist: none ran, or the run finished)",
                t.output.display(),
                path.display()
            ),
            BatchAction::Cancel(_) => {
                println!("nothing to cancel: {} does not exist", path.display())
            }
        }
        return Ok(0);
    };
    let (api, _) = backends::batch_api(&t.backend, true)?;
    let mut failures = 0;
    match args.action {
        // The batches of the state with the live status of those not yet collected.
        BatchAction::Status(_) => {
            if state.api != api.name() {
                return Err(CliError::usage(format!(
                    "the batches of {} were made with --backend {}",
                    t.output.display(),
                    state.api
                )));
            }
            println!("run {} ({} API)", state.run, state.api);
            println!(
                "{:<5} {:<34} {:>8} {:<12} {:>9} {:>7}  results",
                "wave", "batch", "requests", "state", "succeeded", "failed"
            );
            for b in &state.batches {
                let id = b.provider_id.as_deref().unwrap_or("(not created yet)");
                let none = || "-".to_string();
                let (state_text, ok, failed) = match (&b.provider_id, b.downloaded) {
                    (Some(pid), false) => match api.status(pid).await {
                        Ok(s) => (
                            s.state.to_string(),
                            s.counts.succeeded.to_string(),
                            s.counts.failed.to_string(),
                        ),
                        Err(e) => {
                            failures += 1;
                            (format!("? ({})", error_chain(&e)), none(), none())
                        }
                    },
                    _ => (b.state.map_or_else(none, |s| s.to_string()), none(), none()),
                };
                println!(
                    "{:<5} {:<34} {:>8} {:<12} {:>9} {:>7}  {}",
                    b.wave,
                    id,
                    b.requests,
                    state_text,
                    ok,
                    failed,
                    if b.downloaded { "saved" } else { "pending" }
                );
            }
            let pending = state.batches.iter().filter(|b| !b.downloaded).count();
            println!(
                "{} batches, {pending} not yet collected (rerun the generate command to collect \
                 them)",
                state.batches.len()
            );
        }
        // Cancel the batches still running.
        BatchAction::Cancel(_) => {
            let results = rmboost::batch::cancel_batches(&*api, &t.output).await?;
            for (id, r) in &results {
                match r {
                    Ok(s) => println!("{id}: {}", s.state),
                    Err(e) => {
                        failures += 1;
                        println!("{id}: not cancelled: {}", error_chain(e));
                    }
                }
            }
            println!(
                "{} batches asked to cancel, {failures} failed; a rerun of the generate command \
                 collects what they finished and sends the rest again",
                results.len() - failures
            );
        }
    }
    Ok(u8::from(failures > 0))
}
