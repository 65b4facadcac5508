//! The one loopback server of the tests and of `benches/throughput.rs`: OpenAI-compatible chat
//! completions and Anthropic Messages online, and the providers' batch APIs (OpenAI Batch, or
//! Anthropic Message Batches).
//!
//! **Online**, `POST .../chat/completions` and `POST .../messages` are answered as
//! `rmboost::testing::FakeBackend` answers: the text is derived from the request's `seed` (an
//! Anthropic request has none: a stable hash of its body stands for it), and a request with a
//! message mentioning `</response>` (a second-response request) is answered inside `<response>`
//! tags; usage is counted as the fake counts it (a token per 4 bytes). [`Config`] adds, in this
//! order: one status for every request; 400 for a seeded share of first-response requests; 429
//! at once to a request that arrives while more than `cap` are in flight; a token bucket (429
//! with `Retry-After` when empty); seeded random [`Fault`]s (429 with `Retry-After`, 500 and
//! 503 at once, a dropped connection, a hang; a torn body or empty content after the latency);
//! then the latency, measured from the request's arrival on a timer thread with
//! sub-millisecond precision (tokio's 1 ms timer would add 1-3% to it). Or `replies`: a script
//! of canned answers to any request, in order, the last one repeated.
//!
//! **Batch APIs** (`batch: Some(api)`, one API per server): answers are the online ones, so a
//! batch run and an online run with the same run seed can be compared. Batches move through
//! their states on each status poll (`GET .../batches/{id}`), or after each `step` of wall
//! time: OpenAI `validating → in_progress → finalizing → completed` (or `failed`, `expired`),
//! Anthropic `in_progress → ended`. A cancel moves to `cancelling`/`canceling`, then
//! `cancelled`/`ended`: if the batch was in progress, the first half of its lines (in
//! submission order) count as processed, the rest as canceled. Result lines come back in a
//! seeded shuffled order. Faults: a failed validation, errored and expired lines (on a
//! custom_id's first submission only, so a resubmission succeeds), a batch whose every line
//! fails, 5xx answers to status polls, and create answers held until the test releases them.
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
//! It binds 127.0.0.1 on a free port and serves keep-alive HTTP/1.1 (hyper) from threads and a
//! tokio runtime of its own (named `test-server`), so synchronous tests (that run the `rmboost`
//! binary), async tests and benches alike can use it; it counts and records every request, and
//! stops when dropped.
//!
//! ```ignore
//! let server = Server::with(Config { latency: Duration::from_millis(20), ..Config::default() });
//! // rmboost generate ... --backend openai --base-url <server.base_url()> --model test
//! assert!(server.requests() > 0);
//! let batches = Server::with(Config { errored_one_in: Some(5), ..Config::batch(Api::OpenAi) });
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
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

/// The text of every injected fault's error body; no output row may contain it.
pub const INJECTED_HTTP: &str = "injected http fault";

/// The message of the 400 answers of [`Config::reject_first_one_in`]; no output row may
/// contain it.
pub const REJECTED: &str = "rejected by the test server";

/// The message of every injected line error and validation failure of the batch APIs; no
/// output row may contain it.
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

/// A random fault of the online endpoints (see [`Config::fault_rate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 429 with `Retry-After: <retry_after_secs>`, at once.
    TooMany,
    /// 500, at once.
    Internal,
    /// 503, at once.
    Unavailable,
    /// The connection is closed without an answer once the request is read.
    Drop,
    /// 200 after the latency, with a body cut short: `{"choices": [ {"message": `.
    Torn,
    /// 200 after the latency, a valid completion whose content is `""`.
    Empty,
    /// No answer for `hang`, then (the latency having passed) a normal one.
    Hang,
}

/// Every fault kind, in the order of [`Fault`]'s discriminants.
pub const FAULTS: [Fault; 7] = [
    Fault::TooMany,
    Fault::Internal,
    Fault::Unavailable,
    Fault::Drop,
    Fault::Torn,
    Fault::Empty,
    Fault::Hang,
];

impl Fault {
    pub fn name(self) -> &'static str {
        ["429", "500", "503", "drop", "torn", "empty", "hang"][self as usize]
    }
}

/// How a server answers. [`Server::set`] changes the online settings of a running server; the
/// batch settings, `filler` and `threads` are read when it starts.
#[derive(Debug, Clone)]
pub struct Config {
    /// Online answers wait this long from the request's arrival.
    pub latency: Duration,
    /// Each latency is spread evenly over `latency` plus or minus this many percent of it
    /// (drawn from the request's number, so the mean stays `latency`).
    pub jitter_pct: u64,
    /// Length in bytes of the filler of good answers (default 40, as `FakeBackend::new`).
    pub filler: usize,
    /// Every online request is answered with this status and an error body carrying this
    /// message (e.g. 401 for a bad key).
    pub fail_every: Option<(u16, String)>,
    /// A first-response request whose seed is a multiple of this is rejected with 400
    /// ([`REJECTED`]): a permanent, non-fatal failure of about one example in `n`.
    pub reject_first_one_in: Option<u64>,
    /// 429 at once (no `Retry-After`) to a request arriving while more than this many are in
    /// flight (0: no limit).
    pub cap: u64,
    /// A token bucket: (requests a minute, burst), refilled continuously, full at the start; a
    /// request that finds less than one token gets 429 with `Retry-After`.
    pub bucket: Option<(u64, u64)>,
    /// The share of online requests (that pass the cap and the bucket) given a fault, drawn
    /// evenly from `fault_kinds` by a generator seeded with `fault_seed`.
    pub fault_rate: f64,
    pub fault_kinds: Vec<Fault>,
    pub fault_seed: u64,
    /// How long a [`Fault::Hang`] lasts (default 1.5 s: make it longer than the client's
    /// timeout).
    pub hang: Duration,
    /// The `Retry-After` of [`Fault::TooMany`], in seconds (default 0).
    pub retry_after_secs: u64,
    /// Every connection is dropped unanswered, as a killed replica's are.
    pub down: bool,
    /// Every request is recorded ([`Server::recorded`]; default on).
    pub record: bool,
    /// The model name of online answers carries when the request arrived and when the answer
    /// was made: `<model>@<ns>@<ns>` on the clock of [`since_epoch`].
    pub stamp: bool,
    /// Worker threads of the server's runtime (default 1).
    pub threads: usize,
    /// Canned answers to every request (any method and path), in order, the last repeated.
    pub replies: Vec<Reply>,
    /// The batch API to serve (`None`: online only).
    pub batch: Option<Api>,
    /// Batches advance one state per `step` of wall time instead of one per status poll (zero,
    /// the default).
    pub step: Duration,
    /// Seeds the order of result lines, the choice of errored and expired lines and of the
    /// polls answered 5xx (default 1).
    pub seed: u64,
    /// These create requests (1-based) fail validation: OpenAI's batch goes `validating →
    /// failed` with `errors`; Anthropic's create is answered 400 and creates nothing.
    pub fail_validation: Vec<u64>,
    /// About one line in `k` errors (chosen from the seed and its custom_id), only on the
    /// custom_id's first submission.
    pub errored_one_in: Option<u64>,
    /// About one line in `k` expires, only on the custom_id's first submission; an OpenAI
    /// batch with an expired line ends `expired`.
    pub expired_one_in: Option<u64>,
    /// Every line of these create requests' batches (1-based) errors: OpenAI's completes with
    /// no output file, Anthropic's ends with every result errored.
    pub all_fail: Vec<u64>,
    /// About one status poll in `k` (seeded) is answered 500 or 503 without advancing the
    /// batch; the next poll of the same batch never is.
    pub poll_5xx_one_in: Option<u64>,
    /// Each create request is recorded (the batch exists, listed and counted), then its answer
    /// is held until [`Server::release_creates`].
    pub hold_creates: bool,
    /// The most lines of an OpenAI input file or requests of an Anthropic batch (default the
    /// API's: 50,000 / 100,000).
    pub max_lines: Option<usize>,
    /// The most bytes of an OpenAI input file or of an Anthropic create body (default the
    /// API's: 200 MB / 256 MB).
    pub max_bytes: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            latency: Duration::ZERO,
            jitter_pct: 0,
            filler: 40,
            fail_every: None,
            reject_first_one_in: None,
            cap: 0,
            bucket: None,
            fault_rate: 0.0,
            fault_kinds: FAULTS.to_vec(),
            fault_seed: 1,
            hang: Duration::from_millis(1500),
            retry_after_secs: 0,
            down: false,
            record: true,
            stamp: false,
            threads: 1,
            replies: Vec::new(),
            batch: None,
            step: Duration::ZERO,
            seed: 1,
            fail_validation: Vec::new(),
            errored_one_in: None,
            expired_one_in: None,
            all_fail: Vec::new(),
            poll_5xx_one_in: None,
            hold_creates: false,
            max_lines: None,
            max_bytes: None,
        }
    }
}

impl Config {
    /// A server of the batch API `api`, with no faults, one state per poll.
    pub fn batch(api: Api) -> Config {
        Config {
            batch: Some(api),
            ..Config::default()
        }
    }
}

/// An answer: status, headers, body, and how long to wait before sending it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub delay: Duration,
}

impl Reply {
    pub fn bytes(status: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn json(status: u16, body: &Value) -> Reply {
        Reply::bytes(status, "application/json", body.to_string())
    }

    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply::bytes(status, "text/plain", body.into())
    }

    pub fn header(mut self, name: &str, value: impl ToString) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    /// The JSON body (`Null` when it is not JSON, and for bodies over 8 MiB).
    pub body: Value,
}

impl Recorded {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A reading of the online counters ([`Server::counts`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// Every request that reached the server (not `down`), whatever its answer.
    pub requests: u64,
    /// Online answers 200 after the latency (torn and empty answers included).
    pub answered: u64,
    /// Answers of `fail_every`, `reject_first_one_in` and `replies`.
    pub scripted: u64,
    /// 429s for the cap on requests in flight.
    pub cap_429: u64,
    /// 429s for the token bucket.
    pub bucket_429: u64,
    /// Random faults by kind (index: `Fault as usize`).
    pub faults: [u64; FAULTS.len()],
    /// Sum of the delays of the answered requests (from arrival to answer), in nanoseconds.
    pub delay_ns: u64,
    /// Connections accepted.
    pub connections: u64,
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
pub struct Server {
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Server {
    /// A server that answers every online request at once, as `FakeBackend::new()` does.
    pub fn start() -> Server {
        Server::with(Config::default())
    }

    /// A server answering every request with `replies`, in order, the last one repeated.
    pub fn replying(replies: Vec<Reply>) -> Server {
        Server::with(Config {
            replies,
            ..Config::default()
        })
    }

    /// Binds 127.0.0.1 on a free port and starts serving on threads of its own.
    pub fn with(config: Config) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let (release, _) = tokio::sync::watch::channel(!config.hold_creates);
        let threads = config.threads.max(1);
        let state = Arc::new(State {
            addr,
            fake: FakeBackend::with_response_len(config.filler),
            live: Mutex::new(Live::new(config.clone())),
            recorded: Mutex::new(Vec::new()),
            in_flight: Default::default(),
            inner: Mutex::new(Inner {
                rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed_ba7c),
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
            }),
            release,
            config,
        });
        let (shutdown, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let s = state.clone();
        let thread = std::thread::Builder::new()
            .name("test-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name("test-server")
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
                                let _ = tcp.set_nodelay(true);
                                s.live().counts.connections += 1;
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
        Server {
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    /// The base URL (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.uri())
    }

    /// Changes the online settings; the fault generator is seeded anew and the token bucket
    /// starts full.
    pub fn set(&self, change: impl FnOnce(&mut Config)) {
        let mut live = self.state.live();
        let mut config = live.config.clone();
        change(&mut config);
        let counts = live.counts;
        *live = Live::new(config);
        live.counts = counts;
    }

    /// The online counters.
    pub fn counts(&self) -> Counts {
        self.state.live().counts
    }

    /// Requests received.
    pub fn requests(&self) -> u64 {
        self.counts().requests
    }

    /// Every request recorded so far, in arrival order.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.recorded.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests have arrived; false after `timeout`.
    pub fn wait_for_requests(&self, n: u64, timeout: Duration) -> bool {
        wait(timeout, || self.requests() >= n)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
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

    /// Status polls answered 500 or 503 by [`Config::poll_5xx_one_in`].
    pub fn polls_failed(&self) -> u64 {
        self.inner().polls_failed
    }

    /// Cancel requests that moved a batch to cancelling/canceling.
    pub fn cancels(&self) -> u64 {
        self.inner().cancels
    }

    /// Waits until at least `n` batches were created; false after `timeout`.
    pub fn wait_for_batches(&self, n: u64, timeout: Duration) -> bool {
        wait(timeout, || self.batches_created() >= n)
    }

    /// Answers every create held by [`Config::hold_creates`], and every later one at once.
    pub fn release_creates(&self) {
        self.state.release.send_replace(true);
    }
}

/// Polls `done` every 5 ms; false if it is still false after `timeout`.
fn wait(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Online answers

/// What [`Server::set`] changes, and the counters of the online answers.
struct Live {
    config: Config,
    rng: ChaCha8Rng,
    bucket: Option<TokenBucket>,
    next_reply: usize,
    jitter_seq: u64,
    counts: Counts,
}

impl Live {
    fn new(config: Config) -> Live {
        Live {
            rng: ChaCha8Rng::seed_from_u64(config.fault_seed),
            bucket: config.bucket.map(|(per_minute, burst)| TokenBucket {
                per_sec: per_minute as f64 / 60.0,
                capacity: burst.max(1) as f64,
                tokens: burst.max(1) as f64,
                last: Instant::now(),
            }),
            config,
            next_reply: 0,
            jitter_seq: 0,
            counts: Counts::default(),
        }
    }

    /// The latency of the next answer, spread by the jitter.
    fn latency(&mut self) -> Duration {
        let (latency, jitter) = (self.config.latency, self.config.jitter_pct);
        if latency.is_zero() || jitter == 0 {
            return latency;
        }
        // splitmix64 of the request's number: a spread that is the same in every run.
        self.jitter_seq += 1;
        let mut x = self.jitter_seq.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        let u = (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        latency.mul_f64(1.0 + u * jitter as f64 / 100.0)
    }
}

/// A token bucket refilled continuously, as hosted providers limit requests per minute.
struct TokenBucket {
    per_sec: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Takes a token, or says in how many whole seconds (at least 1) one will be there.
    fn take(&mut self, now: Instant) -> Result<(), u64> {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + refill).min(self.capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - self.tokens) / self.per_sec).ceil() as u64).max(1))
        }
    }
}

/// Nanoseconds from the process's first call of this function: the server stamps its answers
/// with when the request arrived and when the answer left, on the clock the client reads.
pub fn since_epoch(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| Instant::now() - Duration::from_secs(1));
    t.saturating_duration_since(epoch).as_nanos() as u64
}

/// Sleeps until `at` with sub-millisecond precision: tokio's timer has a 1 ms resolution and
/// rounds deadlines up, so `sleep(50 ms)` takes about 50.5 to 51.5 ms. One thread of the
/// process keeps the pending deadlines in a heap and waits on a channel with a timeout until
/// the earliest one (the kernel's timer slack is about 50 us), then wakes its caller.
async fn sleep_until(at: Instant) {
    type Waker = futures::channel::oneshot::Sender<()>;
    static TIMER: OnceLock<std::sync::mpsc::Sender<(Instant, Waker)>> = OnceLock::new();
    let timer = TIMER.get_or_init(|| {
        use std::cmp::Reverse;
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, Waker)>();
        std::thread::Builder::new()
            .name("test-server-timer".into())
            .spawn(move || {
                let mut heap = std::collections::BinaryHeap::new();
                let mut wakers = HashMap::new();
                for seq in 0u64.. {
                    let now = Instant::now();
                    while let Some(&Reverse((at, id))) = heap.peek() {
                        if at > now {
                            break;
                        }
                        heap.pop();
                        if let Some(w) = wakers.remove(&id) {
                            let _ = Waker::send(w, ());
                        }
                    }
                    let next = match heap.peek() {
                        Some(&Reverse((at, _))) => rx.recv_timeout(at - now).ok(),
                        None => rx.recv().ok(),
                    };
                    if let Some((at, waker)) = next {
                        heap.push(Reverse((at, seq)));
                        wakers.insert(seq, waker);
                    }
                }
            })
            .expect("the test server's timer thread");
        tx
    });
    let (waker, done) = futures::channel::oneshot::channel();
    if timer.send((at, waker)).is_ok() {
        let _ = done.await;
    }
}

/// An error of the service: hyper closes the connection without an answer.
type Dropped = Box<dyn std::error::Error + Send + Sync>;

/// Leaves the in-flight count when the answer is made.
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    use std::sync::atomic::Ordering::SeqCst;
    let arrived = Instant::now();
    {
        let mut live = state.live();
        if live.config.down {
            return Err("the server is down".into());
        }
        live.counts.requests += 1;
    }
    let in_flight = state.in_flight.fetch_add(1, SeqCst) + 1;
    let _leave = InFlight(&state.in_flight);
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
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (n.as_str().to_ascii_lowercase(), v)
            })
            .collect(),
        body: if body.len() <= 8 << 20 {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        } else {
            Value::Null
        },
    };
    let scripted = {
        let mut live = state.live();
        if live.config.record {
            state.recorded.lock().unwrap().push(request.clone());
        }
        let n = live.next_reply;
        live.next_reply += 1;
        let reply = live
            .config
            .replies
            .get(n)
            .or(live.config.replies.last())
            .cloned();
        live.counts.scripted += u64::from(reply.is_some());
        reply
    };
    let reply = if let Some(reply) = scripted {
        tokio::time::sleep(reply.delay).await;
        reply
    } else if request.path.ends_with("/chat/completions") || request.path.ends_with("/messages") {
        online(&state, &request, arrived, in_flight)
            .await
            .ok_or("a dropped connection (injected fault)")?
    } else {
        let (reply, hold) = route(&state, &request, &query, &body);
        if hold {
            let mut released = state.release.subscribe();
            let _ = released.wait_for(|r| *r).await;
        }
        reply
    };
    let mut response = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        response = response.header(name, value);
    }
    Ok(response
        .body(Full::new(reply.body))
        .expect("a valid response"))
}

/// The answer to an online request; `None` drops the connection.
async fn online(state: &State, req: &Recorded, arrived: Instant, in_flight: u64) -> Option<Reply> {
    let body = &req.body;
    let (fault, latency, hang, retry_after, stamp) = {
        let mut guard = state.live();
        let live = &mut *guard;
        let (c, counts) = (&live.config, &mut live.counts);
        if let Some((status, message)) = &c.fail_every {
            counts.scripted += 1;
            return Some(state.error(*status, message));
        }
        let seed = body["seed"].as_u64().unwrap_or(0);
        if c.reject_first_one_in
            .is_some_and(|n| !is_second(body) && seed.is_multiple_of(n))
        {
            counts.scripted += 1;
            return Some(state.error(400, REJECTED));
        }
        if c.cap > 0 && in_flight > c.cap {
            counts.cap_429 += 1;
            return Some(state.error(429, "too many requests in flight"));
        }
        if let Some(Err(wait)) = live.bucket.as_mut().map(|b| b.take(Instant::now())) {
            counts.bucket_429 += 1;
            let message = "rate limit reached for requests per minute (RPM)";
            return Some(state.error(429, message).header("retry-after", wait));
        }
        let fault = (c.fault_rate > 0.0 && live.rng.random_bool(c.fault_rate))
            .then(|| c.fault_kinds[live.rng.random_range(0..c.fault_kinds.len())]);
        if let Some(f) = fault {
            counts.faults[f as usize] += 1;
        }
        let (hang, retry_after, stamp) = (c.hang, c.retry_after_secs, c.stamp);
        (fault, live.latency(), hang, retry_after, stamp)
    };
    let injected = |what: &str| format!("{INJECTED_HTTP}: {what}");
    match fault {
        Some(Fault::TooMany) => {
            let reply = state.error(429, &injected("rate limited"));
            return Some(reply.header("retry-after", retry_after));
        }
        Some(Fault::Internal) => return Some(state.error(500, &injected("500"))),
        Some(Fault::Unavailable) => return Some(state.error(503, &injected("503"))),
        Some(Fault::Drop) => return None,
        Some(Fault::Hang) => tokio::time::sleep(hang).await,
        _ => {}
    }
    if !latency.is_zero() {
        sleep_until(arrived + latency).await;
    }
    let reply = if fault == Some(Fault::Torn) {
        Reply::bytes(200, "application/json", "{\"choices\": [ {\"message\": ")
    } else {
        let anthropic = req.path.ends_with("/messages");
        let text = match (fault, anthropic) {
            (Some(Fault::Empty), _) => String::new(),
            (_, false) => state
                .fake
                .answer(body["seed"].as_u64().unwrap_or(0), is_second(body)),
            (_, true) => state
                .fake
                .answer(anthropic_seed(body), anthropic_is_second(body)),
        };
        let mut json = if anthropic {
            anthropic_message(body, &text, 0)
        } else {
            completion_body(body, &text)
        };
        if stamp {
            let model = json["model"].as_str().unwrap_or("").to_string();
            json["model"] = json!(format!(
                "{model}@{}@{}",
                since_epoch(arrived),
                since_epoch(Instant::now())
            ));
        }
        Reply::json(200, &json)
    };
    let mut live = state.live();
    live.counts.answered += 1;
    live.counts.delay_ns += arrived.elapsed().as_nanos() as u64;
    Some(reply)
}

/// Whether a chat-completions request asks for a second response (a message mentions
/// `</response>`).
pub fn is_second(request: &Value) -> bool {
    messages(request).any(|c| c.contains("</response>"))
}

fn messages(request: &Value) -> impl Iterator<Item = &str> {
    request["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_str())
}

/// The chat completion `fake` gives to this chat-completions request body (text from its
/// `seed`, usage as the fake counts it): the good online answer, and a batch line's.
pub fn fake_completion(fake: &FakeBackend, request: &Value) -> Value {
    let seed = request["seed"].as_u64().unwrap_or(0);
    completion_body(request, &fake.answer(seed, is_second(request)))
}

/// A chat completion of `text` to `request`, with its usage.
fn completion_body(request: &Value, text: &str) -> Value {
    let prompt_len: usize = messages(request).map(str::len).sum();
    let (prompt, completion) = ((prompt_len / 4) as u64, (text.len() / 4) as u64);
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": request["model"].as_str().unwrap_or("test"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Batch APIs

struct State {
    addr: SocketAddr,
    /// As started: the batch settings.
    config: Config,
    fake: FakeBackend,
    live: Mutex<Live>,
    recorded: Mutex<Vec<Recorded>>,
    in_flight: std::sync::atomic::AtomicU64,
    /// The batch API's files and batches.
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
pub fn rfc3339(unix: u64) -> String {
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

/// A Messages API response of `text` to `params`, with its usage.
fn anthropic_message(params: &Value, text: &str, n: u64) -> Value {
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
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap()
    }

    fn api(&self) -> Api {
        self.config.batch.unwrap_or(Api::OpenAi)
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
                        Outcome::Succeeded => {
                            let (seed, second) =
                                (anthropic_seed(&line.body), anthropic_is_second(&line.body));
                            let text = self.fake.answer(seed, second);
                            json!({"type": "succeeded", "message": anthropic_message(&line.body, &text, n)})
                        }
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

    /// An error answer in the shape of the server's API.
    fn error(&self, status: u16, message: &str) -> Reply {
        let body = match self.api() {
            Api::OpenAi => {
                let kind = match status {
                    429 => "rate_limit_exceeded",
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
        Reply::json(status, &body)
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

/// The answer, and whether to hold it until creates are released.
fn route(state: &State, req: &Recorded, query: &[(String, String)], body: &Bytes) -> (Reply, bool) {
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    match state.config.batch {
        None => (state.error(404, "no such route"), false),
        Some(Api::OpenAi) => {
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
                        Some(f) => (Reply::json(200, &State::file_json(f)), false),
                        None => (state.error(404, &format!("no such file: {id}")), false),
                    }
                }
                ("GET", ["v1", "files", id, "content"]) => {
                    let inner = state.inner.lock().unwrap();
                    match inner.files.get(*id) {
                        Some(f) => (
                            Reply::bytes(200, "application/octet-stream", f.bytes.clone()),
                            false,
                        ),
                        None => (state.error(404, &format!("no such file: {id}")), false),
                    }
                }
                ("DELETE", ["v1", "files", id]) => {
                    let mut inner = state.inner.lock().unwrap();
                    match inner.files.remove(*id) {
                        Some(_) => (
                            Reply::json(200, &json!({"id": id, "object": "file", "deleted": true})),
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
        Some(Api::Anthropic) => {
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
                        Some(r) => (Reply::bytes(200, "application/binary", r.clone()), false),
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
fn upload(state: &State, req: &Recorded, body: &Bytes) -> Reply {
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
    let answer = Reply::json(200, &State::file_json(&file));
    inner.files.insert(id, file);
    answer
}

/// `POST /v1/batches`.
fn openai_create(state: &State, body: &Value) -> Reply {
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
    Reply::json(200, &state.batch_json(&inner.batches[i]))
}

/// `POST /v1/messages/batches`.
fn anthropic_create(state: &State, body: &Value, len: usize) -> Reply {
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
    Reply::json(200, &state.batch_json(&inner.batches[i]))
}

/// `GET .../batches/{id}`: a status poll, which may be answered 5xx, else advances the batch.
fn poll(state: &State, id: &str) -> Reply {
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
    Reply::json(200, &state.batch_json(&inner.batches[i]))
}

/// `POST .../batches/{id}/cancel`.
fn cancel(state: &State, id: &str) -> Reply {
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
    Reply::json(200, &state.batch_json(&inner.batches[i]))
}

/// `GET .../batches`: newest first, `limit` per page, after (older than) or before (newer
/// than) a batch id.
fn list(state: &State, limit: Option<&str>, after: Option<&str>, before: Option<&str>) -> Reply {
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
    Reply::json(200, &Value::Object(out))
}
