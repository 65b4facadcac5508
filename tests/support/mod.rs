//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod mock_openai;
pub mod reliability;

use futures::StreamExt;
use rmboost::{Error, Label, PreferenceExample, Prompt, RmBoost};

/// `n` distinct prompts with ids `p0000`, `p0001`, ...
pub fn prompts(n: usize) -> Vec<Prompt> {
    (0..n)
        .map(|i| Prompt::with_id(format!("p{i:04}"), format!("Question number {i}: why?")))
        .collect()
}

/// Runs a generator over prompts and collects every result.
pub async fn run_all(rmb: &RmBoost, prompts: Vec<Prompt>) -> Vec<Result<PreferenceExample, Error>> {
    rmb.generate_iter(prompts).collect().await
}

/// Pinned draws for run seed 42 and ids a..e (see `golden_seeded_draws`).
pub fn golden() -> Vec<(String, Label, Vec<String>, u64)> {
    let row = |id: &str, label, aspects: &[&str], seed| {
        (
            id.to_string(),
            label,
            aspects.iter().map(|s| s.to_string()).collect(),
            seed,
        )
    };
    vec![
        row(
            "a",
            Label::Better,
            &["relevance", "completeness", "clarity"],
            2241161284144249553,
        ),
        row(
            "b",
            Label::Worse,
            &["relevance", "clarity"],
            3922882208111563549,
        ),
        row(
            "c",
            Label::Better,
            &["helpfulness", "relevance", "correctness"],
            17322992859760869694,
        ),
        row(
            "d",
            Label::Worse,
            &["correctness", "clarity"],
            3553063471108672485,
        ),
        row("e", Label::Worse, &["correctness"], 16647998588800155695),
    ]
}
