//! Reliability test helpers: a fault-injecting backend wrapper, a small retry loop, and
//! readers of output files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rmboost::{
    async_trait, BackendError, BackendErrorKind, Completion, CompletionRequest, LlmBackend, Prompt,
};

/// The text every injected error message contains; no output row may contain it.
pub const INJECTED: &str = "injected fault";

/// The kinds of fault [`Faulty`] injects.
pub const FAULT_KINDS: [&str; 7] = [
    "rate_limited",
    "server_500",
    "server_503",
    "timeout",
    "connection",
    "invalid_response",
    "empty_content",
];

/// Wraps a backend and makes a seeded share of calls fail with a mix of transport errors,
/// or answer with empty content.
pub struct Faulty<B> {
    inner: B,
    rate: f64,
    rng: Mutex<ChaCha8Rng>,
    counts: Arc<[AtomicU64; 7]>,
    calls: Arc<AtomicU64>,
}

impl<B> Faulty<B> {
    pub fn new(inner: B, rate: f64, seed: u64) -> Self {
        Faulty {
            inner,
            rate,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            counts: Arc::new(Default::default()),
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A handle on the counters that outlives the backend being moved into a generator.
    pub fn counters(&self) -> FaultCounters {
        FaultCounters {
            counts: self.counts.clone(),
            calls: self.calls.clone(),
        }
    }
}

#[derive(Clone)]
pub struct FaultCounters {
    counts: Arc<[AtomicU64; 7]>,
    calls: Arc<AtomicU64>,
}

impl FaultCounters {
    pub fn by_kind(&self) -> BTreeMap<&'static str, u64> {
        FAULT_KINDS
            .iter()
            .zip(self.counts.iter())
            .map(|(k, c)| (*k, c.load(Ordering::SeqCst)))
            .collect()
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl<B: LlmBackend> LlmBackend for Faulty<B> {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fault = {
            let mut rng = self.rng.lock().unwrap();
            if rng.random_bool(self.rate) {
                Some(rng.random_range(0..FAULT_KINDS.len()))
            } else {
                None
            }
        };
        let Some(k) = fault else {
            return self.inner.complete(request).await;
        };
        self.counts[k].fetch_add(1, Ordering::SeqCst);
        let msg = format!("{INJECTED}: {}", FAULT_KINDS[k]);
        Err(match k {
            0 => BackendError::rate_limited(msg)
                .with_status(429)
                .with_retry_after(Duration::from_millis(1)),
            1 => BackendError::server(msg).with_status(500),
            2 => BackendError::server(msg).with_status(503),
            3 => BackendError::timeout(msg),
            4 => BackendError::new(BackendErrorKind::Connection, msg),
            5 => BackendError::new(BackendErrorKind::InvalidResponse, msg),
            _ => return Ok(Completion::new("").with_model("faulty")),
        })
    }

    fn name(&self) -> std::borrow::Cow<'_, str> {
        self.inner.name()
    }
}

/// Retries retryable errors up to `attempts` times in all, waiting `Retry-After` or a short
/// backoff; counts the retries.
pub struct SimpleRetry<B> {
    inner: B,
    attempts: u32,
    retries: Arc<AtomicU64>,
}

impl<B> SimpleRetry<B> {
    pub fn new(inner: B, attempts: u32) -> Self {
        SimpleRetry {
            inner,
            attempts,
            retries: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn retries(&self) -> Arc<AtomicU64> {
        self.retries.clone()
    }
}

#[async_trait]
impl<B: LlmBackend> LlmBackend for SimpleRetry<B> {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let mut attempt = 1;
        loop {
            match self.inner.complete(request.clone()).await {
                Err(e) if e.is_retryable() && attempt < self.attempts => {
                    self.retries.fetch_add(1, Ordering::SeqCst);
                    let wait = e
                        .retry_after()
                        .unwrap_or(Duration::from_micros(200 << attempt));
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn name(&self) -> std::borrow::Cow<'_, str> {
        self.inner.name()
    }
}

/// Writes prompts as a JSONL input file.
pub fn write_input(path: &Path, prompts: &[Prompt]) {
    let mut s = String::new();
    for p in prompts {
        let text = match p.input() {
            rmboost::PromptInput::Text(t) => t.clone(),
            other => unreachable!("plain-text prompts only: {other:?}"),
        };
        s.push_str(&serde_json::json!({"id": p.id(), "prompt": text}).to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// The rows of an output file, parsed; panics on a line that is not JSON.
pub fn rows(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad row {l:?}: {e}")))
        .collect()
}

/// id → (label, aspects) of an output file; panics on a duplicate id.
pub fn labels_by_id(path: &Path) -> HashMap<String, (String, Vec<String>)> {
    let mut map = HashMap::new();
    for r in rows(path) {
        let id = r["id"].as_str().unwrap().to_string();
        let label = r["label"].as_str().unwrap().to_string();
        let aspects = r["aspects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        assert!(
            map.insert(id.clone(), (label, aspects)).is_none(),
            "duplicate id {id}"
        );
    }
    map
}
