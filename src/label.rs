//! Preference labels and the samplers that draw them.
//!
//! RMBoost picks the label *before* the second response exists: should it be better or worse
//! than the first? [`Bernoulli`] draws better with probability `p` (0.5 by default, which keeps
//! the dataset balanced); [`Graded`] also draws how much (slightly or much), which fills the
//! `margin` column TRL's reward trainer reads.

use std::fmt;

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use crate::Error;

crate::error::named_enum! {
/// Whether the second response must be better or worse than the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    /// The second response is better: chosen = second, rejected = first.
    Better = "better",
    /// The second response is worse: chosen = first, rejected = second.
    Worse = "worse",
}
}

crate::error::named_enum! {
/// How much better or worse, for graded labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grade {
    /// A small but clear difference.
    Slightly = "slightly",
    /// A large difference.
    Much = "much",
}
}

/// One drawn label: the direction, optionally a grade, and the margin to write.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LabelDraw {
    /// Better or worse.
    pub label: Label,
    /// Slightly or much, for graded samplers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grade: Option<Grade>,
    /// The value of the output's `margin` column (TRL: how strongly chosen beats rejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
}

impl LabelDraw {
    /// An ungraded label with no margin.
    #[must_use]
    pub fn plain(label: Label) -> Self {
        LabelDraw {
            label,
            grade: None,
            margin: None,
        }
    }
}

/// Draws the preference label of one example.
///
/// Must use only the RNG it is handed, so the draw is a function of the run seed and the
/// example id.
pub trait LabelSampler: Send + Sync + fmt::Debug {
    /// Draws one label.
    fn sample(&self, rng: &mut dyn RngCore) -> LabelDraw;
}

crate::aspect::forward_impls!(LabelSampler {
    fn sample(&self, rng: &mut dyn RngCore) -> LabelDraw;
});

fn check_probability(what: &str, p: f64) -> Result<(), Error> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{what} must be a probability in [0, 1], got {p}"
        )))
    }
}

/// Better with probability `p`, worse otherwise. The default, with `p = 0.5`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bernoulli {
    p_better: f64,
}

impl Bernoulli {
    /// Better with probability `p_better`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if `p_better` is not in `[0, 1]` (NaN included).
    pub fn new(p_better: f64) -> Result<Self, Error> {
        check_probability("p_better", p_better)?;
        Ok(Bernoulli { p_better })
    }

    /// The probability of drawing better.
    #[must_use]
    pub fn p_better(&self) -> f64 {
        self.p_better
    }
}

impl Default for Bernoulli {
    fn default() -> Self {
        Bernoulli { p_better: 0.5 }
    }
}

impl LabelSampler for Bernoulli {
    fn sample(&self, rng: &mut dyn RngCore) -> LabelDraw {
        LabelDraw::plain(if rng.random_bool(self.p_better) {
            Label::Better
        } else {
            Label::Worse
        })
    }
}

/// Better with probability `p_better`, then "much" with probability `p_much`, else "slightly".
///
/// The margin written is 1.0 for "slightly" and 3.0 for "much" unless set with
/// [`Graded::margins`]; the default is `p_better = p_much = 0.5`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Graded {
    direction: Bernoulli,
    p_much: f64,
    /// The margins written for "slightly" and "much".
    margins: (f64, f64),
}

impl Graded {
    /// Graded labels with these probabilities and margins 1.0 (slightly) and 3.0 (much).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if a probability is not in `[0, 1]`.
    pub fn new(p_better: f64, p_much: f64) -> Result<Self, Error> {
        let direction = Bernoulli::new(p_better)?;
        check_probability("p_much", p_much)?;
        Ok(Graded {
            direction,
            p_much,
            margins: (1.0, 3.0),
        })
    }

    /// Sets the margins written for "slightly" and "much".
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if a margin is not finite and positive, or `slightly > much`.
    pub fn margins(mut self, slightly: f64, much: f64) -> Result<Self, Error> {
        if !(slightly.is_finite() && much.is_finite() && slightly > 0.0 && slightly <= much) {
            return Err(Error::config(format!(
                "graded margins must be finite, positive and slightly <= much, got {slightly} and {much}"
            )));
        }
        self.margins = (slightly, much);
        Ok(self)
    }
}

impl Default for Graded {
    fn default() -> Self {
        Graded::new(0.5, 0.5).expect("0.5 is a probability")
    }
}

impl LabelSampler for Graded {
    fn sample(&self, rng: &mut dyn RngCore) -> LabelDraw {
        let label = self.direction.sample(rng).label;
        let (grade, margin) = if rng.random_bool(self.p_much) {
            (Grade::Much, self.margins.1)
        } else {
            (Grade::Slightly, self.margins.0)
        };
        LabelDraw {
            label,
            grade: Some(grade),
            margin: Some(margin),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn bernoulli_rejects_bad_p() {
        assert!(Bernoulli::new(1.5).is_err());
        assert!(Bernoulli::new(f64::NAN).is_err());
        assert!(Bernoulli::new(0.0).is_ok());
    }

    #[test]
    fn extremes() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let always = Bernoulli::new(1.0).unwrap();
        let never = Bernoulli::new(0.0).unwrap();
        for _ in 0..100 {
            assert_eq!(always.sample(&mut rng).label, Label::Better);
            assert_eq!(never.sample(&mut rng).label, Label::Worse);
        }
    }

    #[test]
    fn graded_fills_margin() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let g = Graded::new(0.5, 0.5).unwrap().margins(0.5, 2.0).unwrap();
        let mut seen = (false, false);
        for _ in 0..200 {
            let d = g.sample(&mut rng);
            match d.grade.unwrap() {
                Grade::Slightly => {
                    assert_eq!(d.margin, Some(0.5));
                    seen.0 = true;
                }
                Grade::Much => {
                    assert_eq!(d.margin, Some(2.0));
                    seen.1 = true;
                }
            }
        }
        assert_eq!(seen, (true, true));
        assert!(Graded::default().margins(2.0, 1.0).is_err());
    }
}
