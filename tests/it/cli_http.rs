//! The `rmboost` binary against HTTP servers: the loopback OpenAI-compatible test server of
//! `tests/support` for errors and the response cache, and a REAL llama.cpp server
//! (SmolLM2-135M-Instruct) for an end-to-end run.
//!
//! The llama.cpp test needs `scripts/setup-test-env.sh` to have run (`.ci/run` does); it FAILS,
//! naming RMBOOST_PYTHON and RMBOOST_MODEL, when python or the model is missing.

use crate::support;

use std::process::{Command, Output};

use serde_json::Value;
use support::server::{Config, Reply, Server};
use support::{cmd, LlamaServer};

const KEY: &str = "sk-test-0123456789abcdef-never-print-me";

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

/// `rmboost generate` of `input` into `out` against a mock OpenAI-compatible server (model
/// `m`, no cache).
fn generate_against(server: &Server, input: &str, out: &std::path::Path) -> Command {
    let mut c = cmd();
    c.args(["generate", "-i", input, "-o"])
        .arg(out)
        .args([
            "--backend",
            "openai",
            "--model",
            "m",
            "--no-cache",
            "--base-url",
        ])
        .arg(format!("{}/v1", server.uri()));
    c
}

fn assert_no_key(o: &Output) {
    assert!(!text(&o.stdout).contains(KEY), "key on stdout");
    assert!(!text(&o.stderr).contains(KEY), "key on stderr");
}

#[test]
fn permanent_401_is_fatal_with_one_line_and_no_output() {
    let server = Server::with(Config {
        fail_every: Some((401, "Incorrect API key provided.".into())),
        ..Config::default()
    });
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
        // A custom base URL gets the key only when named explicitly.
        .args(["--api-key-env", "OPENAI_API_KEY"])
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

/// A server that asks to wait a day stops the run with one line on stderr (the `--help`
/// promise for a fatal error) that says the status and the wait once each.
#[test]
fn a_day_long_retry_after_is_one_line_that_says_it_once() {
    let server = Server::replying(vec![Reply::json(
        503,
        &support::openai_error("server_error", None, "busy"),
    )
    .header("retry-after", "86400")]);
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 3);
    let o = generate_against(&server, &input, &dir.path().join("out.jsonl"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{err}");
    assert!(line.contains("retry_after_too_long"), "{err}");
    assert!(line.contains("busy"), "{err}");
    assert_eq!(line.matches("503").count(), 1, "{err}");
    assert_eq!(line.matches("86400").count(), 1, "{err}");
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
    let server = Server::start();
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
    assert_eq!(s["calls"], 0, "no call reached the server: {s}");
    assert!(s["cache"]["hit_tokens"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(server.requests(), calls);
    let stdout = text(&o.stdout);
    assert!(stdout.contains("0 calls to the backend"), "{stdout}");
    assert!(
        stdout.contains("8 calls answered from the cache ("),
        "{stdout}"
    );
    assert!(
        stdout.contains("tokens not paid for again), 0 misses"),
        "{stdout}"
    );
    assert_no_key(&o);

    // `--clear-cache` with more flags.
    let clear = |more: &[&str]| {
        cmd()
            .args(["generate", "-i", &input, "-o"])
            .arg(&out)
            .args(["--backend", "openai", "--model", "gpt-test", "--overwrite"])
            .arg("--clear-cache")
            .args(more)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--base-url")
            .arg(server.base_url())
            .env("OPENAI_API_KEY", KEY)
            .output()
            .unwrap()
    };
    // A bad method flag is refused before --clear-cache runs: the cache stays.
    let o = clear(&["--aspects", "no-such-set"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("no-such-set"), "{err}");
    assert_eq!(go().status.code(), Some(0));
    assert_eq!(summary()["cache"]["hits"], 8, "{}", summary());
    assert_eq!(server.requests(), calls);

    // --clear-cache empties it first.
    let o = clear(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(server.requests(), calls + 8);
}

/// `--timeout` too large for a `Duration` is a usage error, not a panic (exit 101).
#[test]
fn an_absurd_timeout_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 1);
    for t in ["1e20", "1e300"] {
        let o = cmd()
            .args(["generate", "-i", &input, "-o"])
            .arg(dir.path().join("out.jsonl"))
            .args(["--backend", "openai", "--no-cache", "--timeout", t])
            .arg("--base-url")
            .arg(format!("http://127.0.0.1:{}/v1", support::dead_port()))
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "--timeout {t}: {err}");
        assert!(err.contains("--timeout"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// The provider's default key variable goes only to the provider's own URL: with a custom
/// `--base-url` (here plain http), a key is sent only when `--api-key-env` names it.
#[test]
fn the_default_key_is_not_sent_to_a_custom_base_url() {
    for (provider, var, header) in [
        ("openai", "OPENAI_API_KEY", "authorization"),
        ("anthropic", "ANTHROPIC_API_KEY", "x-api-key"),
    ] {
        for explicit in [false, true] {
            // Answers both APIs (and records every request, headers included).
            let server = Server::start();
            let dir = tempfile::tempdir().unwrap();
            let input = prompts(dir.path(), 1);
            let mut c = cmd();
            c.args(["generate", "-i", &input, "-o"])
                .arg(dir.path().join("out.jsonl"))
                .args(["--backend", provider, "--model", "m", "--no-cache"])
                .arg("--base-url")
                .arg(format!("{}/v1", server.uri()))
                .env(var, KEY);
            if explicit {
                c.args(["--api-key-env", var]);
            }
            let o = c.output().unwrap();
            assert_eq!(o.status.code(), Some(0), "{provider}: {}", text(&o.stderr));
            assert_no_key(&o);
            let requests = server.recorded();
            assert_eq!(requests.len(), 2, "{provider}");
            for r in &requests {
                let sent = r.header(header);
                if explicit {
                    let sent = sent.unwrap_or_else(|| panic!("{provider}: no {header}"));
                    assert!(sent.contains(KEY), "{provider}: {sent}");
                } else {
                    assert_eq!(
                        sent, None,
                        "{provider}: the default key went to a custom URL"
                    );
                }
            }
        }
    }
}

/// A custom server that wants a key, when none was configured, says how to send one.
#[test]
fn a_401_without_a_key_says_how_to_send_one() {
    let server = Server::replying(vec![Reply::json(
        401,
        &support::openai_error(
            "invalid_request_error",
            Some("invalid_api_key"),
            "Missing bearer token.",
        ),
    )]);
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 1);
    let o = cmd()
        .args(["generate", "-i", &input, "-o"])
        .arg(dir.path().join("out.jsonl"))
        .args(["--backend", "openai", "--no-cache", "--base-url"])
        .arg(format!("{}/v1", server.uri()))
        .env("OPENAI_API_KEY", KEY)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("--api-key-env"), "{err}");
    assert_no_key(&o);
}

/// A server reporting `u64::MAX` tokens cannot make the totals overflow (a panic in debug
/// builds, which tests use): they saturate.
#[test]
fn absurd_token_counts_saturate() {
    let mut first = support::openai_body("A full and careful answer.", "stop");
    let mut second = support::openai_body("<response>A short answer, in brief.</response>", "stop");
    for b in [&mut first, &mut second] {
        b["usage"] = serde_json::json!({"prompt_tokens": u64::MAX, "completion_tokens": u64::MAX});
    }
    // One example at a time: its first call, then its second.
    let answers = [Reply::json(200, &first), Reply::json(200, &second)];
    let server = Server::replying(answers.iter().cycle().take(6).cloned().collect());
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 3);
    let o = generate_against(&server, &input, &dir.path().join("out.jsonl"))
        .args(["--concurrency", "1"])
        .arg("--summary-json")
        .arg(dir.path().join("s.json"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("s.json")).unwrap()).unwrap();
    assert_eq!(s["tokens"]["total"], u64::MAX, "{s}");
}

/// `--base-url` given more than once (and `--base-url-file`): the calls spread over the
/// replicas, both calls of an example on one of them, and the summary has a row per replica.
/// One replica that refuses every connection is drained, and every example is still made.
#[test]
fn several_base_urls_spread_the_calls_and_route_around_a_dead_replica() {
    let servers: Vec<Server> = (0..3).map(|_| Server::start()).collect();
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 30);
    // A port nobody listens on: every call to it is refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    let list = dir.path().join("urls.txt");
    std::fs::write(
        &list,
        format!("# the third replica\n\n{}\n{dead}\n", servers[2].base_url()),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let summary = dir.path().join("s.json");
    let o = cmd()
        .args(["generate", "-i", &input, "-o"])
        .arg(&out)
        .args(["--backend", "openai", "--model", "m", "--no-cache"])
        .args(["--base-url", &servers[0].base_url()])
        .args(["--base-url", &servers[1].base_url()])
        .arg("--base-url-file")
        .arg(&list)
        .arg("--summary-json")
        .arg(&summary)
        .output()
        .unwrap();
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}{}", text(&o.stderr));
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["examples_written"], 30, "{s}");
    let replicas = s["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 4, "{s}");
    assert!(
        replicas[3]["endpoint"].as_str().unwrap().starts_with(&dead),
        "{s}"
    );
    assert!(replicas[3]["drains"].as_u64().unwrap() >= 1, "{s}");
    // Every call the dead one took failed, and was made again on a live one.
    assert_eq!(replicas[3]["calls"], replicas[3]["errors"], "{s}");
    for (r, server) in replicas.iter().zip(&servers) {
        assert_eq!(r["errors"], 0, "{s}");
        assert_eq!(r["calls"].as_u64().unwrap(), server.requests(), "{s}");
        assert!(server.requests() > 0, "every live replica took calls: {s}");
    }
    let live: u64 = servers.iter().map(Server::requests).sum();
    assert_eq!(live, 60, "two calls an example, nothing sent twice: {s}");
    // Both calls of an example went to one server: the servers' first and second calls pair up.
    for server in &servers {
        let (firsts, seconds): (Vec<_>, Vec<_>) = server
            .recorded()
            .into_iter()
            .partition(|r| !support::server::is_second(&r.body));
        assert_eq!(firsts.len(), seconds.len(), "{s}");
    }
    assert!(stdout.contains("replica"), "{stdout}");
    assert!(stdout.contains("on 4 replicas"), "{stdout}");
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(lines.lines().count(), 30);
}

#[test]
fn several_base_urls_are_refused_where_one_is_meant() {
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 1);
    for extra in [
        &["--backend", "local"][..],
        &["--backend", "openai", "--model", "m", "--batch"][..],
    ] {
        let o = cmd()
            .args(["generate", "-i", &input, "-o"])
            .arg(dir.path().join("out.jsonl"))
            .args(extra)
            .arg("--no-cache")
            .args(["--base-url", "http://127.0.0.1:9/v1"])
            .args(["--base-url", "http://127.0.0.1:10/v1"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains("--base-url"),
            "{}",
            text(&o.stderr)
        );
    }
}

/// An empty answer is never stored in the response cache: every answer of the first run is
/// empty (so every example fails as unusable after its re-asks), the server then heals, and a
/// rerun with the same cache writes every example instead of replaying the empty answers.
#[test]
fn empty_answers_are_not_replayed_from_the_cache_on_a_rerun() {
    let server = Server::with(Config {
        fault_rate: 1.0,
        fault_kinds: vec![support::server::Fault::Empty],
        ..Config::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let input = prompts(dir.path(), 3);
    let out = dir.path().join("out.jsonl");
    let go = || {
        cmd()
            .args(["generate", "-i", &input, "-o"])
            .arg(&out)
            .args(["--backend", "openai", "--model", "m", "--max-reasks", "1"])
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--base-url")
            .arg(format!("{}/v1", server.uri()))
            .arg("--summary-json")
            .arg(dir.path().join("s.json"))
            .output()
            .unwrap()
    };
    let summary = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("s.json")).unwrap()).unwrap()
    };
    let o = go();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o.stderr));
    let s = summary();
    assert_eq!(
        (s["examples_written"].as_u64(), s["failed"].as_u64()),
        (Some(0), Some(3)),
        "{s}"
    );
    // The first call of each example, asked twice (one re-ask), all empty.
    assert_eq!(server.requests(), 6);

    server.set(|c| c.fault_rate = 0.0);
    let o = go();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let s = summary();
    assert_eq!(s["examples_written"], 3, "{s}");
    assert_eq!(s["cache"]["hits"], 0, "an empty answer was cached: {s}");
    assert_eq!(server.requests(), 6 + 6);
    let ids: std::collections::BTreeSet<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .into()
        })
        .collect();
    assert_eq!(ids.len(), 3);
}
