//! [`RmBoost`]: the builder, the per-example pipeline and the stream of examples.

use std::future::Future;
use std::sync::Arc;

use rand::{Rng, RngCore};

use super::{Draw, Method};
use crate::aspect::{AspectDraw, AspectSet, Aspects};
use crate::backend::{shared, CompletionRequest, LlmBackend, Message, SamplingParams};
use crate::engine::{common_setters, default_second_params, example_rng, names, Common, Example};
use crate::error::Error;
use crate::example::{PreferenceExample, Prompt, PromptInput};
use crate::label::{Bernoulli, LabelDraw, LabelSampler};
use crate::template::{DefaultTemplate, PromptTemplate, SecondContext};

/// Everything drawn for one example before any call: a pure function of the run seed and the
/// example id.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
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
        SecondContext::new(&self.prompt, first, &self.label, &self.aspects)
            .with_variant(self.variant)
    }
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
/// use rmboost::{GeneratorExt, Prompt, RmBoost};
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
#[derive(Clone, Debug)]
pub struct RmBoost(pub(super) Arc<RmBoostBuilder>);

/// Builds an [`RmBoost`]; from [`RmBoost::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct RmBoostBuilder {
    second_backend: Option<Arc<dyn LlmBackend>>,
    labels: Arc<dyn LabelSampler>,
    aspects: Arc<dyn AspectSet>,
    template: Arc<dyn PromptTemplate>,
    second_params: SamplingParams,
    /// The first call's backend and sampling among the rest.
    pub(super) common: Common,
}

impl RmBoostBuilder {
    /// The backend for both calls. Required unless both [`first_backend`](Self::first_backend)
    /// and [`second_backend`](Self::second_backend) are set. Any backend: one already shared
    /// as an `Arc<dyn LlmBackend>` is used as it is.
    pub fn backend(self, backend: impl LlmBackend + 'static) -> Self {
        let backend = shared(backend);
        self.first_backend(backend.clone()).second_backend(backend)
    }

    setters! {
        /// The backend of the first (natural) response only.
        first_backend(backend: impl LlmBackend + 'static) => common.backend = Some(shared(backend));
        /// The backend of the second (conditioned) response only.
        second_backend(backend: impl LlmBackend + 'static) =>
            second_backend = Some(shared(backend));
        /// The label sampler. Default: [`Bernoulli`] with `p = 0.5`.
        labels(labels: impl LabelSampler + 'static) => labels = Arc::new(labels);
        /// The aspect set. Default: [`Aspects::general`].
        aspects(aspects: impl AspectSet + 'static) => aspects = Arc::new(aspects);
        /// The prompt template. Default: [`DefaultTemplate`].
        template(template: impl PromptTemplate + 'static) => template = Arc::new(template);
        /// Sampling of the first response. Default:
        /// [`default_first_params`](crate::engine::default_first_params).
        first_params(params: SamplingParams) => common.params = params;
        /// Sampling of the second response. Default: [`default_second_params`].
        second_params(params: SamplingParams) => second_params = params;
    }

    common_setters!();

    /// Validates the settings and builds the generator.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if no backend was given for a call or a sampling value is out of
    /// range (the message names the setting).
    pub fn build(self) -> Result<RmBoost, Error> {
        if self.common.backend.is_none() {
            return Err(Error::config(
                "no backend: call backend() (or first_backend())",
            ));
        }
        if self.second_backend.is_none() {
            return Err(Error::config(
                "no backend for the second response: call second_backend()",
            ));
        }
        self.common
            .params
            .validate("first_params")
            .map_err(Error::config)?;
        self.second_params
            .validate("second_params")
            .map_err(Error::config)?;
        if self.template.variants() == 0 {
            return Err(Error::config("template has zero variants"));
        }
        Ok(RmBoost(Arc::new(self)))
    }
}

impl RmBoost {
    /// A builder with the defaults: no backend yet, balanced labels, the general aspects, the
    /// default template, concurrency 8, completion order, seed 0, up to 3 re-asks.
    pub fn builder() -> RmBoostBuilder {
        RmBoostBuilder {
            second_backend: None,
            labels: Arc::new(Bernoulli::default()),
            aspects: Arc::new(Aspects::general()),
            template: Arc::new(DefaultTemplate::new()),
            second_params: default_second_params(),
            common: Common::default(),
        }
    }

    /// Draws everything for one example without calling any model: the label, aspects, template
    /// variant and backend seeds. The same seed and id always give the same plan.
    #[must_use]
    pub fn plan(&self, prompt: Prompt) -> ExamplePlan {
        self.0.plan(prompt)
    }

    /// The first-response request the plan leads to (what a dry run shows).
    #[must_use]
    pub fn first_request(&self, plan: &ExamplePlan) -> CompletionRequest {
        self.0.first_request(&plan.prompt, plan.first_seed)
    }

    /// The second-response request for the plan and a first response.
    #[must_use]
    pub fn second_request(&self, plan: &ExamplePlan, first: &str) -> CompletionRequest {
        self.0
            .second_request(&plan.second_context(first), plan.second_seed)
    }
}

impl RmBoostBuilder {
    /// Every draw of the example of `prompt`.
    fn plan(&self, prompt: Prompt) -> ExamplePlan {
        let mut rng = example_rng(self.common.seed, &prompt.id);
        let first_seed = rng.next_u64();
        let second_seed = rng.next_u64();
        let label = self.labels.sample(&mut rng);
        let aspects = self.aspects.sample(&mut rng);
        let n = self.template.variants();
        let variant = if n > 1 { rng.random_range(0..n) } else { 0 };
        let Prompt { id, input, extra } = prompt;
        ExamplePlan {
            id,
            prompt: input.into_messages(),
            extra,
            first_seed,
            second_seed,
            label,
            aspects,
            variant,
        }
    }

    fn first_request(&self, prompt: &[Message], seed: u64) -> CompletionRequest {
        CompletionRequest::new(self.template.first_request(prompt))
            .with_params(&self.common.params)
            .with_seed(seed)
    }

    fn second_request(&self, ctx: &SecondContext<'_>, seed: u64) -> CompletionRequest {
        CompletionRequest::new(self.template.second_request(ctx))
            .with_params(&self.second_params)
            .with_seed(seed)
    }
}

impl Draw for RmBoostBuilder {
    const METHOD: Method = Method::RmBoost;

    fn example(
        self: Arc<Self>,
        prompt: Prompt,
    ) -> impl Future<Output = Result<PreferenceExample, Error>> + Send + 'static {
        let plan = self.plan(prompt);
        async move {
            let (template, c) = (&*self.template, &self.common);
            let ExamplePlan {
                id, prompt, extra, ..
            } = plan;
            let input = PromptInput::Messages(prompt);
            let mut ex = Example::new(Self::METHOD.as_str(), c, Prompt { id, input, extra });
            let req = self.first_request(&ex.prompt, plan.first_seed);
            let first = ex
                .ask(&**c.backend(), "first", &req, |raw| {
                    template.accept_first(raw)
                })
                .await?;
            drop(req);
            let ctx = SecondContext::new(&ex.prompt, &first, &plan.label, &plan.aspects)
                .with_variant(plan.variant);
            let req = self.second_request(&ctx, plan.second_seed);
            let backend = &**self.second_backend.as_ref().expect("build() checked it");
            let accept = |raw: &str| template.parse_second(raw, &ctx);
            let second = ex.call(backend, "second", &req, accept).await?;
            drop(req);
            ex.add("second", &second);
            let second = second.value;
            let aspects = second
                .picked_aspects
                .unwrap_or_else(|| names(&plan.aspects.aspects));
            Ok(ex.finish(first, second.text, plan.label, aspects))
        }
    }
}
