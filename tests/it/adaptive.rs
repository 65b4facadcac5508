//! `Adaptive<B>` (adaptive concurrency, `Retry-After` pauses, circuit breaker) in paused
//! virtual time, against backends that enforce a hidden limit on calls in flight.

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use rmboost::backend::adaptive::{Adaptive, AdaptiveConfig, AdaptiveSnapshot, BreakerState};
use rmboost::backend::retry::{Retry, RetryPolicy};
use rmboost::{async_trait, BackendError, BackendErrorKind, Completion, CompletionRequest};
use rmboost::{LlmBackend, Message};
use tokio::time::Instant;

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

fn req(id: usize) -> CompletionRequest {
    CompletionRequest::new(vec![Message::user(id.to_string())])
}

fn id_of(request: &CompletionRequest) -> usize {
    request.messages[0].content.parse().unwrap()
}

/// What the test backend does with one call: `(call number, calls being served with this one
/// (rejected calls left out), time since the backend was made)` to an answer and how long it
/// takes.
type Rule = dyn Fn(usize, usize, Duration) -> (Result<(), BackendError>, Duration) + Send + Sync;

/// One call the backend received.
#[derive(Debug, Clone)]
struct Start {
    /// Arrival order over all calls.
    seq: usize,
    at: Duration,
    id: usize,
    in_flight: usize,
    /// Whether it was answered with an error.
    failed: bool,
}

/// A backend run by a rule, recording every call; answers `Ok(<request id>)`.
struct Ruled {
    rule: Box<Rule>,
    t0: Instant,
    in_flight: AtomicUsize,
    /// Calls in flight that are not being rejected.
    serving: AtomicUsize,
    starts: Mutex<Vec<Start>>,
}

impl Ruled {
    fn new(
        rule: impl Fn(usize, usize, Duration) -> (Result<(), BackendError>, Duration)
            + Send
            + Sync
            + 'static,
    ) -> Arc<Self> {
        Arc::new(Ruled {
            rule: Box::new(rule),
            t0: Instant::now(),
            in_flight: AtomicUsize::new(0),
            serving: AtomicUsize::new(0),
            starts: Mutex::new(Vec::new()),
        })
    }

    /// Answers 429 at once when `k` calls are being served, else succeeds after `latency`.
    fn capped(k: usize, latency: Duration) -> Arc<Self> {
        Self::capped_with(k, latency, Duration::ZERO)
    }

    /// Answers 429 after `reject_after` when `k` calls are being served, else succeeds after
    /// `latency`.
    fn capped_with(k: usize, latency: Duration, reject_after: Duration) -> Arc<Self> {
        Ruled::new(move |_, serving, _| {
            if serving > k {
                (
                    Err(BackendError::rate_limited("too many requests").with_status(429)),
                    reject_after,
                )
            } else {
                (Ok(()), latency)
            }
        })
    }

    /// As [`capped_with`](Self::capped_with), with each success taking `latency` give or take
    /// a ninth.
    fn capped_jittered(k: usize, latency: Duration, reject_after: Duration) -> Arc<Self> {
        Ruled::new(move |seq, serving, _| {
            if serving > k {
                (
                    Err(BackendError::rate_limited("too many requests").with_status(429)),
                    reject_after,
                )
            } else {
                (Ok(()), jittered(seq, latency))
            }
        })
    }

    fn starts(&self) -> Vec<Start> {
        self.starts.lock().unwrap().clone()
    }
}

struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl LlmBackend for Ruled {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _leave = Leave(&self.in_flight);
        let at = self.t0.elapsed();
        let id = id_of(&request);
        let mut serving = None;
        let (answer, latency) = {
            let mut starts = self.starts.lock().unwrap();
            let seq = starts.len();
            let with_this = self.serving.load(Ordering::SeqCst) + 1;
            let (answer, latency) = (self.rule)(seq, with_this, at);
            if answer.is_ok() {
                self.serving.fetch_add(1, Ordering::SeqCst);
                serving = Some(Leave(&self.serving));
            }
            starts.push(Start {
                seq,
                at,
                id,
                in_flight,
                failed: answer.is_err(),
            });
            (answer, latency)
        };
        // An instant answer does not yield: it reaches the wrapper in the same poll.
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        drop(serving);
        answer.map(|()| Completion::new(id.to_string()))
    }

    fn name(&self) -> std::borrow::Cow<'_, str> {
        "ruled".into()
    }

    fn model(&self) -> std::borrow::Cow<'_, str> {
        "ruled-1".into()
    }
}

/// A retry policy that never gives up on a rate limit in these tests.
fn patient() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(NonZeroU32::new(1_000).unwrap())
        .max_elapsed(None)
}

/// Drives `n` requests through `Retry(Adaptive(capped(k, 50 ms)))` from 256 callers with a
/// cap of 256, and checks that the limit settles near `k` with few 429s.
async fn settles_near(k: usize) {
    let latency = Duration::from_millis(50);
    let n = 400 * k; // about 20 s of virtual time at the hidden limit
                     // A 429 takes 1 ms: the first 256 calls are all out before any answer comes back.
    let backend = Ruled::capped_jittered(k, latency, Duration::from_millis(1));
    let adaptive = Adaptive::new(Arc::clone(&backend), nz(256));
    let stats = adaptive.stats();
    // Every request completes, exactly once, with its own answer; the limit is sampled every
    // 10 ms.
    let (samples, elapsed) = drive(adaptive, n, 256).await;

    // The limit over the second half of the run stays in a band around k.
    let late: Vec<usize> = samples
        .iter()
        .filter(|(at, _)| *at >= elapsed / 2)
        .map(|&(_, l)| l)
        .collect();
    assert!(late.len() > 10, "{} samples", late.len());
    let (lo, hi) = (*late.iter().min().unwrap(), *late.iter().max().unwrap());
    let mean = late.iter().sum::<usize>() as f64 / late.len() as f64;
    let snapshot = stats.snapshot();

    // 429s: over the run, and over its second half (after the descent from 256).
    let starts = backend.starts();
    let rejected = starts.iter().filter(|s| s.failed).count();
    let late_starts: Vec<&_> = starts.iter().filter(|s| s.at >= elapsed / 2).collect();
    let late_rejected = late_starts.iter().filter(|s| s.failed).count();
    let late_share = late_rejected as f64 / late_starts.len() as f64;
    let share = rejected as f64 / starts.len() as f64;
    // Throughput against the bound k / L.
    let bound = k as f64 / latency.as_secs_f64();
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "k={k}: limit over the second half {lo}..{hi} (mean {mean:.1}); {:.1}% of the bound \
         k/L; 429s {rejected} of {} calls ({:.2}%), {:.2}% in the second half; \
         stats {snapshot:?}",
        100.0 * rate / bound,
        starts.len(),
        100.0 * share,
        100.0 * late_share
    );
    let kf = k as f64;
    assert!(lo as f64 >= (0.6 * kf).floor(), "k={k}: limit fell to {lo}");
    assert!(hi as f64 <= (1.1 * kf).ceil(), "k={k}: limit rose to {hi}");
    assert!(
        (0.75 * kf..=1.05 * kf).contains(&mean),
        "k={k}: mean limit {mean:.1}"
    );
    assert!(
        late_share < 0.05,
        "k={k}: {late_share:.3} of late calls 429"
    );
    // The start at 256 costs one burst; the whole run stays well under a fifth.
    assert!(share < 0.15, "k={k}: {share:.3} of calls 429");
    assert!(rate >= 0.85 * bound, "k={k}: {rate:.0}/s of {bound:.0}/s");
    // The statistics agree with the backend.
    assert_eq!(snapshot.calls, starts.len() as u64);
    assert_eq!(snapshot.rate_limited, rejected as u64);
    assert_eq!((snapshot.in_flight, snapshot.waiting), (0, 0));
    assert!(snapshot.min_limit <= lo && snapshot.max_limit >= hi);
    assert_eq!(snapshot.breaker, BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn limit_settles_near_a_hidden_limit_of_8() {
    settles_near(8).await;
}

#[tokio::test(start_paused = true)]
async fn limit_settles_near_a_hidden_limit_of_32() {
    settles_near(32).await;
}

#[tokio::test(start_paused = true)]
async fn limit_settles_near_a_hidden_limit_of_100() {
    settles_near(100).await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_429s_cuts_the_limit_once() {
    // The 429s come back 10 ms after the calls were sent, all together.
    let backend = Ruled::capped_with(8, Duration::from_millis(50), Duration::from_millis(10));
    // No cool-down: the epoch guard alone holds the cut to one.
    let config = AdaptiveConfig::builder(nz(64))
        .initial_limit(nz(64))
        .cooldown(Duration::ZERO)
        .build()
        .unwrap();
    let adaptive = Adaptive::with_config(Arc::clone(&backend), config);
    let stats = adaptive.stats();
    // 64 calls at once, no retries: 56 are rate limited, all admitted under the first limit.
    let results = join_all((0..64).map(|i| adaptive.complete(req(i)))).await;
    let limited = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|e| e.kind() == BackendErrorKind::RateLimited)
        })
        .count();
    assert_eq!(limited, 56);
    let s = stats.snapshot();
    assert_eq!((s.rate_limited, s.calls), (56, 64));
    assert_eq!(s.decreases, 1, "one cut for one burst");
    assert_eq!(s.limit, 54);
    assert_eq!((s.min_limit, s.max_limit), (54, 54));

    // A second burst, admitted under the new limit, cuts once more.
    let results = join_all((0..54).map(|i| adaptive.complete(req(i)))).await;
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 46);
    let s = stats.snapshot();
    assert_eq!((s.decreases, s.limit), (2, 45));
}

#[tokio::test(start_paused = true)]
async fn errors_come_back_unchanged() {
    let backend = Ruled::new(|seq, _, _| {
        let err = match seq {
            0 => BackendError::rate_limited("slow down")
                .with_status(429)
                .with_retry_after(Duration::from_secs(3)),
            1 => BackendError::server("boom").with_status(503),
            _ => BackendError::new(BackendErrorKind::InvalidRequest, "too long").with_status(400),
        };
        (Err(err), Duration::ZERO)
    });
    let adaptive = Adaptive::new(backend, nz(4));
    let e = adaptive.complete(req(0)).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::RateLimited);
    assert_eq!((e.message(), e.status()), ("slow down", Some(429)));
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    let e = adaptive.complete(req(1)).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.message(), e.status()),
        (BackendErrorKind::Server, "boom", Some(503))
    );
    let e = adaptive.complete(req(2)).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::InvalidRequest);
    assert_eq!(e.to_string(), "invalid_request (HTTP 400): too long");
}

#[tokio::test(start_paused = true)]
async fn a_lone_retry_after_delays_only_its_own_call() {
    let pause = Duration::from_secs(5);
    // Call 40 is rate limited with Retry-After 5 s; every other call succeeds after 50 ms.
    let backend = Ruled::new(move |seq, _, _| {
        if seq == 40 {
            (
                Err(BackendError::rate_limited("wait").with_retry_after(pause)),
                Duration::ZERO,
            )
        } else {
            (Ok(()), Duration::from_millis(50))
        }
    });
    let adaptive = Adaptive::new(Arc::clone(&backend), nz(16));
    let stats = adaptive.stats();
    let retry = Retry::with_policy(adaptive, patient());
    let n = 200;
    let t0 = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| retry.complete(req(i)))
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(results.iter().all(Result::is_ok));
    let starts = backend.starts();
    assert_eq!(starts.len(), n + 1);
    let limited = &starts[40];
    assert!(limited.failed);
    // The others went on at once (16 at a time, 50 ms each)...
    assert_eq!(starts[41].at, limited.at);
    // ...and the one call waited its 5 s before it was sent again.
    let again = starts[41..]
        .iter()
        .find(|s| s.id == limited.id)
        .expect("sent again");
    assert!(
        again.seq > 41 && again.at >= limited.at + pause,
        "{again:?}"
    );
    assert!(t0.elapsed() < limited.at + pause + Duration::from_millis(100));
    let s = stats.snapshot();
    assert_eq!((s.pauses, s.rate_limited, s.congestion), (0, 1, 0));
    assert_eq!((s.limit, s.decreases), (16, 0));
}

/// A provider at its per-minute limit: from 1 s to 6 s every call is answered 429 with a
/// `Retry-After` to the end of the window.
fn quota_window() -> Arc<Ruled> {
    let (from, to) = (Duration::from_secs(1), Duration::from_secs(6));
    Ruled::new(move |_, _, at| {
        if at >= from && at < to {
            let wait = (to - at).as_secs().max(1);
            (
                Err(BackendError::rate_limited("requests per minute")
                    .with_status(429)
                    .with_retry_after(Duration::from_secs(wait))),
                Duration::ZERO,
            )
        } else {
            (Ok(()), Duration::from_millis(50))
        }
    })
}

/// Runs `n` requests through `Retry(Adaptive(backend))` from 16 callers.
async fn run_all(adaptive: Adaptive<Arc<Ruled>>, n: usize) {
    let retry = Retry::with_policy(adaptive, patient());
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| retry.complete(req(i)))
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(results.iter().all(Result::is_ok));
}

/// The first call refused in the window, the first call started after it, and how many were
/// refused.
fn window_starts(backend: &Ruled) -> (Duration, Duration, usize) {
    let starts = backend.starts();
    let first = starts.iter().position(|s| s.failed).expect("a 429");
    let refused = starts.iter().filter(|s| s.failed).count();
    let resumed = starts[first..]
        .iter()
        .find(|s| !s.failed)
        .expect("a success after");
    (starts[first].at, resumed.at, refused)
}

#[tokio::test(start_paused = true)]
async fn retry_after_with_congestion_pauses_everyone() {
    let backend = quota_window();
    let adaptive = Adaptive::new(Arc::clone(&backend), nz(16));
    let stats = adaptive.stats();
    run_all(adaptive, 600).await;
    let (first, resumed, refused) = window_starts(&backend);
    assert!(first >= Duration::from_secs(1));
    // Five refusals make congestion; the pause holds every caller until the window ends
    // (the calls in flight when it began were refused too, then waited).
    assert!(refused <= 16 + 5, "{refused} calls refused");
    assert!(resumed >= Duration::from_secs(6), "{resumed:?}");
    let s = stats.snapshot();
    assert!(s.pauses >= 1 && s.congestion >= 1, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_fixed_limit_does_not_adapt_but_still_pauses() {
    let backend = Ruled::capped_with(8, Duration::from_millis(50), Duration::from_millis(10));
    let config = AdaptiveConfig::builder(nz(32))
        .adaptive(false)
        .build()
        .unwrap();
    let adaptive = Adaptive::with_config(Arc::clone(&backend), config);
    let stats = adaptive.stats();
    let results = join_all((0..64).map(|i| adaptive.complete(req(i)))).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert!(failed >= 24, "{failed}");
    let s = stats.snapshot();
    assert_eq!((s.limit, s.decreases, s.increases), (32, 0, 0));
    assert_eq!((s.rate_limited, s.calls), (failed as u64, 64));
    assert!(backend.starts().iter().all(|s| s.in_flight <= 32));
    assert!(backend.starts().iter().any(|s| s.in_flight == 32));

    // A server that tells every call to wait still pauses everyone.
    let backend = quota_window();
    let config = AdaptiveConfig::builder(nz(16))
        .adaptive(false)
        .build()
        .unwrap();
    let adaptive = Adaptive::with_config(Arc::clone(&backend), config);
    let stats = adaptive.stats();
    run_all(adaptive, 600).await;
    let (_, resumed, refused) = window_starts(&backend);
    assert!(refused <= 16 + 5, "{refused} calls refused");
    assert!(resumed >= Duration::from_secs(6), "{resumed:?}");
    assert_eq!(stats.snapshot().limit, 16);

    // A lone Retry-After does not.
    let t0 = Instant::now();
    let paused = Ruled::new(|seq, _, _| match seq {
        0 => (
            Err(BackendError::rate_limited("wait").with_retry_after(Duration::from_secs(2))),
            Duration::ZERO,
        ),
        _ => (Ok(()), Duration::ZERO),
    });
    let config = AdaptiveConfig::builder(nz(32))
        .adaptive(false)
        .build()
        .unwrap();
    let adaptive = Adaptive::with_config(Arc::clone(&paused), config);
    assert!(adaptive.complete(req(0)).await.is_err());
    adaptive.complete(req(1)).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_long_retry_after_is_clamped() {
    // The first five calls are told to wait an hour: congestion, and a pause cut to 10 s.
    let backend = Ruled::new(|seq, _, _| {
        if seq < 5 {
            (
                Err(BackendError::rate_limited("wait").with_retry_after(Duration::from_secs(3600))),
                Duration::ZERO,
            )
        } else {
            (Ok(()), Duration::ZERO)
        }
    });
    let config = AdaptiveConfig::builder(nz(4))
        .max_pause(Duration::from_secs(10))
        .build()
        .unwrap();
    let adaptive = Adaptive::with_config(Arc::clone(&backend), config);
    let t0 = Instant::now();
    for i in 0..5 {
        assert!(adaptive.complete(req(i)).await.is_err());
    }
    assert_eq!(t0.elapsed(), Duration::ZERO);
    adaptive.complete(req(5)).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(10));
}

/// Whether call `seq` draws a fault of probability `per_mille`/1000 (a fixed hash of the call
/// number and `salt`: the same calls fail in every run).
fn chance(seq: usize, salt: u64, per_mille: u64) -> bool {
    let mut x = (seq as u64) ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    x % 1000 < per_mille
}

/// `latency` give or take a ninth, by call (answers that take exactly the same time keep
/// calls sent together in lockstep, which real servers do not).
fn jittered(seq: usize, latency: Duration) -> Duration {
    let spread = (0..10).filter(|&i| chance(seq, 100 + i, 500)).count() as u32;
    latency * (40 + spread) / 45
}

/// A random 429 with `Retry-After: 1`, as a provider sends now and then whatever the load.
fn random_429() -> BackendError {
    BackendError::rate_limited("too many requests (noise)")
        .with_status(429)
        .with_retry_after(Duration::from_secs(1))
}

/// Runs `n` requests from `callers` callers through `Retry(adaptive)`, sampling the limit every
/// 10 ms; returns the samples and the run's time, and checks that every request succeeded
/// once, with its own answer.
async fn drive(
    adaptive: Adaptive<Arc<Ruled>>,
    n: usize,
    callers: usize,
) -> (Vec<(Duration, usize)>, Duration) {
    let stats = adaptive.stats();
    let retry = Retry::with_policy(adaptive, patient());
    let t0 = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (stats, samples) = (Arc::clone(&stats), Arc::clone(&samples));
        tokio::spawn(async move {
            loop {
                samples
                    .lock()
                    .unwrap()
                    .push((t0.elapsed(), stats.snapshot().limit));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let results: Vec<(usize, Result<Completion, BackendError>)> = futures::stream::iter(0..n)
        .map(|i| {
            let retry = &retry;
            async move { (i, retry.complete(req(i)).await) }
        })
        .buffer_unordered(callers)
        .collect()
        .await;
    sampler.abort();
    let mut seen = vec![false; n];
    for (i, result) in &results {
        assert_eq!(
            result.as_ref().expect("every request succeeds").text,
            i.to_string()
        );
        assert!(!std::mem::replace(&mut seen[*i], true), "{i} twice");
    }
    let samples = samples.lock().unwrap().clone();
    (samples, t0.elapsed())
}

/// `Adaptive` with this cap, starting at it.
fn at_cap(backend: &Arc<Ruled>, cap: usize) -> Adaptive<Arc<Ruled>> {
    let config = AdaptiveConfig::builder(nz(cap))
        .initial_limit(nz(cap))
        .build()
        .unwrap();
    Adaptive::with_config(Arc::clone(backend), config)
}

/// Runs `n` requests from `callers` callers through an `Adaptive` at a cap of 64 (starting
/// there) and checks that nothing moved: the limit stayed at 64, no congestion, no cut, no
/// pause, no breaker. Returns the statistics and the run's time.
async fn assert_nothing_moves(
    backend: &Arc<Ruled>,
    n: usize,
    callers: usize,
) -> (AdaptiveSnapshot, Duration) {
    let adaptive = at_cap(backend, 64);
    let stats = adaptive.stats();
    let (samples, elapsed) = drive(adaptive, n, callers).await;
    let s = stats.snapshot();
    println!("{s:?}, {elapsed:?}");
    assert_eq!(
        (s.congestion, s.decreases, s.pauses, s.breaker_opened),
        (0, 0, 0, 0),
        "{s:?}"
    );
    assert!(samples.iter().all(|&(_, l)| l == 64));
    (s, elapsed)
}

fn mean_limit(samples: &[(Duration, usize)], after: Duration) -> f64 {
    let late: Vec<usize> = samples
        .iter()
        .filter(|(at, _)| *at >= after)
        .map(|&(_, l)| l)
        .collect();
    late.iter().sum::<usize>() as f64 / late.len().max(1) as f64
}

#[tokio::test(start_paused = true)]
async fn a_steady_five_percent_of_random_429s_moves_nothing() {
    let latency = Duration::from_millis(50);
    // 5% of calls get a 429 with Retry-After: 1 whatever the load; the rest succeed in 40 to
    // 60 ms.
    let noisy = move || {
        Ruled::new(move |seq, _, _| {
            if chance(seq, 5, 50) {
                (Err(random_429()), Duration::ZERO)
            } else {
                (Ok(()), jittered(seq, latency))
            }
        })
    };
    // At the cap: it stays there, nobody pauses.
    let (s, elapsed) = assert_nothing_moves(&noisy(), 20_000, 192).await;
    assert!(s.rate_limited > 800, "{s:?}");
    // 20,000 calls at 64 in flight and 50 ms: about 16 s; each noisy call's own second of
    // waiting overlaps the others. The end is set by the last requests' retries, whose waits
    // are drawn at random (full jitter: up to 1, 1, 2 and 4 s for a request refused four times
    // in a row), so the bound leaves that tail room; one pause of everyone per 429 would cost
    // about a thousand seconds.
    assert!(elapsed < Duration::from_secs(25), "{elapsed:?}");

    // From a low start it climbs to the cap through the same noise.
    let backend = noisy();
    let config = AdaptiveConfig::builder(nz(64))
        .initial_limit(nz(8))
        .build()
        .unwrap();
    let adaptive = Adaptive::with_config(Arc::clone(&backend), config);
    let stats = adaptive.stats();
    let (samples, elapsed) = drive(adaptive, 20_000, 128).await;
    let s = stats.snapshot();
    println!("from 8: {s:?}, {elapsed:?}");
    assert_eq!(s.limit, 64, "{s:?}");
    assert!(mean_limit(&samples, elapsed / 2) >= 63.0);
    assert_eq!(s.pauses, 0);
}

#[tokio::test(start_paused = true)]
async fn a_fifth_of_calls_failing_with_500_moves_nothing() {
    let backend = Ruled::new(|seq, _, _| {
        if chance(seq, 20, 200) {
            (
                Err(BackendError::server("internal error (noise)").with_status(500)),
                Duration::from_millis(5),
            )
        } else {
            (Ok(()), Duration::from_millis(50))
        }
    });
    assert_nothing_moves(&backend, 10_000, 128).await;
    assert!(backend.starts().iter().filter(|s| s.failed).count() > 2_000);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_timeouts_from_one_bad_connection_moves_nothing() {
    // Calls 300 to 311 hang on one bad connection and time out together 5 s later; the others
    // succeed in 50 ms.
    let backend = Ruled::new(|seq, _, _| {
        if (300..312).contains(&seq) {
            (
                Err(BackendError::new(BackendErrorKind::Timeout, "timed out")),
                Duration::from_secs(5),
            )
        } else {
            (Ok(()), Duration::from_millis(50))
        }
    });
    let (s, _) = assert_nothing_moves(&backend, 10_000, 128).await;
    // The timeouts reached the backend, and were counted.
    assert_eq!(backend.starts().iter().filter(|s| s.failed).count(), 12);
    assert!(s.calls >= 10_000);
}

#[tokio::test(start_paused = true)]
async fn a_capped_server_with_random_429s_is_still_found() {
    // 429 above 32 in flight, and 5% of the others get a random 429 (Retry-After: 1).
    let k = 32;
    let latency = Duration::from_millis(50);
    let backend = Ruled::new(move |seq, serving, _| {
        if serving > k {
            (
                Err(BackendError::rate_limited("too many in flight").with_status(429)),
                Duration::from_millis(1),
            )
        } else if chance(seq, 7, 50) {
            (Err(random_429()), Duration::from_millis(1))
        } else {
            (Ok(()), latency)
        }
    });
    let adaptive = Adaptive::new(Arc::clone(&backend), nz(256));
    let stats = adaptive.stats();
    let n = 12_000;
    let (samples, elapsed) = drive(adaptive, n, 256).await;
    let s = stats.snapshot();
    let mean = mean_limit(&samples, elapsed / 2);
    // The rate of successes over the middle half: the start (the descent from 256) and the
    // end (the last requests waiting out their Retry-After) are not the steady state.
    let (from, to) = (elapsed / 4, elapsed * 3 / 4);
    let done = backend
        .starts()
        .iter()
        .filter(|s| !s.failed && s.at >= from && s.at < to)
        .count();
    let rate = done as f64 / (to - from).as_secs_f64();
    let bound = k as f64 / latency.as_secs_f64();
    let share = s.rate_limited as f64 / s.calls as f64;
    println!(
        "{s:?}: mean limit {mean:.1}, {:.1}% of the bound, {:.2}% 429",
        100.0 * rate / bound,
        100.0 * share
    );
    assert!((0.9 * k as f64..=1.05 * k as f64).contains(&mean), "{mean}");
    // 5% noise plus the probes and the descent from 256.
    assert!(share < 0.10, "{share}");
    assert!(rate >= 0.9 * bound, "{rate}");
}

#[tokio::test(start_paused = true)]
async fn a_token_bucket_rate_limit_is_obeyed() {
    // 600 requests a minute, refilled continuously, a bucket of one second's worth; while it is
    // empty every call is refused at once with a Retry-After to the next token (rounded up to
    // whole seconds, as the header is). A call takes 1.5 to 2.5 s, 2 s on average (as an LLM
    // call varies), so the rate needs 20 in flight.
    let rate = 10.0;
    let bucket = Arc::new(Mutex::new((rate, Duration::ZERO)));
    let backend = {
        let bucket = Arc::clone(&bucket);
        Ruled::new(move |seq, _, at| {
            let mut b = bucket.lock().unwrap();
            b.0 = (b.0 + (at - b.1).as_secs_f64() * rate).min(rate);
            b.1 = at;
            if b.0 >= 1.0 {
                b.0 -= 1.0;
                (Ok(()), jittered(seq, Duration::from_secs(2)))
            } else {
                let wait = ((1.0 - b.0) / rate).ceil().max(1.0);
                (
                    Err(BackendError::rate_limited("requests per minute")
                        .with_status(429)
                        .with_retry_after(Duration::from_secs_f64(wait))),
                    Duration::from_millis(1),
                )
            }
        })
    };
    let adaptive = Adaptive::new(Arc::clone(&backend), nz(64));
    let stats = adaptive.stats();
    // Ten minutes at the rate: the first burst of 64 into a bucket of 10, and the descent
    // from 64 to about 20, cost some 100 429s whatever the run's length.
    let n = 6_000;
    let (samples, elapsed) = drive(adaptive, n, 64).await;
    let s = stats.snapshot();
    let achieved = n as f64 / elapsed.as_secs_f64();
    let share = s.rate_limited as f64 / s.calls as f64;
    // After the first 30 s (the burst into the bucket and the descent from the cap).
    let settled = Duration::from_secs(30);
    let late: Vec<_> = backend
        .starts()
        .into_iter()
        .filter(|s| s.at >= settled)
        .collect();
    let late_share = late.iter().filter(|s| s.failed).count() as f64 / late.len() as f64;
    let late_rate =
        late.iter().filter(|s| !s.failed).count() as f64 / (elapsed - settled).as_secs_f64();
    println!(
        "{s:?}: {achieved:.2}/s of {rate}/s, {:.2}% 429; after 30 s {late_rate:.2}/s, {:.2}% \
         429; mean limit {:.1}, {elapsed:?}",
        100.0 * share,
        100.0 * late_share,
        mean_limit(&samples, elapsed / 2)
    );
    assert!(achieved >= 0.9 * rate, "{achieved}");
    assert!(late_rate >= 0.9 * rate, "{late_rate}");
    assert!(share < 0.05 && late_share < 0.05, "{share} {late_share}");
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_probes_and_closes() {
    let down = Arc::new(AtomicBool::new(true));
    let backend = {
        let down = Arc::clone(&down);
        Ruled::new(move |_, _, _| {
            if down.load(Ordering::SeqCst) {
                (
                    Err(BackendError::new(BackendErrorKind::Connection, "refused")),
                    Duration::ZERO,
                )
            } else {
                (Ok(()), Duration::from_millis(50))
            }
        })
    };
    // Defaults: 5 failures in a row open it for 2 s, then 4 s, ...
    let adaptive = Adaptive::new(Arc::clone(&backend), nz(8));
    let stats = adaptive.stats();
    let t0 = Instant::now();
    for i in 0..5 {
        assert_eq!(stats.snapshot().breaker, BreakerState::Closed);
        let e = adaptive.complete(req(i)).await.unwrap_err();
        assert_eq!(
            (e.kind(), e.message()),
            (BackendErrorKind::Connection, "refused")
        );
    }
    assert_eq!(stats.snapshot().breaker, BreakerState::Open);
    assert_eq!(stats.snapshot().breaker_opened, 1);

    // The backend comes back after 5 s.
    let up = {
        let down = Arc::clone(&down);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            down.store(false, Ordering::SeqCst);
        })
    };
    let results = join_all((5..15).map(|i| adaptive.complete(req(i)))).await;
    up.await.unwrap();
    // The probe at 2 s failed (its caller gets the error); the one at 6 s succeeded, then the
    // others went.
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    assert!(results[0].is_err());
    let starts: Vec<(Duration, usize)> = backend.starts()[5..]
        .iter()
        .map(|s| (s.at, s.in_flight))
        .collect();
    let ms = Duration::from_millis;
    assert_eq!(starts[0], (ms(2_000), 1), "first probe alone after 2 s");
    assert_eq!(starts[1], (ms(6_000), 1), "second probe alone 4 s later");
    for &(at, _) in &starts[2..] {
        assert_eq!(at, ms(6_050), "the rest after the probe succeeded");
    }
    // The probe that failed, the one that succeeded, and the 8 others (the cap) at once.
    assert_eq!(starts.len(), 10);
    assert_eq!(t0.elapsed(), ms(6_100));
    let s = stats.snapshot();
    assert_eq!(s.breaker, BreakerState::Closed);
    assert_eq!(s.breaker_opened, 2);
    assert_eq!(s.calls, 15);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_frees_its_place() {
    let backend = Ruled::new(|_, _, _| (Ok(()), Duration::from_secs(1)));
    let adaptive = Adaptive::new(Arc::clone(&backend), nz(1));
    let stats = adaptive.stats();
    let (a, b, c, d, waiting) = tokio::join!(
        adaptive.complete(req(0)),
        // Gives up after 100 ms, while it waits behind 0.
        tokio::time::timeout(Duration::from_millis(100), adaptive.complete(req(1))),
        adaptive.complete(req(2)),
        adaptive.complete(req(3)),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let before = stats.snapshot().waiting;
            tokio::time::sleep(Duration::from_millis(100)).await;
            (before, stats.snapshot().waiting)
        }
    );
    assert!(b.is_err(), "1 timed out");
    assert_eq!(waiting, (3, 2));
    for (r, i) in [(a, 0), (c, 2), (d, 3)] {
        assert_eq!(r.unwrap().text, i.to_string());
    }
    let starts: Vec<(usize, Duration)> = backend.starts().iter().map(|s| (s.id, s.at)).collect();
    let s = Duration::from_secs;
    assert_eq!(starts, vec![(0, s(0)), (2, s(1)), (3, s(2))]);
    assert_eq!(
        (stats.snapshot().in_flight, stats.snapshot().waiting),
        (0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_frees_its_slot() {
    let backend = Ruled::new(|_, _, _| (Ok(()), Duration::from_secs(1)));
    let adaptive = Adaptive::new(Arc::clone(&backend), nz(1));
    let stats = adaptive.stats();
    let (first, second) = tokio::join!(
        tokio::time::timeout(Duration::from_millis(100), adaptive.complete(req(0))),
        adaptive.complete(req(1)),
    );
    assert!(first.is_err());
    assert_eq!(second.unwrap().text, "1");
    let starts: Vec<(usize, Duration)> = backend.starts().iter().map(|s| (s.id, s.at)).collect();
    assert_eq!(
        starts,
        vec![(0, Duration::ZERO), (1, Duration::from_millis(100))]
    );
    // A cancelled call is no result: not counted, nothing learnt.
    let s = stats.snapshot();
    assert_eq!((s.calls, s.in_flight, s.limit), (1, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served() {
    let backend = Ruled::new(|_, _, _| (Ok(()), Duration::from_millis(10)));
    let adaptive = Adaptive::new(Arc::clone(&backend), nz(2));
    let results = join_all((0..30).map(|i| adaptive.complete(req(i)))).await;
    assert!(results.iter().all(Result::is_ok));
    let order: Vec<usize> = backend.starts().iter().map(|s| s.id).collect();
    assert_eq!(order, (0..30).collect::<Vec<_>>());
    assert!(backend.starts().iter().all(|s| s.in_flight <= 2));
}

#[tokio::test]
async fn forwards_name_and_model_and_is_object_safe() {
    let wrapped: Box<dyn LlmBackend> = Box::new(Retry::new(Adaptive::new(
        Ruled::capped(1, Duration::ZERO),
        nz(4),
    )));
    assert_eq!(wrapped.name(), "ruled");
    assert_eq!(wrapped.model(), "ruled-1");
}

// ---------------------------------------------------------------------------------------------
// Replicas: several replicas of one model as one backend.

#[cfg(feature = "test-util")]
mod replicas {
    use super::*;
    use rmboost::backend::{Replicas, Stack};
    use rmboost::testing::ScriptedBackend;
    use rmboost::Completion;
    use std::collections::{BTreeSet, HashMap};

    /// The two calls of example `i`: the first asks the prompt, the second adds a system
    /// message (as the method's second call does).
    fn calls_of(i: usize) -> [CompletionRequest; 2] {
        let prompt = format!("question {i}");
        [
            CompletionRequest::new(vec![Message::user(prompt.clone())]),
            CompletionRequest::new(vec![
                Message::system("Answer better than the reference."),
                Message::user(prompt),
            ]),
        ]
    }

    fn replica(name: &'static str, up: Arc<AtomicBool>) -> ScriptedBackend {
        ScriptedBackend::from_fn(move |_| {
            if up.load(Ordering::SeqCst) {
                Ok(Completion::new(name))
            } else {
                Err(BackendError::new(
                    BackendErrorKind::Connection,
                    "connection refused",
                ))
            }
        })
        .with_latency(Duration::from_millis(50))
    }

    fn three(up: [&Arc<AtomicBool>; 3]) -> Replicas {
        Replicas::new(AdaptiveConfig::new(nz(32)))
            .replica("a", replica("a", Arc::clone(up[0])))
            .replica("b", replica("b", Arc::clone(up[1])))
            .replica("c", replica("c", Arc::clone(up[2])))
    }

    #[tokio::test(start_paused = true)]
    async fn both_calls_of_an_example_go_to_one_replica_and_examples_spread() {
        let up = [0, 1, 2].map(|_| Arc::new(AtomicBool::new(true)));
        let replicas = three([&up[0], &up[1], &up[2]]);
        let backend = Stack::new().build(replicas.clone());
        let answers = join_all((0..300).map(|i| {
            let backend = backend.clone();
            async move {
                let [first, second] = calls_of(i);
                let a = backend.complete(first).await.unwrap().text;
                let b = backend.complete(second).await.unwrap().text;
                (a, b)
            }
        }))
        .await;
        let mut per: HashMap<String, usize> = HashMap::new();
        for (a, b) in &answers {
            assert_eq!(a, b, "an example's calls went to two replicas");
            *per.entry(a.clone()).or_default() += 1;
        }
        assert_eq!(per.len(), 3, "{per:?}");
        assert!(per.values().all(|&n| (70..=130).contains(&n)), "{per:?}");
        let stats = replicas.stats();
        assert_eq!(stats.iter().map(|r| r.calls).sum::<u64>(), 600);
        assert!(stats.iter().all(|r| r.errors == 0 && r.drains == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_replica_is_drained_its_examples_move_and_it_is_probed_back() {
        let up = [0, 1, 2].map(|_| Arc::new(AtomicBool::new(true)));
        let replicas = three([&up[0], &up[1], &up[2]]);
        let backend = Stack::new()
            .retry(RetryPolicy::default().initial_delay(Duration::from_millis(10)))
            .build(replicas.clone());
        // "b" goes down: every call still succeeds, through the others.
        up[1].store(false, Ordering::SeqCst);
        let run = |range: std::ops::Range<usize>| {
            let backend = backend.clone();
            async move {
                join_all(range.map(|i| {
                    let backend = backend.clone();
                    async move {
                        let [first, second] = calls_of(i);
                        let a = backend.complete(first).await.unwrap().text;
                        let b = backend.complete(second).await.unwrap().text;
                        (a, b)
                    }
                }))
                .await
            }
        };
        let answers = run(0..300).await;
        let served: BTreeSet<&str> = answers.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(served, BTreeSet::from(["a", "c"]));
        let moved = answers.iter().filter(|(a, b)| a != b).count();
        assert_eq!(moved, 0, "once moved, an example stays on its new replica");
        let b = &replicas.stats()[1];
        assert!(b.drains >= 1 && b.drained, "{b:?}");
        // Every call "b" took failed: those sent or queued before it was drained (each retried
        // on another replica), far fewer than the third of the 600 calls it would serve.
        assert_eq!(b.calls, b.errors);
        assert!(b.errors < 150, "{b:?}");

        // "b" comes back: after its pause a probe succeeds and its keys return to it.
        up[1].store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(61)).await;
        let answers = run(300..600).await;
        let served: BTreeSet<&str> = answers.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(served, BTreeSet::from(["a", "b", "c"]));
        assert!(!replicas.stats()[1].drained);
    }
}
