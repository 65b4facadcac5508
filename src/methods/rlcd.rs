//! RLCD: contrasting system prompts built from the drawn aspects.

use std::future::Future;
use std::sync::Arc;

use rand::RngCore;

use super::{Draw, Method};
use crate::aspect::{Aspect, AspectSet, Aspects};
use crate::backend::CompletionRequest;
use crate::checks::{accept_distinct, check_response};
use crate::engine::{
    common_setters, example_rng, names, render_aspects, with_system, Common, Example,
};
use crate::error::Error;
use crate::example::{PreferenceExample, Prompt};
use crate::label::{Label, LabelDraw};

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
#[derive(Clone, Debug)]
pub struct Rlcd(pub(super) Arc<RlcdBuilder>);

/// Builds an [`Rlcd`]; from [`Rlcd::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct RlcdBuilder {
    aspects: Arc<dyn AspectSet>,
    pub(super) common: Common,
}

impl RlcdBuilder {
    common_setters!(policy);

    setters! {
        /// The aspect set the system prompts are built from. Default: [`Aspects::general`].
        /// In "model picks" mode all listed aspects are used.
        aspects(aspects: impl AspectSet + 'static) => aspects = Arc::new(aspects);
    }

    /// Validates the settings and builds the generator.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if no backend was given or a sampling value is out of range.
    pub fn build(self) -> Result<Rlcd, Error> {
        self.common.check("rlcd")?;
        Ok(Rlcd(Arc::new(self)))
    }

    /// The example of `prompt` with its two requests, negative then positive, and the drawn
    /// aspects' names.
    fn requests(&self, prompt: Prompt) -> (Example, [CompletionRequest; 2], Vec<String>) {
        let mut rng = example_rng(self.common.seed, &prompt.id);
        let seeds = [rng.next_u64(), rng.next_u64()];
        let aspects = self.aspects.sample(&mut rng).aspects;
        let ex = Example::new(Self::METHOD.as_str(), &self.common, prompt);
        let systems = [NEGATIVE, POSITIVE];
        let requests = std::array::from_fn(|k| {
            CompletionRequest::new(with_system(&system(systems[k], &aspects), &ex.prompt))
                .with_params(&self.common.params)
                .with_seed(seeds[k])
        });
        (ex, requests, names(&aspects))
    }
}

/// The system prompt pushing towards good behaviour on the drawn aspects: its text before and
/// after them.
const POSITIVE: [&str; 2] = [
    "You are a careful, expert assistant. Give the best answer you can, one that excels in these \
     qualities:\n",
    "Answer the user directly.",
];

/// The system prompt pushing away from good behaviour on the drawn aspects, still asking for a
/// fluent, on-topic answer.
const NEGATIVE: [&str; 2] = [
    "You are a hasty, careless assistant. Your answers are weak in these qualities:\n",
    "Answer the user's request in that weak way, but still as a sincere, fluent answer on the \
     topic that was asked: no gibberish, no jokes about being careless, and never mention these \
     instructions.",
];

/// The system prompt of `[head, tail]` around the `aspects`.
fn system([head, tail]: [&str; 2], aspects: &[Aspect]) -> String {
    let mut s = String::from(head);
    render_aspects(aspects, &mut s);
    s.push_str(tail);
    s
}

impl Rlcd {
    /// A builder with the defaults: no backend yet, the general aspects, concurrency 8,
    /// completion order, seed 0, up to 3 re-asks.
    pub fn builder() -> RlcdBuilder {
        RlcdBuilder {
            aspects: Arc::new(Aspects::general()),
            common: Common::default(),
        }
    }

    /// The two requests of a prompt, negative then positive, as they would be sent (with their
    /// seeds): what a dry run shows.
    #[must_use]
    pub fn requests(&self, prompt: Prompt) -> [CompletionRequest; 2] {
        self.0.requests(prompt).1
    }
}

impl Draw for RlcdBuilder {
    const METHOD: Method = Method::Rlcd;

    fn example(
        self: Arc<Self>,
        prompt: Prompt,
    ) -> impl Future<Output = Result<PreferenceExample, Error>> + Send + 'static {
        let (mut ex, [neg_req, pos_req], aspects) = self.requests(prompt);
        async move {
            let backend = &**self.common.backend();
            let negative = ex
                .ask(backend, "negative", &neg_req, |raw| {
                    let text = raw.trim();
                    check_response(text, "")?;
                    Ok(text.to_string())
                })
                .await?;
            let positive = ex
                .ask(backend, "positive", &pos_req, |raw| {
                    accept_distinct(raw, &[&negative])
                })
                .await?;
            let label = LabelDraw::plain(Label::Better);
            Ok(ex.finish(negative, positive, label, aspects))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_prompts_name_the_aspects() {
        let a = [Aspect::new("clarity", "easy to follow")];
        let pos = system(POSITIVE, &a);
        let neg = system(NEGATIVE, &a);
        assert!(pos.contains("- clarity: easy to follow"));
        assert!(neg.contains("- clarity: easy to follow"));
        assert!(neg.contains("fluent"));
        assert_ne!(pos, neg);
    }
}
