//! Backends for tests, doc tests and benchmarks (feature `test-util`).
//!
//! - [`ScriptedBackend`] replays queued answers and errors (or computes them with a function),
//!   records every request, can wait a fixed latency, and counts calls in flight.
//! - [`FakeBackend`] answers instantly and deterministically: a first response derived from the
//!   request's seed, and for a second-response request (one that asks for `<response>` tags) a
//!   different, tagged answer.

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{lock, Completion, CompletionRequest, LlmBackend, Usage};
use crate::error::{BackendError, BackendErrorKind};

type Responder = dyn Fn(&CompletionRequest) -> Result<Completion, BackendError> + Send + Sync;

#[derive(Default)]
struct Script {
    queue: VecDeque<Result<Completion, BackendError>>,
    requests: Vec<CompletionRequest>,
}

#[derive(Default)]
struct Shared {
    script: Mutex<Script>,
    fallback: Option<Box<Responder>>,
    latency: Option<Duration>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A backend that replays a script; cheap to clone, and every clone shares the same script,
/// records and counters (keep one clone to inspect after handing another to the generator).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use rmboost::testing::ScriptedBackend;
/// use rmboost::{BackendError, CompletionRequest, LlmBackend, Message};
///
/// let backend = ScriptedBackend::new();
/// backend.push_text("first answer");
/// backend.push_error(BackendError::server("boom"));
/// let req = CompletionRequest::new(vec![Message::user("hi")]);
/// assert_eq!(backend.complete(req.clone()).await.unwrap().text, "first answer");
/// assert!(backend.complete(req).await.unwrap_err().is_retryable());
/// assert_eq!(backend.requests().len(), 2);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct ScriptedBackend {
    shared: Arc<Shared>,
}

impl fmt::Debug for ScriptedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptedBackend")
            .field("queued", &self.remaining())
            .field("calls", &self.calls())
            .field("latency", &self.shared.latency)
            .finish_non_exhaustive()
    }
}

impl ScriptedBackend {
    /// An empty script: a call with nothing queued fails with a permanent
    /// [`BackendErrorKind::Other`] error saying the script is exhausted.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend that answers with `f` whenever nothing is queued.
    pub fn from_fn(
        f: impl Fn(&CompletionRequest) -> Result<Completion, BackendError> + Send + Sync + 'static,
    ) -> Self {
        let fallback = Some(Box::new(f) as Box<Responder>);
        let shared = Arc::new(Shared {
            fallback,
            ..Shared::default()
        });
        ScriptedBackend { shared }
    }

    /// The same script with every call first waiting `latency` (tokio time, so paused-clock
    /// tests stay instant). Call before cloning or queueing.
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("with_latency must be called before the backend is cloned")
            .latency = Some(latency);
        self
    }

    /// Queues a successful answer with this text.
    pub fn push_text(&self, text: impl Into<String>) {
        self.push_completion(Completion::new(text).with_model("scripted"));
    }

    /// Queues a completion.
    pub fn push_completion(&self, completion: Completion) {
        lock(&self.shared.script).queue.push_back(Ok(completion));
    }

    /// Queues an error.
    pub fn push_error(&self, error: BackendError) {
        lock(&self.shared.script).queue.push_back(Err(error));
    }

    /// Every request received so far, in arrival order.
    #[must_use]
    pub fn requests(&self) -> Vec<CompletionRequest> {
        lock(&self.shared.script).requests.clone()
    }

    /// How many calls were made.
    #[must_use]
    pub fn calls(&self) -> usize {
        lock(&self.shared.script).requests.len()
    }

    /// How many calls are running now.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most calls that were ever running at once.
    #[must_use]
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// How many queued answers are left.
    #[must_use]
    pub fn remaining(&self) -> usize {
        lock(&self.shared.script).queue.len()
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl LlmBackend for ScriptedBackend {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let s = &*self.shared;
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let _guard = InFlight(&s.in_flight);
        let queued = {
            let mut script = lock(&self.shared.script);
            script.requests.push(request.clone());
            script.queue.pop_front()
        };
        if let Some(latency) = s.latency {
            tokio::time::sleep(latency).await;
        }
        match (queued, &s.fallback) {
            (Some(answer), _) => answer,
            (None, Some(f)) => f(&request),
            (None, None) => Err(BackendError::new(
                BackendErrorKind::Other,
                "scripted backend: script exhausted",
            )),
        }
    }

    fn name(&self) -> std::borrow::Cow<'_, str> {
        "scripted".into()
    }

    fn model(&self) -> std::borrow::Cow<'_, str> {
        "scripted".into()
    }
}

/// An instant, deterministic backend: the answer depends only on the request's seed and on
/// whether it asks for `<response>` tags (a message mentions `</response>`).
///
/// First-response requests get `"answer <seed hex> "` followed by filler up to the configured
/// length; requests with a message mentioning `</response>` get `"<response>rewrite <seed hex> ...</response>"`
/// with filler of another vocabulary, so the second response always differs from the first and
/// passes the default [`ResponseChecks`](crate::checks::ResponseChecks) (the filler does not
/// repeat itself and shares no word with the other one).
#[derive(Debug, Clone)]
pub struct FakeBackend {
    first_filler: Arc<str>,
    second_filler: Arc<str>,
    latency: Option<Duration>,
}

impl Default for FakeBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// `len` bytes (at most, cut at a word) of pseudo-words drawn from vocabulary `vocab` (0 or
/// 1; the two share no word), in an order that does not repeat word trigrams.
fn filler(len: usize, vocab: u64) -> String {
    const SYL: [&str; 16] = [
        "ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "be", "do", "fi", "gu", "ha", "je",
        "wo",
    ];
    let mut out = String::with_capacity(len + 8);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ vocab;
    while out.len() < len {
        // xorshift64: a fixed, well-spread sequence.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let i = (state % 128) as usize;
        let word_start = out.len();
        if word_start > 0 {
            out.push(' ');
        }
        out.push_str(SYL[i % 16]);
        out.push_str(SYL[(i / 16) % 8 + 8 * vocab as usize]);
        out.push_str(if vocab == 0 { "n" } else { "r" });
        if out.len() > len {
            out.truncate(word_start);
            break;
        }
    }
    if out.is_empty() {
        out.push_str(if vocab == 0 { "kan" } else { "kar" });
        out.truncate(len.max(1));
    }
    out
}

impl FakeBackend {
    /// Short answers (about 40 bytes), no latency.
    #[must_use]
    pub fn new() -> Self {
        Self::with_response_len(40)
    }

    /// Answers of about `len` bytes.
    #[must_use]
    pub fn with_response_len(len: usize) -> Self {
        FakeBackend {
            first_filler: filler(len, 0).into(),
            second_filler: filler(len, 1).into(),
            latency: None,
        }
    }

    /// Waits `latency` (tokio time) before each answer.
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = Some(latency);
        self
    }

    /// The text this backend answers to a request with this seed: a second-response answer
    /// (in `<response>` tags) when `second`, else a first response. Lets a test server answer
    /// exactly as this backend does.
    #[must_use]
    pub fn answer(&self, seed: u64, second: bool) -> String {
        let mut t =
            String::with_capacity(self.first_filler.len().max(self.second_filler.len()) + 48);
        let _ = if second {
            write!(
                t,
                "<response>rewrite {seed:016x} {}</response>",
                self.second_filler
            )
        } else {
            write!(t, "answer {seed:016x} {}", self.first_filler)
        };
        t
    }
}

#[async_trait]
impl LlmBackend for FakeBackend {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        if let Some(latency) = self.latency {
            tokio::time::sleep(latency).await;
        }
        let seed = request.seed.unwrap_or(0);
        let second = request
            .messages
            .iter()
            .any(|m| m.content.contains("</response>"));
        let prompt_len: usize = request.messages.iter().map(|m| m.content.len()).sum();
        let text = self.answer(seed, second);
        let usage = Usage::new((prompt_len / 4) as u64, (text.len() / 4) as u64);
        Ok(Completion::new(text).with_usage(usage).with_model("fake"))
    }

    fn name(&self) -> std::borrow::Cow<'_, str> {
        "fake".into()
    }

    fn model(&self) -> std::borrow::Cow<'_, str> {
        "fake".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::ResponseChecks;

    #[test]
    fn fake_answers_pass_the_content_checks() {
        for len in [1, 40, 1000, 4000] {
            let fake = FakeBackend::with_response_len(len);
            let first = fake.answer(1, false);
            let raw = fake.answer(2, true);
            let second = crate::template::extract_response(&raw);
            assert!(
                first.len() <= len + 24 && first.len() + 8 >= len.min(40),
                "{len}"
            );
            let checks = ResponseChecks::default();
            assert_eq!(checks.check_first(&first), Ok(()), "{len}");
            assert_eq!(
                checks.check_second(second, &first),
                Ok(()),
                "{len}: {second}"
            );
        }
    }
}
