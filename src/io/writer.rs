//! The JSONL example writer.

use std::io::Write;
use std::path::PathBuf;

use crate::example::{ExampleFormat, PreferenceExample};
use crate::Error;

/// Writes examples as JSON lines in one of the two formats.
///
/// Each example is serialised into a line first and written with one `write_all`, so a
/// reader of the file never sees half a line unless the process dies mid-write.
#[derive(Debug)]
pub struct ExampleWriter<W: Write> {
    out: W,
    format: ExampleFormat,
    name: PathBuf,
}

impl<W: Write> ExampleWriter<W> {
    /// A writer of `format` lines into `out` (wrap files in a `BufWriter` or flush per line as
    /// you need).
    pub fn new(out: W, format: ExampleFormat) -> Self {
        ExampleWriter {
            out,
            format,
            name: PathBuf::from("<output>"),
        }
    }

    /// The name errors give for the destination (a path; default `<output>`).
    #[must_use]
    pub fn named(mut self, name: impl Into<PathBuf>) -> Self {
        self.name = name.into();
        self
    }

    /// Writes one example as one line.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) with the underlying writer's error.
    pub fn write(&mut self, example: &PreferenceExample) -> Result<(), Error> {
        let mut line = example.to_json_line(self.format);
        line.push('\n');
        self.out
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(self.name.clone(), e))
    }

    /// Flushes the underlying writer.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) with the underlying writer's error.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.out
            .flush()
            .map_err(|e| Error::io(self.name.clone(), e))
    }

    /// Flushes and returns the underlying writer.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) with the flush error.
    pub fn into_inner(mut self) -> Result<W, Error> {
        self.flush()?;
        Ok(self.out)
    }
}
