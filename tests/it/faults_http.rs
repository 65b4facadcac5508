//! Fault injection over real HTTP: the OpenAI-compatible backend and the `Retry` wrapper
//! against a loopback server that fails about 30% of requests (429 with `Retry-After: 0`, 500,
//! 503, answers slower than the timeout, closed connections, malformed JSON, empty content).
//! A 2,000-prompt run, rerun for the ledger's failures, ends with every id exactly once, the
//! draws of a clean run, and no error text in any row.

use crate::support;

use rmboost::GeneratorExt;
use std::collections::HashSet;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, Instant};

use futures::stream;
use rmboost::backend::retry::{Retry, RetryPolicy};
use rmboost::backend::OpenAiBackend;
use rmboost::io::FailureLedger;
use rmboost::run::{run_to_file, RunOptions};
use rmboost::testing::FakeBackend;
use rmboost::{read_prompts, RmBoost};
use support::prompts;
use support::reliability::{labels_by_id, write_input};
use support::server::{Config, Server, FAULTS, INJECTED_HTTP};

const N: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_prompts_over_http_with_thirty_percent_faults() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let out = dir.path().join("pairs.jsonl");
    let reference = dir.path().join("reference.jsonl");
    let all = prompts(N);
    write_input(&input, &all);

    let server = Server::with(Config {
        fault_rate: 0.30,
        fault_seed: 11,
        hang: Duration::from_millis(1000),
        filler: 40,
        ..Config::default()
    });

    let backend = OpenAiBackend::builder()
        .base_url(server.base_url())
        .model("mock-model")
        .api_key("sk-test-key")
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let retry = Retry::with_policy(
        backend,
        RetryPolicy::default()
            .max_attempts(NonZeroU32::new(4).unwrap())
            .initial_delay(Duration::from_millis(1))
            .max_delay(Duration::from_millis(5))
            .max_elapsed(None)
            .jitter(false),
    );
    let stats = retry.stats();
    let rmb = RmBoost::builder()
        .backend(retry)
        .seed(2024)
        .concurrency(NonZeroUsize::new(32).unwrap())
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
        assert_eq!(
            s.skipped_done + s.generation.examples + s.generation.failed(),
            N as u64,
            "run {run}: {s}"
        );
        assert_eq!(s.ledger_pending, s.generation.failed(), "run {run}: {s}");
        eprintln!("run {run}: {s}");
        let done = s.ledger_pending == 0;
        runs.push(s);
        if done {
            break;
        }
    }
    assert_eq!(runs.last().unwrap().ledger_pending, 0);
    assert!(!FailureLedger::default_path(&out).exists());

    // The same draws as a clean in-process run with the same seed.
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
    let got = labels_by_id(&out); // panics on a duplicate id
    assert_eq!(got.len(), N);
    let want: HashSet<_> = all.iter().map(|p| p.id().to_owned()).collect();
    assert_eq!(got.keys().cloned().collect::<HashSet<_>>(), want);
    assert_eq!(got, labels_by_id(&reference));

    let text = std::fs::read_to_string(&out).unwrap();
    assert!(!text.contains(INJECTED_HTTP));
    assert!(!text.contains("HTTP 5"));

    let counts = server.counts();
    let faults: Vec<(&str, u64)> = FAULTS
        .iter()
        .map(|f| (f.name(), counts.faults[*f as usize]))
        .collect();
    for (kind, n) in &faults {
        assert!(*n > 0, "no {kind} fault injected");
    }
    let injected: u64 = counts.faults.iter().sum();
    let share = injected as f64 / counts.requests as f64;
    assert!((0.25..0.35).contains(&share), "fault share {share}");
    eprintln!(
        "FIGURES http: prompts={N} requests={} answered={} injected={} ({:.1}%) by_kind={faults:?} retry_requests={} retry_attempts={} retries={} rate_limited={} retry_failures={} runs={} first_run_failures={:?} reasks={} elapsed={:.1}s",
        counts.requests,
        counts.answered,
        injected,
        share * 100.0,
        stats.requests(),
        stats.attempts(),
        stats.retries(),
        stats.rate_limited(),
        stats.failures(),
        runs.len(),
        runs[0].generation.failures,
        runs.iter().map(|r| r.generation.reasks).sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}
