//! JSONL input and output: [`PromptReader`] reads prompt records, [`ExampleWriter`] writes
//! examples to any writer; for files, [`OutputFile`] appends examples crash-safely under a
//! lock, [`Resume`] finds the ids already written, and [`FailureLedger`] keeps the examples
//! that failed. [`DatasetReader`] reads a finished dataset strictly and [`merge`] joins the
//! outputs of a sharded run into one file, checking them against the input.
//!
//! The crash-safety contract of the files written here:
//!
//! - every line is written with one `write_all` of the whole line and its newline, straight to
//!   the operating system, so a killed process leaves at most one torn last line;
//! - opening a file cuts a torn last line off (saving the bytes to `<file>.torn`);
//! - a file is locked while it is open for writing, so two runs cannot append to it at once;
//! - a [`SyncPolicy`] says when lines are forced to disk.

pub(crate) mod append;
mod dataset;
mod ledger;
pub(crate) mod line;
mod merge;
mod reader;
mod resume;
mod writer;

#[cfg(any(feature = "batch", feature = "parquet"))]
pub(crate) use append::sidecar;
#[cfg(feature = "batch")]
pub(crate) use append::AppendFile;
pub use append::{OutputFile, SyncPolicy};
pub use dataset::{read_dataset, DatasetLine, DatasetReader};
pub use ledger::{FailureLedger, FailureRecord};
pub use merge::{merge, MergeOptions, MergeSummary};
pub use reader::{read_prompts, PromptReader};
pub use resume::Resume;
#[cfg_attr(not(feature = "run"), allow(unused_imports))]
pub(crate) use resume::{IdHash, IdSet};
pub use writer::ExampleWriter;
