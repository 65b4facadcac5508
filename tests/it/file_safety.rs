//! The run's file safety and run policy, in the library (the command line gets them from
//! here): a second run on the same output, the same file under two names, a resume with other
//! settings, garbage inside an output, the ledger's compaction, the torn tail, a slow input,
//! the drain deadline, the cost budget, the unreachable-server stop and the exit statuses.

use crate::support;

use rmboost::GeneratorExt;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::stream;
use rmboost::backend::meter::Metered;
use rmboost::run::{
    ensure_distinct_files, run_to_file, CostBudget, Outcome, Prices, Recipe, RunOptions, StopSignal,
};
use rmboost::testing::{FakeBackend, ScriptedBackend};
use rmboost::{
    read_prompts, BackendError, BackendErrorKind, Error, ErrorKind, ExampleFormat, Prompt, RmBoost,
};
use support::prompts;
use support::reliability::{rows, write_input};

fn fake(latency: Duration) -> RmBoost {
    RmBoost::builder()
        .backend(FakeBackend::new().with_latency(latency))
        .seed(3)
        .build()
        .unwrap()
}

fn ok_stream(
    ps: Vec<Prompt>,
) -> impl futures::Stream<Item = Result<Prompt, Error>> + Send + 'static {
    stream::iter(ps.into_iter().map(Ok))
}

async fn run(
    rmb: &RmBoost,
    ps: Vec<Prompt>,
    out: &Path,
    options: RunOptions,
) -> Result<rmboost::run::RunSummary, Error> {
    run_to_file(|p| rmb.try_generate(p), ok_stream(ps), out, options).await
}

/// Two runs started at once on the same new output: the one that loses the lock fails and
/// leaves the winner's file alone (it used to delete it as "an empty file left behind", so
/// the winner wrote into an unlinked file and the dataset was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_run_on_a_new_output_never_removes_the_first_runs_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let slow = fake(Duration::from_millis(20));
    let winner = {
        let (slow, out) = (slow.clone(), out.clone());
        tokio::spawn(async move { run(&slow, prompts(40), &out, RunOptions::new()).await })
    };
    // The winner has created and locked the file (its recipe is written after the lock) and
    // it is still empty: its first example takes 40 ms.
    let t0 = Instant::now();
    while !Recipe::default_path(&out).exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the first run never started"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let loser = run(&fake(Duration::ZERO), prompts(40), &out, RunOptions::new()).await;
    let err = loser.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert!(rmboost::error_chain(&err).contains("another run"), "{err}");
    assert!(out.exists(), "the losing run removed the winner's output");
    let s = winner.await.unwrap().unwrap();
    assert_eq!(s.generation.examples, 40);
    assert!(!s.output_removed);
    assert_eq!(
        rows(&out).len(),
        40,
        "the winner's examples are in the file"
    );
}

/// A run that writes nothing removes the output only if it created it.
#[tokio::test]
async fn only_a_new_empty_output_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let rmb = fake(Duration::ZERO);
    let new = dir.path().join("new.jsonl");
    let s = run(&rmb, Vec::new(), &new, RunOptions::new())
        .await
        .unwrap();
    assert!(s.output_removed && !new.exists());
    assert!(
        !Recipe::default_path(&new).exists(),
        "its recipe goes with it"
    );
    let existing = dir.path().join("existing.jsonl");
    std::fs::write(&existing, b"").unwrap();
    let s = run(&rmb, Vec::new(), &existing, RunOptions::new())
        .await
        .unwrap();
    assert!(!s.output_removed && existing.exists());
}

/// The same file under two names (another spelling, a symlink, a hard link, the ledger or
/// the input as the output) is refused before anything is written, and the input is intact.
#[tokio::test]
async fn the_same_file_under_two_names_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data.jsonl");
    write_input(&input, &prompts(5));
    let before = std::fs::read(&input).unwrap();
    let rmb = fake(Duration::ZERO);
    let dotted = dir.path().join(".").join("data.jsonl");
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&input, &link).unwrap();
    let hard = dir.path().join("hard.jsonl");
    std::fs::hard_link(&input, &hard).unwrap();
    for (what, out, options) in [
        ("dotted", dotted.clone(), RunOptions::new().input(&input)),
        ("symlink", link.clone(), RunOptions::new().input(&input)),
        ("hard link", hard.clone(), RunOptions::new().input(&input)),
        (
            "ledger = input",
            dir.path().join("o1.jsonl"),
            RunOptions::new().input(&input).ledger(&hard),
        ),
        (
            "ledger = output",
            dir.path().join("o2.jsonl"),
            RunOptions::new().ledger(dir.path().join(".").join("o2.jsonl")),
        ),
    ] {
        let err = run(&rmb, prompts(5), &out, options).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{what}: {err}");
        assert!(err.to_string().contains("same file"), "{what}: {err}");
        assert_eq!(
            std::fs::read(&input).unwrap(),
            before,
            "{what}: input changed"
        );
    }
    assert!(!dir.path().join("o1.jsonl").exists() && !dir.path().join("o2.jsonl").exists());
    // Distinct files pass.
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    ensure_distinct_files(&[("a", &a), ("b", &b), ("input", &input)]).unwrap();
}

/// A rerun with another format or recipe is refused with a message naming each difference;
/// the same settings resume; an output from before recipes were recorded is checked by the
/// shape of its rows.
#[tokio::test]
async fn resume_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let rmb = fake(Duration::ZERO);
    let recipe = |seed: u64| Recipe::new().with("seed", seed).with("method", "rmboost");
    run(
        &rmb,
        prompts(10),
        &out,
        RunOptions::new().recipe(recipe(1)).limit(4),
    )
    .await
    .unwrap();
    let before = std::fs::read(&out).unwrap();

    let err = run(
        &rmb,
        prompts(10),
        &out,
        RunOptions::new()
            .recipe(recipe(1))
            .format(ExampleFormat::Standard),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(
        err.to_string()
            .contains("format was `conversational`, now `standard`"),
        "{err}"
    );
    let err = run(&rmb, prompts(10), &out, RunOptions::new().recipe(recipe(2)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("seed was `1`, now `2`"), "{err}");
    assert!(err.to_string().contains("new output file"), "{err}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        before,
        "refused runs wrote nothing"
    );

    let s = run(&rmb, prompts(10), &out, RunOptions::new().recipe(recipe(1)))
        .await
        .unwrap();
    assert_eq!((s.resumed, s.generation.examples), (4, 6));

    // An output without a recorded recipe (an older release's): the rows' shape decides.
    std::fs::remove_file(Recipe::default_path(&out)).unwrap();
    let err = run(
        &rmb,
        prompts(12),
        &out,
        RunOptions::new().format(ExampleFormat::Standard),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("format was `conversational`"),
        "{err}"
    );
    let s = run(&rmb, prompts(12), &out, RunOptions::new())
        .await
        .unwrap();
    assert_eq!(s.generation.examples, 2);
    assert!(
        Recipe::default_path(&out).exists(),
        "the recipe is recorded again"
    );
}

/// Garbage in the middle of an output (a power loss) is moved to `<output>.garbage` on
/// resume, so the dataset loads; the good lines stay.
#[tokio::test]
async fn garbage_inside_an_output_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let rmb = fake(Duration::ZERO);
    run(&rmb, prompts(6), &out, RunOptions::new().limit(3))
        .await
        .unwrap();
    let good = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    let mut f = std::fs::File::create(&out).unwrap();
    writeln!(f, "{}", lines[0]).unwrap();
    f.write_all(b"\0\0\0\0\0\0\n").unwrap();
    writeln!(f, "{}", lines[1]).unwrap();
    writeln!(f, "{{\"id\": truncated").unwrap();
    writeln!(f, "{}", lines[2]).unwrap();
    drop(f);
    let s = run(&rmb, prompts(6), &out, RunOptions::new())
        .await
        .unwrap();
    assert_eq!(s.garbage_lines, 2);
    assert_eq!((s.resumed, s.generation.examples), (3, 3));
    let text = std::fs::read_to_string(&out).unwrap();
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("only examples are left");
    }
    assert_eq!(text.lines().count(), 6);
    assert!(text.starts_with(&good), "the good lines keep their order");
    let aside = std::fs::read(dir.path().join("pairs.jsonl.garbage")).unwrap();
    assert_eq!(aside, b"\0\0\0\0\0\0\n{\"id\": truncated\n");
}

/// The ledger's compaction writes a fresh random name and renames it: a symlink planted at
/// the old fixed temp name (`<ledger>.tmp`) is never followed.
#[tokio::test]
async fn ledger_compaction_never_follows_a_planted_temp_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let ledger = dir.path().join("pairs.failures.jsonl");
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("pairs.failures.jsonl.tmp")).unwrap();
    let failing = RmBoost::builder()
        .backend(ScriptedBackend::from_fn(|_| {
            Err(BackendError::new(BackendErrorKind::InvalidRequest, "no").with_status(400))
        }))
        .build()
        .unwrap();
    let s = run(&failing, prompts(3), &out, RunOptions::new())
        .await
        .unwrap();
    assert_eq!((s.generation.failed(), s.ledger_pending), (3, 3));
    assert_eq!(s.outcome, Outcome::Completed);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(rows(&ledger).len(), 3);
    // No temp file is left beside the ledger.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.ends_with(".tmp") || n == "pairs.failures.jsonl.tmp"),
        "{names:?}"
    );
}

/// A long torn tail is saved whole to `<output>.torn` (copied through a small buffer) and cut.
#[tokio::test]
async fn a_long_torn_tail_is_saved_and_cut() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let rmb = fake(Duration::ZERO);
    run(&rmb, prompts(4), &out, RunOptions::new().limit(2))
        .await
        .unwrap();
    let good = std::fs::read(&out).unwrap();
    let tail: Vec<u8> = (0..20_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&out)
        .unwrap()
        .write_all(&tail)
        .unwrap();
    let s = run(&rmb, prompts(4), &out, RunOptions::new())
        .await
        .unwrap();
    assert_eq!(s.torn_bytes, tail.len() as u64);
    assert!(std::fs::read(&out).unwrap().starts_with(&good));
    let mut saved = std::fs::read(dir.path().join("pairs.jsonl.torn")).unwrap();
    assert_eq!(saved.pop(), Some(b'\n'));
    assert!(saved == tail, "the torn bytes are saved as they were");
}

/// Reading the input never blocks the runtime: with a pipe that gives nothing, a stop still
/// ends the run at once on a single-threaded runtime (a blocking read there froze every
/// timer, Ctrl-C included).
#[test]
fn a_slow_input_never_blocks_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("in.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // A writer that opens the pipe and never writes.
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            std::thread::sleep(Duration::from_secs(20));
            drop(f);
        })
    };
    let out = dir.path().join("pairs.jsonl");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = rt.block_on(async {
            let stop = StopSignal::new();
            let timer = {
                let stop = stop.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    stop.stop();
                })
            };
            let rmb = fake(Duration::ZERO);
            let s = run_to_file(
                |p| rmb.try_generate(p),
                read_prompts(&fifo).unwrap().into_stream(),
                &out,
                RunOptions::new().stop_signal(stop),
            )
            .await;
            timer.abort();
            s
        });
        let _ = tx.send(s.map(|s| s.outcome));
    });
    let outcome = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the run did not stop: the input read blocked the runtime");
    assert_eq!(outcome.unwrap(), Outcome::Interrupted);
    drop(writer);
}

/// After a stop the examples in flight get the drain deadline (60 s by default), then are
/// dropped; an abort drops them at once.
#[tokio::test(start_paused = true)]
async fn the_drain_after_a_stop_has_a_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let rmb = fake(Duration::from_secs(3600));
    for abort in [false, true] {
        let out = dir.path().join(format!("pairs-{abort}.jsonl"));
        let stop = StopSignal::new();
        let s2 = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if abort {
                s2.abort();
            } else {
                s2.stop();
            }
        });
        let t0 = tokio::time::Instant::now();
        let s = run(&rmb, prompts(20), &out, RunOptions::new().stop_signal(stop))
            .await
            .unwrap();
        let took = t0.elapsed();
        let want = if abort { 1 } else { 61 };
        assert!(
            took >= Duration::from_secs(want) && took < Duration::from_secs(want + 1),
            "abort={abort}: {took:?}"
        );
        assert_eq!(s.outcome, Outcome::Interrupted);
        assert_eq!(
            s.dropped_in_flight, 8,
            "the default concurrency's worth in flight"
        );
    }
}

/// A budget of 1.0 at 1000 per million tokens (prompt or completion): each example's calls
/// cost a few hundredths.
fn budget() -> CostBudget {
    CostBudget::new(Prices::new(1000.0, 1000.0).unwrap(), 1.0).unwrap()
}

/// The budget is checked after every example, not only on a timer: with instant answers and
/// one example at a time, the run stops right after the example that reached it.
#[tokio::test]
async fn the_cost_budget_stops_right_after_the_example_that_reaches_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let (backend, meter) = Metered::new(FakeBackend::new());
    let rmb = RmBoost::builder()
        .backend(backend)
        .concurrency(std::num::NonZeroUsize::MIN)
        .build()
        .unwrap();
    let s = run(
        &rmb,
        prompts(500),
        &out,
        RunOptions::new().meter(meter).max_cost(budget()),
    )
    .await
    .unwrap();
    assert_eq!(s.outcome, Outcome::CostLimit);
    let (cost, examples) = (s.cost.unwrap(), s.generation.examples);
    let per_example = cost / examples as f64;
    // The examples before the one that reached the budget cost less than it.
    assert!(
        (cost - per_example) < 1.0 + per_example,
        "{examples} examples cost {cost}: the run went on past the budget"
    );
}

/// The cost budget stops the run gracefully from the backend's meter.
#[tokio::test]
async fn the_cost_budget_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let (backend, meter) = Metered::new(FakeBackend::new().with_latency(Duration::from_millis(2)));
    let rmb = RmBoost::builder().backend(backend).build().unwrap();
    let s = run(
        &rmb,
        prompts(500),
        &out,
        RunOptions::new().meter(meter.clone()).max_cost(budget()),
    )
    .await
    .unwrap();
    assert_eq!(s.outcome, Outcome::CostLimit);
    let cost = s.cost.unwrap();
    assert!(cost >= 1.0, "{cost}");
    assert!(s.generation.examples > 0 && s.generation.examples < 500);
    assert_eq!(s.calls, meter.calls());
    // The budget without a meter is a configuration error.
    let err = run(&rmb, prompts(1), &out, RunOptions::new().max_cost(budget()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["outcome"], "cost_limit");
    assert!(json["elapsed"].as_f64().is_some());
}

/// A server that stays unreachable stops the run after a run of such failures instead of
/// failing every prompt in turn.
#[tokio::test]
async fn an_unreachable_server_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let down = RmBoost::builder()
        .backend(ScriptedBackend::from_fn(|_| {
            Err(BackendError::new(
                BackendErrorKind::Connection,
                "connection refused",
            ))
        }))
        .build()
        .unwrap();
    let s = run(
        &down,
        prompts(1000),
        &out,
        RunOptions::new().stop_when_unreachable(Some(5)),
    )
    .await
    .unwrap();
    assert_eq!(s.outcome, Outcome::Unreachable);
    assert!(s.generation.failed() < 50, "{}", s.generation.failed());
    assert!(
        s.message.as_deref().unwrap().contains("connection refused"),
        "{:?}",
        s.message
    );
    assert!(!out.exists(), "nothing written: no file left behind");
}
