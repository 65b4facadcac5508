//! The generator's invariants: determinism, bounded concurrency, cancel by drop,
//! exactly one result per id, the construction rule, label balance, re-asks, fatal errors.

use crate::support;

use rmboost::GeneratorExt;
use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;
use rmboost::testing::{FakeBackend, ScriptedBackend};
use rmboost::ErrorKind;
use rmboost::{
    AspectSampling, Aspects, BackendError, BackendErrorKind, Completion, CompletionRequest, Error,
    Graded, Label, LlmBackend, OutputOrder, PreferenceExample, Prompt, RmBoost, UnusableReason,
};
use support::{prompts, run_all};

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

/// A fake whose latency varies per request (derived from the seed), so completion order
/// differs from input order, and which records every request.
fn jittery() -> ScriptedBackend {
    ScriptedBackend::from_fn(|req| {
        let fake = FakeBackend::new();
        futures::executor::block_on(fake.complete(req.clone()))
    })
}

/// Like `jittery` but sleeps a seed-dependent time first (tokio time).
#[derive(Debug, Clone)]
struct Sleepy {
    inner: ScriptedBackend,
}

#[rmboost::async_trait]
impl LlmBackend for Sleepy {
    async fn complete(&self, request: CompletionRequest) -> Result<Completion, BackendError> {
        let ms = request.seed.unwrap_or(0) % 37;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.inner.complete(request).await
    }
}

/// What must not depend on concurrency or order: per id, the label, the aspects, and both
/// requests exactly as sent.
type Fingerprint = BTreeMap<String, (Label, Vec<String>, String, String)>;

async fn fingerprint(concurrency: usize, order: OutputOrder, seed: u64) -> Fingerprint {
    let backend = Sleepy { inner: jittery() };
    let rmb = RmBoost::builder()
        .backend(backend.clone())
        .concurrency(nz(concurrency))
        .order(order)
        .seed(seed)
        .build()
        .unwrap();
    let results = run_all(&rmb, prompts(60)).await;
    assert_eq!(results.len(), 60);
    let requests = backend.inner.requests();
    let mut fp = Fingerprint::new();
    for r in results {
        let ex = r.unwrap();
        // The first request is the prompt itself; the second contains the first response.
        let first_text = if ex.label == Label::Better {
            &ex.rejected
        } else {
            &ex.chosen
        };
        let second_req = requests
            .iter()
            .find(|q| q.messages.len() == 2 && q.messages[0].content.contains(first_text.as_str()))
            .expect("second request recorded");
        let first_req = requests
            .iter()
            .find(|q| q.messages == ex.prompt)
            .expect("first request recorded");
        fp.insert(
            ex.id.clone(),
            (
                ex.label,
                ex.aspects.clone(),
                serde_json::to_string(first_req).unwrap(),
                serde_json::to_string(second_req).unwrap(),
            ),
        );
    }
    fp
}

#[tokio::test(start_paused = true)]
async fn same_seed_same_draws_at_any_concurrency_and_order() {
    let base = fingerprint(1, OutputOrder::Input, 11).await;
    for (c, order) in [
        (16, OutputOrder::Input),
        (16, OutputOrder::Completion),
        (1, OutputOrder::Completion),
        (7, OutputOrder::Completion),
    ] {
        assert_eq!(fingerprint(c, order, 11).await, base, "c={c} {order:?}");
    }
    // A different seed changes the draws.
    assert_ne!(fingerprint(4, OutputOrder::Completion, 12).await, base);
}

#[tokio::test(start_paused = true)]
async fn input_order_is_kept_and_completion_order_differs() {
    let ids: Vec<String> = prompts(40).into_iter().map(|p| p.id().to_owned()).collect();
    let run = |order| async move {
        let rmb = RmBoost::builder()
            .backend(Sleepy { inner: jittery() })
            .concurrency(nz(8))
            .order(order)
            .build()
            .unwrap();
        run_all(&rmb, prompts(40))
            .await
            .into_iter()
            .map(|r| r.unwrap().id)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(OutputOrder::Input).await, ids);
    let completion = run(OutputOrder::Completion).await;
    assert_ne!(
        completion, ids,
        "latencies vary, so completion order should differ"
    );
    let mut sorted = completion.clone();
    sorted.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(sorted, expected);
}

#[tokio::test(start_paused = true)]
async fn exactly_one_result_per_id_with_failures() {
    // Every 5th request fails permanently (not fatally); ids must still appear exactly once.
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let backend = ScriptedBackend::from_fn(move |req| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n % 5 == 4 {
            Err(BackendError::new(
                BackendErrorKind::InvalidRequest,
                "too long",
            ))
        } else {
            futures::executor::block_on(FakeBackend::new().complete(req.clone()))
        }
    });
    let rmb = RmBoost::builder()
        .backend(backend)
        .concurrency(nz(6))
        .build()
        .unwrap();
    let results = run_all(&rmb, prompts(100)).await;
    assert_eq!(results.len(), 100);
    let mut seen = BTreeSet::new();
    let mut failed = 0;
    for r in &results {
        let id = match r {
            Ok(ex) => ex.id.clone(),
            Err(e) => {
                failed += 1;
                assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
                e.example_id().unwrap().to_string()
            }
        };
        assert!(seen.insert(id.clone()), "duplicate id {id}");
    }
    assert!(failed > 0);
    let expected: BTreeSet<String> = prompts(100)
        .into_iter()
        .map(|p| p.id().to_owned())
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test(start_paused = true)]
async fn never_more_than_concurrency_in_flight() {
    for c in [1usize, 3, 16] {
        let backend = ScriptedBackend::from_fn(|req| {
            futures::executor::block_on(FakeBackend::new().complete(req.clone()))
        })
        .with_latency(Duration::from_millis(10));
        let rmb = RmBoost::builder()
            .backend(backend.clone())
            .concurrency(nz(c))
            .build()
            .unwrap();
        let results = run_all(&rmb, prompts(50)).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(backend.max_in_flight(), c, "concurrency {c}");
        assert_eq!(backend.calls(), 100);
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_stops_new_calls() {
    let backend = ScriptedBackend::from_fn(|req| {
        futures::executor::block_on(FakeBackend::new().complete(req.clone()))
    })
    .with_latency(Duration::from_millis(10));
    let rmb = RmBoost::builder()
        .backend(backend.clone())
        .concurrency(nz(4))
        .build()
        .unwrap();
    let mut stream = rmb.generate_iter(prompts(1000));
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    let calls = backend.calls();
    assert_eq!(backend.in_flight(), 0, "in-flight calls cancelled");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(backend.calls(), calls, "no call after the drop");
    assert!(calls < 20, "only the first few examples started: {calls}");
}

#[tokio::test]
async fn construction_rule_for_both_labels() {
    for (p, label) in [(1.0, Label::Better), (0.0, Label::Worse)] {
        let rmb = RmBoost::builder()
            .backend(FakeBackend::new())
            .labels(rmboost::Bernoulli::new(p).unwrap())
            .build()
            .unwrap();
        for r in run_all(&rmb, prompts(20)).await {
            let ex = r.unwrap();
            assert_eq!(ex.label, label);
            // FakeBackend's second responses start with "rewrite", first ones with "answer".
            let (second, first) = match label {
                Label::Better => (&ex.chosen, &ex.rejected),
                Label::Worse => (&ex.rejected, &ex.chosen),
            };
            assert!(second.starts_with("rewrite "), "{second}");
            assert!(first.starts_with("answer "), "{first}");
            assert!(!second.contains("<response>"), "tags stripped: {second}");
        }
    }
}

#[tokio::test]
async fn label_balance_on_10000_examples() {
    let rmb = RmBoost::builder()
        .backend(FakeBackend::new())
        .concurrency(nz(64))
        .seed(2024)
        .build()
        .unwrap();
    let n = 10_000usize;
    let mut better = 0usize;
    let mut stream = rmb.generate_iter(prompts(n));
    let mut count = 0;
    while let Some(r) = stream.next().await {
        count += 1;
        if r.unwrap().label == Label::Better {
            better += 1;
        }
    }
    assert_eq!(count, n);
    // 4 sigma of Binomial(10000, 0.5) is 200.
    let dev = (better as f64 - 5000.0).abs();
    assert!(dev <= 200.0, "better = {better}");
}

#[tokio::test]
async fn reasks_unusable_answers_then_accepts() {
    let backend = ScriptedBackend::new();
    backend.push_text("   "); // empty first response: re-asked
    backend.push_text("Paris is the capital of France.");
    backend.push_text("<response></response>"); // empty second
    backend.push_text("<response>Paris is the capital of France.</response>"); // a copy
    backend.push_text("Here is a worse version of the existing answer: Lyon."); // meta-talk
    backend.push_text("<response>Lyon is the capital of France.</response>");
    let rmb = RmBoost::builder()
        .backend(backend.clone())
        .labels(rmboost::Bernoulli::new(0.0).unwrap())
        .max_reasks(3)
        .seed(5)
        .build()
        .unwrap();
    let ex = rmb
        .generate_one(Prompt::with_id("q", "Capital of France?"))
        .await
        .unwrap();
    assert_eq!(ex.chosen, "Paris is the capital of France.");
    assert_eq!(ex.rejected, "Lyon is the capital of France.");
    assert_eq!(ex.metadata.reasks, 4);
    assert_eq!(ex.metadata.calls, 6);
    assert_eq!(backend.calls(), 6);
    // Re-asks use fresh seeds.
    let seeds: Vec<u64> = backend.requests().iter().map(|r| r.seed.unwrap()).collect();
    assert_eq!(seeds[1], seeds[0] + 1);
    assert_eq!(seeds[3], seeds[2] + 1);
    assert_eq!(seeds[5], seeds[2] + 3);
}

#[tokio::test]
async fn unusable_after_the_limit_is_an_error_with_the_id() {
    let backend = ScriptedBackend::new();
    backend.push_text("A first answer.");
    for _ in 0..3 {
        backend.push_text("<response>A first answer.</response>");
    }
    let rmb = RmBoost::builder()
        .backend(backend.clone())
        .max_reasks(2)
        .build()
        .unwrap();
    let err = rmb
        .generate_one(Prompt::with_id("q7", "Say something."))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unusable, "{err:?}");
    assert_eq!((err.example_id(), err.call()), (Some("q7"), Some("second")));
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    assert_eq!(err.unusable_reason(), Some(&UnusableReason::SameAsFirst));
    assert!(!err.is_fatal());
    assert_eq!(backend.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn fatal_error_ends_the_stream_once() {
    let backend = ScriptedBackend::from_fn(|_| {
        Err(BackendError::new(BackendErrorKind::Authentication, "invalid key").with_status(401))
    })
    .with_latency(Duration::from_millis(5));
    let rmb = RmBoost::builder()
        .backend(backend.clone())
        .concurrency(nz(4))
        .build()
        .unwrap();
    let results = run_all(&rmb, prompts(100)).await;
    assert_eq!(results.len(), 1, "one fatal error, then the end");
    let err = results.into_iter().next().unwrap().unwrap_err();
    assert!(err.is_fatal());
    assert_eq!(err.kind_str(), "authentication");
    assert!(backend.calls() <= 4, "calls: {}", backend.calls());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backend.in_flight(), 0);
}

#[tokio::test]
async fn graded_labels_fill_margin_and_aspects_follow_the_mode() {
    let aspects = Aspects::summarization()
        .with_sampling(AspectSampling::All)
        .unwrap();
    let rmb = RmBoost::builder()
        .backend(FakeBackend::new())
        .labels(Graded::default())
        .aspects(aspects.clone())
        .build()
        .unwrap();
    for r in run_all(&rmb, prompts(30)).await {
        let ex = r.unwrap();
        assert!(ex.grade.is_some());
        assert!(matches!(ex.margin, Some(m) if m == 1.0 || m == 3.0));
        let all: Vec<String> = aspects.aspects().iter().map(|a| a.name.clone()).collect();
        assert_eq!(ex.aspects, all);
    }
}

#[tokio::test]
async fn separate_backends_for_the_two_calls() {
    let first = ScriptedBackend::from_fn(|_| Ok(Completion::new("one").with_model("m1")));
    let second = ScriptedBackend::from_fn(|_| {
        Ok(Completion::new("<response>two</response>").with_model("m2"))
    });
    let rmb = RmBoost::builder()
        .first_backend(first.clone())
        .second_backend(second.clone())
        .build()
        .unwrap();
    let ex = rmb.generate_one(Prompt::new("x")).await.unwrap();
    assert_eq!(first.calls(), 1);
    assert_eq!(second.calls(), 1);
    assert_eq!(ex.metadata.models["first"], "m1");
    assert_eq!(ex.metadata.models["second"], "m2");
}

#[test]
fn build_validates() {
    let err = RmBoost::builder().build().unwrap_err();
    assert!(err.to_string().contains("no backend"), "{err}");
    let err = RmBoost::builder()
        .first_backend(FakeBackend::new())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("second"), "{err}");
    let err = RmBoost::builder()
        .backend(FakeBackend::new())
        .second_params(rmboost::SamplingParams::default().top_p(2.0))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("second_params: top_p"), "{err}");
}

/// Golden values: a change here changes every dataset generated with a given seed, and must be
/// called out in CHANGELOG.md.
#[test]
fn golden_seeded_draws() {
    let rmb = RmBoost::builder()
        .backend(FakeBackend::new())
        .seed(42)
        .build()
        .unwrap();
    let got: Vec<(String, Label, Vec<String>, u64)> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|id| {
            let plan = rmb.plan(Prompt::with_id(*id, "prompt"));
            (
                plan.id,
                plan.label.label,
                plan.aspects
                    .aspects
                    .iter()
                    .map(|a| a.name.clone())
                    .collect(),
                plan.first_seed,
            )
        })
        .collect();
    let golden = support::golden();
    assert_eq!(got, golden, "seeded draws changed:\n{got:#?}");
}

fn public_types_are_send_sync() {
    fn check_send<T: Send + 'static>() {}
    check_send::<rmboost::ExampleStream>();
    fn check<T: Send + Sync>() {}
    check::<RmBoost>();
    check::<PreferenceExample>();
    check::<Prompt>();
    check::<Error>();
    check::<BackendError>();
    check::<Aspects>();
    check::<rmboost::DefaultTemplate>();
    check::<rmboost::Bernoulli>();
    check::<Graded>();
    check::<rmboost::Summary>();
}

#[test]
fn traits_are_object_safe_and_send_sync() {
    public_types_are_send_sync();
    fn check<T: ?Sized + Send + Sync>() {}
    check::<dyn LlmBackend>();
    check::<dyn rmboost::LabelSampler>();
    check::<dyn rmboost::AspectSet>();
    check::<dyn rmboost::PromptTemplate>();
    // Trait objects plug into the builder through the forwarding impls.
    let backend: std::sync::Arc<dyn LlmBackend> = std::sync::Arc::new(FakeBackend::new());
    let labels: Box<dyn rmboost::LabelSampler> = Box::new(rmboost::Bernoulli::default());
    let aspects: std::sync::Arc<dyn rmboost::AspectSet> = std::sync::Arc::new(Aspects::general());
    let template: Box<dyn rmboost::PromptTemplate> = Box::new(rmboost::DefaultTemplate::new());
    RmBoost::builder()
        .backend(backend)
        .labels(labels)
        .aspects(aspects)
        .template(template)
        .build()
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Over seeds, input sizes and concurrency: one result per id, and labels/aspects equal to
    /// the plan drawn without any call.
    #[test]
    fn prop_results_match_plans(seed in any::<u64>(), n in 0usize..60, c in 1usize..40, input_order in any::<bool>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let rmb = RmBoost::builder()
                .backend(Sleepy { inner: jittery() })
                .concurrency(nz(c))
                .order(if input_order { OutputOrder::Input } else { OutputOrder::Completion })
                .seed(seed)
                .build()
                .unwrap();
            let results = run_all(&rmb, prompts(n)).await;
            prop_assert_eq!(results.len(), n);
            let mut ids = BTreeSet::new();
            for r in results {
                let ex = r.unwrap();
                let plan = rmb.plan(Prompt::with_id(ex.id.clone(), "unused"));
                prop_assert_eq!(ex.label, plan.label.label);
                let names: Vec<String> = plan.aspects.aspects.iter().map(|a| a.name.clone()).collect();
                prop_assert_eq!(&ex.aspects, &names);
                prop_assert!(ids.insert(ex.id));
            }
            Ok(())
        })?;
    }
}

/// A method of one's own, from outside the crate: a decorator of any generator (here
/// `RmBoost`) that tags every example, built on `ExampleStream::new` and run as
/// `Box<dyn Generator>` through `GeneratorExt`.
#[derive(Debug)]
struct Tagged<G> {
    inner: G,
    tag: &'static str,
}

impl<G: rmboost::Generator> rmboost::Generator for Tagged<G> {
    fn method(&self) -> &str {
        "tagged"
    }

    fn seed(&self) -> u64 {
        self.inner.seed()
    }

    fn concurrency(&self) -> NonZeroUsize {
        self.inner.concurrency()
    }

    fn generate_boxed(
        &self,
        prompts: futures::stream::BoxStream<'static, Result<Prompt, Error>>,
    ) -> rmboost::ExampleStream {
        let tag = self.tag;
        rmboost::ExampleStream::new(self.inner.generate_boxed(prompts).map(move |r| {
            r.map(|mut example| {
                example.metadata.method = "tagged".into();
                example.metadata.extra.insert("tag".into(), tag.into());
                example
            })
        }))
    }
}

#[tokio::test]
async fn a_method_of_ones_own_decorates_rmboost_and_runs_boxed() {
    let rmb = RmBoost::builder()
        .backend(FakeBackend::new())
        .concurrency(nz(4))
        .seed(3)
        .build()
        .unwrap();
    let plain: Vec<_> = rmb.generate_iter(prompts(20)).collect().await;
    let method: Box<dyn rmboost::Generator> = Box::new(Tagged {
        inner: rmb,
        tag: "mine",
    });
    assert_eq!((method.method(), method.seed()), ("tagged", 3));
    let tagged: Vec<_> = method.generate_iter(prompts(20)).collect().await;
    let by_id = |v: &[Result<PreferenceExample, Error>]| -> BTreeMap<String, PreferenceExample> {
        v.iter()
            .map(|r| {
                let e = r.as_ref().expect("every example succeeds").clone();
                (e.id.clone(), e)
            })
            .collect()
    };
    let (plain, tagged) = (by_id(&plain), by_id(&tagged));
    assert_eq!(tagged.len(), 20);
    for (id, t) in &tagged {
        let p = &plain[id];
        // The same draws and texts as the method it decorates, tagged.
        assert_eq!(
            (&t.chosen, &t.rejected, t.label),
            (&p.chosen, &p.rejected, p.label)
        );
        assert_eq!(t.metadata.method, "tagged");
        assert_eq!(t.metadata.extra["tag"], "mine");
    }
}

#[tokio::test]
async fn example_stream_new_stops_after_a_fatal_error() {
    let fatal = Error::backend(
        "b",
        "first",
        BackendError::new(BackendErrorKind::Authentication, "bad key"),
    );
    let retryable = Error::backend("c", "first", BackendError::server("busy"));
    let items = vec![Err(retryable), Err(fatal), Err(Error::config("never seen"))];
    let results: Vec<_> = rmboost::ExampleStream::new(futures::stream::iter(items))
        .collect()
        .await;
    let ids: Vec<_> = results
        .iter()
        .map(|r| r.as_ref().unwrap_err().example_id().map(str::to_owned))
        .collect();
    assert_eq!(ids, vec![Some("c".to_owned()), Some("b".to_owned())]);
}
