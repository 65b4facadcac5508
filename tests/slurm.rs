//! `rmboost generate --shard auto` on a REAL Slurm cluster: `scripts/slurm-test.sh` starts a
//! one-node cluster from Debian's packages (munged, slurmctld, slurmd), runs
//! `deploy/slurm/rmboost-array.sbatch` as a 4-task job array against the loopback
//! OpenAI-compatible test server, then its merge step as a dependent job.
//!
//! Needs root and the packages (`apt-get install -y --no-install-recommends slurmctld slurmd
//! slurm-client munge`; `scripts/test.sh` installs them). Under the README's test command
//! (`RMBOOST_LIVE_TESTS=required`) a missing piece fails the test; a plain `cargo test` skips
//! it and says why.
#![cfg(feature = "cli")]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rmboost::run::Shard;
use support::live_tests_required;
use support::openai_server::OpenAiServer;

const BIN: &str = env!("CARGO_BIN_EXE_rmboost");
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
    let server = OpenAiServer::start();
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
