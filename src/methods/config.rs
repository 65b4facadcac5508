//! [`MethodConfig`]: a method and its settings by value, built into a generator in one call.

use std::num::NonZeroUsize;
use std::sync::Arc;

#[cfg(feature = "run")]
use sha2::{Digest, Sha256};

use super::{Method, Rlaif, Rlcd, RmBoost, WestOfN};
use crate::aspect::Aspects;
use crate::backend::{shared, LlmBackend, SamplingParams};
use crate::engine::{default_first_params, default_second_params, Common, Generator, OutputOrder};
use crate::error::Error;
use crate::label::{Bernoulli, Graded, LabelSampler};

/// A generation method and its settings as plain values, for programs that choose the method
/// at run time (a command line, a binding to another language, a config file): one
/// [`build`](Self::build) makes the [`Generator`], and with the `run` feature
/// `recipe` records the settings that shape the rows, so that a rerun with
/// other settings is refused by the run (the `rmboost` command line records the same).
///
/// The defaults are the command line's: RMBoost, the `general` aspects, balanced plain labels,
/// seed 0, 8 examples in flight, output in completion order, temperature 0.7 with the
/// engine's token limits, 3 re-asks, and 4 samples for West-of-N.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rmboost::Error> {
/// use futures::StreamExt;
/// use rmboost::testing::FakeBackend;
/// use rmboost::{GeneratorExt, Method, MethodConfig, Prompt};
///
/// let mut config = MethodConfig::new("rlcd".parse::<Method>()?);
/// config.seed = 7;
/// let generator = config.build(FakeBackend::new())?;
/// let rows: Vec<_> = generator.generate_iter(vec![Prompt::new("Name a colour.")]).collect().await;
/// assert_eq!(rows[0].as_ref().unwrap().metadata.method, "rlcd");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MethodConfig {
    /// The method.
    pub method: Method,
    /// The aspects drawn per example (RMBoost and RLCD use them), with their sampling mode.
    pub aspects: Aspects,
    /// Graded labels ("slightly"/"much" better or worse, with a margin) instead of plain
    /// ones; RMBoost only.
    pub graded: bool,
    /// The probability that the drawn label is "better" (RMBoost).
    pub p_better: f64,
    /// The run's seed; every draw of an example comes from it and the example's id.
    pub seed: u64,
    /// Examples in flight at once.
    pub concurrency: NonZeroUsize,
    /// The order results come out in.
    pub order: OutputOrder,
    /// Sampling temperature of every generating call.
    pub temperature: f32,
    /// The most tokens per answer; `None` keeps the engine's defaults (512 for a first answer,
    /// 768 for RMBoost's second).
    pub max_tokens: Option<u32>,
    /// Re-asks allowed per call when an answer is unusable.
    pub max_reasks: u32,
    /// Samples per prompt for West-of-N.
    pub samples: usize,
}

impl MethodConfig {
    /// `method` with the defaults above.
    #[must_use]
    pub fn new(method: Method) -> Self {
        MethodConfig {
            method,
            aspects: Aspects::general(),
            graded: false,
            p_better: 0.5,
            seed: 0,
            concurrency: NonZeroUsize::new(8).expect("8 is not zero"),
            order: OutputOrder::Completion,
            temperature: 0.7,
            max_tokens: None,
            max_reasks: 3,
            samples: 4,
        }
    }

    /// Builds the generator of these settings around `backend` (any backend, a shared
    /// `Arc<dyn LlmBackend>` included).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if a setting is out of range (a
    /// probability outside `[0, 1]`, a negative temperature, a zero token limit, fewer than 2
    /// West-of-N samples), naming it; or if the method cannot be built from these settings.
    pub fn build(&self, backend: impl LlmBackend + 'static) -> Result<Arc<dyn Generator>, Error> {
        let backend = shared(backend);
        let common = self.common(backend.clone());
        Ok(match self.method {
            Method::RmBoost => Arc::new(self.rmboost(backend)?),
            Method::Rlcd => Arc::new(
                Rlcd::builder()
                    .with_common(common)
                    .aspects(self.aspects.clone())
                    .build()?,
            ),
            Method::Rlaif => Arc::new(Rlaif::builder().with_common(common).build()?),
            Method::WestOfN => Arc::new(
                WestOfN::builder()
                    .with_common(common)
                    .n(self.samples)
                    .build()?,
            ),
        })
    }

    /// The [`RmBoost`] generator of these settings around `backend`, whatever
    /// [`method`](Self::method) says: for its RMBoost-only API ([`RmBoost::plan`]).
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build).
    pub fn rmboost(&self, backend: impl LlmBackend + 'static) -> Result<RmBoost, Error> {
        let labels: Arc<dyn LabelSampler> = if self.graded {
            // "Much" as often as "slightly", the library's default.
            Arc::new(Graded::new(self.p_better, 0.5)?)
        } else {
            Arc::new(Bernoulli::new(self.p_better)?)
        };
        let backend = shared(backend);
        RmBoost::builder()
            .with_common(self.common(backend.clone()))
            .backend(backend)
            .aspects(self.aspects.clone())
            .labels(labels)
            .second_params(self.params(default_second_params()))
            .build()
    }

    /// `base` with these settings' temperature and token limit.
    fn params(&self, base: SamplingParams) -> SamplingParams {
        let mut params = base.temperature(self.temperature);
        params.max_tokens = self.max_tokens.or(params.max_tokens);
        params
    }

    /// The settings every method shares, with the sampling of first (and baseline) calls.
    fn common(&self, backend: Arc<dyn LlmBackend>) -> Common {
        Common {
            backend: Some(backend),
            params: self.params(default_first_params()),
            concurrency: self.concurrency,
            order: self.order,
            seed: self.seed,
            max_reasks: self.max_reasks,
        }
    }

    /// The settings that shape the rows, for [`RunOptions::recipe`](crate::run::RunOptions::recipe):
    /// the method, seed, aspects, their sampling, labels and `p_better`, and the samples of
    /// West-of-N. A preset's aspects are named by the preset; any other set by its name and
    /// a digest of its aspects, so that two sets that share a name but not their text differ.
    /// Concurrency, order, temperature and token limits are not recorded: a rerun may change
    /// them.
    #[cfg(feature = "run")]
    #[cfg_attr(docsrs, doc(cfg(feature = "run")))]
    #[must_use]
    pub fn recipe(&self) -> crate::run::Recipe {
        let name = self.aspects.name();
        let aspects = match Aspects::preset(name) {
            Some(preset) if preset.aspects() == self.aspects.aspects() => name.to_string(),
            _ => {
                let json = serde_json::to_vec(self.aspects.aspects()).expect("aspects serialise");
                let digest = Sha256::digest(&json);
                let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
                format!("{name} ({hex})")
            }
        };
        let mut recipe = crate::run::Recipe::new()
            .with("method", self.method)
            .with("seed", self.seed)
            .with("aspects", aspects)
            .with("aspect_sampling", self.aspects.sampling())
            .with("labels", if self.graded { "graded" } else { "bernoulli" })
            .with("p_better", self.p_better);
        if self.method == Method::WestOfN {
            recipe = recipe.with("samples", self.samples);
        }
        recipe
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aspect::Aspect;
    use crate::testing::FakeBackend;

    #[test]
    fn every_method_builds_and_bad_settings_are_named() {
        for &method in Method::ALL {
            let g = MethodConfig::new(method).build(FakeBackend::new()).unwrap();
            assert_eq!(g.method(), method.as_str());
        }
        let mut c = MethodConfig::new(Method::RmBoost);
        c.p_better = 1.5;
        let e = c.build(FakeBackend::new()).err().unwrap();
        assert!(e.to_string().contains("p_better"), "{e}");
    }

    #[cfg(feature = "run")]
    #[test]
    fn the_recipe_tells_a_custom_set_from_a_preset_of_the_same_name() {
        let preset = MethodConfig::new(Method::RmBoost);
        assert_eq!(preset.recipe().get("aspects"), Some("general"));
        assert_eq!(preset.recipe().get("aspect_sampling"), Some("1-3"));
        assert_eq!(preset.recipe().get("samples"), None);
        let mut custom = preset.clone();
        custom.aspects = Aspects::custom("general", vec![Aspect::new("a", "b")]).unwrap();
        let recorded = custom.recipe().get("aspects").unwrap().to_string();
        assert!(
            recorded.starts_with("general (") && recorded.len() == 22,
            "{recorded}"
        );
        let mut other = custom.clone();
        other.aspects = Aspects::custom("general", vec![Aspect::new("a", "c")]).unwrap();
        assert_ne!(other.recipe().get("aspects").unwrap(), recorded);
        assert_eq!(
            MethodConfig::new(Method::WestOfN).recipe().get("samples"),
            Some("4")
        );
    }
}
