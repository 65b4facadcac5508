//! `OpenAiBackend` against a REAL llama.cpp server (SmolLM2-135M-Instruct on the CPU), started
//! from `scripts/serve_llama.py`.
//!
//! Needs `scripts/setup-test-env.sh` to have run (`.ci/run` does): the tests FAIL, naming
//! RMBOOST_PYTHON and RMBOOST_MODEL, when python or the model is missing.
#![cfg(feature = "openai")]

mod support;

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::rate_limit::RateLimit;
use rmboost::backend::retry::Retry;
use rmboost::{
    BackendErrorKind, CompletionRequest, FinishReason, LlmBackend, Message, SamplingParams,
};
use support::LlamaServer;

fn backend(server: &LlamaServer) -> OpenAiBackend {
    OpenAiBackend::builder()
        .base_url(server.v1())
        .model("smollm2-135m-instruct")
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

#[tokio::test]
async fn single_completion_at_temperature_zero() {
    let server = LlamaServer::shared();
    let backend = backend(server);
    let request = CompletionRequest::new(vec![
        Message::system("You are a helpful assistant."),
        Message::user("What is the capital of France? Answer in one sentence."),
    ])
    .with_params(&SamplingParams::default().temperature(0.0).max_tokens(48))
    .with_seed(1);
    let c = backend.complete(request).await.unwrap();
    assert!(!c.text.trim().is_empty());
    assert!(
        matches!(c.finish_reason, FinishReason::Stop | FinishReason::Length),
        "{:?}",
        c.finish_reason
    );
    // The ChatML-wrapped prompt is a few dozen tokens; the answer at most max_tokens.
    assert!(
        (15..200).contains(&c.usage.prompt_tokens),
        "prompt tokens {}",
        c.usage.prompt_tokens
    );
    assert!(
        (1..=48).contains(&c.usage.completion_tokens),
        "completion tokens {}",
        c.usage.completion_tokens
    );
    if c.finish_reason == FinishReason::Length {
        assert_eq!(c.usage.completion_tokens, 48);
    }
    assert!(!c.model.is_empty());
    assert!(c.text.contains("Paris"), "{:?}", c.text);
}

#[tokio::test]
async fn a_tiny_token_limit_reports_length() {
    let server = LlamaServer::shared();
    let request = CompletionRequest::new(vec![Message::user("Write a long story about a dragon.")])
        .with_params(&SamplingParams::default().temperature(0.0).max_tokens(3));
    let c = backend(server).complete(request).await.unwrap();
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.usage.completion_tokens, 3);
}

#[tokio::test]
async fn more_concurrent_requests_than_slots_all_get_answers() {
    let server = LlamaServer::shared();
    let backend = Retry::new(backend(server));
    let n = 4 * server.slots as usize; // 8 requests on 2 slots
    let started = Instant::now();
    let calls = (0..n).map(|i| {
        let request = CompletionRequest::new(vec![Message::user(format!(
            "What is {i} plus {i}? Reply with the number only."
        ))])
        .with_params(&SamplingParams::default().temperature(0.0).max_tokens(12));
        let backend = &backend;
        async move { (i, backend.complete(request).await) }
    });
    let results = join_all(calls).await;
    let mut seen = HashSet::new();
    for (i, r) in results {
        let c = r.unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert!(c.usage.completion_tokens > 0 && c.usage.prompt_tokens > 0);
        seen.insert(i);
    }
    assert_eq!(seen.len(), n, "a request was lost");
    assert_eq!(backend.stats().requests(), n as u64);
    eprintln!(
        "{n} concurrent requests on {} slots: {:?}, {} retries",
        server.slots,
        started.elapsed(),
        backend.stats().retries()
    );
}

#[tokio::test]
async fn wrappers_compose_over_the_real_server() {
    let server = LlamaServer::shared();
    let limited = RateLimit::new(backend(server))
        .requests_per_minute(NonZeroU32::new(600).unwrap())
        .tokens_per_minute(NonZeroU32::new(100_000).unwrap());
    let backend = Retry::new(limited);
    assert_eq!(backend.name(), "openai");
    assert_eq!(backend.model(), "smollm2-135m-instruct");
    let request = CompletionRequest::new(vec![Message::user("Say hello.")])
        .with_params(&SamplingParams::default().temperature(0.0).max_tokens(8));
    backend.complete(request).await.unwrap();
}

#[tokio::test]
async fn real_server_errors_are_classified() {
    let server = LlamaServer::shared();
    // A malformed body (messages not an array): llama.cpp answers 400.
    let bad = OpenAiBackend::builder()
        .base_url(server.v1())
        .model("m")
        .extra_body("messages", serde_json::json!("not an array"))
        .build()
        .unwrap();
    let e = bad
        .complete(CompletionRequest::new(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::InvalidRequest, "{e:?}");
    assert_eq!(e.status(), Some(400));
    assert!(e.message().contains("messages"), "{e:?}");
    // A wrong path is a 404.
    let wrong = OpenAiBackend::builder()
        .base_url(format!("{}/nope/v1", server.base_url))
        .model("m")
        .build()
        .unwrap();
    let e = wrong
        .complete(CompletionRequest::new(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::NotFound, "{e:?}");
    assert!(e.is_fatal());
}
