//! Generation speed of the local backend, in tokens per second.
//!
//! `cargo bench --features local --bench local_speed [-- --tokens 128 --runs 3]`
//!
//! Sends the same chat request as `scripts/llamacpp_speed.py` (temperature 0, 128 new tokens)
//! and prints generation tokens/s (prefill excluded, like llama.cpp's `predicted_per_second`)
//! and end-to-end tokens/s. The model comes from `RMBOOST_MODEL` or the default resolution.
//! candle uses one thread per physical core; set `CANDLE_NUM_THREADS=2` to match the llama.cpp
//! run. A plain timer rather than criterion: one sample takes seconds, and the figure we want
//! is a rate, not a distribution of nanoseconds.

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

fn main() {
    let tokens = arg("--tokens", 128) as u32;
    let runs = arg("--runs", 3).max(1);
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
    println!(
        "candle local backend: generation {:.1} tokens/s, end to end {:.1} tokens/s (median of {runs})",
        median(decode),
        median(wall)
    );
}
