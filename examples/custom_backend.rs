//! A backend of your own, offline and without a model: implement `LlmBackend` (one async
//! method) and hand it to the generator like any other.
//!
//! This one is a toy "model" that answers from rules, so it runs anywhere in milliseconds;
//! a real one would call your inference server, a queue, or a model in process. Run it:
//!
//! ```sh
//! cargo run --example custom_backend
//! ```
//!
//! It prints the JSONL pairs on stdout and a summary on stderr.

use rmboost::GeneratorExt;
use std::borrow::Cow;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use rmboost::{
    async_trait, Aspects, BackendError, Completion, CompletionRequest, ExampleFormat,
    ExampleWriter, FinishReason, LlmBackend, Prompt, RmBoost, Role, Summary, Usage,
};

/// Answers the first request with a short fact and the second (which asks for a response
/// between `<response>` tags, better or worse than the first) with a longer or a vaguer one.
#[derive(Debug, Default)]
struct RuleBackend {
    calls: AtomicU64,
}

#[async_trait]
impl LlmBackend for RuleBackend {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        // The first request is the prompt's conversation. The second starts with a system
        // message holding the first response and the direction ("must be better than" or
        // "must be worse than the reference answer"), then the same conversation. A real
        // backend would send `request.messages` to a model as they are.
        let instructions = request
            .messages
            .iter()
            .find(|m| m.role == Role::System && m.content.contains("<response>"));
        let last = request
            .messages
            .last()
            .map(|m| m.content.as_str())
            .unwrap_or_default();
        let text = if let Some(instructions) = instructions {
            let worse = instructions.content.contains("worse than the reference");
            let body = if worse {
                "Something about light, probably. It depends on many things, and people \
                 disagree about most of them, so it is hard to say anything definite here."
            } else {
                "Sunlight is scattered by the molecules of the air, and short (blue) \
                 wavelengths are scattered far more than long (red) ones, so blue light \
                 reaches the eye from every direction of the sky."
            };
            format!("A short plan first.\n<response>{body}</response>")
        } else {
            "Because air scatters blue light more than red light.".to_string()
        };
        let tokens = text.split_whitespace().count() as u64;
        Ok(Completion::new(text)
            .with_usage(Usage::new(last.len() as u64 / 4, tokens))
            .with_finish_reason(FinishReason::Stop)
            .with_model("rules-v1"))
    }

    fn name(&self) -> Cow<'_, str> {
        "rules".into()
    }

    fn model(&self) -> Cow<'_, str> {
        "rules-v1".into()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), rmboost::Error> {
    let rmb = RmBoost::builder()
        .backend(RuleBackend::default())
        .aspects(Aspects::long_form_qa())
        .concurrency(NonZeroUsize::new(4).expect("4 is not zero"))
        .seed(7)
        .build()?;
    let prompts = [
        "Why is the sky blue?",
        "Why is the sky blue at noon?",
        "What colour is the sky?",
        "Why is the sky not violet?",
        "Why is the sea blue?",
        "Why are sunsets red?",
    ]
    .iter()
    .enumerate()
    .map(|(i, q)| Prompt::with_id(format!("q{i}"), *q));
    let mut writer = ExampleWriter::new(std::io::stdout().lock(), ExampleFormat::Conversational)
        .named("<stdout>");
    let mut summary = Summary::default();
    let mut results = rmb.generate_iter(prompts);
    while let Some(result) = results.next().await {
        summary.record(&result);
        match result {
            Ok(example) => writer.write(&example)?,
            Err(e) => eprintln!("{}", rmboost::error_chain(&e)),
        }
    }
    writer.flush()?;
    eprintln!("{summary}");
    Ok(())
}
