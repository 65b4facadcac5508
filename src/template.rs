//! Prompt templates: what the model is asked for each call, and how the second response is read
//! back out of its answer.
//!
//! [`DefaultTemplate`] follows the structure of the method: a task line with the direction, the
//! aspects with their definitions, the original request, the first response, and an instruction
//! to put only the new response between `<response>` and `</response>`. Its parser is lenient
//! about form (missing closing tag, no tags, a chatty first line) and strict about substance
//! (empty, a copy of the first response, or talk about the task are rejected and re-asked).

use std::fmt;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use aho_corasick::{AhoCorasick, AhoCorasickKind};

use crate::aspect::AspectDraw;
use crate::backend::{Message, Role};
use crate::error::UnusableReason;
use crate::label::{Grade, Label, LabelDraw};

/// What a template needs to write (and check) the second response of one example.
#[derive(Debug, Clone, Copy)]
pub struct SecondContext<'a> {
    /// The prompt conversation (ends with a user turn).
    pub prompt: &'a [Message],
    /// The first response, as accepted.
    pub first: &'a str,
    /// The drawn label (direction, grade).
    pub label: &'a LabelDraw,
    /// The drawn aspects.
    pub aspects: &'a AspectDraw,
    /// The drawn template variant, in `0..template.variants()`.
    pub variant: usize,
}

/// A second response read out of the model's raw text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedResponse {
    /// The response itself, trimmed.
    pub text: String,
    /// In "model picks" mode, the aspect names the model said it picked (only names that were
    /// offered); `None` when it did not say or the mode is not in use.
    pub picked_aspects: Option<Vec<String>>,
}

/// Renders the two requests of an example and parses the second answer.
pub trait PromptTemplate: Send + Sync + fmt::Debug {
    /// How many phrasing variants the template has; the generator draws one per example from
    /// the example's RNG when there is more than one. Defaults to 1.
    fn variants(&self) -> usize {
        1
    }

    /// The messages of the first-response request. Defaults to the prompt as it is: the first
    /// response is a natural sample of the model.
    fn first_request(&self, prompt: &[Message]) -> Vec<Message> {
        prompt.to_vec()
    }

    /// Checks the first response and returns the text to keep. Defaults to the trimmed text,
    /// rejecting an empty one.
    ///
    /// # Errors
    ///
    /// The reason the text cannot serve as a first response; the generator re-asks.
    fn accept_first(&self, raw: &str) -> Result<String, UnusableReason> {
        let text = raw.trim();
        if text.is_empty() {
            Err(UnusableReason::Empty)
        } else {
            Ok(text.to_string())
        }
    }

    /// The messages of the second-response request.
    fn second_request(&self, ctx: &SecondContext<'_>) -> Vec<Message>;

    /// Reads the second response out of the model's raw answer.
    ///
    /// # Errors
    ///
    /// The reason the answer holds no usable response; the generator re-asks, and never writes
    /// such an answer into the data.
    fn parse_second(
        &self,
        raw: &str,
        ctx: &SecondContext<'_>,
    ) -> Result<ParsedResponse, UnusableReason>;
}

macro_rules! forward_template {
    ($($ty:ty),*) => {$(
        impl<T: PromptTemplate + ?Sized> PromptTemplate for $ty {
            fn variants(&self) -> usize {
                (**self).variants()
            }
            fn first_request(&self, prompt: &[Message]) -> Vec<Message> {
                (**self).first_request(prompt)
            }
            fn accept_first(&self, raw: &str) -> Result<String, UnusableReason> {
                (**self).accept_first(raw)
            }
            fn second_request(&self, ctx: &SecondContext<'_>) -> Vec<Message> {
                (**self).second_request(ctx)
            }
            fn parse_second(
                &self,
                raw: &str,
                ctx: &SecondContext<'_>,
            ) -> Result<ParsedResponse, UnusableReason> {
                (**self).parse_second(raw, ctx)
            }
        }
    )*};
}

forward_template!(Arc<T>, Box<T>, &T);

/// The crate's template: the method's structure in our own wording, tuned to work even with
/// small models.
///
/// The second request is the prompt's own conversation, so that the model's natural next turn
/// is an answer to the user, preceded by a system message that holds the instructions: the
/// first response (as a *reference answer*), the direction (better or worse) and the drawn
/// aspects, and the rule to give only the answer between `<response>` and `</response>`. A
/// system message of the prompt's own is kept, first in that message. Small models asked to
/// "write a new answer" inside one long user message tended to talk about the task (or copy
/// the phrase into their answer) instead of answering; this layout keeps the request last.
///
/// Both responses must pass its [`ResponseChecks`] (by default: not repetitive, and the
/// second not nearly identical to the first); an answer that fails is re-asked.
#[derive(Debug, Clone, Default)]
pub struct DefaultTemplate {
    checks: ResponseChecks,
}

impl DefaultTemplate {
    /// The default template, with the default [`ResponseChecks`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the content checks applied to both responses.
    ///
    /// ```
    /// use rmboost::template::{DefaultTemplate, ResponseChecks};
    ///
    /// // Keep pairs that differ in only a few words (for example to study them).
    /// let template = DefaultTemplate::new()
    ///     .with_checks(ResponseChecks::default().max_similarity(None));
    /// assert_eq!(template.checks().similarity_limit(), None);
    /// ```
    #[must_use]
    pub fn with_checks(mut self, checks: ResponseChecks) -> Self {
        self.checks = checks;
        self
    }

    /// The content checks in use.
    #[must_use]
    pub fn checks(&self) -> &ResponseChecks {
        &self.checks
    }
}

impl PromptTemplate for DefaultTemplate {
    fn accept_first(&self, raw: &str) -> Result<String, UnusableReason> {
        let text = raw.trim();
        if text.is_empty() {
            return Err(UnusableReason::Empty);
        }
        self.checks.check_first(text)?;
        Ok(text.to_string())
    }

    fn second_request(&self, ctx: &SecondContext<'_>) -> Vec<Message> {
        let better = ctx.label.label == Label::Better;
        let degree = match ctx.label.grade {
            Some(Grade::Slightly) => "slightly ",
            Some(Grade::Much) => "much ",
            None => "",
        };
        let direction = if better { "better" } else { "worse" };
        // The prompt's own system message, if any, stays first; the conversation follows as is.
        let (own_system, conversation) = match ctx.prompt.split_first() {
            Some((m, rest)) if m.role == Role::System => (Some(m.content.as_str()), rest),
            _ => (None, ctx.prompt),
        };
        let mut u = String::with_capacity(1024 + ctx.first.len() + own_system.map_or(0, str::len));
        if let Some(own) = own_system {
            u.push_str(own);
            u.push_str("\n\n");
        }
        u.push_str(
            "You are answering the user's request that follows, for a dataset that teaches a \
             model to tell good answers from bad ones. Here is a reference answer to the same \
             request:\n<reference>\n",
        );
        u.push_str(ctx.first);
        u.push_str("\n</reference>\n\n");
        match ctx.aspects.model_picks {
            Some(k) => {
                let _ = writeln!(
                    u,
                    "Your answer must be {degree}{direction} than the reference answer. Choose at \
                     most {k} of these quality aspects and make the difference lie in them:"
                );
            }
            None => {
                let _ = writeln!(
                    u,
                    "Your answer must be {degree}{direction} than the reference answer in these \
                     quality aspects:"
                );
            }
        }
        for a in &ctx.aspects.aspects {
            let _ = writeln!(u, "- {}: {}", a.name, a.definition);
        }
        u.push('\n');
        if better {
            u.push_str(
                "Keep what the reference does well and fix its weaknesses in those aspects. \
                 Your answer must be complete and stand on its own.",
            );
        } else {
            u.push_str(
                "Make your answer clearly weaker in those aspects while it still reads as a \
                 sincere, fluent, on-topic answer: for example leave out something needed, get a \
                 detail wrong, or drift from the point, whichever fits the aspects. No gibberish, \
                 no repetition and no exaggeration.",
            );
        }
        u.push_str(
            " Use your own words rather than copying the reference, and never mention the \
             reference, these instructions, or that anything was changed. Reply to the user \
             directly. ",
        );
        if ctx.aspects.model_picks.is_some() {
            u.push_str(
                "First name the aspects you chose as <aspects>name, name</aspects>. Then give ",
            );
        } else {
            u.push_str("Give ");
        }
        u.push_str("your answer, and nothing else, between <response> and </response>.");
        let mut messages = Vec::with_capacity(conversation.len() + 1);
        messages.push(Message::system(u));
        messages.extend_from_slice(conversation);
        messages
    }

    fn parse_second(
        &self,
        raw: &str,
        ctx: &SecondContext<'_>,
    ) -> Result<ParsedResponse, UnusableReason> {
        let text = extract_response(raw);
        self.checks.check_second(text, ctx.first)?;
        let picked_aspects = ctx
            .aspects
            .model_picks
            .and_then(|k| parse_picked(raw, ctx.aspects, k));
        Ok(ParsedResponse {
            text: text.to_string(),
            picked_aspects,
        })
    }
}

/// Byte offsets of `needle` in `hay`, ignoring ASCII case. `needle` must start with a byte
/// that has no case (all our tags start with `<`), which lets the scan jump between candidates.
fn find_all_ci(hay: &str, needle: &str) -> Vec<usize> {
    let h = hay.as_bytes();
    let n = needle.as_bytes();
    debug_assert!(!n.is_empty() && !n[0].is_ascii_alphabetic());
    memchr::memchr_iter(n[0], h)
        .filter(|&at| h.len() - at >= n.len() && h[at..at + n.len()].eq_ignore_ascii_case(n))
        .collect()
}

const OPEN: &str = "<response>";
const CLOSE: &str = "</response>";

/// Takes the answer out of the model's raw text: the content of the `<response>` tags (the
/// longest if there are several, tolerating a missing closing tag), else the text before a
/// lone closing tag, else the whole text less a chatty first line. Returns a trimmed slice.
#[must_use]
pub fn extract_response(raw: &str) -> &str {
    let opens = find_all_ci(raw, OPEN);
    let closes = find_all_ci(raw, CLOSE);
    if !opens.is_empty() {
        let mut best = "";
        for &o in &opens {
            let start = o + OPEN.len();
            let end = closes
                .iter()
                .copied()
                .find(|&c| c >= start)
                .unwrap_or(raw.len());
            let candidate = raw[start..end].trim();
            // "... between <response> and </response>" echoed from the instructions.
            if candidate.eq_ignore_ascii_case("and") {
                continue;
            }
            if candidate.len() > best.len() {
                best = candidate;
            }
        }
        return best;
    }
    let body = match closes.first() {
        Some(&c) => &raw[..c],
        None => raw,
    };
    strip_preamble(body.trim())
}

/// Drops a first line such as "Here is a better answer:" and quotes around the whole text.
fn strip_preamble(text: &str) -> &str {
    let mut text = text;
    if let Some((first, rest)) = text.split_once('\n') {
        let f = first.trim().to_ascii_lowercase();
        let chatty = f.len() < 120
            && f.ends_with(':')
            && ["answer", "response", "version", "here", "new"]
                .iter()
                .any(|w| f.contains(w));
        if chatty {
            text = rest.trim();
        }
    }
    for (open, close) in [('"', '"'), ('\u{201c}', '\u{201d}')] {
        if text.len() > 2 && text.starts_with(open) && text.ends_with(close) {
            let inner = &text[open.len_utf8()..text.len() - close.len_utf8()];
            if !inner.contains(open) && !inner.contains(close) {
                text = inner.trim();
            }
        }
    }
    text
}

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

/// Words at least one of which every [`META`] phrase without a `<` contains.
const META_KEYS: [&str; 10] = [
    "answer",
    "response",
    "version",
    "aspects",
    "instructions",
    "write only",
    "request",
    "reference",
    "your task",
    "this text",
];

/// Whether two texts are equal up to white space and letter case (no allocation).
pub(crate) fn same_text(a: &str, b: &str) -> bool {
    let mut wa = a.split_whitespace();
    let mut wb = b.split_whitespace();
    loop {
        match (wa.next(), wb.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) => {
                if x != y
                    && !x
                        .chars()
                        .flat_map(char::to_lowercase)
                        .eq(y.chars().flat_map(char::to_lowercase))
                {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// The first meta-talk phrase in `text`, ignoring ASCII case.
///
/// The text is lowered into a per-thread buffer; SIMD substring scans for the [`META_KEYS`]
/// words (and `<`) rule out most prose before the automaton runs.
fn find_meta(text: &str) -> Option<&'static str> {
    static PHRASES: OnceLock<AhoCorasick> = OnceLock::new();
    static KEYS: OnceLock<Keys> = OnceLock::new();
    thread_local! {
        static LOWER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// One SIMD multi-substring scan where the CPU has one, else a scan per key.
    enum Keys {
        Packed(aho_corasick::packed::Searcher),
        Each(Vec<memchr::memmem::Finder<'static>>),
    }
    let keys = KEYS.get_or_init(|| {
        aho_corasick::packed::Searcher::new(META_KEYS.iter()).map_or_else(
            || Keys::Each(META_KEYS.iter().map(memchr::memmem::Finder::new).collect()),
            Keys::Packed,
        )
    });
    LOWER.with(|buf| {
        let mut buf = buf.borrow_mut();
        crate::similarity::ascii_lowercase_into(text, &mut buf);
        let candidate = memchr::memchr(b'<', &buf).is_some()
            || match keys {
                Keys::Packed(s) => s.find(&buf[..]).is_some(),
                Keys::Each(finders) => finders.iter().any(|k| k.find(&buf).is_some()),
            };
        let found = if candidate {
            let phrases = PHRASES.get_or_init(|| {
                // A full DFA without prefilter: the phrases start with common English
                // trigrams, so a prefilter mostly finds false candidates in ordinary prose.
                AhoCorasick::builder()
                    .kind(Some(AhoCorasickKind::DFA))
                    .prefilter(false)
                    .build(META)
                    .expect("the meta-talk phrases are valid patterns")
            });
            phrases.find(&buf[..]).map(|m| META[m.pattern().as_usize()])
        } else {
            None
        };
        if buf.capacity() > 1 << 20 {
            *buf = Vec::new();
        }
        found
    })
}

/// Content checks on responses, beyond their form: what makes an answer that parses still
/// useless as half of a preference pair.
///
/// - **Near-identical pair**: the second response's token Jaccard similarity with the first
///   (the measure of [`report::token_jaccard`](crate::report::token_jaccard), so the report's
///   "near-identical" count agrees) is at or above [`max_similarity`](Self::max_similarity);
///   default 0.9. Small models asked for a slightly different answer often copy the first one
///   with a word changed: the label of such a pair is noise. The check estimates the
///   similarity with bitmaps (it runs for every example and must stay within microseconds),
///   within about 0.01 of the report's exact figure for answers of ordinary length.
/// - **Repetition**: a response of at least 20 tokens of which fewer than
///   [`min_distinct_trigrams`](Self::min_distinct_trigrams) of the word trigrams are distinct;
///   default 0.5. Natural prose is close to 1.0; a model stuck in a loop is far below.
///
/// The form checks (empty, the same text as the first, talk about the task) always apply to
/// the second response. [`DefaultTemplate`] applies these checks; a custom template can call
/// [`check_first`](Self::check_first) and [`check_second`](Self::check_second).
///
/// ```
/// use rmboost::template::ResponseChecks;
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
            max_similarity: Some(crate::report::NEAR_IDENTICAL_JACCARD),
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

    /// Rejects a second response whose token Jaccard similarity with the first is at least
    /// `limit`; `None` turns the check off. Default 0.9. A limit above 1 never rejects.
    #[must_use]
    pub fn max_similarity(mut self, limit: Option<f64>) -> Self {
        self.max_similarity = limit;
        self
    }

    /// Rejects a response of at least 20 tokens whose share of distinct word trigrams is below
    /// `share`; `None` turns the check off. Default 0.5.
    #[must_use]
    pub fn min_distinct_trigrams(mut self, share: Option<f64>) -> Self {
        self.min_distinct_trigrams = share;
        self
    }

    /// The similarity limit in use.
    #[must_use]
    pub fn similarity_limit(&self) -> Option<f64> {
        self.max_similarity
    }

    /// The distinct-trigram share limit in use.
    #[must_use]
    pub fn trigram_limit(&self) -> Option<f64> {
        self.min_distinct_trigrams
    }

    /// Checks a first response (already trimmed and not empty): rejects repetition.
    ///
    /// # Errors
    ///
    /// [`UnusableReason::Repetitive`].
    pub fn check_first(&self, text: &str) -> Result<(), UnusableReason> {
        let Some(min) = self.min_distinct_trigrams else {
            return Ok(());
        };
        let stats = crate::similarity::text_stats(text, None, None, Some(min));
        match stats.distinct_trigrams {
            Some(share) if share < min => Err(UnusableReason::Repetitive),
            _ => Ok(()),
        }
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
        if self.max_similarity.is_none() && self.min_distinct_trigrams.is_none() {
            return Ok(());
        }
        let reference = self.max_similarity.map(|_| first);
        let stats = crate::similarity::text_stats(
            text,
            reference,
            self.max_similarity,
            self.min_distinct_trigrams,
        );
        if let (Some(limit), Some(j)) = (self.max_similarity, stats.jaccard) {
            if j >= limit {
                return Err(UnusableReason::NearIdentical);
            }
        }
        if let (Some(min), Some(share)) = (self.min_distinct_trigrams, stats.distinct_trigrams) {
            if share < min {
                return Err(UnusableReason::Repetitive);
            }
        }
        Ok(())
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

fn parse_picked(raw: &str, draw: &AspectDraw, k: usize) -> Option<Vec<String>> {
    let open = *find_all_ci(raw, "<aspects>").first()?;
    let start = open + "<aspects>".len();
    let end = find_all_ci(&raw[start..], "</aspects>")
        .first()
        .map_or(raw.len(), |e| start + e);
    let mut picked: Vec<String> = Vec::new();
    for part in raw[start..end].split([',', ';', '\n']) {
        let part = part.trim().trim_start_matches('-').trim();
        if let Some(a) = draw
            .aspects
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(part))
        {
            if !picked.contains(&a.name) && picked.len() < k {
                picked.push(a.name.clone());
            }
        }
    }
    (!picked.is_empty()).then_some(picked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aspect::Aspect;

    fn ctx_parts(model_picks: Option<usize>) -> (Vec<Message>, LabelDraw, AspectDraw) {
        (
            vec![Message::user("What is the capital of France?")],
            LabelDraw::plain(Label::Worse),
            AspectDraw {
                aspects: vec![
                    Aspect::new("correctness", "facts are right"),
                    Aspect::new("clarity", "easy to follow"),
                ],
                model_picks,
            },
        )
    }

    #[test]
    fn extraction_cases() {
        assert_eq!(extract_response("<response>Paris.</response>"), "Paris.");
        assert_eq!(
            extract_response("Thinking...\n<RESPONSE>\n Lyon is it.\n"),
            "Lyon is it."
        );
        assert_eq!(
            extract_response(
                "I will put it in <response> and </response>.\n<response>Marseille</response>"
            ),
            "Marseille"
        );
        assert_eq!(
            extract_response("Paris, of course.</response>"),
            "Paris, of course."
        );
        assert_eq!(
            extract_response("Here is the new answer:\nThe capital is Paris."),
            "The capital is Paris."
        );
        assert_eq!(extract_response("\"Quoted answer.\""), "Quoted answer.");
        assert_eq!(extract_response("<response></response>"), "");
        // An echo of the instruction is not an answer.
        assert_eq!(
            extract_response("I write it between <response> and </response>."),
            ""
        );
    }

    #[test]
    fn meta_keys_cover_every_phrase() {
        for p in META {
            assert!(
                p.contains('<') || META_KEYS.iter().any(|k| p.contains(k)),
                "{p}"
            );
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
        // The template's first-response check.
        let t = DefaultTemplate::new();
        assert_eq!(t.accept_first(&looped), Err(UnusableReason::Repetitive));
        assert_eq!(
            t.accept_first(&format!("  {first} ")),
            Ok(first.to_string())
        );
        let t = DefaultTemplate::new().with_checks(ResponseChecks::none());
        assert!(t.accept_first(&looped).is_ok());
    }

    #[test]
    fn renders_structure() {
        let (prompt, label, aspects) = ctx_parts(None);
        let ctx = SecondContext {
            prompt: &prompt,
            first: "Paris.",
            label: &label,
            aspects: &aspects,
            variant: 0,
        };
        let msgs = DefaultTemplate::new().second_request(&ctx);
        // The instructions, then the prompt's conversation as it is: the request comes last.
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].role, Role::System);
        assert_eq!(msgs[1], prompt[0]);
        let u = &msgs[0].content;
        assert!(u.contains("must be worse than the reference answer in these quality aspects"));
        assert!(u.contains("- correctness: facts are right"));
        assert!(u.contains("<reference>\nParis.\n</reference>"));
        assert!(u.contains("<response> and </response>"));
        assert!(!u.contains("<aspects>"));
        assert!(!u.to_ascii_lowercase().contains("new answer"));

        // A conversation with its own system message keeps it, first, in one system message.
        let convo = vec![
            Message::system("You are a pirate."),
            Message::user("Hi"),
            Message::assistant("Arr."),
            Message::user("Where is the treasure?"),
        ];
        let ctx = SecondContext {
            prompt: &convo,
            ..ctx
        };
        let msgs = DefaultTemplate::new().second_request(&ctx);
        assert_eq!(msgs.len(), 4);
        assert_eq!(msgs[0].role, Role::System);
        assert!(msgs[0].content.starts_with("You are a pirate.\n\n"));
        assert!(msgs[0]
            .content
            .contains("<reference>\nParis.\n</reference>"));
        assert_eq!(&msgs[1..], &convo[1..]);
    }

    #[test]
    fn model_picks() {
        let (prompt, label, aspects) = ctx_parts(Some(1));
        let ctx = SecondContext {
            prompt: &prompt,
            first: "Paris.",
            label: &label,
            aspects: &aspects,
            variant: 0,
        };
        let t = DefaultTemplate::new();
        assert!(t.second_request(&ctx)[0].content.contains("<aspects>"));
        let p = t
            .parse_second(
                "<aspects>Clarity, correctness</aspects><response>Lyon.</response>",
                &ctx,
            )
            .unwrap();
        assert_eq!(p.text, "Lyon.");
        assert_eq!(p.picked_aspects, Some(vec!["clarity".to_string()]));
        let p = t.parse_second("<response>Lyon.</response>", &ctx).unwrap();
        assert_eq!(p.picked_aspects, None);
    }
}
