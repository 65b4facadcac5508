//! The JSONL example writer.

use std::io::Write;

use crate::example::{ExampleFormat, PreferenceExample};

/// Writes examples as JSON lines in one of the two formats.
///
/// Each example is serialised into a buffer first and written with one `write_all`, so a
/// reader of the file never sees half a line unless the process dies mid-write.
#[derive(Debug)]
pub struct ExampleWriter<W: Write> {
    out: W,
    format: ExampleFormat,
    buf: Vec<u8>,
    written: u64,
}

impl<W: Write> ExampleWriter<W> {
    /// A writer of `format` lines into `out` (wrap files in a `BufWriter` or flush per line as
    /// you need).
    pub fn new(out: W, format: ExampleFormat) -> Self {
        ExampleWriter {
            out,
            format,
            buf: Vec::with_capacity(4096),
            written: 0,
        }
    }

    /// Writes one example as one line.
    ///
    /// # Errors
    ///
    /// The underlying writer's error.
    pub fn write(&mut self, example: &PreferenceExample) -> std::io::Result<()> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, &example.formatted(self.format))
            .map_err(std::io::Error::other)?;
        self.buf.push(b'\n');
        self.out.write_all(&self.buf)?;
        self.written += 1;
        Ok(())
    }

    /// Flushes the underlying writer.
    ///
    /// # Errors
    ///
    /// The underlying writer's error.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// How many examples were written.
    #[must_use]
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The format.
    #[must_use]
    pub fn format(&self) -> ExampleFormat {
        self.format
    }

    /// Flushes and returns the underlying writer.
    ///
    /// # Errors
    ///
    /// The flush error.
    pub fn into_inner(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}
