//! The final summary of `rmboost generate`: human-readable on stdout, JSON on request.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use rmboost::run::Outcome;
use serde::Serialize;

use crate::progress::{human_count, human_duration};

/// Token counts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Tokens {
    pub(crate) prompt: u64,
    pub(crate) completion: u64,
    pub(crate) total: u64,
}

/// The response cache of a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CacheReport {
    pub(crate) path: PathBuf,
    /// Calls answered from the cache: not sent, not paid for.
    pub(crate) hits: u64,
    /// Their tokens, as the original calls counted them.
    pub(crate) hit_tokens: u64,
    pub(crate) misses: u64,
}

/// The adaptive limit on calls in flight over the run.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct ConcurrencyReport {
    /// Whether the limit adapted (not `--fixed-concurrency`).
    pub(crate) adaptive: bool,
    /// `--concurrency`.
    pub(crate) cap: usize,
    /// The limit at the end.
    pub(crate) limit: usize,
    /// The lowest the limit went after slow start.
    pub(crate) min_limit: usize,
    /// The highest the limit rose to after slow start and the first cut.
    pub(crate) max_limit: usize,
    /// Calls that went through the limit (every attempt).
    pub(crate) calls: u64,
    /// Of those, answered 429.
    pub(crate) rate_limited: u64,
    /// Times the answers asking to slow down were many enough to be congestion (the others
    /// were noise and moved nothing).
    pub(crate) congestion: u64,
}

/// One replica of `--base-url` given more than once.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReplicaReport {
    /// Its endpoint.
    pub(crate) endpoint: String,
    /// Calls it answered or failed (every attempt).
    pub(crate) calls: u64,
    /// Of those, failed.
    pub(crate) errors: u64,
    /// Of those, answered 429.
    pub(crate) rate_limited: u64,
    /// Times it was drained (its calls went to the others until a probe succeeded).
    pub(crate) drains: u64,
    /// Its limit on calls in flight at the end.
    pub(crate) limit: usize,
}

/// The batches of a `--batch` run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BatchReport {
    #[serde(flatten)]
    pub(crate) stats: rmboost::batch::BatchStats,
    /// How to resume or cancel, when batches still run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) resume_hint: Option<String>,
}

/// Everything the summary shows.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// How the run ended: `unreachable` and errors are `failed`.
    pub(crate) status: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    pub(crate) examples_written: u64,
    pub(crate) better: u64,
    pub(crate) worse: u64,
    pub(crate) skipped_done: u64,
    pub(crate) failed: u64,
    pub(crate) failures: BTreeMap<&'static str, u64>,
    pub(crate) bad_lines: u64,
    pub(crate) duplicates: u64,
    pub(crate) other_shard: u64,
    /// The shard this run took (`--shard`), and from which scheduler variable with `auto`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) shard: Option<String>,
    pub(crate) reasks: u64,
    pub(crate) retries: u64,
    pub(crate) calls: u64,
    /// Tokens of every call this run made (failed examples and re-asks included).
    pub(crate) tokens: Tokens,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cost: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_cost: Option<f64>,
    pub(crate) examples_per_sec: f64,
    pub(crate) wall_time_secs: f64,
    /// The exit status of the command (see `rmboost generate --help`).
    pub(crate) exit_status: u8,
    pub(crate) backend: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cache: Option<CacheReport>,
    pub(crate) seed: u64,
    pub(crate) output: PathBuf,
    /// The failure ledger, when some ids still fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ledger: Option<PathBuf>,
    pub(crate) ledger_pending: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) bad_line_messages: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) concurrency: Option<ConcurrencyReport>,
    /// Per replica, with several `--base-url`s (the concurrency above is their sum).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) replicas: Vec<ReplicaReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) batch: Option<BatchReport>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (written, better, worse) = (self.examples_written, self.better, self.worse);
        let mut rows: Vec<(&str, String)> = vec![
            (
                "examples written",
                format!("{written} ({better} better, {worse} worse)"),
            ),
            (
                "already done",
                format!("{} (skipped, resumed from the output)", self.skipped_done),
            ),
        ];
        let kinds: Vec<String> = self
            .failures
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        rows.push(match kinds.is_empty() {
            true => ("failed", self.failed.to_string()),
            false => ("failed", format!("{} ({})", self.failed, kinds.join(", "))),
        });
        let count = |key, n: u64, text: &str| (n > 0).then(|| (key, format!("{n}{text}")));
        rows.extend(count("bad input lines", self.bad_lines, ""));
        rows.extend(count("duplicate ids", self.duplicates, " (skipped)"));
        rows.extend(self.shard.as_ref().map(|shard| ("shard", shard.clone())));
        rows.extend(count("other shards", self.other_shard, ""));
        rows.push(("re-asks", self.reasks.to_string()));
        rows.push(("retries", self.retries.to_string()));
        let t = &self.tokens;
        let (total, prompt, completion) = (t.total, t.prompt, t.completion);
        rows.push((
            "tokens",
            format!(
                "{} ({} prompt + {} completion) in {} calls to the backend",
                human_count(total),
                human_count(prompt),
                human_count(completion),
                self.calls
            ),
        ));
        rows.extend(self.cost.map(|cost| match self.max_cost {
            Some(max) => ("cost", format!("${cost:.4} (limit ${max:.2})")),
            None => ("cost", format!("${cost:.4}")),
        }));
        rows.push(("speed", format!("{:.2} examples/s", self.examples_per_sec)));
        let wall = std::time::Duration::from_secs_f64(self.wall_time_secs);
        rows.push(("wall time", human_duration(wall)));
        rows.push(("backend", self.backend.clone()));
        if let Some(c) = &self.concurrency {
            let range = if c.adaptive {
                format!(
                    "adaptive, cap {}: {}..{} (ended at {})",
                    c.cap, c.min_limit, c.max_limit, c.limit
                )
            } else {
                format!("fixed at {}", c.cap)
            };
            let (limited, calls, congestion) = (c.rate_limited, c.calls, c.congestion);
            rows.push((
                "concurrency",
                format!("{range}; {limited} of {calls} calls answered 429, {congestion} times congestion"),
            ));
        }
        rows.extend(self.replicas.iter().map(|r| {
            (
                "replica",
                format!(
                    "{}: {} calls, {} failed ({} answered 429), drained {} times, limit {}",
                    r.endpoint, r.calls, r.errors, r.rate_limited, r.drains, r.limit
                ),
            )
        }));
        rows.extend(self.cache.as_ref().map(|c| {
            let (hits, misses, path) = (c.hits, c.misses, c.path.display());
            let tokens = human_count(c.hit_tokens);
            (
                "response cache",
                format!(
                    "{hits} calls answered from the cache ({tokens} tokens not paid for again), \
                     {misses} misses ({path})"
                ),
            )
        }));
        rows.extend(
            self.batch
                .as_ref()
                .map(|b| ("batches", b.stats.to_string())),
        );
        rows.push(("output", self.output.display().to_string()));
        rows.extend(self.ledger.as_ref().map(|l| {
            let pending = self.ledger_pending;
            (
                "failure ledger",
                format!("{} ({pending} ids still failing)", l.display()),
            )
        }));
        // How the run ended, in the flags' words.
        let status = match self.status {
            Outcome::Completed => "completed",
            Outcome::LimitReached => "stopped at --limit",
            Outcome::CostLimit => "stopped: --max-cost reached",
            Outcome::Interrupted => "interrupted (Ctrl-C)",
            _ => "failed",
        };
        write!(f, "rmboost generate: {status}")?;
        if self.failed > 0 && matches!(self.status, Outcome::Completed | Outcome::LimitReached) {
            write!(
                f,
                ", {} examples failed (exit status {}; a rerun retries them)",
                self.failed, self.exit_status
            )?;
        }
        writeln!(f)?;
        let error = self.error.clone().map(|e| ("error", e));
        for (k, v) in error.into_iter().chain(rows) {
            writeln!(f, "  {k:<18}{v}")?;
        }
        for m in &self.bad_line_messages {
            writeln!(f, "  bad line: {m}")?;
        }
        if let Some(hint) = self.batch.as_ref().and_then(|b| b.resume_hint.as_ref()) {
            writeln!(f, "  {hint}")?;
        }
        Ok(())
    }
}
