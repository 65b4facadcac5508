//! Batch mode end to end: the `rmboost` binary with `--batch` against the loopback server of
//! the OpenAI and Anthropic batch APIs (`tests/support/batch_server.rs`), compared with an
//! online run against the loopback chat server; faults, a SIGKILL between creating a batch
//! and recording it, Ctrl-C while polling, `rmboost batch status|cancel`, the cost budget,
//! and a 5,000-prompt run killed mid-way.

use crate::support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::server::{Api, Config, Server};

const SEED: &str = "7";
/// The key the test servers require, named with --api-key-env (a custom base URL gets no key
/// otherwise); it must never be printed.
const KEY: &str = "sk-batch-test-0123456789-never-print-me";
const KEY_VAR: &str = "RMBOOST_BATCH_TEST_KEY";

fn cmd() -> Command {
    let mut c = support::cmd();
    c.env(KEY_VAR, KEY);
    c
}

fn assert_no_key(o: &Output) {
    assert!(!text(&o.stdout).contains(KEY), "key on stdout");
    assert!(!text(&o.stderr).contains(KEY), "key on stderr");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn prompts(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("in.jsonl");
    let body: String = (1..=n)
        .map(|i| format!("{{\"id\": \"q{i}\", \"prompt\": \"Name {i} fruit, briefly.\"}}\n"))
        .collect();
    std::fs::write(&p, body).unwrap();
    p
}

fn backend_name(api: Api) -> &'static str {
    match api {
        Api::OpenAi => "openai",
        Api::Anthropic => "anthropic",
    }
}

/// `rmboost generate --batch` against `server`, writing `out`.
fn batch_cmd(api: Api, server: &Server, input: &Path, out: &Path, size: usize) -> Command {
    batch_cmd_polling(api, server, input, out, size, "0.005")
}

/// [`batch_cmd`] with polls `poll` seconds apart.
fn batch_cmd_polling(
    api: Api,
    server: &Server,
    input: &Path,
    out: &Path,
    size: usize,
    poll: &str,
) -> Command {
    let mut c = cmd();
    c.args(["generate", "-i"])
        .arg(input)
        .arg("-o")
        .arg(out)
        .args(["--backend", backend_name(api), "--model", "m", "--base-url"])
        .arg(server.base_url())
        .args(["--api-key-env", KEY_VAR])
        .args(["--batch", "--batch-size", &size.to_string()])
        .args(["--poll-secs", poll, "--seed", SEED, "--progress", "off"])
        .arg("--summary-json")
        .arg(out.with_extension("summary.json"));
    c
}

fn online(dir: &Path, input: &Path) -> BTreeMap<String, Row> {
    let server = Server::start();
    let out = dir.join("online.jsonl");
    let o = cmd()
        .args(["generate", "-i"])
        .arg(input)
        .arg("-o")
        .arg(&out)
        .args([
            "--backend",
            "openai",
            "--model",
            "m",
            "--no-cache",
            "--base-url",
        ])
        .arg(server.base_url())
        .args(["--seed", SEED, "--progress", "off", "-j", "16"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    rows(&out)
}

#[derive(Debug, Clone, PartialEq)]
struct Row {
    label: String,
    aspects: Value,
    chosen: Value,
    rejected: Value,
}

/// The output's rows by id; every id at most once.
fn rows(path: &Path) -> BTreeMap<String, Row> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let id = v["id"].as_str().unwrap().to_string();
        let row = Row {
            label: v["label"].as_str().unwrap().to_string(),
            aspects: v["aspects"].clone(),
            chosen: v["chosen"].clone(),
            rejected: v["rejected"].clone(),
        };
        assert!(
            out.insert(id.clone(), row).is_none(),
            "{id} twice in the output"
        );
    }
    out
}

fn summary(out: &Path) -> Value {
    let s = std::fs::read_to_string(out.with_extension("summary.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

fn sidecars(out: &Path) -> [PathBuf; 2] {
    let dir = out.parent().unwrap();
    let stem = out.file_stem().unwrap().to_string_lossy().into_owned();
    [
        dir.join(format!("{stem}.batches.json")),
        dir.join(format!("{stem}.batch-results.jsonl")),
    ]
}

fn ids(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("q{i}")).collect()
}

/// Labels and aspects per id equal; texts too when `texts`.
fn assert_same(batch: &BTreeMap<String, Row>, online: &BTreeMap<String, Row>, texts: bool) {
    assert_eq!(
        batch.keys().collect::<Vec<_>>(),
        online.keys().collect::<Vec<_>>()
    );
    for (id, b) in batch {
        let o = &online[id];
        assert_eq!((&b.label, &b.aspects), (&o.label, &o.aspects), "{id}");
        if texts {
            assert_eq!(b, o, "{id}");
        }
    }
}

fn run_to_end(api: Api, server: &Server, dir: &Path, input: &Path, size: usize) -> Output {
    let out = dir.join("out.jsonl");
    let o = batch_cmd(api, server, input, &out, size).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert_no_key(&o);
    o
}

#[test]
fn openai_batch_run_equals_the_online_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 40);
    let online = online(dir.path(), &input);
    let server = Server::with(Config::batch(Api::OpenAi));
    let o = run_to_end(Api::OpenAi, &server, dir.path(), &input, 16);
    let out = dir.path().join("out.jsonl");
    let batch = rows(&out);
    assert_eq!(batch.len(), 40);
    assert_same(&batch, &online, true);
    assert_eq!(server.resubmitted_custom_ids(), 0);
    let s = summary(&out);
    let b = &s["batch"];
    assert_eq!(b["batches_created"], server.batches_created(), "{s}");
    assert_eq!(b["requests_submitted"], server.requests_submitted(), "{s}");
    assert!(b["waves"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(b["in_flight"], 0);
    // 40 first calls, 40 second calls, re-asks if any: at least 80 lines.
    assert!(server.requests_submitted() >= 80);
    // Every batch was tagged with the run and its key.
    for info in server.batches() {
        assert!(info.metadata.contains_key("rmboost_run"), "{info:?}");
        assert!(info.metadata.contains_key("rmboost_batch"), "{info:?}");
    }
    assert!(text(&o.stdout).contains("batches"), "{}", text(&o.stdout));
    // A clean finish leaves no state beside the output.
    for p in sidecars(&out) {
        assert!(!p.exists(), "{} left", p.display());
    }
}

#[test]
fn anthropic_batch_run_has_the_online_labels_and_aspects() {
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 30);
    let online = online(dir.path(), &input);
    let server = Server::with(Config::batch(Api::Anthropic));
    run_to_end(Api::Anthropic, &server, dir.path(), &input, 16);
    let out = dir.path().join("out.jsonl");
    assert_same(&rows(&out), &online, false);
    assert_eq!(server.resubmitted_custom_ids(), 0);
    // The key header and version were sent with every request.
    assert!(server
        .recorded()
        .iter()
        .all(|r| r.header("anthropic-version").is_some()));
}

fn faults(api: Api) -> Config {
    Config {
        seed: 3,
        fail_validation: vec![1],
        errored_one_in: Some(6),
        expired_one_in: Some(9),
        all_fail: vec![3],
        poll_5xx_one_in: Some(4),
        ..Config::batch(api)
    }
}

fn faults_end_exactly_once(api: Api) {
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 40);
    let online = online(dir.path(), &input);
    let server = Server::with(faults(api));
    run_to_end(api, &server, dir.path(), &input, 12);
    let out = dir.path().join("out.jsonl");
    let batch = rows(&out);
    assert_eq!(
        batch.keys().cloned().collect::<HashSet<_>>(),
        ids(40).into_iter().collect()
    );
    assert_same(&batch, &online, api == Api::OpenAi);
    assert_eq!(server.resubmitted_custom_ids(), 0);
    let s = summary(&out);
    let b = &s["batch"];
    assert!(b["failed_validation"].as_u64().unwrap() >= 1, "{s}");
    assert!(b["resubmitted"].as_u64().unwrap() > 0, "{s}");
    assert!(b["poll_errors"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(b["batches_created"], server.batches_created(), "{s}");
    assert_eq!(s["failed"], 0, "{s}");
    let all: String = std::fs::read_to_string(&out).unwrap();
    assert!(!all.contains(support::server::INJECTED_BATCH));
}

#[test]
fn openai_faults_end_with_every_id_once() {
    faults_end_exactly_once(Api::OpenAi);
}

#[test]
fn anthropic_faults_end_with_every_id_once() {
    faults_end_exactly_once(Api::Anthropic);
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t0.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The process dies between creating a batch and recording its id: the rerun finds it by
/// listing, adopts it and submits nothing twice.
fn killed_between_create_and_record(api: Api) {
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 20);
    let out = dir.path().join("out.jsonl");
    let server = Server::with(Config {
        hold_creates: true,
        ..Config::batch(api)
    });
    let mut child = batch_cmd(api, &server, &input, &out, 50)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(server.wait_for_batches(1, Duration::from_secs(20)));
    child.kill().unwrap();
    child.wait().unwrap();
    server.release_creates();
    let [state, _] = sidecars(&out);
    let recorded = std::fs::read_to_string(&state).unwrap();
    assert!(recorded.contains("\"provider_id\":null"), "{recorded}");
    let o = batch_cmd(api, &server, &input, &out, 50).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(rows(&out).len(), 20);
    assert_eq!(server.resubmitted_custom_ids(), 0);
    let s = summary(&out);
    assert!(s["batch"]["adopted"].as_u64().unwrap() >= 1, "{s}");
    // The first batch holds the 20 first calls; the rerun did not create it again.
    assert_eq!(server.batches()[0].requests, 20);
}

#[test]
fn openai_batch_created_before_a_sigkill_is_adopted() {
    killed_between_create_and_record(Api::OpenAi);
}

#[test]
fn anthropic_batch_created_before_a_sigkill_is_adopted() {
    killed_between_create_and_record(Api::Anthropic);
}

fn interrupt(child: &Child) {
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -INT failed");
}

/// Ctrl-C while polling: the run stops at once (no 60 s drain), nothing goes to the ledger,
/// the batches keep running; `batch status` shows them, and a rerun collects them and
/// submits nothing twice.
#[test]
fn ctrl_c_while_polling_then_status_and_rerun() {
    let api = Api::OpenAi;
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 20);
    let out = dir.path().join("out.jsonl");
    let server = Server::with(Config::batch(api));
    // Polls an hour apart: the batch stays in flight.
    let mut slow = batch_cmd_polling(api, &server, &input, &out, 50, "3600");
    slow.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = slow.spawn().unwrap();
    assert!(server.wait_for_batches(1, Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    interrupt(&child);
    let status = wait_exit(&mut child, Duration::from_secs(15)).expect("stops promptly");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let o = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(130), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(stdout.contains("rmboost batch cancel"), "{stdout}");
    let ledger = dir.path().join("out.failures.jsonl");
    assert!(
        std::fs::read_to_string(&ledger)
            .unwrap_or_default()
            .trim()
            .is_empty(),
        "interrupted examples must not be failures"
    );
    let st = cmd()
        .args(["batch", "status", "-o"])
        .arg(&out)
        .args([
            "--backend",
            "openai",
            "--api-key-env",
            KEY_VAR,
            "--base-url",
        ])
        .arg(server.base_url())
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(0), "{}", text(&st.stderr));
    assert_no_key(&st);
    let table = text(&st.stdout);
    let first = &server.batches()[0];
    assert!(table.contains(&first.id), "{table}");
    assert!(table.contains("1 not yet collected"), "{table}");
    // The rerun collects the batch in flight and goes on.
    let o = batch_cmd(api, &server, &input, &out, 50).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(rows(&out).len(), 20);
    assert_eq!(server.resubmitted_custom_ids(), 0);
    for p in sidecars(&out) {
        assert!(!p.exists(), "{} left", p.display());
    }
}

/// `rmboost batch cancel` cancels the batches in flight; a rerun sends the cancelled lines
/// again and completes.
#[test]
fn batch_cancel_then_rerun() {
    for api in [Api::OpenAi, Api::Anthropic] {
        let dir = tempfile::tempdir().unwrap();
        let input = prompts(dir.path(), 12);
        let out = dir.path().join("out.jsonl");
        let server = Server::with(Config::batch(api));
        let mut slow = batch_cmd_polling(api, &server, &input, &out, 50, "3600");
        slow.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = slow.spawn().unwrap();
        assert!(server.wait_for_batches(1, Duration::from_secs(20)));
        std::thread::sleep(Duration::from_millis(200));
        interrupt(&child);
        assert_eq!(
            wait_exit(&mut child, Duration::from_secs(15)).and_then(|s| s.code()),
            Some(130)
        );
        let c = cmd()
            .args(["batch", "cancel", "-o"])
            .arg(&out)
            .args(["--backend", backend_name(api), "--api-key-env", KEY_VAR])
            .arg("--base-url")
            .arg(server.base_url())
            .output()
            .unwrap();
        assert_eq!(c.status.code(), Some(0), "{}", text(&c.stderr));
        assert!(text(&c.stdout).contains(&server.batches()[0].id));
        assert_eq!(server.cancels(), 1);
        let o = batch_cmd(api, &server, &input, &out, 50).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        assert_eq!(rows(&out).len(), 12);
        assert_eq!(server.resubmitted_custom_ids(), 0, "{api:?}");
    }
}

#[test]
fn batch_needs_an_http_backend_and_the_budget_stops_before_a_wave() {
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 5);
    let out = dir.path().join("out.jsonl");
    let o = cmd()
        .args(["generate", "-i"])
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .args(["--backend", "local", "--batch"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--batch"), "{}", text(&o.stderr));

    let server = Server::with(Config::batch(Api::OpenAi));
    let o = batch_cmd(Api::OpenAi, &server, &input, &out, 50)
        .args([
            "--price-input",
            "1000",
            "--price-output",
            "1000",
            "--max-cost",
            "0.01",
        ])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert_eq!(server.batches_created(), 0);
    assert!(summary(&out)["batch"]["cost_limited"].as_bool().unwrap());
}

/// 5,000 prompts through the CLI, SIGKILLed mid-run, then rerun: every id once, nothing
/// submitted twice. Prints the figures (`-- --nocapture`). About 9 s on an idle machine.
#[test]
fn five_thousand_prompts_killed_mid_run() {
    const N: usize = 5000;
    let api = Api::OpenAi;
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), N);
    let out = dir.path().join("out.jsonl");
    let server = Server::with(Config {
        errored_one_in: Some(50),
        ..Config::batch(api)
    });
    let t0 = Instant::now();
    let mut child = batch_cmd(api, &server, &input, &out, 1000)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(server.wait_for_batches(4, Duration::from_secs(60)));
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = (server.batches_created(), rows(&out).len());
    let o = batch_cmd(api, &server, &input, &out, 1000)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let wall = t0.elapsed();
    assert_eq!(rows(&out).len(), N);
    assert_eq!(server.resubmitted_custom_ids(), 0);
    let s = summary(&out);
    println!(
        "FIGURES batch: prompts={N} killed after {} batches with {} rows written; total batches \
         created={} requests submitted={}; rerun: waves={} adopted={} answered_from_saved={} \
         resubmitted_lines={}; resubmitted_custom_ids={}; wall time {:.1}s",
        at_kill.0,
        at_kill.1,
        server.batches_created(),
        server.requests_submitted(),
        s["batch"]["waves"],
        s["batch"]["adopted"],
        s["batch"]["answered_from_saved"],
        s["batch"]["resubmitted"],
        server.resubmitted_custom_ids(),
        wall.as_secs_f64()
    );
}
