//! The API key never shows in Debug, Display, an error's source chain, or tracing output
//! (captured at TRACE level), even when the server echoes it back.

use crate::support;

use std::error::Error as _;

use rmboost::backend::anthropic::AnthropicBackend;
use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::retry::Retry;
use rmboost::{BackendError, CompletionRequest, LlmBackend, Message};
use support::server::{Reply, Server};
use support::{anthropic_body, capture_tracing, dead_port, openai_body, quick_retry};

const KEY: &str = "sk-live-SUPERSECRET-0123456789";

fn request() -> CompletionRequest {
    CompletionRequest::new(vec![Message::user("tell me a secret")])
}

/// Every text an error shows, its sources included.
fn all_text(e: &BackendError) -> String {
    let mut out = format!("{e}\n{e:?}\n{e:#?}\n");
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!("{s}\n{s:?}\n"));
        source = s.source();
    }
    out
}

#[test]
fn builders_and_backends_do_not_print_the_key() {
    let builder = OpenAiBackend::builder()
        .model("m")
        .api_key(KEY)
        .header("x-token", KEY);
    let shown = format!("{builder:?}");
    assert!(!shown.contains(KEY), "{shown}");
    let backend = builder.build().unwrap();
    let shown = format!("{backend:?} {backend:#?} {:?}", Retry::new(backend.clone()));
    assert!(!shown.contains(KEY), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");

    let builder = AnthropicBackend::builder().model("m").api_key(KEY);
    let shown = format!("{builder:?}");
    assert!(!shown.contains(KEY), "{shown}");
    let backend = builder.build().unwrap();
    let shown = format!("{backend:?} {backend:#?}");
    assert!(!shown.contains(KEY), "{shown}");
}

/// Runs in a child of this test binary with the variable set: the tests share one process,
/// whose environment none of them changes.
#[test]
fn key_from_the_environment_is_not_printed() {
    if std::env::var_os("RMBOOST_TEST_SECRET_KEY_VAR").is_none() {
        let name = "secrets::key_from_the_environment_is_not_printed";
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1"])
            .env("RMBOOST_TEST_SECRET_KEY_VAR", KEY)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && out.contains("1 passed"), "{out}");
        return;
    }
    let backend = OpenAiBackend::builder()
        .model("m")
        .api_key_env("RMBOOST_TEST_SECRET_KEY_VAR")
        .build()
        .unwrap();
    assert!(!format!("{backend:?}").contains(KEY));
}

#[tokio::test]
async fn openai_key_is_sent_but_never_shown() {
    let (captured, _guard) = capture_tracing();
    // The key is sent, then echoed back by a careless server in a 401 and a 500.
    let server = Server::replying(vec![
        Reply::json(200, &openai_body("fine", "stop")),
        Reply::json(
            401,
            &serde_json::json!({
                "error": {"message": format!("Incorrect API key provided: {KEY}"), "type": "invalid_request_error"}
            }),
        ),
        Reply::text(500, format!("crash dump: key={KEY}")),
    ]);
    let backend = quick_retry(
        OpenAiBackend::builder()
            .base_url(server.uri())
            .model("m")
            .api_key(KEY)
            .build()
            .unwrap(),
        2,
    );
    let ok = backend.complete(request()).await.unwrap();
    let bearer = format!("Bearer {KEY}");
    assert_eq!(server.recorded()[0].header("authorization"), Some(&*bearer));
    assert_eq!(ok.text, "fine");
    let auth = backend.complete(request()).await.unwrap_err();
    assert!(auth.message().contains("Incorrect API key provided"));
    let server_err = backend.complete(request()).await.unwrap_err();

    for e in [&auth, &server_err] {
        let text = all_text(e);
        assert!(!text.contains(KEY), "{text}");
    }
    let log = captured.text();
    assert!(log.contains("llm_call"), "no span captured: {log}");
    assert!(
        log.contains("tell me a secret"),
        "trace-level text missing: {log}"
    );
    // The span records status and token counts, under the retry wrapper's attempt span.
    assert!(log.contains("status=200"), "{log}");
    assert!(log.contains("prompt_tokens=12"), "{log}");
    assert!(log.contains("completion_tokens=5"), "{log}");
    assert!(log.contains("llm_attempt{attempt=1}"), "{log}");
    assert!(!log.contains(KEY), "key in tracing output:\n{log}");
}

#[tokio::test]
async fn anthropic_key_is_sent_but_never_shown() {
    let (captured, _guard) = capture_tracing();
    let server = Server::replying(vec![
        Reply::json(200, &anthropic_body("fine", "end_turn")),
        Reply::json(
            401,
            &serde_json::json!({
                "type": "error",
                "error": {"type": "authentication_error", "message": format!("invalid x-api-key {KEY}")}
            }),
        ),
    ]);
    let backend = quick_retry(
        AnthropicBackend::builder()
            .base_url(server.uri())
            .model("m")
            .api_key(KEY)
            .build()
            .unwrap(),
        2,
    );
    assert_eq!(backend.complete(request()).await.unwrap().text, "fine");
    assert_eq!(server.recorded()[0].header("x-api-key"), Some(KEY));
    let e = backend.complete(request()).await.unwrap_err();
    assert!(!all_text(&e).contains(KEY));
    let log = captured.text();
    assert!(log.contains("llm_call"), "{log}");
    assert!(!log.contains(KEY), "key in tracing output:\n{log}");
}

#[tokio::test]
async fn transport_errors_do_not_show_the_key() {
    let (captured, _guard) = capture_tracing();
    let backend = quick_retry(
        OpenAiBackend::builder()
            .base_url(format!("http://127.0.0.1:{}/v1", dead_port()))
            .model("m")
            .api_key(KEY)
            .build()
            .unwrap(),
        2,
    );
    let e = backend.complete(request()).await.unwrap_err();
    assert!(e.source().is_some());
    assert!(!all_text(&e).contains(KEY));
    assert!(!captured.text().contains(KEY));
}

/// The identity (which goes into cache keys), the plain-http warning and a 401's note about
/// keys show no key, no header value, no password or query of the base URL.
#[test]
fn identity_and_warnings_do_not_show_secrets() {
    let (captured, _guard) = capture_tracing();
    let openai = OpenAiBackend::builder()
        .base_url("http://user:pw-secret@10.1.2.3:8000/v1?key=query-secret")
        .model("m")
        .api_key(KEY)
        .header("x-token", "header-secret")
        .build()
        .unwrap();
    let anthropic = AnthropicBackend::builder()
        .base_url("http://10.1.2.3:8001/v1")
        .model("m")
        .api_key(KEY)
        .header("x-token", "header-secret")
        .build()
        .unwrap();
    for id in [
        openai.identity().into_owned(),
        Retry::new(openai.clone()).identity().into_owned(),
        anthropic.identity().into_owned(),
    ] {
        for secret in [KEY, "header-secret", "query-secret", "pw-secret"] {
            assert!(!id.contains(secret), "{secret} in {id}");
        }
        assert!(
            id.contains("10.1.2.3:800") && id.contains("x-token"),
            "{id}"
        );
    }
    let log = captured.text();
    assert!(log.contains("plain http"), "no warning: {log}");
    assert!(!log.contains(KEY), "{log}");
}
