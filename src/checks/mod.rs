//! Response checks: what makes an answer that parses still useless as half of a preference
//! pair (empty, talk about the task, a copy or near copy of the other response, a loop), and
//! the one similarity measure ([`token_jaccard`]) that both these checks and the dataset
//! [report](crate::report) use, so that they never disagree on a pair.
//!
//! By default a second response whose token Jaccard similarity with the first is
//! [`NEAR_IDENTICAL_JACCARD`] (0.9) or more is near-identical, and a response of 20 tokens or
//! more with fewer than half of its word trigrams distinct is repetitive; both limits can be
//! changed or turned off in [`ResponseChecks`]. The near-identical check is exact (it is
//! [`token_jaccard`]); the repetition check estimates the trigram share to within about 0.01
//! (with bitmaps). The checks cost microseconds per response and, after the first call on a
//! thread, allocate nothing for texts of a size seen before.
//!
//! Design notes and measurements: see ARCHITECTURE.md in the repository.

pub(crate) mod similarity;

use std::sync::LazyLock;

use aho_corasick::AhoCorasick;

use crate::error::UnusableReason;

/// The token Jaccard similarity at or above which a pair counts as near-identical: the default
/// of [`ResponseChecks::max_similarity`] and the report's threshold.
pub const NEAR_IDENTICAL_JACCARD: f64 = 0.9;

pub use similarity::token_jaccard;

/// Phrases that show the model talked about the task instead of answering it.
const META: &[&str] = &[
    "existing answer",
    "<existing_answer>",
    "</existing_answer>",
    "<request>",
    "original answer",
    "original response",
    "given response",
    "given answer",
    "worse answer",
    "worse response",
    "worse version",
    "better answer:",
    "better response:",
    "better version",
    "improved answer",
    "improved response",
    "improved version",
    "quality aspects",
    "these instructions",
    // Seen from small models that copy or discuss the instructions.
    "new answer",
    "write only",
    "user's request",
    "provided response",
    "existing response",
    "[response]",
    // The default template's own terms, and more echoes seen from small models.
    "reference answer",
    "<reference>",
    "</reference>",
    "<new_answer",
    "new response",
    "previous response",
    "two responses",
    "the reference",
    "your task",
    "your request again",
    "provide your request",
    "improve this text",
    "already provided the answer",
];

/// Whether two texts are equal up to white space and letter case (no allocation): their
/// words, lowercased, each followed by one space (no lowercase letter is white space).
pub(crate) fn same_text(a: &str, b: &str) -> bool {
    fn words(s: &str) -> impl Iterator<Item = char> + '_ {
        s.split_whitespace()
            .flat_map(|w| w.chars().chain([' ']))
            .flat_map(char::to_lowercase)
    }
    words(a).eq(words(b))
}

/// Accepts a non-empty response that differs from each of `others` (after normalising white
/// space and case).
pub(crate) fn accept_distinct(raw: &str, others: &[&str]) -> Result<String, UnusableReason> {
    let text = raw.trim();
    if text.is_empty() {
        return Err(UnusableReason::Empty);
    }
    if others.iter().any(|o| same_text(text, o)) {
        return Err(UnusableReason::SameAsFirst);
    }
    Ok(text.to_string())
}

/// The first meta-talk phrase in `text`, ignoring ASCII case.
pub(crate) fn find_meta(text: &str) -> Option<&'static str> {
    static PHRASES: LazyLock<AhoCorasick> = LazyLock::new(|| {
        AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(META)
            .expect("the meta-talk phrases are valid patterns")
    });
    PHRASES.find(text).map(|m| META[m.pattern().as_usize()])
}

/// Byte offsets of `needle` in `hay`, ignoring ASCII case. `needle` must start with a byte
/// that has no case (all our tags start with `<`), which lets the scan jump between candidates.
pub(crate) fn find_all_ci(hay: &str, needle: &str) -> Vec<usize> {
    let h = hay.as_bytes();
    let n = needle.as_bytes();
    debug_assert!(!n.is_empty() && !n[0].is_ascii_alphabetic());
    memchr::memchr_iter(n[0], h)
        .filter(|&at| h.len() - at >= n.len() && h[at..at + n.len()].eq_ignore_ascii_case(n))
        .collect()
}

/// The content of a `<tag>` in `raw` (the last one if `last`, else the first) up to its
/// closing tag, or to the end if there is none; tags are matched ignoring ASCII case.
pub(crate) fn tag_content<'a>(raw: &'a str, tag: &str, last: bool) -> Option<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let opens = find_all_ci(raw, &open);
    let start = if last { opens.last() } else { opens.first() }? + open.len();
    let end = find_all_ci(&raw[start..], &close)
        .first()
        .map_or(raw.len(), |e| start + e);
    Some(&raw[start..end])
}

/// Content checks on responses, beyond their form: what makes an answer that parses still
/// useless as half of a preference pair.
///
/// - **Near-identical pair**: the second response's token Jaccard similarity with the first
///   ([`token_jaccard`], the measure the report counts near-identical pairs with, so the two
///   agree on every pair) is at or above [`max_similarity`](Self::max_similarity);
///   default 0.9. Small models asked for a slightly different answer often copy the first one
///   with a word changed: the label of such a pair is noise.
/// - **Repetition**: a response of at least 20 tokens of which fewer than
///   [`min_distinct_trigrams`](Self::min_distinct_trigrams) of the word trigrams are distinct;
///   default 0.5. Natural prose is close to 1.0; a model stuck in a loop is far below.
///
/// The form checks (empty, the same text as the first, talk about the task) always apply to
/// the second response. [`DefaultTemplate`](crate::DefaultTemplate) applies these checks; a custom template can call
/// [`check_first`](Self::check_first) and [`check_second`](Self::check_second).
///
/// ```
/// use rmboost::checks::ResponseChecks;
/// use rmboost::UnusableReason;
///
/// let checks = ResponseChecks::default();
/// let first = "Paris is the capital of France and its largest city, home to the Louvre, \
///              the Eiffel Tower and about two million people within the city limits.";
/// // One word of 21 changed: a token Jaccard similarity of 20/22.
/// let copy = first.replace("largest", "biggest");
/// assert_eq!(checks.check_second(&copy, first), Err(UnusableReason::NearIdentical));
/// assert!(checks.check_second("Lyon is the capital of France.", first).is_ok());
/// let looped = "I can help you with that. ".repeat(10);
/// assert_eq!(checks.check_first(&looped), Err(UnusableReason::Repetitive));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResponseChecks {
    max_similarity: Option<f64>,
    min_distinct_trigrams: Option<f64>,
}

impl Default for ResponseChecks {
    fn default() -> Self {
        ResponseChecks {
            max_similarity: Some(NEAR_IDENTICAL_JACCARD),
            min_distinct_trigrams: Some(0.5),
        }
    }
}

impl ResponseChecks {
    /// Only the form checks: no similarity or repetition limit.
    #[must_use]
    pub fn none() -> Self {
        ResponseChecks {
            max_similarity: None,
            min_distinct_trigrams: None,
        }
    }

    setters! {
        /// Rejects a second response whose token Jaccard similarity with the first is at least
        /// `limit`; `None` turns the check off. Default 0.9. A limit above 1 never rejects.
        #[must_use]
        max_similarity(limit: Option<f64>) => max_similarity = limit;
        /// Rejects a response of at least 20 tokens whose share of distinct word trigrams is
        /// below `share`; `None` turns the check off. Default 0.5.
        #[must_use]
        min_distinct_trigrams(share: Option<f64>) => min_distinct_trigrams = share;
    }

    /// The similarity limit in use.
    #[must_use]
    pub fn similarity_limit(&self) -> Option<f64> {
        self.max_similarity
    }

    /// Checks a first response (already trimmed and not empty): rejects repetition.
    ///
    /// # Errors
    ///
    /// [`UnusableReason::Repetitive`].
    pub fn check_first(&self, text: &str) -> Result<(), UnusableReason> {
        self.check_content(text, "", None)
    }

    /// Checks a second response against the first: empty, meta-talk, the same text,
    /// near-identical, repetitive (in that order).
    ///
    /// # Errors
    ///
    /// The first reason that applies.
    pub fn check_second(&self, text: &str, first: &str) -> Result<(), UnusableReason> {
        if text.trim().is_empty() {
            return Err(UnusableReason::Empty);
        }
        if let Some(phrase) = find_meta(text) {
            return Err(UnusableReason::MetaTalk(format!("contains {phrase:?}")));
        }
        if same_text(text, first) {
            return Err(UnusableReason::SameAsFirst);
        }
        self.check_content(text, first, self.max_similarity)
    }

    /// Rejects a `text` whose similarity with `reference` reaches `limit`, then one whose
    /// distinct-trigram share is below the limit: one pass over the text for both (the
    /// similarity is exact; see `similarity`).
    fn check_content(
        &self,
        text: &str,
        reference: &str,
        limit: Option<f64>,
    ) -> Result<(), UnusableReason> {
        let min_share = self.min_distinct_trigrams;
        if limit.is_none() && min_share.is_none() {
            return Ok(());
        }
        match similarity::pair_stats(text, reference, limit, min_share) {
            (true, _) => Err(UnusableReason::NearIdentical),
            (_, Some(share)) if min_share.is_some_and(|min| share < min) => {
                Err(UnusableReason::Repetitive)
            }
            _ => Ok(()),
        }
    }
}

/// Rejects empty text, meta-talk, a copy of the first response, a near-identical one and a
/// repetitive one: [`ResponseChecks::check_second`] with the default checks.
///
/// # Errors
///
/// The reason the text is unusable.
pub fn check_response(text: &str, first: &str) -> Result<(), UnusableReason> {
    ResponseChecks::default().check_second(text, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct() {
        assert_eq!(accept_distinct(" ", &[]), Err(UnusableReason::Empty));
        assert_eq!(
            accept_distinct("Hello  World", &["hello world"]),
            Err(UnusableReason::SameAsFirst)
        );
        assert_eq!(accept_distinct(" hi ", &["ho"]).unwrap(), "hi");
    }

    #[test]
    fn every_phrase_is_found() {
        for p in META {
            assert_eq!(*p, p.to_ascii_lowercase(), "phrases are lowercase");
            assert_eq!(
                find_meta(&format!("Fine. {} X", p.to_uppercase())),
                Some(*p)
            );
        }
        assert_eq!(find_meta("A plain answer about rivers."), None);
    }

    #[test]
    fn checks() {
        assert_eq!(check_response("  ", "x"), Err(UnusableReason::Empty));
        assert_eq!(
            check_response("Paris  is the capital.", "paris is the CAPITAL."),
            Err(UnusableReason::SameAsFirst)
        );
        assert!(matches!(
            check_response("Here is a worse version of the answer", "x"),
            Err(UnusableReason::MetaTalk(_))
        ));
        assert!(check_response("Lyon is the capital.", "Paris is the capital.").is_ok());
        assert!(matches!(
            check_response("As the reference answer says, Paris.", "x"),
            Err(UnusableReason::MetaTalk(_))
        ));
    }

    #[test]
    fn content_checks() {
        let first = "Honeybees collect nectar from flowers, carry it to the hive in a special \
                     stomach, pass it between workers who add enzymes, and store it in wax \
                     cells, where fanning wings evaporate the water until it turns thick.";
        // One word changed: near-identical.
        let copy = first.replace("thick", "sticky");
        assert_eq!(
            check_response(&copy, first),
            Err(UnusableReason::NearIdentical)
        );
        // Allowed when the limit is off.
        let lenient = ResponseChecks::default().max_similarity(None);
        assert_eq!(lenient.check_second(&copy, first), Ok(()));
        // A real rewrite passes.
        let rewrite = "Bees make honey from nectar: they swallow it, bring it home, and let \
                       it dry in the comb until most of its water is gone.";
        assert_eq!(check_response(rewrite, first), Ok(()));
        // A loop is rejected, first or second.
        let looped = "I'm not able to assist you. ".repeat(8);
        assert_eq!(
            check_response(&looped, first),
            Err(UnusableReason::Repetitive)
        );
        assert_eq!(
            ResponseChecks::default().check_first(&looped),
            Err(UnusableReason::Repetitive)
        );
        assert_eq!(ResponseChecks::none().check_first(&looped), Ok(()));
        assert_eq!(ResponseChecks::none().check_second(&looped, first), Ok(()));
        // Short answers are not judged for repetition.
        assert_eq!(check_response("Yes. Yes. Yes.", first), Ok(()));
    }
}
