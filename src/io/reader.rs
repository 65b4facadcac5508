//! The JSONL prompt reader.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::line::JsonlLines;
use crate::backend::Message;
use crate::example::{check_messages, Prompt, PromptInput};
use crate::Error;

/// Reads prompt records, one JSON object per line; an iterator of `Result<Prompt, Error>`.
///
/// Each line is `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages": [...]}`; `id` is
/// optional (a string or an integer; derived from the content when absent) and every other
/// field is kept in [`Prompt::extra`]. Blank lines are skipped. A bad line (invalid JSON or
/// UTF-8, a missing or mistyped field, longer than the limit) gives an [`ErrorKind::Parse`](crate::ErrorKind::Parse) naming
/// the file, the line and the field, and reading goes on with the next line: the caller decides
/// whether to skip it or stop.
#[derive(Debug)]
pub struct PromptReader<R> {
    lines: JsonlLines<R>,
}

/// Opens a JSONL prompt file.
///
/// # Errors
///
/// [`ErrorKind::Io`](crate::ErrorKind::Io) if the file cannot be opened.
pub fn read_prompts(path: impl AsRef<Path>) -> Result<PromptReader<BufReader<File>>, Error> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| Error::io(path.to_path_buf(), source))?;
    Ok(PromptReader::new(BufReader::new(file), path))
}

impl<R: BufRead> PromptReader<R> {
    /// Reads from `reader`; `name` is the file name used in errors (`<stdin>`, a path, ...).
    pub fn new(reader: R, name: impl Into<PathBuf>) -> Self {
        PromptReader {
            lines: JsonlLines::new(reader, name.into(), 16 << 20),
        }
    }

    /// Sets the longest line accepted, in bytes, not counting its line ending (`\n` or
    /// `\r\n`); default 16 MiB. A longer line is an error.
    #[must_use]
    pub fn max_line_bytes(mut self, max: usize) -> Self {
        self.lines.max_line_bytes = max;
        self
    }

    /// The records as a stream, read on a thread of their own so that a slow input (a pipe,
    /// a network file system) never blocks the async runtime that drives the run: Ctrl-C,
    /// timers and the examples in flight go on while a read waits.
    ///
    /// At most 64 records are read ahead of the consumer (backpressure: nothing is read
    /// faster than it is consumed, beyond that). Dropping the stream stops the thread after
    /// its current read.
    ///
    /// # Errors
    ///
    /// The stream yields an [`ErrorKind::Io`](crate::ErrorKind::Io) error if the thread
    /// cannot be started; record errors are as for the iterator.
    pub fn into_stream(self) -> futures::stream::BoxStream<'static, Result<Prompt, Error>>
    where
        R: Send + 'static,
    {
        use futures::{SinkExt, StreamExt};
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Prompt, Error>>(64);
        let path = self.lines.path.clone();
        let spawned = std::thread::Builder::new()
            .name("rmboost-input".into())
            .spawn(move || {
                for item in self {
                    if futures::executor::block_on(tx.send(item)).is_err() {
                        return; // the stream was dropped
                    }
                }
            });
        match spawned {
            Ok(_) => rx.boxed(),
            Err(e) => futures::stream::once(async move { Err(Error::io(path, e)) }).boxed(),
        }
    }

    /// The number of the last line read (1-based; 0 before the first).
    #[must_use]
    pub fn line(&self) -> u64 {
        self.lines.line
    }
}

impl<R: BufRead> Iterator for PromptReader<R> {
    type Item = Result<Prompt, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.lines.next_line()?.and_then(|line| {
            parse_prompt(line.text.trim()).map_err(|message| self.lines.err(message))
        }))
    }
}

/// A prompt record, or what is wrong with it.
fn parse_prompt(text: &str) -> Result<Prompt, String> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| format!("invalid JSON at column {}: {e}", e.column()))?;
    let Value::Object(mut obj) = value else {
        return Err("expected a JSON object".into());
    };
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(Value::String(_)) => return Err("field `id` is empty".into()),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        Some(_) => return Err("field `id` must be a string or an integer".into()),
    };
    let input = match (obj.remove("prompt"), obj.remove("messages")) {
        (Some(_), Some(_)) => return Err("give either `prompt` or `messages`, not both".into()),
        (None, None) => return Err("missing field `prompt` (or `messages`)".into()),
        (Some(Value::String(s)), None) if s.trim().is_empty() => {
            return Err("field `prompt` is empty".into())
        }
        (Some(Value::String(s)), None) => PromptInput::Text(s),
        (Some(_), None) => return Err("field `prompt` must be a string".into()),
        (None, Some(m)) => {
            let messages: Vec<Message> = serde_json::from_value(m).map_err(|e| {
                format!("field `messages` must be a list of {{\"role\", \"content\"}}: {e}")
            })?;
            check_messages(&messages).map_err(|m| format!("field {m}"))?;
            PromptInput::Messages(messages)
        }
    };
    let id = id.unwrap_or_else(|| Prompt::content_id(&input));
    Ok(Prompt {
        id,
        input,
        extra: Map::from_iter(obj),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(input: &[u8]) -> Vec<Result<Prompt, Error>> {
        PromptReader::new(input, "in.jsonl")
            .max_line_bytes(200)
            .collect()
    }

    fn msg(r: &Result<Prompt, Error>) -> String {
        r.as_ref().unwrap_err().to_string()
    }

    #[test]
    fn reads_both_shapes_and_carries_fields() {
        let rows = read(
            b"{\"id\":\"a\",\"prompt\":\"hi\",\"source\":\"x\"}\n\n{\"messages\":[{\"role\":\"user\",\"content\":\"yo\"}]}\r\n{\"id\":7,\"prompt\":\"n\"}",
        );
        assert_eq!(rows.len(), 3);
        let a = rows[0].as_ref().unwrap();
        assert_eq!(a.id, "a");
        assert_eq!(a.extra["source"], "x");
        let b = rows[1].as_ref().unwrap();
        assert_eq!(b.id.len(), 16);
        assert!(matches!(b.input, PromptInput::Messages(_)));
        assert_eq!(rows[2].as_ref().unwrap().id, "7");
    }

    #[test]
    fn errors_name_line_and_field() {
        let rows = read(
            b"{\"prompt\":\"ok\"}\n{bad\n{\"prompt\":3}\n{\"id\":\"x\"}\n\xff\xfe\n{\"messages\":[{\"role\":\"assistant\",\"content\":\"a\"}]}\n",
        );
        assert_eq!(rows.len(), 6);
        assert!(rows[0].is_ok());
        assert!(
            msg(&rows[1]).starts_with("in.jsonl:2: invalid JSON"),
            "{}",
            msg(&rows[1])
        );
        assert!(msg(&rows[2]).contains("in.jsonl:3: field `prompt` must be a string"));
        assert!(msg(&rows[3]).contains("in.jsonl:4: missing field `prompt`"));
        assert!(msg(&rows[4]).contains("in.jsonl:5: invalid UTF-8"));
        assert!(
            msg(&rows[5]).contains("in.jsonl:6: field `messages[0].role`"),
            "{}",
            msg(&rows[5])
        );
    }

    /// A record of exactly `len` bytes.
    fn record(len: usize) -> String {
        let r = format!("{{\"prompt\":\"{}\"}}", "a".repeat(len - 13));
        assert_eq!(r.len(), len);
        r
    }

    fn read_limited(input: &str, max: usize) -> Vec<Result<Prompt, Error>> {
        PromptReader::new(input.as_bytes(), "in.jsonl")
            .max_line_bytes(max)
            .collect()
    }

    #[test]
    fn the_limit_is_the_longest_line_accepted_without_its_ending() {
        let at = record(20);
        let over = record(21);
        for input in [
            format!("{at}\n"),
            format!("{at}\r\n"),
            at.clone(),
            format!("\n{at}\r\n\n"),
        ] {
            let rows = read_limited(&input, 20);
            assert_eq!(rows.len(), 1, "{input:?}");
            assert!(rows[0].is_ok(), "{input:?}: {}", msg(&rows[0]));
        }
        for (input, line) in [
            (format!("{over}\n"), 1),
            (format!("{over}\r\n"), 1),
            (over.clone(), 1),
            (format!("{at}\n{over}"), 2),
        ] {
            let rows = read_limited(&input, 20);
            let last = rows.last().unwrap();
            assert_eq!(
                msg(last),
                format!("in.jsonl:{line}: line longer than the 20 byte limit"),
                "{input:?}"
            );
        }
    }

    #[test]
    fn after_a_long_line_the_next_lines_keep_their_numbers() {
        let input = format!("{}\n{}\r\n\n{}", record(50), record(20), record(19));
        let rows = read_limited(&input, 20);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            msg(&rows[0]),
            "in.jsonl:1: line longer than the 20 byte limit"
        );
        assert!(rows[1].is_ok());
        assert!(rows[2].is_ok());
        let mut reader = PromptReader::new(input.as_bytes(), "in.jsonl").max_line_bytes(20);
        reader.by_ref().for_each(drop);
        assert_eq!(reader.line(), 4);
    }

    #[test]
    fn long_lines_are_errors_and_reading_goes_on() {
        let mut input = b"{\"prompt\":\"".to_vec();
        input.extend(std::iter::repeat_n(b'a', 1000));
        input.extend_from_slice(b"\"}\n{\"prompt\":\"after\"}\n");
        let rows = read(&input);
        assert_eq!(rows.len(), 2);
        assert!(msg(&rows[0]).contains("in.jsonl:1: line longer than the 200 byte limit"));
        assert_eq!(
            rows[1].as_ref().unwrap().input,
            PromptInput::Text("after".into())
        );
    }
}
