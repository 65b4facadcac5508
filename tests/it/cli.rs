//! End-to-end tests of the `rmboost` binary (feature `cli`): the real binary with
//! `--backend openai` against the loopback OpenAI-compatible test server of `tests/support`
//! (answers like `FakeBackend`'s; latency and error statuses set per test).

use crate::support;

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::server::{Config, Fault, Server, REJECTED};
use support::{cmd, BIN};

/// How long a test waits for something that takes well under a second on an idle machine.
const PATIENCE: Duration = Duration::from_secs(120);

fn run(args: &[&str]) -> Output {
    cmd().args(args).output().expect("the binary runs")
}

/// The flags that point the binary at the test server at `url`: the OpenAI-compatible
/// backend, no response cache (tests must not share the user's), no transport retries.
fn openai(url: &str) -> [&str; 9] {
    [
        "--backend",
        "openai",
        "--base-url",
        url,
        "--model",
        "test",
        "--no-cache",
        "--retries",
        "0",
    ]
}

/// `rmboost generate ARGS` against the test server at `url`.
fn generate(url: &str, args: &[&str]) -> Output {
    cmd()
        .arg("generate")
        .args(args)
        .args(openai(url))
        .output()
        .expect("the binary runs")
}

/// A base URL where nothing listens.
fn dead_url() -> String {
    format!("http://127.0.0.1:{}/v1", support::dead_port())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    /// `n` prompts with ids q1..qn.
    fn prompts(&self, name: &str, n: usize) -> String {
        let text: String = (1..=n)
            .map(|i| format!("{{\"id\": \"q{i}\", \"prompt\": \"Question number {i}?\"}}\n"))
            .collect();
        std::fs::write(self.path(name), text).unwrap();
        self.s(name)
    }
}

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each output line is JSON"))
        .collect()
}

fn ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn assert_exactly_once(rows: &[Value], n: usize) {
    let ids = ids(rows);
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), n, "every prompt once: {ids:?}");
    assert_eq!(unique.len(), n, "no duplicates: {ids:?}");
    for i in 1..=n {
        assert!(unique.contains(&format!("q{i}")), "q{i} missing");
    }
}

#[test]
fn help_and_version() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let help = stdout(&o);
    for needle in [
        "generate",
        "dry-run",
        "Exit status:",
        "--max-cost",
        "OPENAI_API_KEY",
    ] {
        assert!(help.contains(needle), "help lacks {needle}:\n{help}");
    }
    let o = run(&["generate", "--help"]);
    let help = stdout(&o);
    for needle in [
        "--input",
        "--output",
        "--backend",
        "--aspects",
        "--format",
        "--limit",
        "--concurrency",
        "--price-input",
        "--summary-json",
        "--on-bad-line",
        "local",
        "openai",
        "anthropic",
    ] {
        assert!(
            help.contains(needle),
            "generate --help lacks {needle}:\n{help}"
        );
    }
    assert!(!help.contains("fake"), "no test backends:\n{help}");
    let o = run(&["--version"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("rmboost "), "{}", stdout(&o));
}

#[test]
fn bad_flags_are_usage_errors() {
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 3);
    let out = d.s("out.jsonl");
    // Nothing may be called: the model flags point where nothing listens.
    let url = dead_url();
    let mut cases: Vec<Vec<&str>> = vec![
        vec!["generate", "--input", &input],
        vec!["generate", "-i", &input, "-o", &out, "--no-such-flag"],
        vec!["generate", "-i", &input, "-o", &out, "--format", "yaml"],
        vec!["generate", "-i", &input, "-o", &out, "--concurrency", "x"],
    ];
    // Right model flags, one bad flag.
    for bad in [
        ["--concurrency", "0"],
        ["--shard", "2/2"],
        ["--max-cost", "1"],
        ["--aspects", "nope"],
        ["--p-better", "2"],
        ["--aspect-sampling", "9"],
    ] {
        let mut args = vec!["generate", "-i", &input, "-o", &out];
        args.extend(openai(&url));
        args.extend(bad);
        cases.push(args);
    }
    cases.push(vec!["frobnicate"]);
    for args in cases {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("error"), "{args:?}: {}", stderr(&o));
    }
    assert!(!d.path("out.jsonl").exists());

    // The library's checks, named by their flag.
    for (bad, says) in [
        (
            ["--max-cost", "0", "--price-input", "1"],
            "--max-cost: invalid configuration: the cost budget must be a positive amount, not 0",
        ),
        (
            ["--max-cost", "NaN", "--price-output", "1"],
            "--max-cost: invalid configuration: the cost budget must be a positive amount, not NaN",
        ),
        (
            ["--aspects", "qa", "--aspect-sampling", "model-picks:9"],
            "--aspect-sampling: invalid configuration: aspect set \"qa\": model_picks max 9",
        ),
    ] {
        let mut args = vec!["generate", "-i", &input, "-o", &out];
        args.extend(openai(&url));
        args.extend(bad);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
    assert!(!d.path("out.jsonl").exists());
}

#[test]
fn generates_conversational_pairs_and_a_summary() {
    let server = Server::start();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 12);
    let out = d.path("out.jsonl");
    let json = d.path("summary.json");
    let o = generate(
        &server.base_url(),
        &[
            "-i",
            &input,
            "-o",
            &d.s("out.jsonl"),
            "--seed",
            "7",
            "--summary-json",
            &d.s("summary.json"),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let rows = rows(&out);
    assert_exactly_once(&rows, 12);
    for r in &rows {
        assert_eq!(r["prompt"][0]["role"], "user");
        assert_eq!(r["chosen"][0]["role"], "assistant");
        assert_eq!(r["rejected"][0]["role"], "assistant");
        assert!(["better", "worse"].contains(&r["label"].as_str().unwrap()));
        assert_eq!(r["metadata"]["seed"], 7);
    }
    let text = stdout(&o);
    assert!(text.starts_with("rmboost generate: completed\n"), "{text}");
    assert!(text.contains("examples written  12 ("), "{text}");
    assert!(text.contains("failed            0\n"), "{text}");
    assert!(text.contains("tokens"), "{text}");
    assert!(text.contains("examples/s"), "{text}");
    let s: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(s["status"], "completed");
    assert_eq!(s["examples_written"], 12);
    assert_eq!(s["failed"], 0);
    assert_eq!(s["calls"], 24);
    assert_eq!(server.requests(), 24);
    assert!(s["tokens"]["total"].as_u64().unwrap() > 0);
    assert!(s.get("cost").is_none());
    // Not a terminal: no bar, and with the default interval no progress lines in a short run.
    assert!(!stderr(&o).contains('\r'), "{}", stderr(&o));
}

#[test]
fn limit_then_resume_writes_each_prompt_exactly_once() {
    let server = Server::start();
    let url = server.base_url();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 20);
    let out = d.s("out.jsonl");
    let base = ["-i", &input, "-o", &out];
    let o = generate(&url, &[&base[..], &["--limit", "5"]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("stopped at --limit"), "{}", stdout(&o));
    assert_eq!(rows(&d.path("out.jsonl")).len(), 5);

    let o = generate(&url, &base);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("examples written  15 ("), "{text}");
    assert!(text.contains("already done      5 "), "{text}");
    assert_exactly_once(&rows(&d.path("out.jsonl")), 20);

    // A third run has nothing to do.
    let o = generate(&url, &base);
    assert!(
        stdout(&o).contains("examples written  0 ("),
        "{}",
        stdout(&o)
    );
    assert_exactly_once(&rows(&d.path("out.jsonl")), 20);

    // --overwrite starts afresh.
    let o = generate(
        &url,
        &[&base[..], &["--overwrite", "--limit", "3"]].concat(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(rows(&d.path("out.jsonl")).len(), 3);
}

#[test]
fn resume_after_a_torn_last_line() {
    let server = Server::start();
    let url = server.base_url();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 6);
    let out = d.s("out.jsonl");
    let base = ["-i", &input, "-o", &out];
    assert!(generate(&url, &[&base[..], &["--limit", "3"]].concat())
        .status
        .success());
    // A crash mid-write leaves half a line.
    let mut text = std::fs::read_to_string(d.path("out.jsonl")).unwrap();
    text.push_str("{\"id\": \"q9\", \"prompt\": [{\"ro");
    std::fs::write(d.path("out.jsonl"), text).unwrap();
    let o = generate(&url, &base);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_exactly_once(&rows(&d.path("out.jsonl")), 6);
}

#[test]
fn standard_format_writes_strings() {
    let server = Server::start();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 3);
    let o = generate(
        &server.base_url(),
        &[
            "-i",
            &input,
            "-o",
            &d.s("out.jsonl"),
            "--format",
            "standard",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for r in rows(&d.path("out.jsonl")) {
        assert!(r["prompt"].as_str().unwrap().starts_with("Question number"));
        assert!(r["chosen"].is_string());
        assert!(r["rejected"].is_string());
    }
}

#[test]
fn aspects_from_a_json_file() {
    let server = Server::start();
    let url = server.base_url();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 10);
    std::fs::write(
        d.path("legal.json"),
        r#"{"name": "legal", "aspects": [
            {"name": "precision", "definition": "uses exact legal terms"},
            {"name": "caution", "definition": "says when to ask a lawyer"},
            {"name": "brevity", "definition": "is short"}
        ], "sampling": {"mode": "subset", "min": 1, "max": 2}}"#,
    )
    .unwrap();
    let o = generate(
        &url,
        &[
            "-i",
            &input,
            "-o",
            &d.s("out.jsonl"),
            "--aspects",
            &d.s("legal.json"),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let allowed: BTreeSet<&str> = ["precision", "caution", "brevity"].into();
    let mut seen = BTreeSet::new();
    for r in rows(&d.path("out.jsonl")) {
        let aspects = r["aspects"].as_array().unwrap();
        assert!((1..=2).contains(&aspects.len()), "{aspects:?}");
        for a in aspects {
            let a = a.as_str().unwrap().to_string();
            assert!(allowed.contains(a.as_str()), "{a}");
            seen.insert(a);
        }
    }
    assert!(seen.len() >= 2, "{seen:?}");

    // --aspect-sampling all overrides the file's sampling.
    let o = generate(
        &url,
        &[
            "-i",
            &input,
            "-o",
            &d.s("all.jsonl"),
            "--aspects",
            &d.s("legal.json"),
            "--aspect-sampling",
            "all",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for r in rows(&d.path("all.jsonl")) {
        assert_eq!(r["aspects"].as_array().unwrap().len(), 3);
    }

    // A bare `model-picks` fits a set of fewer than 3 aspects (the model may pick both);
    // an explicit `model-picks:3` is checked against it.
    std::fs::write(
        d.path("two.json"),
        r#"[{"name": "precision", "definition": "uses exact legal terms"},
            {"name": "brevity", "definition": "is short"}]"#,
    )
    .unwrap();
    let picks = |mode: &str, out: &str| {
        generate(
            &url,
            &[
                "-i",
                &input,
                "-o",
                &d.s(out),
                "--aspects",
                &d.s("two.json"),
                "--aspect-sampling",
                mode,
            ],
        )
    };
    let o = picks("model-picks", "picks.jsonl");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(rows(&d.path("picks.jsonl")).len(), 10);
    let o = picks("model-picks:3", "picks3.jsonl");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("--aspect-sampling: invalid configuration: aspect set \"two\": model_picks max 3 must be in 1..=2"),
        "{}",
        stderr(&o)
    );
    assert!(!d.path("picks3.jsonl").exists());

    // A broken file is a fatal error naming the file.
    std::fs::write(d.path("bad.json"), "{\"aspects\": 3}").unwrap();
    let o = generate(
        &url,
        &[
            "-i",
            &input,
            "-o",
            &d.s("bad.jsonl"),
            "--aspects",
            &d.s("bad.json"),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad.json"), "{}", stderr(&o));
}

#[test]
fn dry_run_shows_requests_and_matches_the_real_run() {
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 5);
    let o = run(&["dry-run", "-i", &input, "-n", "2", "--seed", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("=== prompt 1: id q1"), "{text}");
    assert!(text.contains("=== prompt 2: id q2"), "{text}");
    assert!(!text.contains("id q3"), "{text}");
    assert!(text.contains("--- first request"), "{text}");
    assert!(text.contains("--- second request"), "{text}");
    assert!(text.contains("<first response goes here>"), "{text}");
    assert!(text.contains("Question number 1?"), "{text}");

    let o = run(&["inspect", "-i", &input, "-n", "5", "--seed", "3", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plans: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(plans.len(), 5);
    for p in &plans {
        assert_eq!(p["first_request"]["messages"][0]["role"], "user");
        let second = p["second_request"]["messages"].to_string();
        assert!(second.contains("<first response goes here>"), "{second}");
        assert!(p["first_request"]["seed"].is_u64());
    }

    // The same seed gives the same labels and aspects in a real run.
    let server = Server::start();
    let o = generate(
        &server.base_url(),
        &[
            "-i",
            &input,
            "-o",
            &d.s("out.jsonl"),
            "--seed",
            "3",
            "--concurrency",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = rows(&d.path("out.jsonl"));
    for p in &plans {
        let row = out.iter().find(|r| r["id"] == p["id"]).unwrap();
        assert_eq!(row["label"], p["label"]);
        let names: Vec<&Value> = p["aspects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| &a["name"])
            .collect();
        let got: Vec<&Value> = row["aspects"].as_array().unwrap().iter().collect();
        assert_eq!(got, names);
    }
}

#[test]
fn a_bad_key_is_fatal_with_one_line_and_no_output() {
    let server = Server::with(Config {
        fail_every: Some((401, "Incorrect API key provided.".into())),
        ..Config::default()
    });
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 10);
    let o = generate(&server.base_url(), &["-i", &input, "-o", &d.s("out.jsonl")]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("error: "), "{err}");
    assert!(last.contains("authentication (HTTP 401)"), "{err}");
    assert!(
        stdout(&o).contains("rmboost generate: failed"),
        "{}",
        stdout(&o)
    );
    assert!(
        !d.path("out.jsonl").exists(),
        "no output file is left behind"
    );
}

#[test]
fn an_unreachable_server_is_fatal() {
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 50);
    let o = generate(
        &dead_url(),
        &["-i", &input, "-o", &d.s("out.jsonl"), "--concurrency", "2"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.lines().last().unwrap().contains("unreachable"), "{err}");
    assert!(!d.path("out.jsonl").exists());
}

#[test]
fn unreadable_input_is_fatal() {
    let server = Server::start();
    let d = Dir::new();
    let o = generate(
        &server.base_url(),
        &["-i", &d.s("missing.jsonl"), "-o", &d.s("out.jsonl")],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: cannot read the input: "), "{err}");
    assert!(err.contains("missing.jsonl"), "{err}");
    assert_eq!(server.requests(), 0);
}

#[test]
fn failures_go_to_the_ledger_not_the_output() {
    // One first call in four (by seed) is rejected with 400: a permanent, non-fatal failure.
    let server = Server::with(Config {
        reject_first_one_in: Some(4),
        ..Config::default()
    });
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 40);
    let o = generate(
        &server.base_url(),
        &[
            "-i",
            &input,
            "-o",
            &d.s("out.jsonl"),
            "--summary-json",
            &d.s("s.json"),
        ],
    );
    // Every prompt was processed, but some examples failed: exit status 4, not 0.
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path("s.json")).unwrap()).unwrap();
    let failed = s["failed"].as_u64().unwrap();
    assert!(failed > 0, "{s}");
    assert_eq!(s["status"], "completed");
    assert_eq!(s["exit_status"], 4);
    assert!(
        stdout(&o).starts_with(&format!(
            "rmboost generate: completed, {failed} examples failed"
        )),
        "{}",
        stdout(&o)
    );
    assert_eq!(s["failures"]["invalid_request"], failed);
    let written = rows(&d.path("out.jsonl"));
    assert_eq!(written.len() as u64 + failed, 40);
    let ledger = rows(&d.path("out.failures.jsonl"));
    assert_eq!(ledger.len() as u64, failed);
    assert_eq!(s["ledger_pending"], failed);
    let out_ids: HashSet<String> = ids(&written).into_iter().collect();
    for l in &ledger {
        assert_eq!(l["kind"], "invalid_request");
        assert!(!out_ids.contains(l["id"].as_str().unwrap()));
    }
    let text = stdout(&o);
    assert!(text.contains("invalid_request"), "{text}");
    assert!(text.contains("out.failures.jsonl"), "{text}");
    // No error text in the data.
    assert!(!std::fs::read_to_string(d.path("out.jsonl"))
        .unwrap()
        .contains(REJECTED));
}

#[test]
fn bad_lines_are_skipped_or_stop_the_run() {
    let server = Server::start();
    let url = server.base_url();
    let d = Dir::new();
    std::fs::write(
        d.path("in.jsonl"),
        "{\"id\":\"q1\",\"prompt\":\"a?\"}\n{oops\n{\"id\":\"q2\",\"prompt\":\"b?\"}\n",
    )
    .unwrap();
    let input = d.s("in.jsonl");
    let o = generate(&url, &["-i", &input, "-o", &d.s("a.jsonl")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("bad input lines   1"), "{}", stdout(&o));
    assert!(stdout(&o).contains("in.jsonl:2"), "{}", stdout(&o));
    assert_eq!(rows(&d.path("a.jsonl")).len(), 2);

    let o = generate(
        &url,
        &[
            "-i",
            &input,
            "-o",
            &d.s("b.jsonl"),
            "--on-bad-line",
            "stop",
            "--order",
            "input",
            "--concurrency",
            "1",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).lines().last().unwrap().contains("in.jsonl:2"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn shards_split_the_input() {
    let server = Server::start();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 30);
    let mut all = Vec::new();
    for (i, name) in ["s0.jsonl", "s1.jsonl", "s2.jsonl"].iter().enumerate() {
        let shard = format!("{i}/3");
        let o = generate(
            &server.base_url(),
            &["-i", &input, "-o", &d.s(name), "--shard", &shard],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        if d.path(name).exists() {
            all.extend(rows(&d.path(name)));
        }
    }
    assert_exactly_once(&all, 30);
}

#[test]
fn max_cost_stops_gracefully_and_a_rerun_finishes() {
    let server = Server::with(Config {
        latency: Duration::from_millis(5),
        ..Config::default()
    });
    let url = server.base_url();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 200);
    let out = d.s("out.jsonl");
    let o = generate(
        &url,
        &[
            "-i",
            &input,
            "-o",
            &out,
            "--concurrency",
            "2",
            "--price-input",
            "1000",
            "--price-output",
            "1000",
            "--max-cost",
            "2",
            "--summary-json",
            &d.s("s.json"),
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}{}", stdout(&o), stderr(&o));
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path("s.json")).unwrap()).unwrap();
    assert_eq!(s["status"], "cost_limit");
    assert!(s["cost"].as_f64().unwrap() >= 2.0, "{s}");
    let written = rows(&d.path("out.jsonl")).len();
    assert!(written > 0 && written < 200, "{written}");
    assert!(stdout(&o).contains("--max-cost reached"), "{}", stdout(&o));

    let o = generate(&url, &["-i", &input, "-o", &out]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_exactly_once(&rows(&d.path("out.jsonl")), 200);
}

fn wait_for_lines(path: &Path, n: usize, timeout: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if std::fs::read_to_string(path).is_ok_and(|t| t.lines().count() >= n) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} never reached {n} lines", path.display());
}

fn sigint(pid: u32) {
    let ok = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// A running binary whose stdout and stderr are read as they come.
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary runs");
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let readers = vec![
            drain(child.stdout.take().unwrap(), Arc::clone(&stdout)),
            drain(child.stderr.take().unwrap(), Arc::clone(&stderr)),
        ];
        Running {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until stderr contains `needle`.
    fn wait_for_stderr(&self, needle: &str, timeout: Duration) {
        let t0 = Instant::now();
        while !self.stderr().contains(needle) {
            assert!(
                t0.elapsed() < timeout,
                "stderr never showed {needle:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit; the status, stdout and stderr.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let status = self.child.wait().unwrap();
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        let out = String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned();
        (status, out, self.stderr())
    }
}

fn drain(
    mut from: impl Read + Send + 'static,
    to: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            to.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

#[test]
fn ctrl_c_stops_gracefully_then_a_rerun_finishes() {
    let server = Server::with(Config {
        latency: Duration::from_millis(20),
        ..Config::default()
    });
    let url = server.base_url();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 300);
    let out = d.s("out.jsonl");
    let mut command = cmd();
    command
        .args(["generate", "-i", &input, "-o", &out, "--concurrency", "4"])
        .args(openai(&url));
    let running = Running::spawn(command);
    wait_for_lines(&d.path("out.jsonl"), 5, PATIENCE);
    sigint(running.child.id());
    let (status, text, err) = running.finish();
    assert_eq!(status.code(), Some(130), "{text}{err}");
    assert!(text.contains("interrupted (Ctrl-C)"), "{text}");
    assert!(err.contains("finishing the examples in flight"), "{err}");
    let partial = rows(&d.path("out.jsonl")).len();
    assert!(partial < 300, "{partial}");
    assert!(
        text.contains(&format!("examples written  {partial} (")),
        "{text}"
    );

    let o = generate(&url, &["-i", &input, "-o", &out]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_exactly_once(&rows(&d.path("out.jsonl")), 300);
}

#[test]
fn a_second_ctrl_c_quits_at_once_leaving_whole_lines() {
    // Answers take a minute: the drain after the first Ctrl-C is still going at the second.
    let server = Server::with(Config {
        latency: Duration::from_secs(60),
        ..Config::default()
    });
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 100);
    let out = d.s("out.jsonl");
    let mut command = cmd();
    command
        .args(["generate", "-i", &input, "-o", &out, "-j", "2"])
        .args(openai(&server.base_url()));
    let running = Running::spawn(command);
    // Calls in flight: the run is under way.
    assert!(
        server.wait_for_requests(1, PATIENCE),
        "{}",
        running.stderr()
    );
    sigint(running.child.id());
    running.wait_for_stderr("finishing the examples in flight", PATIENCE);
    sigint(running.child.id());
    let t0 = Instant::now();
    let (status, _, err) = running.finish();
    // Well before the calls in flight would have been answered.
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("dropping the examples in flight"), "{err}");
    if d.path("out.jsonl").exists() {
        rows(&d.path("out.jsonl"));
    }
}

#[test]
fn progress_lines_when_stderr_is_not_a_terminal() {
    // A line every 5 s: 40 prompts, 4 at a time, two calls each of at least 350 ms make a run
    // of at least 7 s.
    let server = Server::with(Config {
        latency: Duration::from_millis(350),
        ..Config::default()
    });
    let url = server.base_url();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 40);
    let mut lines = cmd();
    lines
        .args(["generate", "-i", &input, "-o", &d.s("out.jsonl"), "-j", "4"])
        .args(openai(&url));
    // --progress off: nothing, in a run as long.
    let mut off = cmd();
    off.args(["generate", "-i", &input, "-o", &d.s("off.jsonl"), "-j", "4"])
        .args(["--progress", "off"])
        .args(openai(&url));
    // Both at once, to wait only once.
    let (lines, off) = (Running::spawn(lines), Running::spawn(off));

    let (status, _, err) = lines.finish();
    assert!(status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("rmboost: ")).collect();
    assert!(!lines.is_empty(), "{err}");
    assert!(lines[0].contains("/40 ("), "{err}");
    assert!(lines[0].contains("ex/s"), "{err}");
    assert!(!err.contains('\r'), "no bar drawing: {err:?}");

    let (status, _, err) = off.finish();
    assert!(status.success(), "{err}");
    assert_eq!(err, "");
    assert_exactly_once(&rows(&d.path("off.jsonl")), 40);
}

/// Runs the binary in a pseudo-terminal with `script` (util-linux) and checks that the bar is
/// drawn and the summary is correct.
#[test]
fn progress_bar_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is not installed");
        return;
    }
    let server = Server::with(Config {
        latency: Duration::from_millis(40),
        ..Config::default()
    });
    let url = server.base_url();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 30);
    let command = format!(
        "{BIN} generate -i {input} -o {} -j 2 {}",
        d.s("out.jsonl"),
        openai(&url).join(" ")
    );
    let o = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env_remove("RUST_LOG")
        .env_remove("OPENAI_API_KEY")
        .env("TERM", "xterm")
        .env("COLUMNS", "160")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{tty}");
    assert!(tty.contains("/30"), "bar with the total: {tty:?}");
    assert!(tty.contains("ex/s"), "bar message: {tty:?}");
    assert!(
        tty.contains('\r') || tty.contains("\x1b["),
        "redrawn in place: {tty:?}"
    );
    assert!(
        !tty.contains("rmboost: "),
        "no log lines on a terminal: {tty:?}"
    );
    assert!(tty.contains("rmboost generate: completed"), "{tty:?}");
    assert!(tty.contains("examples written  30 ("), "{tty:?}");
    assert_exactly_once(&rows(&d.path("out.jsonl")), 30);
}

#[test]
fn a_baseline_method_runs_and_the_report_reads_its_output() {
    let server = Server::start();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 4);
    let out = d.s("rlcd.jsonl");
    let o = generate(
        &server.base_url(),
        &["-i", &input, "-o", &out, "--method", "rlcd"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let rows: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_eq!(r["metadata"]["method"], "rlcd", "{r}");
        assert_eq!(r["metadata"]["calls"], 2, "{r}");
        assert_ne!(r["chosen"], r["rejected"]);
    }

    let o = run(&["report", &out, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["examples"], 4, "{report}");
    assert_eq!(report["methods"]["rlcd"], 4, "{report}");

    let o = run(&["report", &out]);
    assert_eq!(o.status.code(), Some(0));
    assert!(!stdout(&o).trim().is_empty());

    // dry-run shows RMBoost requests only, and says so for a baseline.
    let o = run(&["dry-run", "-i", &input, "--method", "rlaif"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("rmboost only"), "{}", stderr(&o));

    // An unknown method is a usage error.
    let o = run(&["generate", "-i", &input, "-o", &out, "--method", "dpo"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // A missing dataset is a one-line fatal error naming it.
    let o = run(&["report", &d.s("missing.jsonl")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.jsonl"), "{}", stderr(&o));
}

/// Two runs started at once on the same new output: the second is refused and the first's
/// dataset survives. (The command used to delete the "empty file it left behind", which was
/// the file the first run was writing: that run then wrote into an unlinked file and exited 0.)
#[test]
fn two_runs_at_once_on_a_new_output_lose_nothing() {
    let server = Server::with(Config {
        latency: Duration::from_millis(40),
        ..Config::default()
    });
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 30);
    let out = d.s("out.jsonl");
    let mut first = cmd();
    first
        .args(["generate", "-i", &input, "-o", &out, "-j", "4"])
        .args(openai(&server.base_url()));
    let running = Running::spawn(first);
    // The first run holds the output once its recipe is recorded (written after the lock).
    let t0 = Instant::now();
    while !d.path("out.run.json").exists() {
        assert!(t0.elapsed() < PATIENCE, "{}", running.stderr());
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = generate(&server.base_url(), &["-i", &input, "-o", &out]);
    assert_eq!(second.status.code(), Some(1), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("another run"),
        "{}",
        stderr(&second)
    );
    let (status, text, err) = running.finish();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(text.contains("examples written  30 ("), "{text}");
    assert_exactly_once(&rows(&d.path("out.jsonl")), 30);
}

/// A path the run writes that is another name of the input or the output (another spelling,
/// a symlink, a hard link, the summary or the ledger) is refused before anything is written.
#[test]
fn the_same_file_under_two_names_is_refused() {
    let server = Server::start();
    let d = Dir::new();
    let input = d.prompts("data.jsonl", 4);
    let before = std::fs::read(&input).unwrap();
    std::os::unix::fs::symlink(d.path("data.jsonl"), d.path("link.jsonl")).unwrap();
    std::fs::hard_link(d.path("data.jsonl"), d.path("hard.jsonl")).unwrap();
    let dotted = format!("{}/./data.jsonl", d.path("").display());
    let out = d.s("out.jsonl");
    let cases: Vec<Vec<&str>> = vec![
        vec!["-i", &input, "-o", &dotted],
        vec!["-i", &input, "-o", "link.jsonl"],
        vec!["-i", &input, "-o", "hard.jsonl"],
        vec!["-i", &input, "-o", &out, "--ledger", &dotted],
        vec!["-i", &input, "-o", &out, "--summary-json", "hard.jsonl"],
        vec!["-i", &input, "-o", &out, "--summary-json", &out],
    ];
    for args in cases {
        let o = cmd()
            .current_dir(d.path(""))
            .arg("generate")
            .args(&args)
            .args(openai(&server.base_url()))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("same file"), "{args:?}: {}", stderr(&o));
        assert_eq!(std::fs::read(&input).unwrap(), before, "{args:?}");
    }
    assert!(!d.path("out.jsonl").exists());
    assert_eq!(server.requests(), 0);
}

/// A rerun with another format or seed is refused (exit 1, the difference named, the file
/// untouched) instead of appending rows of another shape or recipe.
#[test]
fn resume_with_other_settings_is_refused() {
    let server = Server::start();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 6);
    let out = d.s("out.jsonl");
    let o = generate(
        &server.base_url(),
        &["-i", &input, "-o", &out, "--limit", "3", "--seed", "5"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let before = std::fs::read(d.path("out.jsonl")).unwrap();
    for (extra, says) in [
        (
            vec!["--format", "standard", "--seed", "5"],
            "format was `conversational`, now `standard`",
        ),
        (vec!["--seed", "6"], "seed was `5`, now `6`"),
        (
            vec!["--method", "rlcd", "--seed", "5"],
            "method was `rmboost`, now `rlcd`",
        ),
    ] {
        let mut args = vec!["-i", input.as_str(), "-o", out.as_str()];
        args.extend(extra);
        let o = generate(&server.base_url(), &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert_eq!(
            std::fs::read(d.path("out.jsonl")).unwrap(),
            before,
            "{args:?}"
        );
    }
    let o = generate(
        &server.base_url(),
        &["-i", &input, "-o", &out, "--seed", "5"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_exactly_once(&rows(&d.path("out.jsonl")), 6);
}

/// An HTTP backend's calls in flight adapt by default, capped by `--concurrency`;
/// `--fixed-concurrency` keeps them fixed. The summary shows the limit's range.
#[test]
fn concurrency_adapts_by_default_and_can_be_fixed() {
    let server = Server::start();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 6);
    for (fixed, name) in [(false, "a"), (true, "f")] {
        let out = d.s(&format!("{name}.jsonl"));
        let json = d.s(&format!("{name}.json"));
        let mut args = vec!["-i", input.as_str(), "-o", out.as_str(), "-j", "5"];
        args.extend(["--summary-json", json.as_str()]);
        if fixed {
            args.push("--fixed-concurrency");
        }
        let o = generate(&server.base_url(), &args);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let s: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let c = &s["concurrency"];
        assert_eq!(c["adaptive"], !fixed, "{s}");
        assert_eq!(c["cap"], 5, "{s}");
        assert_eq!(c["calls"], 12, "{s}");
        assert_eq!(c["rate_limited"], 0, "{s}");
        let text = stdout(&o);
        let want = if fixed {
            "fixed at 5"
        } else {
            "adaptive, cap 5"
        };
        assert!(text.contains(want), "{text}");
    }
}

/// Random faults are not congestion: with 10% of calls failing at random (a 429 with
/// `Retry-After: 1` among the kinds), the limit stays at `--concurrency`, nothing is cut and
/// nobody pauses; every example is still made.
#[test]
fn random_faults_neither_lower_the_concurrency_nor_pause_it() {
    let server = Server::with(Config {
        fault_rate: 0.10,
        fault_seed: 3,
        retry_after_secs: 1,
        ..Config::default()
    });
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 150);
    let (out, json) = (d.s("out.jsonl"), d.s("s.json"));
    let url = server.base_url();
    let mut backend = openai(&url);
    backend[8] = "5"; // --retries 5, the default
    let o = cmd()
        .arg("generate")
        .args([
            "-i",
            &input,
            "-o",
            &out,
            "-j",
            "16",
            "--summary-json",
            &json,
        ])
        .args(backend)
        .output()
        .expect("the binary runs");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_exactly_once(&rows(&d.path("out.jsonl")), 150);
    let counts = server.counts();
    assert!(counts.faults[Fault::TooMany as usize] > 0, "{counts:?}");
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let c = &s["concurrency"];
    assert!(c["rate_limited"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(c["congestion"], 0, "{s}");
    assert_eq!(
        (c["min_limit"].as_u64(), c["max_limit"].as_u64()),
        (Some(16), Some(16)),
        "{s}"
    );
    assert!(stdout(&o).contains("0 times congestion"), "{}", stdout(&o));
}

/// A base URL with credentials in it is never printed: the summary shows it without them.
#[test]
fn credentials_in_the_base_url_are_not_printed() {
    let server = Server::start();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 2);
    let url = server
        .base_url()
        .replace("http://", "http://someone:hunter2secret@");
    let json = d.s("s.json");
    let o = generate(
        &url,
        &[
            "-i",
            &input,
            "-o",
            &d.s("out.jsonl"),
            "--summary-json",
            &json,
        ],
    );
    let all = format!(
        "{}{}{}",
        stdout(&o),
        stderr(&o),
        std::fs::read_to_string(&json).unwrap_or_default()
    );
    assert!(!all.contains("hunter2secret"), "{all}");
    assert!(
        stdout(&o).contains(&format!(" at {}", server.base_url())),
        "{}",
        stdout(&o)
    );
}

// ---------------------------------------------------------------------------------------------
// export and merge

#[test]
fn export_writes_a_hub_folder_and_refuses_bad_input() {
    let o = run(&["export", "--help"]);
    assert!(o.status.success());
    for needle in [
        "--to",
        "--test-fraction",
        "--force",
        "Examples:",
        "Exit status:",
    ] {
        assert!(stdout(&o).contains(needle), "export --help lacks {needle}");
    }
    let server = Server::start();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 20);
    let pairs = d.s("pairs.jsonl");
    let o = generate(
        &server.base_url(),
        &["-i", &input, "-o", &pairs, "--seed", "9"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let hub = d.s("hub");
    let export = |extra: &[&str]| {
        let mut args = vec!["export", pairs.as_str(), "--to", hub.as_str()];
        args.extend_from_slice(extra);
        run(&args)
    };
    let o = export(&["--test-fraction", "0.3", "--rows-per-file", "5"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("exported 20 conversational examples to "),
        "{}",
        stdout(&o)
    );
    let data: Vec<String> = std::fs::read_dir(d.path("hub/data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        data.iter().any(|n| n.starts_with("test-00000-of-")),
        "{data:?}"
    );
    assert!(
        data.contains(&"train-00000-of-00003.parquet".to_string()),
        "{data:?}"
    );
    let card = std::fs::read_to_string(d.path("hub/README.md")).unwrap();
    // The run's recipe and the models the server reported are on the card.
    assert!(card.contains("| seed | `9` |"), "{card}");
    assert!(card.contains("| first | `test` | 20 |"), "{card}");

    // Again into the same folder: refused without --force, replaced with it.
    let o = export(&[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is not empty"), "{}", stderr(&o));
    let o = export(&["--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(d.path("hub/data")).unwrap().count(), 1);

    // What an export killed mid-way leaves (its hidden staging folder, with the marker it
    // writes first) is removed by the next export into the folder; a folder of that name
    // without the marker is not ours and is kept.
    let killed = |dir: &str| {
        let stale = d.path(&format!("{dir}/.rmboost-export-k9Xq2w"));
        std::fs::create_dir_all(stale.join("data")).unwrap();
        std::fs::write(stale.join("rmboost-export.lock"), "unfinished export\n").unwrap();
        std::fs::write(stale.join("data/train-0.parquet.partial"), "PAR1").unwrap();
        stale
    };
    let stale = killed("hub");
    std::fs::create_dir(d.path("hub/.rmboost-export-foo")).unwrap();
    let o = export(&["--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stale.exists());
    assert!(d.path("hub/.rmboost-export-foo").is_dir());
    // A folder holding only such leftovers needs no --force.
    let stale = killed("hub2");
    let o = run(&["export", pairs.as_str(), "--to", &d.s("hub2")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stale.exists());
    assert!(d.path("hub2/README.md").is_file());

    // A torn last line: exit 1, the file and line named, nothing written.
    let text = std::fs::read_to_string(&pairs).unwrap();
    std::fs::write(d.path("torn.jsonl"), &text[..text.len() - 20]).unwrap();
    let o = run(&["export", &d.s("torn.jsonl"), "--to", &d.s("t")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("torn.jsonl:20: torn last line"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_dir(d.path("t"))
            .map(|r| r.count())
            .unwrap_or(0),
        0
    );

    let o = export(&["--test-fraction", "1.5"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn four_shards_merged_equal_one_unsharded_run() {
    let o = run(&["merge", "--help"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("--input") && stdout(&o).contains("Examples:"));
    let server = Server::start();
    let url = server.base_url();
    let d = Dir::new();
    let input = d.prompts("in.jsonl", 40);
    let o = generate(
        &url,
        &["-i", &input, "-o", &d.s("full.jsonl"), "--seed", "5"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mut shards = Vec::new();
    for i in 0..4 {
        let out = d.s(&format!("part{i}.jsonl"));
        let shard = format!("{i}/4");
        let o = generate(
            &url,
            &["-i", &input, "-o", &out, "--seed", "5", "--shard", &shard],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            d.path(&format!("part{i}.jsonl")).exists(),
            "shard {i} has rows"
        );
        shards.push(out);
    }
    let merged = d.s("merged.jsonl");
    let mut args = vec!["merge"];
    args.extend(shards.iter().map(String::as_str));
    args.extend(["-o", &merged, "--input", &input]);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("40 examples"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("all") || stdout(&o).contains("accounted"),
        "{}",
        stdout(&o)
    );

    // Row for row by id: the same examples (labels, aspects, responses, metadata).
    let by_id = |rows: Vec<Value>| -> std::collections::BTreeMap<String, Value> {
        rows.into_iter()
            .map(|r| (r["id"].as_str().unwrap().to_string(), r))
            .collect()
    };
    let full = by_id(rows(&d.path("full.jsonl")));
    let joined = by_id(rows(&d.path("merged.jsonl")));
    assert_eq!(full.len(), 40);
    assert_eq!(joined, full);
    assert!(
        d.path("merged.run.json").exists(),
        "the shards' recipe is kept"
    );

    // Three shards of four: the missing prompts are named, and nothing is written.
    let mut args = vec!["merge"];
    args.extend(shards[..3].iter().map(String::as_str));
    let partial = d.s("partial.jsonl");
    args.extend(["-o", &partial, "--input", &input]);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1));
    let missing = full.len()
        - rows(&d.path("part0.jsonl")).len()
        - rows(&d.path("part1.jsonl")).len()
        - rows(&d.path("part2.jsonl")).len();
    assert!(
        stderr(&o).contains(&format!("{missing} prompts of")),
        "{}",
        stderr(&o)
    );
    assert!(!d.path("partial.jsonl").exists());

    // The output may not be a shard.
    let o = run(&["merge", &shards[0], &shards[1], "-o", &shards[0], "--force"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("same file"), "{}", stderr(&o));
}
