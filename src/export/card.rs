//! The dataset card (`README.md`) of an export: [`render_card`].

use std::fmt::Write as _;

use super::{size_category, ExportSummary};
use crate::example::ExampleFormat;
use crate::report::{counts, num, pct};

/// A YAML double-quoted scalar (any text is safe in it).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// A Markdown table cell: no line breaks, pipes escaped.
fn cell(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
}

/// The `dataset_info.features` entries of the columns, as `datasets` reads them.
fn features(format: ExampleFormat) -> String {
    let conversation = |name: &str| {
        match format {
        ExampleFormat::Standard => format!("  - name: {name}\n    dtype: string\n"),
        _ => format!(
            "  - name: {name}\n    list:\n    - name: role\n      dtype: string\n    - name: content\n      dtype: string\n"
        ),
    }
    };
    let mut s = String::from("  features:\n  - name: id\n    dtype: string\n");
    for name in ["prompt", "chosen", "rejected"] {
        s.push_str(&conversation(name));
    }
    s.push_str(
        "  - name: label\n    dtype: string\n  - name: grade\n    dtype: string\n  - name: aspects\n    list: string\n  - name: margin\n    dtype: float64\n  - name: metadata\n    dtype: string\n",
    );
    s
}

/// Renders the dataset card of an export: YAML front matter that the Hub and `datasets` read
/// (`configs` with the data files of each split, `dataset_info` with the features and the
/// number of examples per split, task categories, tags and size category), then the recipe,
/// the models, the quality report's figures, the columns, the split rule, and how to load
/// the data with `datasets` and train on it with TRL.
///
/// [`DatasetWriter::finish`](super::DatasetWriter::finish) writes it as `README.md`; it is
/// public so a program can show or adapt it.
#[must_use]
pub(crate) fn render_card(summary: &ExportSummary) -> String {
    let total = summary.rows();
    // Per split: its data files, its size (`datasets` wants `num_bytes` with `num_examples`
    // and checks only the latter; the Hub puts the in-memory size there, the Parquet size is
    // what is known here) and its row of the table.
    let (mut files, mut sizes, mut table) = (String::new(), String::new(), String::new());
    for split in &summary.splits {
        let (name, rows, bytes) = (split.split, split.rows, split.bytes);
        let _ = writeln!(files, "  - split: {name}\n    path: data/{name}-*");
        let _ = writeln!(
            sizes,
            "  - name: {name}\n    num_bytes: {bytes}\n    num_examples: {rows}"
        );
        let _ = writeln!(
            table,
            "| {name} | {rows} | {} | {bytes} |",
            split.files.len()
        );
    }
    // Front matter.
    let mut s = format!("---\nconfigs:\n- config_name: default\n  data_files:\n{files}");
    s.push_str("dataset_info:\n");
    s.push_str(&features(summary.format));
    s.push_str("  splits:\n");
    s.push_str(&sizes);
    let _ = writeln!(s, "  download_size: {}", summary.bytes());
    s.push_str(
        "task_categories:\n- text-generation\n- text-classification\ntags:\n- dpo\n- preference\n- reward-modeling\n- rlhf\n- synthetic\n- rmboost\n",
    );
    let _ = writeln!(s, "size_categories:\n- {}", size_category(total));
    let _ = writeln!(s, "pretty_name: {}", yaml_str(&summary.title));
    s.push_str("---\n\n");

    // Title and what it is.
    let _ = writeln!(s, "# {}\n", summary.title.replace(['\n', '\r'], " "));
    let methods: Vec<&str> = summary.report.methods.keys().map(String::as_str).collect();
    let methods = if methods.is_empty() {
        "unknown".into()
    } else {
        methods.join(", ")
    };
    let _ = writeln!(
        s,
        "Synthetic preference pairs made with rmboost (method: {methods}): {total} examples in the {} format of TRL's preference trainers.\n",
        summary.format
    );
    s.push_str("| split | examples | files | bytes |\n|---|---|---|---|\n");
    s.push_str(&table);
    s.push('\n');

    // Recipe and models.
    s.push_str("## How it was made\n\n");
    match &summary.recipe {
        Some(recipe) if !recipe.is_empty() => {
            s.push_str(
                "The settings of the run (`PAIRS.run.json`), which fix every random draw \
                 (label, aspects) of each example with its id:\n\n| setting | value |\n|---|---|\n",
            );
            for (k, v) in recipe {
                let _ = writeln!(s, "| {} | `{}` |", cell(k), cell(v).replace('`', "'"));
            }
            s.push('\n');
        }
        _ => s.push_str("The run's settings were not recorded with the data.\n\n"),
    }
    if summary.models.is_empty() {
        s.push_str("The examples do not record the models that answered.\n\n");
    } else {
        s.push_str("Models, by call, with the number of examples:\n\n| call | model | examples |\n|---|---|---|\n");
        for (call, models) in &summary.models {
            for (model, n) in models {
                let _ = writeln!(
                    s,
                    "| {} | `{}` | {n} |",
                    cell(call),
                    cell(model).replace('`', "'")
                );
            }
        }
        s.push('\n');
    }

    // Quality report.
    let r = &summary.report;
    s.push_str("## Quality report\n\nThe figures of `rmboost report` on these examples:\n\n| measure | value |\n|---|---|\n");
    let _ = writeln!(
        s,
        "| label balance | {} better, {} worse ({} better) |",
        r.labels.better,
        r.labels.worse,
        pct(r.labels.better_share)
    );
    let _ = writeln!(
        s,
        "| mean length, chosen / rejected (characters) | {} / {} (ratio {}) |",
        num(r.length.mean_chosen_chars, 0),
        num(r.length.mean_rejected_chars, 0),
        num(r.length.ratio, 2)
    );
    let _ = writeln!(
        s,
        "| chosen strictly longer (length bias; 50% is unbiased) | {} |",
        pct(r.length.chosen_longer_share)
    );
    let _ = writeln!(
        s,
        "| near-identical pairs (token Jaccard ≥ {}) | {} ({}) |",
        r.near_identical.threshold,
        r.near_identical.pairs,
        pct(r.near_identical.share)
    );
    let _ = writeln!(
        s,
        "| diversity: distinct-1 / distinct-2 | {} / {} |",
        num(r.diversity.distinct_1, 3),
        num(r.diversity.distinct_2, 3)
    );
    match &r.failures {
        Some(f) => {
            let _ = writeln!(
                s,
                "| failure rate (prompts that gave no example) | {} ({} failed) |",
                pct(f.rate),
                f.failed
            );
        }
        None => s.push_str("| failure rate | not known (no failure ledger) |\n"),
    }
    let _ = writeln!(
        s,
        "| mean model calls per example | {} |",
        num(r.cost.mean_calls, 2)
    );
    if !r.aspects.is_empty() {
        let _ = writeln!(s, "| aspects | {} |", cell(&counts(&r.aspects)));
    }
    s.push('\n');

    // Columns and splits.
    s.push_str("## Columns\n\n");
    match summary.format {
        ExampleFormat::Standard => {
            s.push_str("- `prompt`, `chosen`, `rejected`: strings (TRL's standard format).\n")
        }
        _ => s.push_str(
            "- `prompt`: the conversation, a list of `{role, content}` messages ending with a \
             user turn; `chosen`, `rejected`: one assistant message each (TRL's \
             conversational format).\n",
        ),
    }
    s.push_str(
        "- `label`: `better` if the second response was asked to be better than the first \
         (then it is `chosen`), `worse` otherwise; `grade`: `slightly` or `much` for graded \
         labels.\n- `aspects`: the quality aspects the two responses were asked to differ \
         on.\n- `margin`: a preference margin for TRL's reward trainer (graded labels), else \
         null.\n- `id`: the prompt's id.\n- `metadata`: a JSON string (method, seed, models, \
         token usage, calls, the input record's other fields): `json.loads(row[\"metadata\"])`.\n\n",
    );
    if summary.test_fraction > 0.0 {
        let _ = writeln!(
            s,
            "The `test` split holds about {:.1}% of the examples, chosen by a hash of the id, so \
             an example keeps its split when the dataset grows or is regenerated: an id is in \
             `test` when the first 8 bytes of SHA-256 of `\"rmboost/split/v1\\0\"` + the id, \
             read as a little-endian integer, are below {} × 2^64.\n",
            summary.test_fraction * 100.0,
            summary.test_fraction
        );
    }

    // Loading.
    s.push_str(
        "## Use\n\n```python\nfrom datasets import load_dataset\n\n\
         ds = load_dataset(\"path/to/this/folder\")  # or the Hub repository's name\n```\n\n\
         TRL's `DPOTrainer` and `RewardTrainer` read the `prompt`, `chosen` and `rejected` \
         columns as they are (and `RewardTrainer` the `margin`, when set: add it to the list). \
         Keep only those, so that the other columns do not reach the trainer's collator:\n\n```python\n\
         from trl import DPOConfig, DPOTrainer\n\n\
         columns = [\"prompt\", \"chosen\", \"rejected\"]\n\
         train = ds[\"train\"].select_columns(columns)\n\
         trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=\"dpo\"), \
         train_dataset=train, processing_class=tokenizer)\n```\n",
    );
    if summary.splits.iter().any(|s| s.split == super::Split::Test) {
        s.push_str(
            "\nPass `eval_dataset=ds[\"test\"].select_columns(columns)` to evaluate on the \
             held-out split.\n",
        );
    }
    s
}
