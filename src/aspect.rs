//! Quality aspects: what the second response is better or worse *at*.
//!
//! An [`Aspects`] value is a named list of [`Aspect`]s (name + one-line definition) with a
//! sampling mode ([`AspectSampling`]): all of them, a seeded random subset per example, or all
//! listed with the model asked to pick a few. Four presets come with the crate
//! ([`Aspects::long_form_qa`], [`Aspects::ultrafeedback`], [`Aspects::summarization`],
//! [`Aspects::general`]); custom sets come from code or a JSON file ([`Aspects::from_json_file`]).
//!
//! ```
//! use rmboost::{Aspect, Aspects, AspectSampling};
//!
//! let legal = Aspects::custom(
//!     "legal",
//!     vec![
//!         Aspect::new("precision", "uses exact legal terms and cites the rule it relies on"),
//!         Aspect::new("caution", "flags uncertainty and says when to ask a lawyer"),
//!     ],
//! )?
//! .with_sampling(AspectSampling::Subset { min: 1, max: 2 })?;
//! assert_eq!(legal.aspects().len(), 2);
//! # Ok::<(), rmboost::Error>(())
//! ```

use std::fmt;
use std::path::Path;

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use crate::Error;

/// One quality aspect: a short name and a one-line definition shown to the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Aspect {
    /// Short name, e.g. `"completeness"`; written into each example's `aspects` list.
    pub name: String,
    /// What the aspect means, in one line.
    pub definition: String,
}

impl Aspect {
    /// An aspect with this name and definition.
    pub fn new(name: impl Into<String>, definition: impl Into<String>) -> Self {
        Aspect {
            name: name.into(),
            definition: definition.into(),
        }
    }
}

/// The aspects drawn for one example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AspectDraw {
    /// The aspects to show in the prompt.
    pub aspects: Vec<Aspect>,
    /// `Some(k)`: the prompt lists all `aspects` and asks the model to pick at most `k`
    /// (it reports its pick); `None`: the response must differ on all listed aspects.
    pub model_picks: Option<usize>,
}

/// Draws the aspects of one example from the RNG it is handed.
pub trait AspectSet: Send + Sync + fmt::Debug {
    /// Draws the aspects of one example.
    fn sample(&self, rng: &mut dyn RngCore) -> AspectDraw;
}

/// `Arc<T>`, `Box<T>` and `&T` implement one of the crate's traits (such as [`AspectSet`],
/// [`LabelSampler`](crate::LabelSampler) or [`PromptTemplate`](crate::PromptTemplate)) by
/// forwarding each listed method to `T`.
macro_rules! forward_impls {
    ($trait:ident $methods:tt) => {
        $crate::aspect::forward_impls!(@impls $trait $methods std::sync::Arc<T>, Box<T>, &T);
    };
    (@impls $trait:ident $methods:tt $($ty:ty),*) => {$(
        impl<T: $trait + ?Sized> $trait for $ty {
            $crate::aspect::forward_impls!(@methods $methods);
        }
    )*};
    (@methods { $(fn $m:ident(&self $(, $a:ident: $t:ty)*) -> $out:ty;)* }) => {$(
        fn $m(&self $(, $a: $t)*) -> $out {
            (**self).$m($($a),*)
        }
    )*};
}
pub(crate) use forward_impls;

forward_impls!(AspectSet {
    fn sample(&self, rng: &mut dyn RngCore) -> AspectDraw;
});

/// How an [`Aspects`] set chooses the aspects of each example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
#[non_exhaustive]
pub enum AspectSampling {
    /// Every aspect, every time.
    All,
    /// A uniformly drawn subset whose size is uniform in `min..=max` (`min = max = k` for a
    /// fixed size), listed in the set's order.
    Subset {
        /// Smallest subset size (at least 1).
        min: usize,
        /// Largest subset size (at most the number of aspects).
        max: usize,
    },
    /// All aspects are listed and the model picks at most `max` of them itself.
    ModelPicks {
        /// How many the model may pick (at least 1).
        max: usize,
    },
}

impl fmt::Display for AspectSampling {
    /// The form [`FromStr`](std::str::FromStr) reads: `all`, `K`, `MIN-MAX`, `model-picks:K`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AspectSampling::All => f.write_str("all"),
            AspectSampling::Subset { min, max } if min == max => write!(f, "{min}"),
            AspectSampling::Subset { min, max } => write!(f, "{min}-{max}"),
            AspectSampling::ModelPicks { max } => write!(f, "model-picks:{max}"),
        }
    }
}

impl std::str::FromStr for AspectSampling {
    type Err = Error;

    /// Parses `all`, `K` (a subset of exactly K), `MIN-MAX` (a subset of MIN to MAX) or
    /// `model-picks[:K]` (the model picks at most K, default 3); case and `_` for `-` are
    /// ignored. Sizes are checked against a set by [`Aspects::with_sampling`].
    ///
    /// ```
    /// use rmboost::AspectSampling;
    ///
    /// assert_eq!("1-3".parse::<AspectSampling>()?, AspectSampling::Subset { min: 1, max: 3 });
    /// assert_eq!("Model_Picks:2".parse::<AspectSampling>()?, AspectSampling::ModelPicks { max: 2 });
    /// assert!("some".parse::<AspectSampling>().is_err());
    /// # Ok::<(), rmboost::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) naming the accepted forms.
    fn from_str(s: &str) -> Result<Self, Error> {
        let mode = s.trim().to_ascii_lowercase().replace('_', "-");
        let num = |t: &str| t.trim().parse::<usize>().ok();
        let parsed = match mode.strip_prefix("model-picks") {
            _ if mode == "all" => Some(AspectSampling::All),
            Some("") => Some(AspectSampling::ModelPicks { max: 3 }),
            Some(rest) => {
                (rest.strip_prefix(':').and_then(num)).map(|max| AspectSampling::ModelPicks { max })
            }
            None => {
                let (min, max) = mode.split_once('-').unwrap_or((&mode, &mode));
                (num(min).zip(num(max))).map(|(min, max)| AspectSampling::Subset { min, max })
            }
        };
        parsed.ok_or_else(|| {
            Error::config(format!(
                "unknown aspect sampling `{s}`: use all, K, MIN-MAX or model-picks[:K]"
            ))
        })
    }
}

/// A named set of aspects with a sampling mode; implements [`AspectSet`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aspects {
    name: String,
    aspects: Vec<Aspect>,
    sampling: AspectSampling,
}

/// The JSON shapes [`Aspects::from_json_file`] accepts: a bare list, or an object.
#[derive(Deserialize)]
#[serde(untagged)]
enum AspectsFile {
    List(Vec<Aspect>),
    Object {
        #[serde(default)]
        name: Option<String>,
        aspects: Vec<Aspect>,
        #[serde(default)]
        sampling: Option<AspectSampling>,
    },
}

impl Aspects {
    /// A custom set, sampled as a random subset of 1 to 3 aspects (fewer if the set is smaller).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if the list is empty, a name or definition
    /// is blank, or two aspects share a name.
    pub fn custom(name: impl Into<String>, aspects: Vec<Aspect>) -> Result<Self, Error> {
        Self::checked(name.into(), aspects, None).map_err(Error::config)
    }

    /// Sets the sampling mode.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if a size is 0, `min > max`, or `max`
    /// exceeds the number of aspects.
    pub fn with_sampling(self, sampling: AspectSampling) -> Result<Self, Error> {
        Self::checked(self.name, self.aspects, Some(sampling)).map_err(Error::config)
    }

    /// The set, or what is wrong with it (naming the set and the field): the checks of
    /// [`custom`](Self::custom) and [`with_sampling`](Self::with_sampling). No sampling mode
    /// means custom's default, a subset of 1 to 3.
    fn checked(
        name: String,
        aspects: Vec<Aspect>,
        sampling: Option<AspectSampling>,
    ) -> Result<Self, String> {
        let n = aspects.len();
        let sampling = sampling.unwrap_or(AspectSampling::Subset {
            min: 1,
            max: n.min(3),
        });
        if n == 0 {
            return Err(format!("aspect set {name:?} has no aspects"));
        }
        let fault = aspects.iter().enumerate().find_map(|(i, a)| {
            if a.name.trim().is_empty() {
                Some(format!("aspects[{i}].name is empty"))
            } else if a.definition.trim().is_empty() {
                Some(format!("aspects[{i}].definition ({}) is empty", a.name))
            } else if aspects[..i].iter().any(|b| b.name == a.name) {
                Some(format!("aspects[{i}].name {:?} appears twice", a.name))
            } else {
                None
            }
        });
        let fault = fault.or_else(|| match sampling {
            AspectSampling::All => None,
            AspectSampling::Subset { min, max } => (min == 0 || min > max || max > n)
                .then(|| format!("subset size {min}..={max} must satisfy 1 <= min <= max <= {n}")),
            AspectSampling::ModelPicks { max } => {
                (max == 0 || max > n).then(|| format!("model_picks max {max} must be in 1..={n}"))
            }
        });
        match fault {
            Some(why) => Err(format!("aspect set {name:?}: {why}")),
            None => Ok(Aspects {
                name,
                aspects,
                sampling,
            }),
        }
    }

    /// Sets the sampling mode from its text form (`all`, `K`, `MIN-MAX`, `model-picks[:K]`,
    /// read as by [`AspectSampling`]'s `FromStr`), fitted to this set: a bare `model-picks`
    /// lets the model pick at most 3 aspects, or all of them in a set of fewer. Sizes given
    /// explicitly are checked as by [`with_sampling`](Self::with_sampling).
    ///
    /// ```
    /// use rmboost::{Aspect, AspectSampling, Aspects};
    ///
    /// let two = Aspects::custom("mine", vec![Aspect::new("a", "x"), Aspect::new("b", "y")])?;
    /// let set = two.clone().with_sampling_mode("model-picks")?;
    /// assert_eq!(set.sampling(), AspectSampling::ModelPicks { max: 2 });
    /// assert!(two.with_sampling_mode("model-picks:3").is_err());
    /// # Ok::<(), rmboost::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) for text that is not a sampling mode, or
    /// sizes that do not fit the set.
    pub fn with_sampling_mode(self, mode: &str) -> Result<Self, Error> {
        let sampling = match mode.parse::<AspectSampling>()? {
            AspectSampling::ModelPicks { max } if !mode.contains(':') => {
                AspectSampling::ModelPicks {
                    max: max.min(self.aspects.len()),
                }
            }
            other => other,
        };
        self.with_sampling(sampling)
    }

    /// Reads a set from a JSON file: either a list of `{"name", "definition"}` objects or an
    /// object `{"name": ..., "aspects": [...], "sampling": {"mode": "subset", "min": 1, "max": 2}}`
    /// (`mode` is `all`, `subset` or `model_picks`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the file cannot be read,
    /// [`ErrorKind::Parse`](crate::ErrorKind::Parse) (naming the file, line and field) if it is not
    /// such JSON, [`ErrorKind::Config`](crate::ErrorKind::Config) if the set is invalid (see
    /// [`Aspects::custom`]).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::io(path.to_path_buf(), source))?;
        let parsed: AspectsFile = serde_json::from_str(&text).map_err(|e| {
            Error::parse(
                path,
                e.line() as u64,
                format!(
                    "not an aspect list ([{{\"name\", \"definition\"}}] or {{\"aspects\": [...]}}): {e}"
                ),
            )
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "custom".into());
        let (name, aspects, sampling) = match parsed {
            AspectsFile::List(list) => (None, list, None),
            AspectsFile::Object {
                name,
                aspects,
                sampling,
            } => (name, aspects, sampling),
        };
        Self::checked(name.unwrap_or(stem), aspects, sampling)
            .map_err(|why| Error::config(format!("{}: {why}", path.display())))
    }

    /// The set a command line or a config names: a [preset](Self::preset), else a JSON file
    /// read by [`from_json_file`](Self::from_json_file).
    ///
    /// ```
    /// use rmboost::{Aspects, ErrorKind};
    ///
    /// assert_eq!(Aspects::from_spec("general")?.name(), "general");
    /// assert_eq!(Aspects::from_spec("nope").unwrap_err().kind(), ErrorKind::Config);
    /// # Ok::<(), rmboost::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) for a word that is neither a preset nor a
    /// file (naming the presets); otherwise as [`from_json_file`](Self::from_json_file).
    pub fn from_spec(spec: &str) -> Result<Self, Error> {
        if let Some(set) = Self::preset(spec) {
            return Ok(set);
        }
        let path = Path::new(spec);
        if !path.exists() && !spec.contains(['/', '.', '\\']) {
            return Err(Error::config(format!(
                "{spec:?}: not a preset ({}) nor a file",
                Self::PRESETS.join(", ")
            )));
        }
        Self::from_json_file(path)
    }

    /// A preset by name: `qa` (or `long_form_qa`), `ultrafeedback` (or `chat`),
    /// `summarization` (or `summarisation`, `tldr`), `general`.
    #[must_use]
    pub fn preset(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().replace('-', "_").as_str() {
            "qa" | "long_form_qa" => Some(Self::long_form_qa()),
            "ultrafeedback" | "chat" => Some(Self::ultrafeedback()),
            "summarization" | "summarisation" | "tldr" => Some(Self::summarization()),
            "general" => Some(Self::general()),
            _ => None,
        }
    }

    /// The names [`Aspects::preset`] accepts (canonical forms).
    pub const PRESETS: [&'static str; 4] = ["qa", "ultrafeedback", "summarization", "general"];

    fn preset_set(name: &str, list: &[(&str, &str)], sampling: AspectSampling) -> Self {
        Aspects {
            name: name.to_string(),
            aspects: list.iter().map(|(n, d)| Aspect::new(*n, *d)).collect(),
            sampling,
        }
    }

    /// Long-form question answering (in the spirit of QA-Feedback): relevance, factuality,
    /// completeness. Subsets of 1 to 2.
    #[must_use]
    pub fn long_form_qa() -> Self {
        Self::preset_set(
            "qa",
            &[
                ("relevance", "every sentence helps answer the question that was asked; nothing is off-topic or padded"),
                ("factuality", "every claim is true and agrees with the passages or facts given in the question"),
                ("completeness", "the answer covers all the information the question needs, not just part of it"),
            ],
            AspectSampling::Subset { min: 1, max: 2 },
        )
    }

    /// General chat, UltraFeedback's four principles: helpfulness, honesty, truthfulness,
    /// instruction-following. Subsets of 1 to 2.
    #[must_use]
    pub fn ultrafeedback() -> Self {
        Self::preset_set(
            "ultrafeedback",
            &[
                ("helpfulness", "solves the user's actual problem with useful, specific and well-organised content"),
                ("honesty", "is open about uncertainty and limits instead of sounding more confident than it should"),
                ("truthfulness", "states facts correctly and invents nothing: no made-up names, numbers or sources"),
                ("instruction-following", "does exactly what was asked, respecting every stated constraint on content, format and length"),
            ],
            AspectSampling::Subset { min: 1, max: 2 },
        )
    }

    /// Summarisation (the axes of Stiennon et al.): coherence, accuracy, coverage, conciseness.
    /// Subsets of 1 to 2.
    #[must_use]
    pub fn summarization() -> Self {
        Self::preset_set(
            "summarization",
            &[
                (
                    "coherence",
                    "reads as one clear, well-ordered piece rather than a list of fragments",
                ),
                (
                    "accuracy",
                    "says only what the source says, with no distortion or added facts",
                ),
                (
                    "coverage",
                    "keeps the source's key points and leaves none of the important ones out",
                ),
                (
                    "conciseness",
                    "is short and free of repetition and unimportant detail",
                ),
            ],
            AspectSampling::Subset { min: 1, max: 2 },
        )
    }

    /// A general-purpose set for users who do not know which to pick: helpfulness, relevance,
    /// correctness, completeness, clarity, harmlessness. Subsets of 1 to 3.
    #[must_use]
    pub fn general() -> Self {
        Self::preset_set(
            "general",
            &[
                ("helpfulness", "actually helps the user with what they need"),
                (
                    "relevance",
                    "stays on the request and leaves out what does not belong",
                ),
                (
                    "correctness",
                    "facts, reasoning, numbers and code are right",
                ),
                ("completeness", "covers every part of the request"),
                ("clarity", "is well organised and easy to follow"),
                (
                    "harmlessness",
                    "avoids unsafe, offensive or misleading content",
                ),
            ],
            AspectSampling::Subset { min: 1, max: 3 },
        )
    }

    /// The set's name (the preset name or the one given).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// All aspects in the set, in order.
    #[must_use]
    pub fn aspects(&self) -> &[Aspect] {
        &self.aspects
    }

    /// The sampling mode.
    #[must_use]
    pub fn sampling(&self) -> AspectSampling {
        self.sampling
    }
}

impl Default for Aspects {
    fn default() -> Self {
        Self::general()
    }
}

impl AspectSet for Aspects {
    fn sample(&self, rng: &mut dyn RngCore) -> AspectDraw {
        let (aspects, model_picks) = match self.sampling {
            AspectSampling::All => (self.aspects.clone(), None),
            AspectSampling::ModelPicks { max } => (self.aspects.clone(), Some(max)),
            AspectSampling::Subset { min, max } => {
                let k = rng.random_range(min..=max);
                let mut idx = rand::seq::index::sample(rng, self.aspects.len(), k).into_vec();
                idx.sort_unstable();
                (
                    idx.into_iter().map(|i| self.aspects[i].clone()).collect(),
                    None,
                )
            }
        };
        AspectDraw {
            aspects,
            model_picks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn presets_are_valid() {
        for name in Aspects::PRESETS {
            let set = Aspects::preset(name).unwrap();
            let again = Aspects::custom(set.name(), set.aspects().to_vec()).unwrap();
            again.with_sampling(set.sampling()).unwrap();
        }
        assert!(Aspects::preset("nope").is_none());
        assert_eq!(Aspects::preset("Long-Form-QA").unwrap().name(), "qa");
    }

    #[test]
    fn subset_sizes_in_range_and_ordered() {
        let set = Aspects::general();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut sizes = [0usize; 4];
        for _ in 0..600 {
            let d = set.sample(&mut rng);
            assert!((1..=3).contains(&d.aspects.len()));
            sizes[d.aspects.len()] += 1;
            let pos: Vec<usize> = d
                .aspects
                .iter()
                .map(|a| set.aspects().iter().position(|b| b == a).unwrap())
                .collect();
            assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
        }
        assert!(
            sizes[1] > 100 && sizes[2] > 100 && sizes[3] > 100,
            "{sizes:?}"
        );
    }

    #[test]
    fn custom_validation_names_the_field() {
        let err = Aspects::custom("x", vec![Aspect::new("a", "")]).unwrap_err();
        assert!(err.to_string().contains("aspects[0].definition"), "{err}");
        let err =
            Aspects::custom("x", vec![Aspect::new("a", "d"), Aspect::new("a", "e")]).unwrap_err();
        assert!(err.to_string().contains("aspects[1].name"), "{err}");
        assert!(Aspects::custom("x", vec![]).is_err());
        let two = Aspects::custom("x", vec![Aspect::new("a", "d"), Aspect::new("b", "e")]).unwrap();
        assert!(two
            .clone()
            .with_sampling(AspectSampling::Subset { min: 2, max: 3 })
            .is_err());
        assert!(two
            .with_sampling(AspectSampling::ModelPicks { max: 0 })
            .is_err());
    }

    #[test]
    fn sampling_modes_from_text_fit_the_set() {
        let set = |n: usize| {
            let aspects = (0..n).map(|i| Aspect::new(format!("a{i}"), "d")).collect();
            Aspects::custom("x", aspects).unwrap()
        };
        let mode = |n: usize, text: &str| set(n).with_sampling_mode(text).map(|s| s.sampling());
        assert_eq!(mode(5, "all").unwrap(), AspectSampling::All);
        assert_eq!(
            mode(5, "2").unwrap(),
            AspectSampling::Subset { min: 2, max: 2 }
        );
        assert_eq!(
            mode(5, " 1-3 ").unwrap(),
            AspectSampling::Subset { min: 1, max: 3 }
        );
        assert_eq!(
            mode(5, "model-picks").unwrap(),
            AspectSampling::ModelPicks { max: 3 }
        );
        assert_eq!(
            mode(2, "Model_Picks").unwrap(),
            AspectSampling::ModelPicks { max: 2 }
        );
        assert_eq!(
            mode(5, "model_picks:2").unwrap(),
            AspectSampling::ModelPicks { max: 2 }
        );
        // An explicit size is the user's: checked, not fitted.
        let err = mode(2, "model-picks:3").unwrap_err();
        assert!(
            err.to_string()
                .contains("model_picks max 3 must be in 1..=2"),
            "{err}"
        );
        assert!(mode(2, "3").is_err());
        assert!(mode(5, "some")
            .unwrap_err()
            .to_string()
            .contains("unknown aspect sampling"));
        assert!(mode(5, "1-x").is_err());
        assert!(mode(5, "model-picks:0").is_err());
    }

    #[test]
    fn json_file_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("mine.json");
        std::fs::write(&list, r#"[{"name":"wit","definition":"is funny"}]"#).unwrap();
        let set = Aspects::from_json_file(&list).unwrap();
        assert_eq!(set.name(), "mine");
        assert_eq!(set.sampling(), AspectSampling::Subset { min: 1, max: 1 });

        let obj = dir.path().join("obj.json");
        std::fs::write(
            &obj,
            r#"{"name":"o","aspects":[{"name":"a","definition":"x"},{"name":"b","definition":"y"}],
               "sampling":{"mode":"model_picks","max":1}}"#,
        )
        .unwrap();
        let set = Aspects::from_json_file(&obj).unwrap();
        assert_eq!(set.sampling(), AspectSampling::ModelPicks { max: 1 });
        let d = set.sample(&mut ChaCha8Rng::seed_from_u64(0));
        assert_eq!(d.model_picks, Some(1));
        assert_eq!(d.aspects.len(), 2);

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\n \"aspects\": [{\"name\": 1}]\n}").unwrap();
        let err = Aspects::from_json_file(&bad).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Parse, "{err}");
        assert!(err.to_string().contains("bad.json"), "{err}");
    }
}
