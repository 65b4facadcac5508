//! West-of-N: N samples, scored one by one; the best is chosen and the worst rejected.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use rand::RngCore;
use serde_json::{json, Value};

use super::Method;
use crate::aspect::{Aspect, AspectSet};
use crate::backend::{CompletionRequest, LlmBackend, Message, SamplingParams};
use crate::engine::{
    accept_distinct, ask, common_setters, default_first_params, example_rng, stream_methods,
    Common, Meta,
};
use crate::error::{Error, UnusableReason};
use crate::example::{PreferenceExample, Prompt};
use crate::judge::{default_criteria, Judge, ScoreRequest, Scorer};
use crate::label::Label;

struct Inner {
    backend: Arc<dyn LlmBackend>,
    scorer: Arc<dyn Scorer>,
    criteria: Arc<dyn AspectSet>,
    params: SamplingParams,
    n: usize,
    allow_ties: bool,
    common: Common,
}

/// The West-of-N baseline: N samples of the policy with distinct seeds, each scored by a
/// [`Scorer`] (by default an LLM [`Judge`] on the same backend, 1–10); the best is chosen and
/// the worst rejected.
///
/// - Identical samples (after normalising white space and case) are scored once: only the first
///   of each is kept. Fewer than 2 distinct samples fail the example
///   ([`ErrorKind::Unusable`](crate::ErrorKind::Unusable), call `"samples"`); the same response is never both chosen and
///   rejected.
/// - Ties are broken deterministically: the best is the *earliest* sample with the top score,
///   the worst the *latest* with the bottom score. If all scores are equal the example fails
///   (call `"score"`) unless [`allow_ties`](WestOfNBuilder::allow_ties) is set.
/// - `label` is `"better"` when the chosen sample was generated after the rejected one.
/// - `metadata.scores` lists each sample's score in generation order (`null` for a dropped
///   duplicate), `metadata.chosen_index` and `metadata.rejected_index` name the two picked,
///   `metadata.scorer` the scorer. Usage and models are grouped as `samples` and `score`.
/// - Calls: N generations plus one scoring per distinct sample (as the scorer reports them).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rmboost::Error> {
/// use futures::StreamExt;
/// use rmboost::judge::{ScoreRequest, Scored, Scorer};
/// use rmboost::testing::FakeBackend;
/// use rmboost::{async_trait, Error, GeneratorExt, Prompt, WestOfN};
///
/// #[derive(Debug)]
/// struct Length;
/// #[async_trait]
/// impl Scorer for Length {
///     async fn score(&self, r: ScoreRequest<'_>) -> Result<Scored, Error> {
///         Ok(Scored::new(r.response.len() as f64 + r.index as f64))
///     }
/// }
///
/// let won = WestOfN::builder().backend(FakeBackend::new()).scorer(Length).n(3).build()?;
/// let ex = won.generate_iter(vec![Prompt::new("Say hi.")]).next().await.unwrap()?;
/// assert_eq!(ex.metadata.method, "west-of-n");
/// assert_eq!(ex.metadata.calls, 3); // the scorer called no model
/// assert_eq!(ex.metadata.extra["chosen_index"], 2);
/// assert_eq!(ex.metadata.extra["rejected_index"], 0);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct WestOfN {
    inner: Arc<Inner>,
}

impl fmt::Debug for WestOfN {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &*self.inner;
        f.debug_struct("WestOfN")
            .field("backend", &i.backend.name())
            .field("scorer", &i.scorer)
            .field("criteria", &i.criteria)
            .field("params", &i.params)
            .field("n", &i.n)
            .field("allow_ties", &i.allow_ties)
            .field("common", &i.common)
            .finish()
    }
}

/// Builds a [`WestOfN`]; from [`WestOfN::builder`].
#[must_use = "a builder does nothing until build() is called"]
pub struct WestOfNBuilder {
    backend: Option<Arc<dyn LlmBackend>>,
    scorer: Option<Arc<dyn Scorer>>,
    criteria: Arc<dyn AspectSet>,
    params: SamplingParams,
    n: usize,
    allow_ties: bool,
    common: Common,
}

impl fmt::Debug for WestOfNBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WestOfNBuilder")
            .field("has_backend", &self.backend.is_some())
            .field("scorer", &self.scorer)
            .field("n", &self.n)
            .field("common", &self.common)
            .finish_non_exhaustive()
    }
}

impl WestOfNBuilder {
    common_setters!();

    /// The policy backend that writes the N samples. Required.
    pub fn backend(mut self, backend: impl LlmBackend + 'static) -> Self {
        let backend = crate::backend::shared(backend);
        self.backend = Some(backend);
        self
    }

    /// The scorer. Default: a [`Judge`] on the policy backend (re-asking up to
    /// [`max_reasks`](Self::max_reasks) times).
    pub fn scorer(mut self, scorer: impl Scorer + 'static) -> Self {
        self.scorer = Some(Arc::new(scorer));
        self
    }

    /// Scores with an LLM [`Judge`] on this backend (a shorthand for
    /// `scorer(Judge::new(backend))`).
    pub fn judge_backend(self, backend: impl LlmBackend + 'static) -> Self {
        self.scorer(Judge::new(backend))
    }

    /// The criteria shown to the scorer, drawn per example. Default: all of
    /// [`Aspects::general`](crate::Aspects::general).
    pub fn criteria(mut self, criteria: impl AspectSet + 'static) -> Self {
        self.criteria = Arc::new(criteria);
        self
    }

    /// Sampling of the N samples. Default: [`default_first_params`]. Use a temperature above 0
    /// so that the samples differ.
    pub fn params(mut self, params: SamplingParams) -> Self {
        self.params = params;
        self
    }

    /// How many samples per prompt; at least 2. Default: 4.
    pub fn n(mut self, n: usize) -> Self {
        self.n = n;
        self
    }

    /// Whether an example whose samples all scored the same is kept (chosen = the earliest,
    /// rejected = the latest). Default: `false`, it fails: such a pair carries no preference.
    pub fn allow_ties(mut self, allow: bool) -> Self {
        self.allow_ties = allow;
        self
    }

    /// Validates the settings and builds the generator.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if no backend was given, `n < 2`, or a sampling value is out of range.
    pub fn build(self) -> Result<WestOfN, Error> {
        let backend = self
            .backend
            .ok_or_else(|| Error::config("west-of-n: no backend: call backend()"))?;
        if self.n < 2 {
            return Err(Error::config(format!(
                "west-of-n: n must be at least 2, got {}",
                self.n
            )));
        }
        self.params
            .validate("west-of-n params")
            .map_err(Error::config)?;
        let scorer = match self.scorer {
            Some(s) => s,
            None => Arc::new(Judge::new(backend.clone()).max_reasks(self.common.max_reasks)),
        };
        Ok(WestOfN {
            inner: Arc::new(Inner {
                backend,
                scorer,
                criteria: self.criteria,
                params: self.params,
                n: self.n,
                allow_ties: self.allow_ties,
                common: self.common,
            }),
        })
    }
}

struct Plan {
    id: String,
    prompt: Vec<Message>,
    extra: serde_json::Map<String, Value>,
    criteria: Vec<Aspect>,
    sample_seeds: Vec<u64>,
    score_seeds: Vec<u64>,
}

impl WestOfN {
    /// A builder with the defaults: no backend yet, the judge scorer, n = 4, the general
    /// criteria, concurrency 8, completion order, seed 0, up to 3 re-asks, ties rejected.
    pub fn builder() -> WestOfNBuilder {
        WestOfNBuilder {
            backend: None,
            scorer: None,
            criteria: Arc::new(default_criteria()),
            params: default_first_params(),
            n: 4,
            allow_ties: false,
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

    /// Samples per prompt.
    #[must_use]
    pub fn n(&self) -> usize {
        self.inner.n
    }

    fn plan(&self, prompt: Prompt) -> Plan {
        let inner = &*self.inner;
        let mut rng = example_rng(inner.common.seed, &prompt.id);
        let criteria = inner.criteria.sample(&mut rng).aspects;
        let sample_seeds = (0..inner.n).map(|_| rng.next_u64()).collect();
        let score_seeds = (0..inner.n).map(|_| rng.next_u64()).collect();
        let Prompt { id, input, extra } = prompt;
        let prompt = input.into_messages();
        Plan {
            id,
            prompt,
            extra,
            criteria,
            sample_seeds,
            score_seeds,
        }
    }

    /// Generates the example of one prompt.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Backend`](crate::ErrorKind::Backend) if a call failed; [`ErrorKind::Unusable`](crate::ErrorKind::Unusable) if a sample stayed empty, fewer
    /// than 2 distinct samples remain, or all scores tie (unless allowed); all carry the id.
    pub async fn generate_one(&self, prompt: Prompt) -> Result<PreferenceExample, Error> {
        let plan = self.plan(prompt);
        run(self.inner.clone(), plan).await
    }

    stream_methods!(run);
}

/// Best = earliest with the top score; worst = latest with the bottom score.
fn extremes(scores: &[(usize, f64)]) -> (usize, usize) {
    let mut best = 0;
    let mut worst = 0;
    for (k, &(_, s)) in scores.iter().enumerate() {
        if s > scores[best].1 {
            best = k;
        }
        if s <= scores[worst].1 {
            worst = k;
        }
    }
    (best, worst)
}

async fn run(inner: Arc<Inner>, plan: Plan) -> Result<PreferenceExample, Error> {
    let span = tracing::debug_span!("rmboost.west_of_n", id = %plan.id);
    tracing::Instrument::instrument(run_inner(inner, plan), span).await
}

async fn run_inner(inner: Arc<Inner>, plan: Plan) -> Result<PreferenceExample, Error> {
    let c = &inner.common;
    let mut meta = Meta::new(Method::WestOfN.as_str(), c.seed, plan.extra);
    let req = CompletionRequest::new(plan.prompt.clone()).with_params(&inner.params);
    // Distinct samples as (generation index, text).
    let mut samples: Vec<(usize, String)> = Vec::with_capacity(inner.n);
    for (i, &seed) in plan.sample_seeds.iter().enumerate() {
        let a = ask(
            &*inner.backend,
            &plan.id,
            "sample",
            &req,
            seed,
            c.max_reasks,
            |raw| accept_distinct(raw, &[]),
        )
        .await?;
        meta.add("samples", &a);
        if !samples
            .iter()
            .any(|(_, t)| crate::checks::same_text(t, &a.value))
        {
            samples.push((i, a.value));
        }
    }
    if samples.len() < 2 {
        return Err(Error::unusable(
            plan.id,
            "samples",
            inner.n as u32,
            UnusableReason::Other(format!(
                "only {} distinct response among {} samples",
                samples.len(),
                inner.n
            )),
        ));
    }
    let mut scores: Vec<(usize, f64)> = Vec::with_capacity(samples.len());
    for (i, text) in &samples {
        let s = inner
            .scorer
            .score(ScoreRequest {
                id: &plan.id,
                prompt: &plan.prompt,
                response: text,
                index: *i,
                criteria: &plan.criteria,
                seed: plan.score_seeds[*i],
            })
            .await?;
        if !s.score.is_finite() {
            return Err(Error::unusable(
                plan.id,
                "score",
                1,
                UnusableReason::Other(format!("the scorer returned {} for sample {i}", s.score)),
            ));
        }
        meta.add_raw("score", s.calls, s.reasks, s.usage, &s.model);
        scores.push((*i, s.score));
    }
    let (best, worst) = extremes(&scores);
    if scores[best].1 == scores[worst].1 && !inner.allow_ties {
        return Err(Error::unusable(
            plan.id,
            "score",
            scores.len() as u32,
            UnusableReason::Other(format!(
                "all {} distinct samples scored {}",
                scores.len(),
                scores[best].1
            )),
        ));
    }
    let (chosen_idx, rejected_idx) = (scores[best].0, scores[worst].0);
    let mut all: Vec<Value> = vec![Value::Null; inner.n];
    for &(i, s) in &scores {
        all[i] = json!(s);
    }
    meta.extra("scores", Value::Array(all));
    meta.extra("chosen_index", json!(chosen_idx));
    meta.extra("rejected_index", json!(rejected_idx));
    meta.extra("scorer", json!(inner.scorer.name()));
    let label = if chosen_idx > rejected_idx {
        Label::Better
    } else {
        Label::Worse
    };
    let mut texts: Vec<Option<String>> = samples.into_iter().map(|(_, t)| Some(t)).collect();
    let chosen = texts[best].take().expect("best is a distinct sample");
    let rejected = texts[worst].take().expect("worst differs from best");
    Ok(PreferenceExample {
        id: plan.id,
        prompt: plan.prompt,
        chosen,
        rejected,
        label,
        grade: None,
        aspects: plan.criteria.into_iter().map(|a| a.name).collect(),
        margin: None,
        metadata: meta.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _object_safe(_: &dyn Scorer) {}

    #[test]
    fn tie_breaking() {
        assert_eq!(extremes(&[(0, 5.0), (1, 5.0), (2, 5.0)]), (0, 2));
        assert_eq!(extremes(&[(0, 1.0), (1, 9.0), (2, 9.0), (3, 1.0)]), (1, 3));
        assert_eq!(extremes(&[(0, 9.0), (2, 1.0)]), (0, 1));
    }
}
