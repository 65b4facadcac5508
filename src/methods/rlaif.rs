//! RLAIF: two samples of the policy, an LLM judge asked in both orders.

use std::future::Future;
use std::sync::Arc;

use rand::RngCore;
use serde_json::json;

use super::{Draw, Method};
use crate::aspect::AspectSet;
use crate::backend::{CompletionRequest, LlmBackend};
use crate::checks::accept_distinct;
use crate::engine::{common_setters, example_rng, names, Common, Example};
use crate::error::Error;
use crate::example::{PreferenceExample, Prompt};
use crate::judge::{default_criteria, Judge, Verdict};
use crate::label::{Label, LabelDraw};

/// What [`Rlaif`] does when the two judgements disagree (position bias or ties).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnInconsistent {
    /// Fail the example with [`ErrorKind::Unusable`](crate::ErrorKind::Unusable) (call `"judge"`, reason "inconsistent judge
    /// verdicts ..."). The default: an inconsistent pair is label noise.
    #[default]
    Drop,
    /// Keep it, with the winner of the first decisive judgement (the (A, B) order first), and
    /// `metadata.judge.consistent = false`. Two ties still fail: there is no winner.
    Keep,
}

/// The RLAIF baseline: two samples of the policy with different seeds, and an LLM [`Judge`]
/// asked which is better twice, once in each order, to cancel position bias.
///
/// - Calls: sample 1 (`"first"`), sample 2 (`"second"`, re-asked with the next seed while it is
///   identical to sample 1, up to `max_reasks`), judgement (A = sample 1, B = sample 2) and
///   judgement (A = sample 2, B = sample 1), both grouped as `judge`: 4 calls without re-asks.
/// - Verdicts are read leniently (tagged or explained verdicts too); an answer without one is
///   re-asked. When both judgements prefer the same sample it wins. Otherwise (opposite
///   picks, or a tie in either order) the verdicts are inconsistent: see [`OnInconsistent`].
/// - `label` is `"better"` when sample 2 won (chosen = the later sample), `"worse"` when sample
///   1 won. `aspects` lists the criteria the judge was shown.
/// - `metadata.judge` is `{"verdicts": [v_ab, v_ba], "consistent": bool, "winner": 1 | 2}` with
///   each verdict as the judge gave it (`"A"`, `"B"` or `"tie"`) for its own order.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rmboost::Error> {
/// use futures::StreamExt;
/// use rmboost::testing::ScriptedBackend;
/// use rmboost::{Label, Prompt, Rlaif};
///
/// let policy = ScriptedBackend::new();
/// policy.push_text("Paris.");
/// policy.push_text("Paris is the capital of France.");
/// let judge = ScriptedBackend::new();
/// judge.push_text("<verdict>B</verdict>"); // (A = sample 1, B = sample 2): sample 2
/// judge.push_text("<verdict>A</verdict>"); // (A = sample 2, B = sample 1): sample 2 again
/// let rlaif = Rlaif::builder().backend(policy).judge_backend(judge.clone()).build()?;
/// let ex = rlaif.generate_one(Prompt::new("Capital of France?")).await?;
/// assert_eq!(ex.chosen, "Paris is the capital of France.");
/// assert_eq!(ex.label, Label::Better);
/// assert_eq!(ex.metadata.calls, 4);
/// assert_eq!(ex.metadata.extra["judge"]["consistent"], true);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Rlaif(pub(super) Arc<RlaifBuilder>);

/// Builds an [`Rlaif`]; from [`Rlaif::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct RlaifBuilder {
    /// Set by `build()` when not given.
    judge: Option<Judge>,
    judge_backend: Option<Arc<dyn LlmBackend>>,
    criteria: Arc<dyn AspectSet>,
    on_inconsistent: OnInconsistent,
    pub(super) common: Common,
}

impl RlaifBuilder {
    common_setters!(policy);

    setters! {
        /// The judge, as configured. Default: a [`Judge`] on the policy backend (or on
        /// [`judge_backend`](Self::judge_backend)) with [`max_reasks`](Self::max_reasks) re-asks.
        judge(judge: Judge) => judge = Some(judge);
        /// The backend of the default [`Judge`], when it is not the policy backend.
        judge_backend(backend: impl LlmBackend + 'static) =>
            judge_backend = Some(crate::backend::shared(backend));
        /// The criteria shown to the judge, drawn per example. Default: all of
        /// [`Aspects::general`](crate::Aspects::general).
        criteria(criteria: impl AspectSet + 'static) => criteria = Arc::new(criteria);
        /// What to do with inconsistent verdicts. Default: [`OnInconsistent::Drop`].
        on_inconsistent(policy: OnInconsistent) => on_inconsistent = policy;
    }

    /// Validates the settings and builds the generator.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if no backend was given or a sampling value (of the policy or the
    /// judge) is out of range.
    pub fn build(mut self) -> Result<Rlaif, Error> {
        self.common.check("rlaif")?;
        let judge = self.judge.take().unwrap_or_else(|| {
            let backend = self.judge_backend.take();
            Judge::new(backend.unwrap_or_else(|| self.common.backend().clone()))
                .max_reasks(self.common.max_reasks)
        });
        judge.validate("rlaif judge params")?;
        self.judge = Some(judge);
        Ok(Rlaif(Arc::new(self)))
    }
}

impl Rlaif {
    /// A builder with the defaults: no backend yet, the judge on the policy backend, the
    /// general criteria, inconsistent verdicts dropped, concurrency 8, completion order,
    /// seed 0, up to 3 re-asks.
    pub fn builder() -> RlaifBuilder {
        RlaifBuilder {
            judge: None,
            judge_backend: None,
            criteria: Arc::new(default_criteria()),
            on_inconsistent: OnInconsistent::default(),
            common: Common::default(),
        }
    }
}

/// Which sample (1 or 2) a verdict prefers, given which sample was shown as A.
fn preferred(verdict: Verdict, a_is: u8) -> Option<u8> {
    match verdict {
        Verdict::A => Some(a_is),
        Verdict::B => Some(3 - a_is),
        Verdict::Tie => None,
    }
}

impl Draw for RlaifBuilder {
    const METHOD: Method = Method::Rlaif;

    fn example(
        self: Arc<Self>,
        prompt: Prompt,
    ) -> impl Future<Output = Result<PreferenceExample, Error>> + Send + 'static {
        let mut rng = example_rng(self.common.seed, &prompt.id);
        let seeds = [rng.next_u64(), rng.next_u64()];
        let judge_seeds = [rng.next_u64(), rng.next_u64()];
        let criteria = self.criteria.sample(&mut rng).aspects;
        let mut ex = Example::new(Self::METHOD.as_str(), &self.common, prompt);
        async move {
            let policy = &**self.common.backend();
            let req = seeds.map(|seed| {
                CompletionRequest::new(ex.prompt.clone())
                    .with_params(&self.common.params)
                    .with_seed(seed)
            });
            let first = ex
                .ask(policy, "first", &req[0], |raw| accept_distinct(raw, &[]))
                .await?;
            let second = ex
                .ask(policy, "second", &req[1], |raw| {
                    accept_distinct(raw, &[&first])
                })
                .await?;
            drop(req);
            let judge = self.judge.as_ref().expect("build() set the judge");
            let judge_calls = ex.metadata.calls;
            let mut verdicts = [Verdict::Tie; 2];
            for (k, (a, b)) in [(&first, &second), (&second, &first)]
                .into_iter()
                .enumerate()
            {
                let v = judge
                    .compare(&ex.id, "judge", &ex.prompt, a, b, &criteria, judge_seeds[k])
                    .await?;
                ex.add("judge", &v);
                verdicts[k] = v.value;
            }
            let [ab, ba] = verdicts;
            let (p_ab, p_ba) = (preferred(ab, 1), preferred(ba, 2));
            let consistent = p_ab.is_some() && p_ab == p_ba;
            let keep = consistent || self.on_inconsistent == OnInconsistent::Keep;
            let Some(winner) = p_ab.or(p_ba).filter(|_| keep) else {
                let why = if p_ab.is_none() && p_ba.is_none() {
                    "judge verdicts tie in both orders".to_string()
                } else {
                    format!(
                        "inconsistent judge verdicts: {ab} with sample 1 as A, {ba} with sample 2 as A"
                    )
                };
                let calls = ex.metadata.calls - judge_calls;
                return Err(ex.fail("judge", calls, why));
            };
            ex.metadata.extra.insert(
                "judge".into(),
                json!({
                    "verdicts": [ab.as_str(), ba.as_str()],
                    "consistent": consistent,
                    "winner": winner,
                }),
            );
            let label = if winner == 2 {
                Label::Better
            } else {
                Label::Worse
            };
            Ok(ex.finish(first, second, LabelDraw::plain(label), names(&criteria)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_mapping() {
        assert_eq!(preferred(Verdict::A, 1), Some(1));
        assert_eq!(preferred(Verdict::B, 1), Some(2));
        assert_eq!(preferred(Verdict::A, 2), Some(2));
        assert_eq!(preferred(Verdict::B, 2), Some(1));
        assert_eq!(preferred(Verdict::Tie, 2), None);
    }
}
