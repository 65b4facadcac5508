//! RLAIF: two samples of the policy, an LLM judge asked in both orders.

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
use crate::judge::{default_criteria, Judge, Verdict};
use crate::label::Label;

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

struct Inner {
    policy: Arc<dyn LlmBackend>,
    judge: Judge,
    criteria: Arc<dyn AspectSet>,
    params: SamplingParams,
    on_inconsistent: OnInconsistent,
    common: Common,
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
#[derive(Clone)]
pub struct Rlaif {
    inner: Arc<Inner>,
}

impl fmt::Debug for Rlaif {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &*self.inner;
        f.debug_struct("Rlaif")
            .field("policy", &i.policy.name())
            .field("judge", &i.judge)
            .field("criteria", &i.criteria)
            .field("params", &i.params)
            .field("on_inconsistent", &i.on_inconsistent)
            .field("common", &i.common)
            .finish()
    }
}

/// Builds an [`Rlaif`]; from [`Rlaif::builder`].
#[must_use = "a builder does nothing until build() is called"]
pub struct RlaifBuilder {
    policy: Option<Arc<dyn LlmBackend>>,
    judge: Option<Judge>,
    judge_backend: Option<Arc<dyn LlmBackend>>,
    criteria: Arc<dyn AspectSet>,
    params: SamplingParams,
    on_inconsistent: OnInconsistent,
    common: Common,
}

impl fmt::Debug for RlaifBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RlaifBuilder")
            .field("has_backend", &self.policy.is_some())
            .field("judge", &self.judge)
            .field("on_inconsistent", &self.on_inconsistent)
            .field("common", &self.common)
            .finish_non_exhaustive()
    }
}

impl RlaifBuilder {
    common_setters!();

    /// The policy backend that writes both samples (and judges, unless a judge is set).
    /// Required.
    pub fn backend(mut self, backend: impl LlmBackend + 'static) -> Self {
        let backend = crate::backend::shared(backend);
        self.policy = Some(backend);
        self
    }

    /// The judge, as configured. Default: a [`Judge`] on the policy backend (or on
    /// [`judge_backend`](Self::judge_backend)) with [`max_reasks`](Self::max_reasks) re-asks.
    pub fn judge(mut self, judge: Judge) -> Self {
        self.judge = Some(judge);
        self
    }

    /// The backend of the default [`Judge`], when it is not the policy backend.
    pub fn judge_backend(mut self, backend: impl LlmBackend + 'static) -> Self {
        self.judge_backend = Some(crate::backend::shared(backend));
        self
    }

    /// The criteria shown to the judge, drawn per example. Default: all of
    /// [`Aspects::general`](crate::Aspects::general).
    pub fn criteria(mut self, criteria: impl AspectSet + 'static) -> Self {
        self.criteria = Arc::new(criteria);
        self
    }

    /// Sampling of the two samples. Default: [`default_first_params`]. Use a temperature above
    /// 0 so that they differ.
    pub fn params(mut self, params: SamplingParams) -> Self {
        self.params = params;
        self
    }

    /// What to do with inconsistent verdicts. Default: [`OnInconsistent::Drop`].
    pub fn on_inconsistent(mut self, policy: OnInconsistent) -> Self {
        self.on_inconsistent = policy;
        self
    }

    /// Validates the settings and builds the generator.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if no backend was given or a sampling value (of the policy or the
    /// judge) is out of range.
    pub fn build(self) -> Result<Rlaif, Error> {
        let policy = self
            .policy
            .ok_or_else(|| Error::config("rlaif: no backend: call backend()"))?;
        self.params
            .validate("rlaif params")
            .map_err(Error::config)?;
        let judge = match self.judge {
            Some(j) => j,
            None => Judge::new(self.judge_backend.unwrap_or_else(|| policy.clone()))
                .max_reasks(self.common.max_reasks),
        };
        judge.validate("rlaif judge params")?;
        Ok(Rlaif {
            inner: Arc::new(Inner {
                policy,
                judge,
                criteria: self.criteria,
                params: self.params,
                on_inconsistent: self.on_inconsistent,
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
    first_seed: u64,
    second_seed: u64,
    judge_seeds: [u64; 2],
}

impl Rlaif {
    /// A builder with the defaults: no backend yet, the judge on the policy backend, the
    /// general criteria, inconsistent verdicts dropped, concurrency 8, completion order,
    /// seed 0, up to 3 re-asks.
    pub fn builder() -> RlaifBuilder {
        RlaifBuilder {
            policy: None,
            judge: None,
            judge_backend: None,
            criteria: Arc::new(default_criteria()),
            params: default_first_params(),
            on_inconsistent: OnInconsistent::default(),
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
        let first_seed = rng.next_u64();
        let second_seed = rng.next_u64();
        let judge_seeds = [rng.next_u64(), rng.next_u64()];
        let criteria = inner.criteria.sample(&mut rng).aspects;
        let Prompt { id, input, extra } = prompt;
        let prompt = input.into_messages();
        Plan {
            id,
            prompt,
            extra,
            criteria,
            first_seed,
            second_seed,
            judge_seeds,
        }
    }

    /// Generates the example of one prompt.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Backend`](crate::ErrorKind::Backend) if a call failed; [`ErrorKind::Unusable`](crate::ErrorKind::Unusable) if a sample stayed empty (or
    /// sample 2 stayed identical to sample 1), the judge gave no readable verdict after every
    /// re-ask, or the verdicts were inconsistent (see [`OnInconsistent`]); all carry the id.
    pub async fn generate_one(&self, prompt: Prompt) -> Result<PreferenceExample, Error> {
        let plan = self.plan(prompt);
        run(self.inner.clone(), plan).await
    }

    stream_methods!(run);
}

/// Which sample (1 or 2) a verdict prefers, given which sample was shown as A.
fn preferred(verdict: Verdict, a_is: u8) -> Option<u8> {
    match verdict {
        Verdict::A => Some(a_is),
        Verdict::B => Some(3 - a_is),
        Verdict::Tie => None,
    }
}

async fn run(inner: Arc<Inner>, plan: Plan) -> Result<PreferenceExample, Error> {
    let span = tracing::debug_span!("rmboost.rlaif", id = %plan.id);
    tracing::Instrument::instrument(run_inner(inner, plan), span).await
}

async fn run_inner(inner: Arc<Inner>, plan: Plan) -> Result<PreferenceExample, Error> {
    let c = &inner.common;
    let req = CompletionRequest::new(plan.prompt.clone()).with_params(&inner.params);
    let policy = &*inner.policy;
    let first = ask(
        policy,
        &plan.id,
        "first",
        &req,
        plan.first_seed,
        c.max_reasks,
        |raw| accept_distinct(raw, &[]),
    )
    .await?;
    let second = ask(
        policy,
        &plan.id,
        "second",
        &req,
        plan.second_seed,
        c.max_reasks,
        |raw| accept_distinct(raw, &[&first.value]),
    )
    .await?;
    drop(req);
    let (s1, s2) = (&first.value, &second.value);
    let ab = inner
        .judge
        .compare(
            &plan.id,
            "judge",
            &plan.prompt,
            s1,
            s2,
            &plan.criteria,
            plan.judge_seeds[0],
        )
        .await?;
    let ba = inner
        .judge
        .compare(
            &plan.id,
            "judge",
            &plan.prompt,
            s2,
            s1,
            &plan.criteria,
            plan.judge_seeds[1],
        )
        .await?;
    let (p_ab, p_ba) = (preferred(ab.value, 1), preferred(ba.value, 2));
    let consistent = p_ab.is_some() && p_ab == p_ba;
    let winner = match (consistent, inner.on_inconsistent) {
        (true, _) | (false, OnInconsistent::Keep) => p_ab.or(p_ba),
        (false, OnInconsistent::Drop) => None,
    };
    let Some(winner) = winner else {
        let why = if p_ab.is_none() && p_ba.is_none() {
            "judge verdicts tie in both orders".to_string()
        } else {
            format!(
                "inconsistent judge verdicts: {} with sample 1 as A, {} with sample 2 as A",
                ab.value, ba.value
            )
        };
        return Err(Error::unusable(
            plan.id,
            "judge",
            ab.calls + ba.calls,
            UnusableReason::Other(why),
        ));
    };
    let mut meta = Meta::new(Method::Rlaif.as_str(), c.seed, plan.extra);
    meta.add("first", &first);
    meta.add("second", &second);
    meta.add("judge", &ab);
    meta.add("judge", &ba);
    meta.extra(
        "judge",
        json!({
            "verdicts": [ab.value.as_str(), ba.value.as_str()],
            "consistent": consistent,
            "winner": winner,
        }),
    );
    let (chosen, rejected, label) = if winner == 2 {
        (second.value, first.value, Label::Better)
    } else {
        (first.value, second.value, Label::Worse)
    };
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

    #[test]
    fn preference_mapping() {
        assert_eq!(preferred(Verdict::A, 1), Some(1));
        assert_eq!(preferred(Verdict::B, 1), Some(2));
        assert_eq!(preferred(Verdict::A, 2), Some(2));
        assert_eq!(preferred(Verdict::B, 2), Some(1));
        assert_eq!(preferred(Verdict::Tie, 2), None);
    }
}
