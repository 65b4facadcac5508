//! JSONL input and output: [`PromptReader`] reads prompt records, [`ExampleWriter`] writes
//! examples.

mod reader;
mod writer;

pub use reader::{read_prompts, PromptReader};
pub use writer::ExampleWriter;
