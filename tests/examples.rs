//! The examples users copy first, run as they are: each must finish and print pairs that obey
//! the construction rule (label `better`: the second response is `chosen`; `worse`: it is
//! `rejected`).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// An example's executable, which `cargo test` builds beside the test binaries
/// (`target/<profile>/examples/<name>`).
fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe()
        .expect("the test's path")
        .parent()
        .expect("deps/")
        .to_path_buf();
    let path = deps
        .parent()
        .expect("the profile's folder")
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples",
        path.display()
    );
    path
}

/// The text of a conversational column (a list of messages): its last message's content.
fn text(column: &Value) -> &str {
    column
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_else(|| panic!("not a conversational column: {column}"))
}

#[test]
fn custom_backend_makes_pairs_that_obey_the_construction_rule() {
    let out = Command::new(example("custom_backend"))
        .output()
        .expect("run the example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(rows.len(), 6, "{stdout}\n{stderr}");
    // The example's backend answers the second request with its good text when asked for a
    // better one and its vague text when asked for a worse one: the good text is never
    // rejected and the vague one never chosen, whichever label was drawn.
    const GOOD: &str = "Sunlight is scattered";
    const VAGUE: &str = "Something about light";
    let mut labels = Vec::new();
    for row in &rows {
        let (chosen, rejected) = (text(&row["chosen"]), text(&row["rejected"]));
        assert!(!chosen.contains(VAGUE), "vague text chosen: {row}");
        assert!(!rejected.contains(GOOD), "good text rejected: {row}");
        labels.push(row["label"].as_str().expect("a label").to_owned());
    }
    // Both directions are drawn (seed 7), so both halves of the rule are checked.
    assert!(labels.iter().any(|l| l == "better"), "{labels:?}");
    assert!(labels.iter().any(|l| l == "worse"), "{labels:?}");
}

#[test]
fn custom_method_plants_one_mistake_in_the_rejected_answer() {
    let run = || {
        let out = Command::new(example("custom_method"))
            .output()
            .expect("run the example");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let stdout = run();
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(rows.len(), 6, "{stdout}");
    let mut mistakes = std::collections::BTreeSet::new();
    for row in &rows {
        // The second response is the worse one: it is `rejected`, and it differs from the
        // first only by the planted mistake.
        assert_eq!(row["label"], "worse", "{row}");
        assert_eq!(row["metadata"]["method"], "planted-error", "{row}");
        let (chosen, rejected) = (text(&row["chosen"]), text(&row["rejected"]));
        assert!(chosen.starts_with("Water boils at 100 degrees"), "{row}");
        assert_ne!(chosen, rejected, "{row}");
        mistakes.insert(
            row["metadata"]["mistake"]
                .as_str()
                .expect("a mistake")
                .to_owned(),
        );
    }
    // The mistake is drawn per example, and the same in every run (seed and id only).
    assert!(mistakes.len() > 1, "{mistakes:?}");
    assert_eq!(run(), stdout);
}
