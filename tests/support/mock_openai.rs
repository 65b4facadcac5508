//! A loopback OpenAI-compatible chat-completions server that fails a seeded share of requests:
//! 429 with `Retry-After: 0`, 500, 503, answers slower than the client's timeout, connections
//! closed without an answer, malformed JSON and empty content. The good answers are those of
//! `FakeBackend`: derived from the request's seed, tagged for a second-response request.
//!
//! It binds 127.0.0.1 on a free port, serves keep-alive HTTP/1.1, and stops when dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The faults, in the order of the counters.
pub const HTTP_FAULTS: [&str; 7] = [
    "429_retry_after",
    "500",
    "503",
    "slow",
    "reset",
    "malformed_json",
    "empty_content",
];

/// The text of every injected error body; no output row may contain it.
pub const INJECTED_HTTP: &str = "injected http fault";

/// How the server misbehaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Share of requests that get a fault.
    pub fault_rate: f64,
    /// Seed of the fault draws.
    pub seed: u64,
    /// How long a "slow" answer takes (longer than the client's timeout).
    pub slow: Duration,
    /// Length of the filler of good answers.
    pub filler: usize,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            fault_rate: 0.3,
            seed: 1,
            slow: Duration::from_millis(1500),
            filler: 40,
        }
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    ok: AtomicU64,
    faults: [AtomicU64; 7],
}

/// A running mock server.
pub struct MockServer {
    addr: SocketAddr,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockServer {
    /// Starts a server on 127.0.0.1.
    pub async fn start(config: MockConfig) -> MockServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let rng = Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(config.seed)));
        let config = Arc::new(config);
        let c = counters.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (c, rng, config) = (c.clone(), rng.clone(), config.clone());
                conns.spawn(async move {
                    let _ = serve(stream, &c, &rng, &config).await;
                });
                // Reap finished connections.
                while conns.try_join_next().is_some() {}
            }
        });
        MockServer {
            addr,
            counters,
            task,
        }
    }

    /// The base URL (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests received.
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::SeqCst)
    }

    /// Good answers sent.
    pub fn ok(&self) -> u64 {
        self.counters.ok.load(Ordering::SeqCst)
    }

    /// Faults injected, by kind.
    pub fn faults(&self) -> BTreeMap<&'static str, u64> {
        HTTP_FAULTS
            .iter()
            .zip(self.counters.faults.iter())
            .map(|(k, c)| (*k, c.load(Ordering::SeqCst)))
            .collect()
    }

    /// All faults injected.
    pub fn total_faults(&self) -> u64 {
        self.counters
            .faults
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .sum()
    }
}

/// Reads one request; `None` when the client closed the connection.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let total = end + 4 + len;
            while buf.len() < total {
                let mut chunk = [0u8; 8192];
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..total].to_vec();
            buf.drain(..total);
            return Some(body);
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn response(status: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The answer `FakeBackend` would give.
fn good_text(request: &Value, filler: usize) -> String {
    let seed = request["seed"].as_u64().unwrap_or(0);
    let second = request["messages"].as_array().is_some_and(|ms| {
        ms.iter()
            .filter_map(|m| m["content"].as_str())
            .any(|c| c.contains("</response>"))
    });
    rmboost::testing::FakeBackend::with_response_len(filler).answer(seed, second)
}

fn completion_body(text: &str) -> String {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "model": "mock-model",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 10, "completion_tokens": (text.len() / 4) as u64}
    })
    .to_string()
}

fn error_body(kind: &str) -> String {
    json!({"error": {"message": format!("{INJECTED_HTTP}: {kind}"), "type": "server_error"}})
        .to_string()
}

async fn serve(
    mut stream: TcpStream,
    counters: &Counters,
    rng: &Mutex<ChaCha8Rng>,
    config: &MockConfig,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(body) = read_request(&mut stream, &mut buf).await {
        counters.requests.fetch_add(1, Ordering::SeqCst);
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let fault = {
            let mut rng = rng.lock().unwrap();
            if rng.random_bool(config.fault_rate) {
                Some(rng.random_range(0..HTTP_FAULTS.len()))
            } else {
                None
            }
        };
        let bytes = match fault {
            None => {
                counters.ok.fetch_add(1, Ordering::SeqCst);
                response(
                    "200 OK",
                    "",
                    &completion_body(&good_text(&request, config.filler)),
                )
            }
            Some(k) => {
                counters.faults[k].fetch_add(1, Ordering::SeqCst);
                match k {
                    0 => response(
                        "429 Too Many Requests",
                        "retry-after: 0\r\n",
                        &error_body("rate limited"),
                    ),
                    1 => response("500 Internal Server Error", "", &error_body("500")),
                    2 => response("503 Service Unavailable", "", &error_body("503")),
                    3 => {
                        tokio::time::sleep(config.slow).await;
                        response(
                            "200 OK",
                            "",
                            &completion_body(&good_text(&request, config.filler)),
                        )
                    }
                    // Close the connection without an answer.
                    4 => return Ok(()),
                    5 => response("200 OK", "", "{\"choices\": [ {\"message\": "),
                    _ => response("200 OK", "", &completion_body("")),
                }
            }
        };
        stream.write_all(&bytes).await?;
    }
    Ok(())
}
