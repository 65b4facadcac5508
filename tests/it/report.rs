//! The dataset report on a hand-built dataset with known answers, and the judge check.

use std::io::Write;

use rmboost::report::{JudgeCheck, Report, NEAR_IDENTICAL_JACCARD};
use rmboost::testing::ScriptedBackend;
use rmboost::ErrorKind;
use rmboost::{
    BackendError, BackendErrorKind, Completion, ExampleFormat, ExampleMetadata, ExampleWriter,
    Label, Message, PreferenceExample, Usage,
};

fn ex(
    id: &str,
    chosen: &str,
    rejected: &str,
    label: Label,
    aspects: &[&str],
    method: &str,
    calls: u32,
) -> PreferenceExample {
    PreferenceExample {
        id: id.into(),
        prompt: vec![Message::user(format!("prompt {id}"))],
        chosen: chosen.into(),
        rejected: rejected.into(),
        label,
        grade: None,
        aspects: aspects.iter().map(|s| s.to_string()).collect(),
        margin: None,
        metadata: ExampleMetadata {
            method: method.into(),
            calls,
            ..ExampleMetadata::default()
        },
    }
}

fn dataset() -> Vec<PreferenceExample> {
    let mut first = ex(
        "1",
        "the cat sat on the mat",
        "a dog",
        Label::Better,
        &["clarity", "helpfulness"],
        "rmboost",
        2,
    );
    first
        .metadata
        .usage
        .insert("total".into(), Usage::new(10, 20));
    vec![
        first,
        ex(
            "2",
            "hi",
            "hello there",
            Label::Worse,
            &["clarity"],
            "rlcd",
            2,
        ),
        ex(
            "3",
            "Same words here.",
            "same words here",
            Label::Better,
            &[],
            "rlcd",
            4,
        ),
        // A duplicate id, no method, equal lengths.
        ex("1", "abc", "xyz", Label::Worse, &["clarity"], "", 0),
    ]
}

fn write_dataset(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("pairs.jsonl");
    let data = dataset();
    let mut conv = ExampleWriter::new(Vec::new(), ExampleFormat::Conversational);
    let mut std_ = ExampleWriter::new(Vec::new(), ExampleFormat::Standard);
    for (i, e) in data.iter().enumerate() {
        if i % 2 == 0 {
            conv.write(e).unwrap();
        } else {
            std_.write(e).unwrap();
        }
    }
    let conv = String::from_utf8(conv.into_inner().unwrap()).unwrap();
    let std_ = String::from_utf8(std_.into_inner().unwrap()).unwrap();
    // Interleave back into dataset order, with a blank line in the middle.
    let (c, s): (Vec<_>, Vec<_>) = (conv.lines().collect(), std_.lines().collect());
    let text = format!("{}\n{}\n\n{}\n{}\n", c[0], s[0], c[1], s[1]);
    std::fs::write(&path, text).unwrap();
    path
}

fn close(a: Option<f64>, b: f64) {
    let a = a.expect("a value");
    assert!((a - b).abs() < 1e-12, "{a} != {b}");
}

fn check_known(r: &Report) {
    assert_eq!(r.examples, 4);
    assert_eq!(r.duplicate_ids, 1);
    assert_eq!(r.methods["rlcd"], 2);
    assert_eq!(r.methods["rmboost"], 1);
    assert_eq!(r.methods["unknown"], 1);
    assert_eq!((r.labels.better, r.labels.worse), (2, 2));
    close(r.labels.better_share, 0.5);
    // chosen 22 + 2 + 16 + 3 = 43 chars, rejected 5 + 11 + 15 + 3 = 34.
    close(r.length.mean_chosen_chars, 43.0 / 4.0);
    close(r.length.mean_rejected_chars, 34.0 / 4.0);
    close(r.length.ratio, 43.0 / 34.0);
    close(r.length.chosen_longer_share, 0.5);
    close(r.length.equal_share, 0.25);
    // Only pair 3 is near-identical (Jaccard 1.0); the others share no token.
    assert_eq!(r.near_identical.threshold, NEAR_IDENTICAL_JACCARD);
    assert_eq!(r.near_identical.pairs, 1);
    close(r.near_identical.share, 0.25);
    close(r.near_identical.mean_jaccard, 0.25);
    // 19 tokens, 15 distinct; 11 bigrams, 9 distinct.
    assert_eq!(r.diversity.responses, 8);
    assert_eq!(r.diversity.tokens, 19);
    close(r.diversity.distinct_1, 15.0 / 19.0);
    close(r.diversity.distinct_2, 9.0 / 11.0);
    assert_eq!(r.aspects["clarity"], 3);
    assert_eq!(r.aspects["helpfulness"], 1);
    assert_eq!(r.aspects.len(), 2);
    assert_eq!(r.examples_without_aspects, 1);
    close(r.cost.mean_calls, 2.0);
    assert_eq!(r.cost.total_tokens, 30);
}

#[test]
fn known_answers_in_memory_and_from_file() {
    let r = Report::from_examples(dataset());
    check_known(&r);
    assert!(r.failures.is_none());

    let dir = tempfile::tempdir().unwrap();
    let path = write_dataset(dir.path());
    let from_file = Report::from_jsonl(&path).unwrap();
    assert_eq!(from_file, r);

    let text = r.to_string();
    for needle in [
        "examples:        4 (1 duplicate ids)",
        "rlcd 2",
        "better 2, worse 2 (50.0% better)",
        "chosen 10.8 vs rejected 8.5",
        "ratio 1.265",
        "chosen longer in 50.0% of pairs",
        "1 pairs (25.0%) with token Jaccard >= 0.9",
        "distinct-1 0.789, distinct-2 0.818 over 8 responses (19 tokens)",
        "clarity 3, helpfulness 1; 1 examples without",
        "2.00 calls per example, 30 tokens",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["examples"], 4);
    assert_eq!(json["labels"]["better_share"], 0.5);
    assert_eq!(json["near_identical"]["pairs"], 1);
    assert_eq!(json["aspects"]["clarity"], 3);
    assert!(json.get("failures").is_none());
}

#[test]
fn failure_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_dataset(dir.path());
    let ledger = dir.path().join("failures.jsonl");
    std::fs::write(
        &ledger,
        concat!(
            r#"{"id": "5", "kind": "timeout", "message": "took too long"}"#,
            "\n",
            r#"{"id": "5", "kind": "unusable", "message": "empty"}"#,
            "\n\n",
            r#"{"id": "2", "kind": "rate_limited", "message": "recovered on resume"}"#,
            "\n",
            r#"{"id": 6, "kind": "timeout", "message": "x", "extra": [1]}"#,
            "\n",
        ),
    )
    .unwrap();
    let r = Report::from_jsonl_with_ledger(&path, &ledger).unwrap();
    check_known(&r);
    let f = r.failures.as_ref().unwrap();
    assert_eq!(f.ledger_lines, 4);
    assert_eq!(f.failed, 2);
    assert_eq!(f.recovered, 1);
    assert_eq!(f.by_kind["timeout"], 1);
    assert_eq!(f.by_kind["unusable"], 1);
    // 3 distinct ids in the dataset, 2 failed ids: 2 / 5.
    close(f.rate, 0.4);
    let text = r.to_string();
    assert!(
        text.contains("2 ids failed (40.0% of prompts), 1 recovered, 4 ledger lines"),
        "{text}"
    );

    // An empty ledger still gives a failure section with rate 0.
    let empty = dir.path().join("none.jsonl");
    std::fs::write(&empty, "").unwrap();
    let r = Report::from_jsonl_with_ledger(&path, &empty).unwrap();
    close(r.failures.unwrap().rate, 0.0);

    // A bad ledger line names the ledger and the line.
    std::fs::write(
        &ledger,
        "{\"id\": \"1\", \"kind\": \"x\"}\n{\"id\": \"2\"}\n",
    )
    .unwrap();
    let err = Report::from_jsonl_with_ledger(&path, &ledger).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Parse, "{err}");
    assert_eq!(err.path(), Some(ledger.as_path()));
    assert_eq!(err.line(), Some(2));
    assert!(err.to_string().contains("kind"), "{err}");
}

#[test]
fn bad_dataset_lines_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let good = dataset()[0].to_json_line(ExampleFormat::Standard);
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{good}\n\n{{\"id\": \"x\", \"prompt\": \"p\"}}").unwrap();
    drop(f);
    let err = Report::from_jsonl(&path).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Parse, "{err}");
    assert_eq!((err.path(), err.line()), (Some(path.as_path()), Some(3)));
    assert!(err.to_string().contains("chosen"), "{err}");
    assert!(err
        .to_string()
        .starts_with(&format!("{}:3:", path.display())));

    std::fs::write(&path, "not json\n").unwrap();
    let err = Report::from_jsonl(&path).unwrap_err();
    assert_eq!((err.kind(), err.line()), (ErrorKind::Parse, Some(1)));
    let missing = dir.path().join("missing.jsonl");
    assert_eq!(
        Report::from_jsonl(&missing).unwrap_err().kind(),
        ErrorKind::Io
    );
}

#[test]
fn empty_dataset_has_no_ratios() {
    let r = Report::from_examples(Vec::<PreferenceExample>::new());
    assert_eq!(r.examples, 0);
    assert_eq!(r.labels.better_share, None);
    assert_eq!(r.length.ratio, None);
    assert_eq!(r.diversity.distinct_1, None);
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["length"]["ratio"].is_null());
    assert!(r.to_string().contains("n/a"));
}

// ---------------------------------------------------------------- judge check

/// A judge that prefers the answer containing "good"; "??" when neither or both do.
fn judge_model(req: &rmboost::CompletionRequest) -> Result<Completion, BackendError> {
    let t = &req.messages.last().unwrap().content;
    let part = |open: &str, close: &str| {
        let s = t.find(open).unwrap();
        t[s..t.find(close).unwrap()].contains("good")
    };
    let (a, b) = (
        part("<answer_a>", "</answer_a>"),
        part("<answer_b>", "</answer_b>"),
    );
    if t.contains("biased") {
        return Ok(Completion::new("<verdict>A</verdict>"));
    }
    if t.contains("flaky") {
        return Err(BackendError::server("overloaded"));
    }
    Ok(Completion::new(match (a, b) {
        (true, false) => "<verdict>A</verdict>",
        (false, true) => "<verdict>B</verdict>",
        _ => "??",
    }))
}

#[tokio::test]
async fn judge_check_counts_and_swaps() {
    let data = vec![
        ex("a", "good answer", "meh", Label::Better, &[], "rmboost", 2),
        ex("b", "meh", "good answer", Label::Worse, &[], "rmboost", 2),
        ex(
            "c",
            "biased one",
            "biased two",
            Label::Better,
            &[],
            "rmboost",
            2,
        ),
        ex("d", "meh", "also meh", Label::Better, &[], "rmboost", 2),
        ex("e", "flaky", "flaky too", Label::Better, &[], "rmboost", 2),
    ];
    let judge = ScriptedBackend::from_fn(judge_model);
    let result = JudgeCheck::new(judge.clone())
        .k(5)
        .seed(9)
        .concurrency(std::num::NonZeroUsize::new(1).unwrap())
        .run(&data)
        .await
        .unwrap();
    assert_eq!(judge.calls(), 10, "exactly 2K calls");
    assert_eq!(result.sampled, 5);
    assert_eq!(result.calls, 10);
    assert_eq!(result.agree, 1);
    assert_eq!(result.disagree, 1);
    assert_eq!(result.disagreeing_ids, vec!["b".to_string()]);
    assert_eq!(result.inconsistent, 1, "position bias on c");
    assert_eq!(result.unreadable, 1, "no re-ask on d");
    assert_eq!(result.failed, 1);
    assert_eq!(result.agreement, Some(0.5));
    assert_eq!(result.label_noise, Some(0.5));
    assert!(result.to_string().contains("estimated label noise 50.0%"));

    // The second judgement of each example swaps the answers.
    let reqs = judge.requests();
    let a_of = |r: &rmboost::CompletionRequest| {
        let t = &r.messages.last().unwrap().content;
        let s = t.find("<answer_a>\n").unwrap() + "<answer_a>\n".len();
        t[s..t.find("\n</answer_a>").unwrap()].to_string()
    };
    for pair in reqs.chunks(2) {
        let (first, second) = (a_of(&pair[0]), a_of(&pair[1]));
        assert!(
            data.iter()
                .any(|e| e.chosen == first && e.rejected == second),
            "{first:?} then {second:?}"
        );
        assert_ne!(pair[0].seed, pair[1].seed);
    }
}

#[tokio::test]
async fn judge_check_samples_k_seeded_and_stops_on_fatal() {
    let data: Vec<_> = (0..30)
        .map(|i| {
            ex(
                &format!("x{i}"),
                "good",
                "bad",
                Label::Better,
                &[],
                "rlcd",
                2,
            )
        })
        .collect();
    let judge = ScriptedBackend::from_fn(judge_model);
    let check = JudgeCheck::new(judge.clone()).k(7).seed(1);
    let idx = check.sample_indices(data.len());
    assert_eq!(idx.len(), 7);
    assert_eq!(idx, check.sample_indices(data.len()));
    assert_ne!(
        idx,
        JudgeCheck::new(judge.clone())
            .k(7)
            .seed(2)
            .sample_indices(30)
    );
    assert_eq!(check.sample_indices(3), vec![0, 1, 2]);
    let result = check.run(&data).await.unwrap();
    assert_eq!((result.sampled, result.agree, judge.calls()), (7, 7, 14));

    let fatal = ScriptedBackend::from_fn(|_| {
        Err(BackendError::new(
            BackendErrorKind::QuotaExhausted,
            "no credit",
        ))
    });
    let err = JudgeCheck::new(fatal).k(3).run(&data).await.unwrap_err();
    assert!(err.is_fatal(), "{err}");
}

// ---------------------------------------------------------------- with the runner

/// A baseline chosen at run time, run to a file by `run::run_to_file`, then reported with the
/// run's own failure ledger.
#[cfg(feature = "run")]
#[tokio::test]
async fn report_reads_what_a_baseline_run_writes() {
    use rmboost::io::FailureLedger;
    use rmboost::run::{run_to_file, RunOptions};
    use rmboost::{Generator, Method, Prompt, Rlcd};

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let backend = ScriptedBackend::from_fn(|req| {
        let user = &req.messages.last().unwrap().content;
        if user.contains("too long") {
            return Err(BackendError::new(
                BackendErrorKind::InvalidRequest,
                "too long",
            ));
        }
        Ok(Completion::new(format!("answer {}", req.seed.unwrap())).with_usage(Usage::new(3, 4)))
    });
    let method: Method = "rlcd".parse().unwrap();
    assert_eq!(method, Method::Rlcd);
    let generator: Box<dyn Generator> = Box::new(Rlcd::builder().backend(backend).build().unwrap());
    let prompts = futures::stream::iter(vec![
        Ok(Prompt::with_id("a", "Why?")),
        Ok(Prompt::with_id("b", "This prompt is too long")),
        Ok(Prompt::with_id("c", "How?")),
    ]);
    run_to_file(
        |s| generator.generate_boxed(s),
        prompts,
        &out,
        RunOptions::new(),
    )
    .await
    .unwrap();
    let report = Report::from_jsonl_with_ledger(&out, FailureLedger::default_path(&out)).unwrap();
    assert_eq!(report.examples, 2);
    assert_eq!(report.methods["rlcd"], 2);
    assert_eq!(report.labels.better, 2);
    close(report.cost.mean_calls, 2.0);
    assert_eq!(report.cost.total_tokens, 2 * 2 * 7);
    let f = report.failures.unwrap();
    assert_eq!((f.failed, f.ledger_lines), (1, 1));
    assert_eq!(f.by_kind["invalid_request"], 1);
    close(f.rate, 1.0 / 3.0);
}
