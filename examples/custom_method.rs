//! A generation method of your own: implement `Generator` with `ExampleStream::drive`, and it
//! runs like the built-in ones (the same concurrency bound, output order, input errors passed
//! through, stop after a fatal error), through `GeneratorExt`, `Box<dyn Generator>` and the
//! resumable runner alike.
//!
//! The method here, "planted error", asks the model for an answer and then for the same answer
//! with one planted mistake; the first is `chosen`, the second `rejected` (label `worse`: the
//! second response is the worse one). Which kind of mistake is drawn per example from
//! `example_rng(seed, id)`, so a rerun or a resumed run draws the same. A rule-based backend
//! stands in for a model, so it runs offline in milliseconds:
//!
//! ```sh
//! cargo run --example custom_method
//! ```
//!
//! It prints the JSONL pairs on stdout and a summary on stderr.

use std::num::NonZeroUsize;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use rmboost::rand::Rng;
use rmboost::{
    async_trait, example_rng, BackendError, Completion, CompletionRequest, Error, ExampleFormat,
    ExampleMetadata, ExampleStream, ExampleWriter, Generator, GeneratorExt, Label, LlmBackend,
    Message, OutputOrder, PreferenceExample, Prompt, Role, Summary,
};

/// The mistakes a rejected answer may carry, one drawn per example.
const MISTAKES: [&str; 3] = ["a wrong number", "a wrong name", "a wrong cause"];

/// The method: a backend, a run seed and how many examples run at once.
#[derive(Clone)]
struct PlantedError {
    backend: Arc<dyn LlmBackend>,
    seed: u64,
    concurrency: NonZeroUsize,
}

impl std::fmt::Debug for PlantedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlantedError")
            .field("backend", &self.backend.name())
            .field("seed", &self.seed)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl PlantedError {
    /// One example: two calls, one after the other.
    async fn run(&self, prompt: Prompt, mistake: &'static str) -> Result<PreferenceExample, Error> {
        let conversation = prompt.messages().into_owned();
        // Errors name the example and the call, so a failed example can be told apart.
        let id = prompt.id();
        let call = |name: &'static str| move |e: BackendError| Error::backend(id, name, e);
        let good = self
            .backend
            .complete(CompletionRequest::new(conversation.clone()))
            .await
            .map_err(call("first"))?;
        let mut second = vec![Message::system(format!(
            "Answer the user's question as the reference answer below does, but plant exactly \
             one mistake in it: {mistake}. Keep everything else as it is.\n<reference>\n{}\n\
             </reference>",
            good.text
        ))];
        second.extend(conversation.iter().cloned());
        let flawed = self
            .backend
            .complete(CompletionRequest::new(second))
            .await
            .map_err(call("second"))?;
        let mut metadata = ExampleMetadata {
            method: self.method().to_string(),
            seed: self.seed,
            calls: 2,
            ..ExampleMetadata::default()
        };
        metadata.extra.insert("mistake".into(), mistake.into());
        Ok(PreferenceExample {
            id: prompt.id().to_owned(),
            prompt: conversation,
            chosen: good.text,
            rejected: flawed.text,
            label: Label::Worse,
            grade: None,
            aspects: vec!["factuality".into()],
            margin: None,
            metadata,
        })
    }
}

impl Generator for PlantedError {
    fn method(&self) -> &str {
        "planted-error"
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn concurrency(&self) -> NonZeroUsize {
        self.concurrency
    }

    fn generate_boxed(&self, prompts: BoxStream<'static, Result<Prompt, Error>>) -> ExampleStream {
        let this = self.clone();
        ExampleStream::drive(
            prompts,
            self.concurrency,
            OutputOrder::Input,
            move |prompt| {
                // Every draw happens here, before the first await: it depends only on the seed and
                // the id, never on which example finished first.
                let mistake =
                    MISTAKES[example_rng(this.seed, prompt.id()).random_range(0..MISTAKES.len())];
                let this = this.clone();
                async move { this.run(prompt, mistake).await }
            },
        )
    }
}

/// Answers the first request with a fact, and the second (a system message asking for a planted
/// mistake) with the fact made wrong in the way asked for.
#[derive(Debug)]
struct Rules;

#[async_trait]
impl LlmBackend for Rules {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let plant = request
            .messages
            .iter()
            .find(|m| m.role == Role::System)
            .map(|m| m.content.as_str());
        let text = match plant {
            None => {
                "Water boils at 100 degrees Celsius at sea level, because that is where its \
                     vapour pressure equals the air's."
            }
            Some(p) if p.contains("a wrong number") => {
                "Water boils at 90 degrees Celsius at sea level, because that is where its \
                 vapour pressure equals the air's."
            }
            Some(p) if p.contains("a wrong name") => {
                "Mercury boils at 100 degrees Celsius at sea level, because that is where its \
                 vapour pressure equals the air's."
            }
            Some(_) => {
                "Water boils at 100 degrees Celsius at sea level, because that is where it \
                 runs out of oxygen."
            }
        };
        Ok(Completion::new(text).with_model("rules-v1"))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let method: Box<dyn Generator> = Box::new(PlantedError {
        backend: Arc::new(Rules),
        seed: 7,
        concurrency: NonZeroUsize::new(4).expect("4 is not zero"),
    });
    let prompts =
        (0..6).map(|i| Prompt::with_id(format!("q{i}"), "At what temperature does water boil?"));
    let mut writer = ExampleWriter::new(std::io::stdout().lock(), ExampleFormat::Conversational)
        .named("<stdout>");
    let mut summary = Summary::default();
    let mut results = method.generate_iter(prompts);
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
