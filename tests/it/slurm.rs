//! `rmboost generate --shard auto` on a REAL Slurm cluster: `scripts/slurm-test.sh` starts a
//! one-node cluster from Debian's packages (munged, slurmctld, slurmd), runs
//! `deploy/slurm/rmboost-array.sbatch` as a 4-task job array against the loopback
//! OpenAI-compatible test server, then its merge step as a dependent job.
//!
//! Needs root and the packages (`apt-get install -y --no-install-recommends slurmctld slurmd
//! slurm-client munge`; `scripts/test.sh` installs them). Under the README's test command
//! (`RMBOOST_LIVE_TESTS=required`) a missing piece fails the test; a plain `cargo test` skips
//! it and says why. `--shard auto` with the variables set by hand (no Slurm needed) is tested
//! here too.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rmboost::run::Shard;
use support::server::Server;
use support::{live_tests_required, BIN};

const INSTALL: &str = "apt-get install -y --no-install-recommends slurmctld slurmd \
                       slurm-client munge (as root; `bash scripts/test.sh` does it)";

/// Whether a program is on PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Whether Slurm can be started here; skips (plain `cargo test`) or fails (required) if not.
fn slurm_available(test: &str) -> bool {
    // slurmctld, slurmd and munged live in sbin, which a user's PATH may lack.
    let sbin = |p: &str| on_path(p) || Path::new("/usr/sbin").join(p).is_file();
    let missing: Vec<&str> = ["sbatch", "sinfo", "scontrol"]
        .into_iter()
        .filter(|p| !on_path(p))
        .chain(
            ["slurmctld", "slurmd", "munged"]
                .into_iter()
                .filter(|p| !sbin(p)),
        )
        .collect();
    let why = if !missing.is_empty() {
        format!("Slurm is not installed ({} not found)", missing.join(", "))
    } else if !is_root() {
        "starting a Slurm cluster needs root".to_string()
    } else {
        return true;
    };
    if live_tests_required() {
        panic!("{test}: {why}: install it with {INSTALL}, and run the tests as root");
    }
    eprintln!(
        "SKIPPED {test}: {why}; run `bash scripts/test.sh` as root (the README's test command) \
         to install Slurm and run it"
    );
    false
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn id(row: &serde_json::Value) -> String {
    row["id"].as_str().expect("an id").to_string()
}

#[test]
fn slurm_array_of_four_tasks_generates_every_id_once() {
    if !slurm_available("slurm_array_of_four_tasks_generates_every_id_once") {
        return;
    }
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let n = 40;
    let body: String = (1..=n)
        .map(|i| format!("{{\"id\": \"q{i}\", \"prompt\": \"Name {i} fruit.\"}}\n"))
        .collect();
    std::fs::write(&prompts, body).unwrap();
    let out = dir.path().join("out");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-test.sh");

    let t0 = Instant::now();
    let o = Command::new("bash")
        .arg(&script)
        .arg(BIN)
        .arg(server.base_url())
        .arg(&prompts)
        .arg(&out)
        .arg("4")
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/sbin",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .expect("run scripts/slurm-test.sh");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "scripts/slurm-test.sh failed ({}):\n{stdout}\n{stderr}",
        o.status
    );
    assert!(
        stdout.contains("slurm-test: ok: 4 tasks, 40 examples merged"),
        "{stdout}"
    );
    eprint!("{stderr}");
    eprintln!(
        "slurm array test: {:.1} s from the first daemon to the checked merge",
        t0.elapsed().as_secs_f64()
    );

    // The merged file: every prompt once.
    let merged = lines(&out.join("pairs.jsonl"));
    let ids: BTreeSet<String> = merged.iter().map(id).collect();
    assert_eq!(merged.len(), n);
    assert_eq!(ids, (1..=n).map(|i| format!("q{i}")).collect());
    // Task I took shard I/4: its part holds exactly the ids of that shard.
    for i in 0..4 {
        let shard = Shard::new(i, 4).unwrap();
        let part: BTreeSet<String> = lines(&out.join(format!("parts/part-{i}.jsonl")))
            .iter()
            .map(id)
            .collect();
        let want: BTreeSet<String> = ids
            .iter()
            .filter(|id| shard.contains(id))
            .cloned()
            .collect();
        assert_eq!(part, want, "part {i}");
        let log = std::fs::read_to_string(out.join(format!("logs/task-{i}.err"))).unwrap();
        assert!(
            log.contains(&format!("shard {i}/4 from SLURM_ARRAY_TASK_ID={i}")),
            "task {i}'s log: {log}"
        );
    }
    // Every example was made by the server (two calls each), not taken from elsewhere.
    assert!(
        server.requests() >= 2 * n as u64,
        "{} requests",
        server.requests()
    );
}

/// `--shard auto` without a real scheduler: the variables set by hand, as Slurm and Kubernetes
/// set them. Runs everywhere.
#[test]
fn shard_auto_takes_the_scheduler_shard_or_says_what_is_missing() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let body: String = (1..=12)
        .map(|i| format!("{{\"id\": \"q{i}\", \"prompt\": \"Name {i} fruit.\"}}\n"))
        .collect();
    std::fs::write(&prompts, body).unwrap();
    let generate = |out: &str, extra: &[&str], vars: &[(&str, &str)]| {
        let mut c = Command::new(BIN);
        for name in [
            "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_TASK_COUNT",
            "SLURM_ARRAY_TASK_MIN",
            "SLURM_ARRAY_TASK_MAX",
            "SLURM_ARRAY_TASK_STEP",
            "SLURM_JOB_ID",
            "JOB_COMPLETION_INDEX",
            "RUST_LOG",
        ] {
            c.env_remove(name);
        }
        c.envs(vars.iter().copied())
            .arg("generate")
            .arg("-i")
            .arg(&prompts)
            .arg("-o")
            .arg(dir.path().join(out))
            .args(["--shard", "auto", "--backend", "openai", "--model", "test"])
            .args([
                "--base-url",
                &server.base_url(),
                "--no-cache",
                "--retries",
                "0",
            ])
            .args(extra)
            .output()
            .expect("the binary runs")
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    // Task 4 of `sbatch --array=0-6:2` is shard 2/4: its part holds exactly that shard's ids.
    let o = generate(
        "slurm.jsonl",
        &[],
        &[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "6"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("rmboost: shard 2/4 from SLURM_ARRAY_TASK_ID=4"));
    assert!(
        text(&o.stdout).contains("2/4 from SLURM_ARRAY_TASK_ID"),
        "{}",
        text(&o.stdout)
    );
    let shard = Shard::new(2, 4).unwrap();
    let got: BTreeSet<String> = lines(&dir.path().join("slurm.jsonl"))
        .iter()
        .map(id)
        .collect();
    let want: BTreeSet<String> = (1..=12)
        .map(|i| format!("q{i}"))
        .filter(|id| shard.contains(id))
        .collect();
    assert_eq!(got, want);

    // Pod 1 of a Kubernetes Indexed Job with --shards 3.
    let o = generate(
        "k8s.jsonl",
        &["--shards", "3"],
        &[("JOB_COMPLETION_INDEX", "1")],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("shard 1/3 from JOB_COMPLETION_INDEX=1"));

    // Refusals: bad flags (exit 2), one line naming the variables, nothing written.
    for (vars, extra, needle) in [
        (vec![], vec![], "neither SLURM_ARRAY_TASK_ID"),
        (vec![("JOB_COMPLETION_INDEX", "1")], vec![], "--shards N"),
        (
            vec![("JOB_COMPLETION_INDEX", "3")],
            vec!["--shards", "3"],
            "JOB_COMPLETION_INDEX=3 is not below the 3 shards",
        ),
        (
            vec![
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            vec!["--shards", "8"],
            "8 shards were asked for",
        ),
        (
            vec![
                ("SLURM_ARRAY_TASK_ID", "one"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            vec![],
            "SLURM_ARRAY_TASK_ID=\"one\" is not a whole number",
        ),
    ] {
        let o = generate("refused.jsonl", &extra, &vars);
        assert_eq!(o.status.code(), Some(2), "{needle}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(needle),
            "{needle}: {}",
            text(&o.stderr)
        );
        assert!(!dir.path().join("refused.jsonl").exists());
    }
}
