//! The engine every generation method runs on: the per-example RNG ([`example_rng`]), the
//! stream driver with bounded concurrency and either output order ([`ExampleStream`]), the
//! re-ask loop, the options every method shares, the metadata collector, the [`Generator`]
//! trait and the running [`Summary`].
//!
//! A method supplies one function from a prompt to a future of its example; the engine makes
//! the stream: it calls the function when it pulls the prompt (so every draw happens before
//! the first await), keeps at most `concurrency` futures in flight, passes input errors
//! through in place, and ends after a fatal error.

use std::fmt::{self, Write as _};
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::stream::{self, BoxStream, Stream, StreamExt};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::aspect::Aspect;
use crate::backend::{CompletionRequest, LlmBackend, Message, Role, SamplingParams, Usage};
use crate::error::{Error, UnusableReason};
use crate::example::{ExampleMetadata, PreferenceExample, Prompt};
use crate::label::{Label, LabelDraw};

/// The order in which a stream yields results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OutputOrder {
    /// As each example finishes: best throughput, since one slow example holds nothing up.
    /// Every result carries its id. The default.
    #[default]
    Completion,
    /// In input order: a slow example holds back the ones after it (still `concurrency` in
    /// flight).
    Input,
}

/// The RNG every random draw of one example comes from.
///
/// Seeded by SHA-256 of `(run seed, example id)`, so it depends on nothing else: not on
/// concurrency, ordering, retries, resume or sharding. ChaCha8 is a named algorithm whose
/// output does not change between `rand` releases.
#[must_use]
pub fn example_rng(run_seed: u64, id: &str) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(b"rmboost/example/v1\0");
    h.update(run_seed.to_le_bytes());
    h.update(id.as_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}

/// Default sampling of the first response: temperature 0.7, at most 512 tokens.
#[must_use]
pub fn default_first_params() -> SamplingParams {
    SamplingParams::default().temperature(0.7).max_tokens(512)
}

/// Default sampling of the second response: temperature 0.7, at most 768 tokens (room for a
/// short plan before the tagged answer).
#[must_use]
pub fn default_second_params() -> SamplingParams {
    SamplingParams::default().temperature(0.7).max_tokens(768)
}

/// The stream of results every [`Generator`] returns ([`GeneratorExt::generate`] and the others).
///
/// Yields one item per input prompt: `Ok(example)` or `Err(error)` carrying the id. After a
/// fatal error (see [`Error::is_fatal`]: a bad key, an exhausted quota, a missing model) it
/// yields that error once and ends; in-flight examples are dropped. Dropping the stream cancels
/// all in-flight work.
#[must_use = "streams do nothing unless polled"]
pub struct ExampleStream {
    /// `None` once the stream has ended.
    inner: Option<BoxStream<'static, Result<PreferenceExample, Error>>>,
}

impl fmt::Debug for ExampleStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExampleStream")
            .field("done", &self.inner.is_none())
            .finish_non_exhaustive()
    }
}

impl Stream for ExampleStream {
    type Item = Result<PreferenceExample, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let item = futures::ready!(inner.poll_next_unpin(cx));
        if item
            .as_ref()
            .is_none_or(|r| r.as_ref().is_err_and(Error::is_fatal))
        {
            // Drop in-flight work now rather than when the stream is dropped.
            self.inner = None;
        }
        Poll::Ready(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner
            .as_ref()
            .map_or((0, Some(0)), |s| (0, s.size_hint().1))
    }
}

impl futures::stream::FusedStream for ExampleStream {
    fn is_terminated(&self) -> bool {
        self.inner.is_none()
    }
}

impl ExampleStream {
    /// Wraps any stream of results as the stream a [`Generator`] returns. The stream ends
    /// after the first fatal error it yields (see [`Error::is_fatal`]), dropping what the inner
    /// stream still had in flight; a method of your own gets that rule for free. For the
    /// common case (one future per prompt, a bound on those in flight, input errors passed
    /// through) use [`ExampleStream::drive`].
    pub fn new<S>(stream: S) -> Self
    where
        S: Stream<Item = Result<PreferenceExample, Error>> + Send + 'static,
    {
        ExampleStream {
            inner: Some(stream.boxed()),
        }
    }

    /// The stream machinery every generation method shares: runs `run` on each prompt with at
    /// most `concurrency` in flight, yields results in `order`, passes an `Err` input item
    /// through in its place, and stops after a fatal error. The input is pulled only as fast
    /// as results are consumed.
    ///
    /// `run` is called synchronously when the prompt is pulled from the input, before its
    /// future is first polled: make a method's random draws there (from
    /// [`example_rng`]`(seed, prompt.id())`), so that they do not depend on the order in which
    /// examples finish.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::num::NonZeroUsize;
    /// use futures::StreamExt;
    /// use rmboost::{ExampleStream, OutputOrder, PreferenceExample, Prompt};
    ///
    /// let prompts = futures::stream::iter(vec![Ok(Prompt::with_id("a", "Hi?"))]);
    /// let stream = ExampleStream::drive(
    ///     prompts,
    ///     NonZeroUsize::new(4).unwrap(),
    ///     OutputOrder::Input,
    ///     |prompt: Prompt| async move {
    ///         Ok(PreferenceExample {
    ///             id: prompt.id().to_owned(),
    ///             prompt: prompt.messages().into_owned(),
    ///             chosen: "Hello!".into(),
    ///             rejected: "Go away.".into(),
    ///             label: rmboost::Label::Worse,
    ///             grade: None,
    ///             aspects: vec!["politeness".into()],
    ///             margin: None,
    ///             metadata: Default::default(),
    ///         })
    ///     },
    /// );
    /// let results: Vec<_> = stream.collect().await;
    /// assert_eq!(results[0].as_ref().unwrap().chosen, "Hello!");
    /// # }
    /// ```
    pub fn drive<S, F, Fut>(
        prompts: S,
        concurrency: NonZeroUsize,
        order: OutputOrder,
        run: F,
    ) -> Self
    where
        S: Stream<Item = Result<Prompt, Error>> + Send + 'static,
        F: Fn(Prompt) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<PreferenceExample, Error>> + Send + 'static,
    {
        let futures = prompts.map(move |p| match p {
            Ok(p) => futures::future::Either::Left(run(p)),
            Err(e) => futures::future::Either::Right(futures::future::ready(Err(e))),
        });
        let n = concurrency.get();
        match order {
            OutputOrder::Completion => Self::new(futures.buffer_unordered(n)),
            OutputOrder::Input => Self::new(futures.buffered(n)),
        }
    }
}

/// What one response took: the accepted text and the calls made (all but the last rejected).
pub(crate) struct Answer<T> {
    pub(crate) value: T,
    pub(crate) usage: Usage,
    pub(crate) model: String,
    pub(crate) calls: u32,
}

/// Sends `base` (re-ask `n` with its seed + `n`, and `reask` instead of `base` when given)
/// until `accept` takes the answer or `max_reasks` re-asks are used up.
pub(crate) async fn ask<T>(
    backend: &dyn LlmBackend,
    id: &str,
    call: &'static str,
    base: &CompletionRequest,
    reask: Option<&CompletionRequest>,
    max_reasks: u32,
    mut accept: impl FnMut(&str) -> Result<T, UnusableReason>,
) -> Result<Answer<T>, Error> {
    let mut usage = Usage::default();
    let mut model = String::new();
    let seed = base.seed.unwrap_or(0);
    let mut attempt = 0;
    let value = loop {
        let request = reask.filter(|_| attempt > 0).unwrap_or(base).clone();
        let request = request.with_seed(seed.wrapping_add(u64::from(attempt)));
        let completion = backend
            .complete(request)
            .await
            .map_err(|source| Error::backend(id.to_string(), call, source))?;
        usage += completion.usage;
        if !completion.model.is_empty() {
            model = completion.model;
        }
        match accept(&completion.text) {
            Ok(value) => break value,
            Err(reason) if attempt >= max_reasks => {
                return Err(Error::unusable(id.to_string(), call, attempt + 1, reason));
            }
            Err(reason) => tracing::debug!(id, call, attempt, %reason, "unusable answer"),
        }
        attempt += 1;
    };
    let calls = attempt + 1;
    Ok(Answer {
        value,
        usage,
        model,
        calls,
    })
}

/// A generation method ready to run: turns prompts into a stream of preference examples.
///
/// Object safe, so a program can choose the method at run time (`Box<dyn Generator>`,
/// `Arc<dyn Generator>`). Every implementation keeps the crate's invariants: per-example
/// seeding with [`example_rng`], at most [`concurrency`](Self::concurrency)
/// examples in flight, one result per input prompt carrying its id, and a stop after a fatal
/// error.
pub trait Generator: Send + Sync + fmt::Debug {
    /// The method's name, written into each example's `metadata.method` (`"rmboost"`,
    /// `"rlcd"`, `"rlaif"`, `"west-of-n"` for the built-in ones; a method of your own names
    /// itself).
    fn method(&self) -> &str;

    /// The run seed.
    fn seed(&self) -> u64;

    /// The most examples in flight at once.
    fn concurrency(&self) -> NonZeroUsize;

    /// Turns a boxed stream of prompts into a stream of results, one per prompt; an `Err` input
    /// item is passed through in its place. [`GeneratorExt`]'s `generate`, `generate_iter` and
    /// `try_generate` call it for any stream or iterator. A method of your own builds the
    /// result with [`ExampleStream::drive`] (or [`ExampleStream::new`]).
    fn generate_boxed(&self, prompts: BoxStream<'static, Result<Prompt, Error>>) -> ExampleStream;
}

/// The stream methods of every [`Generator`], the built-in ones and yours: each is
/// [`generate_boxed`](Generator::generate_boxed) for another kind of input. Implemented for
/// every `Generator` (and `dyn Generator`); bring it into scope with
/// `use rmboost::GeneratorExt`.
pub trait GeneratorExt: Generator {
    /// Turns a stream of prompts into a stream of results, one per prompt, with at most
    /// [`concurrency`](Generator::concurrency) examples in flight. The input is pulled only as
    /// fast as results are consumed.
    fn generate<S>(&self, prompts: S) -> ExampleStream
    where
        S: Stream<Item = Prompt> + Send + 'static,
    {
        self.generate_boxed(prompts.map(Ok).boxed())
    }

    /// Like [`generate`](Self::generate), for an iterator of prompts.
    fn generate_iter<I>(&self, prompts: I) -> ExampleStream
    where
        I: IntoIterator<Item = Prompt>,
        I::IntoIter: Send + 'static,
    {
        self.generate_boxed(stream::iter(prompts).map(Ok).boxed())
    }

    /// Like [`generate`](Self::generate), for a fallible input such as a JSONL reader turned
    /// into a stream: an `Err` input item is passed through as an `Err` result in its place.
    fn try_generate<S>(&self, prompts: S) -> ExampleStream
    where
        S: Stream<Item = Result<Prompt, Error>> + Send + 'static,
    {
        self.generate_boxed(prompts.boxed())
    }
}

impl<G: Generator + ?Sized> GeneratorExt for G {}

crate::aspect::forward_impls!(Generator {
    fn method(&self) -> &str;
    fn seed(&self) -> u64;
    fn concurrency(&self) -> NonZeroUsize;
    fn generate_boxed(&self, prompts: BoxStream<'static, Result<Prompt, Error>>) -> ExampleStream;
});

/// Running totals over a stream of results, for progress lines and final summaries.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Summary {
    /// Examples produced.
    pub examples: u64,
    /// Examples that failed, by [`Error::kind_str`].
    pub failures: std::collections::BTreeMap<&'static str, u64>,
    /// Backend calls made by the examples produced.
    pub calls: u64,
    /// Answers rejected and asked again, in the examples produced.
    pub reasks: u64,
    /// Tokens used by the examples produced.
    pub usage: Usage,
    /// Examples labelled better.
    pub better: u64,
}

impl Summary {
    /// Adds one result.
    pub fn record(&mut self, result: &Result<PreferenceExample, Error>) {
        match result {
            Ok(ex) => {
                self.examples += 1;
                self.calls += u64::from(ex.metadata.calls);
                self.reasks += u64::from(ex.metadata.reasks);
                if let Some(u) = ex.metadata.usage.get("total") {
                    self.usage += *u;
                }
                if ex.label == Label::Better {
                    self.better += 1;
                }
            }
            Err(e) => *self.failures.entry(e.kind_str()).or_insert(0) += 1,
        }
    }

    /// All failures.
    #[must_use]
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} examples, {} failed, {} re-asks, {} calls, {} tokens ({} prompt + {} completion)",
            self.examples,
            self.failed(),
            self.reasks,
            self.calls,
            self.usage.total(),
            self.usage.prompt_tokens,
            self.usage.completion_tokens
        )?;
        if !self.failures.is_empty() {
            f.write_str("; failures:")?;
            for (k, n) in &self.failures {
                write!(f, " {k}={n}")?;
            }
        }
        Ok(())
    }
}

/// A backend in a `Debug` dump: its name, never its settings (which may hold a key).
impl fmt::Debug for dyn LlmBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.name(), f)
    }
}

/// Settings every built-in method shares: the backend of its calls and their sampling (each
/// builder sets these with setters of its own), and those of [`common_setters`].
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub(crate) backend: Option<Arc<dyn LlmBackend>>,
    pub(crate) params: SamplingParams,
    pub(crate) concurrency: NonZeroUsize,
    pub(crate) order: OutputOrder,
    pub(crate) seed: u64,
    pub(crate) max_reasks: u32,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            backend: None,
            params: default_first_params(),
            concurrency: NonZeroUsize::new(8).expect("8 is not zero"),
            order: OutputOrder::default(),
            seed: 0,
            max_reasks: 3,
        }
    }
}

impl Common {
    /// The backend. A builder's `build()` refuses to build without one, so a built method has it.
    pub(crate) fn backend(&self) -> &Arc<dyn LlmBackend> {
        self.backend.as_ref().expect("build() checked the backend")
    }

    /// What a baseline's `build()` checks: a backend, and sampling values in range.
    pub(crate) fn check(&self, method: &str) -> Result<(), Error> {
        if self.backend.is_none() {
            return Err(Error::config(format!(
                "{method}: no backend: call backend()"
            )));
        }
        self.params
            .validate(&format!("{method} params"))
            .map_err(Error::config)
    }
}

/// The builder setters of [`Common`] every method's builder shares; `(policy)` adds the
/// baselines' `backend` and `params`.
macro_rules! common_setters {
    (policy) => {
        setters! {
            /// The policy backend, which writes the responses (and by default also judges or
            /// scores them, for RLAIF and West-of-N). Required.
            backend(backend: impl crate::LlmBackend + 'static) =>
                common.backend = Some(crate::backend::shared(backend));
            /// Sampling of the policy's responses. Default:
            /// [`default_first_params`](crate::engine::default_first_params). Use a temperature
            /// above 0 so that samples of one prompt differ.
            params(params: crate::SamplingParams) => common.params = params;
        }
        crate::engine::common_setters!();
    };
    () => {
        setters! {
            /// How many examples run at once (each makes its calls one after another, so this
            /// is also the most backend calls in flight). Default: 8.
            concurrency(concurrency: std::num::NonZeroUsize) => common.concurrency = concurrency;
            /// The output order. Default: [`OutputOrder::Completion`](crate::OutputOrder).
            order(order: crate::engine::OutputOrder) => common.order = order;
            /// The run seed; with each example's id it determines every random draw. Default: 0.
            seed(seed: u64) => common.seed = seed;
            /// How many times an unusable answer (empty, a copy of the other response, a judge
            /// answer without a verdict or score) is asked again, with the next backend seed,
            /// before the example fails. Default: 3.
            max_reasks(max_reasks: u32) => common.max_reasks = max_reasks;
        }

        /// All the shared settings at once ([`MethodConfig`](crate::MethodConfig)).
        pub(crate) fn with_common(mut self, common: crate::engine::Common) -> Self {
            self.common = common;
            self
        }
    };
}
pub(crate) use common_setters;

/// `system` as the first message of `prompt`, merged into a system message already there.
pub(crate) fn with_system(system: &str, prompt: &[Message]) -> Vec<Message> {
    let mut out = prompt.to_vec();
    match out.first_mut() {
        Some(first) if first.role == Role::System => {
            first.content = format!("{system}\n\n{}", first.content);
        }
        _ => out.insert(0, Message::system(system)),
    }
    out
}

/// `- name: definition` lines.
pub(crate) fn render_aspects(aspects: &[Aspect], out: &mut String) {
    for a in aspects {
        let _ = writeln!(out, "- {}: {}", a.name, a.definition);
    }
}

/// The aspects' names.
pub(crate) fn names(aspects: &[Aspect]) -> Vec<String> {
    aspects.iter().map(|a| a.name.clone()).collect()
}

/// One example under way: its id and prompt, the re-ask limit, and the metadata its calls add
/// to, call group by call group.
pub(crate) struct Example {
    pub(crate) id: String,
    pub(crate) prompt: Vec<Message>,
    pub(crate) metadata: ExampleMetadata,
    total: Usage,
    max_reasks: u32,
}

impl Example {
    /// Starts the example of `prompt` for `method` with `common`'s seed and re-ask limit.
    pub(crate) fn new(method: &str, common: &Common, prompt: Prompt) -> Self {
        let Prompt { id, input, extra } = prompt;
        Example {
            id,
            prompt: input.into_messages(),
            metadata: ExampleMetadata {
                method: method.into(),
                seed: common.seed,
                input: extra,
                ..ExampleMetadata::default()
            },
            total: Usage::default(),
            max_reasks: common.max_reasks,
        }
    }

    /// Sends `req` to `backend` until `accept` takes the answer (see [`ask`]); records nothing.
    pub(crate) async fn call<T>(
        &self,
        backend: &dyn LlmBackend,
        call: &'static str,
        req: &CompletionRequest,
        accept: impl FnMut(&str) -> Result<T, UnusableReason>,
    ) -> Result<Answer<T>, Error> {
        ask(backend, &self.id, call, req, None, self.max_reasks, accept).await
    }

    /// [`call`](Self::call), with what it took recorded under `call`.
    pub(crate) async fn ask<T>(
        &mut self,
        backend: &dyn LlmBackend,
        call: &'static str,
        req: &CompletionRequest,
        accept: impl FnMut(&str) -> Result<T, UnusableReason>,
    ) -> Result<T, Error> {
        let answer = self.call(backend, call, req, accept).await?;
        self.add(call, &answer);
        Ok(answer.value)
    }

    /// Records a call group (summing with an earlier group of the same name).
    pub(crate) fn record(
        &mut self,
        group: &str,
        calls: u32,
        reasks: u32,
        usage: Usage,
        model: &str,
    ) {
        let md = &mut self.metadata;
        md.calls += calls;
        md.reasks += reasks;
        *md.usage.entry(group.to_string()).or_default() += usage;
        self.total += usage;
        let slot = md.models.entry(group.to_string()).or_default();
        if !model.is_empty() {
            *slot = model.to_string();
        }
    }

    pub(crate) fn add<T>(&mut self, group: &str, a: &Answer<T>) {
        self.record(group, a.calls, a.calls - 1, a.usage, &a.model);
    }

    /// The example's failure: its `calls` answers under `call` make no pair, for reason `why`.
    pub(crate) fn fail(self, call: &'static str, calls: u32, why: String) -> Error {
        Error::unusable(self.id, call, calls, UnusableReason::Other(why))
    }

    /// The finished example by the construction rule: label better → chosen = the later
    /// response, worse → chosen = the earlier one.
    pub(crate) fn finish(
        mut self,
        earlier: String,
        later: String,
        label: LabelDraw,
        aspects: Vec<String>,
    ) -> PreferenceExample {
        let (chosen, rejected) = match label.label {
            Label::Better => (later, earlier),
            Label::Worse => (earlier, later),
        };
        self.metadata.usage.insert("total".into(), self.total);
        PreferenceExample {
            id: self.id,
            prompt: self.prompt,
            chosen,
            rejected,
            label: label.label,
            grade: label.grade,
            aspects,
            margin: label.margin,
            metadata: self.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_is_merged() {
        let plain = with_system("S", &[Message::user("u")]);
        assert_eq!(plain, vec![Message::system("S"), Message::user("u")]);
        let merged = with_system("S", &[Message::system("theirs"), Message::user("u")]);
        assert_eq!(
            merged,
            vec![Message::system("S\n\ntheirs"), Message::user("u")]
        );
    }
}
