//! `AnthropicBackend` against the loopback server's canned answers: the wire format and the
//! error matrix.

use crate::support;

use std::time::Duration;

use rmboost::backend::anthropic::AnthropicBackend;
use rmboost::{
    BackendErrorKind, CompletionRequest, FinishReason, LlmBackend, Message, SamplingParams, Usage,
};
use serde_json::json;
use support::server::{rfc3339, Reply, Server};
use support::{anthropic_body, anthropic_error, dead_port, quick_retry};

const PATH: &str = "/v1/messages";

fn backend(server: &Server) -> AnthropicBackend {
    AnthropicBackend::builder()
        .base_url(server.uri())
        .model("claude-test")
        .api_key("sk-ant-test-key")
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn request() -> CompletionRequest {
    CompletionRequest::new(vec![Message::system("be brief"), Message::user("hi")])
}

#[tokio::test]
async fn sends_the_messages_api_shape() {
    let server = Server::replying(vec![Reply::json(200, &anthropic_body("hello", "end_turn"))]);
    let params = SamplingParams::default()
        .temperature(0.25)
        .max_tokens(64)
        .stop("END");
    let out = backend(&server)
        .complete(request().with_params(&params).with_seed(3))
        .await
        .unwrap();
    assert_eq!(out.text, "hello");
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.usage, Usage::new(12, 5));
    assert_eq!(out.model, "served-model");
    let [sent] = &server.recorded()[..] else {
        panic!("not one request")
    };
    assert_eq!((sent.method.as_str(), sent.path.as_str()), ("POST", PATH));
    assert_eq!(sent.header("x-api-key"), Some("sk-ant-test-key"));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    let want = json!({
        "model": "claude-test",
        "max_tokens": 64,
        "system": "be brief",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.25,
        "stop_sequences": ["END"]
    });
    assert_eq!(sent.body, want);
}

#[tokio::test]
async fn max_tokens_defaults_to_1024() {
    let server = Server::replying(vec![Reply::json(200, &anthropic_body("x", "end_turn"))]);
    backend(&server)
        .complete(CompletionRequest::new(vec![Message::user("hi")]))
        .await
        .unwrap();
    let want = json!({
        "model": "claude-test", "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hi"}]
    });
    assert_eq!(server.recorded()[0].body, want);
}

#[tokio::test]
async fn stop_reasons_and_usage() {
    let cases = [
        ("end_turn", "a", Ok(FinishReason::Stop)),
        ("stop_sequence", "a", Ok(FinishReason::Stop)),
        ("max_tokens", "cut", Ok(FinishReason::Length)),
        ("refusal", "partial", Ok(FinishReason::ContentFilter)),
        (
            "pause_turn",
            "p",
            Ok(FinishReason::Other("pause_turn".into())),
        ),
        ("max_tokens", "", Err(BackendErrorKind::Length)),
        ("refusal", "", Err(BackendErrorKind::ContentFilter)),
    ];
    for (reason, text, expected) in cases {
        let server = Server::replying(vec![Reply::json(200, &anthropic_body(text, reason))]);
        match (backend(&server).complete(request()).await, expected) {
            (Ok(c), Ok(want)) => assert_eq!(c.finish_reason, want, "{reason}"),
            (Err(e), Err(want)) => assert_eq!(e.kind(), want, "{reason}"),
            (got, want) => panic!("{reason}: got {got:?}, want {want:?}"),
        }
    }

    // Text blocks are joined, other blocks skipped, cache tokens count as prompt tokens.
    let body = json!({"type": "message", "model": "m", "stop_reason": "end_turn",
        "content": [{"type": "text", "text": "one "}, {"type": "thinking", "thinking": "hmm"},
                    {"type": "text", "text": "two"}],
        "usage": {"input_tokens": 10, "output_tokens": 3, "cache_creation_input_tokens": 5,
                  "cache_read_input_tokens": 2}});
    let server = Server::replying(vec![Reply::json(200, &body)]);
    let c = backend(&server).complete(request()).await.unwrap();
    assert_eq!(c.text, "one two");
    assert_eq!(c.usage, Usage::new(17, 3));
}

/// Status and error type -> kind, message kept, retried exactly when retryable.
#[tokio::test]
async fn error_matrix() {
    use BackendErrorKind::*;
    let cases: Vec<(u16, serde_json::Value, BackendErrorKind, &str)> = vec![
        (
            400,
            anthropic_error("invalid_request_error", "messages: field required"),
            InvalidRequest,
            "field required",
        ),
        (
            400,
            anthropic_error(
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API.",
            ),
            QuotaExhausted,
            "credit balance",
        ),
        (
            401,
            anthropic_error("authentication_error", "invalid x-api-key"),
            Authentication,
            "invalid x-api-key",
        ),
        (
            402,
            anthropic_error("billing_error", "billing problem"),
            QuotaExhausted,
            "billing problem",
        ),
        (
            403,
            anthropic_error("permission_error", "no permission"),
            Authentication,
            "no permission",
        ),
        (
            404,
            anthropic_error("not_found_error", "model: claude-nope"),
            NotFound,
            "claude-nope",
        ),
        (
            413,
            anthropic_error("request_too_large", "Request exceeds the maximum size"),
            InvalidRequest,
            "maximum size",
        ),
        (
            429,
            anthropic_error(
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit",
            ),
            RateLimited,
            "rate limit",
        ),
        (
            500,
            anthropic_error("api_error", "Internal server error"),
            Server,
            "Internal server error",
        ),
        (
            504,
            anthropic_error("timeout_error", "timed out"),
            Server,
            "timed out",
        ),
        (
            529,
            anthropic_error("overloaded_error", "Overloaded"),
            Server,
            "Overloaded",
        ),
    ];
    for (status, body, kind, message) in cases {
        let server = support::server::Server::replying(vec![Reply::json(status, &body)]);
        let retry = quick_retry(backend(&server), 3);
        let e = retry.complete(request()).await.unwrap_err();
        assert_eq!(e.kind(), kind, "HTTP {status} {body}");
        assert_eq!(e.status(), Some(status));
        assert!(e.message().contains(message), "{status}: {:?}", e.message());
        let calls = server.recorded().len();
        assert!(server.recorded().iter().all(|r| r.path == PATH));
        let want = if kind.is_retryable() { 3 } else { 1 };
        assert_eq!(calls, want, "HTTP {status} {body}");
    }
}

#[tokio::test]
async fn overloaded_529_with_retry_after_and_reset_headers() {
    let server = Server::replying(vec![Reply::json(
        529,
        &anthropic_error("overloaded_error", "Overloaded"),
    )
    .header("retry-after", "3")]);
    let e = backend(&server).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Server);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));

    let reset = std::time::SystemTime::now() + Duration::from_secs(20);
    let secs = reset
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let server = Server::replying(vec![Reply::json(
        429,
        &anthropic_error("rate_limit_error", "slow down"),
    )
    .header("anthropic-ratelimit-tokens-remaining", "0")
    .header("anthropic-ratelimit-tokens-reset", rfc3339(secs))]);
    let e = backend(&server).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::RateLimited);
    let ra = e.retry_after().expect("retry_after from the reset header");
    assert!(
        ra >= Duration::from_secs(17) && ra <= Duration::from_secs(21),
        "{ra:?}"
    );
}

#[tokio::test]
async fn malformed_and_error_typed_bodies() {
    let server = Server::replying(vec![Reply::text(200, "<html>bad gateway</html>")]);
    let e = backend(&server).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::InvalidResponse);

    let server = Server::replying(vec![Reply::json(
        200,
        &anthropic_error("overloaded_error", "Overloaded"),
    )]);
    let e = backend(&server).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Server);
}

#[tokio::test]
async fn connection_and_timeout_errors() {
    let b = AnthropicBackend::builder()
        .base_url(format!("http://127.0.0.1:{}", dead_port()))
        .model("m")
        .build()
        .unwrap();
    assert_eq!(
        b.complete(request()).await.unwrap_err().kind(),
        BackendErrorKind::Connection
    );
    let server = Server::replying(vec![
        Reply::json(200, &anthropic_body("late", "end_turn")).delay(Duration::from_secs(3))
    ]);
    let b = AnthropicBackend::builder()
        .base_url(server.uri())
        .model("m")
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    assert_eq!(
        b.complete(request()).await.unwrap_err().kind(),
        BackendErrorKind::Timeout
    );
}

#[test]
fn builder_validates() {
    assert!(AnthropicBackend::builder().build().is_err());
    assert!(AnthropicBackend::builder()
        .model("m")
        .default_max_tokens(0)
        .build()
        .is_err());
    assert!(AnthropicBackend::builder()
        .model("m")
        .version("bad\nversion")
        .build()
        .is_err());
    let b = AnthropicBackend::builder()
        .model("m")
        .api_key("k")
        .build()
        .unwrap();
    assert_eq!(b.endpoint(), "https://api.anthropic.com/v1/messages");
    assert_eq!(b.name(), "anthropic");
    assert!(AnthropicBackend::builder()
        .model("m")
        .api_key("k")
        .max_response_bytes(0)
        .build()
        .is_err());
    // Anthropic's own URL without a key given: ANTHROPIC_API_KEY is required.
    if std::env::var_os("ANTHROPIC_API_KEY").is_none() {
        let e = AnthropicBackend::builder().model("m").build().unwrap_err();
        assert!(e.to_string().contains("ANTHROPIC_API_KEY"), "{e}");
    }
    // A custom URL without a key given needs none.
    assert!(AnthropicBackend::builder()
        .model("m")
        .base_url("http://127.0.0.1:1/v1")
        .build()
        .is_ok());
}

/// A redirect is not followed: `x-api-key` is not a header reqwest's redirect policy strips,
/// so following it would hand the key to the other host.
#[tokio::test]
async fn redirects_are_not_followed_and_the_key_stays_home() {
    let elsewhere = Server::replying(vec![Reply::json(
        200,
        &anthropic_body("stolen", "end_turn"),
    )]);
    let location = format!("{}/v1/messages", elsewhere.uri());
    let server = Server::replying(vec![Reply::text(307, "").header("location", location)]);
    let e = quick_retry(backend(&server), 3)
        .complete(request())
        .await
        .unwrap_err();
    assert!(
        elsewhere.recorded().is_empty(),
        "the key followed the redirect"
    );
    assert_eq!(server.recorded().len(), 1);
    assert!(e.is_fatal(), "{e}");
    let host = elsewhere.uri().trim_start_matches("http://").to_string();
    assert!(e.to_string().contains(&host), "{e}");
    assert!(!format!("{e:?}").contains("sk-ant-test-key"));
}

/// Usage counts that would overflow when summed saturate instead.
#[tokio::test]
async fn absurd_usage_saturates() {
    let mut body = anthropic_body("hi", "end_turn");
    body["usage"] = json!({"input_tokens": u64::MAX, "output_tokens": 1,
        "cache_creation_input_tokens": 5, "cache_read_input_tokens": u64::MAX});
    let server = Server::replying(vec![Reply::json(200, &body)]);
    let c = backend(&server).complete(request()).await.unwrap();
    assert_eq!(c.usage, Usage::new(u64::MAX, 1));
    assert_eq!(c.usage.total(), u64::MAX);
}
