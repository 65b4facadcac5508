//! [`RmBoost`]: the builder, the per-example pipeline and the stream of examples.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use rand::{Rng, RngCore};
use tracing::Instrument;

use crate::aspect::{AspectDraw, AspectSet, Aspects};
use crate::backend::{CompletionRequest, LlmBackend, Message, SamplingParams};
use crate::engine::{
    ask, common_setters, default_first_params, default_second_params, example_rng, stream_methods,
    Common, Meta,
};
use crate::error::Error;
use crate::example::{PreferenceExample, Prompt};
use crate::label::{Bernoulli, Label, LabelDraw, LabelSampler};
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

struct Inner {
    first_backend: Arc<dyn LlmBackend>,
    second_backend: Arc<dyn LlmBackend>,
    labels: Arc<dyn LabelSampler>,
    aspects: Arc<dyn AspectSet>,
    template: Arc<dyn PromptTemplate>,
    first_params: SamplingParams,
    second_params: SamplingParams,
    common: Common,
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
            .field("first_params", &i.first_params)
            .field("second_params", &i.second_params)
            .field("common", &i.common)
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
    first_params: SamplingParams,
    second_params: SamplingParams,
    common: Common,
}

impl fmt::Debug for RmBoostBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RmBoostBuilder")
            .field("has_first_backend", &self.first_backend.is_some())
            .field("has_second_backend", &self.second_backend.is_some())
            .field("common", &self.common)
            .finish_non_exhaustive()
    }
}

impl RmBoostBuilder {
    fn new() -> Self {
        RmBoostBuilder {
            first_backend: None,
            second_backend: None,
            labels: Arc::new(Bernoulli::default()),
            aspects: Arc::new(Aspects::general()),
            template: Arc::new(DefaultTemplate::new()),
            first_params: default_first_params(),
            second_params: default_second_params(),
            common: Common::default(),
        }
    }

    /// The backend for both calls. Required unless both [`first_backend`](Self::first_backend)
    /// and [`second_backend`](Self::second_backend) are set. Any backend: one already shared
    /// as an `Arc<dyn LlmBackend>` is used as it is.
    pub fn backend(mut self, backend: impl LlmBackend + 'static) -> Self {
        let backend = crate::backend::shared(backend);
        self.first_backend = Some(Arc::clone(&backend));
        self.second_backend = Some(backend);
        self
    }

    /// The backend of the first (natural) response only.
    pub fn first_backend(mut self, backend: impl LlmBackend + 'static) -> Self {
        self.first_backend = Some(crate::backend::shared(backend));
        self
    }

    /// The backend of the second (conditioned) response only.
    pub fn second_backend(mut self, backend: impl LlmBackend + 'static) -> Self {
        self.second_backend = Some(crate::backend::shared(backend));
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

    common_setters!();

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

    /// Validates the settings and builds the generator.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if no backend was given for a call or a sampling value is out of
    /// range (the message names the setting).
    pub fn build(self) -> Result<RmBoost, Error> {
        let first_backend = self
            .first_backend
            .ok_or_else(|| Error::config("no backend: call backend() (or first_backend())"))?;
        let second_backend = self.second_backend.ok_or_else(|| {
            Error::config("no backend for the second response: call second_backend()")
        })?;
        self.first_params
            .validate("first_params")
            .map_err(Error::config)?;
        self.second_params
            .validate("second_params")
            .map_err(Error::config)?;
        if self.template.variants() == 0 {
            return Err(Error::config("template has zero variants"));
        }
        Ok(RmBoost {
            inner: Arc::new(Inner {
                first_backend,
                second_backend,
                labels: self.labels,
                aspects: self.aspects,
                template: self.template,
                first_params: self.first_params,
                second_params: self.second_params,
                common: self.common,
            }),
        })
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
        self.inner.common.seed
    }

    /// The concurrency.
    #[must_use]
    pub fn concurrency(&self) -> NonZeroUsize {
        self.inner.common.concurrency
    }

    /// Draws everything for one example without calling any model: the label, aspects, template
    /// variant and backend seeds. The same seed and id always give the same plan.
    #[must_use]
    pub fn plan(&self, prompt: Prompt) -> ExamplePlan {
        let inner = &*self.inner;
        let mut rng = example_rng(inner.common.seed, &prompt.id);
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
    /// [`ErrorKind::Backend`](crate::ErrorKind::Backend) if a call failed, [`ErrorKind::Unusable`](crate::ErrorKind::Unusable) if an answer stayed unusable
    /// after every re-ask; both carry the prompt's id.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the example; nothing is written anywhere.
    pub async fn generate_one(&self, prompt: Prompt) -> Result<PreferenceExample, Error> {
        let plan = self.plan(prompt);
        run_plan(self.inner.clone(), plan).await
    }

    stream_methods!(run_plan);
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
            inner.common.max_reasks,
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
            inner.common.max_reasks,
            |raw| template.parse_second(raw, &ctx),
        )
        .await?;
        drop(second_req);

        let mut meta = Meta::new("rmboost", inner.common.seed, plan.extra);
        meta.add("first", &first);
        meta.add("second", &second);
        let metadata = meta.finish();
        let aspects = match second.value.picked_aspects {
            Some(picked) => picked,
            None => plan
                .aspects
                .aspects
                .iter()
                .map(|a| a.name.clone())
                .collect(),
        };
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
