//! Crash safety: a child process generating into a file is killed with SIGKILL at five seeded
//! random moments and restarted each time; the final file holds every id exactly once, with the
//! labels and aspects of an uninterrupted run.
//!
//! The child is this test binary itself, run with `RMBOOST_CRASH_CHILD` set: the test
//! `crash::crash_child` then generates instead of returning at once.

use crate::support;

use rmboost::GeneratorExt;
use std::num::NonZeroUsize;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::stream;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rmboost::run::{run_to_file, stop_on_ctrl_c, RunOptions, StopSignal};
use rmboost::testing::FakeBackend;
use rmboost::{read_prompts, Aspects, RmBoost};
use support::prompts;
use support::reliability::{labels_by_id, rows, write_input};

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

/// The child's body; does nothing unless started by a parent test.
#[tokio::test]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let input = dir.join("in.jsonl");
    let output = dir.join("out.jsonl");
    #[cfg(feature = "cache")]
    if std::env::var(CACHE_IDLE_ENV).is_ok() {
        // Stores completions, says so, then waits to be killed.
        use rmboost::backend::cache::Cache;
        let cache = Cache::open(dir.join("cache.redb")).unwrap();
        for i in 0..IDLE_PUTS {
            let key: [u8; 32] = std::array::from_fn(|b| (i as u8).wrapping_mul(31) ^ b as u8);
            cache
                .put(key, &rmboost::Completion::new(format!("stored {i}")))
                .await;
        }
        std::fs::write(dir.join("ready"), b"").unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        return;
    }
    #[cfg(feature = "cache")]
    if std::env::var(CACHE_ENV).is_ok() {
        use rmboost::backend::cache::{Cache, Cached};
        let cache = Cache::open(dir.join("cache.redb")).unwrap();
        let rmb = RmBoost::builder()
            .backend(Cached::new(
                FakeBackend::with_response_len(4000).with_latency(Duration::from_millis(8)),
                cache,
            ))
            .concurrency(NonZeroUsize::new(6).unwrap())
            .seed(SEED)
            .build()
            .unwrap();
        run_to_file(
            |p| rmb.try_generate(p),
            stream::iter(read_prompts(&input).unwrap()),
            &output,
            RunOptions::new(),
        )
        .await
        .unwrap();
        return;
    }
    if std::env::var(CTRL_C_ENV).is_err() {
        generate(&input, &output, Duration::from_millis(8)).await;
        return;
    }
    // Ctrl-C mode: slow calls, the CLI's signal wiring, and the summary written out.
    let stop = StopSignal::new();
    let _listener = stop_on_ctrl_c(stop.clone()).unwrap();
    std::fs::write(dir.join("ready"), b"").unwrap();
    let rmb = generator(Duration::from_millis(300));
    let s = run_to_file(
        |p| rmb.try_generate(p),
        stream::iter(read_prompts(&input).unwrap()),
        &output,
        RunOptions::new().stop_signal(stop.clone()),
    )
    .await
    .unwrap();
    // The library never ends the process: a second Ctrl-C aborts the run, which returns at
    // once, and the program (like the CLI) exits with 130.
    if stop.is_aborted() {
        std::process::exit(130);
    }
    std::fs::write(
        dir.join("summary.txt"),
        format!(
            "interrupted={} examples={}",
            s.interrupted, s.generation.examples
        ),
    )
    .unwrap();
}

const CTRL_C_ENV: &str = "RMBOOST_CRASH_CHILD_CTRL_C";
const CACHE_ENV: &str = "RMBOOST_CRASH_CHILD_CACHE";

/// A child using the response cache is killed mid-run: the cache opens cleanly afterwards and
/// holds the completions committed before the kill. A call does not wait for the commit, so
/// the last few may be lost (a rerun calls them again); most must be there.
#[cfg(feature = "cache")]
#[tokio::test]
async fn killed_run_keeps_its_cached_completions() {
    use rmboost::backend::cache::Cache;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    write_input(&dir.path().join("in.jsonl"), &prompts(300));
    let mut child = child_command(dir.path())
        .env(CACHE_ENV, "1")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    child.kill().unwrap();
    child.wait().unwrap();
    let written = rows(&out);
    let calls: u64 = written
        .iter()
        .map(|r| r["metadata"]["calls"].as_u64().unwrap())
        .sum();
    let cache = Cache::open(dir.path().join("cache.redb")).unwrap();
    let entries = cache.entries().await.unwrap();
    assert!(
        !written.is_empty() && written.len() < 300,
        "{}",
        written.len()
    );
    assert!(
        entries > 0 && entries + 128 >= calls,
        "{entries} cached completions, {calls} calls of written examples"
    );
    eprintln!(
        "FIGURES cache crash: {} examples written ({calls} calls) before SIGKILL, {entries} completions in the cache",
        written.len()
    );
}

#[cfg(feature = "cache")]
const CACHE_IDLE_ENV: &str = "RMBOOST_CRASH_CHILD_CACHE_IDLE";
#[cfg(feature = "cache")]
const IDLE_PUTS: usize = 50;

/// Completions stored are made durable within about 0.1 s even when no more come: a child
/// that stored some and then sat idle for 0.5 s before SIGKILL left every one in the file.
#[cfg(feature = "cache")]
#[tokio::test]
async fn an_idle_cache_makes_its_writes_durable() {
    use rmboost::backend::cache::Cache;
    let dir = tempfile::tempdir().unwrap();
    let mut child = child_command(dir.path())
        .env(CACHE_IDLE_ENV, "1")
        .spawn()
        .unwrap();
    wait_ready(dir.path());
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let cache = Cache::open(dir.path().join("cache.redb")).unwrap();
    assert_eq!(cache.entries().await.unwrap(), IDLE_PUTS as u64);
}

fn child_command(dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "crash::crash_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, dir)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

fn spawn_child(dir: &Path) -> std::process::Child {
    child_command(dir).spawn().unwrap()
}

fn sigint(child: &std::process::Child) {
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -INT failed");
}

fn wait_ready(dir: &Path) {
    let ready = dir.join("ready");
    let t = Instant::now();
    while !ready.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "child never got ready"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::remove_file(ready).unwrap();
}

#[test]
fn ctrl_c_once_finishes_in_flight_twice_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let out = dir.path().join("out.jsonl");
    write_input(&input, &prompts(60));

    // One Ctrl-C: the run finishes what is in flight and returns normally.
    let mut child = child_command(dir.path())
        .env(CTRL_C_ENV, "1")
        .spawn()
        .unwrap();
    wait_ready(dir.path());
    std::thread::sleep(Duration::from_millis(700));
    sigint(&child);
    assert!(
        child.wait().unwrap().success(),
        "graceful stop did not exit cleanly"
    );
    let summary = std::fs::read_to_string(dir.path().join("summary.txt")).unwrap();
    assert!(summary.starts_with("interrupted=true"), "{summary}");
    let n1 = labels_by_id(&out).len();
    assert!(n1 > 0 && n1 < 60, "{n1} examples after one Ctrl-C");
    assert!(summary.ends_with(&format!("examples={n1}")), "{summary}");

    // Two Ctrl-C: exit at once with status 130, the file still valid.
    std::fs::remove_file(dir.path().join("summary.txt")).unwrap();
    let mut child = child_command(dir.path())
        .env(CTRL_C_ENV, "1")
        .spawn()
        .unwrap();
    wait_ready(dir.path());
    std::thread::sleep(Duration::from_millis(400));
    sigint(&child);
    std::thread::sleep(Duration::from_millis(100));
    sigint(&child);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(!dir.path().join("summary.txt").exists());
    let n2 = labels_by_id(&out).len(); // every line whole, no duplicate

    // A plain rerun completes the file.
    assert!(spawn_child(dir.path()).wait().unwrap().success());
    assert_eq!(labels_by_id(&out).len(), 60);
    eprintln!("FIGURES ctrl-c: after one Ctrl-C {n1} lines, after two {n2} lines, after rerun 60");
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
    for kill in 0..5 {
        let mut child = spawn_child(dir.path());
        let wait = Duration::from_millis(rng.random_range(60..400));
        std::thread::sleep(wait);
        // SIGKILL: no destructor, no flush, no unlock.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        after_kill.push((wait.as_millis(), line_count(&out), status.success()));
        if kill == 2 {
            // A single write(2) of a line is not split by SIGKILL on a local file system, so
            // also leave what a write cut short (a full disk, a network file system) leaves:
            // the start of a line with an id that is not written yet.
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
            f.write_all(br#"{"id":"p0599","prompt":[{"role":"user","content":"Quest"#)
                .unwrap();
        }
    }

    // The last restart runs to the end.
    let status = spawn_child(dir.path()).wait().unwrap();
    assert!(status.success(), "final child run failed");

    // Uninterrupted reference in this process.
    let reference = dir.path().join("reference.jsonl");
    generate(&input, &reference, Duration::ZERO).await;

    // The torn line was cut and kept aside.
    let torn_lines = line_count(&dir.path().join("out.jsonl.torn"));
    assert!(torn_lines >= 1);
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
