//! `rmboost export` and `rmboost merge`: flags to the library's export and merge, and their
//! summaries.

use std::num::NonZeroUsize;

use rmboost::export::{DatasetExport, ParquetOptions};
use rmboost::io::{merge, MergeOptions};

use crate::args::{ExportArgs, MergeArgs};
use crate::progress;
use crate::setup::{error_chain, CliError};

/// `s` for a count other than one.
fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Runs `rmboost export`; returns the exit status.
pub(crate) fn export(args: &ExportArgs) -> Result<u8, CliError> {
    if !(0.0..=1.0).contains(&args.test_fraction) {
        return Err(CliError::usage(format!(
            "--test-fraction {}: expected a number from 0 to 1",
            args.test_fraction
        )));
    }
    if args.rows_per_file == Some(0) {
        return Err(CliError::usage("--rows-per-file: expected at least 1"));
    }
    let Some(rows_per_group) = NonZeroUsize::new(args.rows_per_group) else {
        return Err(CliError::usage("--rows-per-group: expected at least 1"));
    };
    let mut export = DatasetExport::new(&args.to)
        .test_fraction(args.test_fraction)
        .overwrite(args.force)
        .parquet_options(ParquetOptions::new().rows_per_group(rows_per_group));
    if let Some(rows) = args.rows_per_file {
        export = export.rows_per_file(rows);
    }
    if let Some(ledger) = &args.ledger {
        export = export.ledger(ledger);
    }
    if let Some(title) = &args.title {
        export = export.title(title);
    }
    let summary = export
        .from_jsonl(&args.input)
        .map_err(|e| CliError::fatal(format!("export failed: {}", error_chain(&e))))?;
    let splits: Vec<String> = summary
        .splits
        .iter()
        .map(|s| {
            let files = s.files.len();
            format!("{} {} in {files} file{}", s.split, s.rows, plural(files))
        })
        .collect();
    println!(
        "exported {} {} examples to {}: {}; {:.1} MB of Parquet; card {}",
        summary.rows(),
        summary.format,
        summary.dir.display(),
        splits.join(", "),
        summary.bytes() as f64 / 1e6,
        summary.dir.join("README.md").display()
    );
    Ok(0)
}

/// Runs `rmboost merge`; returns the exit status.
pub(crate) fn merge_shards(args: &MergeArgs) -> Result<u8, CliError> {
    let mut options = MergeOptions::new().overwrite(args.force);
    if let Some(input) = &args.input {
        options = options.input(input);
    }
    let summary = merge(&args.shards, &args.output, &options)
        .map_err(|e| CliError::fatal(format!("merge failed: {}", error_chain(&e))))?;
    for message in &summary.bad_input_messages {
        progress::notice(&format!("warning: skipped a bad input line: {message}"));
    }
    if summary.recipes_differ {
        progress::notice("warning: the shards' recipes differ: none was written beside the output");
    }
    let skipped = summary.bad_input_lines;
    let parts = [
        (summary.duplicates > 0)
            .then(|| format!(" ({} identical duplicates kept once)", summary.duplicates)),
        summary
            .ledger
            .as_ref()
            .map(|ledger| format!("; {} failed ids in {}", summary.failed, ledger.display())),
        summary
            .recipe
            .as_ref()
            .map(|recipe| format!("; recipe {}", recipe.display())),
        summary
            .prompts
            .map(|prompts| format!("; every one of the {prompts} prompts is accounted for")),
        (summary.prompts.is_some() && skipped > 0)
            .then(|| format!(" ({skipped} bad input lines skipped)")),
    ];
    println!(
        "merged {} shard{} into {}: {} examples{}",
        args.shards.len(),
        plural(args.shards.len()),
        summary.output.display(),
        summary.examples,
        parts.into_iter().flatten().collect::<String>()
    );
    Ok(0)
}
