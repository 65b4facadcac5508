//! The run loop: resume, duplicates, bad lines, shards, the ledger, graceful stop and locking.

use crate::support;

use rmboost::GeneratorExt;
use std::num::NonZeroUsize;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use rmboost::io::{FailureLedger, OutputFile, SyncPolicy};
use rmboost::run::{
    run_to_file, BadLinePolicy, ExistingOutput, Progress, RunOptions, Shard, StopSignal,
};
use rmboost::testing::{FakeBackend, ScriptedBackend};
use rmboost::ErrorKind;
use rmboost::{
    read_prompts, BackendError, BackendErrorKind, Completion, Error, ExampleFormat, Prompt, RmBoost,
};
use support::prompts;
use support::reliability::{labels_by_id, rows, write_input};

fn fake(seed: u64) -> RmBoost {
    RmBoost::builder()
        .backend(FakeBackend::new())
        .seed(seed)
        .build()
        .unwrap()
}

fn ok_stream(
    ps: Vec<Prompt>,
) -> impl futures::Stream<Item = Result<Prompt, Error>> + Send + 'static {
    stream::iter(ps.into_iter().map(Ok))
}

#[tokio::test]
async fn resume_skips_done_and_keeps_draws() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let full = dir.path().join("full.jsonl");
    let rmb = fake(9);
    let all = prompts(100);

    // Uninterrupted reference.
    run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(all.clone()),
        &full,
        RunOptions::new(),
    )
    .await
    .unwrap();

    // First 30, then everything.
    let s1 = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(all.clone()),
        &out,
        RunOptions::new().limit(30),
    )
    .await
    .unwrap();
    assert_eq!(s1.generation.examples, 30);
    let s2 = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(all.clone()),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    assert_eq!(s2.resumed, 30);
    assert_eq!(s2.skipped_done, 30);
    assert_eq!(s2.generation.examples, 70);
    assert!(!s2.interrupted);
    assert_eq!(labels_by_id(&out), labels_by_id(&full));
    assert!(!FailureLedger::default_path(&out).exists());
}

#[tokio::test]
async fn duplicates_in_input_first_wins() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl");
    let mut ps = prompts(5);
    ps.push(Prompt::with_id("p0001", "a different text"));
    ps.push(Prompt::with_id("p0003", "again"));
    let s = run_to_file(
        |p| fake(1).try_generate(p),
        ok_stream(ps),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    assert_eq!(s.generation.examples, 5);
    assert_eq!(s.duplicates, 2);
    assert_eq!(s.duplicate_ids, vec!["p0001", "p0003"]);
    let r = rows(&out);
    let p1 = r.iter().find(|r| r["id"] == "p0001").unwrap();
    assert_eq!(p1["prompt"][0]["content"], "Question number 1: why?");
}

#[tokio::test]
async fn bad_lines_skip_or_stop() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\":\"a\",\"prompt\":\"one\"}\n{oops\n{\"id\":\"b\",\"prompt\":\"two\"}\n\u{0}\u{1}\n{\"id\":\"c\",\"prompt\":\"three\"}\n",
    )
    .unwrap();
    let out = dir.path().join("skip.jsonl");
    let s = run_to_file(
        |p| fake(1).try_generate(p),
        stream::iter(read_prompts(&input).unwrap()),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    assert_eq!(s.generation.examples, 3);
    assert_eq!(s.bad_lines, 2);
    assert!(
        s.bad_line_messages[0].contains("in.jsonl:2:"),
        "{:?}",
        s.bad_line_messages
    );
    assert!(
        s.bad_line_messages[1].contains("in.jsonl:4:"),
        "{:?}",
        s.bad_line_messages
    );

    let out = dir.path().join("stop.jsonl");
    let progress = Progress::new();
    let err = run_to_file(
        |p| fake(1).try_generate(p),
        stream::iter(read_prompts(&input).unwrap()),
        &out,
        RunOptions::new()
            .bad_lines(BadLinePolicy::Stop)
            .progress(progress.clone()),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.kind(), err.line()),
        (ErrorKind::Parse, Some(2)),
        "{err}"
    );
    // The example before the bad line is written, nothing after it.
    assert_eq!(rows(&out).len(), 1);
    assert_eq!(progress.snapshot().generation.examples, 1);
    assert_eq!(progress.snapshot().bad_lines, 1);
}

#[tokio::test]
async fn shards_partition_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let all = prompts(200);
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for i in 0..3 {
        let out = dir.path().join(format!("shard{i}.jsonl"));
        let s = run_to_file(
            |p| fake(4).try_generate(p),
            ok_stream(all.clone()),
            &out,
            RunOptions::new().shard(Shard::new(i, 3).unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(s.generation.examples + s.other_shard, 200);
        for r in rows(&out) {
            assert!(Shard::new(i, 3)
                .unwrap()
                .contains(r["id"].as_str().unwrap()));
            assert!(seen.insert(r["id"].as_str().unwrap().to_string()));
        }
        total += s.generation.examples;
    }
    assert_eq!(total, 200);
    assert!(Shard::new(3, 3).is_err() && Shard::new(0, 0).is_err());
}

/// A backend that fails permanently (not fatally) for some ids until told otherwise.
fn flaky_for(ids: &'static [&'static str]) -> ScriptedBackend {
    ScriptedBackend::from_fn(move |req| {
        let text = &req.messages.last().unwrap().content;
        if ids.iter().any(|id| text.contains(&format!("<<{id}>>"))) {
            return Err(BackendError::new(
                BackendErrorKind::InvalidRequest,
                "too long for this model",
            ));
        }
        FakeBackend::new().complete_sync(req)
    })
}

trait CompleteSync {
    fn complete_sync(&self, req: &rmboost::CompletionRequest) -> Result<Completion, BackendError>;
}

impl CompleteSync for FakeBackend {
    fn complete_sync(&self, req: &rmboost::CompletionRequest) -> Result<Completion, BackendError> {
        futures::executor::block_on(rmboost::LlmBackend::complete(self, req.clone()))
    }
}

#[tokio::test]
async fn failures_go_to_the_ledger_and_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let ledger = dir.path().join("pairs.failures.jsonl");
    let ps: Vec<Prompt> = (0..10)
        .map(|i| Prompt::with_id(format!("x{i}"), format!("<<x{i}>> question")))
        .collect();
    let rmb = RmBoost::builder()
        .backend(flaky_for(&["x3", "x7"]))
        .build()
        .unwrap();
    let s = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(ps.clone()),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    assert_eq!(s.generation.examples, 8);
    assert_eq!(s.generation.failures.get("invalid_request"), Some(&2));
    assert_eq!(s.ledger_pending, 2);
    let recs = FailureLedger::read(&ledger).unwrap();
    let mut ids: Vec<_> = recs.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["x3", "x7"]);
    assert_eq!(recs[0].kind, "invalid_request");
    assert!(
        recs[0].message.contains("too long for this model"),
        "{}",
        recs[0].message
    );
    for row in std::fs::read_to_string(&out).unwrap().lines() {
        assert!(!row.contains("too long"), "error text in a row: {row}");
    }

    // Still failing: the ledger keeps one record each, with the count of runs.
    let s = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(ps.clone()),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    assert_eq!((s.skipped_done, s.generation.failed()), (8, 2));
    let recs = FailureLedger::read(&ledger).unwrap();
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r.runs == 2));

    // Fixed: the rerun fills them in and the ledger disappears.
    let rmb = fake(0);
    let s = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(ps),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    assert_eq!(s.generation.examples, 2);
    assert_eq!(s.ledger_pending, 0);
    assert!(!ledger.exists());
    assert_eq!(labels_by_id(&out).len(), 10);
}

#[tokio::test]
async fn fatal_error_stops_with_err_and_valid_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl");
    let backend = ScriptedBackend::from_fn(|_| {
        Err(BackendError::new(
            BackendErrorKind::Authentication,
            "bad key",
        ))
    });
    let rmb = RmBoost::builder().backend(backend).build().unwrap();
    let progress = Progress::new();
    let err = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(prompts(20)),
        &out,
        RunOptions::new().progress(progress.clone()),
    )
    .await
    .unwrap_err();
    assert!(err.is_fatal());
    assert_eq!(
        progress
            .snapshot()
            .generation
            .failures
            .get("authentication"),
        Some(&1)
    );
    // Fatal errors are not the example's fault: nothing in the ledger.
    assert!(!FailureLedger::default_path(&out).exists());
}

#[tokio::test]
async fn graceful_stop_finishes_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl");
    let rmb = RmBoost::builder()
        .backend(FakeBackend::new().with_latency(Duration::from_millis(20)))
        .concurrency(NonZeroUsize::new(16).unwrap())
        .build()
        .unwrap();
    let stop = StopSignal::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s2.stop();
    });
    let s = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(prompts(300)),
        &out,
        RunOptions::new().stop_signal(stop),
    )
    .await
    .unwrap();
    assert!(s.interrupted);
    assert!(s.generation.examples > 0 && s.generation.examples < 300);
    assert_eq!(s.dropped_in_flight, 0);
    assert_eq!(s.generation.examples, s.scheduled);
    assert_eq!(rows(&out).len() as u64, s.generation.examples);

    // The rerun completes the file.
    let s = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(prompts(300)),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    assert!(!s.interrupted);
    assert_eq!(labels_by_id(&out).len(), 300);
}

#[tokio::test(start_paused = true)]
async fn drain_deadline_drops_slow_examples() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl");
    let rmb = RmBoost::builder()
        .backend(FakeBackend::new().with_latency(Duration::from_secs(60)))
        .concurrency(NonZeroUsize::new(4).unwrap())
        .build()
        .unwrap();
    let stop = StopSignal::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        s2.stop();
    });
    let s = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(prompts(100)),
        &out,
        RunOptions::new()
            .stop_signal(stop)
            .drain_deadline(Some(Duration::from_secs(5))),
    )
    .await
    .unwrap();
    assert!(s.interrupted);
    assert_eq!(s.generation.examples, 0);
    assert_eq!(s.dropped_in_flight, 4);
    assert!(rows(&out).is_empty());
}

#[tokio::test]
async fn second_run_on_same_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl");
    let held =
        OutputFile::open(&out, ExampleFormat::Conversational, SyncPolicy::default()).unwrap();
    let err = run_to_file(
        |p| fake(0).try_generate(p),
        ok_stream(prompts(3)),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap_err();
    assert!(rmboost::error_chain(&err).contains("another run"), "{err}");
    held.close().unwrap();
}

#[tokio::test]
async fn torn_last_line_is_repaired_and_regenerated() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl");
    let rmb = fake(3);
    run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(prompts(10)),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    let reference = labels_by_id(&out);
    // Simulate a crash mid-write: cut the file in the middle of its last line.
    let bytes = std::fs::read(&out).unwrap();
    let cut = bytes.len() - 25;
    std::fs::write(&out, &bytes[..cut]).unwrap();
    let s = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(prompts(10)),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    assert!(s.torn_bytes > 0);
    assert_eq!((s.resumed, s.generation.examples), (9, 1));
    assert_eq!(labels_by_id(&out), reference);
    assert!(dir.path().join("o.jsonl.torn").exists());
}

#[tokio::test]
async fn existing_output_policies() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl");
    let rmb = fake(0);
    run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(prompts(5)),
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    let err = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(prompts(5)),
        &out,
        RunOptions::new().existing(ExistingOutput::Fail),
    )
    .await
    .unwrap_err();
    assert!(err.kind() == rmboost::ErrorKind::Config, "{err}");
    let s = run_to_file(
        |p| rmb.try_generate(p),
        ok_stream(prompts(3)),
        &out,
        RunOptions::new().existing(ExistingOutput::Overwrite),
    )
    .await
    .unwrap();
    assert_eq!(s.generation.examples, 3);
    assert_eq!(rows(&out).len(), 3);
}

#[tokio::test]
async fn input_is_pulled_lazily() {
    // An endless input with a limit: the run ends, so nothing collected the input.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl");
    let endless = stream::iter(0u64..).map(|i| Ok(Prompt::with_id(format!("e{i}"), "q?")));
    let s = run_to_file(
        |p| fake(0).try_generate(p),
        endless,
        &out,
        RunOptions::new().limit(50),
    )
    .await
    .unwrap();
    assert_eq!(s.generation.examples, 50);
}

#[tokio::test]
async fn standard_format_resumes_too() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl");
    let input = dir.path().join("in.jsonl");
    write_input(&input, &prompts(20));
    let opts = || RunOptions::new().format(ExampleFormat::Standard);
    let rmb = fake(0);
    run_to_file(
        |p| rmb.try_generate(p),
        stream::iter(read_prompts(&input).unwrap()),
        &out,
        opts().limit(7),
    )
    .await
    .unwrap();
    let s = run_to_file(
        |p| rmb.try_generate(p),
        stream::iter(read_prompts(&input).unwrap()),
        &out,
        opts(),
    )
    .await
    .unwrap();
    assert_eq!((s.skipped_done, s.generation.examples), (7, 13));
    assert!(rows(&out).iter().all(|r| r["prompt"].is_string()));
}

#[tokio::test]
async fn run_future_is_send_so_it_can_be_spawned() {
    fn assert_send<T: Send>(_: &T) {}
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.jsonl");
    let rmb = fake(0);
    let fut = run_to_file(
        move |p| rmb.try_generate(p),
        ok_stream(prompts(3)),
        out,
        RunOptions::new(),
    );
    assert_send(&fut);
    let s = tokio::spawn(fut).await.unwrap().unwrap();
    assert_eq!(s.generation.examples, 3);
}
