//! The `rmboost` binary against HTTP servers: the loopback OpenAI-compatible test server of
//! `tests/support` for errors and the response cache, and a REAL llama.cpp server
//! (SmolLM2-135M-Instruct) for an end-to-end run.
//!
//! The llama.cpp test needs `scripts/setup-test-env.sh` to have run (`.ci/run` does); it FAILS,
//! naming RMBOOST_PYTHON and RMBOOST_MODEL, when python or the model is missing.
#![cfg(feature = "cli")]

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::openai_server::OpenAiServer;
use support::LlamaServer;

const BIN: &str = env!("CARGO_BIN_EXE_rmboost");
const KEY: &str = "sk-test-0123456789abcdef-never-print-me";

fn cmd() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("RUST_LOG")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn prompts(dir: &std::path::Path, n: usize) -> String {
    let p = dir.join("in.jsonl");
    let body: String = (1..=n)
        .map(|i| {
            format!(
                "{{\"id\": \"q{i}\", \"prompt\": \"Name {i} fruit, in one short sentence.\"}}\n"
            )
        })
        .collect();
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

fn assert_no_key(o: &Output) {
    assert!(!text(&o.stdout).contains(KEY), "key on stdout");
    assert!(!text(&o.stderr).contains(KEY), "key on stderr");
}

#[test]
fn permanent_401_is_fatal_with_one_line_and_no_output() {
    let server = OpenAiServer::builder()
        .fail_every_request(401, "Incorrect API key provided.")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 10);
    let out = dir.path().join("out.jsonl");
    let o = cmd()
        .args(["generate", "-i", &input, "-o"])
        .arg(&out)
        .args([
            "--backend",
            "openai",
            "--model",
            "gpt-test",
            "--no-cache",
            "--base-url",
        ])
        .arg(server.base_url())
        .env("OPENAI_API_KEY", KEY)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: "), "{err}");
    assert!(last.contains("authentication (HTTP 401)"), "{err}");
    assert!(last.contains("Incorrect API key"), "{err}");
    assert!(!out.exists(), "no output file is left behind");
    assert_no_key(&o);
    // The key was sent, only never shown.
    let first = &server.recorded()[0];
    assert_eq!(
        first.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    // A permanent error is not retried, and the run stops at once.
    let calls = server.requests();
    assert!(calls <= 8, "{calls} calls");
}

#[test]
fn a_missing_key_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 2);
    let o = cmd()
        .args(["generate", "-i", &input, "-o"])
        .arg(dir.path().join("out.jsonl"))
        .args(["--backend", "openai", "--model", "gpt-test", "--no-cache"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("OPENAI_API_KEY"), "{err}");

    let o = cmd()
        .args(["generate", "-i", &input, "-o"])
        .arg(dir.path().join("out.jsonl"))
        .args([
            "--backend",
            "anthropic",
            "--model",
            "claude-test",
            "--no-cache",
        ])
        .args(["--api-key-env", "MY_KEY_VAR"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("MY_KEY_VAR"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn an_unreachable_server_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 20);
    let out = dir.path().join("out.jsonl");
    let o = cmd()
        .args(["generate", "-i", &input, "-o"])
        .arg(&out)
        .args([
            "--backend",
            "openai",
            "--retries",
            "0",
            "-j",
            "2",
            "--base-url",
        ])
        .arg(format!("http://127.0.0.1:{}/v1", support::dead_port()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.lines().last().unwrap().contains("unreachable"), "{err}");
    assert!(!out.exists());
}

#[test]
fn three_prompts_against_a_real_llama_cpp_server() {
    if !LlamaServer::available("three_prompts_against_a_real_llama_cpp_server") {
        return;
    }
    let server = LlamaServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 3);
    let out = dir.path().join("out.jsonl");
    let o = cmd()
        .args(["generate", "-i", &input, "-o"])
        .arg(&out)
        .args([
            "--backend",
            "openai",
            "--model",
            "smollm2",
            "--max-tokens",
            "96",
            "--max-reasks",
            "6",
            "-j",
            "2",
            "--seed",
            "1",
            "--cache-dir",
        ])
        .arg(dir.path().join("cache"))
        .arg("--summary-json")
        .arg(dir.path().join("s.json"))
        .arg("--base-url")
        .arg(server.v1())
        .output()
        .unwrap();
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("s.json")).unwrap()).unwrap();
    // A 135M model may fail to produce a usable second answer; those examples are in the
    // ledger, never in the output.
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let written = summary["examples_written"].as_u64().unwrap();
    let failed = summary["failed"].as_u64().unwrap();
    assert_eq!(written + failed, 3, "{summary}");
    assert!(written >= 1, "{summary}");
    assert!(
        summary["tokens"]["total"].as_u64().unwrap() > 0,
        "{summary}"
    );
    let rows: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len() as u64, written);
    for r in &rows {
        assert_ne!(r["chosen"], r["rejected"]);
        assert!(!r["chosen"][0]["content"].as_str().unwrap().is_empty());
    }
    assert!(text(&o.stdout).contains("rmboost generate: completed"));
}

#[test]
fn a_rerun_is_answered_from_the_response_cache() {
    let server = OpenAiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 4);
    let out = dir.path().join("out.jsonl");
    let go = || {
        cmd()
            .args(["generate", "-i", &input, "-o"])
            .arg(&out)
            .args(["--backend", "openai", "--model", "gpt-test", "--overwrite"])
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--base-url")
            .arg(server.base_url())
            .arg("--summary-json")
            .arg(dir.path().join("s.json"))
            .env("OPENAI_API_KEY", KEY)
            .output()
            .unwrap()
    };
    let summary = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("s.json")).unwrap()).unwrap()
    };
    let o = go();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert_eq!(summary()["examples_written"], 4, "{}", summary());
    assert_eq!(summary()["cache"]["misses"], 8, "{}", summary());
    let calls = server.requests();
    assert_eq!(calls, 8);

    let o = go();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let s = summary();
    assert_eq!(s["examples_written"], 4, "{s}");
    assert_eq!(s["cache"]["hits"], 8, "{s}");
    assert_eq!(s["tokens"]["total"], 0, "cache hits cost nothing: {s}");
    assert_eq!(server.requests(), calls);
    assert!(
        text(&o.stdout).contains("8 hits, 0 misses"),
        "{}",
        text(&o.stdout)
    );
    assert_no_key(&o);

    // --clear-cache empties it first.
    let o = cmd()
        .args(["generate", "-i", &input, "-o"])
        .arg(&out)
        .args([
            "--backend",
            "openai",
            "--model",
            "gpt-test",
            "--overwrite",
            "--clear-cache",
        ])
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--base-url")
        .arg(server.base_url())
        .env("OPENAI_API_KEY", KEY)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(server.requests(), calls + 8);
}
