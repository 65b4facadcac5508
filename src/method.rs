//! The generation methods side by side: [`Method`] names them, [`Generator`] runs any of them.
//!
//! [`RmBoost`] and the [baselines](crate::baselines) ([`Rlcd`], [`Rlaif`], [`WestOfN`]) all
//! implement [`Generator`], so a program can pick one at run time and hold it as a
//! `Box<dyn Generator>`:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), rmboost::Error> {
//! use futures::StreamExt;
//! use rmboost::testing::FakeBackend;
//! use rmboost::{Generator, Method, Prompt, Rlcd, RmBoost};
//!
//! let method: Method = "rlcd".parse()?;
//! let generator: Box<dyn Generator> = match method {
//!     Method::Rlcd => Box::new(Rlcd::builder().backend(FakeBackend::new()).build()?),
//!     _ => Box::new(RmBoost::builder().backend(FakeBackend::new()).build()?),
//! };
//! assert_eq!(generator.method(), Method::Rlcd);
//! let prompts = vec![Prompt::with_id("q1", "Name a colour.")];
//! let results: Vec<_> = generator.generate_iter(prompts).collect().await;
//! assert_eq!(results[0].as_ref().unwrap().metadata.method, "rlcd");
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::Arc;

use futures::stream::{self, BoxStream, Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::baselines::{Rlaif, Rlcd, WestOfN};
use crate::error::Error;
use crate::example::Prompt;
use crate::generator::{ExampleStream, RmBoost};

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
pub enum Method {
    /// Preference-conditional multi-aspect generation ([`RmBoost`]).
    #[serde(rename = "rmboost")]
    RmBoost,
    /// Contrasting system prompts ([`Rlcd`]).
    Rlcd,
    /// Two samples and an LLM judge ([`Rlaif`]).
    Rlaif,
    /// N samples, best and worst by score ([`WestOfN`]).
    WestOfN,
}

impl Method {
    /// Every method, in a stable order.
    pub const ALL: [Method; 4] = [
        Method::RmBoost,
        Method::Rlcd,
        Method::Rlaif,
        Method::WestOfN,
    ];

    /// The name written into `metadata.method`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Method::RmBoost => "rmboost",
            Method::Rlcd => "rlcd",
            Method::Rlaif => "rlaif",
            Method::WestOfN => "west-of-n",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = Error;

    /// # Errors
    ///
    /// [`Error::Config`] naming the accepted values if `s` is none of them.
    fn from_str(s: &str) -> Result<Self, Error> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Method::ALL
            .into_iter()
            .find(|m| m.as_str() == norm)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown method {s:?}: expected one of rmboost, rlcd, rlaif, west-of-n"
                ))
            })
    }
}

/// A generation method ready to run: turns prompts into a stream of preference examples.
///
/// Object safe, so a program can choose the method at run time (`Box<dyn Generator>`,
/// `Arc<dyn Generator>`). Every implementation keeps the crate's invariants: per-example
/// seeding with [`example_rng`](crate::example_rng), at most [`concurrency`](Self::concurrency)
/// examples in flight, one result per input prompt carrying its id, and a stop after a fatal
/// error.
pub trait Generator: Send + Sync + fmt::Debug {
    /// Which method this is.
    fn method(&self) -> Method;

    /// The run seed.
    fn seed(&self) -> u64;

    /// The most examples in flight at once.
    fn concurrency(&self) -> NonZeroUsize;

    /// Turns a boxed stream of prompts into a stream of results, one per prompt; an `Err` input
    /// item is passed through in its place. The types' own `try_generate`, `generate` and
    /// `generate_iter` do the same for any stream or iterator.
    fn generate_boxed(&self, prompts: BoxStream<'static, Result<Prompt, Error>>) -> ExampleStream;
}

impl dyn Generator + '_ {
    /// [`generate_boxed`](Generator::generate_boxed) for any fallible stream of prompts (such
    /// as a JSONL reader turned into a stream): an `Err` input item is passed through in its
    /// place.
    pub fn try_generate<S>(&self, prompts: S) -> ExampleStream
    where
        S: Stream<Item = Result<Prompt, Error>> + Send + 'static,
    {
        self.generate_boxed(prompts.boxed())
    }

    /// [`generate_boxed`](Generator::generate_boxed) for an iterator of prompts.
    pub fn generate_iter<I>(&self, prompts: I) -> ExampleStream
    where
        I: IntoIterator<Item = Prompt>,
        I::IntoIter: Send + 'static,
    {
        self.generate_boxed(stream::iter(prompts).map(Ok).boxed())
    }
}

macro_rules! impl_generator {
    ($($ty:ty => $method:expr),*) => {$(
        impl Generator for $ty {
            fn method(&self) -> Method {
                $method
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
                self.try_generate(prompts)
            }
        }
    )*};
}

impl_generator!(
    RmBoost => Method::RmBoost,
    Rlcd => Method::Rlcd,
    Rlaif => Method::Rlaif,
    WestOfN => Method::WestOfN
);

macro_rules! forward_generator {
    ($($ty:ty),*) => {$(
        impl<G: Generator + ?Sized> Generator for $ty {
            fn method(&self) -> Method {
                (**self).method()
            }
            fn seed(&self) -> u64 {
                (**self).seed()
            }
            fn concurrency(&self) -> NonZeroUsize {
                (**self).concurrency()
            }
            fn generate_boxed(
                &self,
                prompts: BoxStream<'static, Result<Prompt, Error>>,
            ) -> ExampleStream {
                (**self).generate_boxed(prompts)
            }
        }
    )*};
}

forward_generator!(Arc<G>, Box<G>, &G);

#[cfg(test)]
mod tests {
    use super::*;

    fn _object_safe(_: &dyn Generator) {}

    #[test]
    fn names_round_trip() {
        for m in Method::ALL {
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
