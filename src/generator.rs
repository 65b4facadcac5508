//! [`RmBoost`]: the builder, the per-example pipeline and the stream of examples.

use std::fmt;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::stream::{self, BoxStream, Stream, StreamExt};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::aspect::{AspectDraw, AspectSet, Aspects};
use crate::backend::{CompletionRequest, LlmBackend, Message, SamplingParams, Usage};
use crate::error::{Error, UnusableReason};
use crate::example::{ExampleMetadata, PreferenceExample, Prompt};
use crate::label::{Bernoulli, Label, LabelDraw, LabelSampler};
use crate::template::{DefaultTemplate, PromptTemplate, SecondContext};

/// The order in which a stream yields results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
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

/// Everything drawn for one example before any call: a pure function of the run seed and the
/// example id.
#[derive(Debug, Clone, PartialEq)]
pub struct ExamplePlan {
    /// The example's id.
    pub id: String,
    /// The prompt conversation.
    pub prompt: Vec<Message>,
    /// Fields of the input record carried into metadata.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Backend seed of the first call (re-ask `n` uses `first_seed + n`).
    pub first_seed: u64,
    /// Backend seed of the second call (re-ask `n` uses `second_seed + n`).
    pub second_seed: u64,
    /// The drawn label.
    pub label: LabelDraw,
    /// The drawn aspects.
    pub aspects: AspectDraw,
    /// The drawn template variant.
    pub variant: usize,
}

impl ExamplePlan {
    /// The context the template renders the second request from, given the first response.
    #[must_use]
    pub fn second_context<'a>(&'a self, first: &'a str) -> SecondContext<'a> {
        SecondContext {
            prompt: &self.prompt,
            first,
            label: &self.label,
            aspects: &self.aspects,
            variant: self.variant,
        }
    }
}

struct Inner {
    first_backend: Arc<dyn LlmBackend>,
    second_backend: Arc<dyn LlmBackend>,
    labels: Arc<dyn LabelSampler>,
    aspects: Arc<dyn AspectSet>,
    template: Arc<dyn PromptTemplate>,
    concurrency: NonZeroUsize,
    order: OutputOrder,
    seed: u64,
    first_params: SamplingParams,
    second_params: SamplingParams,
    max_reasks: u32,
}

/// The RMBoost generator: turns prompts into preference examples.
///
/// Built once with [`RmBoost::builder`]; cheap to clone (an `Arc` inside) and safe to share.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rmboost::Error> {
/// use futures::StreamExt;
/// use rmboost::testing::FakeBackend;
/// use rmboost::{Prompt, RmBoost};
///
/// let rmb = RmBoost::builder().backend(FakeBackend::new()).seed(7).build()?;
/// let prompts = vec![Prompt::new("Name a prime."), Prompt::new("Why is the sea salty?")];
/// let results: Vec<_> = rmb.generate_iter(prompts).collect().await;
/// assert_eq!(results.len(), 2);
/// for r in results {
///     let ex = r?;
///     assert_ne!(ex.chosen, ex.rejected);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RmBoost {
    inner: Arc<Inner>,
}

impl fmt::Debug for RmBoost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RmBoost")
            .field("first_backend", &i.first_backend.name())
            .field("second_backend", &i.second_backend.name())
            .field("labels", &i.labels)
            .field("aspects", &i.aspects)
            .field("template", &i.template)
            .field("concurrency", &i.concurrency)
            .field("order", &i.order)
            .field("seed", &i.seed)
            .field("first_params", &i.first_params)
            .field("second_params", &i.second_params)
            .field("max_reasks", &i.max_reasks)
            .finish()
    }
}

/// Builds an [`RmBoost`]; from [`RmBoost::builder`].
#[must_use = "a builder does nothing until build() is called"]
pub struct RmBoostBuilder {
    first_backend: Option<Arc<dyn LlmBackend>>,
    second_backend: Option<Arc<dyn LlmBackend>>,
    labels: Arc<dyn LabelSampler>,
    aspects: Arc<dyn AspectSet>,
    template: Arc<dyn PromptTemplate>,
    concurrency: NonZeroUsize,
    order: OutputOrder,
    seed: u64,
    first_params: SamplingParams,
    second_params: SamplingParams,
    max_reasks: u32,
}

impl fmt::Debug for RmBoostBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RmBoostBuilder")
            .field("has_first_backend", &self.first_backend.is_some())
            .field("has_second_backend", &self.second_backend.is_some())
            .field("concurrency", &self.concurrency)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
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

impl RmBoostBuilder {
    fn new() -> Self {
        RmBoostBuilder {
            first_backend: None,
            second_backend: None,
            labels: Arc::new(Bernoulli::default()),
            aspects: Arc::new(Aspects::general()),
            template: Arc::new(DefaultTemplate::new()),
            concurrency: NonZeroUsize::new(8).expect("8 is not zero"),
            order: OutputOrder::default(),
            seed: 0,
            first_params: default_first_params(),
            second_params: default_second_params(),
            max_reasks: 3,
        }
    }

    /// The backend for both calls. Required unless both [`first_backend`](Self::first_backend)
    /// and [`second_backend`](Self::second_backend) are set.
    pub fn backend(self, backend: impl LlmBackend + 'static) -> Self {
        self.backend_arc(Arc::new(backend))
    }

    /// Like [`backend`](Self::backend), for a backend already shared.
    pub fn backend_arc(mut self, backend: Arc<dyn LlmBackend>) -> Self {
        self.first_backend = Some(backend.clone());
        self.second_backend = Some(backend);
        self
    }

    /// The backend of the first (natural) response only.
    pub fn first_backend(mut self, backend: impl LlmBackend + 'static) -> Self {
        self.first_backend = Some(Arc::new(backend));
        self
    }

    /// The backend of the second (conditioned) response only.
    pub fn second_backend(mut self, backend: impl LlmBackend + 'static) -> Self {
        self.second_backend = Some(Arc::new(backend));
        self
    }

    /// The label sampler. Default: [`Bernoulli`] with `p = 0.5`.
    pub fn labels(mut self, labels: impl LabelSampler + 'static) -> Self {
        self.labels = Arc::new(labels);
        self
    }

    /// The aspect set. Default: [`Aspects::general`].
    pub fn aspects(mut self, aspects: impl AspectSet + 'static) -> Self {
        self.aspects = Arc::new(aspects);
        self
    }

    /// The prompt template. Default: [`DefaultTemplate`].
    pub fn template(mut self, template: impl PromptTemplate + 'static) -> Self {
        self.template = Arc::new(template);
        self
    }

    /// How many examples run at once (each makes its calls one after another, so this is also
    /// the most backend calls in flight). Default: 8.
    pub fn concurrency(mut self, concurrency: NonZeroUsize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// The output order. Default: [`OutputOrder::Completion`].
    pub fn order(mut self, order: OutputOrder) -> Self {
        self.order = order;
        self
    }

    /// The run seed; with each example's id it determines every random draw. Default: 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sampling of the first response. Default: [`default_first_params`].
    pub fn first_params(mut self, params: SamplingParams) -> Self {
        self.first_params = params;
        self
    }

    /// Sampling of the second response. Default: [`default_second_params`].
    pub fn second_params(mut self, params: SamplingParams) -> Self {
        self.second_params = params;
        self
    }

    /// How many times an unusable answer (empty, a copy, meta-talk) is asked again before the
    /// example fails. Default: 3 (so at most 4 answers per response).
    pub fn max_reasks(mut self, max_reasks: u32) -> Self {
        self.max_reasks = max_reasks;
        self
    }

    /// Validates the settings and builds the generator.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if no backend was given for a call or a sampling value is out of
    /// range (the message names the setting).
    pub fn build(self) -> Result<RmBoost, Error> {
        let first_backend = self.first_backend.ok_or_else(|| {
            Error::Config("no backend: call backend() (or first_backend())".into())
        })?;
        let second_backend = self.second_backend.ok_or_else(|| {
            Error::Config("no backend for the second response: call second_backend()".into())
        })?;
        self.first_params
            .validate("first_params")
            .map_err(Error::Config)?;
        self.second_params
            .validate("second_params")
            .map_err(Error::Config)?;
        if self.template.variants() == 0 {
            return Err(Error::Config("template has zero variants".into()));
        }
        Ok(RmBoost {
            inner: Arc::new(Inner {
                first_backend,
                second_backend,
                labels: self.labels,
                aspects: self.aspects,
                template: self.template,
                concurrency: self.concurrency,
                order: self.order,
                seed: self.seed,
                first_params: self.first_params,
                second_params: self.second_params,
                max_reasks: self.max_reasks,
            }),
        })
    }
}

/// The stream of results returned by [`RmBoost::generate`].
///
/// Yields one item per input prompt: `Ok(example)` or `Err(error)` carrying the id. After a
/// fatal error (see [`Error::is_fatal`]: a bad key, an exhausted quota, a missing model) it
/// yields that error once and ends; in-flight examples are dropped. Dropping the stream cancels
/// all in-flight work.
#[must_use = "streams do nothing unless polled"]
pub struct ExampleStream {
    inner: BoxStream<'static, Result<PreferenceExample, Error>>,
    done: bool,
}

impl fmt::Debug for ExampleStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExampleStream")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Stream for ExampleStream {
    type Item = Result<PreferenceExample, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = futures::ready!(self.inner.poll_next_unpin(cx));
        match &item {
            None => self.done = true,
            Some(Err(e)) if e.is_fatal() => {
                self.done = true;
                // Drop in-flight work now rather than when the stream is dropped.
                self.inner = stream::empty().boxed();
            }
            Some(_) => {}
        }
        Poll::Ready(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            (0, Some(0))
        } else {
            (0, self.inner.size_hint().1)
        }
    }
}

impl futures::stream::FusedStream for ExampleStream {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl RmBoost {
    /// A builder with the defaults: no backend yet, balanced labels, the general aspects, the
    /// default template, concurrency 8, completion order, seed 0, up to 3 re-asks.
    pub fn builder() -> RmBoostBuilder {
        RmBoostBuilder::new()
    }

    /// The run seed.
    #[must_use]
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// The concurrency.
    #[must_use]
    pub fn concurrency(&self) -> NonZeroUsize {
        self.inner.concurrency
    }

    /// Draws everything for one example without calling any model: the label, aspects, template
    /// variant and backend seeds. The same seed and id always give the same plan.
    #[must_use]
    pub fn plan(&self, prompt: Prompt) -> ExamplePlan {
        let inner = &*self.inner;
        let mut rng = example_rng(inner.seed, &prompt.id);
        let first_seed = rng.next_u64();
        let second_seed = rng.next_u64();
        let label = inner.labels.sample(&mut rng);
        let aspects = inner.aspects.sample(&mut rng);
        let n = inner.template.variants();
        let variant = if n > 1 { rng.random_range(0..n) } else { 0 };
        let Prompt { id, input, extra } = prompt;
        let prompt = input.into_messages();
        ExamplePlan {
            id,
            prompt,
            extra,
            first_seed,
            second_seed,
            label,
            aspects,
            variant,
        }
    }

    /// The first-response request the plan leads to (what a dry run shows).
    #[must_use]
    pub fn first_request(&self, plan: &ExamplePlan) -> CompletionRequest {
        CompletionRequest::new(self.inner.template.first_request(&plan.prompt))
            .with_params(&self.inner.first_params)
            .with_seed(plan.first_seed)
    }

    /// The second-response request for the plan and a first response.
    #[must_use]
    pub fn second_request(&self, plan: &ExamplePlan, first: &str) -> CompletionRequest {
        CompletionRequest::new(
            self.inner
                .template
                .second_request(&plan.second_context(first)),
        )
        .with_params(&self.inner.second_params)
        .with_seed(plan.second_seed)
    }

    /// Generates the example of one prompt.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if a call failed, [`Error::Unusable`] if an answer stayed unusable
    /// after every re-ask; both carry the prompt's id.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the example; nothing is written anywhere.
    pub async fn generate_one(&self, prompt: Prompt) -> Result<PreferenceExample, Error> {
        let plan = self.plan(prompt);
        run_plan(self.inner.clone(), plan).await
    }

    /// Turns a stream of prompts into a stream of results, one per prompt, with at most
    /// `concurrency` examples in flight. The input is pulled only as fast as results are
    /// consumed.
    pub fn generate<S>(&self, prompts: S) -> ExampleStream
    where
        S: Stream<Item = Prompt> + Send + 'static,
    {
        self.try_generate(prompts.map(Ok))
    }

    /// Like [`generate`](Self::generate), for an iterator of prompts.
    pub fn generate_iter<I>(&self, prompts: I) -> ExampleStream
    where
        I: IntoIterator<Item = Prompt>,
        I::IntoIter: Send + 'static,
    {
        self.generate(stream::iter(prompts))
    }

    /// Like [`generate`](Self::generate), for a fallible input such as a JSONL reader: an
    /// `Err` input item is passed through as an `Err` result in its place.
    pub fn try_generate<S>(&self, prompts: S) -> ExampleStream
    where
        S: Stream<Item = Result<Prompt, Error>> + Send + 'static,
    {
        let this = self.clone();
        drive(
            prompts,
            self.inner.concurrency,
            self.inner.order,
            move |p| {
                // Draws happen here, synchronously, before the first await.
                let plan = this.plan(p);
                run_plan(this.inner.clone(), plan)
            },
        )
    }
}

/// The stream machinery every generation method shares: runs `run` on each prompt with at most
/// `concurrency` in flight, in `order`, passes input errors through in place, and stops after a
/// fatal error (see [`ExampleStream`]).
///
/// `run` is called synchronously when the prompt is pulled from the input, so a method makes
/// all of its random draws there, before its future first awaits.
pub(crate) fn drive<S, F, Fut>(
    prompts: S,
    concurrency: NonZeroUsize,
    order: OutputOrder,
    run: F,
) -> ExampleStream
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
    let inner = match order {
        OutputOrder::Completion => futures.buffer_unordered(n).boxed(),
        OutputOrder::Input => futures.buffered(n).boxed(),
    };
    ExampleStream { inner, done: false }
}

/// What one response took: the accepted text, calls made and answers rejected.
pub(crate) struct Answer<T> {
    pub(crate) value: T,
    pub(crate) usage: Usage,
    pub(crate) model: String,
    pub(crate) calls: u32,
    pub(crate) reasks: u32,
}

/// Sends `base` (with seed `seed + attempt`) until `accept` takes the answer or `max_reasks`
/// re-asks are used up.
pub(crate) async fn ask<T>(
    backend: &dyn LlmBackend,
    id: &str,
    call: &'static str,
    base: &CompletionRequest,
    seed: u64,
    max_reasks: u32,
    accept: impl FnMut(&str) -> Result<T, UnusableReason>,
) -> Result<Answer<T>, Error> {
    ask_with(backend, id, call, base, None, seed, max_reasks, accept).await
}

/// Like [`ask`], sending `reask` instead of `base` for every re-ask when given.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn ask_with<T>(
    backend: &dyn LlmBackend,
    id: &str,
    call: &'static str,
    base: &CompletionRequest,
    reask: Option<&CompletionRequest>,
    seed: u64,
    max_reasks: u32,
    mut accept: impl FnMut(&str) -> Result<T, UnusableReason>,
) -> Result<Answer<T>, Error> {
    let mut usage = Usage::default();
    let mut model = String::new();
    let mut attempt: u32 = 0;
    loop {
        let request = match reask {
            Some(r) if attempt > 0 => r,
            _ => base,
        }
        .clone()
        .with_seed(seed.wrapping_add(u64::from(attempt)));
        let completion = backend
            .complete(request)
            .await
            .map_err(|source| Error::Backend {
                id: id.to_string(),
                call,
                source,
            })?;
        usage += completion.usage;
        if !completion.model.is_empty() {
            model = completion.model;
        }
        match accept(&completion.text) {
            Ok(value) => {
                return Ok(Answer {
                    value,
                    usage,
                    model,
                    calls: attempt + 1,
                    reasks: attempt,
                })
            }
            Err(reason) => {
                tracing::debug!(id, call, attempt, %reason, "unusable answer");
                if attempt >= max_reasks {
                    return Err(Error::Unusable {
                        id: id.to_string(),
                        call,
                        attempts: attempt + 1,
                        reason,
                    });
                }
                attempt += 1;
            }
        }
    }
}

async fn run_plan(inner: Arc<Inner>, plan: ExamplePlan) -> Result<PreferenceExample, Error> {
    let span = tracing::debug_span!("rmboost.example", id = %plan.id, label = %plan.label.label);
    async move {
        let template = &*inner.template;
        let first_req = CompletionRequest::new(template.first_request(&plan.prompt))
            .with_params(&inner.first_params);
        let first = ask(
            &*inner.first_backend,
            &plan.id,
            "first",
            &first_req,
            plan.first_seed,
            inner.max_reasks,
            |raw| template.accept_first(raw),
        )
        .await?;
        drop(first_req);

        let ctx = plan.second_context(&first.value);
        let second_req =
            CompletionRequest::new(template.second_request(&ctx)).with_params(&inner.second_params);
        let second = ask(
            &*inner.second_backend,
            &plan.id,
            "second",
            &second_req,
            plan.second_seed,
            inner.max_reasks,
            |raw| template.parse_second(raw, &ctx),
        )
        .await?;
        drop(second_req);

        let aspects = match second.value.picked_aspects {
            Some(picked) => picked,
            None => plan
                .aspects
                .aspects
                .iter()
                .map(|a| a.name.clone())
                .collect(),
        };
        let mut metadata = ExampleMetadata {
            method: "rmboost".into(),
            seed: inner.seed,
            calls: first.calls + second.calls,
            reasks: first.reasks + second.reasks,
            input: plan.extra,
            ..ExampleMetadata::default()
        };
        metadata.models.insert("first".into(), first.model);
        metadata.models.insert("second".into(), second.model);
        metadata.usage.insert("first".into(), first.usage);
        metadata.usage.insert("second".into(), second.usage);
        metadata
            .usage
            .insert("total".into(), first.usage + second.usage);
        let (chosen, rejected) = match plan.label.label {
            Label::Better => (second.value.text, first.value),
            Label::Worse => (first.value, second.value.text),
        };
        Ok(PreferenceExample {
            id: plan.id,
            prompt: plan.prompt,
            chosen,
            rejected,
            label: plan.label.label,
            grade: plan.label.grade,
            aspects,
            margin: plan.label.margin,
            metadata,
        })
    }
    .instrument(span)
    .await
}

/// Running totals over a stream of results, for progress lines and final summaries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
