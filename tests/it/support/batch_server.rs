//! The tests' loopback server of the providers' batch APIs: OpenAI Batch (files + batches) or
//! Anthropic Message Batches, one API per server.
//!
//! Answers are the ones [`OpenAiServer`](super::openai_server::OpenAiServer) gives online
//! (`rmboost::testing::FakeBackend` from the request body: an OpenAI line's `seed`; an
//! Anthropic request has no seed, so a stable hash of its `params` stands for it), so a batch
//! run and an online run with the same run seed can be compared.
//!
//! Batches move through their states on each status poll (`GET .../batches/{id}`), or after
//! each [`BatchServerBuilder::step`] of wall time: OpenAI `validating → in_progress →
//! finalizing → completed` (or `failed`, `expired`), Anthropic `in_progress → ended`. A cancel
//! moves to `cancelling`/`canceling`, then `cancelled`/`ended`: if the batch was in progress,
//! the first half of its lines (in submission order) count as processed, the rest as canceled.
//! Result lines come back in a seeded shuffled order. A builder injects faults: a failed
//! validation, errored and expired lines (on a custom_id's first submission only, so a
//! resubmission succeeds), a batch whose every line fails, 5xx answers to status polls, and
//! create answers held until the test releases them.
//!
//! Wire details a client must cope with, as the real services behave:
//! - OpenAI: line validation happens at upload (`POST /v1/files` answers 400 naming the line);
//!   an injected validation failure is asynchronous (`failed` with `errors` after
//!   `validating`). An errored line is either `{"response": {"status_code": 500, "body":
//!   {"error"}}, "error": null}` or `{"response": null, "error": {"code", "message"}}`; an
//!   expired line has `error.code = "batch_expired"` and puts the batch in `expired`. Canceled
//!   lines are in neither file. A batch with no successful line has `output_file_id: null`.
//! - Anthropic: validation is synchronous (400 `invalid_request_error`, also for an injected
//!   validation failure, which then creates nothing). Errored results carry an error response
//!   (`api_error` or `overloaded_error`). Timestamps are RFC 3339 strings.
//!
//! It binds 127.0.0.1 on a free port and serves HTTP/1.1 (hyper) from its own thread and tokio
//! runtime, so synchronous and async tests alike can use it; it stops when dropped.
//!
//! ```ignore
//! let server = BatchServer::builder(Api::OpenAi).errored_one_in(5).start();
//! // rmboost generate ... --backend openai --batch --base-url <server.base_url()>
//! assert_eq!(server.resubmitted_custom_ids(), 0);
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rmboost::testing::FakeBackend;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use super::openai_server::{fake_completion, Recorded};

/// The message of every injected line error and validation failure; no output row may
/// contain it.
pub const INJECTED_BATCH: &str = "injected batch fault";

/// The OpenAI Batch API's limits on one input file.
pub const OPENAI_MAX_LINES: usize = 50_000;
/// 200 MB.
pub const OPENAI_MAX_BYTES: usize = 200 * 1000 * 1000;
/// The Anthropic Message Batches API's limits on one batch.
pub const ANTHROPIC_MAX_REQUESTS: usize = 100_000;
/// 256 MB.
pub const ANTHROPIC_MAX_BYTES: usize = 256 * 1000 * 1000;

/// Which batch API a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/files` + `/v1/batches`.
    OpenAi,
    /// `/v1/messages/batches`.
    Anthropic,
}

/// How the server behaves; see [`BatchServer::builder`].
#[derive(Debug, Clone)]
pub struct BatchServerBuilder {
    api: Api,
    step: Duration,
    seed: u64,
    fail_validation: Vec<u64>,
    errored_one_in: Option<u64>,
    expired_one_in: Option<u64>,
    all_fail: Vec<u64>,
    poll_5xx_one_in: Option<u64>,
    hold_creates: bool,
    filler: usize,
    max_lines: Option<usize>,
    max_bytes: Option<usize>,
}

impl BatchServerBuilder {
    /// Advances every batch one state per `step` of wall time instead of one state per status
    /// poll (default zero: per poll).
    pub fn step(mut self, d: Duration) -> Self {
        self.step = d;
        self
    }

    /// Seeds the order of result lines, the choice of errored and expired lines and of the
    /// polls answered 5xx (default 1).
    pub fn seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }

    /// The `nth` create request (1-based) fails validation: OpenAI's batch goes `validating →
    /// failed` with `errors`; Anthropic's create is answered 400 and creates nothing. May be
    /// called again for more batches.
    pub fn fail_validation_of_batch(mut self, nth: u64) -> Self {
        self.fail_validation.push(nth);
        self
    }

    /// About one line in `k` errors (chosen from the seed and its custom_id), only on the
    /// custom_id's first submission.
    pub fn errored_one_in(mut self, k: u64) -> Self {
        assert!(k > 0);
        self.errored_one_in = Some(k);
        self
    }

    /// About one line in `k` expires (chosen from the seed and its custom_id), only on the
    /// custom_id's first submission; an OpenAI batch with an expired line ends `expired`.
    pub fn expired_one_in(mut self, k: u64) -> Self {
        assert!(k > 0);
        self.expired_one_in = Some(k);
        self
    }

    /// Every line of the `nth` create request's batch (1-based) errors: OpenAI's completes
    /// with no output file, Anthropic's ends with every result errored.
    pub fn all_lines_fail_in_batch(mut self, nth: u64) -> Self {
        self.all_fail.push(nth);
        self
    }

    /// About one status poll in `k` (seeded) is answered 500 or 503 without advancing the
    /// batch; the next poll of the same batch is never.
    pub fn poll_5xx_one_in(mut self, k: u64) -> Self {
        assert!(k > 0);
        self.poll_5xx_one_in = Some(k);
        self
    }

    /// Each create request is recorded (the batch exists, listed and counted), then its answer
    /// is held until [`BatchServer::release_creates`].
    pub fn hold_creates(mut self) -> Self {
        self.hold_creates = true;
        self
    }

    /// Length in bytes of the fake answers' filler (default 40, as `FakeBackend::new` and
    /// `OpenAiServer`).
    pub fn filler(mut self, len: usize) -> Self {
        self.filler = len;
        self
    }

    /// The most lines of an OpenAI input file or requests of an Anthropic batch (default the
    /// API's: 50,000 / 100,000).
    pub fn max_lines(mut self, n: usize) -> Self {
        self.max_lines = Some(n);
        self
    }

    /// The most bytes of an OpenAI input file or of an Anthropic create body (default the
    /// API's: 200 MB / 256 MB).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = Some(n);
        self
    }

    /// Binds 127.0.0.1 on a free port and starts serving on a thread of its own.
    pub fn start(self) -> BatchServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let (release, _) = tokio::sync::watch::channel(!self.hold_creates);
        let state = Arc::new(State {
            addr,
            fake: FakeBackend::with_response_len(self.filler),
            inner: Mutex::new(Inner {
                rng: ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_ba7c),
                files: HashMap::new(),
                batches: Vec::new(),
                ids: HashMap::new(),
                creates: 0,
                requests_submitted: 0,
                resubmitted: 0,
                polls: 0,
                polls_failed: 0,
                cancels: 0,
                next_id: 0,
                recorded: Vec::new(),
            }),
            release,
            config: self,
        });
        let (shutdown, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let s = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("batch-test-server-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the test server's runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => {
                                let Ok((tcp, _)) = accepted else { continue };
                                let s = s.clone();
                                tokio::spawn(async move {
                                    let svc = service_fn(move |req| handle(req, s.clone()));
                                    let _ = http1::Builder::new()
                                        .serve_connection(TokioIo::new(tcp), svc)
                                        .await;
                                });
                            }
                        }
                    }
                });
                // Dropping the runtime drops every connection and held answer.
            })
            .expect("spawn the test server's thread");
        BatchServer {
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }
}

/// One batch as the server holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInfo {
    pub id: String,
    /// OpenAI's `status` or Anthropic's `processing_status`, as of now.
    pub status: String,
    /// Lines (requests) in the batch.
    pub requests: u64,
    /// OpenAI's metadata (always empty for Anthropic).
    pub metadata: BTreeMap<String, String>,
    /// The custom_ids, in submission order.
    pub custom_ids: Vec<String>,
}

/// A running server; stops when dropped.
pub struct BatchServer {
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for BatchServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl BatchServer {
    /// A configurable server of `api`; [`BatchServerBuilder::start`] starts it.
    pub fn builder(api: Api) -> BatchServerBuilder {
        BatchServerBuilder {
            api,
            step: Duration::ZERO,
            seed: 1,
            fail_validation: Vec::new(),
            errored_one_in: None,
            expired_one_in: None,
            all_fail: Vec::new(),
            poll_5xx_one_in: None,
            hold_creates: false,
            filler: 40,
            max_lines: None,
            max_bytes: None,
        }
    }

    /// A server of `api` with the defaults: no faults, one state per poll.
    pub fn start(api: Api) -> BatchServer {
        Self::builder(api).start()
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// The base URL (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.state.addr)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.inner.lock().unwrap()
    }

    /// Batches created (an OpenAI batch that then fails validation counts; an Anthropic
    /// create refused 400 does not).
    pub fn batches_created(&self) -> u64 {
        self.inner().batches.len() as u64
    }

    /// Lines (requests) over all created batches.
    pub fn requests_submitted(&self) -> u64 {
        self.inner().requests_submitted
    }

    /// Lines whose custom_id was already in an earlier batch that had not errored, expired,
    /// been canceled or failed validation for it (still running, or succeeded): a double
    /// submission.
    pub fn resubmitted_custom_ids(&self) -> u64 {
        self.inner().resubmitted
    }

    /// Every batch, in creation order, with its status as of now.
    pub fn batches(&self) -> Vec<BatchInfo> {
        let mut inner = self.inner();
        for i in 0..inner.batches.len() {
            self.state.tick(&mut inner, i);
        }
        inner
            .batches
            .iter()
            .map(|b| BatchInfo {
                id: b.id.clone(),
                status: b.status.to_string(),
                requests: b.lines.len() as u64,
                metadata: b.metadata.clone(),
                custom_ids: b.lines.iter().map(|l| l.custom_id.clone()).collect(),
            })
            .collect()
    }

    /// The lines of batch `id` as submitted: custom_id and request body (OpenAI `body`,
    /// Anthropic `params`), in submission order; empty for an unknown id.
    pub fn lines(&self, id: &str) -> Vec<(String, Value)> {
        self.inner()
            .batches
            .iter()
            .find(|b| b.id == id)
            .map(|b| {
                b.lines
                    .iter()
                    .map(|l| (l.custom_id.clone(), l.body.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Status polls received (`GET .../batches/{id}`), those answered 5xx included.
    pub fn polls(&self) -> u64 {
        self.inner().polls
    }

    /// Status polls answered 500 or 503 by [`BatchServerBuilder::poll_5xx_one_in`].
    pub fn polls_failed(&self) -> u64 {
        self.inner().polls_failed
    }

    /// Cancel requests that moved a batch to cancelling/canceling.
    pub fn cancels(&self) -> u64 {
        self.inner().cancels
    }

    /// Every request received so far, in arrival order (the body is `Null` for uploads and for
    /// JSON bodies over 8 MiB).
    pub fn recorded(&self) -> Vec<Recorded> {
        self.inner().recorded.clone()
    }

    /// Waits until at least `n` batches were created; false after `timeout`.
    pub fn wait_for_batches(&self, n: u64, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while self.batches_created() < n {
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Answers every create held by [`BatchServerBuilder::hold_creates`], and every later one
    /// at once.
    pub fn release_creates(&self) {
        self.state.release.send_replace(true);
    }
}

// ---------------------------------------------------------------------------------------------
// State

struct State {
    addr: SocketAddr,
    config: BatchServerBuilder,
    fake: FakeBackend,
    inner: Mutex<Inner>,
    /// True once creates are no longer held.
    release: tokio::sync::watch::Sender<bool>,
}

struct Inner {
    rng: ChaCha8Rng,
    files: HashMap<String, File>,
    batches: Vec<Batch>,
    /// For each custom_id: the batch (index) of its latest submission and how it fared there.
    ids: HashMap<String, (usize, IdState)>,
    /// Create requests that passed validation (the `nth` of the builder).
    creates: u64,
    requests_submitted: u64,
    resubmitted: u64,
    polls: u64,
    polls_failed: u64,
    cancels: u64,
    next_id: u64,
    recorded: Vec<Recorded>,
}

impl Inner {
    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdState {
    Pending,
    Succeeded,
    Failed,
}

struct File {
    id: String,
    purpose: String,
    filename: String,
    bytes: Bytes,
    created_at: u64,
    /// The parsed lines of an uploaded batch input file.
    lines: Vec<Line>,
}

#[derive(Clone)]
struct Line {
    custom_id: String,
    body: Value,
    fate: Fate,
}

/// What will happen to a line when the batch processes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Succeed,
    /// Errors, in one of two shapes.
    Error(u8),
    Expire,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Errored(u8),
    Expired,
    Canceled,
}

struct Batch {
    id: String,
    /// 1-based creation order.
    index: u64,
    status: &'static str,
    /// When it entered its status (for `step`).
    entered: Instant,
    created_at: u64,
    /// Unix times of the status changes (`in_progress_at`, ...).
    times: BTreeMap<&'static str, u64>,
    lines: Vec<Line>,
    metadata: BTreeMap<String, String>,
    input_file_id: String,
    completion_window: String,
    fail_validation: bool,
    /// Lines processed before a cancel, in submission order.
    processed_before_cancel: usize,
    outcomes: Option<Vec<Outcome>>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    /// Anthropic's results JSONL, once ended.
    results: Option<Bytes>,
    last_poll_failed: bool,
}

impl Batch {
    fn terminal(&self) -> bool {
        matches!(
            self.status,
            "completed" | "failed" | "expired" | "cancelled" | "ended"
        )
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 (UTC, seconds) of a Unix time.
fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A stable 64-bit hash (FNV-1a, then a splitmix64 finish).
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The seed the server answers an Anthropic request (`params`) with: a stable hash of its
/// JSON text.
pub fn anthropic_seed(params: &Value) -> u64 {
    stable_hash(&[params.to_string().as_bytes()])
}

/// Whether an Anthropic request asks for a second response (its system prompt or a message
/// mentions `</response>`).
fn anthropic_is_second(params: &Value) -> bool {
    fn mentions(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains("</response>"),
            Value::Array(blocks) => blocks.iter().any(|b| mentions(&b["text"])),
            _ => false,
        }
    }
    mentions(&params["system"])
        || params["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| mentions(&m["content"]))
}

fn text_len(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(blocks) => blocks.iter().map(|b| text_len(&b["text"])).sum(),
        _ => 0,
    }
}

/// The Messages API response the fake gives to `params`.
fn anthropic_message(fake: &FakeBackend, params: &Value, n: u64) -> Value {
    let text = fake.answer(anthropic_seed(params), anthropic_is_second(params));
    let prompt_len = text_len(&params["system"])
        + params["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| text_len(&m["content"]))
            .sum::<usize>();
    json!({
        "id": format!("msg_test{n:08}"),
        "type": "message",
        "role": "assistant",
        "model": params["model"].as_str().unwrap_or("test"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": prompt_len / 4, "output_tokens": text.len() / 4}
    })
}

impl State {
    fn api(&self) -> Api {
        self.config.api
    }

    fn max_lines(&self) -> usize {
        self.config.max_lines.unwrap_or(match self.api() {
            Api::OpenAi => OPENAI_MAX_LINES,
            Api::Anthropic => ANTHROPIC_MAX_REQUESTS,
        })
    }

    fn max_bytes(&self) -> usize {
        self.config.max_bytes.unwrap_or(match self.api() {
            Api::OpenAi => OPENAI_MAX_BYTES,
            Api::Anthropic => ANTHROPIC_MAX_BYTES,
        })
    }

    /// Advances batch `i` by wall time when a `step` is set.
    fn tick(&self, inner: &mut Inner, i: usize) {
        let step = self.config.step;
        if step.is_zero() {
            return;
        }
        while !inner.batches[i].terminal() && inner.batches[i].entered.elapsed() >= step {
            let entered = inner.batches[i].entered + step;
            self.advance(inner, i);
            inner.batches[i].entered = entered;
        }
    }

    /// Moves batch `i` to its next state.
    fn advance(&self, inner: &mut Inner, i: usize) {
        let now = now_unix();
        let b = &mut inner.batches[i];
        b.entered = Instant::now();
        let fated = |b: &Batch| -> Vec<Outcome> {
            b.lines
                .iter()
                .map(|l| match l.fate {
                    Fate::Succeed => Outcome::Succeeded,
                    Fate::Error(k) => Outcome::Errored(k),
                    Fate::Expire => Outcome::Expired,
                })
                .collect()
        };
        let canceled = |b: &Batch| -> Vec<Outcome> {
            b.lines
                .iter()
                .enumerate()
                .map(|(j, l)| match l.fate {
                    Fate::Succeed if j < b.processed_before_cancel => Outcome::Succeeded,
                    Fate::Error(k) if j < b.processed_before_cancel => Outcome::Errored(k),
                    _ => Outcome::Canceled,
                })
                .collect()
        };
        let next: &'static str = match (self.api(), b.status) {
            (Api::OpenAi, "validating") if b.fail_validation => "failed",
            (Api::OpenAi, "validating") => "in_progress",
            (Api::OpenAi, "in_progress") => {
                let outcomes = fated(b);
                let expired = outcomes.contains(&Outcome::Expired);
                b.outcomes = Some(outcomes);
                if expired {
                    "expired"
                } else {
                    "finalizing"
                }
            }
            (Api::OpenAi, "finalizing") => "completed",
            (Api::OpenAi, "cancelling") => {
                b.outcomes = Some(canceled(b));
                "cancelled"
            }
            (Api::Anthropic, "in_progress") => {
                b.outcomes = Some(fated(b));
                "ended"
            }
            (Api::Anthropic, "canceling") => {
                b.outcomes = Some(canceled(b));
                "ended"
            }
            _ => return,
        };
        b.status = next;
        b.times.insert(
            match next {
                "in_progress" => "in_progress_at",
                "finalizing" => "finalizing_at",
                "completed" => "completed_at",
                "failed" => "failed_at",
                "expired" => "expired_at",
                "cancelled" => "cancelled_at",
                _ => "ended_at",
            },
            now,
        );
        if b.terminal() {
            self.finish(inner, i);
        }
    }

    /// Writes a batch's results and settles its custom_ids.
    fn finish(&self, inner: &mut Inner, i: usize) {
        let outcomes = inner.batches[i]
            .outcomes
            .clone()
            .unwrap_or_else(|| vec![Outcome::Canceled; inner.batches[i].lines.len()]);
        let lines = inner.batches[i].lines.clone();
        for (line, outcome) in lines.iter().zip(&outcomes) {
            if let Some((owner, state)) = inner.ids.get_mut(&line.custom_id) {
                if *owner == i {
                    *state = if *outcome == Outcome::Succeeded {
                        IdState::Succeeded
                    } else {
                        IdState::Failed
                    };
                }
            }
        }
        if inner.batches[i].status == "failed" {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.config.seed ^ inner.batches[i].index.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        match self.api() {
            Api::OpenAi => {
                let mut output = Vec::new();
                let mut errors = Vec::new();
                for (line, outcome) in lines.iter().zip(&outcomes) {
                    let n = inner.next();
                    let id = format!("batch_req_test{n:08}");
                    let request_id = format!("req_test{n:08}");
                    match outcome {
                        Outcome::Succeeded => output.push(json!({
                            "id": id, "custom_id": line.custom_id,
                            "response": {"status_code": 200, "request_id": request_id,
                                         "body": fake_completion(&self.fake, &line.body)},
                            "error": null
                        })),
                        Outcome::Errored(0) => errors.push(json!({
                            "id": id, "custom_id": line.custom_id,
                            "response": {"status_code": 500, "request_id": request_id,
                                         "body": {"error": {"message": format!("{INJECTED_BATCH}: server error"),
                                                            "type": "server_error", "param": null, "code": null}}},
                            "error": null
                        })),
                        Outcome::Errored(_) => errors.push(json!({
                            "id": id, "custom_id": line.custom_id, "response": null,
                            "error": {"code": "server_error", "message": format!("{INJECTED_BATCH}: line failed")}
                        })),
                        Outcome::Expired => errors.push(json!({
                            "id": id, "custom_id": line.custom_id, "response": null,
                            "error": {"code": "batch_expired",
                                      "message": "This request could not be executed before the completion window expired."}
                        })),
                        Outcome::Canceled => {}
                    }
                }
                output.shuffle(&mut rng);
                errors.shuffle(&mut rng);
                let output_file = self.add_output_file(inner, "batch_output", &output);
                let error_file = self.add_output_file(inner, "batch_output", &errors);
                let b = &mut inner.batches[i];
                b.output_file_id = output_file;
                b.error_file_id = error_file;
            }
            Api::Anthropic => {
                let mut results = Vec::new();
                for (line, outcome) in lines.iter().zip(&outcomes) {
                    let n = inner.next();
                    let result = match outcome {
                        Outcome::Succeeded => json!({"type": "succeeded",
                            "message": anthropic_message(&self.fake, &line.body, n)}),
                        Outcome::Errored(k) => {
                            let kind = if *k == 0 {
                                "api_error"
                            } else {
                                "overloaded_error"
                            };
                            json!({"type": "errored", "error": {"type": "error",
                                "error": {"type": kind, "message": format!("{INJECTED_BATCH}: {kind}")}}})
                        }
                        Outcome::Expired => json!({"type": "expired"}),
                        Outcome::Canceled => json!({"type": "canceled"}),
                    };
                    results.push(json!({"custom_id": line.custom_id, "result": result}));
                }
                results.shuffle(&mut rng);
                inner.batches[i].results = Some(jsonl(&results));
            }
        }
    }

    /// Stores the lines as a file; `None` when there are none.
    fn add_output_file(&self, inner: &mut Inner, purpose: &str, lines: &[Value]) -> Option<String> {
        if lines.is_empty() {
            return None;
        }
        let id = format!("file-test{:08}", inner.next());
        inner.files.insert(
            id.clone(),
            File {
                id: id.clone(),
                purpose: purpose.to_string(),
                filename: format!("{id}.jsonl"),
                bytes: jsonl(lines),
                created_at: now_unix(),
                lines: Vec::new(),
            },
        );
        Some(id)
    }

    /// The fate of a line with this custom_id in the `nth` create.
    fn fate(&self, inner: &Inner, custom_id: &str, all_fail: bool) -> Fate {
        let h = stable_hash(&[&self.config.seed.to_le_bytes(), custom_id.as_bytes()]);
        if all_fail {
            return Fate::Error((h >> 40) as u8 & 1);
        }
        if inner.ids.contains_key(custom_id) {
            return Fate::Succeed;
        }
        if self
            .config
            .errored_one_in
            .is_some_and(|k| h.is_multiple_of(k))
        {
            return Fate::Error((h >> 40) as u8 & 1);
        }
        if self
            .config
            .expired_one_in
            .is_some_and(|k| h.rotate_left(23).is_multiple_of(k))
        {
            return Fate::Expire;
        }
        Fate::Succeed
    }

    /// Records a new batch of `lines` (validated); returns its index.
    fn create(
        &self,
        inner: &mut Inner,
        nth: u64,
        mut lines: Vec<Line>,
        metadata: BTreeMap<String, String>,
        input_file_id: String,
        completion_window: String,
    ) -> usize {
        let all_fail = self.config.all_fail.contains(&nth);
        for line in &mut lines {
            line.fate = self.fate(inner, &line.custom_id, all_fail);
        }
        let i = inner.batches.len();
        for line in &lines {
            if let Some((_, IdState::Pending | IdState::Succeeded)) = inner.ids.get(&line.custom_id)
            {
                inner.resubmitted += 1;
            }
            inner
                .ids
                .insert(line.custom_id.clone(), (i, IdState::Pending));
        }
        inner.requests_submitted += lines.len() as u64;
        let n = inner.next();
        let id = match self.api() {
            Api::OpenAi => format!("batch_test{n:08}"),
            Api::Anthropic => format!("msgbatch_test{n:08}"),
        };
        inner.batches.push(Batch {
            id,
            index: i as u64 + 1,
            status: match self.api() {
                Api::OpenAi => "validating",
                Api::Anthropic => "in_progress",
            },
            entered: Instant::now(),
            created_at: now_unix(),
            times: BTreeMap::new(),
            lines,
            metadata,
            input_file_id,
            completion_window,
            fail_validation: self.api() == Api::OpenAi
                && self.config.fail_validation.contains(&nth),
            processed_before_cancel: 0,
            outcomes: None,
            output_file_id: None,
            error_file_id: None,
            results: None,
            last_poll_failed: false,
        });
        i
    }

    fn batch_json(&self, b: &Batch) -> Value {
        let n = b.lines.len();
        let count = |f: &dyn Fn(&Outcome) -> bool| {
            b.outcomes
                .as_ref()
                .map_or(0, |o| o.iter().filter(|x| f(x)).count())
        };
        match self.api() {
            Api::OpenAi => {
                let time = |k: &str| b.times.get(k).copied();
                let errors = (b.status == "failed").then(|| {
                    json!({"object": "list", "data": [{
                        "code": "invalid_request",
                        "message": format!("{INJECTED_BATCH}: validation failed"),
                        "param": null, "line": null}]})
                });
                json!({
                    "id": b.id,
                    "object": "batch",
                    "endpoint": "/v1/chat/completions",
                    "errors": errors,
                    "input_file_id": b.input_file_id,
                    "completion_window": b.completion_window,
                    "status": b.status,
                    "output_file_id": b.output_file_id,
                    "error_file_id": b.error_file_id,
                    "created_at": b.created_at,
                    "in_progress_at": time("in_progress_at"),
                    "expires_at": b.created_at + 86_400,
                    "finalizing_at": time("finalizing_at"),
                    "completed_at": time("completed_at"),
                    "failed_at": time("failed_at"),
                    "expired_at": time("expired_at"),
                    "cancelling_at": time("cancelling_at"),
                    "cancelled_at": time("cancelled_at"),
                    "request_counts": {
                        "total": if matches!(b.status, "validating" | "failed") { 0 } else { n },
                        "completed": count(&|o| *o == Outcome::Succeeded),
                        "failed": count(&|o| matches!(o, Outcome::Errored(_) | Outcome::Expired)),
                    },
                    "metadata": if b.metadata.is_empty() { Value::Null } else { json!(b.metadata) },
                })
            }
            Api::Anthropic => {
                let ended = b.status == "ended";
                json!({
                    "id": b.id,
                    "type": "message_batch",
                    "processing_status": b.status,
                    "request_counts": {
                        "processing": if b.outcomes.is_some() { 0 } else { n },
                        "succeeded": count(&|o| *o == Outcome::Succeeded),
                        "errored": count(&|o| matches!(o, Outcome::Errored(_))),
                        "canceled": count(&|o| *o == Outcome::Canceled),
                        "expired": count(&|o| *o == Outcome::Expired),
                    },
                    "ended_at": b.times.get("ended_at").map(|t| rfc3339(*t)),
                    "created_at": rfc3339(b.created_at),
                    "expires_at": rfc3339(b.created_at + 86_400),
                    "archived_at": null,
                    "cancel_initiated_at": b.times.get("cancelling_at").map(|t| rfc3339(*t)),
                    "results_url": ended.then(|| format!(
                        "http://{}/v1/messages/batches/{}/results", self.addr, b.id)),
                })
            }
        }
    }

    fn file_json(f: &File) -> Value {
        json!({
            "id": f.id,
            "object": "file",
            "bytes": f.bytes.len(),
            "created_at": f.created_at,
            "filename": f.filename,
            "purpose": f.purpose,
            "status": "processed",
        })
    }

    fn error(&self, status: u16, message: &str) -> Answer {
        let body = match self.api() {
            Api::OpenAi => {
                let kind = match status {
                    401 => "invalid_request_error",
                    400..=499 => "invalid_request_error",
                    _ => "server_error",
                };
                json!({"error": {"message": message, "type": kind, "param": null,
                                 "code": (status == 401).then_some("invalid_api_key")}})
            }
            Api::Anthropic => {
                let kind = match status {
                    401 => "authentication_error",
                    404 => "not_found_error",
                    400..=499 => "invalid_request_error",
                    503 | 529 => "overloaded_error",
                    _ => "api_error",
                };
                json!({"type": "error", "error": {"type": kind, "message": message}})
            }
        };
        Answer::json(status, &body)
    }
}

fn jsonl(lines: &[Value]) -> Bytes {
    let mut out = String::new();
    for l in lines {
        out.push_str(&l.to_string());
        out.push('\n');
    }
    Bytes::from(out)
}

// ---------------------------------------------------------------------------------------------
// HTTP

struct Answer {
    status: u16,
    content_type: &'static str,
    body: Bytes,
}

impl Answer {
    fn json(status: u16, body: &Value) -> Answer {
        Answer {
            status,
            content_type: "application/json",
            body: Bytes::from(body.to_string()),
        }
    }

    fn raw(content_type: &'static str, body: Bytes) -> Answer {
        Answer {
            status: 200,
            content_type,
            body,
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let recorded = Recorded {
        method,
        path,
        headers,
        body: if body.len() <= 8 << 20 {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        } else {
            Value::Null
        },
    };
    state.inner.lock().unwrap().recorded.push(recorded.clone());
    let (answer, hold) = route(&state, &recorded, &query, &body);
    if hold {
        let mut released = state.release.subscribe();
        let _ = released.wait_for(|r| *r).await;
    }
    Ok(Response::builder()
        .status(answer.status)
        .header("content-type", answer.content_type)
        .body(Full::new(answer.body))
        .expect("a valid response"))
}

/// The answer, and whether to hold it until creates are released.
fn route(
    state: &State,
    req: &Recorded,
    query: &[(String, String)],
    body: &Bytes,
) -> (Answer, bool) {
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    match state.api() {
        Api::OpenAi => {
            let bearer = req
                .header("authorization")
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|k| !k.trim().is_empty());
            if !bearer {
                return (
                    state.error(401, "missing or malformed Authorization: Bearer header"),
                    false,
                );
            }
            let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
            match (req.method.as_str(), segs.as_slice()) {
                ("POST", ["v1", "files"]) => (upload(state, req, body), false),
                ("GET", ["v1", "files", id]) => {
                    let inner = state.inner.lock().unwrap();
                    match inner.files.get(*id) {
                        Some(f) => (Answer::json(200, &State::file_json(f)), false),
                        None => (state.error(404, &format!("no such file: {id}")), false),
                    }
                }
                ("GET", ["v1", "files", id, "content"]) => {
                    let inner = state.inner.lock().unwrap();
                    match inner.files.get(*id) {
                        Some(f) => (
                            Answer::raw("application/octet-stream", f.bytes.clone()),
                            false,
                        ),
                        None => (state.error(404, &format!("no such file: {id}")), false),
                    }
                }
                ("DELETE", ["v1", "files", id]) => {
                    let mut inner = state.inner.lock().unwrap();
                    match inner.files.remove(*id) {
                        Some(_) => (
                            Answer::json(
                                200,
                                &json!({"id": id, "object": "file", "deleted": true}),
                            ),
                            false,
                        ),
                        None => (state.error(404, &format!("no such file: {id}")), false),
                    }
                }
                ("POST", ["v1", "batches"]) => {
                    let answer = openai_create(state, &req.body);
                    let hold = answer.status == 200;
                    (answer, hold)
                }
                ("GET", ["v1", "batches"]) => (list(state, q("limit"), q("after"), None), false),
                ("GET", ["v1", "batches", id]) => (poll(state, id), false),
                ("POST", ["v1", "batches", id, "cancel"]) => (cancel(state, id), false),
                _ => (state.error(404, "no such route"), false),
            }
        }
        Api::Anthropic => {
            if req.header("x-api-key").is_none_or(|k| k.trim().is_empty()) {
                return (state.error(401, "x-api-key header is required"), false);
            }
            if req
                .header("anthropic-version")
                .is_none_or(|k| k.trim().is_empty())
            {
                return (
                    state.error(400, "anthropic-version header is required"),
                    false,
                );
            }
            let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
            match (req.method.as_str(), segs.as_slice()) {
                ("POST", ["v1", "messages", "batches"]) => {
                    let answer = anthropic_create(state, &req.body, body.len());
                    let hold = answer.status == 200;
                    (answer, hold)
                }
                ("GET", ["v1", "messages", "batches"]) => (
                    list(state, q("limit"), q("after_id"), q("before_id")),
                    false,
                ),
                ("GET", ["v1", "messages", "batches", id]) => (poll(state, id), false),
                ("POST", ["v1", "messages", "batches", id, "cancel"]) => (cancel(state, id), false),
                ("GET", ["v1", "messages", "batches", id, "results"]) => {
                    let mut inner = state.inner.lock().unwrap();
                    let Some(i) = inner.batches.iter().position(|b| b.id == *id) else {
                        return (state.error(404, &format!("no such batch: {id}")), false);
                    };
                    state.tick(&mut inner, i);
                    match &inner.batches[i].results {
                        Some(r) => (Answer::raw("application/binary", r.clone()), false),
                        None => (
                            state.error(400, &format!("batch {id} has not ended: no results yet")),
                            false,
                        ),
                    }
                }
                _ => (state.error(404, "no such route"), false),
            }
        }
    }
}

/// `multipart/form-data` fields: name, filename, content.
fn multipart(
    content_type: &str,
    body: &[u8],
) -> Result<Vec<(String, Option<String>, Bytes)>, String> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or("not multipart/form-data with a boundary")?;
    if !content_type.trim_start().starts_with("multipart/form-data") {
        return Err("not multipart/form-data".into());
    }
    let delim = format!("--{boundary}");
    let next_delim = format!("\r\n--{boundary}");
    let mut at =
        memchr::memmem::find(body, delim.as_bytes()).ok_or("no multipart boundary")? + delim.len();
    let mut parts = Vec::new();
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        let rest = rest
            .strip_prefix(b"\r\n")
            .ok_or("malformed multipart boundary line")?;
        let head_end =
            memchr::memmem::find(rest, b"\r\n\r\n").ok_or("multipart part without headers end")?;
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let content_start = at + 2 + head_end + 4;
        let content_len = memchr::memmem::find(&body[content_start..], next_delim.as_bytes())
            .ok_or("multipart part without a closing boundary")?;
        let disposition = head
            .split("\r\n")
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .ok_or("multipart part without Content-Disposition")?;
        let param = |key: &str| {
            disposition.split(';').map(str::trim).find_map(|p| {
                p.strip_prefix(key)
                    .and_then(|v| v.strip_prefix('='))
                    .map(|v| v.trim_matches('"').to_string())
            })
        };
        let name = param("name").ok_or("multipart part without a name")?;
        parts.push((
            name,
            param("filename"),
            Bytes::copy_from_slice(&body[content_start..content_start + content_len]),
        ));
        at = content_start + content_len + next_delim.len();
    }
}

/// Checks a chat-completions body; the reason when it is not one.
fn check_chat_body(body: &Value) -> Result<(), String> {
    if !body.is_object() {
        return Err("body is not an object".into());
    }
    if !body["model"].is_string() {
        return Err("body.model is not a string".into());
    }
    let Some(messages) = body["messages"].as_array().filter(|m| !m.is_empty()) else {
        return Err("body.messages is not a non-empty array".into());
    };
    for (j, m) in messages.iter().enumerate() {
        if !m["role"].is_string() || !(m["content"].is_string() || m["content"].is_array()) {
            return Err(format!("body.messages[{j}] has no role or content"));
        }
    }
    if body["stream"] == json!(true) {
        return Err("body.stream is not supported in a batch".into());
    }
    Ok(())
}

/// `POST /v1/files`: stores a batch input file after checking every line.
fn upload(state: &State, req: &Recorded, body: &Bytes) -> Answer {
    let content_type = req.header("content-type").unwrap_or("");
    let fields = match multipart(content_type, body) {
        Ok(f) => f,
        Err(e) => return state.error(400, &format!("bad upload: {e}")),
    };
    let field = |n: &str| fields.iter().find(|(name, _, _)| name == n);
    let Some((_, _, purpose)) = field("purpose") else {
        return state.error(400, "missing field purpose");
    };
    if purpose.as_ref() != b"batch" {
        return state.error(400, "this server takes only purpose=batch");
    }
    let Some((_, filename, content)) = field("file") else {
        return state.error(400, "missing field file");
    };
    if content.len() > state.max_bytes() {
        return state.error(
            400,
            &format!(
                "file is {} bytes, over the limit of {} bytes",
                content.len(),
                state.max_bytes()
            ),
        );
    }
    let Ok(text) = std::str::from_utf8(content) else {
        return state.error(400, "file is not UTF-8");
    };
    let mut lines = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() {
        return state.error(400, "file has no requests");
    }
    for (n, raw) in text.split('\n').enumerate() {
        let n = n + 1;
        if lines.len() >= state.max_lines() {
            return state.error(
                400,
                &format!(
                    "file has more than {} requests (line {n})",
                    state.max_lines()
                ),
            );
        }
        let line: Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => return state.error(400, &format!("line {n}: not JSON: {e}")),
        };
        let Some(custom_id) = line["custom_id"].as_str().filter(|c| !c.is_empty()) else {
            return state.error(
                400,
                &format!("line {n}: custom_id is not a non-empty string"),
            );
        };
        if let Some(first) = first_line.insert(custom_id.to_string(), n) {
            return state.error(
                400,
                &format!("line {n}: duplicate custom_id {custom_id:?} (also on line {first})"),
            );
        }
        if line["method"] != "POST" {
            return state.error(400, &format!("line {n}: method must be POST"));
        }
        if line["url"] != "/v1/chat/completions" {
            return state.error(400, &format!("line {n}: url must be /v1/chat/completions"));
        }
        if let Err(e) = check_chat_body(&line["body"]) {
            return state.error(400, &format!("line {n}: {e}"));
        }
        lines.push(Line {
            custom_id: custom_id.to_string(),
            body: line["body"].clone(),
            fate: Fate::Succeed,
        });
    }
    let mut inner = state.inner.lock().unwrap();
    let id = format!("file-test{:08}", inner.next());
    let file = File {
        id: id.clone(),
        purpose: "batch".into(),
        filename: filename.clone().unwrap_or_else(|| "upload.jsonl".into()),
        bytes: content.clone(),
        created_at: now_unix(),
        lines,
    };
    let answer = Answer::json(200, &State::file_json(&file));
    inner.files.insert(id, file);
    answer
}

/// `POST /v1/batches`.
fn openai_create(state: &State, body: &Value) -> Answer {
    let Some(file_id) = body["input_file_id"].as_str() else {
        return state.error(400, "input_file_id is required");
    };
    if body["endpoint"] != "/v1/chat/completions" {
        return state.error(400, "endpoint must be /v1/chat/completions");
    }
    if body["completion_window"] != "24h" {
        return state.error(400, "completion_window must be 24h");
    }
    let mut metadata = BTreeMap::new();
    match &body["metadata"] {
        Value::Null => {}
        Value::Object(map) => {
            if map.len() > 16 {
                return state.error(400, "metadata has more than 16 keys");
            }
            for (k, v) in map {
                let Some(v) = v.as_str() else {
                    return state.error(400, &format!("metadata.{k} is not a string"));
                };
                if k.chars().count() > 64 || v.chars().count() > 512 {
                    return state.error(
                        400,
                        &format!("metadata.{k}: key over 64 or value over 512 characters"),
                    );
                }
                metadata.insert(k.clone(), v.to_string());
            }
        }
        _ => return state.error(400, "metadata is not an object"),
    }
    let mut inner = state.inner.lock().unwrap();
    let lines = match inner.files.get(file_id) {
        Some(f) if f.purpose == "batch" => f.lines.clone(),
        Some(_) => return state.error(400, &format!("file {file_id} is not a batch input file")),
        None => return state.error(404, &format!("no such file: {file_id}")),
    };
    inner.creates += 1;
    let nth = inner.creates;
    let i = state.create(
        &mut inner,
        nth,
        lines,
        metadata,
        file_id.to_string(),
        "24h".into(),
    );
    Answer::json(200, &state.batch_json(&inner.batches[i]))
}

/// `POST /v1/messages/batches`.
fn anthropic_create(state: &State, body: &Value, len: usize) -> Answer {
    if len > state.max_bytes() {
        return state.error(
            413,
            &format!(
                "request is {len} bytes, over the limit of {} bytes",
                state.max_bytes()
            ),
        );
    }
    let Some(map) = body.as_object() else {
        return state.error(400, "body is not a JSON object");
    };
    if let Some(k) = map.keys().find(|k| *k != "requests") {
        return state.error(400, &format!("{k}: Extra inputs are not permitted"));
    }
    let Some(requests) = body["requests"].as_array().filter(|r| !r.is_empty()) else {
        return state.error(400, "requests: must be a non-empty array");
    };
    if requests.len() > state.max_lines() {
        return state.error(
            400,
            &format!("requests: more than {} requests", state.max_lines()),
        );
    }
    let mut seen: HashSet<&str> = HashSet::new();
    let mut lines = Vec::with_capacity(requests.len());
    for (j, r) in requests.iter().enumerate() {
        let Some(fields) = r.as_object() else {
            return state.error(400, &format!("requests.{j}: not an object"));
        };
        if let Some(k) = fields.keys().find(|k| *k != "custom_id" && *k != "params") {
            return state.error(
                400,
                &format!("requests.{j}.{k}: Extra inputs are not permitted"),
            );
        }
        let Some(custom_id) = r["custom_id"].as_str() else {
            return state.error(400, &format!("requests.{j}.custom_id: not a string"));
        };
        let valid = (1..=64).contains(&custom_id.len())
            && custom_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return state.error(
                400,
                &format!(
                    "requests.{j}.custom_id: {custom_id:?} does not match ^[a-zA-Z0-9_-]{{1,64}}$"
                ),
            );
        }
        if !seen.insert(custom_id) {
            return state.error(
                400,
                &format!("requests.{j}.custom_id: duplicate {custom_id:?}"),
            );
        }
        let params = &r["params"];
        if !params["model"].is_string() {
            return state.error(400, &format!("requests.{j}.params.model: not a string"));
        }
        if params["max_tokens"].as_u64().is_none_or(|n| n == 0) {
            return state.error(
                400,
                &format!("requests.{j}.params.max_tokens: not a positive integer"),
            );
        }
        let messages_ok = params["messages"].as_array().is_some_and(|m| {
            !m.is_empty()
                && m.iter().all(|m| {
                    m["role"].is_string() && (m["content"].is_string() || m["content"].is_array())
                })
        });
        if !messages_ok {
            return state.error(
                400,
                &format!("requests.{j}.params.messages: not a non-empty array of messages"),
            );
        }
        lines.push(Line {
            custom_id: custom_id.to_string(),
            body: params.clone(),
            fate: Fate::Succeed,
        });
    }
    let mut inner = state.inner.lock().unwrap();
    inner.creates += 1;
    let nth = inner.creates;
    if state.config.fail_validation.contains(&nth) {
        return state.error(400, &format!("{INJECTED_BATCH}: validation failed"));
    }
    let i = state.create(
        &mut inner,
        nth,
        lines,
        BTreeMap::new(),
        String::new(),
        String::new(),
    );
    Answer::json(200, &state.batch_json(&inner.batches[i]))
}

/// `GET .../batches/{id}`: a status poll, which may be answered 5xx, else advances the batch.
fn poll(state: &State, id: &str) -> Answer {
    let mut inner = state.inner.lock().unwrap();
    inner.polls += 1;
    let Some(i) = inner.batches.iter().position(|b| b.id == id) else {
        return state.error(404, &format!("no such batch: {id}"));
    };
    if let Some(k) = state.config.poll_5xx_one_in {
        let fail = !inner.batches[i].last_poll_failed && inner.rng.random_range(0..k) == 0;
        inner.batches[i].last_poll_failed = fail;
        if fail {
            inner.polls_failed += 1;
            let status = if inner.rng.random_bool(0.5) { 500 } else { 503 };
            return state.error(status, &format!("{INJECTED_BATCH}: {status} while polling"));
        }
    }
    if state.config.step.is_zero() {
        state.advance(&mut inner, i);
    } else {
        state.tick(&mut inner, i);
    }
    Answer::json(200, &state.batch_json(&inner.batches[i]))
}

/// `POST .../batches/{id}/cancel`.
fn cancel(state: &State, id: &str) -> Answer {
    let mut inner = state.inner.lock().unwrap();
    let Some(i) = inner.batches.iter().position(|b| b.id == id) else {
        return state.error(404, &format!("no such batch: {id}"));
    };
    state.tick(&mut inner, i);
    let b = &mut inner.batches[i];
    let cancelling = match state.api() {
        Api::OpenAi => "cancelling",
        Api::Anthropic => "canceling",
    };
    match b.status {
        "validating" | "in_progress" => {
            b.processed_before_cancel = if b.status == "in_progress" {
                b.lines.len() / 2
            } else {
                0
            };
            b.status = cancelling;
            b.entered = Instant::now();
            b.times.insert("cancelling_at", now_unix());
            inner.cancels += 1;
        }
        "cancelling" | "canceling" | "cancelled" => {}
        other => {
            return state.error(
                400,
                &format!("batch {id} is {other} and cannot be cancelled"),
            );
        }
    }
    Answer::json(200, &state.batch_json(&inner.batches[i]))
}

/// `GET .../batches`: newest first, `limit` per page, after (older than) or before (newer
/// than) a batch id.
fn list(state: &State, limit: Option<&str>, after: Option<&str>, before: Option<&str>) -> Answer {
    let max = match state.api() {
        Api::OpenAi => 100,
        Api::Anthropic => 1000,
    };
    let limit = match limit.map(str::parse::<usize>) {
        None => 20,
        Some(Ok(n)) if (1..=max).contains(&n) => n,
        Some(_) => return state.error(400, &format!("limit must be an integer from 1 to {max}")),
    };
    let mut inner = state.inner.lock().unwrap();
    for i in 0..inner.batches.len() {
        state.tick(&mut inner, i);
    }
    let newest_first: Vec<&Batch> = inner.batches.iter().rev().collect();
    let position = |id: &str| newest_first.iter().position(|b| b.id == id);
    let (page, has_more) = match (after, before) {
        (Some(_), Some(_)) => return state.error(400, "give after_id or before_id, not both"),
        (Some(id), None) => {
            let Some(p) = position(id) else {
                return state.error(400, &format!("no such batch: {id}"));
            };
            let rest = &newest_first[p + 1..];
            (&rest[..limit.min(rest.len())], rest.len() > limit)
        }
        (None, Some(id)) => {
            let Some(p) = position(id) else {
                return state.error(400, &format!("no such batch: {id}"));
            };
            let rest = &newest_first[..p];
            let start = rest.len().saturating_sub(limit);
            (&rest[start..], start > 0)
        }
        (None, None) => (
            &newest_first[..limit.min(newest_first.len())],
            newest_first.len() > limit,
        ),
    };
    let data: Vec<Value> = page.iter().map(|b| state.batch_json(b)).collect();
    let mut out = Map::new();
    if state.api() == Api::OpenAi {
        out.insert("object".into(), json!("list"));
    }
    out.insert("data".into(), json!(data));
    out.insert("first_id".into(), json!(page.first().map(|b| &b.id)));
    out.insert("last_id".into(), json!(page.last().map(|b| &b.id)));
    out.insert("has_more".into(), json!(has_more));
    Answer::json(200, &Value::Object(out))
}
