//! Generates a few RMBoost preference pairs with any OpenAI-compatible server.
//!
//! ```text
//! OPENAI_BASE_URL=http://127.0.0.1:8080/v1 OPENAI_MODEL=my-model \
//!     cargo run --example openai_compatible --features openai
//! ```
//!
//! `OPENAI_BASE_URL` and `OPENAI_MODEL` are required; `OPENAI_API_KEY` is sent when set (local
//! servers such as llama.cpp, vLLM and Ollama need none). The examples go to stdout as JSONL,
//! the summary (examples, failures, re-asks, retries, tokens) to stderr.

use rmboost::GeneratorExt;
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::time::Instant;

use futures::StreamExt;
use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::retry::Retry;
use rmboost::{Aspects, ExampleFormat, Prompt, RmBoost, SamplingParams, Summary};

const PROMPTS: [&str; 4] = [
    "Explain why the sky is blue.",
    "Give three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Write a short note thanking a colleague for their help.",
];

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

#[tokio::main]
async fn main() -> ExitCode {
    let (Some(base_url), Some(model)) = (env("OPENAI_BASE_URL"), env("OPENAI_MODEL")) else {
        eprintln!(
            "error: set OPENAI_BASE_URL (e.g. http://127.0.0.1:8080/v1) and OPENAI_MODEL; \
             OPENAI_API_KEY is optional"
        );
        return ExitCode::from(2);
    };
    let mut builder = OpenAiBackend::builder().base_url(base_url).model(model);
    if env("OPENAI_API_KEY").is_some() {
        builder = builder.api_key_env("OPENAI_API_KEY");
    }
    let backend = match builder.build() {
        Ok(b) => Retry::new(b),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let retry_stats = backend.stats();
    let rmb = match RmBoost::builder()
        .backend(backend)
        .aspects(Aspects::general())
        .concurrency(NonZeroUsize::new(4).expect("4 is not zero"))
        .seed(1)
        .first_params(SamplingParams::default().temperature(0.7).max_tokens(256))
        .second_params(SamplingParams::default().temperature(0.7).max_tokens(384))
        .build()
    {
        Ok(rmb) => rmb,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };

    let prompts = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| Prompt::with_id(format!("ex{i}"), *p));
    let started = Instant::now();
    let mut results = rmb.generate_iter(prompts);
    let mut summary = Summary::default();
    let mut fatal = false;
    while let Some(result) = results.next().await {
        summary.record(&result);
        match result {
            Ok(example) => println!("{}", example.to_json_line(ExampleFormat::Conversational)),
            Err(e) => {
                eprintln!("failed: {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    eprintln!("  caused by: {s}");
                    source = s.source();
                }
                if e.is_fatal() {
                    fatal = true;
                    break;
                }
            }
        }
    }
    eprintln!(
        "{summary}; {} retries; {:.1?}",
        retry_stats.retries(),
        started.elapsed()
    );
    if fatal || summary.examples == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
