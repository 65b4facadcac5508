//! [`ParquetWriter`]: examples as Parquet rows, with the columns of the JSONL.

use std::io::Write;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::OffsetBufferBuilder;
use arrow_array::{
    Array, ArrayRef, Float64Array, ListArray, RecordBatch, StringArray, StructArray,
};
use arrow_schema::{DataType, Field, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;

use crate::backend::Role;
use crate::example::{ExampleFormat, PreferenceExample};
use crate::Error;

/// Rows buffered in memory before they are handed to the Parquet encoder.
const BATCH_ROWS: usize = 1024;

/// A row group ends once its encoded size reaches about this many bytes.
const BYTES_PER_GROUP: usize = 128 << 20;

/// Row-group settings of a [`ParquetWriter`]; every setter documents its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct ParquetOptions {
    rows_per_group: NonZeroUsize,
}

impl Default for ParquetOptions {
    fn default() -> Self {
        ParquetOptions {
            rows_per_group: NonZeroUsize::new(10_000).expect("non-zero"),
        }
    }
}

impl ParquetOptions {
    /// The defaults: row groups of at most 10,000 rows and about 128 MiB encoded, so a
    /// reader that streams the file (`datasets` with `streaming=True`, the Hub's viewer)
    /// holds one small group at a time.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// At most this many rows per row group. Default 10,000.
        rows_per_group(rows: NonZeroUsize) => rows_per_group = rows;
    }
}

/// What a [`ParquetWriter`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ParquetStats {
    /// Rows (examples).
    pub rows: u64,
    /// Row groups.
    pub row_groups: usize,
    /// Bytes of the whole file.
    pub bytes: u64,
}

/// A buffered row: the example and its metadata as JSON text.
type Row = (PreferenceExample, String);

/// The rows as columns: the JSONL's columns in its order, `grade` and `margin` nullable (see
/// the [module docs](super)).
fn record_batch(rows: &[Row], format: ExampleFormat) -> RecordBatch {
    let standard = format == ExampleFormat::Standard;
    let text = |f: &dyn Fn(&Row) -> &str| strings(rows.iter().map(f));
    let answer = |f: &dyn Fn(&Row) -> &str| match standard {
        true => text(f),
        false => turns(rows.iter().map(|row| [(Role::Assistant, f(row))])),
    };
    let prompt = match standard {
        true => strings(rows.iter().map(|(e, _)| e.prompt_text())),
        false => turns(
            rows.iter()
                .map(|(e, _)| e.prompt.iter().map(|m| (m.role, m.content.as_str()))),
        ),
    };
    let grades = StringArray::from_iter(rows.iter().map(|(e, _)| e.grade.map(|g| g.as_str())));
    let aspects = strings(rows.iter().flat_map(|(e, _)| &e.aspects));
    let aspects = list(
        DataType::Utf8,
        rows.iter().map(|(e, _)| e.aspects.len()),
        aspects,
    );
    let margins = Float64Array::from_iter(rows.iter().map(|(e, _)| e.margin));
    let columns: [(&str, ArrayRef, bool); 9] = [
        ("id", text(&|(e, _)| &e.id), false),
        ("prompt", prompt, false),
        ("chosen", answer(&|(e, _)| &e.chosen), false),
        ("rejected", answer(&|(e, _)| &e.rejected), false),
        ("label", text(&|(e, _)| e.label.as_str()), false),
        ("grade", Arc::new(grades), true),
        ("aspects", aspects, false),
        ("margin", Arc::new(margins), true),
        ("metadata", text(&|(_, m)| m), false),
    ];
    RecordBatch::try_from_iter_with_nullable(columns).expect("columns of one length")
}

/// A string column of `values`.
fn strings<S: AsRef<str>>(values: impl Iterator<Item = S>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

/// The columns' names and types (those of [`record_batch`]).
pub(super) fn schema(format: ExampleFormat) -> SchemaRef {
    record_batch(&[], format).schema()
}

/// A list column of `item`s: each row's length, and the items of all rows in `values`.
fn list(item: DataType, lengths: impl Iterator<Item = usize>, values: ArrayRef) -> ArrayRef {
    let mut offsets = OffsetBufferBuilder::new(BATCH_ROWS);
    lengths.for_each(|n| offsets.push_length(n));
    let field = Arc::new(Field::new_list_field(item, true));
    Arc::new(ListArray::new(field, offsets.finish(), values, None))
}

/// A column of conversations: per row, its turns as {`role`, `content`} structs.
fn turns<'a, T: IntoIterator<Item = (Role, &'a str)>>(rows: impl Iterator<Item = T>) -> ArrayRef {
    let (mut lengths, mut roles, mut contents) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let before = roles.len();
        for (role, content) in row {
            roles.push(role.as_str());
            contents.push(content);
        }
        lengths.push(roles.len() - before);
    }
    let field = |name| Arc::new(Field::new(name, DataType::Utf8, false));
    let values = StructArray::from(vec![
        (field("role"), strings(roles.into_iter())),
        (field("content"), strings(contents.into_iter())),
    ]);
    list(
        values.data_type().clone(),
        lengths.into_iter(),
        Arc::new(values),
    )
}

/// Writes [`PreferenceExample`]s as the rows of one Parquet file, into any
/// `std::io::Write + Send` (a file, a `Vec<u8>`, ...), with the columns of the JSONL in
/// `format` (see the [module docs](super)), Snappy-compressed.
///
/// Rows are buffered (about a thousand at a time) and encoded into row groups of
/// [`ParquetOptions`]' size; [`finish`](Self::finish) writes the last group and the footer.
/// A file is only readable once finished: write to a temporary name and rename it (as
/// [`DatasetExport`](super::DatasetExport) does) if a crash must not leave a broken file
/// behind.
///
/// ```
/// use rmboost::export::ParquetWriter;
/// use rmboost::{ExampleFormat, Label, Message, PreferenceExample};
///
/// let example = PreferenceExample {
///     id: "q1".into(),
///     prompt: vec![Message::user("Why is the sky blue?")],
///     chosen: "Rayleigh scattering.".into(),
///     rejected: "Because.".into(),
///     label: Label::Better,
///     grade: None,
///     aspects: vec!["correctness".into()],
///     margin: None,
///     metadata: Default::default(),
/// };
/// let mut writer = ParquetWriter::new(Vec::new(), ExampleFormat::Conversational)?;
/// writer.write(&example)?;
/// let (bytes, stats) = writer.finish()?;
/// assert_eq!((stats.rows, stats.row_groups), (1, 1));
/// assert!(bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1"));
/// # Ok::<(), rmboost::Error>(())
/// ```
pub struct ParquetWriter<W: Write + Send> {
    writer: ArrowWriter<Counting<W>>,
    /// The rows not yet encoded, and the bytes of their text (an estimate of their size).
    batch: Vec<Row>,
    batch_bytes: usize,
    format: ExampleFormat,
    rows: u64,
    name: PathBuf,
}

impl<W: Write + Send> std::fmt::Debug for ParquetWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetWriter")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Counts the bytes that reach the destination (the footer included).
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An error of the encoder as an I/O error of the destination `name` (the destination's own
/// error when it is one).
fn parquet_err(name: &Path, e: ParquetError) -> Error {
    let io = match e {
        ParquetError::External(inner) => inner
            .downcast::<std::io::Error>()
            .map_or_else(std::io::Error::other, |io| *io),
        other => std::io::Error::other(other),
    };
    Error::io(name, io)
}

impl<W: Write + Send> ParquetWriter<W> {
    /// A writer of `format` rows into `out`, with the default [`ParquetOptions`].
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the file header cannot be written.
    pub fn new(out: W, format: ExampleFormat) -> Result<Self, Error> {
        Self::with_options(out, format, ParquetOptions::default())
    }

    /// A writer of `format` rows into `out`, with row groups sized by `options`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the file header cannot be written.
    pub fn with_options(
        out: W,
        format: ExampleFormat,
        options: ParquetOptions,
    ) -> Result<Self, Error> {
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(options.rows_per_group.get()))
            .set_max_row_group_bytes(Some(BYTES_PER_GROUP))
            .set_created_by(format!(
                "rmboost version {} (parquet-rs)",
                env!("CARGO_PKG_VERSION")
            ))
            .build();
        let name = PathBuf::from("<parquet>");
        let out = Counting {
            inner: out,
            bytes: 0,
        };
        let writer = ArrowWriter::try_new(out, schema(format), Some(props))
            .map_err(|e| parquet_err(&name, e))?;
        Ok(ParquetWriter {
            writer,
            batch: Vec::with_capacity(BATCH_ROWS),
            batch_bytes: 0,
            format,
            rows: 0,
            name,
        })
    }

    setters! {
        /// The name errors give for the destination (a path; default `<parquet>`).
        #[must_use]
        named(name: impl Into<PathBuf>) => name = name.into();
    }

    /// Adds one example as one row.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if encoded rows cannot be written to the
    /// destination.
    pub fn write(&mut self, e: &PreferenceExample) -> Result<(), Error> {
        let metadata =
            serde_json::to_string(&e.metadata).expect("metadata serialises: its keys are strings");
        self.batch_bytes += e.id.len()
            + e.prompt.iter().map(|m| m.content.len()).sum::<usize>()
            + e.chosen.len()
            + e.rejected.len()
            + metadata.len();
        self.batch.push((e.clone(), metadata));
        self.rows += 1;
        if self.batch.len() >= BATCH_ROWS || self.batch_bytes >= 16 << 20 {
            self.write_batch()?;
        }
        Ok(())
    }

    fn write_batch(&mut self) -> Result<(), Error> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = record_batch(&self.batch, self.format);
        self.batch.clear();
        self.batch_bytes = 0;
        self.writer
            .write(&batch)
            .map_err(|e| parquet_err(&self.name, e))
    }

    /// Rows written so far.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// About how large the file would be if finished now, in bytes: what is written, plus
    /// the encoded size of the current row group, plus the text buffered before encoding.
    #[must_use]
    pub fn estimated_bytes(&self) -> u64 {
        (self.writer.bytes_written() + self.writer.in_progress_size() + self.batch_bytes) as u64
    }

    /// Writes the last row group and the footer; returns the destination and what was
    /// written.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if the rest of the file cannot be written.
    pub fn finish(mut self) -> Result<(W, ParquetStats), Error> {
        self.write_batch()?;
        let name = &self.name;
        self.writer.flush().map_err(|e| parquet_err(name, e))?;
        let row_groups = self.writer.flushed_row_groups().len();
        // Writes the footer once (`ArrowWriter::finish` and then `into_inner` would write it
        // twice).
        let mut out = self.writer.into_inner().map_err(|e| parquet_err(name, e))?;
        out.flush().map_err(|e| Error::io(name, e))?;
        let stats = ParquetStats {
            rows: self.rows,
            row_groups,
            bytes: out.bytes,
        };
        Ok((out.inner, stats))
    }
}
