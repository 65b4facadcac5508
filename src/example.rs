//! Prompt records (the input) and preference examples (the output), with their JSON shapes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::backend::{Message, Role, Usage};
use crate::label::{Grade, Label};
use crate::Error;

/// What the model is asked: a plain string or a chat history ending in a user turn.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PromptInput {
    /// A single user message.
    Text(String),
    /// A chat history (system, user and assistant turns) ending in a user turn.
    Messages(Vec<Message>),
}

/// One input record: a stable id, the prompt, and any other fields of the input line.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub(crate) id: String,
    pub(crate) input: PromptInput,
    pub(crate) extra: Map<String, Value>,
}

impl Prompt {
    /// A plain-text prompt whose id is derived from its content.
    pub fn new(text: impl Into<String>) -> Self {
        Self::of(None, PromptInput::Text(text.into()))
    }

    /// A plain-text prompt with a given id.
    pub fn with_id(id: impl Into<String>, text: impl Into<String>) -> Self {
        Self::of(Some(id.into()), PromptInput::Text(text.into()))
    }

    /// A chat prompt; the id is `id`, or derived from the content when `None`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) if `messages` is empty, does not end with a user turn, or has an empty
    /// user turn.
    pub fn from_messages(id: Option<String>, messages: Vec<Message>) -> Result<Self, Error> {
        check_messages(&messages).map_err(Error::config)?;
        Ok(Self::of(id, PromptInput::Messages(messages)))
    }

    /// A prompt with no other fields; the id is `id`, or derived from the content when `None`.
    fn of(id: Option<String>, input: PromptInput) -> Self {
        Prompt {
            id: id.unwrap_or_else(|| Self::content_id(&input)),
            input,
            extra: Map::new(),
        }
    }

    /// The id derived from content: the first 16 hex digits of the SHA-256 of the prompt text
    /// (or of the messages as JSON). Stable across runs, machines and releases.
    #[must_use]
    pub fn content_id(input: &PromptInput) -> String {
        let mut h = Sha256::new();
        match input {
            PromptInput::Text(t) => {
                h.update(b"text\0");
                h.update(t.as_bytes());
            }
            PromptInput::Messages(ms) => {
                h.update(b"messages\0");
                for m in ms {
                    h.update(m.role.as_str().as_bytes());
                    h.update(b"\0");
                    h.update((m.content.len() as u64).to_le_bytes());
                    h.update(m.content.as_bytes());
                }
            }
        }
        let digest: [u8; 32] = h.finalize().into();
        let head: [u8; 8] = digest[..8].try_into().expect("8 of 32 bytes");
        format!("{:016x}", u64::from_be_bytes(head))
    }

    /// The stable id: given in the input, or derived from a hash of the content
    /// ([`Prompt::content_id`]).
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The prompt, as given.
    #[must_use]
    pub fn input(&self) -> &PromptInput {
        &self.input
    }

    /// Other fields of the input record, carried into the example's `metadata.input`.
    #[must_use]
    pub fn extra(&self) -> &Map<String, Value> {
        &self.extra
    }

    /// The same prompt with these other fields (see [`extra`](Self::extra)).
    #[must_use]
    pub fn with_extra(mut self, extra: Map<String, Value>) -> Self {
        self.extra = extra;
        self
    }

    /// The prompt as chat messages (a text prompt becomes one user message).
    #[must_use]
    pub fn messages(&self) -> Cow<'_, [Message]> {
        match &self.input {
            PromptInput::Text(t) => Cow::Owned(vec![Message::user(t.clone())]),
            PromptInput::Messages(m) => Cow::Borrowed(m),
        }
    }

    /// Consumes the prompt and returns its messages.
    #[must_use]
    pub fn into_messages(self) -> Vec<Message> {
        self.input.into_messages()
    }
}

impl PromptInput {
    /// The prompt as chat messages (a text prompt becomes one user message).
    #[must_use]
    pub fn into_messages(self) -> Vec<Message> {
        match self {
            PromptInput::Text(t) => vec![Message::user(t)],
            PromptInput::Messages(m) => m,
        }
    }
}

pub(crate) fn check_messages(messages: &[Message]) -> Result<(), String> {
    match messages.last() {
        None => Err("`messages` is empty".into()),
        Some(m) if m.role != Role::User => Err(format!(
            "`messages[{}].role` is {:?}: a prompt must end with a user turn",
            messages.len() - 1,
            m.role.as_str()
        )),
        Some(m) if m.content.trim().is_empty() => Err(format!(
            "`messages[{}].content` is empty",
            messages.len() - 1
        )),
        Some(_) => Ok(()),
    }
}

/// Per-example details kept next to the TRL columns.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ExampleMetadata {
    /// The generation method (`"rmboost"`, or a baseline's name).
    pub method: String,
    /// The run seed; with the id it determines every random draw of the example.
    pub seed: u64,
    /// The models that answered, by call (`"first"`, `"second"`, ...).
    pub models: BTreeMap<String, String>,
    /// Token usage by call, plus `"total"`.
    pub usage: BTreeMap<String, Usage>,
    /// Backend calls made for this example, re-asks included.
    pub calls: u32,
    /// Answers rejected as unusable and asked again.
    pub reasks: u32,
    /// Fields of the input record other than `id`, `prompt` and `messages`.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub input: Map<String, Value>,
    /// Anything else a method wants to record.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One preference example: a prompt, a chosen and a rejected response, and how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceExample {
    /// The input record's id.
    pub id: String,
    /// The prompt conversation (ends with a user turn).
    pub prompt: Vec<Message>,
    /// The preferred response.
    pub chosen: String,
    /// The other response.
    pub rejected: String,
    /// Whether the second response was asked to be better or worse than the first.
    pub label: Label,
    /// Slightly or much, for graded labels.
    pub grade: Option<Grade>,
    /// Names of the aspects the pair differs on.
    pub aspects: Vec<String>,
    /// TRL's optional `margin` column.
    pub margin: Option<f64>,
    /// Seed, models, usage, calls and carried input fields.
    pub metadata: ExampleMetadata,
}

crate::error::named_enum! {
/// The two JSONL shapes of an example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ExampleFormat {
    /// `prompt` is a list of messages, `chosen` and `rejected` are one-message assistant lists
    /// (TRL's conversational preference format). The default.
    #[default]
    Conversational = "conversational",
    /// `prompt`, `chosen` and `rejected` are plain strings (TRL's standard format). A chat
    /// prompt of more than one message is written as `role: content` blocks.
    Standard = "standard",
}
}

impl ExampleFormat {
    /// Parses `conversational` or `standard`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "conversational" | "chat" => Some(ExampleFormat::Conversational),
            "standard" | "plain" => Some(ExampleFormat::Standard),
            _ => None,
        }
    }

    /// The format of one written example line, from the type of its `prompt` field (a list
    /// or a string); `None` if the line is not an example.
    #[must_use]
    pub fn of_line(line: &[u8]) -> Option<Self> {
        let line: Value = serde_json::from_slice(line).ok()?;
        match line.get("prompt")? {
            Value::Array(_) => Some(ExampleFormat::Conversational),
            Value::String(_) => Some(ExampleFormat::Standard),
            _ => None,
        }
    }
}

impl std::str::FromStr for ExampleFormat {
    type Err = crate::Error;

    /// Parses `conversational` (or `chat`) and `standard` (or `plain`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) naming the accepted values.
    fn from_str(s: &str) -> Result<Self, crate::Error> {
        Self::from_name(s.trim()).ok_or_else(|| {
            crate::Error::config(format!(
                "unknown format {s:?}: expected conversational or standard"
            ))
        })
    }
}

impl PreferenceExample {
    /// One JSON line (no trailing newline) in `format`.
    #[must_use]
    pub fn to_json_line(&self, format: ExampleFormat) -> String {
        serde_json::to_string(&self.wire(format))
            .expect("serialising an example cannot fail: all keys are strings")
    }

    /// The prompt as one string, as the standard format writes it.
    #[must_use]
    pub fn prompt_text(&self) -> Cow<'_, str> {
        match self.prompt.as_slice() {
            [only] if only.role == Role::User => Cow::Borrowed(&only.content),
            many => {
                let blocks: Vec<String> = many
                    .iter()
                    .map(|m| format!("{}: {}", m.role.as_str(), m.content))
                    .collect();
                Cow::Owned(blocks.join("\n\n"))
            }
        }
    }

    /// The example's line in `format`, borrowing its fields.
    fn wire(&self, format: ExampleFormat) -> WireExample<'_> {
        let turn = |t: &str| TextOrMessages::Messages(vec![Message::assistant(t)].into());
        let (prompt, chosen, rejected) = match format {
            ExampleFormat::Conversational => (
                TextOrMessages::Messages(Cow::Borrowed(&self.prompt)),
                turn(&self.chosen),
                turn(&self.rejected),
            ),
            ExampleFormat::Standard => (
                TextOrMessages::Text(self.prompt_text()),
                TextOrMessages::Text(self.chosen.as_str().into()),
                TextOrMessages::Text(self.rejected.as_str().into()),
            ),
        };
        WireExample {
            id: Cow::Borrowed(&self.id),
            prompt,
            chosen,
            rejected,
            label: self.label,
            grade: self.grade,
            aspects: Cow::Borrowed(&self.aspects),
            margin: self.margin,
            metadata: Cow::Borrowed(&self.metadata),
        }
    }
}

impl Serialize for PreferenceExample {
    /// Serialises in the conversational format.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.wire(ExampleFormat::Conversational).serialize(s)
    }
}

/// `prompt`, `chosen` or `rejected` of a line: a string (standard) or messages
/// (conversational).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum TextOrMessages<'a> {
    Text(Cow<'a, str>),
    Messages(Cow<'a, [Message]>),
}

impl TextOrMessages<'_> {
    /// The format whose lines hold a field of this shape.
    fn format(&self) -> ExampleFormat {
        match self {
            TextOrMessages::Text(_) => ExampleFormat::Standard,
            TextOrMessages::Messages(_) => ExampleFormat::Conversational,
        }
    }

    /// The response text of `field`: a string, or one assistant message.
    fn into_response(self, field: &str) -> Result<String, String> {
        match self {
            TextOrMessages::Text(t) => Ok(t.into_owned()),
            TextOrMessages::Messages(ms) => match <[Message; 1]>::try_from(ms.into_owned()) {
                Ok([m]) if m.role == Role::Assistant => Ok(m.content),
                _ => Err(format!("{field} must be a string or one assistant message")),
            },
        }
    }
}

/// One example line in either format: what is written and what is read.
#[derive(Serialize, Deserialize)]
struct WireExample<'a> {
    id: Cow<'a, str>,
    prompt: TextOrMessages<'a>,
    chosen: TextOrMessages<'a>,
    rejected: TextOrMessages<'a>,
    label: Label,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grade: Option<Grade>,
    #[serde(default)]
    aspects: Cow<'a, [String]>,
    #[serde(default)]
    margin: Option<f64>,
    #[serde(default)]
    metadata: Cow<'a, ExampleMetadata>,
}

impl WireExample<'_> {
    /// The example, and the format its line was written in (from the shape of `prompt`).
    fn into_example(self) -> Result<(PreferenceExample, ExampleFormat), String> {
        let format = self.prompt.format();
        let prompt = match self.prompt {
            TextOrMessages::Text(t) => vec![Message::user(t)],
            TextOrMessages::Messages(ms) => {
                check_messages(&ms).map_err(|m| format!("prompt: {m}"))?;
                ms.into_owned()
            }
        };
        let example = PreferenceExample {
            id: self.id.into_owned(),
            prompt,
            chosen: self.chosen.into_response("chosen")?,
            rejected: self.rejected.into_response("rejected")?,
            label: self.label,
            grade: self.grade,
            aspects: self.aspects.into_owned(),
            margin: self.margin,
            metadata: self.metadata.into_owned(),
        };
        Ok((example, format))
    }
}

impl<'de> Deserialize<'de> for PreferenceExample {
    /// Reads either format.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WireExample::deserialize(d)?
            .into_example()
            .map(|(example, _)| example)
            .map_err(D::Error::custom)
    }
}

/// Parses one JSON line of an example file: the example and the format of the line (the shape
/// of its `prompt`: a list of messages or a string). `chosen` and `rejected` must have the
/// same shape as `prompt`.
pub(crate) fn parse_example_line(text: &str) -> Result<(PreferenceExample, ExampleFormat), String> {
    let wire: WireExample = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let shape = |f| match f {
        ExampleFormat::Conversational => "a list of messages",
        ExampleFormat::Standard => "a string",
    };
    let prompt = wire.prompt.format();
    for (field, v) in [("chosen", &wire.chosen), ("rejected", &wire.rejected)] {
        if v.format() != prompt {
            return Err(format!(
                "`{field}` is {} but `prompt` is {}: a line is either conversational or standard",
                shape(v.format()),
                shape(prompt)
            ));
        }
    }
    wire.into_example()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PreferenceExample {
        let mut metadata = ExampleMetadata {
            method: "rmboost".into(),
            seed: 7,
            calls: 2,
            ..Default::default()
        };
        metadata.models.insert("first".into(), "m".into());
        metadata.usage.insert("total".into(), Usage::new(10, 20));
        metadata.input.insert("source".into(), Value::from("unit"));
        PreferenceExample {
            id: "ex-1".into(),
            prompt: vec![Message::user("Why is the sky blue?")],
            chosen: "Rayleigh scattering.".into(),
            rejected: "Because it is.".into(),
            label: Label::Better,
            grade: None,
            aspects: vec!["correctness".into()],
            margin: None,
            metadata,
        }
    }

    #[test]
    fn conversational_shape() {
        let v: Value =
            serde_json::from_str(&sample().to_json_line(ExampleFormat::Conversational)).unwrap();
        assert_eq!(v["prompt"][0]["role"], "user");
        assert_eq!(v["chosen"][0]["role"], "assistant");
        assert_eq!(v["chosen"][0]["content"], "Rayleigh scattering.");
        assert_eq!(v["rejected"][0]["content"], "Because it is.");
        assert_eq!(v["label"], "better");
        assert!(v["margin"].is_null());
        assert_eq!(v["metadata"]["seed"], 7);
        assert_eq!(v["metadata"]["input"]["source"], "unit");
        assert!(v.get("grade").is_none());
    }

    #[test]
    fn standard_shape() {
        let v: Value =
            serde_json::from_str(&sample().to_json_line(ExampleFormat::Standard)).unwrap();
        assert_eq!(v["prompt"], "Why is the sky blue?");
        assert_eq!(v["chosen"], "Rayleigh scattering.");
    }

    #[test]
    fn round_trip_both() {
        let mut e = sample();
        e.grade = Some(Grade::Much);
        e.margin = Some(3.0);
        for f in [ExampleFormat::Conversational, ExampleFormat::Standard] {
            let back: PreferenceExample = serde_json::from_str(&e.to_json_line(f)).unwrap();
            assert_eq!(back, e, "{f:?}");
        }
    }

    #[test]
    fn content_id_is_stable() {
        let a = Prompt::new("hello");
        assert_eq!(a.id, Prompt::new("hello").id);
        assert_ne!(a.id, Prompt::new("hello ").id);
        assert_eq!(a.id.len(), 16);
        // Golden value: changing it breaks resume of existing datasets.
        assert_eq!(a.id, "306f89347195cc05");
        assert!(Prompt::from_messages(None, vec![Message::assistant("x")]).is_err());
    }
}
