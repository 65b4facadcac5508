//! Generation speed of the local backend, in tokens per second.
//!
//! `cargo bench --features local --bench local_speed [-- --tokens 128 --runs 3 --threads 2]`
//!
//! Sends the same chat request as `scripts/llamacpp_speed.py` (temperature 0, 128 new tokens)
//! and prints generation tokens/s (prefill excluded, like llama.cpp's `predicted_per_second`)
//! and end-to-end tokens/s. The model comes from `RMBOOST_MODEL` or the default resolution.
//!
//! In the same run it measures llama.cpp on the same GGUF with the same thread count, by
//! running `scripts/llamacpp_speed.py` with the Python that `RMBOOST_PYTHON` names (or
//! `.venv/bin/python`, which `scripts/setup-test-env.sh` creates), and prints the ratio. The two
//! engines take turns (llama.cpp, candle, llama.cpp) so that a change in machine load shows up
//! as a spread rather than as a bias. `--no-llamacpp` measures candle alone.
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
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

/// One llama.cpp measurement: median generation tokens/s over `runs` requests.
fn llamacpp(python: &Path, model: &Path, threads: usize, tokens: u32, runs: usize) -> f64 {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/llamacpp_speed.py");
    let out = Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .args(["--threads", &threads.to_string()])
        .args(["--tokens", &tokens.to_string()])
        .args(["--runs", &runs.to_string()])
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
    v["generation_tokens_per_s"]
        .as_f64()
        .expect("generation_tokens_per_s")
}

fn main() {
    let tokens = arg("--tokens", 128) as u32;
    let runs = arg("--runs", 3).max(1);
    let threads = arg("--threads", 2).max(1);
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
        .build()
        .unwrap_or_else(|e| panic!("no local model: {e}"));
    println!(
        "loaded {} in {:.2} s",
        backend.model_path().display(),
        t0.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let request = |max_tokens: u32| {
        CompletionRequest::new(vec![Message::user(PROMPT)])
            .with_params(
                &rmboost::SamplingParams::default()
                    .temperature(0.0)
                    .max_tokens(max_tokens),
            )
            .with_seed(1)
    };
    let time = |max_tokens: u32| {
        let t = Instant::now();
        let c = rt
            .block_on(backend.complete(request(max_tokens)))
            .expect("generation failed");
        (t.elapsed().as_secs_f64(), c)
    };
    time(8); // warm-up

    let model = backend.model_path().to_path_buf();
    let mut llama = Vec::new();
    if let Some(py) = &python {
        println!("llama.cpp, {threads} threads (before candle):");
        llama.push(llamacpp(py, &model, threads, tokens, runs));
    }

    println!("candle, {threads} threads:");
    let mut decode = Vec::new();
    let mut wall = Vec::new();
    for run in 1..=runs {
        let (prefill, _) = time(1);
        let (dt, c) = time(tokens);
        let n = c.usage.completion_tokens;
        let gen = (n.saturating_sub(1)) as f64 / (dt - prefill).max(1e-9);
        decode.push(gen);
        wall.push(n as f64 / dt);
        println!(
            "run {run}: {n} tokens (prompt {}), {dt:.3} s wall, prefill {prefill:.3} s, \
             generation {gen:.1} tokens/s, end to end {:.1} tokens/s",
            c.usage.prompt_tokens,
            n as f64 / dt
        );
    }
    let candle = median(decode);
    println!(
        "candle local backend: generation {candle:.1} tokens/s, end to end {:.1} tokens/s \
         (median of {runs})",
        median(wall)
    );
    if let Some(py) = &python {
        println!("llama.cpp, {threads} threads (after candle):");
        llama.push(llamacpp(py, &model, threads, tokens, runs));
        let (lo, hi) = (llama[0].min(llama[1]), llama[0].max(llama[1]));
        let mid = (lo + hi) / 2.0;
        println!(
            "ratio candle / llama.cpp at {threads} threads: {:.2} \
             (llama.cpp {lo:.1}..{hi:.1} tokens/s, so {:.2}..{:.2})",
            candle / mid,
            candle / hi,
            candle / lo
        );
    }
}
