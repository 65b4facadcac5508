//! Each baseline against a REAL llama.cpp server (SmolLM2-135M-Instruct on the CPU), started
//! from `scripts/serve_llama.py`: every method turns prompts into valid rows.
//!
//! A 135M model is a weak judge and often ignores formatting, so these tests assert on
//! structure (valid rows, call counts, per-example failures only), not on wording. Token limits
//! are small so that the suite stays quick on a busy 2-core machine.
//! Needs `scripts/setup-test-env.sh` (see `tests/llama_server.rs`).

use crate::support;

use rmboost::GeneratorExt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::retry::Retry;
use rmboost::judge::Judge;
use rmboost::methods::OnInconsistent;
use rmboost::report::Report;
use rmboost::{
    Error, ExampleFormat, Generator, LlmBackend, PreferenceExample, Prompt, Rlaif, Rlcd,
    SamplingParams, WestOfN,
};
use support::LlamaServer;

fn backend() -> Arc<dyn LlmBackend> {
    let openai = OpenAiBackend::builder()
        .base_url(LlamaServer::shared().v1())
        .model("smollm2-135m-instruct")
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    Arc::new(Retry::new(openai))
}

fn prompts(n: usize) -> Vec<Prompt> {
    [
        Prompt::with_id("capital", "What is the capital of France?"),
        Prompt::with_id("sleep", "Give one tip for sleeping better."),
    ]
    .into_iter()
    .take(n)
    .collect()
}

fn sampling() -> SamplingParams {
    SamplingParams::default().temperature(0.9).max_tokens(32)
}

fn judge(backend: &Arc<dyn LlmBackend>) -> Judge {
    Judge::new(backend.clone())
        .params(SamplingParams::default().temperature(0.0).max_tokens(48))
        .max_reasks(2)
}

fn two() -> NonZeroUsize {
    NonZeroUsize::new(2).unwrap()
}

/// Runs `g` on `n` prompts, checks every row and every failure, and returns the rows.
async fn run(g: &dyn Generator, n: usize, min_calls: u32) -> Vec<PreferenceExample> {
    let started = std::time::Instant::now();
    let results: Vec<Result<PreferenceExample, Error>> =
        g.generate_iter(prompts(n)).collect().await;
    assert_eq!(results.len(), n);
    let mut rows = Vec::new();
    for r in results {
        match r {
            Ok(ex) => {
                assert_eq!(ex.metadata.method, g.method());
                assert!(!ex.chosen.trim().is_empty() && !ex.rejected.trim().is_empty());
                let words = |s: &str| {
                    s.to_lowercase()
                        .split_whitespace()
                        .map(String::from)
                        .collect::<Vec<_>>()
                };
                assert_ne!(
                    words(&ex.chosen),
                    words(&ex.rejected),
                    "{}: the same response twice",
                    ex.id
                );
                assert!(
                    ex.metadata.calls >= min_calls,
                    "{}: {} calls",
                    ex.id,
                    ex.metadata.calls
                );
                let total = ex.metadata.usage["total"];
                assert!(total.prompt_tokens > 0 && total.completion_tokens > 0);
                for format in [ExampleFormat::Conversational, ExampleFormat::Standard] {
                    let back: PreferenceExample =
                        serde_json::from_str(&ex.to_json_line(format)).unwrap();
                    assert_eq!((&back.chosen, &back.rejected), (&ex.chosen, &ex.rejected));
                }
                rows.push(ex);
            }
            Err(e) => {
                // A weak model may fail an example (no readable verdict, an answer cut off
                // before any text), never the run.
                eprintln!("{}: {e}: {:?}", g.method(), std::error::Error::source(&e));
                assert!(!e.is_fatal(), "{}: {e}", g.method());
                assert!(e.example_id().is_some(), "{e}");
            }
        }
    }
    eprintln!(
        "{}: {} of {n} rows in {:?}",
        g.method(),
        rows.len(),
        started.elapsed()
    );
    rows
}

#[tokio::test]
async fn rlcd_makes_valid_rows() {
    if !LlamaServer::available("rlcd_makes_valid_rows") {
        return;
    }
    let rlcd = Rlcd::builder()
        .backend(backend())
        .params(sampling())
        .concurrency(two())
        .seed(1)
        .build()
        .unwrap();
    let rows = run(&rlcd, 2, 2).await;
    // No judge involved: answers to plain questions.
    assert!(!rows.is_empty(), "rlcd made no row");
    let report = Report::from_examples(&rows);
    assert_eq!(report.methods["rlcd"], rows.len() as u64);
    assert_eq!(report.labels.better as usize, rows.len());
}

#[tokio::test]
async fn rlaif_makes_valid_rows_or_fails_per_example() {
    if !LlamaServer::available("rlaif_makes_valid_rows_or_fails_per_example") {
        return;
    }
    let b = backend();
    let rlaif = Rlaif::builder()
        .backend(b.clone())
        .params(sampling())
        .judge(judge(&b))
        .on_inconsistent(OnInconsistent::Keep)
        .concurrency(two())
        .seed(1)
        .build()
        .unwrap();
    for ex in run(&rlaif, 1, 4).await {
        let verdicts = &ex.metadata.extra["judge"]["verdicts"];
        assert_eq!(verdicts.as_array().unwrap().len(), 2);
    }
}

#[tokio::test]
async fn west_of_n_makes_valid_rows_or_fails_per_example() {
    if !LlamaServer::available("west_of_n_makes_valid_rows_or_fails_per_example") {
        return;
    }
    let b = backend();
    let west = WestOfN::builder()
        .backend(b.clone())
        .params(sampling())
        .scorer(judge(&b))
        .n(2)
        .allow_ties(true)
        .concurrency(two())
        .seed(1)
        .build()
        .unwrap();
    for ex in run(&west, 1, 4).await {
        let scores = ex.metadata.extra["scores"].as_array().unwrap();
        assert_eq!(scores.len(), 2);
        assert!(scores
            .iter()
            .all(|s| (1.0..=10.0).contains(&s.as_f64().unwrap())));
    }
}
