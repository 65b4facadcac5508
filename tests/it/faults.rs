//! Fault injection: about 30% of backend calls fail (429 with Retry-After, 500, 503, timeouts,
//! connection errors, malformed responses, empty content); a 2,000-prompt run, rerun for the
//! ledger's failures, ends with every id exactly once and no error text in any row.

use crate::support;

use rmboost::GeneratorExt;
use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::stream;
use rmboost::io::FailureLedger;
use rmboost::run::{run_to_file, RunOptions};
use rmboost::testing::FakeBackend;
use rmboost::{read_prompts, RmBoost};
use support::prompts;
use support::reliability::{labels_by_id, write_input, Faulty, SimpleRetry, INJECTED};

const N: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_prompts_with_thirty_percent_faults() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let out = dir.path().join("pairs.jsonl");
    let reference = dir.path().join("reference.jsonl");
    let all = prompts(N);
    write_input(&input, &all);

    // The same generation without faults, for the draws.
    let clean = RmBoost::builder()
        .backend(FakeBackend::new())
        .seed(2024)
        .build()
        .unwrap();
    run_to_file(
        |p| clean.try_generate(p),
        stream::iter(read_prompts(&input).unwrap()),
        &reference,
        RunOptions::new(),
    )
    .await
    .unwrap();

    let faulty = Faulty::new(FakeBackend::new(), 0.30, 7);
    let counters = faulty.counters();
    let retry = SimpleRetry::new(faulty, 4);
    let retries = retry.retries();
    let rmb = RmBoost::builder()
        .backend(retry)
        .seed(2024)
        .concurrency(NonZeroUsize::new(32).unwrap())
        .max_reasks(3)
        .build()
        .unwrap();

    let mut runs = Vec::new();
    for run in 1..=6 {
        let s = run_to_file(
            |p| rmb.try_generate(p),
            stream::iter(read_prompts(&input).unwrap()),
            &out,
            RunOptions::new(),
        )
        .await
        .unwrap();
        // Every input id is accounted for in every run.
        assert_eq!(
            s.skipped_done + s.generation.examples + s.generation.failed(),
            N as u64,
            "run {run}: {s}"
        );
        assert_eq!(s.ledger_pending, s.generation.failed(), "run {run}: {s}");
        let ledger = FailureLedger::read(FailureLedger::default_path(&out)).unwrap();
        assert_eq!(ledger.len() as u64, s.ledger_pending);
        for r in &ledger {
            assert!(
                r.message.contains(INJECTED) || r.kind == "unusable",
                "{r:?}"
            );
        }
        eprintln!("run {run}: {s}");
        let done = s.ledger_pending == 0;
        runs.push(s);
        if done {
            break;
        }
    }
    let last = runs.last().unwrap();
    assert_eq!(
        last.ledger_pending,
        0,
        "failures left after {} runs",
        runs.len()
    );
    assert!(
        runs[0].generation.failed() > 0,
        "the first run should see some failures"
    );

    // Exactly once, and the same draws as the clean run.
    let got = labels_by_id(&out);
    assert_eq!(got.len(), N);
    let want: HashSet<_> = all.iter().map(|p| p.id().to_owned()).collect();
    assert_eq!(got.keys().cloned().collect::<HashSet<_>>(), want);
    assert_eq!(got, labels_by_id(&reference));

    // No error text in any row.
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(!text.contains(INJECTED));
    for kind in ["rate_limited", "server (HTTP", "timeout", "connection"] {
        assert!(!text.contains(kind), "{kind} in output");
    }

    let injected = counters.total();
    let calls = counters.calls();
    let share = injected as f64 / calls as f64;
    assert!((0.25..0.35).contains(&share), "fault share {share}");
    eprintln!(
        "FIGURES prompts={N} calls={calls} injected={injected} ({:.1}%) by_kind={:?} retries={} runs={} first_run_failures={:?} reasks_total={} elapsed={:.1}s",
        share * 100.0,
        counters.by_kind(),
        retries.load(Ordering::SeqCst),
        runs.len(),
        runs[0].generation.failures,
        runs.iter().map(|r| r.generation.reasks).sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
}
