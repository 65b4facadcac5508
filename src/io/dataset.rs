//! The strict reader of a finished dataset file: [`DatasetReader`].

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::line::{JsonlLines, MAX_LINE_BYTES};
use crate::example::{parse_example_line, ExampleFormat, PreferenceExample};
use crate::Error;

/// One example of a dataset file, with its line number, its format and its text.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DatasetLine {
    /// The 1-based line number in the file.
    pub line: u64,
    /// The format of the line (every line of a file has the file's format).
    pub format: ExampleFormat,
    /// The example.
    pub example: PreferenceExample,
    /// The line as written, without its line ending.
    pub text: String,
}

/// Reads a JSONL file of preference examples strictly, for tools that turn a finished dataset
/// into something else (export, merge); an iterator of `Result<DatasetLine, Error>`.
///
/// Unlike the run, which repairs what a crash left, this reader refuses anything that is not
/// a whole dataset, with an [`ErrorKind::Parse`](crate::ErrorKind::Parse) naming the file and
/// line:
///
/// - a **torn last line** (the file ends inside a line that is not a whole example, as a
///   killed run leaves it);
/// - **mixed formats**: every line must have the format of the first example
///   (conversational: `prompt`, `chosen` and `rejected` are lists of messages; standard:
///   strings);
/// - a line that is not a preference example, invalid UTF-8, or a line longer than the limit.
///
/// Blank lines are skipped. Reading goes on after an error (the caller decides whether to
/// stop); an I/O error ends the iteration. Duplicate ids are the caller's business: what to do
/// with them depends on the tool.
///
/// ```
/// use rmboost::io::DatasetReader;
///
/// let file = "{\"id\":\"a\",\"prompt\":\"q\",\"chosen\":\"x\",\"rejected\":\"y\",\"label\":\"better\"}\n\
///             {\"id\":\"b\",\"prompt\":[{\"role\":\"user\",\"content\":\"q\"}],\n";
/// let mut rows = DatasetReader::new(file.as_bytes(), "pairs.jsonl");
/// assert_eq!(rows.next().unwrap().unwrap().example.id, "a");
/// let err = rows.next().unwrap().unwrap_err().to_string();
/// assert!(err.starts_with("pairs.jsonl:2:"), "{err}");
/// assert!(rows.next().is_none());
/// ```
#[derive(Debug)]
pub struct DatasetReader<R> {
    lines: JsonlLines<R>,
    format: Option<(ExampleFormat, u64)>,
}

/// Opens a JSONL file of preference examples for strict reading ([`DatasetReader`]).
///
/// # Errors
///
/// [`ErrorKind::Io`](crate::ErrorKind::Io) if the file cannot be opened.
pub fn read_dataset(path: impl AsRef<Path>) -> Result<DatasetReader<BufReader<File>>, Error> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| Error::io(path.to_path_buf(), source))?;
    Ok(DatasetReader::new(
        BufReader::with_capacity(1 << 16, file),
        path,
    ))
}

impl<R: BufRead> DatasetReader<R> {
    /// Reads from `reader`; `name` is the file name used in errors.
    pub fn new(reader: R, name: impl Into<PathBuf>) -> Self {
        DatasetReader {
            lines: JsonlLines::new(reader, name.into(), MAX_LINE_BYTES),
            format: None,
        }
    }

    /// Sets the longest line accepted, in bytes, not counting its line ending (`\n` or
    /// `\r\n`); default 64 MiB. A longer line is an error.
    #[must_use]
    pub fn max_line_bytes(mut self, max: usize) -> Self {
        self.lines.max_line_bytes = max;
        self
    }

    fn parse(&mut self, text: &str, ended: bool) -> Result<DatasetLine, Error> {
        let (example, format) = match parse_example_line(text) {
            Ok(parsed) => parsed,
            Err(_) if !ended => {
                return Err(self.lines.err(
                    "torn last line: the file ends inside a line that is not a whole example \
                     (a run that was killed leaves one); rerun the same `rmboost generate` \
                     command to repair and finish the file, or remove the line",
                ))
            }
            Err(e) => return Err(self.lines.err(format!("not a preference example: {e}"))),
        };
        let (first, at) = *self.format.get_or_insert((format, self.lines.line));
        if first != format {
            return Err(self.lines.err(format!(
                "a {format} example in a {first} file (line {at} is {first}): one file \
                 holds one format; regenerate the odd lines or split the file"
            )));
        }
        Ok(DatasetLine {
            line: self.lines.line,
            format,
            example,
            text: text.to_string(),
        })
    }
}

impl<R: BufRead> Iterator for DatasetReader<R> {
    type Item = Result<DatasetLine, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(
            self.lines
                .next_line()?
                .and_then(|line| self.parse(line.text.trim_end_matches('\r'), line.ended)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: &str = r#"{"id":"s","prompt":"q","chosen":"a","rejected":"b","label":"worse"}"#;
    const CONV: &str = r#"{"id":"c","prompt":[{"role":"user","content":"q"}],"chosen":[{"role":"assistant","content":"a"}],"rejected":[{"role":"assistant","content":"b"}],"label":"better","aspects":["x"]}"#;

    fn read(text: &str) -> Vec<Result<DatasetLine, Error>> {
        DatasetReader::new(text.as_bytes(), "d.jsonl")
            .max_line_bytes(400)
            .collect()
    }

    fn msg(r: &Result<DatasetLine, Error>) -> String {
        r.as_ref().unwrap_err().to_string()
    }

    #[test]
    fn reads_both_formats_with_lines_and_text() {
        let rows = read(&format!("{STD}\r\n\n{STD}"));
        assert_eq!(rows.len(), 2);
        let r = rows[1].as_ref().unwrap();
        assert_eq!((r.line, r.format), (3, ExampleFormat::Standard));
        assert_eq!(r.text, STD);
        let rows = read(&format!("{CONV}\n"));
        let r = rows[0].as_ref().unwrap();
        assert_eq!(r.format, ExampleFormat::Conversational);
        assert_eq!(r.example.aspects, ["x"]);
    }

    #[test]
    fn the_limit_is_the_longest_line_accepted_without_its_ending() {
        let max = STD.len();
        let limited = |text: &str| -> Vec<Result<DatasetLine, Error>> {
            DatasetReader::new(text.as_bytes(), "d.jsonl")
                .max_line_bytes(max)
                .collect()
        };
        for input in [
            format!("{STD}\n"),
            format!("{STD}\r\n"),
            STD.to_string(),
            format!("\r\n{STD}\r\n"),
        ] {
            let rows = limited(&input);
            assert_eq!(rows.len(), 1, "{input:?}");
            let row = rows[0].as_ref().unwrap();
            assert_eq!(row.text, STD);
        }
        // One byte more (a space JSON would allow) is too long, with or without a newline:
        // at the end of the file it is too long, not torn.
        for (input, line) in [
            (format!("{STD} \n"), 1),
            (format!("{STD} \r\n"), 1),
            (format!("{STD} "), 1),
            (format!("{STD}\n{STD} "), 2),
        ] {
            let rows = limited(&input);
            let last = rows.last().unwrap();
            assert_eq!(
                msg(last),
                format!("d.jsonl:{line}: line longer than the {max} byte limit"),
                "{input:?}"
            );
        }
        // A cut example within the limit at the end of the file is a torn line.
        let rows = limited(&format!("{STD}\n{}", &STD[..max - 1]));
        assert!(msg(&rows[1]).starts_with("d.jsonl:2: torn last line"));
    }

    #[test]
    fn refuses_torn_mixed_and_bad_lines() {
        let torn = &CONV[..CONV.len() - 5];
        let rows = read(&format!("{CONV}\n{torn}"));
        assert!(
            msg(&rows[1]).starts_with("d.jsonl:2: torn last line"),
            "{}",
            msg(&rows[1])
        );
        // The same bytes followed by a newline are a bad line, not a torn one.
        let rows = read(&format!("{torn}\n"));
        assert!(msg(&rows[0]).starts_with("d.jsonl:1: not a preference example"));
        let rows = read(&format!("{CONV}\n{STD}\n"));
        assert!(
            msg(&rows[1])
                .contains("d.jsonl:2: a standard example in a conversational file (line 1"),
            "{}",
            msg(&rows[1])
        );
        let half = STD.replace(
            r#""chosen":"a""#,
            r#""chosen":[{"role":"assistant","content":"a"}]"#,
        );
        let rows = read(&format!("{half}\n"));
        assert!(
            msg(&rows[0]).contains("`chosen` is a list of messages"),
            "{}",
            msg(&rows[0])
        );
        let long = format!("{{\"id\":\"{}\"}}\n{STD}\n", "x".repeat(500));
        let rows = read(&long);
        assert!(msg(&rows[0]).contains("d.jsonl:1: line longer than the 400 byte limit"));
        assert_eq!(rows[1].as_ref().unwrap().line, 2);
        let rows = read("\u{feff}junk\n");
        assert!(msg(&rows[0]).starts_with("d.jsonl:1: not a preference example"));
    }
}
