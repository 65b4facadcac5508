//! Bad input never panics: the JSONL prompt reader, the output id scan and the response parser
//! over arbitrary bytes and strings.

use proptest::prelude::*;
use rmboost::checks::check_response;
use rmboost::io::{PromptReader, Resume};
use rmboost::template::extract_response;
use rmboost::ErrorKind;
use rmboost::{
    Aspect, AspectDraw, DefaultTemplate, Label, LabelDraw, Message, PromptTemplate, SecondContext,
};

fn lines_of(bytes: &[u8]) -> u64 {
    let n = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    n + u64::from(!bytes.is_empty() && !bytes.ends_with(b"\n"))
}

/// Fragments that make inputs look almost like prompt records.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{\"id\":\"a\",\"prompt\":\"hi\"}\n".to_vec()),
        Just(b"{\"prompt\":\"x\"".to_vec()),
        Just(b"{\"messages\":[{\"role\":\"user\",\"content\":\"q\"}]}\n".to_vec()),
        Just(b"{\"messages\":[]}\n".to_vec()),
        Just(b"{\"id\":null,\"prompt\":\"\"}\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(vec![0xff, 0xfe, 0x80]),
        Just("\u{feff}{\"prompt\":\"bom\"}\n".as_bytes().to_vec()),
        Just(b"[1,2,3]\n".to_vec()),
        Just(b"{\"id\":{\"x\":1},\"prompt\":\"p\"}\n".to_vec()),
        Just(b"{\"id\":1e400,\"prompt\":\"p\"}\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..40),
    ];
    proptest::collection::vec(piece, 0..20).prop_map(|v| v.concat())
}

fn check_reader(bytes: &[u8]) {
    let max_line = 64;
    let total = lines_of(bytes);
    let mut count = 0u64;
    for item in PromptReader::new(bytes, "in.jsonl").max_line_bytes(max_line) {
        count += 1;
        match item {
            Ok(p) => {
                assert!(!p.id().is_empty());
                assert!(!p.messages().is_empty());
            }
            Err(e) if e.kind() == ErrorKind::Parse => {
                let line = e.line().unwrap();
                assert!(line >= 1 && line <= total, "line {line} of {total}");
                let shown = e.to_string();
                let prefix = format!("{}:{line}: ", e.path().unwrap().display());
                assert!(shown.len() > prefix.len(), "{shown}");
                assert!(shown.starts_with(&prefix), "{shown}");
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert!(count <= total);
    let mut r = Resume::new();
    r.scan_reader(bytes).unwrap();
    assert!(r.lines() <= total);
}

fn ctx_parts() -> (Vec<Message>, LabelDraw, AspectDraw) {
    (
        vec![Message::user("What is the capital of France?")],
        LabelDraw::plain(Label::Better),
        AspectDraw {
            aspects: vec![
                Aspect::new("correctness", "facts are right"),
                Aspect::new("clarity", "easy to follow"),
            ],
            model_picks: Some(1),
        },
    )
}

fn response_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<response>".to_string()),
        Just("</response>".to_string()),
        Just("<RESPONSE>".to_string()),
        Just("<aspects>".to_string()),
        Just("</aspects>".to_string()),
        Just("clarity, correctness".to_string()),
        Just("Here is a better answer:\n".to_string()),
        Just("\"".to_string()),
        Just("\u{201c}".to_string()),
        Just("\u{201d}".to_string()),
        Just("é".to_string()),
        Just("\n".to_string()),
        "[a-zA-Z ]{0,12}",
        any::<String>(),
    ];
    proptest::collection::vec(piece, 0..16).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn reader_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check_reader(&bytes);
    }

    #[test]
    fn reader_never_panics_on_near_json(bytes in jsonish()) {
        check_reader(&bytes);
    }

    #[test]
    fn truncated_valid_files_read_up_to_the_cut(n in 1usize..20, cut in any::<prop::sample::Index>()) {
        let mut file = Vec::new();
        for i in 0..n {
            file.extend_from_slice(format!("{{\"id\":\"r{i}\",\"prompt\":\"question {i}\"}}\n").as_bytes());
        }
        let cut = cut.index(file.len() + 1);
        let bytes = &file[..cut];
        let results: Vec<_> = PromptReader::new(bytes, "t.jsonl").collect();
        let whole = bytes.iter().filter(|&&b| b == b'\n').count();
        // Every whole line reads; a cut last line is at most one error naming its line.
        for (i, r) in results.iter().take(whole).enumerate() {
            prop_assert_eq!(r.as_ref().unwrap().id(), format!("r{i}"));
        }
        prop_assert!(results.len() <= whole + 1);
        if results.len() == whole + 1 {
            if let Err(e) = &results[whole] {
                let msg = e.to_string();
                let prefix = format!("t.jsonl:{}: ", whole + 1);
                prop_assert!(msg.starts_with(&prefix), "{}", msg);
            }
        }
    }

    #[test]
    fn parser_never_panics(raw in response_text(), first in response_text()) {
        let text = extract_response(&raw);
        prop_assert!(raw.contains(text));
        prop_assert_eq!(text, text.trim());
        let _ = check_response(text, &first);
        let (prompt, label, aspects) = ctx_parts();
        let ctx = SecondContext::new(&prompt, &first, &label, &aspects);
        if let Ok(parsed) = DefaultTemplate::new().parse_second(&raw, &ctx) {
            prop_assert!(!parsed.text.trim().is_empty());
            if let Some(picked) = parsed.picked_aspects {
                prop_assert!(picked.len() <= 1);
            }
        }
    }
}

#[test]
fn very_long_lines_are_errors_not_allocations() {
    // 40 MB of one line against the default 16 MiB limit, then a good line.
    let mut input = b"{\"prompt\":\"".to_vec();
    input.resize(40 << 20, b'a');
    input.extend_from_slice(b"\"}\n{\"id\":\"ok\",\"prompt\":\"fine\"}\n");
    let rows: Vec<_> = PromptReader::new(&input[..], "big.jsonl").collect();
    assert_eq!(rows.len(), 2);
    let err = rows[0].as_ref().unwrap_err().to_string();
    assert!(err.starts_with("big.jsonl:1: line longer than"), "{err}");
    assert_eq!(rows[1].as_ref().unwrap().id(), "ok");
}

#[test]
fn empty_and_blank_inputs() {
    assert_eq!(PromptReader::new(&b""[..], "e").count(), 0);
    assert_eq!(PromptReader::new(&b"\n\n  \r\n"[..], "e").count(), 0);
}
