//! The dataset card (`README.md`) of an export: [`render_card`].

use std::fmt::Write as _;

use arrow_schema::DataType;

use super::{size_category, ExportSummary, Split};
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

/// A column type as `datasets` names it: `dtype: string`, `list: string`, or a list of
/// structs with their fields.
fn feature(t: &DataType) -> String {
    match t {
        DataType::Utf8 => "dtype: string".into(),
        DataType::Float64 => "dtype: float64".into(),
        DataType::List(item) => match item.data_type() {
            DataType::Struct(fields) => fields.iter().fold("list:".into(), |s, f| {
                format!(
                    "{s}\n    - name: {}\n      {}",
                    f.name(),
                    feature(f.data_type())
                )
            }),
            other => feature(other).replace("dtype", "list"),
        },
        other => unreachable!("the export has no {other} column"),
    }
}

/// Renders the dataset card of an export: YAML front matter that the Hub and `datasets` read
/// (`configs` with the data files of each split, `dataset_info` with the features and the
/// number of examples per split, task categories, tags and size category), then the recipe,
/// the models, the quality report's figures, the columns, the split rule, and how to load
/// the data with `datasets` and train on it with TRL.
///
/// [`DatasetWriter::finish`](super::DatasetWriter::finish) writes it as `README.md`.
#[must_use]
pub(crate) fn render_card(summary: &ExportSummary) -> String {
    let (total, format, r) = (summary.rows(), summary.format, &summary.report);
    // Per split: its data files, its size (`datasets` wants `num_bytes` with `num_examples`
    // and checks only the latter; the Hub puts the in-memory size there, the Parquet size is
    // what is known here) and its row of the table.
    let (mut files, mut sizes, mut table) = (String::new(), String::new(), String::new());
    for split in &summary.splits {
        let (name, rows, bytes, n) = (split.split, split.rows, split.bytes, split.files.len());
        let _ = writeln!(files, "  - split: {name}\n    path: data/{name}-*");
        let _ = writeln!(
            sizes,
            "  - name: {name}\n    num_bytes: {bytes}\n    num_examples: {rows}"
        );
        let _ = writeln!(table, "| {name} | {rows} | {n} | {bytes} |");
    }
    // The `dataset_info.features` of the Parquet columns, as `datasets` reads them.
    let mut features = String::new();
    for field in super::parquet::schema(format).fields() {
        let (name, feature) = (field.name(), feature(field.data_type()));
        let _ = writeln!(features, "  - name: {name}\n    {feature}");
    }
    let (download, size) = (summary.bytes(), size_category(total));
    let (pretty, title) = (
        yaml_str(&summary.title),
        summary.title.replace(['\n', '\r'], " "),
    );
    let methods: Vec<&str> = r.methods.keys().map(String::as_str).collect();
    let methods = if methods.is_empty() {
        "unknown".into()
    } else {
        methods.join(", ")
    };

    let mut made = match &summary.recipe {
        Some(recipe) if !recipe.is_empty() => {
            let mut s = "The settings of the run (`PAIRS.run.json`), which fix every random draw \
                 (label, aspects) of each example with its id:\n\n| setting | value |\n|---|---|\n"
                .to_string();
            for (k, v) in recipe {
                let _ = writeln!(s, "| {} | `{}` |", cell(k), cell(v).replace('`', "'"));
            }
            s
        }
        _ => "The run's settings were not recorded with the data.\n".into(),
    };
    made.push('\n');
    if summary.models.is_empty() {
        made.push_str("The examples do not record the models that answered.\n");
    } else {
        made.push_str("Models, by call, with the number of examples:\n\n| call | model | examples |\n|---|---|---|\n");
        for (call, models) in &summary.models {
            for (model, n) in models {
                let model = cell(model).replace('`', "'");
                let _ = writeln!(made, "| {} | `{model}` | {n} |", cell(call));
            }
        }
    }

    let (l, ni, d) = (&r.length, &r.near_identical, &r.diversity);
    let (better, worse, better_pct) = (r.labels.better, r.labels.worse, pct(r.labels.better_share));
    let (chosen, rejected) = (num(l.mean_chosen_chars, 0), num(l.mean_rejected_chars, 0));
    let (ratio, longer) = (num(l.ratio, 2), pct(l.chosen_longer_share));
    let (jaccard, pairs, pairs_pct) = (ni.threshold, ni.pairs, pct(ni.share));
    let (distinct_1, distinct_2) = (num(d.distinct_1, 3), num(d.distinct_2, 3));
    let failures = match &r.failures {
        Some(f) => format!(
            "| failure rate (prompts that gave no example) | {} ({} failed) |",
            pct(f.rate),
            f.failed
        ),
        None => "| failure rate | not known (no failure ledger) |".into(),
    };
    let calls = num(r.cost.mean_calls, 2);
    let aspects = match r.aspects.is_empty() {
        true => String::new(),
        false => format!("| aspects | {} |\n", cell(&counts(&r.aspects))),
    };

    let columns = match format {
        ExampleFormat::Standard => {
            "- `prompt`, `chosen`, `rejected`: strings (TRL's standard format)."
        }
        _ => {
            "- `prompt`: the conversation, a list of `{role, content}` messages ending with a \
             user turn; `chosen`, `rejected`: one assistant message each (TRL's \
             conversational format)."
        }
    };
    let fraction = summary.test_fraction;
    let split_rule = match fraction > 0.0 {
        true => format!(
            "The `test` split holds about {:.1}% of the examples, chosen by a hash of the id, so \
             an example keeps its split when the dataset grows or is regenerated: an id is in \
             `test` when the first 8 bytes of SHA-256 of `\"rmboost/split/v1\\0\"` + the id, \
             read as a little-endian integer, are below {fraction} × 2^64.\n\n",
            fraction * 100.0
        ),
        false => String::new(),
    };
    let eval = match summary.split(Split::Test) {
        Some(_) => {
            "\nPass `eval_dataset=ds[\"test\"].select_columns(columns)` to evaluate on \
                    the held-out split.\n"
        }
        None => "",
    };

    format!(
        r#"---
configs:
- config_name: default
  data_files:
{files}dataset_info:
  features:
{features}  splits:
{sizes}  download_size: {download}
task_categories:
- text-generation
- text-classification
tags:
- dpo
- preference
- reward-modeling
- rlhf
- synthetic
- rmboost
size_categories:
- {size}
pretty_name: {pretty}
---

# {title}

Synthetic preference pairs made with rmboost (method: {methods}): {total} examples in the {format} format of TRL's preference trainers.

| split | examples | files | bytes |
|---|---|---|---|
{table}
## How it was made

{made}
## Quality report

The figures of `rmboost report` on these examples:

| measure | value |
|---|---|
| label balance | {better} better, {worse} worse ({better_pct} better) |
| mean length, chosen / rejected (characters) | {chosen} / {rejected} (ratio {ratio}) |
| chosen strictly longer (length bias; 50% is unbiased) | {longer} |
| near-identical pairs (token Jaccard ≥ {jaccard}) | {pairs} ({pairs_pct}) |
| diversity: distinct-1 / distinct-2 | {distinct_1} / {distinct_2} |
{failures}
| mean model calls per example | {calls} |
{aspects}
## Columns

{columns}
- `label`: `better` if the second response was asked to be better than the first (then it is `chosen`), `worse` otherwise; `grade`: `slightly` or `much` for graded labels.
- `aspects`: the quality aspects the two responses were asked to differ on.
- `margin`: a preference margin for TRL's reward trainer (graded labels), else null.
- `id`: the prompt's id.
- `metadata`: a JSON string (method, seed, models, token usage, calls, the input record's other fields): `json.loads(row["metadata"])`.

{split_rule}## Use

```python
from datasets import load_dataset

ds = load_dataset("path/to/this/folder")  # or the Hub repository's name
```

TRL's `DPOTrainer` and `RewardTrainer` read the `prompt`, `chosen` and `rejected` columns as they are (and `RewardTrainer` the `margin`, when set: add it to the list). Keep only those, so that the other columns do not reach the trainer's collator:

```python
from trl import DPOConfig, DPOTrainer

columns = ["prompt", "chosen", "rejected"]
train = ds["train"].select_columns(columns)
trainer = DPOTrainer(model=model, args=DPOConfig(output_dir="dpo"), train_dataset=train, processing_class=tokenizer)
```
{eval}"#
    )
}
