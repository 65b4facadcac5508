//! Crash safety: a child process generating into a file is killed with SIGKILL at five seeded
//! random moments and restarted each time; the final file holds every id exactly once, with the
//! labels and aspects of an uninterrupted run.
//!
//! The child is this test binary itself, run with `RMBOOST_CRASH_CHILD` set: the test
//! `crash_child` then generates instead of returning at once.
#![cfg(all(feature = "run", feature = "test-util"))]

mod support;

use std::num::NonZeroUsize;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::stream;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rmboost::run::{run_to_file, RunOptions};
use rmboost::testing::FakeBackend;
use rmboost::{read_prompts, Aspects, RmBoost};
use support::{labels_by_id, prompts, rows, write_input};

const CHILD_ENV: &str = "RMBOOST_CRASH_CHILD";
const N: usize = 600;
const SEED: u64 = 77;

fn generator(latency: Duration) -> RmBoost {
    RmBoost::builder()
        .backend(FakeBackend::with_response_len(4000).with_latency(latency))
        .aspects(Aspects::ultrafeedback())
        .concurrency(NonZeroUsize::new(6).unwrap())
        .seed(SEED)
        .build()
        .unwrap()
}

async fn generate(input: &Path, output: &Path, latency: Duration) {
    let rmb = generator(latency);
    run_to_file(
        |p| rmb.try_generate(p),
        stream::iter(read_prompts(input).unwrap()),
        output,
        RunOptions::new(),
    )
    .await
    .unwrap();
}

/// The child's body; does nothing unless started by the parent test.
#[tokio::test]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    generate(
        &dir.join("in.jsonl"),
        &dir.join("out.jsonl"),
        Duration::from_millis(8),
    )
    .await;
}

fn spawn_child(dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn line_count(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

#[tokio::test]
async fn killed_five_times_then_completes_exactly_once() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let out = dir.path().join("out.jsonl");
    write_input(&input, &prompts(N));

    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut after_kill = Vec::new();
    for _ in 0..5 {
        let mut child = spawn_child(dir.path());
        let wait = Duration::from_millis(rng.random_range(60..400));
        std::thread::sleep(wait);
        // SIGKILL: no destructor, no flush, no unlock.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        after_kill.push((wait.as_millis(), line_count(&out), status.success()));
    }
    let torn = dir.path().join("out.jsonl.torn");
    let torn_lines = line_count(&torn);

    // The last restart runs to the end.
    let status = spawn_child(dir.path()).wait().unwrap();
    assert!(status.success(), "final child run failed");

    // Uninterrupted reference in this process.
    let reference = dir.path().join("reference.jsonl");
    generate(&input, &reference, Duration::ZERO).await;

    let got = labels_by_id(&out); // panics on a duplicate id
    assert_eq!(got.len(), N);
    assert_eq!(rows(&out).len(), N);
    assert_eq!(got, labels_by_id(&reference));
    // The kills landed mid-run: the file grew between them and was not done early.
    let partial = after_kill
        .iter()
        .filter(|(_, n, _)| *n > 0 && *n < N)
        .count();
    assert!(
        partial >= 3,
        "kills did not interrupt the run: {after_kill:?}"
    );
    eprintln!(
        "FIGURES crash: prompts={N} kills (ms after start, lines after kill, exited ok)={after_kill:?} torn_lines_saved={torn_lines} final_lines={} elapsed={:.1}s",
        rows(&out).len(),
        started.elapsed().as_secs_f64()
    );
}
