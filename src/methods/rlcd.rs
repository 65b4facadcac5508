//! RLCD: contrasting system prompts built from the drawn aspects.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use rand::RngCore;
use serde_json::Value;

use super::Method;
use crate::aspect::{Aspect, AspectSet, Aspects};
use crate::backend::{CompletionRequest, LlmBackend, Message, SamplingParams};
use crate::checks::check_response;
use crate::engine::{
    accept_distinct, ask, common_setters, default_first_params, example_rng, render_aspects,
    stream_methods, with_system, Common, Meta,
};
use crate::error::Error;
use crate::example::{PreferenceExample, Prompt};
use crate::label::Label;

struct Inner {
    backend: Arc<dyn LlmBackend>,
    aspects: Arc<dyn AspectSet>,
    params: SamplingParams,
    common: Common,
}

/// The RLCD baseline (contrastive distillation): for each prompt, one response under a system
/// prompt that pushes towards good behaviour on the drawn aspects (chosen) and one under a
/// system prompt that pushes away from it (rejected). Two calls, no judge.
///
/// - The negative response is generated first (call `"negative"`), then the positive one
///   (call `"positive"`); both are off the model's natural distribution, which is what RMBoost
///   improves on.
/// - `label` is always `"better"`: the chosen (positive) response is the later one (see the
///   [module docs](crate::methods)). `aspects` lists the drawn aspects.
/// - A negative answer that talks about its instructions ("here is a worse answer") is re-asked,
///   as is an empty one or a positive answer identical to the negative one.
/// - Usage and models are grouped as `negative` and `positive`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rmboost::Error> {
/// use futures::StreamExt;
/// use rmboost::testing::FakeBackend;
/// use rmboost::{Aspects, GeneratorExt, Label, Prompt, Rlcd};
///
/// let rlcd = Rlcd::builder()
///     .backend(FakeBackend::new())
///     .aspects(Aspects::long_form_qa())
///     .seed(3)
///     .build()?;
/// let ex = rlcd.generate_iter(vec![Prompt::new("Why do cats purr?")]).next().await.unwrap()?;
/// assert_eq!(ex.label, Label::Better);
/// assert_eq!(ex.metadata.calls, 2);
/// assert!(!ex.aspects.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Rlcd {
    inner: Arc<Inner>,
}

impl fmt::Debug for Rlcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &*self.inner;
        f.debug_struct("Rlcd")
            .field("backend", &i.backend.name())
            .field("aspects", &i.aspects)
            .field("params", &i.params)
            .field("common", &i.common)
            .finish()
    }
}

/// Builds an [`Rlcd`]; from [`Rlcd::builder`].
#[must_use = "a builder does nothing until build() is called"]
pub struct RlcdBuilder {
    backend: Option<Arc<dyn LlmBackend>>,
    aspects: Arc<dyn AspectSet>,
    params: SamplingParams,
    common: Common,
}

impl fmt::Debug for RlcdBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RlcdBuilder")
            .field("has_backend", &self.backend.is_some())
            .field("common", &self.common)
            .finish_non_exhaustive()
    }
}

impl RlcdBuilder {
    common_setters!();

    /// The backend for both calls. Required.
    pub fn backend(mut self, backend: impl LlmBackend + 'static) -> Self {
        let backend = crate::backend::shared(backend);
        self.backend = Some(backend);
        self
    }

    /// The aspect set the system prompts are built from. Default: [`Aspects::general`].
    /// In "model picks" mode all listed aspects are used.
    pub fn aspects(mut self, aspects: impl AspectSet + 'static) -> Self {
        self.aspects = Arc::new(aspects);
        self
    }

    /// Sampling of both responses. Default: [`default_first_params`].
    pub fn params(mut self, params: SamplingParams) -> Self {
        self.params = params;
        self
    }

    /// Validates the settings and builds the generator.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if no backend was given or a sampling value is out of range.
    pub fn build(self) -> Result<Rlcd, Error> {
        let backend = self
            .backend
            .ok_or_else(|| Error::config("rlcd: no backend: call backend()"))?;
        self.params.validate("rlcd params").map_err(Error::config)?;
        Ok(Rlcd {
            inner: Arc::new(Inner {
                backend,
                aspects: self.aspects,
                params: self.params,
                common: self.common,
            }),
        })
    }
}

/// The system prompt pushing towards good behaviour on `aspects`.
fn positive_system(aspects: &[Aspect]) -> String {
    let mut s = String::from(
        "You are a careful, expert assistant. Give the best answer you can, one that excels in \
         these qualities:\n",
    );
    render_aspects(aspects, &mut s);
    s.push_str("Answer the user directly.");
    s
}

/// The system prompt pushing away from good behaviour on `aspects`, still asking for a fluent,
/// on-topic answer.
fn negative_system(aspects: &[Aspect]) -> String {
    let mut s = String::from(
        "You are a hasty, careless assistant. Your answers are weak in these qualities:\n",
    );
    render_aspects(aspects, &mut s);
    s.push_str(
        "Answer the user's request in that weak way, but still as a sincere, fluent answer on \
         the topic that was asked: no gibberish, no jokes about being careless, and never \
         mention these instructions.",
    );
    s
}

struct Plan {
    id: String,
    prompt: Vec<Message>,
    extra: serde_json::Map<String, Value>,
    aspects: Vec<Aspect>,
    negative_seed: u64,
    positive_seed: u64,
}

impl Rlcd {
    /// A builder with the defaults: no backend yet, the general aspects, concurrency 8,
    /// completion order, seed 0, up to 3 re-asks.
    pub fn builder() -> RlcdBuilder {
        RlcdBuilder {
            backend: None,
            aspects: Arc::new(Aspects::general()),
            params: default_first_params(),
            common: Common::default(),
        }
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

    fn plan(&self, prompt: Prompt) -> Plan {
        let inner = &*self.inner;
        let mut rng = example_rng(inner.common.seed, &prompt.id);
        let negative_seed = rng.next_u64();
        let positive_seed = rng.next_u64();
        let aspects = inner.aspects.sample(&mut rng).aspects;
        let Prompt { id, input, extra } = prompt;
        let prompt = input.into_messages();
        Plan {
            id,
            prompt,
            extra,
            aspects,
            negative_seed,
            positive_seed,
        }
    }

    /// The two requests of a prompt, negative then positive, as they would be sent (with their
    /// seeds): what a dry run shows.
    #[must_use]
    pub fn requests(&self, prompt: Prompt) -> [CompletionRequest; 2] {
        let plan = self.plan(prompt);
        let p = &self.inner.params;
        [
            CompletionRequest::new(with_system(&negative_system(&plan.aspects), &plan.prompt))
                .with_params(p)
                .with_seed(plan.negative_seed),
            CompletionRequest::new(with_system(&positive_system(&plan.aspects), &plan.prompt))
                .with_params(p)
                .with_seed(plan.positive_seed),
        ]
    }

    /// Generates the example of one prompt.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Backend`](crate::ErrorKind::Backend) if a call failed, [`ErrorKind::Unusable`](crate::ErrorKind::Unusable) if a response stayed unusable
    /// after every re-ask; both carry the prompt's id.
    pub async fn generate_one(&self, prompt: Prompt) -> Result<PreferenceExample, Error> {
        let plan = self.plan(prompt);
        run(self.inner.clone(), plan).await
    }

    stream_methods!(run);
}

async fn run(inner: Arc<Inner>, plan: Plan) -> Result<PreferenceExample, Error> {
    let span = tracing::debug_span!("rmboost.rlcd", id = %plan.id);
    tracing::Instrument::instrument(run_inner(inner, plan), span).await
}

async fn run_inner(inner: Arc<Inner>, plan: Plan) -> Result<PreferenceExample, Error> {
    let c = &inner.common;
    let neg_req =
        CompletionRequest::new(with_system(&negative_system(&plan.aspects), &plan.prompt))
            .with_params(&inner.params);
    let negative = ask(
        &*inner.backend,
        &plan.id,
        "negative",
        &neg_req,
        plan.negative_seed,
        c.max_reasks,
        |raw| {
            let text = raw.trim();
            check_response(text, "")?;
            Ok(text.to_string())
        },
    )
    .await?;
    drop(neg_req);
    let pos_req =
        CompletionRequest::new(with_system(&positive_system(&plan.aspects), &plan.prompt))
            .with_params(&inner.params);
    let positive = ask(
        &*inner.backend,
        &plan.id,
        "positive",
        &pos_req,
        plan.positive_seed,
        c.max_reasks,
        |raw| accept_distinct(raw, &[&negative.value]),
    )
    .await?;
    let mut meta = Meta::new(Method::Rlcd.as_str(), c.seed, plan.extra);
    meta.add("negative", &negative);
    meta.add("positive", &positive);
    Ok(PreferenceExample {
        id: plan.id,
        prompt: plan.prompt,
        chosen: positive.value,
        rejected: negative.value,
        label: Label::Better,
        grade: None,
        aspects: plan.aspects.into_iter().map(|a| a.name).collect(),
        margin: None,
        metadata: meta.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_prompts_name_the_aspects() {
        let a = [Aspect::new("clarity", "easy to follow")];
        let pos = positive_system(&a);
        let neg = negative_system(&a);
        assert!(pos.contains("- clarity: easy to follow"));
        assert!(neg.contains("- clarity: easy to follow"));
        assert!(neg.contains("fluent"));
        assert_ne!(pos, neg);
    }
}
