//! The tests' one loopback OpenAI-compatible chat-completions server.
//!
//! It answers `POST .../chat/completions` as `rmboost::testing::FakeBackend` does: the text is
//! derived from the request's `seed`, and a request with a message mentioning `</response>`
//! (a second-response request) is answered inside `<response>` tags. Usage is counted as the
//! fake counts it (a token per 4 bytes of the messages and of the answer). A builder adds
//! latency, scripted statuses (one status for every request, 400 for a seeded share of
//! first-response requests) and seeded fault injection (429 with `Retry-After: 0`, 500, 503,
//! answers slower than the client's timeout, connections closed without an answer, malformed
//! JSON, empty content). Every request is counted and recorded.
//!
//! It binds 127.0.0.1 on a free port and serves keep-alive HTTP/1.1 from its own thread and
//! tokio runtime, so synchronous tests (that run the `rmboost` binary) and async tests alike
//! can use it; it stops when dropped.
//!
//! ```ignore
//! let server = OpenAiServer::builder().latency(Duration::from_millis(20)).start();
//! // rmboost generate ... --backend openai --base-url <server.base_url()> --model test
//! assert!(server.requests() > 0);
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rmboost::testing::FakeBackend;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The injected faults, in the order of [`OpenAiServer::faults`].
pub const HTTP_FAULTS: [&str; 7] = [
    "429_retry_after",
    "500",
    "503",
    "slow",
    "reset",
    "malformed_json",
    "empty_content",
];

/// The text of every injected fault's error body; no output row may contain it.
pub const INJECTED_HTTP: &str = "injected http fault";

/// The message of the 400 answers of [`OpenAiServerBuilder::reject_first_calls`]; no output
/// row may contain it.
pub const REJECTED: &str = "rejected by the test server";

/// How the server answers; see [`OpenAiServer::builder`].
#[derive(Debug, Clone)]
pub struct OpenAiServerBuilder {
    latency: Duration,
    filler: usize,
    every: Option<(u16, String)>,
    reject_first_one_in: Option<u64>,
    fault_rate: f64,
    fault_seed: u64,
    slow: Duration,
    retry_after_secs: u64,
}

impl Default for OpenAiServerBuilder {
    fn default() -> Self {
        OpenAiServerBuilder {
            latency: Duration::ZERO,
            filler: 40,
            every: None,
            reject_first_one_in: None,
            fault_rate: 0.0,
            fault_seed: 1,
            slow: Duration::from_millis(1500),
            retry_after_secs: 0,
        }
    }
}

impl OpenAiServerBuilder {
    /// Waits this long before answering each request (whatever the answer).
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Length in bytes of the filler of good answers (default 40, as `FakeBackend::new`).
    pub fn filler(mut self, len: usize) -> Self {
        self.filler = len;
        self
    }

    /// Answers every request with this status and an OpenAI-style error body carrying
    /// `message` (e.g. 401 for a bad key).
    pub fn fail_every_request(mut self, status: u16, message: &str) -> Self {
        self.every = Some((status, message.to_string()));
        self
    }

    /// Rejects a first-response request with 400 ([`REJECTED`]) when its seed is a multiple
    /// of `n`: a permanent, non-fatal failure of about one example in `n`.
    pub fn reject_first_calls(mut self, one_in: u64) -> Self {
        assert!(one_in > 0);
        self.reject_first_one_in = Some(one_in);
        self
    }

    /// Injects a fault (one of [`HTTP_FAULTS`], drawn evenly) into a share `rate` of requests,
    /// drawn from an RNG seeded with `seed`.
    pub fn faults(mut self, rate: f64, seed: u64) -> Self {
        self.fault_rate = rate;
        self.fault_seed = seed;
        self
    }

    /// The `Retry-After` of the injected 429s, in seconds (default 0).
    pub fn retry_after_secs(mut self, secs: u64) -> Self {
        self.retry_after_secs = secs;
        self
    }

    /// How long the "slow" fault takes (default 1.5 s; make it longer than the client's
    /// timeout).
    pub fn slow(mut self, slow: Duration) -> Self {
        self.slow = slow;
        self
    }

    /// Binds 127.0.0.1 on a free port and starts serving on a thread of its own.
    pub fn start(self) -> OpenAiServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State {
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(self.fault_seed)),
            config: self,
            counters: Counters::default(),
            recorded: Mutex::new(Vec::new()),
        });
        let (shutdown, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let s = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("openai-test-server-{}", addr.port()))
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
                                let Ok((stream, _)) = accepted else { continue };
                                let s = s.clone();
                                tokio::spawn(async move {
                                    let _ = serve(stream, &s).await;
                                });
                            }
                        }
                    }
                });
                // Dropping the runtime drops every connection still open.
            })
            .expect("spawn the test server's thread");
        OpenAiServer {
            addr,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    /// The JSON body (`Null` when it is not JSON).
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

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    ok: AtomicU64,
    scripted: AtomicU64,
    faults: [AtomicU64; 7],
}

struct State {
    config: OpenAiServerBuilder,
    rng: Mutex<ChaCha8Rng>,
    counters: Counters,
    recorded: Mutex<Vec<Recorded>>,
}

/// A running server; stops when dropped.
pub struct OpenAiServer {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for OpenAiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl OpenAiServer {
    /// A configurable server; [`OpenAiServerBuilder::start`] starts it.
    pub fn builder() -> OpenAiServerBuilder {
        OpenAiServerBuilder::default()
    }

    /// A server that answers every request at once, as `FakeBackend::new()` does.
    pub fn start() -> OpenAiServer {
        Self::builder().start()
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests received.
    pub fn requests(&self) -> u64 {
        self.state.counters.requests.load(Ordering::SeqCst)
    }

    /// Good answers sent.
    pub fn ok(&self) -> u64 {
        self.state.counters.ok.load(Ordering::SeqCst)
    }

    /// Scripted error answers sent (every-request status and rejected first calls).
    pub fn scripted(&self) -> u64 {
        self.state.counters.scripted.load(Ordering::SeqCst)
    }

    /// Faults injected, by kind.
    pub fn faults(&self) -> BTreeMap<&'static str, u64> {
        HTTP_FAULTS
            .iter()
            .zip(self.state.counters.faults.iter())
            .map(|(k, c)| (*k, c.load(Ordering::SeqCst)))
            .collect()
    }

    /// All faults injected.
    pub fn total_faults(&self) -> u64 {
        self.state
            .counters
            .faults
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .sum()
    }

    /// Every request received so far, in arrival order.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.recorded.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests have arrived; false after `timeout`.
    pub fn wait_for_requests(&self, n: u64, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while self.requests() < n {
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// A request: method, path, headers, body. `None` when the client closed the connection.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Recorded> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let mut first = lines.next().unwrap_or("").split_whitespace();
            let method = first.next().unwrap_or("").to_string();
            let path = first.next().unwrap_or("").to_string();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let total = end + 4 + len;
            while buf.len() < total {
                read_some(stream, buf).await?;
            }
            let body = serde_json::from_slice(&buf[end + 4..total]).unwrap_or(Value::Null);
            buf.drain(..total);
            return Some(Recorded {
                method,
                path,
                headers,
                body,
            });
        }
        read_some(stream, buf).await?;
    }
}

async fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await.ok()?;
    if n == 0 {
        return None;
    }
    buf.extend_from_slice(&chunk[..n]);
    Some(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn response(status: u16, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        reason(status),
        body.len()
    )
    .into_bytes()
}

/// An OpenAI-style error body.
fn error_body(status: u16, message: &str) -> String {
    let (kind, code) = match status {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        429 => ("rate_limit_exceeded", None),
        400..=499 => ("invalid_request_error", None),
        _ => ("server_error", None),
    };
    json!({"error": {"message": message, "type": kind, "code": code, "param": null}}).to_string()
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
/// `seed`, usage as the fake counts it): this server's good answer, and the batch server's
/// (`batch_server`) answer to a batch line.
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

/// What to send back; `None` closes the connection without an answer.
async fn answer(request: &Recorded, state: &State) -> Option<Vec<u8>> {
    let config = &state.config;
    let counters = &state.counters;
    if !request.path.ends_with("/chat/completions") {
        return Some(response(404, "", &error_body(404, "no such route")));
    }
    let body = &request.body;
    let fault = (config.fault_rate > 0.0)
        .then(|| {
            let mut rng = state.rng.lock().unwrap();
            rng.random_bool(config.fault_rate)
                .then(|| rng.random_range(0..HTTP_FAULTS.len()))
        })
        .flatten();
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    let good = || fake_completion(&FakeBackend::with_response_len(config.filler), body).to_string();
    if let Some((status, message)) = &config.every {
        counters.scripted.fetch_add(1, Ordering::SeqCst);
        return Some(response(*status, "", &error_body(*status, message)));
    }
    if let Some(n) = config.reject_first_one_in {
        if !is_second(body) && body["seed"].as_u64().unwrap_or(0).is_multiple_of(n) {
            counters.scripted.fetch_add(1, Ordering::SeqCst);
            return Some(response(400, "", &error_body(400, REJECTED)));
        }
    }
    let Some(k) = fault else {
        counters.ok.fetch_add(1, Ordering::SeqCst);
        return Some(response(200, "", &good()));
    };
    counters.faults[k].fetch_add(1, Ordering::SeqCst);
    let injected = |what: &str| format!("{INJECTED_HTTP}: {what}");
    Some(match k {
        0 => response(
            429,
            &format!("retry-after: {}\r\n", config.retry_after_secs),
            &error_body(429, &injected("rate limited")),
        ),
        1 => response(500, "", &error_body(500, &injected("500"))),
        2 => response(503, "", &error_body(503, &injected("503"))),
        3 => {
            tokio::time::sleep(config.slow).await;
            response(200, "", &good())
        }
        4 => return None,
        5 => response(200, "", "{\"choices\": [ {\"message\": "),
        _ => response(200, "", &completion_body(body, "").to_string()),
    })
}

async fn serve(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut buf).await {
        state.counters.requests.fetch_add(1, Ordering::SeqCst);
        state.recorded.lock().unwrap().push(request.clone());
        let Some(bytes) = answer(&request, state).await else {
            return Ok(());
        };
        stream.write_all(&bytes).await?;
    }
    Ok(())
}
