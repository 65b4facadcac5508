//! End-to-end throughput and memory of a run against a loopback OpenAI-compatible server.
//!
//! With `C` examples in flight and a server latency `L`, an RMBoost run (two calls one after
//! the other per example) cannot go faster than `C / (2 L)` examples per second. This bench
//! measures how close the whole pipeline gets: a JSONL prompt file read with
//! [`rmboost::read_prompts`], [`rmboost::run::run_to_file`] with resume on, [`RmBoost`] over
//! `Cached<Retry<OpenAiBackend>>` (a cold response cache), a JSONL output file.
//!
//! The server runs in this process on its own runtime and threads (named `bench-server`), binds
//! 127.0.0.1 only, speaks keep-alive HTTP/1.1 (hyper), holds each answer until the configured
//! latency has passed since the request arrived (on a timer thread with sub-millisecond
//! precision: tokio's 1 ms timer would add 1-3% to `L`; each point prints the mean delay the
//! server actually served), and answers ~1 KB: a first response, or, for a request with a
//! message that contains `</response>`, a different `<response>...</response>` answer (the
//! fake backend's texts); both with usage.
//!
//! Each throughput point also says where the time of a call slot goes: the mean time from a
//! call's start (as the generator makes it) to the server's handler, the served delay, the
//! time from the answer being made to the call's end (the server stamps both instants into the
//! answer's model name, on the process's clock), and the wall time per call slot
//! (`C * wall / calls`); what the slot has beyond the call is the generator's own time
//! between calls.
//!
//! Modes (default `all`: `server`, then `throughput` at every concurrency, then `memory` at
//! 10,000 and 100,000 prompts, each memory point in a child process):
//!
//! ```text
//! cargo bench --bench throughput --all-features
//! cargo bench --bench throughput --all-features -- --mode server
//! cargo bench --bench throughput --all-features -- --concurrency 256 --latency-ms 50 --prompts 5000
//! cargo bench --bench throughput --all-features -- --mode memory --prompts 10000,100000
//! cargo bench --bench throughput --all-features -- --mode memory --million
//! cargo bench --bench throughput --all-features -- --mode memory --million --no-cache
//! cargo bench --bench throughput --all-features -- --mode adaptive
//! ```
//!
//! The `adaptive` mode (not part of `all`) gives the server a hidden limit: it answers 429 at
//! once to a request that arrives while `K` (`--server-cap`, default 32) are in flight. With
//! latency `L` no run can beat `K / (2 L)` examples per second (320/s for 32 and 50 ms),
//! whatever its concurrency. It runs concurrency 256 (`--concurrency`) through
//! `Retry(Adaptive(..))` and through the plain `Retry(..)`, and reports each rate as a share of
//! that bound, with the share of calls the server answered 429.
//!
//! Every figure comes with the CPU the process used and the share of the machine's CPU that
//! other processes took meanwhile: on a shared machine the figures are pessimistic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rmboost::backend::adaptive::{Adaptive, AdaptiveSnapshot};
use rmboost::backend::cache::{Cache, Cached};
use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::retry::{Retry, RetryStats};
use rmboost::run::{run_to_file, RunOptions, RunSummary, StopSignal};
use rmboost::testing::FakeBackend;
use rmboost::{Prompt, RmBoost};
use tokio::net::TcpListener;

/// The most one throughput point may take before it is stopped.
const POINT_DEADLINE: Duration = Duration::from_secs(180);
/// The most prompts one throughput point generates.
const MAX_POINT_PROMPTS: u64 = 200_000;
/// Seconds of ideal run time a throughput point aims for. Long enough that the run's start and
/// end (slots filling and draining: about one example's time each) cost well under 1%, and
/// that the cache grows to a size where its lookups cost what they cost in a real run (a 6 s
/// point read about 0.5 to 1% lower, and hid what the cache's reads cost).
const POINT_SECONDS: f64 = 24.0;

// ---------------------------------------------------------------------------------------------
// The loopback server.

struct ServerState {
    latency_us: AtomicU64,
    /// Answer 429 to a request arriving while this many are in flight (0: no limit).
    cap: AtomicU64,
    in_flight: AtomicU64,
    /// Requests answered 429 (not counted in `requests`).
    rejected: AtomicU64,
    requests: AtomicU64,
    connections: AtomicU64,
    /// Sum of the delays actually served (from the request's arrival to its answer), in
    /// nanoseconds, so the bench can show that the server keeps to `L`.
    delay_ns: AtomicU64,
    timer: PreciseTimer,
    filler: FakeBackend,
}

/// Delays with sub-millisecond precision, for the server's latency.
///
/// tokio's timer has a 1 ms resolution and rounds deadlines up, so `sleep(50 ms)` takes about
/// 50.5 to 51.5 ms: 1 to 3% more than `L`, which would be counted against the client. One
/// thread keeps the pending deadlines in a heap and waits on a channel with a timeout until
/// the earliest one (the kernel's timer slack is about 50 us), then wakes its caller.
#[derive(Clone)]
struct PreciseTimer {
    tx: std::sync::mpsc::Sender<(Instant, futures::channel::oneshot::Sender<()>)>,
}

impl PreciseTimer {
    fn start() -> PreciseTimer {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let (tx, rx) =
            std::sync::mpsc::channel::<(Instant, futures::channel::oneshot::Sender<()>)>();
        std::thread::Builder::new()
            .name("bench-server-timer".into())
            .spawn(move || {
                let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
                let mut seq = 0u64;
                let mut wakers = std::collections::HashMap::new();
                loop {
                    let now = Instant::now();
                    while let Some(&Reverse((at, id))) = heap.peek() {
                        if at > now {
                            break;
                        }
                        heap.pop();
                        if let Some(w) = wakers.remove(&id) {
                            let _: Result<(), ()> = futures::channel::oneshot::Sender::send(w, ());
                        }
                    }
                    let next = match heap.peek() {
                        Some(&Reverse((at, _))) => {
                            rx.recv_timeout(at.saturating_duration_since(now))
                        }
                        None => rx
                            .recv()
                            .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
                    };
                    match next {
                        Ok((at, waker)) => {
                            seq += 1;
                            heap.push(Reverse((at, seq)));
                            wakers.insert(seq, waker);
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .expect("timer thread");
        PreciseTimer { tx }
    }

    async fn sleep_until(&self, at: Instant) {
        let (waker, done) = futures::channel::oneshot::channel();
        if self.tx.send((at, waker)).is_ok() {
            let _ = done.await;
        }
    }
}

/// A server on its own threads; lives until the process ends.
struct BenchServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
}

impl BenchServer {
    fn start(threads: usize, response_bytes: usize) -> BenchServer {
        // The answers of the in-process fake backend: prose-like filler that passes the
        // response checks (no repetition, first and second responses far apart).
        let filler = FakeBackend::with_response_len(response_bytes);
        let state = Arc::new(ServerState {
            latency_us: AtomicU64::new(0),
            cap: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            delay_ns: AtomicU64::new(0),
            timer: PreciseTimer::start(),
            filler,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let st = state.clone();
        std::thread::Builder::new()
            .name("bench-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads.max(1))
                    .thread_name("bench-server")
                    .enable_all()
                    .build()
                    .expect("server runtime");
                rt.block_on(async move {
                    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                    tx.send(listener.local_addr().expect("addr")).unwrap();
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        st.connections.fetch_add(1, Ordering::Relaxed);
                        let st = st.clone();
                        tokio::spawn(async move {
                            let svc = service_fn(move |req| handle(req, st.clone()));
                            let _ = http1::Builder::new()
                                .keep_alive(true)
                                .serve_connection(TokioIo::new(tcp), svc)
                                .await;
                        });
                    }
                });
            })
            .expect("server thread");
        let addr = rx.recv().expect("server address");
        BenchServer { addr, state }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn set_latency(&self, latency: Duration) {
        self.state
            .latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// The mean delay served per request since `before` = (requests, delay_ns) counters.
    fn mean_delay(&self, before: (u64, u64)) -> Duration {
        let n = self.requests() - before.0;
        let ns = self.state.delay_ns.load(Ordering::Relaxed) - before.1;
        Duration::from_nanos(ns / n.max(1))
    }

    fn delay_counters(&self) -> (u64, u64) {
        (self.requests(), self.state.delay_ns.load(Ordering::Relaxed))
    }

    fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Requests answered 429 so far.
    fn rejected(&self) -> u64 {
        self.state.rejected.load(Ordering::Relaxed)
    }

    /// Sets the hidden limit on requests in flight (0: none).
    fn set_cap(&self, cap: u64) {
        self.state.cap.store(cap, Ordering::Relaxed);
    }

    /// Connections accepted so far.
    fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }
}

async fn handle(
    req: Request<Incoming>,
    st: Arc<ServerState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let arrived = Instant::now();
    /// Leaves the in-flight count when the answer is made.
    struct Leave<'a>(&'a AtomicU64);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let in_flight = st.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    let _leave = Leave(&st.in_flight);
    let cap = st.cap.load(Ordering::Relaxed);
    if cap > 0 && in_flight > cap {
        // Drain the body so the connection stays usable, then refuse at once.
        let _ = req.into_body().collect().await;
        st.rejected.fetch_add(1, Ordering::Relaxed);
        return Ok(Response::builder()
            .status(429)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"error":{"message":"Too many requests in flight","type":"requests","code":"rate_limit_exceeded"}}"#,
            )))
            .expect("a valid response"));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let latency = st.latency_us.load(Ordering::Relaxed);
    if latency > 0 {
        st.timer
            .sleep_until(arrived + Duration::from_micros(latency))
            .await;
    }
    let json = answer(&body, &st.filler, arrived);
    st.delay_ns
        .fetch_add(arrived.elapsed().as_nanos() as u64, Ordering::Relaxed);
    st.requests.fetch_add(1, Ordering::Relaxed);
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json)))
        .expect("a valid response"))
}

/// Nanoseconds from the process's first call of this function: the server stamps its answers
/// with when the request arrived and when the answer left, on the clock the client reads.
fn since_epoch(t: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| Instant::now() - Duration::from_secs(1));
    t.saturating_duration_since(epoch).as_nanos() as u64
}

/// The answer to one request body, as a chat completion JSON. Its model name carries when the
/// request arrived and when the answer was made (`bench-model@<ns>@<ns>`, see [`since_epoch`]).
fn answer(body: &[u8], filler: &FakeBackend, arrived: Instant) -> String {
    // The second request's instructions (a system message) ask for `<response>` tags.
    let second = memchr::memmem::find(body, b"</response>").is_some();
    let seed = memchr::memmem::find(body, b"\"seed\":")
        .map(|at| {
            body[at + 7..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .fold(0u64, |n, &d| {
                    n.wrapping_mul(10).wrapping_add(u64::from(d - b'0'))
                })
        })
        .unwrap_or(0);
    let text = filler.answer(seed, second);
    let completion_tokens = text.len() / 4;
    let prompt_tokens = body.len() / 4;
    format!(
        "{{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion\",\"model\":\"bench-model@{}@{}\",\
         \"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{text}\"}},\
         \"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":{prompt_tokens},\
         \"completion_tokens\":{completion_tokens},\"total_tokens\":{}}}}}",
        since_epoch(arrived),
        since_epoch(Instant::now()),
        prompt_tokens + completion_tokens
    )
}

// ---------------------------------------------------------------------------------------------
// CPU and memory accounting from /proc (Linux; zeros elsewhere).

/// Clock ticks per second of /proc times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// utime + stime in ticks from the text of a /proc stat file.
fn stat_ticks(stat: &str) -> u64 {
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// CPU seconds used by the whole process.
fn process_cpu() -> f64 {
    std::fs::read_to_string("/proc/self/stat").map_or(0.0, |s| stat_ticks(&s) as f64 / TICKS)
}

/// CPU seconds used by this process's threads whose name starts with `prefix`.
fn threads_cpu(prefix: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ticks = 0;
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let name = stat
            .find('(')
            .zip(stat.rfind(')'))
            .map_or("", |(a, b)| &stat[a + 1..b]);
        if name.starts_with(prefix) {
            ticks += stat_ticks(&stat);
        }
    }
    ticks as f64 / TICKS
}

/// (busy, total) ticks of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let line = s.lines().next().unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// CPU use over an interval.
struct CpuMeter {
    wall: Instant,
    process: f64,
    server: f64,
    machine: (u64, u64),
}

struct CpuReport {
    wall: f64,
    process: f64,
    server: f64,
    /// Share of the machine's CPU used by other processes.
    others: f64,
}

impl CpuMeter {
    fn start() -> Self {
        CpuMeter {
            wall: Instant::now(),
            process: process_cpu(),
            server: threads_cpu("bench-server"),
            machine: machine_ticks(),
        }
    }

    fn stop(&self) -> CpuReport {
        let wall = self.wall.elapsed().as_secs_f64();
        let process = process_cpu() - self.process;
        let server = threads_cpu("bench-server") - self.server;
        let (busy, total) = machine_ticks();
        let d_busy = busy.saturating_sub(self.machine.0) as f64 / TICKS;
        let d_total = total.saturating_sub(self.machine.1) as f64 / TICKS;
        let others = if d_total > 0.0 {
            ((d_busy - process) / d_total).clamp(0.0, 1.0)
        } else {
            0.0
        };
        CpuReport {
            wall,
            process,
            server,
            others,
        }
    }
}

impl std::fmt::Display for CpuReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wall {:.2}s, process CPU {:.2}s ({:.2} of {} cores; server threads {:.2}s), \
             other processes {:.0}% of the machine, load {}",
            self.wall,
            self.process,
            self.process / self.wall.max(1e-9),
            cores(),
            self.server,
            self.others * 100.0,
            load_avg()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments.

#[derive(Debug, Clone)]
struct Args {
    mode: String,
    concurrency: Vec<usize>,
    latency_ms: u64,
    prompts: Vec<u64>,
    million: bool,
    server_threads: usize,
    response_bytes: usize,
    memory_concurrency: usize,
    no_cache: bool,
    server_cap: u64,
    explicit_concurrency: bool,
}

fn parse_list<T: std::str::FromStr>(flag: &str, v: &str) -> Vec<T> {
    v.split(',')
        .map(|x| {
            x.trim()
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{flag}: not a number: {x}"))
        })
        .collect()
}

impl Args {
    fn parse() -> Args {
        let mut a = Args {
            mode: "all".into(),
            concurrency: vec![1, 16, 64, 256, 512],
            latency_ms: 50,
            prompts: Vec::new(),
            million: false,
            server_threads: 1,
            response_bytes: 1000,
            memory_concurrency: 64,
            no_cache: false,
            server_cap: 32,
            explicit_concurrency: false,
        };
        let mut explicit_mode = false;
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
            match flag.as_str() {
                "--mode" => {
                    a.mode = value();
                    explicit_mode = true;
                }
                "--concurrency" => {
                    a.concurrency = parse_list(&flag, &value());
                    a.explicit_concurrency = true;
                }
                "--server-cap" => a.server_cap = value().parse().expect("--server-cap"),
                "--latency-ms" => a.latency_ms = value().parse().expect("--latency-ms"),
                "--prompts" => a.prompts = parse_list(&flag, &value()),
                "--million" => a.million = true,
                "--no-cache" => a.no_cache = true,
                "--server-threads" => a.server_threads = value().parse().expect("--server-threads"),
                "--response-bytes" => a.response_bytes = value().parse().expect("--response-bytes"),
                "--memory-concurrency" => {
                    a.memory_concurrency = value().parse().expect("--memory-concurrency");
                }
                // Passed by `cargo bench`; filters of other benches.
                "--bench" => {}
                other if other.starts_with("--") => panic!("unknown flag {other}"),
                _ => {}
            }
        }
        // Choosing points without a mode means the throughput mode.
        if !explicit_mode && std::env::args().any(|x| x == "--concurrency" || x == "--prompts") {
            a.mode = "throughput".into();
        }
        if a.million && !explicit_mode {
            a.mode = "memory".into();
        }
        a
    }
}

// ---------------------------------------------------------------------------------------------
// The pipeline.

const PROMPT: &str = "Explain, with one worked example, how a hash table keeps lookups fast \
                      as it grows, and what happens to the cost of an insertion that triggers \
                      a resize.";

fn write_prompts(path: &Path, n: u64) {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).expect("prompts file"));
    for i in 0..n {
        writeln!(w, "{{\"id\":\"p{i:08}\",\"prompt\":\"{i}. {PROMPT}\"}}").unwrap();
    }
    w.flush().unwrap();
}

/// The HTTP backend with the time its calls take as the generator sees them (from the call's
/// first poll to its result): compared with the delay the server served, it tells how much of
/// a shortfall is in the client's transport and scheduling, and how much between calls.
#[derive(Debug)]
struct Timed<B> {
    inner: B,
    calls: Arc<AtomicU64>,
    nanos: Arc<AtomicU64>,
    to_server: Arc<AtomicU64>,
    from_server: Arc<AtomicU64>,
}

#[rmboost::async_trait]
impl<B: rmboost::LlmBackend> rmboost::LlmBackend for Timed<B> {
    async fn complete(
        &self,
        request: rmboost::CompletionRequest,
    ) -> Result<rmboost::Completion, rmboost::BackendError> {
        let start = Instant::now();
        let result = self.inner.complete(request).await;
        let end = Instant::now();
        self.nanos
            .fetch_add((end - start).as_nanos() as u64, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = &result {
            let mut parts = c.model.split('@').skip(1).map(|p| p.parse::<u64>().ok());
            if let (Some(Some(arrived)), Some(Some(left))) = (parts.next(), parts.next()) {
                let (s, e) = (since_epoch(start), since_epoch(end));
                self.to_server
                    .fetch_add(arrived.saturating_sub(s), Ordering::Relaxed);
                self.from_server
                    .fetch_add(e.saturating_sub(left), Ordering::Relaxed);
            }
        }
        result
    }
}

/// Calls and total nanoseconds of the [`Timed`] layer.
type CallTimes = (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
);

fn generator(
    server: &BenchServer,
    cache: Option<&Cache>,
    concurrency: usize,
) -> (RmBoost, CallTimes) {
    let backend = OpenAiBackend::builder()
        .base_url(server.base_url())
        .model("bench-model")
        .timeout(Duration::from_secs(60))
        .build()
        .expect("backend");
    let times: CallTimes = Default::default();
    let backend = Timed {
        inner: backend,
        calls: times.0.clone(),
        nanos: times.1.clone(),
        to_server: times.2.clone(),
        from_server: times.3.clone(),
    };
    let backend: Arc<dyn rmboost::LlmBackend> = match cache {
        Some(cache) => Arc::new(Cached::new(Retry::new(backend), cache.clone())),
        None => Arc::new(Retry::new(backend)),
    };
    let rmb = RmBoost::builder()
        .backend_arc(backend)
        .concurrency(NonZeroUsize::new(concurrency).expect("concurrency >= 1"))
        .seed(1)
        .build()
        .expect("generator");
    (rmb, times)
}

fn deadline_stop(rt: &tokio::runtime::Runtime, after: Duration) -> StopSignal {
    let stop = StopSignal::new();
    let s = stop.clone();
    rt.spawn(async move {
        tokio::time::sleep(after).await;
        s.stop();
    });
    stop
}

fn check(summary: &RunSummary, expected: u64) {
    if summary.generation.examples != expected || summary.generation.failed() > 0 {
        eprintln!(
            "  WARNING: expected {expected} examples, got {} ({})",
            summary.generation.examples, summary
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Modes.

fn server_mode(rt: &tokio::runtime::Runtime, server: &BenchServer) {
    server.set_latency(Duration::ZERO);
    let workers = 64;
    let duration = Duration::from_secs(3);
    let max_requests: u64 = 200_000;
    let client = reqwest::Client::new();
    let url = format!("{}/chat/completions", server.base_url());
    let body = format!(
        "{{\"model\":\"bench-model\",\"messages\":[{{\"role\":\"user\",\"content\":\"{PROMPT}\"}}],\"seed\":7}}"
    );
    let before = server.requests();
    let meter = CpuMeter::start();
    let done = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let end = Instant::now() + duration;
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (client, url, body, done) =
                (client.clone(), url.clone(), body.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end && done.load(Ordering::Relaxed) < max_requests {
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("request");
                    let bytes = r.bytes().await.expect("body");
                    assert!(bytes.len() > 500);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let cpu = meter.stop();
    let n = server.requests() - before;
    let rate = n as f64 / cpu.wall;
    let per_req_us = cpu.server / n.max(1) as f64 * 1e6;
    println!(
        "server (latency 0, {workers} keep-alive clients in this process): {n} requests, \
         {rate:.0} req/s; server CPU {per_req_us:.1} us/request => {:.0} req/s per core",
        1e6 / per_req_us.max(1e-9)
    );
    println!("  {cpu}");
}

/// The harness's own ceiling at one point: `C` tasks of a bare reqwest client, each making
/// two calls one after the other per "example" (a first request, then one that asks for
/// `<response>` tags), with no generator, cache, resume or output file. What a throughput
/// point loses beyond this is the pipeline's; what this loses is the server's, the kernel's
/// and the machine's.
fn ceiling_point(
    rt: &tokio::runtime::Runtime,
    server: &BenchServer,
    concurrency: usize,
    latency: Duration,
    prompts: Option<u64>,
) {
    let ideal = concurrency as f64 / (2.0 * latency.as_secs_f64());
    let n =
        prompts.unwrap_or_else(|| ((ideal * POINT_SECONDS) as u64).clamp(50, MAX_POINT_PROMPTS));
    server.set_latency(latency);
    let client = reqwest::Client::new();
    let url = format!("{}/chat/completions", server.base_url());
    let first = format!(
        "{{\"model\":\"bench-model\",\"messages\":[{{\"role\":\"user\",\"content\":\"{PROMPT}\"}}],\"seed\":7}}"
    );
    let second = format!(
        "{{\"model\":\"bench-model\",\"messages\":[{{\"role\":\"system\",\"content\":\"Answer inside <response></response> tags.\"}},{{\"role\":\"user\",\"content\":\"{PROMPT}\"}}],\"seed\":8}}"
    );
    let delay_before = server.delay_counters();
    let next = Arc::new(AtomicU64::new(0));
    let meter = CpuMeter::start();
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (client, url, first, second, next) = (
                client.clone(),
                url.clone(),
                first.clone(),
                second.clone(),
                next.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    for body in [&first, &second] {
                        let r = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await
                            .expect("request");
                        let text = r.text().await.expect("body");
                        assert!(text.len() > 500);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let wall = start.elapsed().as_secs_f64();
    let cpu = meter.stop();
    let rate = n as f64 / wall;
    let served = server.mean_delay(delay_before).as_secs_f64();
    println!(
        "ceiling C={concurrency:<4} L={}ms n={n:<6} {rate:>8.1} pairs/s = {:>5.1}% of C/(2L)={ideal:.0} \
         ({:.1}% of C/(2 x served delay {:.2} ms)): a bare client, two calls per pair",
        latency.as_millis(),
        100.0 * rate / ideal,
        100.0 * rate * 2.0 * served / concurrency as f64,
        served * 1e3,
    );
    println!("  {cpu}");
}

fn throughput_point(
    rt: &tokio::runtime::Runtime,
    server: &BenchServer,
    concurrency: usize,
    latency: Duration,
    prompts: Option<u64>,
    use_cache: bool,
) {
    let ideal = concurrency as f64 / (2.0 * latency.as_secs_f64());
    let n =
        prompts.unwrap_or_else(|| ((ideal * POINT_SECONDS) as u64).clamp(50, MAX_POINT_PROMPTS));
    server.set_latency(latency);
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("prompts.jsonl");
    let output = dir.path().join("pairs.jsonl");
    write_prompts(&input, n);
    let cache = Cache::open(dir.path().join("responses.redb")).expect("cache");
    let (rmb, times) = generator(server, use_cache.then_some(&cache), concurrency);
    let stop = deadline_stop(rt, POINT_DEADLINE);
    let requests_before = server.requests();
    let delay_before = server.delay_counters();
    let connections_before = server.connections();
    let meter = CpuMeter::start();
    let writer_before = threads_cpu("rmboost-cache-w");
    let summary = rt
        .block_on(async {
            let reader = rmboost::read_prompts(&input)?;
            run_to_file(
                |p| rmb.try_generate(p),
                stream::iter(reader),
                &output,
                RunOptions::new().stop_signal(stop),
            )
            .await
        })
        .expect("run");
    let cpu = meter.stop();
    let writer_cpu = threads_cpu("rmboost-cache-w") - writer_before;
    // Calls return before their completions are committed: count them all.
    rt.block_on(cache.flush()).expect("cache flush");
    check(&summary, n);
    let rate = summary.examples_per_sec();
    let requests = server.requests() - requests_before;
    let connections = server.connections() - connections_before;
    let client_cpu_us =
        (cpu.process - cpu.server) / summary.generation.examples.max(1) as f64 * 1e6;
    println!(
        "C={concurrency:<4} L={}ms n={n:<6} {rate:>8.1} ex/s = {:>5.1}% of C/(2L)={ideal:.0}; \
         {requests} requests on {connections} new connections; client CPU {client_cpu_us:.0} us/example \
         (cache writer thread {:.0}); cache {}",
        latency.as_millis(),
        100.0 * rate / ideal,
        writer_cpu / summary.generation.examples.max(1) as f64 * 1e6,
        if use_cache {
            format!("{:?}", cache.stats())
        } else {
            "off".into()
        }
    );
    let calls = times.0.load(Ordering::Relaxed).max(1);
    let call_ms = times.1.load(Ordering::Relaxed) as f64 / calls as f64 / 1e6;
    let wall_per_call_ms = summary.elapsed.as_secs_f64() * 1e3 * concurrency as f64
        / (2.0 * summary.generation.examples.max(1) as f64);
    let to_ms = times.2.load(Ordering::Relaxed) as f64 / calls as f64 / 1e6;
    let from_ms = times.3.load(Ordering::Relaxed) as f64 / calls as f64 / 1e6;
    let served = server.mean_delay(delay_before).as_secs_f64();
    println!(
        "  {:.1}% of C/(2 x served delay): the client's share, without the server's overshoot \
         of L",
        100.0 * rate * 2.0 * served / concurrency as f64
    );
    println!(
        "  server delay served: mean {:.2} ms (L = {} ms); HTTP call as the generator sees it: \
         mean {call_ms:.2} ms (call to server handler {to_ms:.2}, answer to call's end \
         {from_ms:.2}); wall time per call slot: {wall_per_call_ms:.2} ms",
        server.mean_delay(delay_before).as_secs_f64() * 1e3,
        latency.as_millis()
    );
    println!("  {cpu}");
}

/// One side of the `adaptive` mode: `n` prompts at `concurrency` against a server that refuses
/// requests beyond `cap` in flight, through `Retry(Adaptive(..))` or the plain `Retry(..)`.
fn adaptive_point(
    rt: &tokio::runtime::Runtime,
    server: &BenchServer,
    concurrency: usize,
    cap: u64,
    latency: Duration,
    n: u64,
    adaptive: bool,
) -> (f64, f64) {
    server.set_latency(latency);
    server.set_cap(cap);
    let bound = cap as f64 / (2.0 * latency.as_secs_f64());
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("prompts.jsonl");
    let output = dir.path().join("pairs.jsonl");
    write_prompts(&input, n);
    let backend = OpenAiBackend::builder()
        .base_url(server.base_url())
        .model("bench-model")
        .timeout(Duration::from_secs(60))
        .build()
        .expect("backend");
    let cap_nz = NonZeroUsize::new(concurrency).expect("concurrency >= 1");
    let (backend, retry_stats, adaptive_stats): (
        Arc<dyn rmboost::LlmBackend>,
        Arc<RetryStats>,
        Option<Arc<rmboost::backend::AdaptiveStats>>,
    ) = if adaptive {
        let wrapped = Adaptive::new(backend, cap_nz);
        let stats = wrapped.stats();
        let retry = Retry::new(wrapped);
        let retry_stats = retry.stats();
        (Arc::new(retry), retry_stats, Some(stats))
    } else {
        let retry = Retry::new(backend);
        let stats = retry.stats();
        (Arc::new(retry), stats, None)
    };
    let rmb = RmBoost::builder()
        .backend_arc(backend)
        .concurrency(cap_nz)
        .seed(1)
        .build()
        .expect("generator");
    let stop = deadline_stop(rt, POINT_DEADLINE);
    let (answered, rejected) = (server.requests(), server.rejected());
    let meter = CpuMeter::start();
    let summary = rt
        .block_on(async {
            let reader = rmboost::read_prompts(&input)?;
            run_to_file(
                |p| rmb.try_generate(p),
                stream::iter(reader),
                &output,
                RunOptions::new().stop_signal(stop),
            )
            .await
        })
        .expect("run");
    let cpu = meter.stop();
    server.set_cap(0);
    let answered = server.requests() - answered;
    let rejected = server.rejected() - rejected;
    let share_429 = rejected as f64 / (answered + rejected).max(1) as f64;
    let rate = summary.examples_per_sec();
    println!(
        "{:<22} C={concurrency} K={cap} L={}ms n={n}: {rate:>6.1} ex/s = {:>5.1}% of K/(2L)={bound:.0}; \
         429s {rejected} of {} calls ({:.2}%); {} examples, {} failed; retries {}",
        if adaptive { "Retry(Adaptive(http))" } else { "Retry(http)" },
        latency.as_millis(),
        100.0 * rate / bound,
        answered + rejected,
        100.0 * share_429,
        summary.generation.examples,
        summary.generation.failed(),
        retry_stats.retries(),
    );
    if let Some(stats) = adaptive_stats {
        let AdaptiveSnapshot {
            limit,
            min_limit,
            max_limit,
            decreases,
            increases,
            ..
        } = stats.snapshot();
        println!(
            "  limit now {limit}, settled range {min_limit}..{max_limit} (lowest, highest \
             rise); {decreases} cuts, {increases} rises"
        );
    }
    println!("  {cpu}");
    (rate / bound, share_429)
}

/// The `adaptive` mode: the same run with and without adaptation, side by side.
fn adaptive_mode(
    rt: &tokio::runtime::Runtime,
    server: &BenchServer,
    concurrency: usize,
    cap: u64,
    latency: Duration,
    prompts: Option<u64>,
) {
    let bound = cap as f64 / (2.0 * latency.as_secs_f64());
    let n =
        prompts.unwrap_or_else(|| ((bound * POINT_SECONDS) as u64).clamp(50, MAX_POINT_PROMPTS));
    let with = adaptive_point(rt, server, concurrency, cap, latency, n, true);
    let without = adaptive_point(rt, server, concurrency, cap, latency, n, false);
    println!(
        "adaptive: {:.1}% of the bound, {:.2}% of calls 429 | fixed (plain Retry): {:.1}% of the \
         bound, {:.2}% of calls 429 (goal: >= 90% with < 5%)",
        100.0 * with.0,
        100.0 * with.1,
        100.0 * without.0,
        100.0 * without.1
    );
}

fn memory_point(
    rt: &tokio::runtime::Runtime,
    server: &BenchServer,
    n: u64,
    concurrency: usize,
    use_cache: bool,
) {
    server.set_latency(Duration::ZERO);
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("pairs.jsonl");
    let cache = Cache::open(dir.path().join("responses.redb")).expect("cache");
    let (rmb, _) = generator(server, use_cache.then_some(&cache), concurrency);
    let baseline = status_kib("VmRSS:");
    // Prompts are made one at a time as the run pulls them: nothing is held.
    let prompts = stream::iter((0..n).map(|i| {
        Ok(Prompt::with_id(
            format!("m{i:08}"),
            format!("{i}. {PROMPT}"),
        ))
    }));
    let progress = rmboost::run::Progress::new();
    let sampler = {
        let progress = progress.clone();
        rt.spawn(async move {
            let mut samples = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                samples.push((
                    progress.snapshot().generation.examples,
                    status_kib("VmRSS:"),
                ));
                let (e, r) = samples[samples.len() - 1];
                eprintln!("  ... {e} examples, RSS {} MiB", r / 1024);
            }
        })
    };
    let meter = CpuMeter::start();
    let summary = rt
        .block_on(run_to_file(
            |p| rmb.try_generate(p),
            prompts,
            &output,
            RunOptions::new().progress(progress),
        ))
        .expect("run");
    let cpu = meter.stop();
    sampler.abort();
    check(&summary, n);
    let hwm = status_kib("VmHWM:");
    let out_bytes = std::fs::metadata(&output).map_or(0, |m| m.len());
    let cache_bytes = std::fs::metadata(cache.path()).map_or(0, |m| m.len());
    println!(
        "memory N={n:<8} C={concurrency}: peak RSS (VmHWM) {:.1} MiB, RSS before the run {:.1} MiB, \
         growth {:.1} bytes/prompt over the baseline; {:.0} ex/s; output {} MiB, cache {}",
        hwm as f64 / 1024.0,
        baseline as f64 / 1024.0,
        (hwm.saturating_sub(baseline) * 1024) as f64 / n as f64,
        summary.examples_per_sec(),
        out_bytes >> 20,
        if use_cache {
            format!("{} MiB", cache_bytes >> 20)
        } else {
            "off".into()
        }
    );
    println!("  {cpu}");
}

/// Runs each memory point in a child process, so each peak is its own.
fn memory_children(args: &Args, ns: &[u64]) {
    let exe = std::env::current_exe().expect("current exe");
    for &n in ns {
        let mut child = std::process::Command::new(&exe);
        if args.no_cache {
            child.arg("--no-cache");
        }
        let status = child
            .args([
                "--mode",
                "memory-one",
                "--prompts",
                &n.to_string(),
                "--memory-concurrency",
                &args.memory_concurrency.to_string(),
                "--server-threads",
                &args.server_threads.to_string(),
                "--response-bytes",
                &args.response_bytes.to_string(),
            ])
            .status()
            .expect("child");
        assert!(status.success(), "memory point {n} failed: {status}");
    }
}

fn main() {
    let args = Args::parse();
    // As the CLI runs: one thread drives the run (every example of a stream is polled by the
    // task that consumes it anyway); the cache writer and blocking work have their own threads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let server = BenchServer::start(args.server_threads, args.response_bytes);
    let latency = Duration::from_millis(args.latency_ms);
    if args.mode != "memory-one" {
        println!(
            "rmboost throughput bench: {} cores, load {}, server threads {}, ~{} B answers",
            cores(),
            load_avg(),
            args.server_threads,
            args.response_bytes
        );
    }
    match args.mode.as_str() {
        "server" => server_mode(&rt, &server),
        "throughput" => {
            for (i, &c) in args.concurrency.iter().enumerate() {
                throughput_point(
                    &rt,
                    &server,
                    c,
                    latency,
                    args.prompts.get(i).or(args.prompts.last()).copied(),
                    !args.no_cache,
                );
            }
        }
        "ceiling" => {
            for (i, &c) in args.concurrency.iter().enumerate() {
                ceiling_point(
                    &rt,
                    &server,
                    c,
                    latency,
                    args.prompts.get(i).or(args.prompts.last()).copied(),
                );
            }
        }
        "memory" => {
            let mut ns = if args.prompts.is_empty() {
                vec![10_000, 100_000]
            } else {
                args.prompts.clone()
            };
            if args.million && !ns.contains(&1_000_000) {
                ns.push(1_000_000);
            }
            memory_children(&args, &ns);
        }
        "memory-one" => {
            for &n in &args.prompts {
                memory_point(&rt, &server, n, args.memory_concurrency, !args.no_cache);
            }
        }
        "adaptive" => {
            let concurrency = if args.explicit_concurrency {
                args.concurrency[0]
            } else {
                256
            };
            adaptive_mode(
                &rt,
                &server,
                concurrency,
                args.server_cap,
                latency,
                args.prompts.first().copied(),
            );
        }
        "all" => {
            server_mode(&rt, &server);
            for &c in &args.concurrency {
                throughput_point(&rt, &server, c, latency, None, !args.no_cache);
            }
            let mut ns = vec![10_000, 100_000];
            if args.million {
                ns.push(1_000_000);
            }
            memory_children(&args, &ns);
        }
        other => panic!("unknown mode {other}: all, server, throughput, ceiling, memory, adaptive"),
    }
}
