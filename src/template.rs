//! Prompt templates: what the model is asked for each call, and how the second response is read
//! back out of its answer.
//!
//! A [`PromptTemplate`] builds the first and second requests and parses the second answer;
//! an answer it rejects comes back as an [`UnusableReason`] and is re-asked with a new seed,
//! up to the generator's re-ask limit.
//!
//! [`DefaultTemplate`] sends the prompt's own conversation as the second request, after a
//! system message with the instructions: the first response as a reference answer, the
//! direction (better or worse), the drawn aspects with their definitions, and the rule to put
//! only the new response between `<response>` and `</response>`. Its parser is lenient about
//! form (missing closing tag, no tags, a chatty first line) and strict about substance: an
//! empty answer, a copy of the first response, talk about the task, or an answer that fails
//! its [`ResponseChecks`] (near-identical or repetitive) is rejected.

use std::fmt;
use std::fmt::Write as _;

use crate::aspect::AspectDraw;
use crate::backend::{Message, Role};
use crate::checks::{accept_distinct, find_all_ci, tag_content, ResponseChecks};
use crate::engine::render_aspects;
use crate::error::UnusableReason;
use crate::label::{Label, LabelDraw};

/// What a template needs to write (and check) the second response of one example.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
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

impl<'a> SecondContext<'a> {
    /// A context with variant 0, as the engine makes one (a template's own tests build them
    /// this way).
    #[must_use]
    pub fn new(
        prompt: &'a [Message],
        first: &'a str,
        label: &'a LabelDraw,
        aspects: &'a AspectDraw,
    ) -> Self {
        SecondContext {
            prompt,
            first,
            label,
            aspects,
            variant: 0,
        }
    }

    /// The same context with another template variant.
    #[must_use]
    pub fn with_variant(mut self, variant: usize) -> Self {
        self.variant = variant;
        self
    }
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
        accept_distinct(raw, &[])
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

crate::aspect::forward_impls!(PromptTemplate {
    fn variants(&self) -> usize;
    fn first_request(&self, prompt: &[Message]) -> Vec<Message>;
    fn accept_first(&self, raw: &str) -> Result<String, UnusableReason>;
    fn second_request(&self, ctx: &SecondContext<'_>) -> Vec<Message>;
    fn parse_second(&self, raw: &str, ctx: &SecondContext<'_>)
        -> Result<ParsedResponse, UnusableReason>;
});

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
    /// use rmboost::checks::ResponseChecks;
    /// use rmboost::template::DefaultTemplate;
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
        let text = accept_distinct(raw, &[])?;
        self.checks.check_first(&text)?;
        Ok(text)
    }

    fn second_request(&self, ctx: &SecondContext<'_>) -> Vec<Message> {
        let (label, picks) = (ctx.label.label, ctx.aspects.model_picks);
        // The prompt's own system message, if any, stays first; the conversation follows as is.
        let (own_system, conversation) = match ctx.prompt.split_first() {
            Some((m, rest)) if m.role == Role::System => (Some(&m.content), rest),
            _ => (None, ctx.prompt),
        };
        let mut s =
            String::with_capacity(1536 + ctx.first.len() + own_system.map_or(0, String::len));
        if let Some(own) = own_system {
            let _ = write!(s, "{own}\n\n");
        }
        let _ = write!(
            s,
            "You are answering the user's request that follows, for a dataset that teaches a \
             model to tell good answers from bad ones. Here is a reference answer to the same \
             request:\n<reference>\n{}\n</reference>\n\nYour answer must be ",
            ctx.first
        );
        if let Some(grade) = ctx.label.grade {
            let _ = write!(s, "{grade} ");
        }
        let _ = write!(s, "{label} than the reference answer");
        match picks {
            Some(k) => {
                let _ = writeln!(
                    s,
                    ". Choose at most {k} of these quality aspects and make the difference lie in \
                     them:"
                );
            }
            None => s.push_str(" in these quality aspects:\n"),
        }
        render_aspects(&ctx.aspects.aspects, &mut s);
        s.push('\n');
        s.push_str(match label {
            Label::Better => {
                "Keep what the reference does well and fix its weaknesses in those aspects. \
                 Your answer must be complete and stand on its own."
            }
            Label::Worse => {
                "Make your answer clearly weaker in those aspects while it still reads as a \
                 sincere, fluent, on-topic answer: for example leave out something needed, get a \
                 detail wrong, or drift from the point, whichever fits the aspects. No gibberish, \
                 no repetition and no exaggeration."
            }
        });
        s.push_str(
            " Use your own words rather than copying the reference, and never mention the \
             reference, these instructions, or that anything was changed. Reply to the user \
             directly. ",
        );
        s.push_str(match picks {
            Some(_) => {
                "First name the aspects you chose as <aspects>name, name</aspects>. Then give"
            }
            None => "Give",
        });
        s.push_str(" your answer, and nothing else, between <response> and </response>.");
        let mut messages = Vec::with_capacity(1 + conversation.len());
        messages.push(Message::system(s));
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
        let picks = ctx.aspects.model_picks;
        Ok(ParsedResponse {
            text: text.to_string(),
            picked_aspects: picks.and_then(|k| parse_picked(raw, ctx.aspects, k)),
        })
    }
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
    if opens.is_empty() {
        return strip_preamble(closes.first().map_or(raw, |&c| &raw[..c]).trim());
    }
    opens
        .iter()
        .map(|&o| {
            let start = o + OPEN.len();
            let end = closes.iter().copied().find(|&c| c >= start);
            raw[start..end.unwrap_or(raw.len())].trim()
        })
        // "... between <response> and </response>" echoed from the instructions.
        .filter(|candidate| !candidate.eq_ignore_ascii_case("and"))
        .fold("", |best, c| if c.len() > best.len() { c } else { best })
}

/// Drops a first line such as "Here is a better answer:" and quotes around the whole text.
fn strip_preamble(mut text: &str) -> &str {
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

fn parse_picked(raw: &str, draw: &AspectDraw, k: usize) -> Option<Vec<String>> {
    let mut picked: Vec<String> = Vec::new();
    for part in tag_content(raw, "aspects", false)?.split([',', ';', '\n']) {
        let part = part.trim().trim_start_matches('-').trim();
        let offered = draw
            .aspects
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(part));
        if let Some(a) = offered.filter(|a| !picked.contains(&a.name) && picked.len() < k) {
            picked.push(a.name.clone());
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
    fn first_response_checks() {
        let first = "Honeybees collect nectar from flowers, carry it to the hive in a special \
                     stomach, pass it between workers who add enzymes, and store it in wax \
                     cells, where fanning wings evaporate the water until it turns thick.";
        let looped = "I'm not able to assist you. ".repeat(8);
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
        let ctx = SecondContext::new(&prompt, "Paris.", &label, &aspects);
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
        let ctx = SecondContext::new(&prompt, "Paris.", &label, &aspects);
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
