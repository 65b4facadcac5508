//! The response cache: a second identical run calls no backend, errors are not cached, clear
//! works, concurrent callers are served, and the file is locked.

use rmboost::GeneratorExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use rmboost::backend::cache::{Cache, Cached};
use rmboost::testing::{FakeBackend, ScriptedBackend};
use rmboost::{BackendError, Completion, CompletionRequest, LlmBackend, Message, Prompt, RmBoost};

fn counting_fake() -> ScriptedBackend {
    let fake = FakeBackend::new();
    ScriptedBackend::from_fn(move |req| futures::executor::block_on(fake.complete(req.clone())))
}

fn prompts(n: usize) -> Vec<Prompt> {
    (0..n)
        .map(|i| Prompt::with_id(format!("c{i}"), format!("Cache question {i}")))
        .collect()
}

async fn run_once(cache: &Cache, backend: &ScriptedBackend) -> Vec<String> {
    let rmb = RmBoost::builder()
        .backend(Cached::new(backend.clone(), cache.clone()))
        .seed(5)
        .build()
        .unwrap();
    let mut lines: Vec<String> = rmb
        .generate_iter(prompts(50))
        .map(|r| {
            r.unwrap()
                .to_json_line(rmboost::ExampleFormat::Conversational)
        })
        .collect()
        .await;
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_identical_run_makes_no_calls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cache.redb");
    let backend = counting_fake();
    let cache = Cache::open(&path).unwrap();
    let first = run_once(&cache, &backend).await;
    assert_eq!(backend.calls(), 100);
    // A call returns once its completion is queued; flush waits for the commit.
    cache.flush().await.unwrap();
    assert_eq!(cache.entries().await.unwrap(), 100);
    assert_eq!(cache.stats().stored, 100);

    // Same process, then after reopening the file (a rerun after a crash).
    let again = run_once(&cache, &backend).await;
    assert_eq!(backend.calls(), 100);
    assert_eq!(again, first);
    drop(cache);
    let cache = Cache::open(&path).unwrap();
    let third = run_once(&cache, &backend).await;
    assert_eq!(backend.calls(), 100, "reopened cache missed");
    assert_eq!(third, first);
    assert_eq!(cache.stats().hits, 100);
    assert_eq!(cache.stats().misses, 0);

    cache.clear().await.unwrap();
    assert_eq!(cache.entries().await.unwrap(), 0);
    run_once(&cache, &backend).await;
    assert_eq!(backend.calls(), 200);
}

#[tokio::test]
async fn errors_are_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path().join("c.redb")).unwrap();
    let backend = ScriptedBackend::new();
    backend.push_error(BackendError::server("down"));
    backend.push_text("up");
    let cached = Cached::new(backend.clone(), cache.clone());
    let req = CompletionRequest::new(vec![Message::user("q")]).with_seed(3);
    assert!(cached.complete(req.clone()).await.is_err());
    assert_eq!(cache.entries().await.unwrap(), 0);
    assert_eq!(cached.complete(req.clone()).await.unwrap().text, "up");
    assert_eq!(cached.complete(req.clone()).await.unwrap().text, "up");
    assert_eq!(backend.calls(), 2);
    // A different seed is a different request.
    backend.push_text("other");
    assert_eq!(
        cached.complete(req.with_seed(4)).await.unwrap().text,
        "other"
    );
    cache.flush().await.unwrap();
    assert_eq!(cache.stats().stored, 2);
    assert_eq!(cache.entries().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_callers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path().join("c.redb")).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let backend = Arc::new(Cached::new(
        ScriptedBackend::from_fn(move |req| {
            c2.fetch_add(1, Ordering::SeqCst);
            Ok(Completion::new(format!("answer {}", req.seed.unwrap())))
        }),
        cache.clone(),
    ));
    // 400 tasks over 200 distinct requests, all at once, twice.
    for round in 0..2 {
        let mut tasks = Vec::new();
        for i in 0..400u64 {
            let b = backend.clone();
            tasks.push(tokio::spawn(async move {
                let req = CompletionRequest::new(vec![Message::user("q")]).with_seed(i % 200);
                b.complete(req).await.unwrap().text
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), format!("answer {}", i % 200));
        }
        if round == 0 {
            let n = calls.load(Ordering::SeqCst);
            assert!((200..=400).contains(&n), "{n}");
        }
    }
    cache.flush().await.unwrap();
    assert_eq!(cache.entries().await.unwrap(), 200);
    let before = calls.load(Ordering::SeqCst);
    assert!(before <= 400);
    assert_eq!(cache.stats().errors, 0);
}

#[tokio::test]
async fn open_twice_in_one_process_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.redb");
    let cache = Cache::open(&path).unwrap();
    let err = Cache::open(&path).unwrap_err();
    assert!(err.to_string().contains("c.redb"), "{err}");
    drop(cache);
    Cache::open(&path).unwrap();
}

#[tokio::test]
async fn queued_completions_are_found_and_committed_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.redb");
    let backend = counting_fake();
    let cache = Cache::open(&path).unwrap();
    let cached = Cached::new(backend.clone(), cache.clone());
    for i in 0..2000u64 {
        let req = CompletionRequest::new(vec![Message::user("q")]).with_seed(i);
        let first = cached.complete(req.clone()).await.unwrap();
        // Found at once, committed or still queued.
        assert_eq!(cached.complete(req).await.unwrap(), first);
    }
    assert_eq!(backend.calls(), 2000);
    assert_eq!(cache.stats().hits, 2000);
    // Dropping the last clone commits what is queued.
    drop(cached);
    drop(cache);
    let cache = Cache::open(&path).unwrap();
    assert_eq!(cache.entries().await.unwrap(), 2000);
}
