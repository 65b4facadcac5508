//! Hub-ready datasets (feature `parquet`): a folder that Hugging Face `datasets.load_dataset`
//! and `hf upload` take as it is.
//!
//! [`DatasetExport`] writes, from a JSONL file ([`DatasetExport::from_jsonl`]) or from any
//! stream of examples ([`DatasetExport::create`], then [`DatasetWriter::write`] per example):
//!
//! ```text
//! DIR/
//!   README.md                            the dataset card
//!   data/train-00000-of-00002.parquet    the rows, split into files of a bounded size
//!   data/train-00001-of-00002.parquet
//!   data/test-00000-of-00001.parquet     with a test fraction
//! ```
//!
//! **Columns**: those of the JSONL in its format (see [`ParquetWriter`]):
//!
//! | column | type | |
//! |---|---|---|
//! | `id` | string | |
//! | `prompt` | list of struct {`role`: string, `content`: string}, or string | the conversation; its text in the standard format |
//! | `chosen`, `rejected` | list of struct {`role`, `content`} (one assistant turn), or string | |
//! | `label` | string | `better` or `worse` |
//! | `grade` | string, nullable | `slightly` or `much` for graded labels, else null |
//! | `aspects` | list of string | |
//! | `margin` | float64, nullable | |
//! | `metadata` | string | the JSONL's `metadata` object as JSON text |
//!
//! `metadata` is free-form (method-specific fields, the input record's extra fields), so it
//! is kept as JSON text (`json.loads` reads it back): a struct column needs one schema for
//! every row, and a key present in some rows only would make the files of one dataset
//! disagree, which `datasets` refuses. `grade` is in every row (null without a graded label),
//! where the JSONL leaves it out.
//!
//! **Splits** ([`split_of`]): with a test fraction `f`, an example goes to `test` when the
//! first 8 bytes of SHA-256 of `"rmboost/split/v1\0"` followed by its id, read as a
//! little-endian integer `u`, satisfy `u < f × 2⁶⁴`; otherwise to `train`. The split of an id
//! never changes when the dataset grows or is regenerated, and other tools can reproduce it:
//!
//! ```python
//! import hashlib
//! def is_test(id: str, f: float) -> bool:
//!     d = hashlib.sha256(b"rmboost/split/v1\0" + id.encode()).digest()
//!     return int.from_bytes(d[:8], "little") < f * 2**64
//! ```
//!
//! **Files**: row groups of at most 10,000 rows (about 128 MiB; [`ParquetOptions`]) for
//! streaming readers; a new file starts after [`DatasetExport::rows_per_file`] rows or about
//! [`DatasetExport::bytes_per_file`] bytes (256 MiB by default), named
//! `{split}-{i:05}-of-{n:05}.parquet` as the Hub names them.
//!
//! **The card** (`README.md`): YAML front matter (`configs` with the data files of each
//! split, `dataset_info` with the features and split sizes, task categories, tags, size
//! category), then the recipe the data was made with (the `PAIRS.run.json` a run records),
//! the models recorded in the examples' metadata, the figures of the
//! [quality report](crate::report::Report) (computed by the same code as `rmboost report`),
//! and how to load the data with `datasets` and train on it with TRL.
//!
//! **Safety**: the input is only read. Everything is written into a hidden folder inside
//! `DIR`, `.rmboost-export-<random>`, and moved into place at the end (`data/` and
//! `README.md`, each one rename), so a crash or an error leaves no partial file under a final
//! name. A folder that is not empty is refused unless [`overwrite`](DatasetExport::overwrite)
//! is on; then `data/` and `README.md` are replaced and anything else in the folder (a
//! `.git`, a licence) is left alone.
//!
//! **Leftovers of a killed export**: an error removes the hidden folder, but a process that
//! is killed (`kill -9`, a power loss) cannot. The next export into the same `DIR` removes
//! such leftovers before it looks at the folder, so they neither pile up nor make `DIR` look
//! not empty. Only folders an export made are removed: a hidden folder is one when its name
//! starts with `.rmboost-export-` and it holds the marker file `rmboost-export.lock`, which
//! the export writes first and keeps locked (an exclusive advisory lock, as a run holds its
//! output) until it ends; a folder whose marker another export still holds is left alone, as
//! is anything without the marker.
//!
//! ```
//! use rmboost::export::{DatasetExport, Split};
//! use rmboost::{ExampleFormat, Label, Message, PreferenceExample};
//!
//! let example = |id: &str| PreferenceExample {
//!     id: id.into(),
//!     prompt: vec![Message::user("Why is the sky blue?")],
//!     chosen: "Rayleigh scattering.".into(),
//!     rejected: "Because.".into(),
//!     label: Label::Better,
//!     grade: None,
//!     aspects: vec!["correctness".into()],
//!     margin: None,
//!     metadata: Default::default(),
//! };
//! let dir = tempfile::tempdir().unwrap();
//! let mut writer = DatasetExport::new(dir.path())
//!     .test_fraction(0.5)
//!     .create(ExampleFormat::Conversational)?;
//! for i in 0..20 {
//!     writer.write(&example(&format!("q{i}")))?;
//! }
//! let summary = writer.finish()?;
//! assert_eq!(summary.rows(), 20);
//! assert!(summary.split(Split::Test).unwrap().rows > 0);
//! assert!(dir.path().join("README.md").is_file());
//! assert!(dir.path().join("data/train-00000-of-00001.parquet").is_file());
//! # Ok::<(), rmboost::Error>(())
//! ```

mod card;
mod parquet;
mod staging;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub(crate) use self::card::render_card;
pub use self::parquet::{ParquetOptions, ParquetStats, ParquetWriter};
use self::staging::Staging;
use crate::example::{ExampleFormat, PreferenceExample};
use crate::io::append::{if_exists, sync_parent, write_replacing};
use crate::io::{read_dataset, sidecar, IdSet};
use crate::report::{Report, ReportBuilder};
use crate::Error;

crate::error::named_enum! {
/// The split an example belongs to; [`as_str`](Self::as_str) gives its name on the Hub and in
/// file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Split {
    /// Training data.
    Train = "train",
    /// Held-out data.
    Test = "test",
}
}

/// The split of `id` with a share `test_fraction` of test examples: `Test` when the first 8
/// bytes of SHA-256 of `"rmboost/split/v1\0"` + `id`, as a little-endian integer `u`, satisfy
/// `u < test_fraction × 2⁶⁴` (exactly: the comparison is made on integers). A fraction of 0
/// or less (or NaN) puts every id in `Train`, 1 or more every id in `Test`.
///
/// Stable across runs, machines and releases (a golden test pins it), independent of the
/// other ids, and unrelated to the shard of the id (another hash input). Raising the fraction
/// only moves ids from train to test.
///
/// ```
/// use rmboost::export::{split_of, Split};
///
/// assert_eq!(split_of("q1", 0.0), Split::Train);
/// assert_eq!(split_of("q1", 1.0), Split::Test);
/// let test = (0..10_000).filter(|i| split_of(&format!("id-{i}"), 0.1) == Split::Test).count();
/// assert!((900..1100).contains(&test));
/// ```
#[must_use]
pub fn split_of(id: &str, test_fraction: f64) -> Split {
    let d = Sha256::new()
        .chain_update(b"rmboost/split/v1\0")
        .chain_update(id)
        .finalize();
    let u = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
    // × 2⁶⁴ is exact; for an integer u, u < x ⟺ u < ⌈x⌉, and the cast to u128 is exact for
    // ⌈x⌉ below 2¹²⁸ (it saturates above, and takes NaN and negatives to 0).
    if u128::from(u) < (test_fraction * 2f64.powi(64)).ceil() as u128 {
        Split::Test
    } else {
        Split::Train
    }
}

/// One split of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SplitSummary {
    /// Which split.
    pub split: Split,
    /// Its examples.
    pub rows: u64,
    /// Its files, relative to the folder (`data/train-00000-of-00001.parquet`, ...).
    pub files: Vec<String>,
    /// Bytes of its files.
    pub bytes: u64,
}

/// What an export wrote; also what the dataset card is made from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExportSummary {
    /// The folder.
    pub dir: PathBuf,
    /// The format of the rows.
    pub format: ExampleFormat,
    /// The share of examples asked for the test split.
    pub test_fraction: f64,
    /// The splits that have rows (`train` alone without a test fraction; `train` with no
    /// rows for an empty dataset).
    pub splits: Vec<SplitSummary>,
    /// The quality report of all the examples (and of the failure ledger, when one was
    /// given).
    pub report: Report,
    /// The settings the data was made with (a run's recipe), if known.
    pub recipe: Option<BTreeMap<String, String>>,
    /// The models that answered, by call (`first`, `second`, ...) and model id, with the
    /// number of examples: from `metadata.models`.
    pub models: BTreeMap<String, BTreeMap<String, u64>>,
    /// The title of the card (the folder's name unless set).
    pub title: String,
}

impl ExportSummary {
    /// All examples written.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.splits.iter().map(|s| s.rows).sum()
    }

    /// One split, if it has rows.
    #[must_use]
    pub fn split(&self, split: Split) -> Option<&SplitSummary> {
        self.splits.iter().find(|s| s.split == split)
    }

    /// Bytes of all Parquet files.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.splits.iter().map(|s| s.bytes).sum()
    }
}

/// Settings of an export into a folder; every setter documents its default. See the
/// [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct DatasetExport {
    dir: PathBuf,
    test_fraction: f64,
    rows_per_file: u64,
    bytes_per_file: u64,
    parquet: ParquetOptions,
    overwrite: bool,
    recipe: Option<BTreeMap<String, String>>,
    ledger: Option<PathBuf>,
    title: Option<String>,
}

impl DatasetExport {
    /// An export into the folder `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DatasetExport {
            dir: dir.into(),
            test_fraction: 0.0,
            rows_per_file: u64::MAX,
            bytes_per_file: 256 << 20,
            parquet: ParquetOptions::default(),
            overwrite: false,
            recipe: None,
            ledger: None,
            title: None,
        }
    }

    setters! {
        /// The share of examples in the `test` split, in `[0, 1]` ([`split_of`]). Default 0: a
        /// `train` split only.
        test_fraction(fraction: f64) => test_fraction = fraction;
        /// At most this many rows per file. Default: no limit (files are bounded by
        /// [`bytes_per_file`](Self::bytes_per_file)).
        rows_per_file(rows: u64) => rows_per_file = rows;
        /// A file ends once it reaches about this many bytes (checked every thousand rows or
        /// so). Default 256 MiB.
        bytes_per_file(bytes: u64) => bytes_per_file = bytes;
        /// Row-group sizes. Default [`ParquetOptions::default`].
        parquet_options(options: ParquetOptions) => parquet = options;
        /// Whether a folder that is not empty may be written into, replacing its `data/` and
        /// `README.md`. Default `false`: such a folder is refused.
        overwrite(overwrite: bool) => overwrite = overwrite;
        /// A failure ledger to count failures from, for the card's failure rate. Default: none,
        /// or for [`from_jsonl`](Self::from_jsonl) the ledger beside the file
        /// (`PAIRS.failures.jsonl`) when there is one.
        ledger(path: impl Into<PathBuf>) => ledger = Some(path.into());
        /// The title of the card. Default: the folder's name.
        title(title: impl Into<String>) => title = Some(title.into());
    }

    /// The settings the data was made with, for the card. Default: none, or for
    /// [`from_jsonl`](Self::from_jsonl) the recipe recorded beside the file
    /// (`PAIRS.run.json`) when there is one.
    pub fn recipe<K: Into<String>, V: Into<String>>(
        mut self,
        settings: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let settings = settings.into_iter().map(|(k, v)| (k.into(), v.into()));
        self.recipe = Some(settings.collect());
        self
    }

    /// Starts writing the folder, for examples in `format`; write them with
    /// [`DatasetWriter::write`] and end with [`DatasetWriter::finish`]. Dropping the writer
    /// before `finish` removes what it wrote and leaves the folder as it was.
    ///
    /// First the hidden staging folders that killed exports left in the folder are removed
    /// (those no running export holds; see the [module docs](self)).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) for a test fraction outside `[0, 1]`,
    /// zero rows or bytes per file, or a folder that is not empty without
    /// [`overwrite`](Self::overwrite) (or is a file); [`ErrorKind::Io`](crate::ErrorKind::Io)
    /// if the folder cannot be created or written, a ledger given cannot be read, or a
    /// killed export's staging folder cannot be removed.
    pub fn create(self, format: ExampleFormat) -> Result<DatasetWriter, Error> {
        if !(0.0..=1.0).contains(&self.test_fraction) {
            return Err(Error::config(format!(
                "test fraction {}: expected a number from 0 to 1",
                self.test_fraction
            )));
        }
        for (n, what) in [(self.rows_per_file, "rows"), (self.bytes_per_file, "bytes")] {
            if n == 0 {
                return Err(Error::config(format!(
                    "{what} per file: expected at least 1"
                )));
            }
        }
        let dir = &self.dir;
        if std::fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
            return Err(Error::config(format!(
                "{} is a file: export into a folder",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        staging::remove_stale(dir)?;
        let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        if entries.next().is_some() && !self.overwrite {
            return Err(Error::config(format!(
                "{} is not empty: export into a new or empty folder, or replace its \
                 data/ and README.md (--force)",
                dir.display()
            )));
        }
        let staging = Staging::create(dir)?;
        let data = staging.path().join("data");
        std::fs::create_dir(&data).map_err(|e| Error::io(&data, e))?;
        let mut report = ReportBuilder::new();
        if let Some(ledger) = &self.ledger {
            report.read_ledger(ledger)?;
        }
        let title = self.title.clone().unwrap_or_else(|| {
            std::fs::canonicalize(dir)
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "rmboost dataset".into())
        });
        Ok(DatasetWriter {
            settings: self,
            format,
            staging,
            splits: Default::default(),
            ids: IdSet::new(),
            report,
            models: BTreeMap::new(),
            title,
        })
    }

    /// Exports a JSONL file of examples (either format, read strictly: see
    /// [`DatasetReader`](crate::io::DatasetReader)). The recipe and ledger beside it
    /// (`PAIRS.run.json`, `PAIRS.failures.jsonl`) are used for the card when present and
    /// not set otherwise. The file is only read.
    ///
    /// # Errors
    ///
    /// As [`create`](Self::create); [`ErrorKind::Parse`](crate::ErrorKind::Parse) naming the
    /// file and line of a torn last line, a line that is not an example, a line of another
    /// format than the first, or a duplicate id (with the line of its first occurrence), and
    /// of a recipe that is not one; [`ErrorKind::Config`](crate::ErrorKind::Config) if the
    /// input is inside the folder's `data/` or is its `README.md`. Nothing is left in the
    /// folder after an error.
    pub fn from_jsonl(mut self, input: impl AsRef<Path>) -> Result<ExportSummary, Error> {
        let input = input.as_ref();
        // The first line's format (and that the file opens) before touching the folder.
        let mut rows = read_dataset(input)?;
        let first = rows.next().transpose()?;
        let format = first
            .as_ref()
            .map_or(ExampleFormat::Conversational, |row| row.format);
        self.refuse_own_files(input)?;
        if self.recipe.is_none() {
            self.recipe = read_recipe(&sidecar(input, ".run.json"))?;
        }
        let ledger = sidecar(input, ".failures.jsonl");
        if self.ledger.is_none() && ledger.is_file() {
            self.ledger = Some(ledger);
        }
        let mut writer = self.create(format)?;
        for row in first.into_iter().map(Ok).chain(rows) {
            let row = row?;
            if writer.ids.contains(&row.example.id) {
                let first = first_line_of(input, &row.example.id)?;
                return Err(Error::parse(
                    input,
                    row.line,
                    format!(
                        "duplicate id `{}` (first at line {first}): a dataset has each id \
                         once; `rmboost merge` joins shards keeping one of identical copies",
                        row.example.id
                    ),
                ));
            }
            writer.write(&row.example)?;
        }
        writer.finish()
    }

    /// Refuses an input that replacing `data/` or `README.md` would delete.
    fn refuse_own_files(&self, input: &Path) -> Result<(), Error> {
        let (Ok(input), Ok(dir)) = (
            std::fs::canonicalize(input),
            std::fs::canonicalize(&self.dir),
        ) else {
            return Ok(());
        };
        if input.starts_with(dir.join("data")) || input == dir.join("README.md") {
            return Err(Error::config(format!(
                "the input {} is part of the export folder {} (its data/ or README.md, which \
                 an export replaces): export into another folder",
                input.display(),
                dir.display()
            )));
        }
        Ok(())
    }
}

/// The line of the first example with `id` in `path` (for a duplicate's message).
fn first_line_of(path: &Path, id: &str) -> Result<u64, Error> {
    for row in read_dataset(path)? {
        let row = row?;
        if row.example.id == id {
            return Ok(row.line);
        }
    }
    Ok(0)
}

/// The settings of a run recipe file (`{"settings": {...}}`), if the file exists.
fn read_recipe(path: &Path) -> Result<Option<BTreeMap<String, String>>, Error> {
    #[derive(serde::Deserialize)]
    struct Recipe {
        settings: BTreeMap<String, Value>,
    }
    let Some(bytes) = if_exists(path, std::fs::read)? else {
        return Ok(None);
    };
    let recipe: Recipe = serde_json::from_slice(&bytes)
        .map_err(|e| Error::parse(path, e.line() as u64, format!("not a run recipe: {e}")))?;
    let settings = recipe.settings.into_iter().map(|(k, v)| match v {
        Value::String(s) => (k, s),
        other => (k, other.to_string()),
    });
    Ok(Some(settings.collect()))
}

/// The files of one split: the one being written, and the stats of those done (the `i`th at
/// [`DatasetWriter::staged`]`(split, i)`).
#[derive(Debug, Default)]
struct OpenSplit {
    current: Option<ParquetWriter<BufWriter<File>>>,
    done: Vec<ParquetStats>,
}

/// Writes the examples of an export one at a time ([`DatasetExport::create`]); [`finish`]
/// puts the folder in place.
///
/// [`finish`]: DatasetWriter::finish
#[derive(Debug)]
pub struct DatasetWriter {
    settings: DatasetExport,
    format: ExampleFormat,
    staging: Staging,
    splits: [OpenSplit; 2],
    ids: IdSet,
    report: ReportBuilder,
    models: BTreeMap<String, BTreeMap<String, u64>>,
    title: String,
}

impl DatasetWriter {
    /// Adds one example to its split.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) for an id already written (a dataset
    /// has each id once); [`ErrorKind::Io`](crate::ErrorKind::Io) if a file cannot be
    /// written.
    pub fn write(&mut self, example: &PreferenceExample) -> Result<(), Error> {
        if !self.ids.insert(&example.id) {
            return Err(Error::config(format!(
                "duplicate id `{}`: a dataset has each id once",
                example.id
            )));
        }
        let settings = &self.settings;
        let (rows, bytes) = (settings.rows_per_file, settings.bytes_per_file);
        let split = split_of(&example.id, settings.test_fraction);
        let writer = self.open(split)?;
        writer.write(example)?;
        if writer.rows() >= rows || writer.estimated_bytes() >= bytes {
            self.close(split)?;
        }
        self.report.add(example);
        for (call, model) in &example.metadata.models {
            let models = self.models.entry(call.clone()).or_default();
            *models.entry(model.clone()).or_default() += 1;
        }
        Ok(())
    }

    /// How many examples were written.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.ids.len() as u64
    }

    /// Where the `i`th file of `split` is written.
    fn staged(&self, split: Split, i: usize) -> PathBuf {
        let name = format!("data/{split}-{i}.parquet.partial");
        self.staging.path().join(name)
    }

    /// The file of `split` being written, started if there is none.
    fn open(&mut self, split: Split) -> Result<&mut ParquetWriter<BufWriter<File>>, Error> {
        let i = split as usize;
        if self.splits[i].current.is_none() {
            let path = self.staged(split, self.splits[i].done.len());
            let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            let out = BufWriter::with_capacity(1 << 20, file);
            let writer = ParquetWriter::with_options(out, self.format, self.settings.parquet)?;
            self.splits[i].current = Some(writer.named(&path));
        }
        Ok(self.splits[i].current.as_mut().expect("just opened"))
    }

    /// Ends the file of `split` being written, if any.
    fn close(&mut self, split: Split) -> Result<(), Error> {
        let path = self.staged(split, self.splits[split as usize].done.len());
        let open = &mut self.splits[split as usize];
        let Some(writer) = open.current.take() else {
            return Ok(());
        };
        let (out, stats) = writer.finish()?;
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        open.done.push(stats);
        Ok(())
    }

    /// Ends the last files, writes the card and moves `data/` and `README.md` into the
    /// folder; returns what was written.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) if a file cannot be written or moved.
    pub fn finish(mut self) -> Result<ExportSummary, Error> {
        // An empty dataset still gets a (row-less) train file, so that it loads.
        if self.rows() == 0 {
            self.open(Split::Train)?;
        }
        let mut splits = Vec::new();
        let mut last = PathBuf::new();
        for &split in Split::ALL {
            self.close(split)?;
            let done = &self.splits[split as usize].done;
            let (n, mut files) = (done.len(), Vec::new());
            for i in 0..n {
                let name = format!("data/{split}-{i:05}-of-{n:05}.parquet");
                let staged = self.staged(split, i);
                last = self.staging.path().join(&name);
                std::fs::rename(&staged, &last).map_err(|e| Error::io(&staged, e))?;
                files.push(name);
            }
            if n > 0 {
                splits.push(SplitSummary {
                    split,
                    rows: done.iter().map(|s| s.rows).sum(),
                    files,
                    bytes: done.iter().map(|s| s.bytes).sum(),
                });
            }
        }
        sync_parent(&last)?;
        let summary = ExportSummary {
            dir: self.settings.dir.clone(),
            format: self.format,
            test_fraction: self.settings.test_fraction,
            splits,
            report: std::mem::take(&mut self.report).finish(),
            recipe: self.settings.recipe.clone(),
            models: std::mem::take(&mut self.models),
            title: self.title.clone(),
        };
        let card = self.staging.path().join("README.md");
        write_replacing(&card, render_card(&summary).as_bytes())?;

        // Into place: the old data/ (with --force) goes into the staging folder, removed
        // with it; then the new data/, then the card.
        let dir = &self.settings.dir;
        let (data, final_data) = (self.staging.path().join("data"), dir.join("data"));
        if final_data.exists() {
            let old = self.staging.path().join("old-data");
            std::fs::rename(&final_data, &old).map_err(|e| Error::io(&final_data, e))?;
        }
        std::fs::rename(&data, &final_data).map_err(|e| Error::io(&final_data, e))?;
        let final_card = dir.join("README.md");
        std::fs::rename(&card, &final_card).map_err(|e| Error::io(&final_card, e))?;
        sync_parent(&final_card)?;
        self.staging.close()?;
        Ok(summary)
    }
}

/// A size category of the Hub for `n` examples (`1K<n<10K`, ...).
pub(crate) fn size_category(n: u64) -> String {
    const BOUNDS: [&str; 10] = [
        "1K", "10K", "100K", "1M", "10M", "100M", "1B", "10B", "100B", "1T",
    ];
    match (0..BOUNDS.len()).find(|&i| n < 1000 * 10u64.pow(i as u32)) {
        Some(0) => "n<1K".into(),
        Some(i) => format!("{}<n<{}", BOUNDS[i - 1], BOUNDS[i]),
        None => "n>1T".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_of_is_golden_and_monotone() {
        // Golden values, computed independently with Python's hashlib (the snippet of the
        // module docs): q1 → 0.1818…, q2 → 0.0175…, q3 → 0.2723…, "é" → 0.5713….
        assert_eq!(split_of("q1", 0.18), Split::Train);
        assert_eq!(split_of("q1", 0.182), Split::Test);
        assert_eq!(split_of("q2", 0.01749), Split::Train);
        assert_eq!(split_of("q2", 0.0175), Split::Test);
        assert_eq!(split_of("q3", 0.27), Split::Train);
        assert_eq!(split_of("q3", 0.273), Split::Test);
        assert_eq!(split_of("é", 0.571), Split::Train);
        assert_eq!(split_of("é", 0.572), Split::Test);
        // The exact boundary: q1's integer is 3353852113478415828.
        let u = 3_353_852_113_478_415_828u64 as f64 / 18_446_744_073_709_551_616.0;
        assert_eq!(split_of("q1", u * (1.0 + 1e-12)), Split::Test);
        assert_eq!(split_of("q1", u * (1.0 - 1e-12)), Split::Train);
        for f in [-1.0, 0.0, f64::NAN] {
            assert_eq!(split_of("q1", f), Split::Train);
        }
        assert_eq!(split_of("q2", 1.0), Split::Test);
        assert_eq!(split_of("q2", 7.0), Split::Test);
        // 998 of id-0..id-9999 are below 0.1 (hashlib), and raising the fraction only moves
        // ids to test.
        let test = |f| {
            (0..10_000)
                .filter(|i| split_of(&format!("id-{i}"), f) == Split::Test)
                .collect::<Vec<_>>()
        };
        let (small, large) = (test(0.1), test(0.2));
        assert_eq!(small.len(), 998);
        assert!(small.iter().all(|i| large.contains(i)));
    }

    #[test]
    fn size_categories() {
        assert_eq!(size_category(0), "n<1K");
        assert_eq!(size_category(999), "n<1K");
        assert_eq!(size_category(1_000), "1K<n<10K");
        assert_eq!(size_category(100_000), "100K<n<1M");
        assert_eq!(size_category(u64::MAX), "n>1T");
    }
}
