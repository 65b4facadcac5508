//! The LLM judge shared by [`Rlaif`](crate::Rlaif), [`WestOfN`](crate::WestOfN) and the
//! report's judge check: pairwise verdicts and pointwise 1–10 scores, with lenient parsers.

use std::borrow::Cow;
use std::fmt;
use std::fmt::Write as _;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::aspect::{Aspect, AspectSampling, Aspects};
use crate::backend::{CompletionRequest, LlmBackend, Message, SamplingParams, Usage};
use crate::checks::tag_content;
use crate::engine::{ask, render_aspects, Answer};
use crate::error::{Error, UnusableReason};

/// The default judging criteria: every aspect of [`Aspects::general`].
pub(crate) fn default_criteria() -> Aspects {
    Aspects::general()
        .with_sampling(AspectSampling::All)
        .expect("`all` is valid for any set")
}

/// What a [`Scorer`] is asked to score: one response to one prompt.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ScoreRequest<'a> {
    /// The example's id (for errors).
    pub id: &'a str,
    /// The prompt conversation.
    pub prompt: &'a [Message],
    /// The response to score.
    pub response: &'a str,
    /// Which sample it is (0-based, in generation order).
    pub index: usize,
    /// The criteria drawn for the example.
    pub criteria: &'a [Aspect],
    /// A backend seed drawn for this scoring (re-ask `n` should use `seed + n`).
    pub seed: u64,
}

/// A score and what it cost.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scored {
    /// Higher is better. Must be finite.
    pub score: f64,
    /// Backend calls made to get it (0 for a scorer that calls no model).
    pub calls: u32,
    /// Of those, answers rejected and asked again.
    pub reasks: u32,
    /// Tokens used.
    pub usage: Usage,
    /// The model that scored, if any.
    pub model: String,
}

impl Scored {
    /// A score that cost no backend call (a local reward model, a heuristic).
    #[must_use]
    pub fn new(score: f64) -> Self {
        Scored {
            score,
            ..Scored::default()
        }
    }
}

/// Scores one response pointwise: an LLM judge ([`Judge`], the default), a reward model, or
/// any function of the text.
///
/// Object safe; `Arc<dyn Scorer>`, `Box<dyn Scorer>` and `&S` implement it by forwarding.
///
/// ```
/// use rmboost::judge::{ScoreRequest, Scored, Scorer};
/// use rmboost::{async_trait, Error};
///
/// /// Prefers shorter answers (a toy).
/// #[derive(Debug)]
/// struct Brevity;
///
/// #[async_trait]
/// impl Scorer for Brevity {
///     async fn score(&self, request: ScoreRequest<'_>) -> Result<Scored, Error> {
///         Ok(Scored::new(-(request.response.len() as f64)))
///     }
/// }
/// ```
#[async_trait]
pub trait Scorer: Send + Sync + fmt::Debug {
    /// Scores one response.
    ///
    /// # Errors
    ///
    /// An [`Error`] carrying the request's id: [`ErrorKind::Backend`](crate::ErrorKind::Backend) if a model call failed,
    /// [`ErrorKind::Unusable`](crate::ErrorKind::Unusable) if no score could be read. The example fails with it.
    async fn score(&self, request: ScoreRequest<'_>) -> Result<Scored, Error>;

    /// A short name for metadata (`"llm-judge"`, `"reward-model"`, ...). Defaults to
    /// `"custom"`.
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed("custom")
    }
}

macro_rules! forward_scorer {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<S: Scorer + ?Sized> Scorer for $ty {
            async fn score(&self, request: ScoreRequest<'_>) -> Result<Scored, Error> {
                (**self).score(request).await
            }
            fn name(&self) -> Cow<'_, str> {
                (**self).name()
            }
        }
    )*};
}

forward_scorer!(Arc<S>, Box<S>, &S);

crate::error::named_enum! {
/// A pairwise judgement: which of the two answers shown is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Verdict {
    /// The answer shown first ("A").
    A = "A",
    /// The answer shown second ("B").
    B = "B",
    /// Neither is better.
    #[serde(rename = "tie")]
    Tie = "tie",
}
}

/// An LLM used as a judge: compares two answers ([`Verdict`]) or scores one from 1 to 10.
///
/// Cheap to clone. An answer with no readable verdict or score is asked again (next seed) up
/// to [`max_reasks`](Self::max_reasks) times. `Judge` also implements [`Scorer`], so it is the
/// default scorer of [`WestOfN`](crate::WestOfN).
///
/// ```
/// use rmboost::judge::Judge;
/// use rmboost::testing::FakeBackend;
/// use rmboost::{Aspects, Message};
///
/// let judge = Judge::new(FakeBackend::new());
/// let prompt = [Message::user("Name a prime.")];
/// let req = judge.compare_request(&prompt, "7", "8", Aspects::general().aspects());
/// let text = &req.messages.last().unwrap().content;
/// assert!(text.find("<answer_a>\n7").unwrap() < text.find("<answer_b>\n8").unwrap());
/// ```
#[derive(Clone, Debug)]
pub struct Judge {
    backend: Arc<dyn LlmBackend>,
    params: SamplingParams,
    max_reasks: u32,
}

/// The lowest temperature of a judge's re-ask (see [`Judge::max_reasks`]).
pub const REASK_TEMPERATURE: f32 = 0.7;

/// A pairwise judgement's system prompt, task and closing question.
const COMPARE: [&str; 3] = [
    "You are an impartial judge of answer quality. You read a request and two answers to it and \
     decide which answer is better. Judge only what the answers say and how well they serve the \
     request: which one comes first and which one is longer are no reasons to prefer it.",
    "Compare two answers",
    "Which answer is better on these criteria? Reply with the verdict only: A if answer A is \
     better, B if answer B is better, or tie if neither is.",
];

/// A rating's system prompt, task and closing question.
const SCORE: [&str; 3] = [
    "You are a strict, impartial judge of answer quality. You read a request and one answer to \
     it and rate the answer. Length alone is no reason for a higher or a lower rating.",
    "Rate the answer",
    "Rate the answer from 1 (very poor) to 10 (excellent) on these criteria. Reply with the \
     rating only: one whole number from 1 to 10.",
];

impl Judge {
    /// A judge on `backend` with temperature 0, at most 256 tokens, and 2 re-asks.
    pub fn new(backend: impl LlmBackend + 'static) -> Self {
        Judge {
            backend: crate::backend::shared(backend),
            params: SamplingParams::default().temperature(0.0).max_tokens(256),
            max_reasks: 2,
        }
    }

    setters! {
        /// Sampling of the judge's answers. Default: temperature 0, at most 256 tokens.
        /// Checked by the `build()` of the method that uses the judge.
        #[must_use]
        params(params: SamplingParams) => params = params;
        /// How many times an answer without a readable verdict or score is asked again, with
        /// the next seed and a temperature of at least [`REASK_TEMPERATURE`] (a greedy judge
        /// would repeat itself). Default: 2.
        #[must_use]
        max_reasks(max_reasks: u32) => max_reasks = max_reasks;
    }

    pub(crate) fn validate(&self, what: &str) -> Result<(), Error> {
        self.params.validate(what).map_err(Error::config)
    }

    /// The request asking which of `a` (shown first, between `<answer_a>` tags) and `b`
    /// (`<answer_b>`) is the better answer to `prompt` on `criteria`, with the verdict only
    /// (`A`, `B` or `tie`): short answers suit small models and cost few tokens, and
    /// the judge also reads tagged or explained verdicts. No seed is set.
    #[must_use]
    pub fn compare_request(
        &self,
        prompt: &[Message],
        a: &str,
        b: &str,
        criteria: &[Aspect],
    ) -> CompletionRequest {
        self.request(
            COMPARE,
            prompt,
            criteria,
            &[("Answer A", a), ("Answer B", b)],
        )
    }

    /// The request asking for a 1–10 rating of `response` (between `<answer>` tags) to
    /// `prompt` on `criteria`, with the rating only (the judge also reads tagged or
    /// explained ratings). No seed is set.
    #[must_use]
    pub fn score_request(
        &self,
        prompt: &[Message],
        response: &str,
        criteria: &[Aspect],
    ) -> CompletionRequest {
        self.request(SCORE, prompt, criteria, &[("Answer", response)])
    }

    /// The request of `system` and a user message: `task` on `criteria`, the request of
    /// `prompt`, each answer under its title (`Answer A` between `<answer_a>` tags), then
    /// `question`.
    fn request(
        &self,
        [system, task, question]: [&str; 3],
        prompt: &[Message],
        criteria: &[Aspect],
        answers: &[(&str, &str)],
    ) -> CompletionRequest {
        let len: usize = answers.iter().map(|(_, text)| text.len()).sum();
        let mut u = String::with_capacity(512 + len);
        let _ = writeln!(u, "{task} to the request below on these criteria:");
        render_aspects(criteria, &mut u);
        u.push_str("\nRequest:\n<request>\n");
        if let [only] = prompt {
            u.push_str(&only.content);
        } else {
            for (i, m) in prompt.iter().enumerate() {
                let gap = if i > 0 { "\n\n" } else { "" };
                let _ = write!(u, "{gap}[{}]\n{}", m.role, m.content);
            }
        }
        u.push_str("\n</request>\n\n");
        for (title, text) in answers {
            let tag = title.to_lowercase().replace(' ', "_");
            let _ = write!(u, "{title}:\n<{tag}>\n{text}\n</{tag}>\n\n");
        }
        u.push_str(question);
        CompletionRequest::new(vec![Message::system(system), Message::user(u)])
            .with_params(&self.params)
    }

    /// Sends `req` (re-ask `n` with its seed + `n`) until `parse` reads its answer. A re-ask
    /// goes out at a temperature of at least [`REASK_TEMPERATURE`], since a greedy judge would
    /// only repeat its unreadable answer.
    async fn ask<T>(
        &self,
        id: &str,
        call: &'static str,
        req: CompletionRequest,
        parse: fn(&str) -> Option<T>,
        what: &str,
    ) -> Result<Answer<T>, Error> {
        let mut hot = req.clone();
        hot.temperature = hot.temperature.map(|t| t.max(REASK_TEMPERATURE));
        let accept = |raw: &str| {
            parse(raw).ok_or_else(|| UnusableReason::Other(format!("no readable {what}")))
        };
        let (backend, max_reasks) = (&*self.backend, self.max_reasks);
        ask(backend, id, call, &req, Some(&hot), max_reasks, accept).await
    }

    /// Asks for a verdict on (`a`, `b`) with backend seed `seed` (re-ask `n` uses `seed + n`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn compare(
        &self,
        id: &str,
        call: &'static str,
        prompt: &[Message],
        a: &str,
        b: &str,
        criteria: &[Aspect],
        seed: u64,
    ) -> Result<Answer<Verdict>, Error> {
        let req = self.compare_request(prompt, a, b, criteria).with_seed(seed);
        self.ask(id, call, req, parse_verdict, "verdict").await
    }
}

#[async_trait]
impl Scorer for Judge {
    async fn score(&self, r: ScoreRequest<'_>) -> Result<Scored, Error> {
        let req = self.score_request(r.prompt, r.response, r.criteria);
        let req = req.with_seed(r.seed);
        let a = self
            .ask(r.id, "score", req, parse_score, "1-10 score")
            .await?;
        Ok(Scored {
            score: a.value,
            calls: a.calls,
            reasks: a.calls - 1,
            usage: a.usage,
            model: a.model,
        })
    }

    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed("llm-judge")
    }
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(4)
        .map(str::to_lowercase)
        .collect()
}

const TIE_WORDS: &[&str] = &[
    "tie", "tied", "equal", "neither", "both", "same", "draw", "c",
];

/// Reads a verdict from the first words of `s` ("A", "Answer B", "a tie", "[[B]]", ...).
fn classify(s: &str) -> Option<Verdict> {
    let w = words(s);
    let mut w: &[String] = &w;
    if w.first().is_some_and(|x| x == "answer" || x == "response") {
        w = &w[1..];
    }
    match w.first().map(String::as_str)? {
        "a" if w.get(1).is_some_and(|x| TIE_WORDS.contains(&x.as_str())) => Some(Verdict::Tie),
        "a" => Some(Verdict::A),
        "b" => Some(Verdict::B),
        x if TIE_WORDS.contains(&x) => Some(Verdict::Tie),
        _ => None,
    }
}

/// Where the last of `leads` in `hay` (the one that starts last) starts, and which it is.
fn last_of(hay: &str, leads: &[&str]) -> Option<(usize, usize)> {
    let found = leads.iter().enumerate();
    found
        .filter_map(|(k, l)| hay.rfind(l).map(|i| (i, k)))
        .max()
}

/// The text after the last of `leads` in `hay`.
fn after_last<'a>(hay: &'a str, leads: &[&str]) -> Option<&'a str> {
    last_of(hay, leads).map(|(i, k)| &hay[i + leads[k].len()..])
}

/// Reads a judge's pairwise verdict out of its raw answer.
///
/// Tried in order: the last `<verdict>...</verdict>` (closing tag optional); the last `[[A]]`,
/// `[[B]]` or `[[C]]`/`[[tie]]`; an answer that is only the verdict (`"B"`, `"Answer A."`);
/// the words after the last `verdict:`, `verdict is`, `better answer is`, `winner:` and
/// similar; and a sentence "answer A is better" naming one side only. `None` when none of these
/// gives A, B or a tie.
#[must_use]
pub(crate) fn parse_verdict(raw: &str) -> Option<Verdict> {
    use Verdict::{Tie, A, B};
    const LEADS: &[&str] = &[
        "verdict:",
        "verdict is",
        "verdict -",
        "better answer is",
        "better answer:",
        "better response is",
        "better response:",
        "better on these criteria is",
        "better one is",
        "winner:",
        "winner is",
        "preferred answer is",
        "i prefer",
        "i choose",
    ];
    let lower = raw.to_lowercase();
    let trimmed = lower.trim_matches(|c: char| !c.is_alphanumeric());
    let says = |side: &str| {
        ["answer", "response"].iter().any(|noun| {
            lower.contains(&format!("{noun} {side} is better"))
                || lower.contains(&format!("{noun} {side} is the better"))
        })
    };
    let brackets = ["[[a]]", "[[b]]", "[[c]]", "[[tie]]"];
    (tag_content(raw, "verdict", true).and_then(classify))
        .or_else(|| last_of(&lower, &brackets).map(|(_, k)| [A, B, Tie, Tie][k]))
        .or_else(|| (words(trimmed).len() <= 2).then(|| classify(trimmed))?)
        .or_else(|| after_last(&lower, LEADS).and_then(classify))
        .or_else(|| match (says("a"), says("b")) {
            (true, false) => Some(A),
            (false, true) => Some(B),
            _ => None,
        })
}

/// Whether `c` ends a number (digits with an optional decimal part).
fn not_number(c: char) -> bool {
    !(c.is_ascii_digit() || c == '.')
}

/// The number at the start of `s` (after spaces, `*`, `:`, quotes, brackets).
fn leading_number(s: &str) -> Option<f64> {
    let s = s.trim_start_matches(|c: char| c.is_whitespace() || "*:=\"'`[(#-".contains(c));
    let run = s.split(not_number).next().filter(|r| !r.starts_with('.'))?;
    run.trim_end_matches('.').parse().ok()
}

/// The number just before byte `at` (skipping spaces).
fn number_before(s: &str, at: usize) -> Option<f64> {
    let head = s[..at].trim_end();
    head[head.trim_end_matches(|c| !not_number(c)).len()..]
        .parse()
        .ok()
}

/// Reads a 1–10 score out of a judge's raw answer.
///
/// Tried in order: the number in the last `<score>...</score>` (closing tag optional); the
/// number before the last `/10` or `out of 10`; the number after the last `score:`,
/// `rating:`, `score is` or `rating is`; the only number in the answer (the same number
/// repeated counts as one). Values outside 1..=10 count as unreadable. `None` when nothing
/// readable is found.
#[must_use]
pub(crate) fn parse_score(raw: &str) -> Option<f64> {
    let in_range = |x: f64| (1.0..=10.0).contains(&x).then_some(x);
    if let Some(inner) = tag_content(raw, "score", true) {
        return leading_number(inner).and_then(in_range);
    }
    let lower = raw.to_lowercase();
    if let Some((i, _)) = last_of(&lower, &["/10", "/ 10", "out of 10"]) {
        if let Some(x) = number_before(&lower, i) {
            return in_range(x);
        }
    }
    let leads = [
        "score:",
        "rating:",
        "score is",
        "rating is",
        "score of",
        "rating of",
    ];
    if let Some(x) = after_last(&lower, &leads).and_then(leading_number) {
        return in_range(x);
    }
    // Last resort: the only number in the text ("The answer is 6.", "7 - clear and right").
    let runs = lower.split(not_number);
    let numbers: Vec<f64> = runs
        .filter_map(|r| r.trim_matches('.').parse().ok())
        .collect();
    match numbers.split_first() {
        Some((&first, rest)) if rest.iter().all(|&x| x == first) => in_range(first),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_leniently() {
        assert_eq!(
            parse_verdict("B covers more. <verdict>B</verdict>"),
            Some(Verdict::B)
        );
        assert_eq!(parse_verdict("<VERDICT> answer a"), Some(Verdict::A));
        assert_eq!(parse_verdict("**Verdict:** a tie."), Some(Verdict::Tie));
        assert_eq!(
            parse_verdict("Overall, Answer B is better."),
            Some(Verdict::B)
        );
        assert_eq!(parse_verdict("Both have merits."), None);
    }

    #[test]
    fn scores_are_read_leniently() {
        assert_eq!(parse_score("Solid. <score>7</score>"), Some(7.0));
        assert_eq!(parse_score("I'd give it 8.5/10."), Some(8.5));
        assert_eq!(parse_score("**Rating:** 3"), Some(3.0));
        assert_eq!(parse_score(" 9 "), Some(9.0));
        assert_eq!(parse_score("The answer is 6."), Some(6.0));
        assert_eq!(parse_score("Between 6 and 7."), None);
        assert_eq!(parse_score("<score>11</score>"), None);
        assert_eq!(parse_score("pretty good"), None);
    }

    #[test]
    fn verdicts() {
        let cases = [
            ("<verdict>A</verdict>", Some(Verdict::A)),
            ("reasoning <verdict>b</verdict>", Some(Verdict::B)),
            ("<verdict>Tie</verdict>", Some(Verdict::Tie)),
            (
                "<verdict>A</verdict> wait, <verdict>B</verdict>",
                Some(Verdict::B),
            ),
            ("[[A]]", Some(Verdict::A)),
            ("Final: [[C]]", Some(Verdict::Tie)),
            ("B", Some(Verdict::B)),
            ("Answer A.", Some(Verdict::A)),
            ("\"A\"", Some(Verdict::A)),
            ("Verdict: B", Some(Verdict::B)),
            ("The better answer is A because ...", Some(Verdict::A)),
            ("response b is better overall", Some(Verdict::B)),
            ("A:", Some(Verdict::A)),
            (
                "The answer that is better on these criteria is answer B.",
                Some(Verdict::B),
            ),
            (
                "The answer A is better, while the answer B is better.",
                None,
            ),
            (
                "Answer A is better in tone but answer B is better in facts",
                None,
            ),
            ("", None),
            ("I cannot decide.", None),
            ("<verdict></verdict>", None),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_verdict(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn scores() {
        let cases = [
            ("<score>7</score>", Some(7.0)),
            ("<score> 10 </score>", Some(10.0)),
            ("<score>**4**", Some(4.0)),
            ("Score: 6/10", Some(6.0)),
            ("rated 7 out of 10.", Some(7.0)),
            ("Rating: 2.", Some(2.0)),
            ("5", Some(5.0)),
            ("1. The answer is 1.", Some(1.0)),
            ("The answer is 6.", Some(6.0)),
            ("7 or 8", None),
            ("<score>0</score>", None),
            ("<score>high</score>", None),
            ("no number", None),
            ("", None),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_score(raw), want, "{raw:?}");
        }
    }
}
