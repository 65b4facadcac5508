//! The README's "Use it from Rust" snippet, as a program that compiles and runs: everything below
//! this header is copied into README.md verbatim, and `tests/it/examples.rs` fails if the two
//! differ (it also runs this program against its loopback server).
//!
//! ```text
//! OPENAI_BASE_URL=http://127.0.0.1:8080/v1 cargo run --example readme --features openai
//! ```

use std::num::NonZeroUsize;

use futures::StreamExt;
use rmboost::backend::openai::OpenAiBackend;
use rmboost::{Aspects, ExampleFormat, ExampleWriter, GeneratorExt, Prompt, RmBoost};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Any OpenAI-compatible server: llama.cpp, vLLM, Ollama, ... (for OpenAI itself, leave the
    // base URL out and set OPENAI_API_KEY). Or any other `LlmBackend`, your own included.
    let base_url =
        std::env::var("OPENAI_BASE_URL").unwrap_or_else(|_| "http://127.0.0.1:8080/v1".into());
    let backend = OpenAiBackend::builder()
        .base_url(base_url)
        .model("smollm2")
        .build()?;

    let rmb = RmBoost::builder()
        .backend(backend)
        .aspects(Aspects::ultrafeedback()) // or long_form_qa, summarization, general, your own
        .concurrency(NonZeroUsize::new(16).unwrap())
        .seed(42)
        .build()?;
    let mut writer = ExampleWriter::new(std::io::stdout(), ExampleFormat::Conversational);
    let mut results = rmb.generate_iter(vec![Prompt::new("Why is the sky blue?")]);
    while let Some(result) = results.next().await {
        match result {
            Ok(example) => writer.write(&example)?,
            Err(e) => eprintln!("{e}"), // carries the example id; never a row
        }
    }
    writer.flush()?;
    Ok(())
}
