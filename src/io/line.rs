//! The one bounded line reader behind the JSONL readers ([`PromptReader`](super::PromptReader),
//! [`DatasetReader`](super::DatasetReader)), and the numbered, checked text lines both parse.

use std::io::{self, BufRead};
use std::path::PathBuf;

use crate::Error;

/// The default longest line of a dataset, a ledger or an output file read back, in bytes.
pub(crate) const MAX_LINE_BYTES: usize = 64 << 20;

/// The non-blank lines of a JSONL input as numbered text, with the checks every JSONL reader
/// makes before parsing a line (the length limit, UTF-8), each failure an
/// [`ErrorKind::Parse`](crate::ErrorKind::Parse) naming the file and line.
#[derive(Debug)]
pub(crate) struct JsonlLines<R> {
    reader: R,
    /// The file name used in errors.
    pub(crate) path: PathBuf,
    /// The number of the last line read (1-based; 0 before the first).
    pub(crate) line: u64,
    buf: Vec<u8>,
    /// The longest line accepted, in bytes, not counting its line ending.
    pub(crate) max_line_bytes: usize,
    done: bool,
}

/// A line from [`JsonlLines::next_line`]: not blank, without its line ending.
pub(crate) struct TextLine {
    pub(crate) text: String,
    /// Whether a `\n` ended it (only the last line of an input may lack one).
    pub(crate) ended: bool,
}

impl<R: BufRead> JsonlLines<R> {
    pub(crate) fn new(reader: R, path: PathBuf, max_line_bytes: usize) -> Self {
        JsonlLines {
            reader,
            path,
            line: 0,
            buf: Vec::new(),
            max_line_bytes,
            done: false,
        }
    }

    /// A parse error at the last line read.
    pub(crate) fn err(&self, message: impl Into<String>) -> Error {
        Error::parse(self.path.clone(), self.line, message)
    }

    /// The next line that is not blank, or the error of a line too long or not UTF-8 (reading
    /// goes on after it); `None` at the end of the input, and after an I/O error (which is
    /// returned once, as [`ErrorKind::Io`](crate::ErrorKind::Io)).
    pub(crate) fn next_line(&mut self) -> Option<Result<TextLine, Error>> {
        while !self.done {
            let max = self.max_line_bytes;
            let line = match read_bounded_line(&mut self.reader, &mut self.buf, max) {
                Ok(Line::Eof) => break,
                Ok(line) => line,
                Err(source) => {
                    self.done = true;
                    return Some(Err(Error::io(self.path.clone(), source)));
                }
            };
            self.line += 1;
            let text = match std::str::from_utf8(&self.buf) {
                _ if line == Line::TooLong => Err(format!("line longer than the {max} byte limit")),
                Err(e) => Err(format!(
                    "invalid UTF-8 at byte {} of the line",
                    e.valid_up_to()
                )),
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => Ok(TextLine {
                    text: text.to_owned(),
                    ended: line == Line::Ended,
                }),
            };
            return Some(text.map_err(|message| self.err(message)));
        }
        self.done = true;
        None
    }

    /// Gives a line's buffer back for the next read (saves an allocation per line).
    pub(crate) fn recycle(&mut self, line: TextLine) {
        self.buf = line.text.into_bytes();
    }
}

/// Reads the next line that is not blank into `line`, as it is (bytes, line ending and all,
/// with no length limit); `false` at the end of the input.
pub(crate) fn next_nonblank_line(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
) -> io::Result<bool> {
    loop {
        line.clear();
        if reader.read_until(b'\n', line)? == 0 {
            return Ok(false);
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            return Ok(true);
        }
    }
}

/// What [`read_bounded_line`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Line {
    /// The end of the input: nothing was read.
    Eof,
    /// A line that ended with `\n`; the buffer holds it without its line ending.
    Ended,
    /// The last line of the input, with no `\n` after it (a file whose writer was killed
    /// mid-line ends so); the buffer holds it.
    Unended,
    /// A line longer than the limit; it was read past (up to and including its `\n`, or to the
    /// end of the input) and the buffer is empty.
    TooLong,
}

/// Reads one line from `reader` into `buf` (cleared first), holding at most `max + 2` bytes of
/// it in memory whatever the length of the line.
///
/// The line ending is `\n` or `\r\n` and is not part of the line: a line is accepted when it
/// has at most `max` bytes without its ending, and is [`Line::TooLong`] otherwise. A `\r` at
/// the very end of the input with no `\n` after it is part of the line. Reads interrupted by a
/// signal are retried.
///
/// # Errors
///
/// Any I/O error of `reader` other than [`io::ErrorKind::Interrupted`]; the line read so far
/// is then lost.
pub(crate) fn read_bounded_line<R: BufRead + ?Sized>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    buf.clear();
    // Room for the line and its `\r\n`.
    let room = max.saturating_add(2) as u64;
    if io::Read::take(&mut *reader, room).read_until(b'\n', buf)? == 0 {
        return Ok(Line::Eof);
    }
    let ended = buf.last() == Some(&b'\n');
    if ended {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if buf.len() as u64 == room {
        // Out of room before the line's end: read past the rest of it.
        reader.skip_until(b'\n')?;
    }
    if buf.len() > max {
        buf.clear();
        return Ok(Line::TooLong);
    }
    Ok(if ended { Line::Ended } else { Line::Unended })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Read};

    /// Every line of `input` read with `max`, through buffers of several sizes (so that lines
    /// cross `fill_buf` boundaries), as (outcome, bytes) pairs; all sizes must agree.
    fn lines(input: &[u8], max: usize) -> Vec<(Line, Vec<u8>)> {
        let mut all: Vec<Vec<(Line, Vec<u8>)>> = Vec::new();
        for capacity in [1, 2, 3, 7, 1 << 16] {
            let mut reader = BufReader::with_capacity(capacity, input);
            let mut buf = Vec::new();
            let mut out = Vec::new();
            loop {
                let line = read_bounded_line(&mut reader, &mut buf, max).unwrap();
                if line == Line::Eof {
                    break;
                }
                out.push((line, buf.clone()));
            }
            all.push(out);
        }
        for other in &all[1..] {
            assert_eq!(other, &all[0]);
        }
        all.swap_remove(0)
    }

    fn ended(s: &str) -> (Line, Vec<u8>) {
        (Line::Ended, s.as_bytes().to_vec())
    }

    const TOO_LONG: (Line, Vec<u8>) = (Line::TooLong, Vec::new());

    #[test]
    fn the_limit_is_the_longest_line_without_its_ending() {
        assert_eq!(lines(b"12345\n", 5), [ended("12345")]);
        assert_eq!(lines(b"123456\n", 5), [TOO_LONG]);
        assert_eq!(lines(b"12345\r\n", 5), [ended("12345")]);
        assert_eq!(lines(b"123456\r\n", 5), [TOO_LONG]);
        assert_eq!(lines(b"1234\r\r\n", 5), [ended("1234\r")]);
        assert_eq!(lines(b"12345", 5), [(Line::Unended, b"12345".to_vec())]);
        assert_eq!(lines(b"123456", 5), [TOO_LONG]);
        // A `\r` with no `\n` after it is part of the line.
        assert_eq!(lines(b"1234\r", 5), [(Line::Unended, b"1234\r".to_vec())]);
        assert_eq!(lines(b"12345\r", 5), [TOO_LONG]);
        assert_eq!(lines(b"\n", 0), [ended("")]);
        assert_eq!(lines(b"\r\nx\n", 0), [ended(""), TOO_LONG]);
    }

    #[test]
    fn a_long_line_is_read_past_and_the_next_lines_are_whole() {
        let mut input = vec![b'x'; 1000];
        input.extend_from_slice(b"\nab\r\n\ncd");
        assert_eq!(
            lines(&input, 5),
            [
                TOO_LONG,
                ended("ab"),
                ended(""),
                (Line::Unended, b"cd".to_vec())
            ]
        );
        assert_eq!(lines(b"abc\n1234567890", 5), [ended("abc"), TOO_LONG]);
        assert!(lines(b"", 5).is_empty());
    }

    #[test]
    fn interrupted_reads_are_retried_and_other_errors_returned() {
        struct Flaky {
            data: &'static [u8],
            calls: usize,
        }
        impl Read for Flaky {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                self.calls += 1;
                match self.calls {
                    1 | 3 => Err(io::ErrorKind::Interrupted.into()),
                    5 => Err(io::Error::other("disk on fire")),
                    _ => {
                        let n = out.len().min(2).min(self.data.len());
                        out[..n].copy_from_slice(&self.data[..n]);
                        self.data = &self.data[n..];
                        Ok(n)
                    }
                }
            }
        }
        let mut reader = BufReader::with_capacity(
            2,
            Flaky {
                data: b"abc\nmore",
                calls: 0,
            },
        );
        let mut buf = Vec::new();
        assert_eq!(
            read_bounded_line(&mut reader, &mut buf, 10).unwrap(),
            Line::Ended
        );
        assert_eq!(buf, b"abc");
        let err = read_bounded_line(&mut reader, &mut buf, 10).unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
    }
}
