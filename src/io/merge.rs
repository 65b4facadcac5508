//! Joining the outputs of a sharded run: [`merge`].

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::append::{
    ensure_distinct_files, if_exists, remove_if_exists, replace_with, sidecar, temp_beside,
    write_replacing,
};
use super::dataset::read_dataset;
use super::line::{JsonlLines, MAX_LINE_BYTES};
use super::reader::read_prompts;
use super::resume::{IdHash, IdSet};
use crate::example::ExampleFormat;
use crate::Error;

/// Settings of [`merge`]; every setter documents its default.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct MergeOptions {
    input: Option<PathBuf>,
    overwrite: bool,
}

impl MergeOptions {
    /// Defaults: no input check, an existing output is refused.
    pub fn new() -> Self {
        Self::default()
    }

    setters! {
        /// The prompt file the shards were generated from. When set, [`merge`] checks that
        /// every prompt of it is in the merged output once or in a shard's failure ledger, and
        /// that every example's id is one of its prompts. Ids are derived exactly as the run
        /// derives them (the `id` field, or a hash of the content when it has none). Default:
        /// none.
        input(path: impl Into<PathBuf>) => input = Some(path.into());
        /// Replace an output (and its ledger and recipe) that already exist. Default: `false`,
        /// an existing output is an error. The shards and the input are never overwritten.
        overwrite(overwrite: bool) => overwrite = overwrite;
    }
}

/// What [`merge`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MergeSummary {
    /// The merged file.
    pub output: PathBuf,
    /// The format of the examples (`None` if every shard was empty).
    pub format: Option<ExampleFormat>,
    /// Examples written: each id once.
    pub examples: u64,
    /// Lines skipped because an identical example with the same id came earlier.
    pub duplicates: u64,
    /// Ids that failed in some shard (its ledger) and are not in the output; their ledger
    /// lines were written to the output's ledger.
    pub failed: u64,
    /// The output's failure ledger, when any id still failed.
    pub ledger: Option<PathBuf>,
    /// The output's recipe (`PAIRS.run.json`), when every shard had the same one.
    pub recipe: Option<PathBuf>,
    /// Whether the shards had recipes that differ (then none was written).
    pub recipes_differ: bool,
    /// Prompts in the input, when it was checked (each distinct id once).
    pub prompts: Option<u64>,
    /// Lines of the input that are not prompt records (a run skips them too), and the first
    /// messages about them.
    pub bad_input_lines: u64,
    /// The first messages about bad input lines (at most [`MergeSummary::MAX_LISTED`]).
    pub bad_input_messages: Vec<String>,
}

impl MergeSummary {
    /// How many ids or messages an error or summary lists before it only counts.
    pub const MAX_LISTED: usize = 10;
}

/// Where an id was first seen, and a digest of its example (its [`IdHash`]).
struct Seen {
    shard: usize,
    line: u64,
    digest: u128,
}

fn listed(items: &[String], total: u64) -> String {
    match total.saturating_sub(items.len() as u64) {
        0 => items.join(", "),
        more => format!("{} (and {more} more)", items.join(", ")),
    }
}

/// Merges the example files of a sharded run (`rmboost generate --shard I/N`) into one file,
/// `output`, and the shards' failure ledgers (`SHARD.failures.jsonl` beside each) into the
/// output's.
///
/// - Every line of every shard is read strictly ([`DatasetReader`](super::DatasetReader)): a
///   torn last line, a line that is not an example, or a format other than that of the first
///   example is an error naming the file and line.
/// - Lines are written as they are, shard after shard, in file order.
/// - An id seen again with the same content (the example, compared after parsing, so
///   spacing does not matter) is kept once; with other content it is an error naming both
///   places.
/// - Ledger lines of ids that are in no shard's output are kept (in the output's ledger,
///   `OUT.failures.jsonl`), so [`Report`](crate::report::Report) counts them; ids that
///   later succeeded are dropped.
/// - If every shard has a recipe (`SHARD.run.json`) and they are all the same, it is
///   copied beside the output.
/// - With [`MergeOptions::input`], every prompt id of the input must be in the output or
///   in a ledger, and every example id in the input; otherwise the error lists the first
///   [`MergeSummary::MAX_LISTED`] ids (or places) and the count.
///
/// Crash safety: the output, its ledger and recipe are written to temporary files beside
/// them and renamed into place only when everything checked out; an error leaves no file
/// behind, and never a partial file under the final name. No input is ever modified.
///
/// Memory: about 80 bytes per distinct id (its hash, where it was first seen, and a digest of
/// its content), plus 25 bytes per prompt id with an input, and the ledger lines of the ids
/// that still failed.
///
/// ```
/// use rmboost::io::{merge, MergeOptions};
///
/// let dir = tempfile::tempdir().unwrap();
/// let line = |id: &str| format!(
///     "{{\"id\":\"{id}\",\"prompt\":\"q\",\"chosen\":\"a\",\"rejected\":\"b\",\"label\":\"better\"}}\n");
/// let (a, b, out) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"), dir.path().join("all.jsonl"));
/// std::fs::write(&a, line("1") + &line("2")).unwrap();
/// std::fs::write(&b, line("3") + &line("2")).unwrap(); // "2" again, same content: kept once
/// let summary = merge(&[&a, &b], &out, &MergeOptions::new())?;
/// assert_eq!((summary.examples, summary.duplicates), (3, 1));
/// assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 3);
/// # Ok::<(), rmboost::Error>(())
/// ```
///
/// # Errors
///
/// - [`ErrorKind::Config`](crate::ErrorKind::Config) if no shard is given, if the output
///   (or its ledger or recipe) is one of the files read, or exists and
///   [`overwrite`](MergeOptions::overwrite) is off; and for conflicting duplicate ids,
///   missing prompts and ids that are not in the input (the message says which);
/// - [`ErrorKind::Parse`](crate::ErrorKind::Parse) naming the file and line of a bad shard
///   or ledger line, or of a recipe that is not JSON;
/// - [`ErrorKind::Io`](crate::ErrorKind::Io) if a file cannot be read or written.
pub fn merge<P: AsRef<Path>>(
    shards: &[P],
    output: impl AsRef<Path>,
    options: &MergeOptions,
) -> Result<MergeSummary, Error> {
    let output = output.as_ref();
    let shards: Vec<&Path> = shards.iter().map(AsRef::as_ref).collect();
    if shards.is_empty() {
        return Err(Error::config("merge: give at least one shard"));
    }
    let out_ledger = sidecar(output, ".failures.jsonl");
    let out_recipe = sidecar(output, ".run.json");
    let ledgers: Vec<_> = shards
        .iter()
        .map(|s| sidecar(s, ".failures.jsonl"))
        .collect();
    let recipes: Vec<_> = shards.iter().map(|s| sidecar(s, ".run.json")).collect();

    // The files written must not be any file read, and no shard may be given twice.
    let mut files: Vec<(String, &Path)> = vec![
        ("output".into(), output),
        ("output's failure ledger".into(), out_ledger.as_path()),
        ("output's recipe".into(), out_recipe.as_path()),
    ];
    files.extend(
        options
            .input
            .as_deref()
            .map(|input| ("input".into(), input)),
    );
    for (i, shard) in shards.iter().enumerate() {
        files.push((format!("shard {}", i + 1), shard));
        for (what, path) in [("ledger", &ledgers[i]), ("recipe", &recipes[i])] {
            if path.exists() {
                files.push((format!("{what} of shard {}", i + 1), path));
            }
        }
    }
    let files: Vec<(&str, &Path)> = files.iter().map(|(r, p)| (r.as_str(), *p)).collect();
    ensure_distinct_files(&files)?;
    if !options.overwrite && output.exists() {
        return Err(Error::config(format!(
            "{} already exists: give a new output file, or overwrite it (--force)",
            output.display()
        )));
    }

    // Shards.
    let mut tmp = temp_beside(output)?;
    let mut out = BufWriter::with_capacity(1 << 16, tmp.as_file_mut());
    let mut seen: HashMap<u128, Seen> = HashMap::new();
    let mut summary = MergeSummary {
        output: output.to_path_buf(),
        ..MergeSummary::default()
    };
    let mut first_format: Option<(ExampleFormat, usize)> = None;
    for (i, shard) in shards.iter().enumerate() {
        for row in read_dataset(shard)? {
            let row = row?;
            let (first, at) = *first_format.get_or_insert((row.format, i));
            if first != row.format {
                return Err(Error::parse(
                    *shard,
                    row.line,
                    format!(
                        "a {} example, but {} is {first}: merge shards of one run",
                        row.format,
                        shards[at].display()
                    ),
                ));
            }
            let content = IdHash::of(&row.example.to_json_line(row.format)).0;
            let first = seen.entry(IdHash::of(&row.example.id).0).or_insert(Seen {
                shard: i,
                line: row.line,
                digest: content,
            });
            if (first.shard, first.line) == (i, row.line) {
                out.write_all(row.text.as_bytes())
                    .and_then(|()| out.write_all(b"\n"))
                    .map_err(|e| Error::io(output, e))?;
                summary.examples += 1;
            } else if first.digest == content {
                summary.duplicates += 1;
            } else {
                return Err(Error::config(format!(
                    "{}:{}: id `{}` is also at {}:{} with different content: these are not \
                     shards of one run, or one was regenerated with other settings",
                    shard.display(),
                    row.line,
                    row.example.id,
                    shards[first.shard].display(),
                    first.line
                )));
            }
        }
    }
    out.flush().map_err(|e| Error::io(output, e))?;
    drop(out);
    summary.format = first_format.map(|(f, _)| f);

    // Ledgers: lines of ids that are in no output (a list of failures: kept in memory).
    let mut failed = IdSet::new();
    let mut failed_lines = Vec::new();
    for path in &ledgers {
        let Some(file) = if_exists(path, std::fs::File::open)? else {
            continue;
        };
        let mut lines = JsonlLines::new(BufReader::new(file), path.clone(), MAX_LINE_BYTES);
        while let Some(line) = lines.next_line() {
            let line = line?.text;
            let Some(id) = super::resume::line_id(line.as_bytes()) else {
                return Err(lines.err("not a failure-ledger line (needs a string or integer `id`)"));
            };
            // An id that failed once and succeeded later is done.
            if !seen.contains_key(&IdHash::of(&id).0) {
                failed.insert(&id);
                failed_lines.extend_from_slice(line.as_bytes());
                failed_lines.push(b'\n');
            }
        }
    }
    summary.failed = failed.len() as u64;

    // Recipes: copied when all shards agree.
    let mut recipe: Option<Value> = None;
    let mut all_have = true;
    for path in &recipes {
        let Some(bytes) = if_exists(path, std::fs::read)? else {
            all_have = false;
            continue;
        };
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::parse(path, e.line() as u64, format!("not a run recipe: {e}")))?;
        match &recipe {
            None => recipe = Some(value),
            Some(r) => summary.recipes_differ |= *r != value,
        }
    }
    let recipe = recipe.filter(|_| all_have && !summary.recipes_differ);

    // The input: every prompt accounted for, every example a prompt.
    if let Some(input) = &options.input {
        check_input(input, &shards, &seen, &failed, &mut summary)?;
    }

    // Everything checked out: put the files in place, the output last.
    summary.ledger = write_or_remove(out_ledger, Some(failed_lines).filter(|l| !l.is_empty()))?;
    let recipe = recipe.map(|value| {
        let mut json = serde_json::to_vec_pretty(&value).expect("JSON serialises");
        json.push(b'\n');
        json
    });
    summary.recipe = write_or_remove(out_recipe, recipe)?;
    replace_with(tmp, output)?;
    Ok(summary)
}

/// Writes `bytes` to `path` (then `Some(path)`), or without any removes `path`: a ledger or
/// recipe left beside an overwritten output by an earlier merge would describe other data.
fn write_or_remove(path: PathBuf, bytes: Option<Vec<u8>>) -> Result<Option<PathBuf>, Error> {
    match bytes {
        Some(bytes) => write_replacing(&path, &bytes).map(|()| Some(path)),
        None => remove_if_exists(&path).map(|()| None),
    }
}

fn check_input(
    input: &Path,
    shards: &[&Path],
    seen: &HashMap<u128, Seen>,
    failed: &IdSet,
    summary: &mut MergeSummary,
) -> Result<(), Error> {
    let mut prompts = IdSet::new();
    let mut missing = Vec::new();
    let mut missing_count = 0u64;
    for record in read_prompts(input)? {
        let prompt = match record {
            Ok(p) => p,
            Err(e) if e.kind() == crate::ErrorKind::Parse => {
                summary.bad_input_lines += 1;
                if summary.bad_input_messages.len() < MergeSummary::MAX_LISTED {
                    summary.bad_input_messages.push(e.to_string());
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let hash = IdHash::of(&prompt.id);
        // A duplicate input id is one prompt: the run kept the first.
        if prompts.insert(hash) && !seen.contains_key(&hash.0) && !failed.contains(hash) {
            missing_count += 1;
            if missing.len() < MergeSummary::MAX_LISTED {
                missing.push(prompt.id);
            }
        }
    }
    summary.prompts = Some(prompts.len() as u64);
    if missing_count > 0 {
        return Err(Error::config(format!(
            "{missing_count} prompts of {} are in no shard and no shard's failure ledger: {}; \
             run the missing shards (or rerun them to finish) and merge again",
            input.display(),
            listed(&missing, missing_count)
        )));
    }
    let mut extra: Vec<(usize, u64)> = seen
        .iter()
        .filter(|(h, _)| !prompts.contains(IdHash(**h)))
        .map(|(_, s)| (s.shard, s.line))
        .collect();
    if !extra.is_empty() {
        extra.sort_unstable();
        let places: Vec<String> = extra
            .iter()
            .take(MergeSummary::MAX_LISTED)
            .map(|(s, l)| format!("{}:{l}", shards[*s].display()))
            .collect();
        return Err(Error::config(format!(
            "{} examples have ids that are not prompts of {}: {}; were the shards made from \
             another input?",
            extra.len(),
            input.display(),
            listed(&places, extra.len() as u64)
        )));
    }
    Ok(())
}
