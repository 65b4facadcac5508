//! West-of-N: N samples, scored one by one; the best is chosen and the worst rejected.

use std::future::Future;
use std::sync::Arc;

use rand::RngCore;
use serde_json::{json, Value};

use super::{Draw, Method};
use crate::aspect::AspectSet;
use crate::backend::{CompletionRequest, LlmBackend};
use crate::checks::{accept_distinct, same_text};
use crate::engine::{common_setters, example_rng, names, Common, Example};
use crate::error::Error;
use crate::example::{PreferenceExample, Prompt};
use crate::judge::{default_criteria, Judge, ScoreRequest, Scorer};
use crate::label::{Label, LabelDraw};

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
#[derive(Clone, Debug)]
pub struct WestOfN(pub(super) Arc<WestOfNBuilder>);

/// Builds a [`WestOfN`]; from [`WestOfN::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct WestOfNBuilder {
    /// Set by `build()` when not given.
    scorer: Option<Arc<dyn Scorer>>,
    criteria: Arc<dyn AspectSet>,
    n: usize,
    allow_ties: bool,
    pub(super) common: Common,
}

impl WestOfNBuilder {
    common_setters!(policy);

    setters! {
        /// The scorer. Default: a [`Judge`] on the policy backend (re-asking up to
        /// [`max_reasks`](Self::max_reasks) times).
        scorer(scorer: impl Scorer + 'static) => scorer = Some(Arc::new(scorer));
        /// The criteria shown to the scorer, drawn per example. Default: all of
        /// [`Aspects::general`](crate::Aspects::general).
        criteria(criteria: impl AspectSet + 'static) => criteria = Arc::new(criteria);
        /// How many samples per prompt; at least 2. Default: 4.
        n(n: usize) => n = n;
        /// Whether an example whose samples all scored the same is kept (chosen = the earliest,
        /// rejected = the latest). Default: `false`, it fails: such a pair carries no preference.
        allow_ties(allow: bool) => allow_ties = allow;
    }

    /// Scores with an LLM [`Judge`] on this backend (a shorthand for
    /// `scorer(Judge::new(backend))`).
    pub fn judge_backend(self, backend: impl LlmBackend + 'static) -> Self {
        self.scorer(Judge::new(backend))
    }

    /// Validates the settings and builds the generator.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if no backend was given, `n < 2`, or a sampling value is out of range.
    pub fn build(mut self) -> Result<WestOfN, Error> {
        self.common.check("west-of-n")?;
        if self.n < 2 {
            return Err(Error::config(format!(
                "west-of-n: n must be at least 2, got {}",
                self.n
            )));
        }
        let c = &self.common;
        let judge = || Arc::new(Judge::new(c.backend().clone()).max_reasks(c.max_reasks)) as _;
        self.scorer = Some(self.scorer.take().unwrap_or_else(judge));
        Ok(WestOfN(Arc::new(self)))
    }
}

impl WestOfN {
    /// A builder with the defaults: no backend yet, the judge scorer, n = 4, the general
    /// criteria, concurrency 8, completion order, seed 0, up to 3 re-asks, ties rejected.
    pub fn builder() -> WestOfNBuilder {
        WestOfNBuilder {
            scorer: None,
            criteria: Arc::new(default_criteria()),
            n: 4,
            allow_ties: false,
            common: Common::default(),
        }
    }

    /// Samples per prompt.
    #[must_use]
    pub fn n(&self) -> usize {
        self.0.n
    }
}

/// Best = earliest with the top score; worst = latest with the bottom score.
fn extremes(scores: impl IntoIterator<Item = f64>) -> (usize, usize) {
    let (mut best, mut worst) = ((0, f64::NEG_INFINITY), (0, f64::INFINITY));
    for (k, s) in scores.into_iter().enumerate() {
        if s > best.1 {
            best = (k, s);
        }
        if s <= worst.1 {
            worst = (k, s);
        }
    }
    (best.0, worst.0)
}

impl Draw for WestOfNBuilder {
    const METHOD: Method = Method::WestOfN;

    fn example(
        self: Arc<Self>,
        prompt: Prompt,
    ) -> impl Future<Output = Result<PreferenceExample, Error>> + Send + 'static {
        let mut rng = example_rng(self.common.seed, &prompt.id);
        let criteria = self.criteria.sample(&mut rng).aspects;
        let sample_seeds: Vec<u64> = (0..self.n).map(|_| rng.next_u64()).collect();
        let score_seeds: Vec<u64> = (0..self.n).map(|_| rng.next_u64()).collect();
        let mut ex = Example::new(Self::METHOD.as_str(), &self.common, prompt);
        async move {
            let (n, c) = (self.n, &self.common);
            let req = CompletionRequest::new(ex.prompt.clone()).with_params(&c.params);
            // Distinct samples as (generation index, text, score).
            let mut samples: Vec<(usize, String, f64)> = Vec::with_capacity(n);
            for (i, seed) in sample_seeds.into_iter().enumerate() {
                let req = req.clone().with_seed(seed);
                let accept = |raw: &str| accept_distinct(raw, &[]);
                let a = ex.call(&**c.backend(), "sample", &req, accept).await?;
                ex.add("samples", &a);
                if !samples.iter().any(|(_, t, _)| same_text(t, &a.value)) {
                    samples.push((i, a.value, 0.0));
                }
            }
            drop(req);
            if samples.len() < 2 {
                let why = format!("only {} distinct response among {n} samples", samples.len());
                return Err(ex.fail("samples", n as u32, why));
            }
            let scorer = self.scorer.as_ref().expect("build() set the scorer");
            for (i, text, score) in &mut samples {
                let request = ScoreRequest {
                    id: &ex.id,
                    prompt: &ex.prompt,
                    response: text,
                    index: *i,
                    criteria: &criteria,
                    seed: score_seeds[*i],
                };
                let s = scorer.score(request).await?;
                if !s.score.is_finite() {
                    let why = format!("the scorer returned {} for sample {i}", s.score);
                    return Err(ex.fail("score", 1, why));
                }
                ex.record("score", s.calls, s.reasks, s.usage, &s.model);
                *score = s.score;
            }
            let (best, worst) = extremes(samples.iter().map(|s| s.2));
            let top = samples[best].2;
            if top == samples[worst].2 && !self.allow_ties {
                let why = format!("all {} distinct samples scored {top}", samples.len());
                return Err(ex.fail("score", samples.len() as u32, why));
            }
            let mut all = vec![Value::Null; n];
            for (i, _, s) in &samples {
                all[*i] = json!(s);
            }
            let extra = &mut ex.metadata.extra;
            extra.insert("scores".into(), Value::Array(all));
            extra.insert("chosen_index".into(), json!(samples[best].0));
            extra.insert("rejected_index".into(), json!(samples[worst].0));
            extra.insert("scorer".into(), json!(scorer.name()));
            // The two in generation order; the label says whether the later one was chosen.
            let (earlier, later) = (best.min(worst), best.max(worst));
            let label = if best == later {
                Label::Better
            } else {
                Label::Worse
            };
            // The later first, so that taking it out moves nothing before it.
            let later = samples.swap_remove(later).1;
            let earlier = samples.swap_remove(earlier).1;
            Ok(ex.finish(earlier, later, LabelDraw::plain(label), names(&criteria)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _object_safe(_: &dyn Scorer) {}

    #[test]
    fn tie_breaking() {
        assert_eq!(extremes([5.0, 5.0, 5.0]), (0, 2));
        assert_eq!(extremes([1.0, 9.0, 9.0, 1.0]), (1, 3));
        assert_eq!(extremes([9.0, 1.0]), (0, 1));
    }
}
