//! Hub-ready datasets (feature `parquet`): the export folder read back with the parquet crate
//! and with Hugging Face `datasets` (Python), splits, file naming, the card, bad inputs, and
//! the merge of shards.

use crate::support;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use arrow_array::{Array, Float64Array, ListArray, RecordBatch, StringArray, StructArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rmboost::export::{split_of, DatasetExport, Split};
use rmboost::io::{merge, MergeOptions};
use rmboost::{
    ErrorKind, ExampleFormat, ExampleMetadata, ExampleWriter, Grade, Label, Message,
    PreferenceExample, Usage,
};
use serde_json::{json, Value};

/// `n` varied examples: multi-turn prompts, graded labels with margins, metadata with
/// method-specific keys present in some rows only, non-ASCII text, empty aspects.
fn examples(n: usize) -> Vec<PreferenceExample> {
    (0..n)
        .map(|i| {
            let mut metadata = ExampleMetadata {
                method: "rmboost".into(),
                seed: 7,
                calls: 2 + (i % 3) as u32,
                ..Default::default()
            };
            metadata.models.insert("first".into(), "model-a".into());
            metadata.models.insert(
                "second".into(),
                if i % 4 == 0 { "model-b" } else { "model-a" }.into(),
            );
            metadata
                .usage
                .insert("total".into(), Usage::new(10 + i as u64, 20));
            if i % 5 == 0 {
                metadata
                    .input
                    .insert("source".into(), json!({"name": "unit", "n": i}));
            }
            if i % 7 == 0 {
                metadata.extra.insert("judge".into(), json!([1, 2.5, null]));
            }
            let prompt = if i % 3 == 0 {
                vec![
                    Message::system("Be brief."),
                    Message::user(format!("Question {i}: café, 日本, \"quotes\"?")),
                    Message::assistant("Which part?"),
                    Message::user("All of it.\nTwo lines."),
                ]
            } else {
                vec![Message::user(format!("Question {i}?"))]
            };
            PreferenceExample {
                id: format!("ex-{i:03}"),
                prompt,
                chosen: format!("A careful answer {i} — with ünïcödé."),
                rejected: format!("Short {i}."),
                label: if i % 2 == 0 {
                    Label::Better
                } else {
                    Label::Worse
                },
                grade: (i % 3 == 1).then_some(if i % 2 == 0 {
                    Grade::Much
                } else {
                    Grade::Slightly
                }),
                aspects: (0..i % 3).map(|k| format!("aspect-{k}")).collect(),
                margin: (i % 3 == 1).then_some(i as f64 / 2.0),
                metadata,
            }
        })
        .collect()
}

fn write_jsonl(path: &Path, rows: &[PreferenceExample], format: ExampleFormat) {
    let mut w = ExampleWriter::new(File::create(path).unwrap(), format);
    for r in rows {
        w.write(r).unwrap();
    }
    w.flush().unwrap();
}

/// Every Parquet file under `dir/data`, by name.
fn data_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn strings(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let a = batch
        .column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    (0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i).to_string()))
        .collect()
}

/// A conversation column (list of {role, content}) or a text column, as JSON values.
fn conversation(batch: &RecordBatch, name: &str) -> Vec<Value> {
    let col = batch.column_by_name(name).unwrap();
    if let Some(text) = col.as_any().downcast_ref::<StringArray>() {
        return (0..text.len()).map(|i| json!(text.value(i))).collect();
    }
    let list = col.as_any().downcast_ref::<ListArray>().unwrap();
    (0..list.len())
        .map(|i| {
            let turns = list.value(i);
            let s = turns.as_any().downcast_ref::<StructArray>().unwrap();
            let role = s
                .column_by_name("role")
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            let content = s
                .column_by_name("content")
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            Value::Array(
                (0..s.len())
                    .map(|k| json!({"role": role.value(k), "content": content.value(k)}))
                    .collect(),
            )
        })
        .collect()
}

/// The rows of one Parquet file as the JSON objects of the JSONL (metadata parsed back,
/// `grade` dropped when null as the JSONL does), and its row-group sizes.
fn read_parquet(path: &Path) -> (Vec<Value>, Vec<i64>) {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    let groups = builder
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows())
        .collect();
    let names: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        ["id", "prompt", "chosen", "rejected", "label", "grade", "aspects", "margin", "metadata"]
    );
    let mut rows = Vec::new();
    for batch in builder.build().unwrap() {
        let batch = batch.unwrap();
        let (ids, labels, grades, metadata) = (
            strings(&batch, "id"),
            strings(&batch, "label"),
            strings(&batch, "grade"),
            strings(&batch, "metadata"),
        );
        let (prompt, chosen, rejected) = (
            conversation(&batch, "prompt"),
            conversation(&batch, "chosen"),
            conversation(&batch, "rejected"),
        );
        let aspects = batch
            .column_by_name("aspects")
            .unwrap()
            .as_any()
            .downcast_ref::<ListArray>()
            .unwrap();
        let margin = batch
            .column_by_name("margin")
            .unwrap()
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        for i in 0..batch.num_rows() {
            let a = aspects.value(i);
            let a = a.as_any().downcast_ref::<StringArray>().unwrap();
            let mut row = json!({
                "id": ids[i],
                "prompt": prompt[i],
                "chosen": chosen[i],
                "rejected": rejected[i],
                "label": labels[i],
                "aspects": (0..a.len()).map(|k| a.value(k)).collect::<Vec<_>>(),
                "margin": if margin.is_null(i) { Value::Null } else { json!(margin.value(i)) },
                "metadata": serde_json::from_str::<Value>(metadata[i].as_deref().unwrap()).unwrap(),
            });
            if let Some(g) = &grades[i] {
                row["grade"] = json!(g);
            }
            rows.push(row);
        }
    }
    (rows, groups)
}

fn jsonl_rows(path: &Path) -> BTreeMap<String, Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

#[test]
fn round_trip_same_rows_same_values_both_formats() {
    for format in [ExampleFormat::Conversational, ExampleFormat::Standard] {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("pairs.jsonl");
        write_jsonl(&input, &examples(60), format);
        let before = std::fs::read(&input).unwrap();
        let dir = tmp.path().join("hub");
        let summary = DatasetExport::new(&dir)
            .test_fraction(0.3)
            .rows_per_file(20)
            .parquet_options(
                rmboost::export::ParquetOptions::new()
                    .rows_per_group(std::num::NonZeroUsize::new(8).unwrap()),
            )
            .from_jsonl(&input)
            .unwrap();
        assert_eq!(
            std::fs::read(&input).unwrap(),
            before,
            "the input is only read"
        );
        assert_eq!(summary.rows(), 60);
        assert_eq!(summary.format, format);

        let expected = jsonl_rows(&input);
        let mut seen = BTreeMap::new();
        for name in data_files(&dir) {
            let split = if name.starts_with("train-") {
                Split::Train
            } else {
                Split::Test
            };
            let (rows, groups) = read_parquet(&dir.join("data").join(&name));
            assert!(rows.len() <= 20, "{name}: {}", rows.len());
            assert!(groups.iter().all(|&g| g <= 8), "{name}: {groups:?}");
            for row in rows {
                let id = row["id"].as_str().unwrap().to_string();
                assert_eq!(split_of(&id, 0.3), split, "{id} in {name}");
                assert_eq!(row, expected[&id], "{format:?} {id}");
                assert!(seen.insert(id, name.clone()).is_none(), "each id once");
            }
        }
        assert_eq!(seen.len(), 60, "{format:?}: every row is back");
        let test = summary.split(Split::Test).unwrap();
        let train = summary.split(Split::Train).unwrap();
        assert_eq!(train.rows + test.rows, 60);
        assert!(test.rows > 5 && train.rows > 25, "{test:?} {train:?}");
    }
}

#[test]
fn files_are_named_n_of_m_and_an_empty_dataset_still_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("pairs.jsonl");
    write_jsonl(&input, &examples(23), ExampleFormat::Conversational);
    let dir = tmp.path().join("out");
    let summary = DatasetExport::new(&dir)
        .rows_per_file(5)
        .from_jsonl(&input)
        .unwrap();
    let names: Vec<String> = (0..5)
        .map(|i| format!("train-{i:05}-of-00005.parquet"))
        .collect();
    assert_eq!(data_files(&dir), names);
    let train = summary.split(Split::Train).unwrap();
    assert_eq!(train.files.len(), 5);
    assert_eq!(train.files[4], "data/train-00004-of-00005.parquet");
    assert!(summary.split(Split::Test).is_none());
    let sizes: Vec<usize> = names
        .iter()
        .map(|n| read_parquet(&dir.join("data").join(n)).0.len())
        .collect();
    assert_eq!(sizes, [5, 5, 5, 5, 3]);
    // Nothing else is left in the folder (no staging folder).
    let mut entries: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["README.md", "data"]);

    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let dir = tmp.path().join("empty");
    let summary = DatasetExport::new(&dir)
        .test_fraction(0.5)
        .from_jsonl(&empty)
        .unwrap();
    assert_eq!(summary.rows(), 0);
    assert_eq!(data_files(&dir), ["train-00000-of-00001.parquet"]);
    assert!(read_parquet(&dir.join("data/train-00000-of-00001.parquet"))
        .0
        .is_empty());
}

#[test]
fn the_card_has_front_matter_recipe_models_and_report_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("pairs.jsonl");
    write_jsonl(&input, &examples(40), ExampleFormat::Conversational);
    std::fs::write(
        tmp.path().join("pairs.run.json"),
        r#"{"settings": {"method": "rmboost", "seed": "7", "aspects": "general", "labels": "graded", "format": "conversational"}}"#,
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("pairs.failures.jsonl"),
        "{\"id\":\"lost-1\",\"kind\":\"backend\",\"message\":\"x\",\"time\":\"t\",\"runs\":1}\n",
    )
    .unwrap();
    let dir = tmp.path().join("my-pairs");
    let summary = DatasetExport::new(&dir)
        .test_fraction(0.25)
        .from_jsonl(&input)
        .unwrap();
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let (front, body) = card
        .strip_prefix("---\n")
        .unwrap()
        .split_once("\n---\n")
        .unwrap();
    for needle in [
        "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n  - split: test\n    path: data/test-*",
        "  - name: prompt\n    list:\n    - name: role\n      dtype: string\n    - name: content\n      dtype: string",
        "  - name: aspects\n    list: string",
        "  - name: metadata\n    dtype: string",
        "task_categories:\n- text-generation",
        "- dpo",
        "size_categories:\n- n<1K",
        "pretty_name: \"my-pairs\"",
    ] {
        assert!(front.contains(needle), "{needle:?} not in\n{front}");
    }
    let train = summary.split(Split::Train).unwrap().rows;
    let train_bytes = summary.split(Split::Train).unwrap().bytes;
    assert!(
        front.contains(&format!(
            "  - name: train\n    num_bytes: {train_bytes}\n    num_examples: {train}"
        )),
        "{front}"
    );
    let r = &summary.report;
    assert_eq!(r.examples, 40);
    assert_eq!((r.labels.better, r.labels.worse), (20, 20));
    assert_eq!(r.failures.as_ref().unwrap().failed, 1);
    for needle in [
        "# my-pairs",
        "| labels | `graded` |",
        "| seed | `7` |",
        "| second | `model-b` | 10 |",
        "| second | `model-a` | 30 |",
        "| label balance | 20 better, 20 worse (50.0% better) |",
        "| failure rate (prompts that gave no example) | 2.4% (1 failed) |",
        "near-identical pairs",
        "distinct-1",
        "load_dataset(",
        "DPOTrainer",
        "RewardTrainer",
        "eval_dataset=ds[\"test\"]",
        "rmboost/split/v1",
    ] {
        assert!(body.contains(needle), "{needle:?} not in\n{body}");
    }
}

fn export_err(input: &Path, dir: &Path) -> rmboost::Error {
    DatasetExport::new(dir).from_jsonl(input).unwrap_err()
}

#[test]
fn bad_inputs_name_file_and_line_and_leave_no_files() {
    let tmp = tempfile::tempdir().unwrap();
    let conv = examples(3);
    let line = |i: usize, f| conv[i].to_json_line(f);
    let cases = [
        (
            "torn.jsonl",
            format!(
                "{}\n{}\n{}",
                line(0, ExampleFormat::Conversational),
                line(1, ExampleFormat::Conversational),
                &line(2, ExampleFormat::Conversational)[..40]
            ),
            "torn.jsonl:3: torn last line",
        ),
        (
            "mixed.jsonl",
            format!(
                "{}\n\n{}\n",
                line(0, ExampleFormat::Conversational),
                line(1, ExampleFormat::Standard)
            ),
            "mixed.jsonl:3: a standard example in a conversational file (line 1 is conversational)",
        ),
        (
            "dup.jsonl",
            format!(
                "{}\n{}\n{}\n",
                line(0, ExampleFormat::Standard),
                line(1, ExampleFormat::Standard),
                line(0, ExampleFormat::Standard)
            ),
            "dup.jsonl:3: duplicate id `ex-000` (first at line 1)",
        ),
        (
            "junk.jsonl",
            format!("{}\n{{\"id\": 1}}\n", line(0, ExampleFormat::Standard)),
            "junk.jsonl:2: not a preference example",
        ),
    ];
    for (name, text, expected) in cases {
        let input = tmp.path().join(name);
        std::fs::write(&input, &text).unwrap();
        let dir = tmp.path().join(format!("out-{name}"));
        let err = export_err(&input, &dir);
        assert_eq!(err.kind(), ErrorKind::Parse, "{name}");
        assert!(err.to_string().contains(expected), "{name}: {err}");
        assert_eq!(
            std::fs::read_to_string(&input).unwrap(),
            text,
            "input untouched"
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{name}: nothing is left behind: {left:?}");
    }
    let missing = export_err(&tmp.path().join("nope.jsonl"), &tmp.path().join("x"));
    assert_eq!(missing.kind(), ErrorKind::Io);
    assert!(missing.to_string().contains("nope.jsonl"), "{missing}");
    let bad_fraction = DatasetExport::new(tmp.path().join("y"))
        .test_fraction(1.5)
        .from_jsonl(tmp.path().join("torn.jsonl"))
        .unwrap_err();
    assert!(
        bad_fraction.to_string().contains("test fraction 1.5"),
        "{bad_fraction}"
    );
}

#[test]
fn a_folder_that_is_not_empty_needs_overwrite_which_keeps_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("pairs.jsonl");
    write_jsonl(&input, &examples(12), ExampleFormat::Standard);
    let dir = tmp.path().join("repo");
    DatasetExport::new(&dir)
        .rows_per_file(4)
        .from_jsonl(&input)
        .unwrap();
    assert_eq!(data_files(&dir).len(), 3);
    std::fs::write(dir.join(".gitattributes"), "*.parquet filter=lfs\n").unwrap();

    let err = DatasetExport::new(&dir).from_jsonl(&input).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("is not empty"), "{err}");
    assert_eq!(data_files(&dir).len(), 3, "a refusal changes nothing");

    // Overwrite: the old data files go (no stale file would be loaded with the new ones).
    let summary = DatasetExport::new(&dir)
        .overwrite(true)
        .from_jsonl(&input)
        .unwrap();
    assert_eq!(summary.rows(), 12);
    assert_eq!(data_files(&dir), ["train-00000-of-00001.parquet"]);
    assert_eq!(
        std::fs::read_to_string(dir.join(".gitattributes")).unwrap(),
        "*.parquet filter=lfs\n"
    );
    let hidden: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".rmboost")
        })
        .collect();
    assert!(hidden.is_empty());

    // An input inside the folder's data/ would be deleted by the replacement: refused.
    let inner = dir.join("data/pairs.jsonl");
    std::fs::copy(&input, &inner).unwrap();
    let err = DatasetExport::new(&dir)
        .overwrite(true)
        .from_jsonl(&inner)
        .unwrap_err();
    assert!(
        err.to_string().contains("part of the export folder"),
        "{err}"
    );
    assert!(inner.exists());

    // A file where the folder should be.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let err = DatasetExport::new(&file).from_jsonl(&input).unwrap_err();
    assert!(err.to_string().contains("is a file"), "{err}");
}

/// A hidden staging folder as an export killed mid-way leaves it: named like one, with the
/// marker file the export writes first (no longer locked: its process is gone), and data.
fn killed_export_folder(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.join("data")).unwrap();
    std::fs::write(path.join("rmboost-export.lock"), "unfinished export\n").unwrap();
    std::fs::write(path.join("data/train-0.parquet.partial"), vec![0u8; 4096]).unwrap();
    path
}

fn hidden_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[test]
fn a_killed_exports_staging_folder_is_removed_by_the_next_export_only_if_marked_and_free() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("pairs.jsonl");
    write_jsonl(&input, &examples(6), ExampleFormat::Standard);

    // A folder holding only a killed export's leftovers is empty for the next export.
    let dir = tmp.path().join("hub");
    let stale = killed_export_folder(&dir, ".rmboost-export-Xk3p9Q");
    let summary = DatasetExport::new(&dir).from_jsonl(&input).unwrap();
    assert_eq!(summary.rows(), 6);
    assert!(!stale.exists());
    assert!(hidden_names(&dir).is_empty(), "{:?}", hidden_names(&dir));

    // A folder of that name without the marker is not ours: kept (and, being there, the
    // folder is not empty: refused without overwrite).
    let stale = killed_export_folder(&dir, ".rmboost-export-a");
    std::fs::create_dir(dir.join(".rmboost-export-foo")).unwrap();
    std::fs::write(dir.join(".rmboost-export-foo/notes.txt"), "mine").unwrap();
    let err = DatasetExport::new(&dir).from_jsonl(&input).unwrap_err();
    assert!(err.to_string().contains("is not empty"), "{err}");
    assert!(
        !stale.exists(),
        "leftovers go before the folder is looked at"
    );
    let stale = killed_export_folder(&dir, ".rmboost-export-b");
    DatasetExport::new(&dir)
        .overwrite(true)
        .from_jsonl(&input)
        .unwrap();
    assert!(!stale.exists());
    assert_eq!(hidden_names(&dir), [".rmboost-export-foo"]);
    assert_eq!(
        std::fs::read_to_string(dir.join(".rmboost-export-foo/notes.txt")).unwrap(),
        "mine"
    );

    // The staging folder of an export still being written is left alone: both finish.
    let live = DatasetExport::new(&dir)
        .overwrite(true)
        .create(ExampleFormat::Standard)
        .unwrap();
    let second = DatasetExport::new(&dir)
        .overwrite(true)
        .create(ExampleFormat::Standard)
        .unwrap();
    assert_eq!(hidden_names(&dir).len(), 3, "{:?}", hidden_names(&dir));
    second.finish().unwrap();
    let mut live = live;
    live.write(&examples(1)[0]).unwrap();
    assert_eq!(live.finish().unwrap().rows(), 1);
    assert_eq!(hidden_names(&dir), [".rmboost-export-foo"]);
}

#[test]
fn the_writer_takes_any_stream_and_refuses_duplicate_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let mut w = DatasetExport::new(&dir)
        .create(ExampleFormat::Standard)
        .unwrap();
    for e in examples(5) {
        w.write(&e).unwrap();
    }
    let err = w.write(&examples(1)[0]).unwrap_err();
    assert!(err.to_string().contains("duplicate id `ex-000`"), "{err}");
    assert_eq!(w.rows(), 5);
    // Dropped before finish: the folder is as it was (empty).
    drop(w);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Hugging Face `datasets`

/// Loads both exported folders with `datasets.load_dataset(DIR)` (and streaming), and checks
/// them against the JSONL row by row; also asserts what TRL's DPO and reward trainers read:
/// the `prompt`, `chosen` and `rejected` columns, conversational as TRL's `is_conversational`
/// decides it (lists of {"role", "content"} dicts; chosen/rejected one assistant turn, the
/// prompt ending with a user turn) or standard (strings), and `margin` a float or None.
/// (TRL itself is not installed: it pulls in torch, gigabytes.)
const LOAD_CHECK: &str = r#"
import hashlib, json, sys
import datasets

def is_test(id, f):
    d = hashlib.sha256(b"rmboost/split/v1\0" + id.encode()).digest()
    return int.from_bytes(d[:8], "little") < f * 2**64

fraction = float(sys.argv[1])
for folder, jsonl, fmt in zip(sys.argv[2::3], sys.argv[3::3], sys.argv[4::3]):
    expected = {}
    with open(jsonl) as f:
        for line in f:
            row = json.loads(line)
            expected[row["id"]] = row
    ds = datasets.load_dataset(folder)
    assert set(ds.keys()) == {"train", "test"}, ds
    want = {"train": 0, "test": 0}
    for id in expected:
        want["test" if is_test(id, fraction) else "train"] += 1
    columns = ["id", "prompt", "chosen", "rejected", "label", "grade", "aspects", "margin", "metadata"]
    for split in ("train", "test"):
        part = ds[split]
        assert part.num_rows == want[split], (split, part.num_rows, want)
        assert part.column_names == columns, part.column_names
        for row in part:
            exp = expected[row["id"]]
            assert is_test(row["id"], fraction) == (split == "test")
            for key in ("prompt", "chosen", "rejected", "label", "aspects", "margin"):
                assert row[key] == exp[key], (key, row[key], exp[key])
            assert row["grade"] == exp.get("grade"), (row["grade"], exp.get("grade"))
            assert json.loads(row["metadata"]) == exp["metadata"]
            # What TRL's trainers read.
            if fmt == "conversational":
                for key in ("prompt", "chosen", "rejected"):
                    v = row[key]
                    assert isinstance(v, list) and v and all(set(m) == {"role", "content"} for m in v), v
                assert row["prompt"][-1]["role"] == "user"
                assert [m["role"] for m in row["chosen"]] == ["assistant"]
                assert [m["role"] for m in row["rejected"]] == ["assistant"]
            else:
                assert all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected"))
            assert row["margin"] is None or isinstance(row["margin"], float)
        feats = part.features
        if fmt == "conversational":
            inner = feats["prompt"].feature if hasattr(feats["prompt"], "feature") else feats["prompt"][0]
            assert set(inner) == {"role", "content"}, feats
        else:
            assert feats["prompt"].dtype == "string", feats
        assert feats["margin"].dtype == "float64", feats
        trl = part.select_columns(["prompt", "chosen", "rejected"])
        assert trl.column_names == ["prompt", "chosen", "rejected"]
    streamed = datasets.load_dataset(folder, streaming=True)
    assert sum(1 for _ in streamed["train"]) == want["train"]
print("ok")
"#;

/// Whether Python with `datasets` is here; without it a plain `cargo test` skips (saying
/// why), and the README's test command (`RMBOOST_LIVE_TESTS=required`) fails.
fn datasets_python(test: &str) -> Option<PathBuf> {
    let python = support::python_path();
    let why = if !python.exists() {
        format!("python not found at {}", python.display())
    } else {
        match Command::new(&python)
            .args(["-c", "import datasets"])
            .output()
        {
            Ok(o) if o.status.success() => return Some(python),
            Ok(o) => format!(
                "{} cannot import datasets: {}",
                python.display(),
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
            Err(e) => format!("cannot run {}: {e}", python.display()),
        }
    };
    if support::live_tests_required() {
        panic!(
            "{test}: {why}: run `scripts/setup-test-env.sh` (it installs datasets into .venv) \
             and point RMBOOST_PYTHON at its python"
        );
    }
    eprintln!(
        "SKIPPED {test}: {why}; run `bash scripts/test.sh` (the README's test command) to \
         install Hugging Face datasets and run it"
    );
    None
}

#[test]
fn hugging_face_datasets_loads_both_formats_and_splits() {
    let Some(python) = datasets_python("hugging_face_datasets_loads_both_formats_and_splits")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["0.3".to_string()];
    for format in [ExampleFormat::Conversational, ExampleFormat::Standard] {
        let input = tmp.path().join(format!("{format}.jsonl"));
        write_jsonl(&input, &examples(50), format);
        let dir = tmp.path().join(format!("hub-{format}"));
        DatasetExport::new(&dir)
            .test_fraction(0.3)
            .rows_per_file(15)
            .from_jsonl(&input)
            .unwrap();
        args.extend([
            dir.to_string_lossy().into_owned(),
            input.to_string_lossy().into_owned(),
            format.to_string(),
        ]);
    }
    let out = Command::new(&python)
        .arg("-c")
        .arg(LOAD_CHECK)
        .args(&args)
        // Offline, and a cache of its own: nothing is fetched, nothing of the user's is used.
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.path().join("hf-home"))
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every part of the card's `dataset_info` was taken (datasets warns about any it drops).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("Ignoring part of dataset_info"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Merge

fn lines_of(rows: &[PreferenceExample]) -> String {
    rows.iter()
        .map(|r| r.to_json_line(ExampleFormat::Conversational) + "\n")
        .collect()
}

#[test]
fn merge_keeps_identical_duplicates_once_and_refuses_conflicts() {
    let tmp = tempfile::tempdir().unwrap();
    let all = examples(10);
    let (a, b, out) = (
        tmp.path().join("a.jsonl"),
        tmp.path().join("b.jsonl"),
        tmp.path().join("m.jsonl"),
    );
    std::fs::write(&a, lines_of(&all[..6])).unwrap();
    // b repeats ex-004 and ex-005 (identical, but spaced differently) and has the rest.
    let mut b_text = lines_of(&all[6..]);
    b_text.push_str(
        &serde_json::to_string_pretty(&all[4])
            .unwrap()
            .replace('\n', " "),
    );
    b_text.push('\n');
    b_text.push_str(&lines_of(&all[5..6]));
    std::fs::write(&b, &b_text).unwrap();
    let s = merge(&[&a, &b], &out, &MergeOptions::new()).unwrap();
    assert_eq!((s.examples, s.duplicates), (10, 2));
    assert_eq!(s.format, Some(ExampleFormat::Conversational));
    assert_eq!(jsonl_rows(&out).len(), 10);

    // Another answer for ex-004: an error naming both places; no output is written.
    let mut other = all[4].clone();
    other.chosen = "something else".into();
    std::fs::write(&b, lines_of(&all[6..]) + &lines_of(&[other])).unwrap();
    let out2 = tmp.path().join("m2.jsonl");
    let err = merge(&[&a, &b], &out2, &MergeOptions::new()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("b.jsonl:5: id `ex-004` is also at") && msg.contains("a.jsonl:5"),
        "{msg}"
    );
    assert!(!out2.exists());

    // An existing output needs overwrite; an input is never overwritten.
    let err = merge(&[&a], &out, &MergeOptions::new()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let err = merge(&[&a, &b], &a, &MergeOptions::new().overwrite(true)).unwrap_err();
    assert!(err.to_string().contains("same file"), "{err}");
    assert_eq!(jsonl_rows(&a).len(), 6);
    let err = merge(&[&a, &a], &out2, &MergeOptions::new()).unwrap_err();
    assert!(err.to_string().contains("same file"), "{err}");

    // A torn shard and mixed formats name the file and line.
    std::fs::write(&b, lines_of(&all[6..8]) + &lines_of(&all[8..9])[..30]).unwrap();
    let err = merge(&[&a, &b], &out2, &MergeOptions::new()).unwrap_err();
    assert!(
        err.to_string().contains("b.jsonl:3: torn last line"),
        "{err}"
    );
    std::fs::write(&b, all[7].to_json_line(ExampleFormat::Standard) + "\n").unwrap();
    let err = merge(&[&a, &b], &out2, &MergeOptions::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains("b.jsonl:1: a standard example, but"),
        "{err}"
    );
    assert!(!out2.exists());
}

#[test]
fn merge_checks_the_input_and_merges_ledgers_and_recipes() {
    let tmp = tempfile::tempdir().unwrap();
    let all = examples(8);
    let input = tmp.path().join("prompts.jsonl");
    let mut prompts: String = all
        .iter()
        .map(|e| json!({"id": e.id, "prompt": "q"}).to_string() + "\n")
        .collect();
    prompts
        .push_str("{\"id\": \"failed-1\", \"prompt\": \"q\"}\nnot json\n{\"prompt\": \"no id\"}\n");
    std::fs::write(&input, &prompts).unwrap();
    let no_id = rmboost::Prompt::new("no id").id().to_owned();
    let (a, b) = (tmp.path().join("s0.jsonl"), tmp.path().join("s1.jsonl"));
    std::fs::write(&a, lines_of(&all[..4])).unwrap();
    std::fs::write(&b, lines_of(&all[4..])).unwrap();
    let recipe = r#"{"settings": {"seed": "3"}}"#;
    std::fs::write(tmp.path().join("s0.run.json"), recipe).unwrap();
    std::fs::write(tmp.path().join("s1.run.json"), recipe).unwrap();
    let ledger = |id: &str| {
        format!("{{\"id\":\"{id}\",\"kind\":\"backend\",\"message\":\"m\",\"time\":\"t\",\"runs\":1}}\n")
    };
    // s0's ledger names failed-1 (still failing) and ex-001 (failed, then succeeded).
    std::fs::write(
        tmp.path().join("s0.failures.jsonl"),
        ledger("failed-1") + &ledger("ex-001"),
    )
    .unwrap();

    // The prompt without an id (its id derived from the content) is missing.
    let out = tmp.path().join("pairs.jsonl");
    let err = merge(&[&a, &b], &out, &MergeOptions::new().input(&input)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("1 prompts of") && msg.contains(&format!(": {no_id};")),
        "{msg}"
    );
    assert!(!out.exists());

    // With it in a ledger, everything is accounted for.
    std::fs::write(tmp.path().join("s1.failures.jsonl"), ledger(&no_id)).unwrap();
    let s = merge(&[&a, &b], &out, &MergeOptions::new().input(&input)).unwrap();
    assert_eq!(s.examples, 8);
    assert_eq!(s.prompts, Some(10));
    assert_eq!(s.bad_input_lines, 1);
    assert_eq!(s.failed, 2);
    let merged_ledger = std::fs::read_to_string(tmp.path().join("pairs.failures.jsonl")).unwrap();
    assert!(merged_ledger.contains("failed-1") && merged_ledger.contains(&no_id));
    assert!(
        !merged_ledger.contains("ex-001"),
        "recovered ids are dropped"
    );
    let merged_recipe: Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("pairs.run.json")).unwrap())
            .unwrap();
    assert_eq!(merged_recipe["settings"]["seed"], "3");

    // Missing shards: the error lists the ids (first ten) and counts them.
    let err = merge(
        &[&a],
        tmp.path().join("half.jsonl"),
        &MergeOptions::new().input(&input),
    )
    .unwrap_err();
    // (the prompt without an id is in s1's ledger, not read here)
    assert!(err.to_string().contains(": 5 prompts of"), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("ex-004, ex-005, ex-006, ex-007, {no_id};")),
        "{err}"
    );

    // An example whose id is not a prompt: the shards come from another input.
    let other = tmp.path().join("other.jsonl");
    std::fs::write(&other, "{\"id\": \"zzz\", \"prompt\": \"q\"}\n").unwrap();
    let err = merge(
        &[&a],
        tmp.path().join("x.jsonl"),
        &MergeOptions::new().input(&other),
    )
    .unwrap_err();
    assert!(err.to_string().contains("1 prompts of"), "{err}");
    let without_3: String = prompts
        .lines()
        .filter(|l| !l.contains("ex-003"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&other, without_3).unwrap();
    let err = merge(
        &[&a, &b],
        tmp.path().join("x.jsonl"),
        &MergeOptions::new().input(&other),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("1 examples have ids that are not prompts of")
            && err.to_string().contains("s0.jsonl:4"),
        "{err}"
    );

    // Recipes that differ are not merged.
    std::fs::write(
        tmp.path().join("s1.run.json"),
        r#"{"settings": {"seed": "4"}}"#,
    )
    .unwrap();
    let s = merge(&[&a, &b], &out, &MergeOptions::new().overwrite(true)).unwrap();
    assert!(s.recipes_differ && s.recipe.is_none());
    assert!(
        !tmp.path().join("pairs.run.json").exists(),
        "a stale recipe is removed"
    );
}
