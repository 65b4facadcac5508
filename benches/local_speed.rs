//! Generation speed of the local backend, in tokens per second, alone and batched.
//!
//! `cargo bench --features local --bench local_speed [-- --tokens 128 --runs 3 --threads 2
//! --concurrent 1,2,4,8 --rounds 1]`
//!
//! For each number of concurrent requests `N` it sends `N` copies of the same chat request as
//! `scripts/llamacpp_speed.py` (temperature 0, 128 new tokens) at once and prints the
//! aggregate speed: all completion tokens over the wall time (prefill included). `N = 1` is
//! the backend's single-request speed; the local backend decodes the `N` requests together
//! (continuous batching, `max_batch` set to the largest `N`).
//!
//! In the same run it measures llama.cpp's server on the same GGUF with the same thread count
//! and `N` parallel slots, by running `scripts/llamacpp_speed.py --parallel N` with the Python
//! that `RMBOOST_PYTHON` names (or `.venv/bin/python`, which `scripts/setup-test-env.sh`
//! creates), and prints the ratios. The two engines take turns (llama.cpp, candle, llama.cpp
//! for each `N`, repeated `--rounds` times) so that a change in machine load shows up as a
//! spread rather than as a bias. `--no-llamacpp` measures the local backend alone.
//!
//! A plain timer rather than criterion: one sample takes seconds, and the figure we want is a
//! rate, not a distribution of nanoseconds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rmboost::backend::local::LocalBackend;
use rmboost::{CompletionRequest, LlmBackend, Message};

// Keep in sync with scripts/llamacpp_speed.py.
const PROMPT: &str =
    "Write a detailed essay about the history of the printing press and how it changed Europe.";

fn arg(name: &str, default: usize) -> usize {
    arg_str(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The Python with `xllamacpp` installed: `RMBOOST_PYTHON`, else the repository's `.venv`.
fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RMBOOST_PYTHON") {
        return Some(p.into());
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    venv.exists().then_some(venv)
}

/// One llama.cpp measurement: median aggregate tokens/s over `runs` waves of `parallel`
/// requests, with `parallel` slots.
fn llamacpp(
    python: &Path,
    model: &Path,
    threads: usize,
    tokens: u32,
    runs: usize,
    parallel: usize,
) -> f64 {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/llamacpp_speed.py");
    let out = Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .args(["--threads", &threads.to_string()])
        .args(["--tokens", &tokens.to_string()])
        .args(["--runs", &runs.to_string()])
        .args(["--parallel", &parallel.to_string()])
        .arg("--json")
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}",
        script.display(),
        out.status
    );
    for line in stdout.lines().filter(|l| !l.starts_with('{')) {
        println!("  {line}");
    }
    let json = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary from {}:\n{stdout}", script.display()));
    let v: serde_json::Value = serde_json::from_str(json).expect("summary is JSON");
    v["aggregate_tokens_per_s"]
        .as_f64()
        .expect("aggregate_tokens_per_s")
}

/// One measurement: concurrent requests, our aggregate tokens/s, llama.cpp's before and after.
type Row = (usize, f64, Option<(f64, f64)>);

fn request(max_tokens: u32) -> CompletionRequest {
    CompletionRequest::new(vec![Message::user(PROMPT)])
        .with_params(
            &rmboost::SamplingParams::default()
                .temperature(0.0)
                .max_tokens(max_tokens),
        )
        .with_seed(1)
}

/// One wave of `n` identical requests sent at once: (wall seconds, completion tokens).
fn wave(rt: &tokio::runtime::Runtime, backend: &LocalBackend, n: usize, tokens: u32) -> (f64, u64) {
    let t = Instant::now();
    let done = rt.block_on(futures::future::join_all(
        (0..n).map(|_| backend.complete(request(tokens))),
    ));
    let dt = t.elapsed().as_secs_f64();
    let total = done
        .into_iter()
        .map(|c| c.expect("generation failed").usage.completion_tokens)
        .sum();
    (dt, total)
}

fn main() {
    let tokens = arg("--tokens", 128) as u32;
    let runs = arg("--runs", 3).max(1);
    let rounds = arg("--rounds", 1).max(1);
    let threads = arg("--threads", 2).max(1);
    let concurrent: Vec<usize> = arg_str("--concurrent")
        .unwrap_or_else(|| "1,2,4,8".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .expect("--concurrent takes numbers, e.g. 1,2,4,8")
        })
        .filter(|&n| n > 0)
        .collect();
    let largest = concurrent.iter().copied().max().unwrap_or(1);
    let with_llamacpp = !std::env::args().any(|a| a == "--no-llamacpp");
    // candle reads its thread count when its pool first starts; set it before any model work.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    let python = if with_llamacpp {
        Some(python().unwrap_or_else(|| {
            panic!(
                "no Python with xllamacpp: run scripts/setup-test-env.sh, set RMBOOST_PYTHON, \
                 or pass --no-llamacpp to measure candle alone"
            )
        }))
    } else {
        None
    };
    let t0 = Instant::now();
    let backend = LocalBackend::builder()
        .requantize(std::env::var_os("RMBOOST_NO_REQUANTIZE").is_none())
        .max_batch(largest)
        .fetch_default_model(true)
        .build()
        .unwrap_or_else(|e| panic!("no local model: {e}"));
    println!(
        "loaded {} in {:.2} s (max_batch {largest})",
        backend.model_path().display(),
        t0.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    wave(&rt, &backend, 1, 8); // warm-up
    let model = backend.model_path().to_path_buf();

    let mut rows: Vec<Row> = Vec::new();
    for round in 1..=rounds {
        for &n in &concurrent {
            println!("round {round}, {n} concurrent:");
            let before = python.as_ref().map(|py| {
                println!(" llama.cpp, {threads} threads, {n} slots:");
                llamacpp(py, &model, threads, tokens, runs, n)
            });
            println!(" local backend, {threads} threads:");
            let mut agg = Vec::new();
            for run in 1..=runs {
                let (dt, total) = wave(&rt, &backend, n, tokens);
                agg.push(total as f64 / dt);
                println!(
                    "  run {run}: {total} tokens in {dt:.3} s, aggregate {:.1} tokens/s",
                    total as f64 / dt
                );
            }
            let ours = median(agg);
            let after = python.as_ref().map(|py| {
                println!(" llama.cpp again:");
                llamacpp(py, &model, threads, tokens, runs, n)
            });
            rows.push((n, ours, before.zip(after)));
        }
    }

    println!();
    println!("aggregate tokens/s ({tokens} tokens per request, {threads} threads, medians of {runs} runs)");
    println!("| concurrent | local backend | x its 1-request speed | llama.cpp server (N slots) | local / llama.cpp |");
    println!("|---|---|---|---|---|");
    let single: Vec<f64> = rows.iter().filter(|r| r.0 == 1).map(|r| r.1).collect();
    let single = (!single.is_empty()).then(|| median(single));
    for (n, ours, llama) in &rows {
        let speedup = single.map_or("-".to_string(), |s| format!("{:.2}", ours / s));
        let (l, ratio) = match llama {
            Some((a, b)) => {
                let (lo, hi) = (a.min(*b), a.max(*b));
                (
                    format!("{lo:.1}..{hi:.1}"),
                    format!(
                        "{:.2} ({:.2}..{:.2})",
                        ours / ((lo + hi) / 2.0),
                        ours / hi,
                        ours / lo
                    ),
                )
            }
            None => ("-".into(), "-".into()),
        };
        println!("| {n} | {ours:.1} | {speedup} | {l} | {ratio} |");
    }
}
