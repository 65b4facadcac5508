//! `OpenAiBackend` against a wiremock server: the wire format, the error matrix, `Retry-After`,
//! and the retry wrapper over real HTTP.
#![cfg(feature = "openai")]

mod support;

use std::num::NonZeroU32;
use std::time::{Duration, SystemTime};

use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::retry::{Retry, RetryPolicy};
use rmboost::{
    BackendErrorKind, CompletionRequest, FinishReason, LlmBackend, Message, SamplingParams, Usage,
};
use serde_json::json;
use support::{dead_port, openai_body, openai_error};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PATH: &str = "/v1/chat/completions";

fn backend(server: &MockServer) -> OpenAiBackend {
    OpenAiBackend::builder()
        .base_url(server.uri())
        .model("test-model")
        .api_key("sk-test-key")
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn request() -> CompletionRequest {
    CompletionRequest::new(vec![Message::system("be brief"), Message::user("hi")])
}

/// Retries quickly: 3 attempts, 1 ms waits.
fn quick_retry<B>(inner: B) -> Retry<B> {
    Retry::with_policy(
        inner,
        RetryPolicy::default()
            .max_attempts(NonZeroU32::new(3).unwrap())
            .initial_delay(Duration::from_millis(1))
            .max_delay(Duration::from_millis(1))
            .jitter(false),
    )
}

#[tokio::test]
async fn sends_the_request_fields_and_maps_the_response() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(PATH))
        .and(header("authorization", "Bearer sk-test-key"))
        .and(header("x-gateway", "blue"))
        .and(header("content-type", "application/json"))
        .and(body_partial_json(json!({
            "model": "test-model",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "temperature": 0.0, "top_p": 0.5, "max_tokens": 7, "seed": 42, "stop": ["END"],
            "top_k": 40
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(openai_body("hello", "stop")))
        .expect(1)
        .mount(&server)
        .await;
    let backend = OpenAiBackend::builder()
        .base_url(format!("{}/v1", server.uri()))
        .model("test-model")
        .api_key("sk-test-key")
        .header("x-gateway", "blue")
        .extra_body("top_k", json!(40))
        .build()
        .unwrap();
    let params = SamplingParams::default()
        .temperature(0.0)
        .top_p(0.5)
        .max_tokens(7)
        .stop("END");
    let out = backend
        .complete(request().with_params(&params).with_seed(42))
        .await
        .unwrap();
    assert_eq!(out.text, "hello");
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.usage, Usage::new(12, 5));
    assert_eq!(out.model, "served-model");
    assert_eq!(backend.name(), "openai");
    assert_eq!(backend.model(), "test-model");
}

#[tokio::test]
async fn unset_fields_are_not_sent() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(openai_body("x", "stop")))
        .mount(&server)
        .await;
    backend(&server).complete(request()).await.unwrap();
    let received = server.received_requests().await.unwrap();
    let body: serde_json::Value = received[0].body_json().unwrap();
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, vec!["messages", "model"]);
}

#[tokio::test]
async fn finish_reasons() {
    let cases = [
        (json!("stop"), "text", Ok(FinishReason::Stop)),
        (json!(null), "text", Ok(FinishReason::Stop)),
        (json!("length"), "cut off", Ok(FinishReason::Length)),
        (
            json!("content_filter"),
            "partly",
            Ok(FinishReason::ContentFilter),
        ),
        (
            json!("tool_calls"),
            "t",
            Ok(FinishReason::Other("tool_calls".into())),
        ),
        (json!("length"), "", Err(BackendErrorKind::Length)),
        (json!("length"), "  \n", Err(BackendErrorKind::Length)),
        (
            json!("content_filter"),
            "",
            Err(BackendErrorKind::ContentFilter),
        ),
    ];
    for (reason, text, expected) in cases {
        let server = MockServer::start().await;
        let mut body = openai_body(text, "stop");
        body["choices"][0]["finish_reason"] = reason.clone();
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(&server)
            .await;
        let got = backend(&server).complete(request()).await;
        match (got, expected) {
            (Ok(c), Ok(want)) => {
                assert_eq!(c.finish_reason, want, "{reason}");
                assert_eq!(c.text, text);
            }
            (Err(e), Err(want)) => {
                assert_eq!(e.kind(), want, "{reason}");
                assert!(!e.is_retryable());
            }
            (got, want) => panic!("{reason} {text:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[tokio::test]
async fn refusal_without_content_is_a_content_filter_error() {
    let server = MockServer::start().await;
    let body = json!({"choices": [{"message": {"role": "assistant", "content": null,
        "refusal": "I can't help with that."}, "finish_reason": "stop"}]});
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .mount(&server)
        .await;
    let e = backend(&server).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::ContentFilter);
    assert!(e.message().contains("can't help"), "{e}");
}

#[tokio::test]
async fn missing_usage_and_model_default() {
    let server = MockServer::start().await;
    let body = json!({"choices": [{"message": {"content": "hi"}}]});
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .mount(&server)
        .await;
    let c = backend(&server).complete(request()).await.unwrap();
    assert_eq!(c.usage, Usage::default());
    assert_eq!(c.model, "test-model");
}

struct Case {
    status: u16,
    body: serde_json::Value,
    kind: BackendErrorKind,
    retried: bool,
    message: &'static str,
}

fn case(
    status: u16,
    body: serde_json::Value,
    kind: BackendErrorKind,
    message: &'static str,
) -> Case {
    Case {
        status,
        body,
        kind,
        retried: kind.is_retryable(),
        message,
    }
}

/// Each status and body maps to the right kind, keeps the server's message, and is retried
/// (3 requests reach the server) exactly when it should be.
#[tokio::test]
async fn error_matrix() {
    use BackendErrorKind::*;
    let cases = vec![
        case(
            400,
            openai_error("invalid_request_error", None, "max_tokens is too large"),
            InvalidRequest,
            "max_tokens is too large",
        ),
        case(
            413,
            json!({"error": "request entity too large"}),
            InvalidRequest,
            "too large",
        ),
        case(
            422,
            json!({"object": "error", "message": "bad temperature", "type": "BadRequestError", "code": 422}),
            InvalidRequest,
            "bad temperature",
        ),
        case(
            401,
            openai_error(
                "invalid_request_error",
                Some("invalid_api_key"),
                "Incorrect API key provided",
            ),
            Authentication,
            "Incorrect API key",
        ),
        case(
            403,
            openai_error("permission_error", None, "no access to model"),
            Authentication,
            "no access",
        ),
        case(
            404,
            openai_error(
                "invalid_request_error",
                Some("model_not_found"),
                "The model `nope` does not exist",
            ),
            NotFound,
            "does not exist",
        ),
        case(
            429,
            openai_error(
                "requests",
                Some("rate_limit_exceeded"),
                "Rate limit reached for requests",
            ),
            RateLimited,
            "Rate limit reached",
        ),
        case(
            429,
            openai_error(
                "insufficient_quota",
                Some("insufficient_quota"),
                "You exceeded your current quota, please check your plan and billing details.",
            ),
            QuotaExhausted,
            "current quota",
        ),
        case(
            429,
            json!({"error": "Your credit balance is too low"}),
            QuotaExhausted,
            "credit balance",
        ),
        case(
            402,
            json!({"error": {"message": "payment required"}}),
            QuotaExhausted,
            "payment required",
        ),
        case(
            500,
            openai_error("server_error", None, "The server had an error"),
            Server,
            "server had an error",
        ),
        case(502, json!(null), Server, "Bad Gateway"),
        case(
            503,
            json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}),
            Server,
            "Loading model",
        ),
        case(
            529,
            json!({"error": {"message": "overloaded"}}),
            Server,
            "overloaded",
        ),
        case(408, json!({}), Timeout, "Request Timeout"),
        case(418, json!({"error": "teapot"}), Other, "teapot"),
    ];
    for c in cases {
        let server = MockServer::start().await;
        let template = if c.body.is_null() {
            ResponseTemplate::new(c.status)
        } else {
            ResponseTemplate::new(c.status).set_body_json(&c.body)
        };
        Mock::given(method("POST"))
            .and(path(PATH))
            .respond_with(template)
            .mount(&server)
            .await;
        let retry = quick_retry(backend(&server));
        let e = retry.complete(request()).await.unwrap_err();
        assert_eq!(e.kind(), c.kind, "HTTP {} {}", c.status, c.body);
        assert_eq!(e.status(), Some(c.status));
        assert!(
            e.message().contains(c.message),
            "HTTP {}: message {:?} lacks {:?}",
            c.status,
            e.message(),
            c.message
        );
        let calls = server.received_requests().await.unwrap().len();
        assert_eq!(
            calls,
            if c.retried { 3 } else { 1 },
            "HTTP {} {}",
            c.status,
            c.body
        );
        assert_eq!(e.is_fatal(), c.kind.is_fatal());
    }
}

#[tokio::test]
async fn malformed_bodies_are_invalid_responses_and_retried() {
    for body in [
        "not json at all",
        "",
        "{\"choices\": []}",
        "{\"choices\": 3}",
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string(body))
            .mount(&server)
            .await;
        let retry = quick_retry(backend(&server));
        let e = retry.complete(request()).await.unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::InvalidResponse, "{body:?}");
        assert_eq!(
            server.received_requests().await.unwrap().len(),
            3,
            "{body:?}"
        );
    }
}

#[tokio::test]
async fn an_error_object_in_a_200_body_is_classified() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(openai_error(
            "server_error",
            None,
            "upstream failed",
        )))
        .mount(&server)
        .await;
    let e = backend(&server).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Server);
    assert!(e.message().contains("upstream failed"));
}

#[tokio::test]
async fn retry_after_header_forms_are_parsed() {
    let in_30s = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
    type Headers<'a> = Vec<(&'a str, String)>;
    let cases: Vec<(Headers, Duration, Duration)> = vec![
        (
            vec![("retry-after", "7".into())],
            Duration::from_secs(7),
            Duration::from_secs(7),
        ),
        (
            vec![("retry-after", "1.5".into())],
            Duration::from_millis(1500),
            Duration::from_millis(1500),
        ),
        (
            vec![
                ("retry-after-ms", "250".into()),
                ("retry-after", "9".into()),
            ],
            Duration::from_millis(250),
            Duration::from_millis(250),
        ),
        (
            vec![("retry-after", in_30s)],
            Duration::from_secs(27),
            Duration::from_secs(31),
        ),
        (
            vec![
                ("x-ratelimit-remaining-requests", "0".into()),
                ("x-ratelimit-reset-requests", "2s".into()),
                ("x-ratelimit-remaining-tokens", "100".into()),
                ("x-ratelimit-reset-tokens", "6m0s".into()),
            ],
            Duration::from_secs(2),
            Duration::from_secs(2),
        ),
    ];
    for (headers, low, high) in cases {
        let server = MockServer::start().await;
        let mut template = ResponseTemplate::new(429).set_body_json(openai_error(
            "requests",
            Some("rate_limit_exceeded"),
            "slow down",
        ));
        for (k, v) in &headers {
            template = template.insert_header(*k, v.as_str());
        }
        Mock::given(method("POST"))
            .respond_with(template)
            .mount(&server)
            .await;
        let e = backend(&server).complete(request()).await.unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::RateLimited);
        let ra = e
            .retry_after()
            .unwrap_or_else(|| panic!("no retry_after for {headers:?}"));
        assert!(ra >= low && ra <= high, "{headers:?}: {ra:?}");
    }
}

#[tokio::test]
async fn a_503_with_retry_after_carries_it() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).insert_header("retry-after", "4"))
        .mount(&server)
        .await;
    let e = backend(&server).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Server);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(4)));
}

/// Real sockets and real time (1 s): the wrapper waits at least what the server asked.
#[tokio::test]
async fn retry_honours_retry_after_over_http() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "1")
                .set_body_json(openai_error(
                    "requests",
                    Some("rate_limit_exceeded"),
                    "slow down",
                )),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(openai_body("after the wait", "stop")),
        )
        .with_priority(2)
        .mount(&server)
        .await;
    let retry = quick_retry(backend(&server));
    let start = std::time::Instant::now();
    let out = retry.complete(request()).await.unwrap();
    assert_eq!(out.text, "after the wait");
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(retry.stats().retries(), 1);
    assert_eq!(retry.stats().rate_limited(), 1);
}

#[tokio::test]
async fn timeouts_are_retryable_timeouts() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(openai_body("late", "stop"))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let backend = OpenAiBackend::builder()
        .base_url(server.uri())
        .model("m")
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let e = backend.complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Timeout, "{e:?}");
    assert!(e.is_retryable());
    assert!(std::error::Error::source(&e).is_some());
}

#[tokio::test]
async fn connection_refused_is_a_retryable_connection_error() {
    let backend = OpenAiBackend::builder()
        .base_url(format!("http://127.0.0.1:{}", dead_port()))
        .model("m")
        .build()
        .unwrap();
    let retry = quick_retry(backend);
    let e = retry.complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Connection, "{e:?}");
    assert_eq!(retry.stats().attempts(), 3);
    assert!(e.message().contains("127.0.0.1"), "{e}");
}

#[test]
fn builder_errors_are_config_errors() {
    let no_model = OpenAiBackend::builder().build().unwrap_err();
    assert!(no_model.kind() == rmboost::ErrorKind::Config, "{no_model}");
    let bad_url = OpenAiBackend::builder()
        .model("m")
        .base_url("::nope")
        .build()
        .unwrap_err();
    assert!(bad_url.to_string().contains("base URL"), "{bad_url}");
    let missing_env = OpenAiBackend::builder()
        .model("m")
        .api_key_env("RMBOOST_TEST_SURELY_UNSET_VAR")
        .build()
        .unwrap_err();
    assert!(
        missing_env
            .to_string()
            .contains("RMBOOST_TEST_SURELY_UNSET_VAR"),
        "{missing_env}"
    );
    let bad_header = OpenAiBackend::builder()
        .model("m")
        .header("bad header", "x")
        .build()
        .unwrap_err();
    assert!(bad_header.kind() == rmboost::ErrorKind::Config);
}

#[test]
fn endpoint_gets_v1_when_the_base_has_no_path() {
    let b = OpenAiBackend::builder()
        .base_url("http://127.0.0.1:8080")
        .model("m")
        .build()
        .unwrap();
    assert_eq!(
        b.endpoint().as_str(),
        "http://127.0.0.1:8080/v1/chat/completions"
    );
}
