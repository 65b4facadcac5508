//! The baselines with scripted backends: call counts, judge order swapping, inconsistent
//! verdicts, West-of-N extremes, determinism, the shared stream behaviour.

use rmboost::GeneratorExt;
use std::num::NonZeroUsize;
use std::time::Duration;

use futures::StreamExt;
use rmboost::judge::{ScoreRequest, Scored, Scorer};
use rmboost::methods::OnInconsistent;
use rmboost::testing::ScriptedBackend;
use rmboost::ErrorKind;
use rmboost::{
    async_trait, BackendError, BackendErrorKind, Completion, CompletionRequest, Error, Generator,
    Label, Method, OutputOrder, PreferenceExample, Prompt, Rlaif, Rlcd, RmBoost, Role,
    UnusableReason, Usage, WestOfN,
};

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

/// The text between `open` and `close` in `t`.
fn between<'a>(t: &'a str, open: &str, close: &str) -> &'a str {
    let s = t.find(open).unwrap() + open.len();
    let e = s + t[s..].find(close).unwrap();
    t[s..e].trim()
}

/// A deterministic stand-in model: samples depend on the seed (their length on `seed % 5`),
/// as a judge it prefers the longer answer (tie if equal) and scores by length.
fn model(req: &CompletionRequest) -> Result<Completion, BackendError> {
    let last = &req.messages.last().unwrap().content;
    let usage = Usage::new(10, 5);
    if last.contains("<answer_a>") {
        let a = between(last, "<answer_a>", "</answer_a>").len();
        let b = between(last, "<answer_b>", "</answer_b>").len();
        let v = match a.cmp(&b) {
            std::cmp::Ordering::Greater => "A",
            std::cmp::Ordering::Less => "B",
            std::cmp::Ordering::Equal => "tie",
        };
        return Ok(Completion::new(format!("Reasons. <verdict>{v}</verdict>")).with_usage(usage));
    }
    if last.contains("<answer>") {
        let n = between(last, "<answer>", "</answer>").len();
        return Ok(Completion::new(format!("<score>{}</score>", 1 + n % 10)).with_usage(usage));
    }
    let seed = req.seed.unwrap_or(0);
    let text = format!("sample {seed:016x}{}", " word".repeat((seed % 5) as usize));
    Ok(Completion::new(text).with_usage(usage).with_model("m"))
}

fn prompts(n: usize) -> Vec<Prompt> {
    (0..n)
        .map(|i| Prompt::with_id(format!("p{i}"), format!("Question number {i}?")))
        .collect()
}

// ---------------------------------------------------------------- RLCD

#[tokio::test]
async fn rlcd_two_calls_positive_is_chosen() {
    let backend = ScriptedBackend::new();
    backend.push_text("A lazy answer.");
    backend.push_text("A careful, complete answer.");
    let rlcd = Rlcd::builder()
        .backend(backend.clone())
        .seed(5)
        .build()
        .unwrap();
    let ex = rlcd
        .generate_one(Prompt::with_id("x", "Why?"))
        .await
        .unwrap();
    assert_eq!(backend.calls(), 2);
    assert_eq!(ex.metadata.calls, 2);
    assert_eq!(ex.metadata.method, "rlcd");
    assert_eq!(ex.chosen, "A careful, complete answer.");
    assert_eq!(ex.rejected, "A lazy answer.");
    assert_eq!(ex.label, Label::Better);
    assert!(!ex.aspects.is_empty());
    let reqs = backend.requests();
    // Negative first, then positive; both name the drawn aspects; distinct seeds.
    assert_eq!(reqs[0].messages[0].role, Role::System);
    assert!(reqs[0].messages[0].content.contains("weak"));
    assert!(reqs[1].messages[0].content.contains("best answer"));
    for a in &ex.aspects {
        assert!(reqs[0].messages[0].content.contains(&format!("- {a}:")));
        assert!(reqs[1].messages[0].content.contains(&format!("- {a}:")));
    }
    assert_eq!(reqs[0].messages[1].content, "Why?");
    assert_ne!(reqs[0].seed, reqs[1].seed);
    assert_eq!(
        rlcd.requests(Prompt::with_id("x", "Why?")).map(|r| r.seed),
        [reqs[0].seed, reqs[1].seed]
    );
    assert!(ex.metadata.usage.contains_key("negative"));
    assert!(ex.metadata.usage.contains_key("positive"));
    assert!(ex.metadata.usage.contains_key("total"));
}

#[tokio::test]
async fn rlcd_reasks_meta_talk_and_copies() {
    let backend = ScriptedBackend::new();
    backend.push_text("Here is a worse version of the answer");
    backend.push_text("Cats purr.");
    backend.push_text("cats  PURR.");
    backend.push_text("Cats purr to communicate and to soothe themselves.");
    let rlcd = Rlcd::builder().backend(backend.clone()).build().unwrap();
    let ex = rlcd
        .generate_one(Prompt::new("Why do cats purr?"))
        .await
        .unwrap();
    assert_eq!(ex.rejected, "Cats purr.");
    assert_eq!(
        ex.chosen,
        "Cats purr to communicate and to soothe themselves."
    );
    assert_eq!((ex.metadata.calls, ex.metadata.reasks), (4, 2));
    let reqs = backend.requests();
    assert_eq!(reqs[1].seed.unwrap(), reqs[0].seed.unwrap().wrapping_add(1));
}

// ---------------------------------------------------------------- RLAIF

fn rlaif_with(policy: &ScriptedBackend, judge: &ScriptedBackend, keep: bool) -> Rlaif {
    Rlaif::builder()
        .backend(policy.clone())
        .judge_backend(judge.clone())
        .on_inconsistent(if keep {
            OnInconsistent::Keep
        } else {
            OnInconsistent::Drop
        })
        .seed(11)
        .build()
        .unwrap()
}

fn two_samples() -> ScriptedBackend {
    let policy = ScriptedBackend::new();
    policy.push_text("Sample one.");
    policy.push_text("Sample two, longer.");
    policy
}

#[tokio::test]
async fn rlaif_four_calls_and_swapped_orders() {
    let policy = two_samples();
    let judge = ScriptedBackend::new();
    judge.push_text("<verdict>A</verdict>"); // sample 1 as A: sample 1
    judge.push_text("<verdict>B</verdict>"); // sample 2 as A: sample 1
    let rlaif = rlaif_with(&policy, &judge, false);
    let ex = rlaif.generate_one(Prompt::new("Q?")).await.unwrap();
    assert_eq!(policy.calls() + judge.calls(), 4);
    assert_eq!(ex.metadata.calls, 4);
    assert_eq!(ex.metadata.method, "rlaif");
    assert_eq!(ex.chosen, "Sample one.");
    assert_eq!(ex.rejected, "Sample two, longer.");
    assert_eq!(ex.label, Label::Worse);
    assert_eq!(ex.metadata.extra["judge"]["verdicts"][0], "A");
    assert_eq!(ex.metadata.extra["judge"]["verdicts"][1], "B");
    assert_eq!(ex.metadata.extra["judge"]["consistent"], true);
    assert_eq!(ex.metadata.extra["judge"]["winner"], 1);

    let p = policy.requests();
    assert_ne!(p[0].seed, p[1].seed, "the two samples use different seeds");
    let j = judge.requests();
    let (first, second) = (
        &j[0].messages.last().unwrap().content,
        &j[1].messages.last().unwrap().content,
    );
    assert_eq!(between(first, "<answer_a>", "</answer_a>"), "Sample one.");
    assert_eq!(
        between(first, "<answer_b>", "</answer_b>"),
        "Sample two, longer."
    );
    assert_eq!(
        between(second, "<answer_a>", "</answer_a>"),
        "Sample two, longer."
    );
    assert_eq!(between(second, "<answer_b>", "</answer_b>"), "Sample one.");
    assert_ne!(j[0].seed, j[1].seed);
    assert_eq!(j[0].temperature, Some(0.0));
    let usage = &ex.metadata.usage;
    for k in ["first", "second", "judge", "total"] {
        assert!(usage.contains_key(k), "{k}");
    }
}

#[tokio::test]
async fn rlaif_inconsistent_verdicts_dropped_or_kept() {
    // Position bias: "A" in both orders.
    for keep in [false, true] {
        let policy = two_samples();
        let judge = ScriptedBackend::new();
        judge.push_text("<verdict>A</verdict>");
        judge.push_text("<verdict>A</verdict>");
        let result = rlaif_with(&policy, &judge, keep)
            .generate_one(Prompt::with_id("i", "Q?"))
            .await;
        assert_eq!(judge.calls(), 2);
        if keep {
            let ex = result.unwrap();
            assert_eq!(ex.metadata.extra["judge"]["consistent"], false);
            assert_eq!(ex.chosen, "Sample one.", "first order decides");
            assert_eq!(ex.metadata.calls, 4);
        } else {
            let err = result.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unusable, "{err}");
            assert_eq!((err.example_id(), err.call()), (Some("i"), Some("judge")));
            let Some(UnusableReason::Other(why)) = err.unusable_reason() else {
                panic!("{err:?}")
            };
            assert!(why.contains("inconsistent judge verdicts"), "{why}");
        }
    }
}

#[tokio::test]
async fn rlaif_ties_and_unreadable_verdicts() {
    // A tie in one order is inconsistent; kept, the decisive order wins.
    let policy = two_samples();
    let judge = ScriptedBackend::new();
    judge.push_text("<verdict>tie</verdict>");
    judge.push_text("Answer A is better."); // sample 2 as A
    let ex = rlaif_with(&policy, &judge, true)
        .generate_one(Prompt::new("Q?"))
        .await
        .unwrap();
    assert_eq!(ex.chosen, "Sample two, longer.");
    assert_eq!(ex.label, Label::Better);
    assert_eq!(ex.metadata.extra["judge"]["consistent"], false);

    // Ties in both orders fail even when keeping.
    let policy = two_samples();
    let judge = ScriptedBackend::new();
    judge.push_text("[[C]]");
    judge.push_text("<verdict>tie</verdict>");
    let err = rlaif_with(&policy, &judge, true)
        .generate_one(Prompt::new("Q?"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tie in both orders"), "{err}");

    // An answer without a verdict is re-asked with the next seed.
    let policy = two_samples();
    let judge = ScriptedBackend::new();
    judge.push_text("Hmm, hard to say.");
    judge.push_text("<verdict>B</verdict>");
    judge.push_text("<verdict>A</verdict>");
    let ex = rlaif_with(&policy, &judge, false)
        .generate_one(Prompt::new("Q?"))
        .await
        .unwrap();
    assert_eq!((ex.metadata.calls, ex.metadata.reasks), (5, 1));
    let j = judge.requests();
    assert_eq!(j[1].seed.unwrap(), j[0].seed.unwrap().wrapping_add(1));
    // A greedy judge would repeat itself: the re-ask is sampled warmer, the next order is not.
    assert_eq!(j[0].temperature, Some(0.0));
    assert_eq!(j[1].temperature, Some(rmboost::judge::REASK_TEMPERATURE));
    assert_eq!(j[1].messages, j[0].messages);
    assert_eq!(j[2].temperature, Some(0.0));
    assert_eq!(ex.chosen, "Sample two, longer.");
}

#[tokio::test]
async fn rlaif_identical_samples_resampled_or_fail() {
    let policy = ScriptedBackend::new();
    policy.push_text("Same.");
    policy.push_text("same.");
    policy.push_text("Different.");
    let judge = ScriptedBackend::from_fn(model);
    let ex = rlaif_with(&policy, &judge, false)
        .generate_one(Prompt::new("Q?"))
        .await
        .unwrap();
    assert_eq!(ex.metadata.calls, 5);
    let p = policy.requests();
    assert_eq!(p[2].seed.unwrap(), p[1].seed.unwrap().wrapping_add(1));
    assert_ne!(ex.chosen, ex.rejected);

    let policy = ScriptedBackend::from_fn(|_| Ok(Completion::new("Always the same.")));
    let rlaif = Rlaif::builder()
        .backend(policy.clone())
        .max_reasks(2)
        .build()
        .unwrap();
    let err = rlaif.generate_one(Prompt::new("Q?")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unusable, "{err:?}");
    assert_eq!(err.call(), Some("second"));
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    assert_eq!(err.unusable_reason(), Some(&UnusableReason::SameAsFirst));
    assert_eq!(policy.calls(), 4);
}

// ---------------------------------------------------------------- West-of-N

/// Scores from a fixed table keyed by response text; records what it was asked.
#[derive(Debug)]
struct Table(Vec<(&'static str, f64)>);

#[async_trait]
impl Scorer for Table {
    async fn score(&self, r: ScoreRequest<'_>) -> Result<Scored, Error> {
        let s = self.0.iter().find(|(t, _)| *t == r.response).unwrap().1;
        Ok(Scored {
            score: s,
            calls: 1,
            ..Scored::default()
        })
    }
}

fn policy_of(texts: &[&str]) -> ScriptedBackend {
    let b = ScriptedBackend::new();
    for t in texts {
        b.push_text(*t);
    }
    b
}

#[tokio::test]
async fn west_of_n_picks_extremes() {
    let policy = policy_of(&["b", "a", "d", "c"]);
    let scorer = Table(vec![("a", 2.0), ("b", 5.0), ("c", 9.0), ("d", 1.0)]);
    let won = WestOfN::builder()
        .backend(policy.clone())
        .scorer(scorer)
        .n(4)
        .build()
        .unwrap();
    let ex = won.generate_one(Prompt::new("Q?")).await.unwrap();
    assert_eq!((ex.chosen.as_str(), ex.rejected.as_str()), ("c", "d"));
    assert_eq!(
        ex.label,
        Label::Better,
        "chosen (3) came after rejected (2)"
    );
    assert_eq!(ex.metadata.calls, 4 + 4);
    assert_eq!(ex.metadata.method, "west-of-n");
    assert_eq!(
        ex.metadata.extra["scores"],
        serde_json::json!([5.0, 2.0, 1.0, 9.0])
    );
    assert_eq!(ex.metadata.extra["chosen_index"], 3);
    assert_eq!(ex.metadata.extra["rejected_index"], 2);
    let seeds: std::collections::HashSet<_> =
        policy.requests().iter().map(|r| r.seed.unwrap()).collect();
    assert_eq!(seeds.len(), 4, "distinct seeds");
}

#[tokio::test]
async fn west_of_n_dedupes_and_never_pairs_a_response_with_itself() {
    // "a" twice (once with other case and spacing): scored once; the best is "a".
    let policy = policy_of(&["a", "b", "A ", "c"]);
    let scorer = Table(vec![("a", 9.0), ("b", 3.0), ("c", 1.0)]);
    let won = WestOfN::builder()
        .backend(policy)
        .scorer(scorer)
        .build()
        .unwrap();
    let ex = won.generate_one(Prompt::new("Q?")).await.unwrap();
    assert_eq!((ex.chosen.as_str(), ex.rejected.as_str()), ("a", "c"));
    assert_eq!(ex.metadata.calls, 4 + 3);
    assert!(ex.metadata.extra["scores"][2].is_null());

    // All identical: fails clearly.
    let policy = policy_of(&["same", "Same", "same ", "SAME"]);
    let won = WestOfN::builder()
        .backend(policy)
        .scorer(Table(vec![]))
        .build()
        .unwrap();
    let err = won
        .generate_one(Prompt::with_id("z", "Q?"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind(), err.call()),
        (ErrorKind::Unusable, Some("samples")),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("only 1 distinct response"),
        "{err}"
    );
    assert_eq!(err.example_id(), Some("z"));
}

#[tokio::test]
async fn west_of_n_ties_are_broken_deterministically() {
    // Top score shared by samples 1 and 2, bottom by 0 and 3: earliest best, latest worst.
    let texts = ["w1", "b1", "b2", "w2"];
    let scores = vec![("w1", 1.0), ("b1", 7.0), ("b2", 7.0), ("w2", 1.0)];
    let won = WestOfN::builder()
        .backend(policy_of(&texts))
        .scorer(Table(scores))
        .build()
        .unwrap();
    let ex = won.generate_one(Prompt::new("Q?")).await.unwrap();
    assert_eq!((ex.chosen.as_str(), ex.rejected.as_str()), ("b1", "w2"));

    // All equal: rejected by default, kept when allowed.
    let flat = || Table(vec![("x", 4.0), ("y", 4.0)]);
    let won = WestOfN::builder()
        .backend(policy_of(&["x", "y"]))
        .scorer(flat())
        .n(2)
        .build()
        .unwrap();
    let err = won.generate_one(Prompt::new("Q?")).await.unwrap_err();
    assert!(err.to_string().contains("scored 4"), "{err}");
    let won = WestOfN::builder()
        .backend(policy_of(&["x", "y"]))
        .scorer(flat())
        .n(2)
        .allow_ties(true)
        .build()
        .unwrap();
    let ex = won.generate_one(Prompt::new("Q?")).await.unwrap();
    assert_eq!((ex.chosen.as_str(), ex.rejected.as_str()), ("x", "y"));
}

#[tokio::test]
async fn west_of_n_default_judge_scores_pointwise() {
    let backend = ScriptedBackend::from_fn(model);
    let won = WestOfN::builder()
        .backend(backend.clone())
        .n(3)
        .seed(2)
        .build()
        .unwrap();
    let ex = won.generate_one(Prompt::new("Q?")).await.unwrap();
    // 3 samples + 3 judge scorings (the samples differ: the seed is in the text).
    assert_eq!(backend.calls(), 6);
    assert_eq!(ex.metadata.calls, 6);
    assert_eq!(ex.metadata.extra["scorer"], "llm-judge");
    let scorings: Vec<_> = backend
        .requests()
        .into_iter()
        .filter(|r| r.messages.last().unwrap().content.contains("<answer>"))
        .collect();
    assert_eq!(scorings.len(), 3);
    assert_ne!(ex.chosen, ex.rejected);
    let scores = ex.metadata.extra["scores"].as_array().unwrap();
    let best = scores
        .iter()
        .map(|s| s.as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    let chosen_i = ex.metadata.extra["chosen_index"].as_u64().unwrap() as usize;
    assert_eq!(scores[chosen_i].as_f64().unwrap(), best);
}

// ---------------------------------------------------------------- all methods

fn generators(
    backend: &ScriptedBackend,
    seed: u64,
    c: usize,
    order: OutputOrder,
) -> Vec<Box<dyn Generator>> {
    vec![
        Box::new(
            RmBoost::builder()
                .backend(backend.clone())
                .seed(seed)
                .concurrency(nz(c))
                .order(order)
                .build()
                .unwrap(),
        ),
        Box::new(
            Rlcd::builder()
                .backend(backend.clone())
                .seed(seed)
                .concurrency(nz(c))
                .order(order)
                .build()
                .unwrap(),
        ),
        Box::new(
            Rlaif::builder()
                .backend(backend.clone())
                .seed(seed)
                .concurrency(nz(c))
                .order(order)
                .on_inconsistent(OnInconsistent::Keep)
                .build()
                .unwrap(),
        ),
        Box::new(
            WestOfN::builder()
                .backend(backend.clone())
                .n(3)
                .seed(seed)
                .concurrency(nz(c))
                .order(order)
                .allow_ties(true)
                .build()
                .unwrap(),
        ),
    ]
}

type Outcome = (String, Result<(String, String, Label, Vec<String>), String>);

fn summarise(results: Vec<Result<PreferenceExample, Error>>) -> Vec<Outcome> {
    let mut v: Vec<Outcome> = results
        .into_iter()
        .map(|r| match r {
            Ok(e) => (e.id.clone(), Ok((e.chosen, e.rejected, e.label, e.aspects))),
            Err(e) => (e.example_id().unwrap().to_string(), Err(e.to_string())),
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The RMBoost stand-in answers second-response requests with tags.
fn model_with_rewrites(req: &CompletionRequest) -> Result<Completion, BackendError> {
    let last = &req.messages.last().unwrap().content;
    let second = req
        .messages
        .iter()
        .any(|m| m.content.contains("</response>"));
    if second && !last.contains("<answer_a>") {
        let seed = req.seed.unwrap_or(0);
        return Ok(Completion::new(format!(
            "<response>rewrite {seed:x}</response>"
        )));
    }
    model(req)
}

#[tokio::test(start_paused = true)]
async fn same_seed_same_pairs_at_any_concurrency_and_order() {
    let mut reference: Option<Vec<Vec<Outcome>>> = None;
    for (c, order) in [
        (1, OutputOrder::Input),
        (8, OutputOrder::Completion),
        (8, OutputOrder::Input),
    ] {
        let backend =
            ScriptedBackend::from_fn(model_with_rewrites).with_latency(Duration::from_millis(3));
        let mut all = Vec::new();
        for g in generators(&backend, 42, c, order) {
            let results: Vec<_> = g
                .generate_boxed(futures::stream::iter(prompts(20).into_iter().map(Ok)).boxed())
                .collect()
                .await;
            assert_eq!(results.len(), 20, "{:?}", g.method());
            for e in results.iter().flatten() {
                assert_eq!(e.metadata.method, g.method());
                assert_ne!(e.chosen, e.rejected);
            }
            all.push(summarise(results));
        }
        assert!(
            backend.max_in_flight() <= c,
            "{} > {c}",
            backend.max_in_flight()
        );
        if c == 8 {
            assert!(backend.max_in_flight() > 1, "ran concurrently");
        }
        match &reference {
            None => reference = Some(all),
            Some(r) => assert_eq!(r, &all, "concurrency {c}, {order:?}"),
        }
    }
    // Most examples succeed, and a different seed gives different pairs.
    let r = reference.unwrap();
    for (m, outcomes) in Method::ALL.iter().zip(&r) {
        let ok = outcomes.iter().filter(|o| o.1.is_ok()).count();
        assert!(ok >= 10, "{m}: only {ok} of 20");
    }
    let backend = ScriptedBackend::from_fn(model_with_rewrites);
    let g = &generators(&backend, 43, 4, OutputOrder::Input)[2];
    let other = summarise(g.generate_iter(prompts(20)).collect().await);
    assert_ne!(other, r[2]);
}

#[tokio::test]
async fn input_order_and_pass_through_errors() {
    let backend = ScriptedBackend::from_fn(model);
    let rlcd = Rlcd::builder()
        .backend(backend)
        .order(OutputOrder::Input)
        .concurrency(nz(3))
        .build()
        .unwrap();
    let input = vec![
        Ok(Prompt::with_id("a", "1")),
        Err(Error::config("bad input line")),
        Ok(Prompt::with_id("c", "3")),
    ];
    let out: Vec<_> = rlcd
        .try_generate(futures::stream::iter(input))
        .collect()
        .await;
    // A Config error is fatal for the stream: it is yielded and the stream ends.
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].as_ref().unwrap().id, "a");
    assert!(out[1]
        .as_ref()
        .is_err_and(|e| e.kind() == rmboost::ErrorKind::Config));
}

#[tokio::test]
async fn fatal_backend_error_stops_every_method() {
    for &method in Method::ALL {
        let backend = ScriptedBackend::from_fn(|_| {
            Err(BackendError::new(
                BackendErrorKind::Authentication,
                "bad key",
            ))
        });
        let g = &generators(&backend, 0, 2, OutputOrder::Completion)
            [Method::ALL.iter().position(|m| *m == method).unwrap()];
        let out: Vec<_> = g
            .try_generate(futures::stream::iter(prompts(10).into_iter().map(Ok)))
            .collect()
            .await;
        assert_eq!(out.len(), 1, "{method}");
        assert!(out[0].as_ref().unwrap_err().is_fatal());
        assert!(backend.calls() <= 2, "{method}: {}", backend.calls());
    }
}

#[test]
fn builders_validate() {
    let err = Rlcd::builder().build().unwrap_err();
    assert!(err.to_string().contains("no backend"), "{err}");
    assert!(Rlaif::builder().build().is_err());
    assert!(WestOfN::builder().build().is_err());
    let b = ScriptedBackend::new();
    let err = WestOfN::builder()
        .backend(b.clone())
        .n(1)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("at least 2"), "{err}");
    let bad = rmboost::SamplingParams::default().temperature(-1.0);
    assert!(Rlcd::builder()
        .backend(b.clone())
        .params(bad.clone())
        .build()
        .is_err());
    assert!(Rlaif::builder()
        .backend(b.clone())
        .judge(rmboost::judge::Judge::new(b.clone()).params(bad))
        .build()
        .is_err());
    fn send_sync<T: Send + Sync + Clone + 'static>() {}
    send_sync::<Rlcd>();
    send_sync::<Rlaif>();
    send_sync::<WestOfN>();
}
