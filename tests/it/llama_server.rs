//! `OpenAiBackend` against a REAL llama.cpp server (SmolLM2-135M-Instruct on the CPU), started
//! from `scripts/serve_llama.py`.
//!
//! Needs `scripts/setup-test-env.sh` to have run (`.ci/run` does): the tests FAIL, naming
//! RMBOOST_PYTHON and RMBOOST_MODEL, when python or the model is missing.

use crate::support;

use rmboost::GeneratorExt;
use std::collections::{HashMap, HashSet};
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::rate_limit::RateLimit;
use rmboost::backend::retry::Retry;
use rmboost::ErrorKind;
use rmboost::{
    async_trait, Aspects, BackendError, BackendErrorKind, Completion, CompletionRequest,
    DefaultTemplate, Error, FinishReason, Label, LlmBackend, Message, Prompt, PromptTemplate,
    RmBoost, SamplingParams, Summary,
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
    if !LlamaServer::available("single_completion_at_temperature_zero") {
        return;
    }
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
    if !LlamaServer::available("a_tiny_token_limit_reports_length") {
        return;
    }
    let server = LlamaServer::shared();
    let request = CompletionRequest::new(vec![Message::user("Write a long story about a dragon.")])
        .with_params(&SamplingParams::default().temperature(0.0).max_tokens(3));
    let c = backend(server).complete(request).await.unwrap();
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.usage.completion_tokens, 3);
}

#[tokio::test]
async fn more_concurrent_requests_than_slots_all_get_answers() {
    if !LlamaServer::available("more_concurrent_requests_than_slots_all_get_answers") {
        return;
    }
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
    if !LlamaServer::available("wrappers_compose_over_the_real_server") {
        return;
    }
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
    if !LlamaServer::available("real_server_errors_are_classified") {
        return;
    }
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

/// Records every answer by the request's messages, to check the construction rule afterwards.
struct Recording<B> {
    inner: B,
    answers: Mutex<HashMap<Vec<Message>, Vec<String>>>,
}

#[async_trait]
impl<B: LlmBackend> LlmBackend for Recording<B> {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let messages = request.messages.clone();
        let completion = self.inner.complete(request).await?;
        self.answers
            .lock()
            .unwrap()
            .entry(messages)
            .or_default()
            .push(completion.text.clone());
        Ok(completion)
    }
    fn name(&self) -> std::borrow::Cow<'_, str> {
        self.inner.name()
    }
    fn model(&self) -> std::borrow::Cow<'_, str> {
        self.inner.model()
    }
}

const QUESTIONS: [&str; 24] = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Give one tip for sleeping better.",
    "What does a thermometer measure?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "What is photosynthesis, in one sentence?",
    "Suggest a name for a pet goldfish.",
    "Why do we need to drink water?",
    "What is 12 times 12?",
    "Describe a cat in one sentence.",
    "What is the boiling point of water at sea level?",
    "Give a synonym for happy.",
    "What is the largest planet in the solar system?",
    "How do you say hello in Spanish?",
    "Why do leaves change colour in autumn?",
    "What is a noun?",
    "Recommend a healthy breakfast.",
    "What causes rain?",
    "Who wrote Romeo and Juliet?",
    "What is the opposite of cold?",
    "Why should we recycle plastic?",
    "What is the main ingredient of bread?",
    "How many days are in a leap year?",
];

/// A full RMBoost run over 24 prompts through the OpenAI backend (wrapped in `Retry`): every
/// example produced is valid and follows the construction rule; failures are counted, and may
/// only be unusable answers (a 135M model often ignores the answer format), never transport
/// errors.
#[tokio::test]
async fn full_rmboost_run_through_the_openai_backend() {
    if !LlamaServer::available("full_rmboost_run_through_the_openai_backend") {
        return;
    }
    let server = LlamaServer::shared();
    let retry = Retry::new(backend(server));
    let stats = retry.stats();
    let recording = std::sync::Arc::new(Recording {
        inner: retry,
        answers: Mutex::new(HashMap::new()),
    });
    let rmb = RmBoost::builder()
        .backend(recording.clone())
        .aspects(Aspects::general())
        .concurrency(NonZeroUsize::new(4).unwrap())
        .seed(1)
        .first_params(SamplingParams::default().temperature(0.7).max_tokens(96))
        .second_params(SamplingParams::default().temperature(0.7).max_tokens(192))
        .build()
        .unwrap();
    let prompts: Vec<Prompt> = QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, q)| Prompt::with_id(format!("q{i:02}"), *q))
        .collect();
    let by_id: HashMap<String, Prompt> = prompts
        .iter()
        .map(|p| (p.id().to_owned(), p.clone()))
        .collect();

    let started = Instant::now();
    let results: Vec<Result<_, Error>> = rmb
        .generate(futures::stream::iter(prompts.clone()))
        .collect()
        .await;
    let wall = started.elapsed();

    assert_eq!(results.len(), prompts.len(), "one result per prompt");
    let mut summary = Summary::default();
    let mut ids = HashSet::new();
    let template = DefaultTemplate::new();
    let answers = recording.answers.lock().unwrap();
    for result in &results {
        summary.record(result);
        match result {
            Ok(ex) => {
                assert!(ids.insert(ex.id.clone()), "duplicate id {}", ex.id);
                assert!(!ex.chosen.trim().is_empty(), "{}: empty chosen", ex.id);
                assert!(!ex.rejected.trim().is_empty(), "{}: empty rejected", ex.id);
                assert_ne!(ex.chosen, ex.rejected, "{}", ex.id);
                assert!(!ex.aspects.is_empty(), "{}", ex.id);
                // The construction rule: the first response is rejected when the label is
                // "better" and chosen when it is "worse".
                let plan = rmb.plan(by_id[&ex.id].clone());
                assert_eq!(plan.label.label, ex.label, "{}", ex.id);
                let first_request = rmb.first_request(&plan);
                let firsts: Vec<String> = answers
                    .get(&first_request.messages)
                    .unwrap_or_else(|| panic!("{}: no first answer recorded", ex.id))
                    .iter()
                    .filter_map(|raw| template.accept_first(raw).ok())
                    .collect();
                let first_side = match ex.label {
                    Label::Better => &ex.rejected,
                    Label::Worse => &ex.chosen,
                };
                assert!(
                    firsts.contains(first_side),
                    "{}: label {:?} but the first response is not on its side",
                    ex.id,
                    ex.label
                );
                assert!(ex.metadata.usage["total"].total() > 0);
            }
            Err(e) => {
                assert!(e.example_id().is_some(), "{e}");
                assert!(
                    e.kind() == ErrorKind::Unusable,
                    "a transport failure is not expected from a local server: {e} ({:?})",
                    std::error::Error::source(e)
                );
            }
        }
    }
    eprintln!(
        "RMBoost over llama.cpp: {} prompts, {summary}, backend retries {}, wall {:.1?}",
        prompts.len(),
        stats.retries(),
        wall
    );
    assert!(
        summary.examples * 2 >= prompts.len() as u64,
        "fewer than half the prompts gave an example: {summary}"
    );
}
