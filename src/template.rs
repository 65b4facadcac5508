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
use crate::backend::Message;
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
#[derive(Debug, Clone, Default)]
pub struct DefaultTemplate {
    _private: (),
}

impl DefaultTemplate {
    /// The default template.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

const SYSTEM: &str = "You help build a dataset that teaches a model to tell good answers from \
bad ones. You receive a request and an existing answer to it, and you write a new answer to the \
same request whose quality differs from the existing one in the way you are told. Write the new \
answer as if you were answering the request yourself.";

fn render_conversation(prompt: &[Message], out: &mut String) {
    if let [only] = prompt {
        out.push_str(&only.content);
        return;
    }
    for (i, m) in prompt.iter().enumerate() {
        if i > 0 {
            out.push_str("\n\n");
        }
        let _ = write!(out, "[{}]\n{}", m.role, m.content);
    }
}

impl PromptTemplate for DefaultTemplate {
    fn second_request(&self, ctx: &SecondContext<'_>) -> Vec<Message> {
        let better = ctx.label.label == Label::Better;
        let degree = match ctx.label.grade {
            Some(Grade::Slightly) => "slightly ",
            Some(Grade::Much) => "much ",
            None => "",
        };
        let direction = if better { "better" } else { "worse" };
        let mut u = String::with_capacity(
            512 + ctx.first.len() + ctx.prompt.iter().map(|m| m.content.len()).sum::<usize>(),
        );
        match ctx.aspects.model_picks {
            Some(k) => {
                let _ = writeln!(
                    u,
                    "Task: write a new answer that is {degree}{direction} than the existing answer. \
                     Choose at most {k} of these quality aspects and make the difference lie in them:"
                );
            }
            None => {
                let _ = writeln!(
                    u,
                    "Task: write a new answer that is {degree}{direction} than the existing answer \
                     in these quality aspects:"
                );
            }
        }
        for a in &ctx.aspects.aspects {
            let _ = writeln!(u, "- {}: {}", a.name, a.definition);
        }
        u.push_str("\nRequest:\n<request>\n");
        render_conversation(ctx.prompt, &mut u);
        u.push_str("\n</request>\n\nExisting answer:\n<existing_answer>\n");
        u.push_str(ctx.first);
        u.push_str("\n</existing_answer>\n\n");
        if better {
            u.push_str(
                "Fix the weaknesses of the existing answer in those aspects and keep what is \
                 already good. The new answer must stand on its own.",
            );
        } else {
            u.push_str(
                "Make the new answer clearly weaker in those aspects while it still reads as a \
                 sincere, fluent, on-topic answer: for example leave out something needed, get a \
                 detail wrong, or drift from the point, whichever fits the aspects. No gibberish \
                 and no exaggeration.",
            );
        }
        u.push_str(
            " Never mention the existing answer, these instructions, or that the answer was \
             changed.\n\n",
        );
        if ctx.aspects.model_picks.is_some() {
            u.push_str(
                "First name the aspects you chose as <aspects>name, name</aspects>. Then write ",
            );
        } else {
            u.push_str("Write ");
        }
        u.push_str("only the new answer between <response> and </response>.");
        vec![Message::system(SYSTEM), Message::user(u)]
    }

    fn parse_second(
        &self,
        raw: &str,
        ctx: &SecondContext<'_>,
    ) -> Result<ParsedResponse, UnusableReason> {
        let text = extract_response(raw);
        check_response(text, ctx.first)?;
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
];

/// Words at least one of which every [`META`] phrase without a `<` contains.
const META_KEYS: [&str; 7] = [
    "answer",
    "response",
    "version",
    "aspects",
    "instructions",
    "write only",
    "request",
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
/// The text is lowered into a per-thread buffer and scanned once for all phrases.
fn find_meta(text: &str) -> Option<&'static str> {
    static MATCHER: OnceLock<AhoCorasick> = OnceLock::new();
    thread_local! {
        static LOWER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let matcher = MATCHER.get_or_init(|| {
        // A full DFA without prefilter: the phrases start with common English trigrams, so a
        // prefilter mostly finds false candidates in ordinary prose.
        AhoCorasick::builder()
            .kind(Some(AhoCorasickKind::DFA))
            .prefilter(false)
            .build(META)
            .expect("the meta-talk phrases are valid patterns")
    });
    LOWER.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        buf.extend(text.bytes().map(|b| b.to_ascii_lowercase()));
        // Every phrase contains one of these words: SIMD substring scans rule out most prose
        // before the automaton runs.
        let candidate = memchr::memchr(b'<', &buf).is_some()
            || META_KEYS
                .iter()
                .any(|k| memchr::memmem::find(&buf, k.as_bytes()).is_some());
        let found = if candidate {
            matcher.find(&buf[..]).map(|m| META[m.pattern().as_usize()])
        } else {
            None
        };
        if buf.capacity() > 1 << 20 {
            *buf = Vec::new();
        }
        found
    })
}

/// Rejects empty text, a copy of the first response, and meta-talk.
///
/// # Errors
///
/// The reason the text is unusable.
pub fn check_response(text: &str, first: &str) -> Result<(), UnusableReason> {
    if text.trim().is_empty() {
        return Err(UnusableReason::Empty);
    }
    if let Some(phrase) = find_meta(text) {
        return Err(UnusableReason::MetaTalk(format!("contains {phrase:?}")));
    }
    if same_text(text, first) {
        return Err(UnusableReason::SameAsFirst);
    }
    Ok(())
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
        assert_eq!(msgs.len(), 2);
        let u = &msgs[1].content;
        assert!(u.contains("worse than the existing answer"));
        assert!(u.contains("- correctness: facts are right"));
        assert!(u.contains("What is the capital of France?"));
        assert!(u.contains("<existing_answer>\nParis.\n</existing_answer>"));
        assert!(u.contains("<response> and </response>"));
        assert!(!u.contains("<aspects>"));
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
        assert!(t.second_request(&ctx)[1].content.contains("<aspects>"));
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
