//! `OpenAiBackend` against the loopback server's canned answers: the wire format, the error
//! matrix, `Retry-After`, and the retry wrapper over real HTTP.

use crate::support;

use rmboost::GeneratorExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rmboost::backend::openai::OpenAiBackend;
use rmboost::backend::retry::Retry;
use rmboost::{
    BackendErrorKind, CompletionRequest, FinishReason, LlmBackend, Message, SamplingParams, Usage,
};
use serde_json::json;
use support::server::{Reply, Server};
use support::{dead_port, openai_body, openai_error, quick_retry};

const PATH: &str = "/v1/chat/completions";

fn backend(server: &Server) -> OpenAiBackend {
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

#[tokio::test]
async fn sends_the_request_fields_and_maps_the_response() {
    let server = Server::replying(vec![Reply::json(200, &openai_body("hello", "stop"))]);
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
    let [sent] = &server.recorded()[..] else {
        panic!("not one request")
    };
    assert_eq!((sent.method.as_str(), sent.path.as_str()), ("POST", PATH));
    assert_eq!(sent.header("authorization"), Some("Bearer sk-test-key"));
    assert_eq!(sent.header("x-gateway"), Some("blue"));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    let want = json!({
        "model": "test-model",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "temperature": 0.0, "top_p": 0.5, "max_tokens": 7, "seed": 42, "stop": ["END"],
        "top_k": 40
    });
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&sent.body[k], v, "{k}");
    }
}

#[tokio::test]
async fn unset_fields_are_not_sent() {
    let server = Server::replying(vec![Reply::json(200, &openai_body("x", "stop"))]);
    backend(&server).complete(request()).await.unwrap();
    let received = server.recorded();
    assert_eq!(received[0].path, PATH);
    let keys: Vec<&String> = received[0].body.as_object().unwrap().keys().collect();
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
        let mut body = openai_body(text, "stop");
        body["choices"][0]["finish_reason"] = reason.clone();
        let server = Server::replying(vec![Reply::json(200, &body)]);
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
    let body = json!({"choices": [{"message": {"role": "assistant", "content": null,
        "refusal": "I can't help with that."}, "finish_reason": "stop"}]});
    let server = Server::replying(vec![Reply::json(200, &body)]);
    let e = backend(&server).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::ContentFilter);
    assert!(e.message().contains("can't help"), "{e}");
}

#[tokio::test]
async fn missing_usage_and_model_default() {
    let body = json!({"choices": [{"message": {"content": "hi"}}]});
    let server = Server::replying(vec![Reply::json(200, &body)]);
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
        let reply = if c.body.is_null() {
            Reply::text(c.status, "")
        } else {
            Reply::json(c.status, &c.body)
        };
        let server = support::server::Server::replying(vec![reply]);
        let retry = quick_retry(backend(&server), 3);
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
        let calls = server.recorded().len();
        assert!(server.recorded().iter().all(|r| r.path == PATH));
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
        let server = Server::replying(vec![Reply::text(200, body)]);
        let retry = quick_retry(backend(&server), 3);
        let e = retry.complete(request()).await.unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::InvalidResponse, "{body:?}");
        assert_eq!(server.recorded().len(), 3, "{body:?}");
    }
}

#[tokio::test]
async fn an_error_object_in_a_200_body_is_classified() {
    let server = Server::replying(vec![Reply::json(
        200,
        &openai_error("server_error", None, "upstream failed"),
    )]);
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
        let mut reply = Reply::json(
            429,
            &openai_error("requests", Some("rate_limit_exceeded"), "slow down"),
        );
        for (k, v) in &headers {
            reply = reply.header(k, v);
        }
        let server = Server::replying(vec![reply]);
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
    let server = Server::replying(vec![Reply::text(503, "").header("retry-after", "4")]);
    let e = backend(&server).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Server);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(4)));
}

/// Real sockets and real time (1 s): the wrapper waits at least what the server asked.
#[tokio::test]
async fn retry_honours_retry_after_over_http() {
    let server = Server::replying(vec![
        Reply::json(
            429,
            &openai_error("requests", Some("rate_limit_exceeded"), "slow down"),
        )
        .header("retry-after", "1"),
        Reply::json(200, &openai_body("after the wait", "stop")),
    ]);
    let retry = quick_retry(backend(&server), 3);
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
    let server = Server::replying(vec![
        Reply::json(200, &openai_body("late", "stop")).delay(Duration::from_secs(3))
    ]);
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
    let retry = quick_retry(backend, 3);
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
        .api_key("k")
        .header("bad header", "x")
        .build()
        .unwrap_err();
    assert!(bad_header.kind() == rmboost::ErrorKind::Config);
    assert!(bad_header.to_string().contains("header"), "{bad_header}");
    let zero_cap = OpenAiBackend::builder()
        .model("m")
        .api_key("k")
        .max_response_bytes(0)
        .build()
        .unwrap_err();
    assert!(
        zero_cap.to_string().contains("max_response_bytes"),
        "{zero_cap}"
    );
    // OpenAI's own URL without a key given: OPENAI_API_KEY is required (unless set here).
    if std::env::var_os("OPENAI_API_KEY").is_none() {
        let no_key = OpenAiBackend::builder().model("m").build().unwrap_err();
        assert!(no_key.to_string().contains("OPENAI_API_KEY"), "{no_key}");
    }
}

#[test]
fn endpoint_gets_v1_when_the_base_has_no_path() {
    let b = OpenAiBackend::builder()
        .base_url("http://127.0.0.1:8080")
        .model("m")
        .build()
        .unwrap();
    assert_eq!(b.endpoint(), "http://127.0.0.1:8080/v1/chat/completions");
}

// ---------------------------------------------------------------------------------------------
// Hardening: absurd waits, huge bodies, redirects, daily limits, cache identity, huge usage.

/// Waits a server asks for are parsed with checked arithmetic and clamped: never a panic, and a
/// huge value stays visible as a long wait.
#[tokio::test]
async fn absurd_retry_after_values_are_clamped_not_a_panic() {
    let cases = [
        ("retry-after-ms", "1e30"),
        ("retry-after", "1e300"),
        ("x-ratelimit-reset-requests", "1e300"),
        ("x-ratelimit-reset-requests", "1e300s"),
        ("x-ratelimit-reset-tokens", "99999999999999999999h"),
    ];
    for (name, value) in cases {
        let server = Server::replying(vec![Reply::text(429, "").header(name, value)]);
        let e = backend(&server).complete(request()).await.unwrap_err();
        let ra = e
            .retry_after()
            .unwrap_or_else(|| panic!("{name}: {value}: no retry_after: {e}"));
        assert!(ra >= Duration::from_secs(3600), "{name}: {value}: {ra:?}");
        assert!(ra <= Duration::from_secs(86_400), "{name}: {value}: {ra:?}");
    }
    // Negative and NaN values are ignored.
    for (name, value) in [("retry-after-ms", "-5"), ("retry-after", "NaN")] {
        let server = Server::replying(vec![Reply::text(429, "").header(name, value)]);
        let e = backend(&server).complete(request()).await.unwrap_err();
        assert_eq!(e.retry_after(), None, "{name}: {value}");
    }
}

/// A hand-written HTTP/1.1 server that answers every connection with `200` and a body of
/// `total` bytes of white space (chunked, or with `content_length` declared), and counts the
/// bytes it managed to write before the client hung up. The task ends when it is done.
async fn body_server(
    total: u64,
    content_length: Option<u64>,
) -> (String, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&written);
    let task = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        // Read the request head (and whatever of the body came with it).
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let head = match content_length {
            Some(n) => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n"
            ),
            None => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_string(),
        };
        if sock.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = vec![b' '; 64 * 1024];
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        let mut sent = 0u64;
        while sent < total {
            let result = if content_length.is_some() {
                sock.write_all(&chunk).await
            } else {
                sock.write_all(&frame).await
            };
            if result.is_err() {
                return;
            }
            sent += chunk.len() as u64;
            counter.store(sent, Ordering::Relaxed);
        }
        if content_length.is_none() {
            let _ = sock.write_all(b"0\r\n\r\n").await;
        }
        // Keep the connection open (a declared length not reached) until the client leaves.
        let _ = sock.read(&mut buf).await;
    });
    (format!("http://{addr}/v1"), written, task)
}

const MIB: u64 = 1 << 20;

/// A body far larger than the cap is not read whole: the call fails once the cap is passed,
/// without waiting for the rest, and the server could write only about the cap plus what the
/// sockets buffer.
#[tokio::test]
async fn a_huge_streamed_body_is_cut_off_at_the_cap() {
    let (url, written, task) = body_server(64 * MIB, None).await;
    let backend = OpenAiBackend::builder()
        .base_url(url)
        .model("m")
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let e = backend.complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Other, "{e}");
    assert!(!e.is_retryable() && !e.is_fatal(), "{e}");
    assert!(e.message().contains("8 MiB"), "{e}");
    drop(backend);
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the server saw the client leave")
        .unwrap();
    let sent = written.load(Ordering::Relaxed);
    eprintln!("the server wrote {:.1} MiB of 64", sent as f64 / MIB as f64);
    assert!(sent < 40 * MIB, "the client read on: {sent} bytes written");
}

/// A declared `Content-Length` over the cap fails the call before the body is read.
#[tokio::test]
async fn a_declared_length_over_the_cap_fails_up_front() {
    let (url, _written, task) = body_server(16 * MIB, Some(1 << 40)).await;
    let backend = OpenAiBackend::builder()
        .base_url(url)
        .model("m")
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let start = std::time::Instant::now();
    let e = backend.complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Other, "{e}");
    assert!(e.message().contains("Content-Length"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    drop(backend);
    task.abort();
}

/// A redirect is not followed (the key would go with it, and the extra headers): the call
/// fails at once with a fatal error naming where it pointed, and the second server gets
/// nothing.
#[tokio::test]
async fn redirects_are_not_followed() {
    let elsewhere = Server::replying(vec![Reply::json(200, &openai_body("stolen", "stop"))]);
    let location = format!("{}/v1/chat/completions?token=abc", elsewhere.uri());
    let server = Server::replying(vec![Reply::text(307, "").header("location", location)]);
    let backend = OpenAiBackend::builder()
        .base_url(format!("{}/v1", server.uri()))
        .model("m")
        .api_key("sk-test-key")
        .header("x-gateway-token", "gw-secret")
        .build()
        .unwrap();
    let e = quick_retry(backend, 3)
        .complete(request())
        .await
        .unwrap_err();
    assert!(elsewhere.recorded().is_empty());
    assert_eq!(server.recorded().len(), 1);
    assert!(e.is_fatal() && !e.is_retryable(), "{e}");
    assert_eq!(e.status(), Some(307));
    let host = elsewhere.uri().trim_start_matches("http://").to_string();
    let shown = format!("{e} {e:?}");
    assert!(shown.contains(&host), "{shown}");
    assert!(
        !shown.contains("sk-test-key") && !shown.contains("token=abc"),
        "{shown}"
    );
}

/// A 429 for a daily limit (RPD, TPD, "per day") or an exhausted quota stops the run: it is
/// fatal at once, not retried and not failed prompt after prompt.
#[tokio::test]
async fn a_daily_limit_429_is_fatal() {
    let bodies = [
        openai_error(
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for gpt-4o-mini in organization org-x on requests per day \
             (RPD): Limit 200, Used 200, Requested 1. Please try again in 7m12s.",
        ),
        openai_error(
            "tokens",
            Some("rate_limit_exceeded"),
            "Rate limit reached for gpt-4o-mini on tokens per day (TPD): Limit 2000000, Used \
             1999990, Requested 300.",
        ),
        openai_error(
            "insufficient_quota",
            Some("insufficient_quota"),
            "You exceeded your current quota, please check your plan and billing details.",
        ),
        json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
            "message": "Quota exceeded for metric: generate_content_free_tier_requests, limit: 50, per day"}}),
    ];
    for body in bodies {
        let server = Server::replying(vec![Reply::json(429, &body).header("retry-after", "3600")]);
        let e = backend(&server).complete(request()).await.unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::QuotaExhausted, "{body}: {e}");
        assert!(e.is_fatal(), "{e}");
    }
    // A per-minute limit stays an ordinary, retryable 429.
    let server = Server::replying(vec![Reply::json(
        429,
        &openai_error(
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3.",
        ),
    )]);
    let e = backend(&server).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::RateLimited, "{e}");
}

/// 20 prompts against a server whose daily limit is spent: the generator stops with one fatal
/// error at once, naming the limit, instead of waiting or failing prompt after prompt.
#[tokio::test]
async fn twenty_prompts_against_a_spent_daily_limit_stop_promptly() {
    use futures::StreamExt;
    let server = Server::replying(vec![Reply::json(
        429,
        &openai_error(
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached for m on requests per day (RPD): Limit 200, Used 200.",
        ),
    )
    .header("retry-after", "3600")]);
    let rmb = rmboost::RmBoost::builder()
        .backend(Retry::new(backend(&server)))
        .concurrency(std::num::NonZeroUsize::new(4).unwrap())
        .build()
        .unwrap();
    let start = std::time::Instant::now();
    let results: Vec<_> = rmb.generate_iter(support::prompts(20)).collect().await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let last = results.last().unwrap().as_ref().unwrap_err();
    assert!(last.is_fatal(), "{last}");
    let chain = format!("{last:?}");
    assert!(chain.contains("requests per day"), "{chain}");
    assert!(results.len() <= 4, "{} results", results.len());
    assert!(server.recorded().len() <= 4);
}

/// Two servers answering under the same model name do not share cached answers; the same
/// server twice does.
#[cfg(feature = "cache")]
#[tokio::test]
async fn the_cache_key_holds_the_endpoint() {
    use rmboost::backend::cache::{Cache, Cached};
    let answer = |text| Server::replying(vec![Reply::json(200, &openai_body(text, "stop"))]);
    let (a, b) = (answer("from a"), answer("from b"));
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path().join("c.redb")).unwrap();
    let req = request().with_seed(1);
    let out_a = Cached::new(backend(&a), cache.clone())
        .complete(req.clone())
        .await
        .unwrap();
    let out_b = Cached::new(backend(&b), cache.clone())
        .complete(req.clone())
        .await
        .unwrap();
    assert_eq!(out_a.text, "from a");
    assert_eq!(out_b.text, "from b");
    assert_eq!((cache.stats().hits, cache.stats().misses), (0, 2));
    let again = Cached::new(backend(&a), cache.clone())
        .complete(req)
        .await
        .unwrap();
    assert_eq!(again.text, "from a");
    assert_eq!((cache.stats().hits, cache.stats().misses), (1, 2));
    assert_eq!(b.recorded().len(), 1);
}

/// A server reporting absurd token counts cannot overflow the sums (a panic in debug builds).
#[tokio::test]
async fn absurd_usage_saturates() {
    use futures::StreamExt;
    let mut body = openai_body("<response>A fine answer to that.</response>", "stop");
    body["usage"] = json!({"prompt_tokens": u64::MAX, "completion_tokens": u64::MAX});
    let server = Server::replying(vec![Reply::json(200, &body)]);
    let rmb = rmboost::RmBoost::builder()
        .backend(backend(&server))
        .build()
        .unwrap();
    let mut summary = rmboost::Summary::default();
    let results: Vec<_> = rmb.generate_iter(support::prompts(3)).collect().await;
    for r in &results {
        summary.record(r);
    }
    assert_eq!(summary.examples, 3, "{summary}");
    assert_eq!(summary.usage.prompt_tokens, u64::MAX);
    assert_eq!(summary.usage.total(), u64::MAX);
}

/// The cap is configurable: a body just over it fails, one at it is read.
#[tokio::test]
async fn max_response_bytes_is_configurable() {
    let body = serde_json::to_vec(&openai_body(&"x".repeat(10_000), "stop")).unwrap();
    let len = body.len();
    let server = Server::replying(vec![Reply::bytes(200, "application/json", body)]);
    let with_cap = |cap: usize| {
        OpenAiBackend::builder()
            .base_url(server.uri())
            .model("m")
            .max_response_bytes(cap)
            .build()
            .unwrap()
    };
    let e = with_cap(len - 1).complete(request()).await.unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Other, "{e}");
    assert!(e.message().contains("max_response_bytes"), "{e}");
    let ok = with_cap(len).complete(request()).await.unwrap();
    assert_eq!(ok.text.len(), 10_000);
    // An error body longer than the cap is cut, not an error of its own: the status decides.
    let server = Server::replying(vec![Reply::text(503, "y".repeat(200_000))]);
    let e = OpenAiBackend::builder()
        .base_url(server.uri())
        .model("m")
        .build()
        .unwrap()
        .complete(request())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), BackendErrorKind::Server, "{e}");
}

/// A timeout too long for the timer's arithmetic is cut, not a panic.
#[tokio::test]
async fn an_endless_timeout_does_not_panic() {
    let server = Server::replying(vec![Reply::json(200, &openai_body("hi", "stop"))]);
    let backend = OpenAiBackend::builder()
        .base_url(server.uri())
        .model("m")
        .timeout(Duration::MAX)
        .connect_timeout(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(backend.complete(request()).await.unwrap().text, "hi");
}
