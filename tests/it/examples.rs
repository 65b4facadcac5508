//! The examples users copy first, run as they are: each must finish and print pairs that obey
//! the construction rule (label `better`: the second response is `chosen`; `worse`: it is
//! `rejected`).
//!
//! `openai_compatible` (feature `openai`) runs against the loopback OpenAI-compatible test
//! server of `support`. `quickstart` (feature `local`) runs the real SmolLM2 model in
//! process: like the other live tests it needs the model that `scripts/setup-test-env.sh`
//! installs (or `RMBOOST_MODEL`), is skipped with the reason by a plain `cargo test` without
//! it, and fails instead under `RMBOOST_LIVE_TESTS=required` (`scripts/test.sh`).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// An example's executable, `target/<profile>/examples/<name>`, up to date.
///
/// A plain `cargo test` builds the examples (those whose required features are on) beside the
/// test binaries, but `cargo test --test it` builds only the tests, and would leave them
/// missing or stale; so the examples are built here once per run, with this test's features and
/// profile into the same target directory (nothing to do, a second or so, after a plain
/// `cargo test`).
fn example(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let deps = std::env::current_exe()
        .expect("the test's path")
        .parent()
        .expect("deps/")
        .to_path_buf();
    let profile_dir = deps.parent().expect("the profile's folder");
    if let Err(e) = BUILT.get_or_init(|| build_examples(profile_dir)) {
        panic!("{e}");
    }
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// `cargo build --examples` with the features this test was built with, into the target
/// directory and profile folder it runs from.
fn build_examples(profile_dir: &std::path::Path) -> Result<(), String> {
    let features: Vec<&str> = [
        ("test-util", cfg!(feature = "test-util")),
        ("local", cfg!(feature = "local")),
        ("run", cfg!(feature = "run")),
        ("batch", cfg!(feature = "batch")),
        ("cache", cfg!(feature = "cache")),
        ("middleware", cfg!(feature = "middleware")),
        ("openai", cfg!(feature = "openai")),
        ("anthropic", cfg!(feature = "anthropic")),
        ("parquet", cfg!(feature = "parquet")),
        ("cli", cfg!(feature = "cli")),
    ]
    .into_iter()
    .filter_map(|(f, on)| on.then_some(f))
    .collect();
    // `target/debug` is the test profile's folder (cargo test), `target/release` the release
    // profile's (cargo test --release).
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("release") => "release",
        _ => "test",
    };
    let target_dir = profile_dir.parent().expect("the target folder");
    let mut cargo = Command::new(env!("CARGO"));
    // Cargo gives this test the variables of the package it belongs to; a build script that
    // watches one (ring's watches CARGO_PKG_NAME and CARGO_MANIFEST_DIR, for instance) would
    // see it change, and the two builds would rebuild each other's dependencies every time.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&name)
        {
            cargo.env_remove(name);
        }
    }
    let out = cargo
        .args([
            "build",
            "--examples",
            "--no-default-features",
            "--profile",
            profile,
        ])
        .arg("--features")
        .arg(features.join(","))
        .arg("--manifest-path")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .output()
        .map_err(|e| format!("cannot run cargo to build the examples: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The JSON lines of a text, each parsed.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not a JSON line: {l}")))
        .collect()
}

/// The text of a conversational column (a list of messages): its last message's content.
fn text(column: &Value) -> &str {
    column
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_else(|| panic!("not a conversational column: {column}"))
}

/// The second response and the first of a row, by the construction rule: with label `better`
/// the second is `chosen`, with `worse` it is `rejected`.
#[cfg_attr(not(feature = "openai"), allow(dead_code))]
fn second_and_first(row: &Value) -> (&str, &str) {
    let (chosen, rejected) = (text(&row["chosen"]), text(&row["rejected"]));
    match row["label"].as_str() {
        Some("better") => (chosen, rejected),
        Some("worse") => (rejected, chosen),
        other => panic!("label {other:?}: {row}"),
    }
}

#[test]
fn custom_backend_makes_pairs_that_obey_the_construction_rule() {
    let out = Command::new(example("custom_backend"))
        .output()
        .expect("run the example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    let rows = json_lines(&stdout);
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
    let rows = json_lines(&stdout);
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

/// The OpenAI-compatible example against the loopback test server, which answers as
/// `FakeBackend` does: a first response reads `answer <seed> ...`, a second one (asked inside
/// `<response>` tags) `rewrite <seed> ...`. So each row shows which response came second, and
/// the construction rule is checked in both directions.
#[cfg(feature = "openai")]
#[test]
fn openai_compatible_makes_pairs_that_obey_the_construction_rule() {
    use crate::support::server::Server;

    let server = Server::start();
    let out = Command::new(example("openai_compatible"))
        .env("OPENAI_BASE_URL", server.base_url())
        .env("OPENAI_MODEL", "served-model")
        .env_remove("OPENAI_API_KEY")
        .env_remove("RUST_LOG")
        .output()
        .expect("run the example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    let rows = json_lines(&stdout);

    // One row per prompt of the example, each once.
    let mut ids: Vec<&str> = rows
        .iter()
        .map(|r| r["id"].as_str().expect("an id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["ex0", "ex1", "ex2", "ex3"], "{stdout}\n{stderr}");

    let mut labels = Vec::new();
    for row in &rows {
        let label = row["label"].as_str().expect("a label");
        let (second, first) = second_and_first(row);
        assert!(second.starts_with("rewrite "), "second response: {row}");
        assert!(first.starts_with("answer "), "first response: {row}");
        assert!(!second.contains("<response>"), "tags left in: {row}");
        assert_eq!(row["metadata"]["method"], "rmboost", "{row}");
        assert_eq!(row["metadata"]["seed"], 1, "{row}");
        assert_eq!(row["metadata"]["calls"], 2, "{row}");
        assert_eq!(row["metadata"]["reasks"], 0, "{row}");
        assert!(
            !row["aspects"].as_array().expect("aspects").is_empty(),
            "{row}"
        );
        labels.push(label.to_owned());
    }
    // Both directions are drawn (seed 1), so both halves of the rule are checked.
    assert!(labels.iter().any(|l| l == "better"), "{labels:?}");
    assert!(labels.iter().any(|l| l == "worse"), "{labels:?}");

    // The summary, on stderr: every count, and no retry against a server that never fails.
    let summary = stderr.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("4 examples, 0 failed, 0 re-asks, 8 calls, "),
        "{stderr}"
    );
    assert!(summary.contains("; 0 retries; "), "{stderr}");

    // Two calls per example, to the model named, with no key (none was set).
    assert_eq!(server.requests(), 8);
    for request in server.recorded() {
        assert_eq!(request.path, "/v1/chat/completions");
        assert_eq!(request.body["model"], "served-model");
        assert_eq!(request.header("authorization"), None);
    }
}

/// Without its two settings the OpenAI-compatible example says which are missing and exits 2.
#[cfg(feature = "openai")]
#[test]
fn openai_compatible_without_settings_names_them() {
    let out = Command::new(example("openai_compatible"))
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_MODEL")
        .output()
        .expect("run the example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("OPENAI_BASE_URL") && stderr.contains("OPENAI_MODEL"),
        "{stderr}"
    );
}

/// The README's first command, on the real model: the bundled prompts, cut to the first two by
/// the example's `N` argument, so that the test profile (this crate at opt-level 1) runs it in
/// well under a minute (40 s with one busy core; both decode together, about 640 steps).
#[cfg(feature = "local")]
#[test]
fn quickstart_runs_the_local_model_on_the_first_bundled_prompts() {
    const TEST: &str = "quickstart_runs_the_local_model_on_the_first_bundled_prompts";
    const N: usize = 2;
    let Some(model) = live_model(TEST) else {
        return;
    };
    let bundled =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/quickstart_prompts.jsonl");
    let first_ids: Vec<String> = json_lines(&std::fs::read_to_string(&bundled).unwrap())
        .iter()
        .take(N)
        .map(|p| p["id"].as_str().expect("an id").to_owned())
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("pairs.jsonl");
    let out = Command::new(example("quickstart"))
        .arg(&output)
        .arg(&bundled)
        .arg(N.to_string())
        .env("RMBOOST_MODEL", &model)
        // One candle thread: two spinning threads on a busy machine are slower (see
        // tests/local_model.rs); the output does not depend on it.
        .env("CANDLE_NUM_THREADS", "1")
        .env_remove("RUST_LOG")
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");

    // The summary: the model it loaded, then every prompt accounted for.
    assert!(
        stdout.starts_with(&format!("model {} loaded in ", model.display())),
        "{context}"
    );
    let field = |name: &str| -> &str {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no `{name}` line\n{context}"))
            .trim()
    };
    let examples: usize = field("examples:")
        .strip_suffix(&format!(" of {N} prompts"))
        .unwrap_or_else(|| panic!("not `... of {N} prompts`\n{context}"))
        .parse()
        .expect("a count");
    let failures: usize = field("failures:").parse().expect("a count");
    assert_eq!(examples + failures, N, "{context}");
    assert!(examples > 0, "no pair made\n{context}");
    assert_eq!(field("output:"), output.display().to_string(), "{context}");
    assert!(
        stdout.contains("it does\nnot make training data"),
        "{context}"
    );

    // The file: one row per example made, each id once and among the first N, the row shape
    // and metadata of an RMBoost pair. The texts of the real model do not show which response
    // came first, so the rule itself is checked by the tests above and the crate's own; here
    // each printed label line matches its row.
    let rows = json_lines(&std::fs::read_to_string(&output).unwrap());
    assert_eq!(rows.len(), examples, "{context}");
    let mut seen = std::collections::BTreeSet::new();
    for row in &rows {
        let id = row["id"].as_str().expect("an id");
        assert!(
            first_ids.iter().any(|f| f == id),
            "{id} is not a first prompt"
        );
        assert!(seen.insert(id.to_owned()), "{id} twice");
        let label = row["label"].as_str().expect("a label");
        assert!(label == "better" || label == "worse", "{row}");
        let (chosen, rejected) = (text(&row["chosen"]), text(&row["rejected"]));
        assert!(
            !chosen.trim().is_empty() && !rejected.trim().is_empty(),
            "{row}"
        );
        assert_ne!(chosen, rejected, "{row}");
        let metadata = &row["metadata"];
        assert_eq!(metadata["method"], "rmboost", "{row}");
        assert_eq!(metadata["seed"], 1, "{row}");
        assert!(metadata["calls"].as_u64().expect("calls") >= 2, "{row}");
        assert!(metadata["models"]["first"].is_string(), "{row}");
        assert!(metadata["models"]["second"].is_string(), "{row}");
        assert!(
            metadata["usage"]["total"]["completion_tokens"]
                .as_u64()
                .expect("usage")
                > 0,
            "{row}"
        );
        let aspects: Vec<&str> = row["aspects"]
            .as_array()
            .expect("aspects")
            .iter()
            .map(|a| a.as_str().expect("an aspect name"))
            .collect();
        assert!(!aspects.is_empty(), "{row}");
        let printed = format!("{id:>8}  {label:<6}  {}", aspects.join(", "));
        assert!(
            stdout.lines().any(|l| l == printed),
            "no line `{printed}`\n{context}"
        );
    }
}

/// The model file for a test of the real local model: `RMBOOST_MODEL`, or the one
/// `scripts/setup-test-env.sh` installs into `.venv`. Without one, a plain `cargo test` skips
/// the test and says why; under `RMBOOST_LIVE_TESTS=required` (`scripts/test.sh`) it fails.
#[cfg(feature = "local")]
fn live_model(test: &str) -> Option<PathBuf> {
    let why = match crate::support::model_path() {
        Some(m) if m.is_file() => return Some(m),
        Some(m) => format!("model file {} (RMBOOST_MODEL) missing", m.display()),
        None => "no model (RMBOOST_MODEL unset, none in .venv)".to_owned(),
    };
    if crate::support::live_tests_required() {
        panic!(
            "{test}: {why}: run `scripts/setup-test-env.sh` and export the RMBOOST_MODEL line \
             it prints"
        );
    }
    eprintln!(
        "SKIPPED {test}: {why}; run `bash scripts/test.sh` (the README's test command) to \
         install the model and run it"
    );
    None
}

/// The README's "Use it from Rust" section shows `examples/readme.rs` as it is: its Rust block
/// is the file without the `//!` header, and its `[dependencies]` block names every crate the
/// file uses, with the features it needs.
#[test]
fn the_readme_snippet_is_examples_readme_rs() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let file = std::fs::read_to_string(root.join("examples/readme.rs")).unwrap();
    let section = readme
        .split("\n## Use it from Rust\n")
        .nth(1)
        .expect("README has a `## Use it from Rust` section");
    let section = section.split("\n## ").next().unwrap();
    let block = |fence: &str| -> &str {
        let start = section
            .find(fence)
            .unwrap_or_else(|| panic!("no {fence} block in the section"))
            + fence.len();
        let len = section[start..].find("\n```\n").expect("a closing fence") + 1;
        &section[start..start + len]
    };

    let body = file
        .split_inclusive('\n')
        .skip_while(|l| l.starts_with("//!"))
        .collect::<String>();
    let body = body
        .strip_prefix('\n')
        .expect("a blank line after the header");
    let snippet = block("```rust\n");
    assert!(
        snippet == body,
        "README.md's Rust snippet and examples/readme.rs (below its header) differ: copy one \
         into the other\n--- README ---\n{snippet}\n--- examples/readme.rs ---\n{body}"
    );

    let deps = block("```toml\n");
    assert!(deps.starts_with("[dependencies]\n"), "{deps}");
    let dep = |name: &str| {
        deps.lines()
            .find(|l| l.starts_with(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("README's [dependencies] lacks {name}:\n{deps}"))
    };
    assert!(dep("rmboost").contains("features = [\"openai\"]"), "{deps}");
    assert!(dep("futures").contains("\"0.3\""), "{deps}");
    let tokio = dep("tokio");
    for feature in ["\"macros\"", "\"rt-multi-thread\""] {
        assert!(tokio.contains(feature), "tokio needs {feature}: {deps}");
    }
    // The crates the snippet uses are the ones listed (std aside).
    for used in ["rmboost::", "futures::", "tokio::"] {
        assert!(snippet.contains(used), "{used}");
    }
}

/// `examples/readme.rs` (the README's snippet) runs against the loopback OpenAI-compatible
/// test server and prints the one pair, which obeys the construction rule.
#[cfg(feature = "openai")]
#[test]
fn the_readme_snippet_makes_a_pair() {
    use crate::support::server::Server;

    let server = Server::start();
    let out = Command::new(example("readme"))
        .env("OPENAI_BASE_URL", server.base_url())
        .env_remove("OPENAI_API_KEY")
        .env_remove("RUST_LOG")
        .output()
        .expect("run the example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    let rows = json_lines(std::str::from_utf8(&out.stdout).expect("UTF-8"));
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(text(&row["prompt"]), "Why is the sky blue?", "{row}");
    let (second, first) = second_and_first(row);
    assert!(
        second.starts_with("rewrite ") && first.starts_with("answer "),
        "{row}"
    );
    assert_eq!(row["metadata"]["seed"], 42, "{row}");
    assert_eq!(server.requests(), 2);
    for request in server.recorded() {
        assert_eq!(request.body["model"], "smollm2");
    }
}
