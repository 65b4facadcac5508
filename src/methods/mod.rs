//! The generation methods: [`RmBoost`] and the paper's baselines [`Rlcd`], [`Rlaif`] and
//! [`WestOfN`], in the same harness. [`Method`] names them; each implements
//! [`Generator`], so a program can pick one at run time and hold it as a
//! `Box<dyn Generator>`:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rmboost::Error> {
//! use futures::StreamExt;
//! use rmboost::testing::FakeBackend;
//! use rmboost::{Generator, GeneratorExt, Method, Prompt, Rlcd, RmBoost};
//!
//! let method: Method = "rlcd".parse()?;
//! let generator: Box<dyn Generator> = match method {
//!     Method::Rlcd => Box::new(Rlcd::builder().backend(FakeBackend::new()).build()?),
//!     _ => Box::new(RmBoost::builder().backend(FakeBackend::new()).build()?),
//! };
//! assert_eq!(generator.method(), "rlcd");
//! let prompts = vec![Prompt::with_id("q1", "Name a colour.")];
//! let results: Vec<_> = generator.generate_iter(prompts).collect().await;
//! assert_eq!(results[0].as_ref().unwrap().metadata.method, "rlcd");
//! # Ok(())
//! # }
//! ```
//!
//! ## The baselines
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
//! use rmboost::{Completion, GeneratorExt, Prompt, Rlaif};
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

mod config;
mod rlaif;
mod rlcd;
mod rmboost;
mod west_of_n;

use std::fmt;
use std::future::Future;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::Arc;

use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

pub use self::rmboost::{ExamplePlan, RmBoost, RmBoostBuilder};
pub use config::MethodConfig;
pub use rlaif::{OnInconsistent, Rlaif, RlaifBuilder};
pub use rlcd::{Rlcd, RlcdBuilder};
pub use west_of_n::{WestOfN, WestOfNBuilder};

use crate::engine::{ExampleStream, Generator};
use crate::error::Error;
use crate::example::{PreferenceExample, Prompt};

crate::error::named_enum! { pub ALL;
/// A generation method: RMBoost or one of the paper's baselines.
///
/// Parses from and prints as the name written into each example's `metadata.method`:
/// `rmboost`, `rlcd`, `rlaif`, `west-of-n` (parsing ignores case and accepts `_` for `-`).
///
/// ```
/// use rmboost::Method;
///
/// assert_eq!("West_of_N".parse::<Method>()?, Method::WestOfN);
/// assert_eq!(Method::WestOfN.to_string(), "west-of-n");
/// assert!("dpo".parse::<Method>().is_err());
/// # Ok::<(), rmboost::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Method {
    /// Preference-conditional multi-aspect generation ([`RmBoost`]).
    #[serde(rename = "rmboost")]
    RmBoost = "rmboost",
    /// Contrasting system prompts ([`Rlcd`]).
    Rlcd = "rlcd",
    /// Two samples and an LLM judge ([`Rlaif`]).
    Rlaif = "rlaif",
    /// N samples, best and worst by score ([`WestOfN`]).
    WestOfN = "west-of-n",
}
}

impl FromStr for Method {
    type Err = Error;

    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) naming the accepted values if `s` is none of them.
    fn from_str(s: &str) -> Result<Self, Error> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Method::ALL
            .iter()
            .copied()
            .find(|m| m.as_str() == norm)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown method {s:?}: expected one of rmboost, rlcd, rlaif, west-of-n"
                ))
            })
    }
}

/// What a built-in method supplies: its settings (the builder it was built from) start one
/// example; the stream, `generate_one` and the [`Generator`] impl are shared.
trait Draw: fmt::Debug + Send + Sync + Sized + 'static {
    const METHOD: Method;

    /// Makes every random draw of the example now, from [`example_rng`](crate::example_rng),
    /// before the first await (so that the draws do not depend on the order in which examples
    /// finish), and returns the future that makes its calls.
    fn example(
        self: Arc<Self>,
        prompt: Prompt,
    ) -> impl Future<Output = Result<PreferenceExample, Error>> + Send + 'static;
}

/// The future of one example, in its tracing span.
fn start<D: Draw>(
    settings: &Arc<D>,
    prompt: Prompt,
) -> impl Future<Output = Result<PreferenceExample, Error>> + Send + 'static {
    let span = tracing::debug_span!("rmboost.example", method = %D::METHOD, id = %prompt.id);
    settings.clone().example(prompt).instrument(span)
}

/// The public side of each method: `$ty` wraps its built settings, an `Arc<$settings>` with a
/// `common` field.
macro_rules! impl_generator {
    ($($ty:ty => $settings:ty),*) => {$(
        impl $ty {
            /// Generates the example of one prompt.
            ///
            /// # Errors
            ///
            /// [`ErrorKind::Backend`](crate::ErrorKind::Backend) if a call failed,
            /// [`ErrorKind::Unusable`](crate::ErrorKind::Unusable) if an answer stayed unusable
            /// after every re-ask or the method could not make a pair of its answers (see the
            /// type's docs); both carry the prompt's id.
            ///
            /// # Cancel safety
            ///
            /// Dropping the future abandons the example; nothing is written anywhere.
            pub async fn generate_one(&self, prompt: Prompt) -> Result<PreferenceExample, Error> {
                start(&self.0, prompt).await
            }

            /// The run seed.
            #[must_use]
            pub fn seed(&self) -> u64 {
                self.0.common.seed
            }

            /// The concurrency.
            #[must_use]
            pub fn concurrency(&self) -> NonZeroUsize {
                self.0.common.concurrency
            }
        }

        impl Generator for $ty {
            fn method(&self) -> &str {
                <$settings as Draw>::METHOD.as_str()
            }
            fn seed(&self) -> u64 {
                <$ty>::seed(self)
            }
            fn concurrency(&self) -> NonZeroUsize {
                <$ty>::concurrency(self)
            }
            fn generate_boxed(
                &self,
                prompts: BoxStream<'static, Result<Prompt, Error>>,
            ) -> ExampleStream {
                let settings = self.0.clone();
                let c = &settings.common;
                ExampleStream::drive(prompts, c.concurrency, c.order, move |p| start(&settings, p))
            }
        }
    )*};
}

impl_generator!(
    RmBoost => RmBoostBuilder,
    Rlcd => RlcdBuilder,
    Rlaif => RlaifBuilder,
    WestOfN => WestOfNBuilder
);

#[cfg(test)]
mod tests {
    use super::*;

    fn _object_safe(_: &dyn Generator) {}

    #[test]
    fn names_round_trip() {
        for &m in Method::ALL {
            assert_eq!(m.as_str().parse::<Method>().unwrap(), m);
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.as_str())
            );
        }
        assert_eq!(" RLAIF ".parse::<Method>().unwrap(), Method::Rlaif);
        let err = "best-of-n".parse::<Method>().unwrap_err();
        assert!(err.to_string().contains("west-of-n"), "{err}");
    }
}
