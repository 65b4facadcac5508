//! `Retry<B>` against a scripted in-process backend, in paused virtual time.

use crate::support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use rmboost::backend::retry::{Retry, RetryPolicy};
use rmboost::{BackendError, BackendErrorKind, Completion, CompletionRequest, LlmBackend, Message};
use support::Scripted;

fn request() -> CompletionRequest {
    CompletionRequest::new(vec![Message::user("hi")])
}

fn attempts(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn err(kind: BackendErrorKind) -> Result<Completion, BackendError> {
    Err(BackendError::new(kind, "scripted failure"))
}

#[tokio::test(start_paused = true)]
async fn retries_retryable_errors_until_success() {
    let script = Scripted::new(vec![
        err(BackendErrorKind::Server),
        err(BackendErrorKind::Timeout),
        err(BackendErrorKind::Connection),
        err(BackendErrorKind::InvalidResponse),
        Ok(Completion::new("finally")),
    ]);
    let retry = Retry::with_policy(
        Arc::clone(&script),
        RetryPolicy::default().max_attempts(attempts(5)),
    );
    let stats = retry.stats();
    let out = retry.complete(request()).await.unwrap();
    assert_eq!(out.text, "finally");
    assert_eq!(script.calls(), 5);
    assert_eq!(stats.requests(), 1);
    assert_eq!(stats.attempts(), 5);
    assert_eq!(stats.retries(), 4);
    assert_eq!(stats.failures(), 0);
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_not_retried() {
    for kind in [
        BackendErrorKind::Authentication,
        BackendErrorKind::QuotaExhausted,
        BackendErrorKind::NotFound,
        BackendErrorKind::InvalidRequest,
        BackendErrorKind::ContentFilter,
        BackendErrorKind::Length,
        BackendErrorKind::Fatal,
        BackendErrorKind::Other,
    ] {
        let script = Scripted::new(vec![err(kind), Ok(Completion::new("never reached"))]);
        let retry = Retry::new(Arc::clone(&script));
        let start = tokio::time::Instant::now();
        let e = retry.complete(request()).await.unwrap_err();
        assert_eq!(e.kind(), kind);
        assert_eq!(script.calls(), 1, "{kind} was retried");
        assert_eq!(start.elapsed(), Duration::ZERO, "{kind} waited");
        assert_eq!(retry.stats().retries(), 0);
        assert_eq!(retry.stats().failures(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn max_attempts_is_respected() {
    let script = Scripted::new((0..10).map(|_| err(BackendErrorKind::Server)).collect());
    let retry = Retry::with_policy(
        Arc::clone(&script),
        RetryPolicy::default()
            .max_attempts(attempts(3))
            .max_elapsed(None),
    );
    let e = retry.complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Server);
    assert_eq!(script.calls(), 3);
    assert_eq!(retry.stats().attempts(), 3);
    assert_eq!(retry.stats().retries(), 2);
    assert_eq!(retry.stats().failures(), 1);
}

#[tokio::test(start_paused = true)]
async fn one_attempt_disables_retries() {
    let script = Scripted::new(vec![err(BackendErrorKind::RateLimited)]);
    let retry = Retry::with_policy(
        Arc::clone(&script),
        RetryPolicy::default().max_attempts(attempts(1)),
    );
    assert!(retry.complete(request()).await.is_err());
    assert_eq!(script.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_without_jitter_and_is_capped() {
    let script = Scripted::new((0..6).map(|_| err(BackendErrorKind::Server)).collect());
    let policy = RetryPolicy::default()
        .max_attempts(attempts(6))
        .initial_delay(Duration::from_millis(100))
        .max_delay(Duration::from_millis(500))
        .max_elapsed(None)
        .jitter(false);
    let retry = Retry::with_policy(Arc::clone(&script), policy);
    let _ = retry.complete(request()).await;
    let ms: Vec<u128> = script.gaps().iter().map(Duration::as_millis).collect();
    assert_eq!(ms, vec![100, 200, 400, 500, 500]);
}

#[tokio::test(start_paused = true)]
async fn full_jitter_stays_under_the_ceiling() {
    let script = Scripted::new((0..6).map(|_| err(BackendErrorKind::Server)).collect());
    let policy = RetryPolicy::default()
        .max_attempts(attempts(6))
        .initial_delay(Duration::from_millis(100))
        .max_delay(Duration::from_millis(500))
        .max_elapsed(None);
    let retry = Retry::with_policy(Arc::clone(&script), policy);
    let _ = retry.complete(request()).await;
    let ceilings = [100, 200, 400, 500, 500];
    for (gap, ceiling) in script.gaps().iter().zip(ceilings) {
        assert!(gap.as_millis() <= ceiling, "{gap:?} > {ceiling} ms");
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_a_floor() {
    let script = Scripted::new(vec![
        Err(BackendError::rate_limited("slow down").with_retry_after(Duration::from_secs(7))),
        Err(BackendError::server("overloaded").with_retry_after(Duration::from_secs(3))),
        Ok(Completion::new("ok")),
    ]);
    let policy = RetryPolicy::default()
        .initial_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(50));
    let retry = Retry::with_policy(Arc::clone(&script), policy);
    let start = tokio::time::Instant::now();
    assert_eq!(retry.complete(request()).await.unwrap().text, "ok");
    let gaps = script.gaps();
    assert!(gaps[0] >= Duration::from_secs(7), "{gaps:?}");
    assert!(gaps[0] < Duration::from_millis(7_051), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_secs(3), "{gaps:?}");
    assert!(start.elapsed() >= Duration::from_secs(10));
    assert_eq!(retry.stats().rate_limited(), 1);
}

#[tokio::test(start_paused = true)]
async fn time_budget_is_respected() {
    // Every wait is 1 s (no jitter); the budget of 2.5 s allows two retries, not a third.
    let script = Scripted::new((0..10).map(|_| err(BackendErrorKind::Timeout)).collect());
    let policy = RetryPolicy::default()
        .max_attempts(attempts(10))
        .initial_delay(Duration::from_secs(1))
        .max_delay(Duration::from_secs(1))
        .max_elapsed(Some(Duration::from_millis(2_500)))
        .jitter(false);
    let retry = Retry::with_policy(Arc::clone(&script), policy);
    let start = tokio::time::Instant::now();
    let e = retry.complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Timeout);
    assert_eq!(script.calls(), 3);
    assert!(start.elapsed() <= Duration::from_millis(2_500));
}

/// A `Retry-After` longer than the whole time budget (here 60 s, below `max_retry_after`)
/// can never be waited for: fatal at once, the server's error as its source.
#[tokio::test(start_paused = true)]
async fn a_retry_after_past_the_budget_gives_up_at_once() {
    let script = Scripted::new(vec![
        Err(BackendError::rate_limited("come back tomorrow")
            .with_retry_after(Duration::from_secs(86_400))),
        Ok(Completion::new("never reached")),
    ]);
    let policy = RetryPolicy::default().max_elapsed(Some(Duration::from_secs(60)));
    assert_eq!(policy.retry_after_limit(), Duration::from_secs(60));
    let retry = Retry::with_policy(Arc::clone(&script), policy);
    let start = tokio::time::Instant::now();
    let e = retry.complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::RetryAfterTooLong);
    assert!(e.is_fatal());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(86_400)));
    assert_eq!(
        e.message(),
        "the server asks to wait longer than the retry policy waits (60 s); stopping (rerun \
         later to resume)"
    );
    let source = std::error::Error::source(&e).unwrap().to_string();
    assert!(source.contains("come back tomorrow"), "{source}");
    // The wait and the status are said once each: ours in the message, the server's in the
    // source.
    assert_eq!(
        rmboost::error_chain(&e),
        "retry_after_too_long: the server asks to wait longer than the retry policy waits \
         (60 s); stopping (rerun later to resume): rate_limited: come back tomorrow (retry \
         after 86400.0s)"
    );
    assert_eq!(script.calls(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// Within the time budget, a wait up to `max_retry_after` is made; a longer limit can be set.
#[tokio::test(start_paused = true)]
async fn max_retry_after_can_be_raised() {
    let script = Scripted::new(vec![
        Err(BackendError::server("later").with_retry_after(Duration::from_secs(200))),
        Ok(Completion::new("ok")),
    ]);
    let policy = RetryPolicy::default().max_retry_after(Duration::from_secs(250));
    let retry = Retry::with_policy(Arc::clone(&script), policy);
    let start = tokio::time::Instant::now();
    assert_eq!(retry.complete(request()).await.unwrap().text, "ok");
    assert!(start.elapsed() >= Duration::from_secs(200));
}

#[tokio::test(start_paused = true)]
async fn stats_add_up_over_many_requests() {
    let mut script = Vec::new();
    for _ in 0..4 {
        script.push(err(BackendErrorKind::RateLimited));
        script.push(Ok(Completion::new("ok")));
    }
    let script = Scripted::new(script);
    let retry = Retry::new(Arc::clone(&script));
    for _ in 0..4 {
        retry.complete(request()).await.unwrap();
    }
    let stats = retry.stats();
    assert_eq!(
        (
            stats.requests(),
            stats.attempts(),
            stats.retries(),
            stats.rate_limited(),
            stats.failures()
        ),
        (4, 8, 4, 4, 0)
    );
}

#[tokio::test]
async fn forwards_name_and_model_and_is_object_safe() {
    let script = Scripted::new(vec![]);
    let retry: Arc<dyn LlmBackend> = Arc::new(Retry::new(script));
    assert_eq!(retry.name(), "scripted");
    assert_eq!(retry.model(), "script-1");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_cancels_the_wait() {
    let script = Scripted::new(vec![
        Err(BackendError::server("x").with_retry_after(Duration::from_secs(30))),
        Ok(Completion::new("late")),
    ]);
    let retry = Retry::new(Arc::clone(&script));
    let r = tokio::time::timeout(Duration::from_secs(5), retry.complete(request())).await;
    assert!(r.is_err(), "should still be waiting");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(script.calls(), 1);
}

/// A `Retry-After` longer than the policy will wait is fatal at once: no sleep, and the run
/// stops instead of failing every prompt in turn.
#[tokio::test(start_paused = true)]
async fn a_retry_after_longer_than_the_policy_waits_is_fatal() {
    let script = Scripted::new(vec![
        Err(BackendError::server("down for maintenance")
            .with_status(503)
            .with_retry_after(Duration::from_secs(3600))),
        Ok(Completion::new("never reached")),
    ]);
    let retry = Retry::new(Arc::clone(&script));
    let start = tokio::time::Instant::now();
    let e = retry.complete(request()).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(script.calls(), 1);
    assert!(e.is_fatal() && !e.is_retryable(), "{e}");
    // The chain says the wait and the status once each (the server's error is the source).
    let chain = rmboost::error_chain(&e);
    assert_eq!(chain.matches("3600").count(), 1, "{chain}");
    assert_eq!(chain.matches("503").count(), 1, "{chain}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3600)));
    assert_eq!(retry.stats().failures(), 1);
}

/// Also with retries turned off: every later request would be told the same.
#[tokio::test(start_paused = true)]
async fn a_long_retry_after_is_fatal_without_retries_too() {
    let script = Scripted::new(vec![Err(
        BackendError::rate_limited("later").with_retry_after(Duration::from_secs(7200))
    )]);
    let retry = Retry::with_policy(
        Arc::clone(&script),
        RetryPolicy::default().max_attempts(attempts(1)),
    );
    let e = retry.complete(request()).await.unwrap_err();
    assert!(e.is_fatal(), "{e}");
}

/// A wait within the policy's limit is still honoured.
#[tokio::test(start_paused = true)]
async fn a_retry_after_within_the_limit_is_waited_for() {
    let script = Scripted::new(vec![
        Err(BackendError::rate_limited("slow down").with_retry_after(Duration::from_secs(45))),
        Ok(Completion::new("ok")),
    ]);
    let retry = Retry::new(Arc::clone(&script));
    let start = tokio::time::Instant::now();
    assert_eq!(retry.complete(request()).await.unwrap().text, "ok");
    assert!(start.elapsed() >= Duration::from_secs(45));
}

/// `Stack` builds one order whatever order the wrappers are named in: the adaptive limit
/// sees every attempt (the 429 the retry absorbed included), the rate limit spends one
/// request per attempt, the meter counts the one request that reached the backend, and the
/// cache answers a repeat without reaching any of them.
#[cfg(feature = "cache")]
#[tokio::test(start_paused = true)]
async fn a_stack_puts_the_wrappers_in_one_order_whatever_order_they_are_named_in() {
    use rmboost::backend::adaptive::AdaptiveConfig;
    use rmboost::backend::cache::Cache;
    use rmboost::backend::{Stack, Stacked};
    use std::num::NonZeroUsize;

    let config = AdaptiveConfig::new(NonZeroUsize::new(8).unwrap());
    let policy = RetryPolicy::default().initial_delay(Duration::from_millis(10));
    // One request a minute: the retry must wait for the rate limit, if the limit is inside it.
    let rpm = NonZeroU32::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    type Order<'a> = Box<dyn Fn(Stack, Cache) -> Stack + 'a>;
    let orders: Vec<(&str, Order<'_>)> = vec![
        (
            "outside in",
            Box::new(|s: Stack, c: Cache| {
                s.cache(c)
                    .retry(policy.clone())
                    .adaptive(config.clone())
                    .requests_per_minute(rpm)
            }),
        ),
        (
            "inside out",
            Box::new(|s: Stack, c: Cache| {
                s.requests_per_minute(rpm)
                    .adaptive(config.clone())
                    .retry(policy.clone())
                    .cache(c)
            }),
        ),
    ];
    for (i, (name, order)) in orders.iter().enumerate() {
        let script = Scripted::new(vec![
            Err(BackendError::rate_limited("slow down").with_status(429)),
            Ok(Completion::new("hello")),
        ]);
        let cache = Cache::open(dir.path().join(format!("c{i}.redb"))).unwrap();
        let backend: Stacked = order(Stack::new(), cache.clone()).build(Arc::clone(&script));
        let request = || request().with_seed(7);

        let t0 = tokio::time::Instant::now();
        assert_eq!(
            backend.complete(request()).await.unwrap().text,
            "hello",
            "{name}"
        );
        assert_eq!(script.calls(), 2, "{name}: one retry");
        let adaptive = backend.adaptive_stats().unwrap().snapshot();
        assert_eq!(
            (adaptive.calls, adaptive.rate_limited),
            (2, 1),
            "{name}: {adaptive:?}"
        );
        assert_eq!(backend.retry_stats().unwrap().retries(), 1, "{name}");
        assert_eq!(
            backend.meter().calls(),
            1,
            "{name}: one request reached the backend"
        );
        // The retry waited for the rate limit's next slot, a minute after the first.
        assert!(
            t0.elapsed() >= Duration::from_secs(59),
            "{name}: {:?}",
            t0.elapsed()
        );

        assert_eq!(
            backend.complete(request()).await.unwrap().text,
            "hello",
            "{name}"
        );
        assert_eq!(script.calls(), 2, "{name}: answered from the cache");
        assert_eq!(backend.meter().calls(), 1, "{name}: a hit is not metered");
        assert_eq!(
            backend.adaptive_stats().unwrap().snapshot().calls,
            2,
            "{name}"
        );
        assert_eq!(cache.stats().hits, 1, "{name}");
        assert_eq!(backend.cache().unwrap().path(), cache.path(), "{name}");
    }
}
