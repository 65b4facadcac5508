//! # rmboost
//!
//! Synthetic preference data for training reward models with **RMBoost**
//! (Shen et al., "Boosting Reward Model with Preference-Conditional Multi-Aspect Synthetic Data
//! Generation"). For each prompt the generator
//!
//! 1. asks the model for a first response `y1`,
//! 2. draws the label *first*: the second response must be **better** or **worse**,
//! 3. draws the quality aspects the difference must lie in,
//! 4. asks the model for a second response `y2` that is better or worse than `y1` on those
//!    aspects,
//! 5. assembles the pair by construction: better → chosen = `y2`; worse → chosen = `y1`.
//!
//! No judge call is needed, the label is right by construction, and the aspects vary per
//! example.
//!
//! ## Quick start (offline)
//!
//! With the `test-util` feature's instant `testing::FakeBackend` standing in for a model:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rmboost::Error> {
//! use std::num::NonZeroUsize;
//!
//! use futures::StreamExt;
//! use rmboost::testing::FakeBackend;
//! use rmboost::{Aspects, ExampleFormat, ExampleWriter, GeneratorExt, Label, Prompt, RmBoost};
//!
//! let rmb = RmBoost::builder()
//!     .backend(FakeBackend::new())
//!     .aspects(Aspects::ultrafeedback())
//!     .concurrency(NonZeroUsize::new(4).unwrap())
//!     .seed(42)
//!     .build()?;
//!
//! let prompts = vec![
//!     Prompt::with_id("q1", "Explain why the sky is blue."),
//!     Prompt::with_id("q2", "Write a haiku about rain."),
//! ];
//! let mut writer = ExampleWriter::new(Vec::new(), ExampleFormat::Conversational);
//! let mut results = rmb.generate_iter(prompts);
//! while let Some(result) = results.next().await {
//!     let example = result?;
//!     // The construction rule: "better" means the second response is the chosen one.
//!     match example.label {
//!         Label::Better => assert!(example.chosen.starts_with("rewrite")),
//!         Label::Worse => assert!(example.rejected.starts_with("rewrite")),
//!     }
//!     writer.write(&example)?;
//! }
//! let jsonl = String::from_utf8(writer.into_inner()?).unwrap();
//! assert_eq!(jsonl.lines().count(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! ## The parts
//!
//! - [`LlmBackend`]: one async call from a [`CompletionRequest`] to a [`Completion`] or a typed
//!   [`BackendError`] that says whether to retry. Write your own in a few lines.
//! - [`LabelSampler`]: [`Bernoulli`] (balanced by default) or [`Graded`] (fills `margin`).
//! - [`AspectSet`]: [`Aspects`] presets for long-form QA, chat (UltraFeedback), summarisation
//!   and general use, or your own from code or JSON; subset, all, or model-picks sampling.
//! - [`PromptTemplate`]: [`DefaultTemplate`] renders both requests and parses the second
//!   answer, rejecting (and re-asking) empty answers, copies and meta-talk.
//! - [`RmBoost`]: composes them into a stream of `Result<PreferenceExample, Error>` with bounded
//!   concurrency and per-example seeding.
//! - [`methods`]: RMBoost and the paper's comparisons in the same harness, [`Rlcd`], [`Rlaif`]
//!   and [`WestOfN`]; all implement [`Generator`] (so does a method of your own), chosen at run
//!   time by [`Method`]. [`judge`] holds the LLM judge they and the report use.
//! - [`checks`]: the response checks and the one similarity measure they share with the
//!   report.
//! - [`report`]: a quality report of a dataset (label balance, length bias, near-identical
//!   pairs, diversity, aspects, failures) and a label check by an LLM judge.
//! - [`io`]: the JSONL prompt reader and example writer, the strict dataset reader, and
//!   [`io::merge`] for the shards of a run.
//!
//! ## Determinism
//!
//! Every random draw of an example comes from [`example_rng`]`(run seed, id)`, before the first
//! await: labels, aspects and backend seeds do not depend on concurrency, output order,
//! retries or resume.
//!
//! ## Features
//!
//! None is on by default. The modules and items behind a feature are marked with it in the
//! documentation built with all features (`cargo doc --all-features`, as on docs.rs); they are
//! named here as code, not links, so that these docs build with any set of features.
//!
//! - `test-util`: `testing`, scripted and fake backends for tests.
//! - `local`: `backend::local::LocalBackend`, a GGUF chat model in process (candle); the
//!   default model, SmolLM2-135M-Instruct, is fetched when asked (`fetch_default_model`).
//! - `run`: `run::run_to_file`, a whole run into a crash-safe, resumable JSONL file with a
//!   failure ledger, graceful stop and a Ctrl-C helper.
//! - `cache`: `backend::cache`, a persistent response cache around any backend.
//! - `openai`: `backend::openai::OpenAiBackend` for any OpenAI-compatible chat-completions
//!   server (vLLM, llama.cpp, Ollama, OpenAI, ...).
//! - `anthropic`: `backend::anthropic::AnthropicBackend` for Anthropic's Messages API.
//! - `batch`: `batch`, the providers' batch APIs (half the price) behind the same engine and
//!   run: `batch::BatchApi` with the OpenAI and Anthropic implementations (with those
//!   features) and `batch::run_batch_to_file`, which runs a generation through them.
//! - `middleware` (implied by `openai` and `anthropic`): `backend::retry::Retry`,
//!   `backend::rate_limit::RateLimit` and `backend::adaptive::Adaptive` (adaptive
//!   concurrency and a circuit breaker) around any backend, including your own, and
//!   `backend::Stack`, which puts them (and the cache) in the one order that works.
//! - `parquet`: `export`, a dataset folder for the Hugging Face Hub: Parquet files per
//!   split and a dataset card (pure Rust, no C build).
//! - `cli`: the `rmboost` command line (and `local`, `openai`, `anthropic`, `run`, `batch`,
//!   `cache` and `parquet`, which it uses).
//!
//! Minimum supported Rust version: 1.90.
#![deny(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// Builder setters (every builder of the crate): `name(arg: Type) => field = value;` writes
/// `pub fn name(mut self, arg: Type) -> Self { self.field = value; self }` (attributes and doc
/// comments before it go on the method).
macro_rules! setters {
    ($($(#[$attr:meta])* $name:ident($arg:ident: $ty:ty) => $($field:ident).+ = $value:expr;)*) => {$(
        $(#[$attr])*
        pub fn $name(mut self, $arg: $ty) -> Self {
            self.$($field).+ = $value;
            self
        }
    )*};
}

pub mod aspect;
pub mod backend;
#[cfg(feature = "batch")]
#[cfg_attr(docsrs, doc(cfg(feature = "batch")))]
pub mod batch;
pub mod checks;
pub mod engine;
mod error;
pub mod example;
#[cfg(feature = "parquet")]
#[cfg_attr(docsrs, doc(cfg(feature = "parquet")))]
pub mod export;
pub mod io;
pub mod judge;
pub mod label;
pub mod methods;
pub mod report;
#[cfg(feature = "run")]
#[cfg_attr(docsrs, doc(cfg(feature = "run")))]
pub mod run;
pub mod template;
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;

pub use aspect::{Aspect, AspectDraw, AspectSampling, AspectSet, Aspects};
pub use async_trait::async_trait;
pub use backend::{
    Completion, CompletionRequest, FinishReason, LlmBackend, Message, Role, SamplingParams, Usage,
};
pub use checks::ResponseChecks;
pub use engine::{example_rng, ExampleStream, Generator, GeneratorExt, OutputOrder, Summary};
pub use error::{
    error_chain, BackendError, BackendErrorKind, BoxError, Error, ErrorKind, Result, UnusableReason,
};
pub use example::{ExampleFormat, ExampleMetadata, PreferenceExample, Prompt, PromptInput};
pub use io::{read_prompts, ExampleWriter};
pub use label::{Bernoulli, Grade, Graded, Label, LabelDraw, LabelSampler};
pub use methods::{Method, MethodConfig, Rlaif, Rlcd, RmBoost, RmBoostBuilder, WestOfN};
/// The `rand` this crate is built with: [`LabelSampler`] and [`AspectSet`] take its `RngCore`,
/// and [`example_rng`] returns one of its generators. Name it through this re-export
/// (`use rmboost::rand::Rng;`) so that your sampler or method uses the same version.
pub use rand;
/// The `rand_chacha` whose `ChaCha8Rng` [`example_rng`] returns.
pub use rand_chacha;
/// The `reqwest` the HTTP backends are built with: their builders' `client` takes its
/// `Client` (a proxy, custom roots). Name it through this re-export so the versions match.
#[cfg(any(feature = "openai", feature = "anthropic"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "openai", feature = "anthropic"))))]
pub use reqwest;
pub use template::{DefaultTemplate, PromptTemplate, SecondContext};
