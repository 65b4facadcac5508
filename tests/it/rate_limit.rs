//! `RateLimit<B>` in paused virtual time.

use crate::support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rmboost::backend::rate_limit::RateLimit;
use rmboost::{Completion, CompletionRequest, LlmBackend, Message};
use support::Scripted;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn ok_script(n: usize) -> Arc<Scripted> {
    Scripted::new((0..n).map(|_| Ok(Completion::new("ok"))).collect())
}

#[tokio::test(start_paused = true)]
async fn requests_per_minute_allows_a_burst_then_the_steady_rate() {
    let script = ok_script(12);
    let limited = RateLimit::new(Arc::clone(&script)).requests_per_minute(nz(6));
    let start = tokio::time::Instant::now();
    let req = || CompletionRequest::new(vec![Message::user("hi")]);
    join_all((0..12).map(|_| limited.complete(req()))).await;
    assert_eq!(script.calls(), 12);
    // 6 at once, then one every 10 s: the 12th at 60 s.
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(60), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(62), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn tokens_per_minute_charges_the_estimate() {
    let script = ok_script(4);
    // Each request: 400 chars -> 100 tokens + 4 per message + max_tokens 396 = 500.
    let limited = RateLimit::new(Arc::clone(&script)).tokens_per_minute(nz(1_000));
    let req = CompletionRequest::new(vec![Message::user("x".repeat(400))])
        .with_params(&rmboost::SamplingParams::default().max_tokens(396));
    assert_eq!(limited.estimate_tokens(&req), 500);
    let start = tokio::time::Instant::now();
    join_all((0..4).map(|_| limited.complete(req.clone()))).await;
    assert_eq!(script.calls(), 4);
    // 1,000 at once, then 1,000 more take a minute.
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(60), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(62), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn an_estimate_above_the_allowance_is_clamped_not_stuck() {
    let script = ok_script(2);
    let limited = RateLimit::new(Arc::clone(&script))
        .tokens_per_minute(nz(100))
        .default_max_tokens(5_000);
    let req = CompletionRequest::new(vec![Message::user("hi")]);
    let start = tokio::time::Instant::now();
    limited.complete(req.clone()).await.unwrap();
    limited.complete(req).await.unwrap();
    assert_eq!(script.calls(), 2);
    assert!(start.elapsed() <= Duration::from_secs(61));
}

#[tokio::test(start_paused = true)]
async fn no_limits_pass_straight_through() {
    let script = ok_script(50);
    let limited = RateLimit::new(Arc::clone(&script));
    let start = tokio::time::Instant::now();
    let req = CompletionRequest::new(vec![Message::user("hi")]);
    join_all((0..50).map(|_| limited.complete(req.clone()))).await;
    assert_eq!(script.calls(), 50);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn forwards_name_and_model_and_is_object_safe() {
    let limited: Box<dyn LlmBackend> =
        Box::new(RateLimit::new(ok_script(0)).requests_per_minute(nz(10)));
    assert_eq!(limited.name(), "scripted");
    assert_eq!(limited.model(), "script-1");
}
