//! The paper's baselines in the same harness as [`RmBoost`](crate::RmBoost): [`Rlcd`],
//! [`Rlaif`] and [`WestOfN`].
//!
//! Each is built from the same parts ([`LlmBackend`](crate::LlmBackend),
//! [`AspectSet`](crate::AspectSet)), validated by its builder's `build()`, seeded per example
//! with [`example_rng`](crate::example_rng)`(run seed, id)` (every draw, backend seeds included,
//! before the first call), and returns the same [`ExampleStream`](crate::ExampleStream) with
//! bounded concurrency, either output order and a stop after a fatal error. All of them, and
//! `RmBoost`, implement [`Generator`](crate::Generator), so a program can pick one by
//! [`Method`] at run time and compare the datasets with
//! [`Report`](crate::report::Report).
//!
//! | method | calls per example (no re-asks) | how the pair is made |
//! |---|---|---|
//! | [`Rlcd`] | 2 | a response to a system prompt pushing towards the drawn aspects (chosen) and one pushing away from them (rejected) |
//! | [`Rlaif`] | 4 | two samples; an LLM judge compares them in both orders; consistent verdicts make the pair |
//! | [`WestOfN`] | N + N scorings | N samples scored pointwise; the best is chosen, the worst rejected |
//!
//! ## What `label` means for a baseline
//!
//! The baselines keep RMBoost's construction rule, restated for responses generated one after
//! the other: `label = "better"` means the chosen response is the *later* one (the second
//! sample; for RLCD the positive response, generated after the negative one), `"worse"` that it
//! is the earlier one. So for RLCD every label is `"better"`; for RLAIF and West-of-N the label
//! says which sample won and should be balanced. Judge verdicts and scores are kept in
//! `metadata` (keys `judge`, `scores`; see each type).
//!
//! ## Example (offline)
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rmboost::Error> {
//! use futures::StreamExt;
//! use rmboost::testing::ScriptedBackend;
//! use rmboost::{Completion, Prompt, Rlaif};
//!
//! // A stand-in model: samples echo their seed; as a judge it always prefers answer A.
//! let backend = ScriptedBackend::from_fn(|req| {
//!     let last = &req.messages.last().unwrap().content;
//!     if last.contains("<answer_a>") {
//!         Ok(Completion::new("A is clearer. <verdict>A</verdict>"))
//!     } else {
//!         Ok(Completion::new(format!("sample {}", req.seed.unwrap_or(0))))
//!     }
//! });
//! let rlaif = Rlaif::builder().backend(backend.clone()).seed(1).build()?;
//! let results: Vec<_> = rlaif.generate_iter(vec![Prompt::new("Name a river.")]).collect().await;
//! // "A" in both orders means a different sample each time: position bias, so the example
//! // is dropped as inconsistent rather than written with a coin-flip label.
//! let err = results[0].as_ref().unwrap_err();
//! assert!(err.to_string().contains("inconsistent"), "{err}");
//! assert_eq!(backend.calls(), 4);
//! # Ok(())
//! # }
//! ```

mod judge;
mod rlaif;
mod rlcd;
mod west_of_n;

use std::num::NonZeroUsize;

use serde_json::{Map, Value};

pub use judge::{parse_score, parse_verdict, Judge, Verdict, REASK_TEMPERATURE};
pub use rlaif::{OnInconsistent, Rlaif, RlaifBuilder};
pub use rlcd::{Rlcd, RlcdBuilder};
pub use west_of_n::{ScoreRequest, Scored, Scorer, WestOfN, WestOfNBuilder};

use crate::aspect::{Aspect, AspectSampling, Aspects};
use crate::backend::{Message, Role, Usage};
use crate::error::UnusableReason;
use crate::example::ExampleMetadata;
use crate::generator::{Answer, OutputOrder};
use crate::method::Method;

/// Settings every method shares.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub(crate) concurrency: NonZeroUsize,
    pub(crate) order: OutputOrder,
    pub(crate) seed: u64,
    pub(crate) max_reasks: u32,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            concurrency: NonZeroUsize::new(8).expect("8 is not zero"),
            order: OutputOrder::default(),
            seed: 0,
            max_reasks: 3,
        }
    }
}

/// The builder setters of [`Common`], shared by the baselines' builders.
macro_rules! common_setters {
    () => {
        /// How many examples run at once (each makes its calls one after another, so this is
        /// also the most backend calls in flight). Default: 8.
        pub fn concurrency(mut self, concurrency: std::num::NonZeroUsize) -> Self {
            self.common.concurrency = concurrency;
            self
        }

        /// The output order. Default: [`OutputOrder::Completion`](crate::OutputOrder).
        pub fn order(mut self, order: crate::generator::OutputOrder) -> Self {
            self.common.order = order;
            self
        }

        /// The run seed; with each example's id it determines every random draw. Default: 0.
        pub fn seed(mut self, seed: u64) -> Self {
            self.common.seed = seed;
            self
        }

        /// How many times an unusable answer (empty, a copy of the other response, a judge
        /// answer without a verdict or score) is asked again, with the next backend seed,
        /// before the example fails. Default: 3.
        pub fn max_reasks(mut self, max_reasks: u32) -> Self {
            self.common.max_reasks = max_reasks;
            self
        }
    };
}
pub(crate) use common_setters;

/// The default judging criteria: every aspect of [`Aspects::general`].
pub(crate) fn default_criteria() -> Aspects {
    Aspects::general()
        .with_sampling(AspectSampling::All)
        .expect("`all` is valid for any set")
}

/// `system` as the first message of `prompt`, merged into a system message already there.
pub(crate) fn with_system(system: &str, prompt: &[Message]) -> Vec<Message> {
    let mut out = Vec::with_capacity(prompt.len() + 1);
    match prompt.split_first() {
        Some((first, rest)) if first.role == Role::System => {
            out.push(Message::system(format!("{system}\n\n{}", first.content)));
            out.extend_from_slice(rest);
        }
        _ => {
            out.push(Message::system(system));
            out.extend_from_slice(prompt);
        }
    }
    out
}

/// `- name: definition` lines.
pub(crate) fn render_aspects(aspects: &[Aspect], out: &mut String) {
    for a in aspects {
        out.push_str("- ");
        out.push_str(&a.name);
        out.push_str(": ");
        out.push_str(&a.definition);
        out.push('\n');
    }
}

/// Accepts a non-empty response that differs from each of `others` (after normalising white
/// space and case).
pub(crate) fn accept_distinct(raw: &str, others: &[&str]) -> Result<String, UnusableReason> {
    let text = raw.trim();
    if text.is_empty() {
        return Err(UnusableReason::Empty);
    }
    if others.iter().any(|o| crate::template::same_text(text, o)) {
        return Err(UnusableReason::SameAsFirst);
    }
    Ok(text.to_string())
}

/// Collects metadata call group by call group.
pub(crate) struct Meta {
    md: ExampleMetadata,
    total: Usage,
}

impl Meta {
    pub(crate) fn new(method: Method, seed: u64, input: Map<String, Value>) -> Self {
        Meta {
            md: ExampleMetadata {
                method: method.as_str().into(),
                seed,
                input,
                ..ExampleMetadata::default()
            },
            total: Usage::default(),
        }
    }

    /// Adds a call group (summing with an earlier group of the same name).
    pub(crate) fn add_raw(
        &mut self,
        group: &str,
        calls: u32,
        reasks: u32,
        usage: Usage,
        model: &str,
    ) {
        self.md.calls += calls;
        self.md.reasks += reasks;
        *self.md.usage.entry(group.to_string()).or_default() += usage;
        self.total += usage;
        let slot = self.md.models.entry(group.to_string()).or_default();
        if !model.is_empty() {
            *slot = model.to_string();
        }
    }

    pub(crate) fn add<T>(&mut self, group: &str, answer: &Answer<T>) {
        self.add_raw(
            group,
            answer.calls,
            answer.reasks,
            answer.usage,
            &answer.model,
        );
    }

    pub(crate) fn extra(&mut self, key: &str, value: Value) {
        self.md.extra.insert(key.to_string(), value);
    }

    pub(crate) fn finish(mut self) -> ExampleMetadata {
        self.md.usage.insert("total".into(), self.total);
        self.md
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

    #[test]
    fn distinct() {
        assert_eq!(accept_distinct(" ", &[]), Err(UnusableReason::Empty));
        assert_eq!(
            accept_distinct("Hello  World", &["hello world"]),
            Err(UnusableReason::SameAsFirst)
        );
        assert_eq!(accept_distinct(" hi ", &["ho"]).unwrap(), "hi");
    }
}
