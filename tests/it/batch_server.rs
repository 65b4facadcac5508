//! The loopback batch-API test server (`tests/support/batch_server.rs`) itself: every endpoint
//! of both APIs, state progression, shuffled results, each injected fault, listing pagination,
//! validation errors and held creates.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rmboost::testing::FakeBackend;
use serde_json::{json, Value};
use support::server::{anthropic_seed, Api, Config, Server, INJECTED_BATCH};

const BOUNDARY: &str = "test-boundary-7f3a";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// Status and JSON body (`Null` when not JSON).
async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let res = req.send().await.expect("the test server answers");
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

// ---------------------------------------------------------------------------------------------
// OpenAI helpers

/// A batch input line for custom_id `id` with this seed; `second` asks for `<response>` tags.
fn oa_line(id: &str, seed: u64, second: bool) -> Value {
    let content = if second {
        format!("rewrite {id} inside <response></response>")
    } else {
        format!("question {id}")
    };
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "m", "seed": seed, "messages": [{"role": "user", "content": content}]}})
}

fn oa_lines(ids: &[String]) -> String {
    ids.iter()
        .enumerate()
        .map(|(i, id)| format!("{}\n", oa_line(id, 1000 + i as u64, false)))
        .collect()
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:03}")).collect()
}

fn multipart_body(purpose: &str, file: &str) -> String {
    format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{file}\r\n--{BOUNDARY}--\r\n"
    )
}

struct Oa {
    base: String,
    http: reqwest::Client,
}

impl Oa {
    fn new(server: &Server) -> Oa {
        Oa {
            base: server.base_url(),
            http: client(),
        }
    }

    async fn upload_raw(&self, purpose: &str, file: &str) -> (u16, Value) {
        send(
            self.http
                .post(format!("{}/files", self.base))
                .bearer_auth("sk-test")
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={BOUNDARY}"),
                )
                .body(multipart_body(purpose, file)),
        )
        .await
    }

    async fn upload(&self, file: &str) -> String {
        let (status, body) = self.upload_raw("batch", file).await;
        assert_eq!(status, 200, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    async fn create_raw(&self, body: Value) -> (u16, Value) {
        send(
            self.http
                .post(format!("{}/batches", self.base))
                .bearer_auth("sk-test")
                .json(&body),
        )
        .await
    }

    async fn create(&self, file_id: &str) -> Value {
        let (status, body) = self
            .create_raw(
                json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                               "completion_window": "24h", "metadata": {"run": "r1"}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Uploads the lines of `ids` and creates a batch of them; its id.
    async fn submit(&self, ids: &[String]) -> String {
        let file = self.upload(&oa_lines(ids)).await;
        self.create(&file).await["id"].as_str().unwrap().to_string()
    }

    async fn poll(&self, id: &str) -> (u16, Value) {
        send(
            self.http
                .get(format!("{}/batches/{id}", self.base))
                .bearer_auth("sk-test"),
        )
        .await
    }

    /// Polls until the batch is in a final state; the final batch object.
    async fn finish(&self, id: &str) -> Value {
        for _ in 0..20 {
            let (status, body) = self.poll(id).await;
            if status == 200
                && matches!(
                    body["status"].as_str(),
                    Some("completed" | "failed" | "expired" | "cancelled")
                )
            {
                return body;
            }
        }
        panic!("batch {id} did not finish in 20 polls");
    }

    async fn cancel(&self, id: &str) -> (u16, Value) {
        send(
            self.http
                .post(format!("{}/batches/{id}/cancel", self.base))
                .bearer_auth("sk-test"),
        )
        .await
    }

    async fn content(&self, file_id: &str) -> String {
        let res = self
            .http
            .get(format!("{}/files/{file_id}/content", self.base))
            .bearer_auth("sk-test")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 200);
        res.text().await.unwrap()
    }

    /// The lines of a file, or none when `file_id` is null.
    async fn lines(&self, file_id: &Value) -> Vec<Value> {
        match file_id.as_str() {
            None => Vec::new(),
            Some(f) => self
                .content(f)
                .await
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        }
    }

    async fn list(&self, query: &str) -> (u16, Value) {
        send(
            self.http
                .get(format!("{}/batches?{query}", self.base))
                .bearer_auth("sk-test"),
        )
        .await
    }
}

fn custom_ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// OpenAI

#[tokio::test]
async fn openai_batch_moves_through_its_states_and_answers_as_the_fake() {
    let server = Server::with(Config::batch(Api::OpenAi));
    let oa = Oa::new(&server);
    let mut file = String::new();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        file.push_str(&format!("{}\n", oa_line(id, 7 + i as u64, i == 2)));
    }
    let file_id = oa.upload(&file).await;
    // The input file reads back as uploaded, with its metadata.
    assert_eq!(oa.content(&file_id).await, file);
    let (status, meta) = send(
        oa.http
            .get(format!("{}/files/{file_id}", oa.base))
            .bearer_auth("k"),
    )
    .await;
    assert_eq!((status, meta["purpose"].as_str()), (200, Some("batch")));
    assert_eq!(meta["bytes"], json!(file.len()));

    let created = oa.create(&file_id).await;
    assert_eq!(created["object"], "batch");
    assert_eq!(created["status"], "validating");
    assert_eq!(created["input_file_id"], json!(file_id));
    assert_eq!(created["endpoint"], "/v1/chat/completions");
    assert_eq!(created["metadata"], json!({"run": "r1"}));
    assert!(created["created_at"].as_u64().unwrap() > 1_600_000_000);
    let id = created["id"].as_str().unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        let (status, body) = oa.poll(id).await;
        assert_eq!(status, 200);
        seen.push(body["status"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, ["in_progress", "finalizing", "completed"]);
    let (_, done) = oa.poll(id).await;
    assert_eq!(done["status"], "completed", "a final state stays");
    assert_eq!(
        done["request_counts"],
        json!({"total": 3, "completed": 3, "failed": 0})
    );
    assert!(done["completed_at"].is_u64());
    assert!(done["error_file_id"].is_null());
    let output = oa.lines(&done["output_file_id"]).await;
    assert_eq!(output.len(), 3);
    let fake = FakeBackend::new();
    for line in &output {
        let cid = line["custom_id"].as_str().unwrap();
        let (seed, second) = match cid {
            "a" => (7, false),
            "b" => (8, false),
            _ => (9, true),
        };
        assert_eq!(line["response"]["status_code"], 200);
        assert!(line["error"].is_null());
        assert!(line["response"]["request_id"].is_string());
        let body = &line["response"]["body"];
        assert_eq!(
            body["choices"][0]["message"]["content"],
            json!(fake.answer(seed, second))
        );
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    }

    assert_eq!(server.batches_created(), 1);
    assert_eq!(server.requests_submitted(), 3);
    assert_eq!(server.resubmitted_custom_ids(), 0);
    assert_eq!(server.polls(), 4);
    let info = &server.batches()[0];
    assert_eq!(
        (info.id.as_str(), info.status.as_str(), info.requests),
        (id, "completed", 3)
    );
    assert_eq!(info.metadata.get("run").map(String::as_str), Some("r1"));
    assert_eq!(info.custom_ids, ["a", "b", "c"]);
    assert_eq!(server.lines(id)[1].1["seed"], 8);
    let recorded = server.recorded();
    assert!(recorded.iter().all(|r| r
        .header("authorization")
        .is_some_and(|a| a.starts_with("Bearer "))));

    // Without a bearer key nothing is served.
    let (status, body) = send(oa.http.get(format!("{}/batches", oa.base))).await;
    assert_eq!(status, 401);
    assert!(body["error"]["message"].is_string());
}

#[tokio::test]
async fn openai_results_come_back_in_a_seeded_shuffled_order() {
    let order = |seed: u64| async move {
        let server = Server::with(Config {
            seed,
            ..Config::batch(Api::OpenAi)
        });
        let oa = Oa::new(&server);
        let id = oa.submit(&ids("p", 40)).await;
        let done = oa.finish(&id).await;
        custom_ids(&oa.lines(&done["output_file_id"]).await)
    };
    let first = order(3).await;
    let sorted: Vec<String> = ids("p", 40);
    assert_ne!(first, sorted, "lines come back out of order");
    let mut again = first.clone();
    again.sort();
    assert_eq!(again, sorted, "every line once");
    assert_eq!(order(3).await, first, "the same seed, the same order");
    assert_ne!(order(4).await, first, "another seed, another order");
}

#[tokio::test]
async fn openai_uploads_and_creates_are_validated() {
    let server = Server::with(Config {
        max_lines: Some(3),
        max_bytes: Some(2000),
        ..Config::batch(Api::OpenAi)
    });
    let oa = Oa::new(&server);
    let good = oa_line("x", 1, false).to_string();
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{good}\n{}\n", oa_line("x", 2, false)),
            "line 2: duplicate custom_id",
        ),
        ("{not json\n".to_string(), "line 1: not JSON"),
        (
            json!({"custom_id": "y", "method": "GET", "url": "/v1/chat/completions", "body": {}})
                .to_string(),
            "line 1: method",
        ),
        (
            json!({"custom_id": "y", "method": "POST", "url": "/v1/embeddings", "body": {}})
                .to_string(),
            "line 1: url",
        ),
        (
            json!({"custom_id": "y", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "m", "messages": []}})
            .to_string(),
            "line 1: body.messages",
        ),
        (
            json!({"method": "POST", "url": "/v1/chat/completions", "body": {}}).to_string(),
            "line 1: custom_id",
        ),
        (oa_lines(&ids("q", 4)), "more than 3 requests"),
        (" ".repeat(2001), "over the limit of 2000 bytes"),
        (String::new(), "no requests"),
    ];
    for (file, expected) in cases {
        let (status, body) = oa.upload_raw("batch", &file).await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{expected}: {body}");
        assert!(
            message.contains(expected),
            "{expected:?} not in {message:?}"
        );
    }
    let (status, _) = oa.upload_raw("fine-tune", &good).await;
    assert_eq!(status, 400, "only purpose=batch");
    let (status, _) = send(
        oa.http
            .post(format!("{}/files", oa.base))
            .bearer_auth("k")
            .header("content-type", "application/json")
            .body("{}"),
    )
    .await;
    assert_eq!(status, 400, "not multipart");
    // Exactly at the caps is fine.
    let file_id = oa.upload(&oa_lines(&ids("q", 3))).await;

    let base = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                      "completion_window": "24h"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let bad = [
        (with("endpoint", json!("/v1/embeddings")), 400),
        (with("completion_window", json!("1h")), 400),
        (with("metadata", json!({"k": 1})), 400),
        (
            with(
                "metadata",
                json!((0..17)
                    .map(|i| (format!("k{i}"), json!("v")))
                    .collect::<serde_json::Map<_, _>>()),
            ),
            400,
        ),
        (with("input_file_id", json!("file-nope")), 404),
        (json!({"endpoint": "/v1/chat/completions"}), 400),
    ];
    for (body, expected) in bad {
        let (status, answer) = oa.create_raw(body.clone()).await;
        assert_eq!(status, expected, "{body}: {answer}");
    }
    assert_eq!(
        server.batches_created(),
        0,
        "no refused create made a batch"
    );
    let (status, _) = oa.create_raw(base).await;
    assert_eq!(status, 200);
    assert_eq!(server.batches_created(), 1);
}

#[tokio::test]
async fn openai_injected_validation_failure_then_resubmission() {
    let server = Server::with(Config {
        fail_validation: vec![1],
        ..Config::batch(Api::OpenAi)
    });
    let oa = Oa::new(&server);
    let lines = ids("v", 4);
    let id = oa.submit(&lines).await;
    let done = oa.finish(&id).await;
    assert_eq!(done["status"], "failed");
    assert!(done["failed_at"].is_u64());
    assert!(done["output_file_id"].is_null() && done["error_file_id"].is_null());
    let errors = &done["errors"]["data"];
    assert_eq!(errors[0]["code"], "invalid_request");
    assert!(errors[0]["message"]
        .as_str()
        .unwrap()
        .contains(INJECTED_BATCH));
    // The same lines again: not a double submission, and they succeed.
    let id2 = oa.submit(&lines).await;
    let done2 = oa.finish(&id2).await;
    assert_eq!(done2["status"], "completed");
    assert_eq!(oa.lines(&done2["output_file_id"]).await.len(), 4);
    assert_eq!(server.batches_created(), 2);
    assert_eq!(server.requests_submitted(), 8);
    assert_eq!(server.resubmitted_custom_ids(), 0);
    // Submitting succeeded lines again is counted.
    oa.submit(&lines[..2]).await;
    assert_eq!(server.resubmitted_custom_ids(), 2);
}

#[tokio::test]
async fn openai_errored_and_expired_lines_fail_only_on_first_submission() {
    let server = Server::with(Config {
        seed: 11,
        errored_one_in: Some(4),
        expired_one_in: Some(5),
        ..Config::batch(Api::OpenAi)
    });
    let oa = Oa::new(&server);
    let all = ids("e", 60);
    let id = oa.submit(&all).await;
    let done = oa.finish(&id).await;
    assert_eq!(
        done["status"], "expired",
        "a batch with expired lines expires"
    );
    assert!(done["expired_at"].is_u64());
    let output = oa.lines(&done["output_file_id"]).await;
    let errors = oa.lines(&done["error_file_id"]).await;
    assert_eq!(output.len() + errors.len(), 60, "every line in one file");
    let expired: Vec<&Value> = errors
        .iter()
        .filter(|l| l["error"]["code"] == "batch_expired")
        .collect();
    let with_status: Vec<&Value> = errors
        .iter()
        .filter(|l| l["response"]["status_code"] == 500)
        .collect();
    let without: Vec<&Value> = errors
        .iter()
        .filter(|l| l["response"].is_null() && l["error"]["code"] == "server_error")
        .collect();
    assert!(!expired.is_empty() && !with_status.is_empty() && !without.is_empty());
    assert_eq!(
        expired.len() + with_status.len() + without.len(),
        errors.len()
    );
    assert!(with_status.iter().all(|l| l["error"].is_null()
        && l["response"]["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains(INJECTED_BATCH)));
    assert_eq!(
        done["request_counts"],
        json!({"total": 60, "completed": output.len(), "failed": errors.len()})
    );
    // The failed ones again all succeed; nothing counts as a double submission.
    let failed = custom_ids(&errors);
    let id2 = oa.submit(&failed).await;
    let done2 = oa.finish(&id2).await;
    assert_eq!(done2["status"], "completed");
    assert!(done2["error_file_id"].is_null());
    let mut again = custom_ids(&oa.lines(&done2["output_file_id"]).await);
    again.sort();
    let mut failed_sorted = failed.clone();
    failed_sorted.sort();
    assert_eq!(again, failed_sorted);
    assert_eq!(server.resubmitted_custom_ids(), 0);
}

#[tokio::test]
async fn openai_batch_whose_every_line_fails_has_no_output_file() {
    let server = Server::with(Config {
        all_fail: vec![2],
        ..Config::batch(Api::OpenAi)
    });
    let oa = Oa::new(&server);
    let first = oa.submit(&ids("a", 3)).await;
    assert!(!oa.finish(&first).await["output_file_id"].is_null());
    let lines = ids("b", 5);
    let id = oa.submit(&lines).await;
    let done = oa.finish(&id).await;
    assert_eq!(done["status"], "completed");
    assert!(done["output_file_id"].is_null());
    assert_eq!(
        done["request_counts"],
        json!({"total": 5, "completed": 0, "failed": 5})
    );
    let errors = oa.lines(&done["error_file_id"]).await;
    let mut failed = custom_ids(&errors);
    failed.sort();
    assert_eq!(failed, lines);
    // Resubmitted, they succeed.
    let id3 = oa.submit(&lines).await;
    assert_eq!(
        oa.lines(&oa.finish(&id3).await["output_file_id"])
            .await
            .len(),
        5
    );
    assert_eq!(server.resubmitted_custom_ids(), 0);
}

#[tokio::test]
async fn openai_polls_answered_5xx_then_fine_on_retry() {
    let server = Server::with(Config {
        seed: 5,
        poll_5xx_one_in: Some(2),
        ..Config::batch(Api::OpenAi)
    });
    let oa = Oa::new(&server);
    let id = oa.submit(&ids("p", 3)).await;
    let mut statuses = Vec::new();
    let mut last_state = String::new();
    while last_state != "completed" {
        let (status, body) = oa.poll(&id).await;
        if status == 200 {
            last_state = body["status"].as_str().unwrap().to_string();
        } else {
            assert!(body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(INJECTED_BATCH));
        }
        statuses.push(status);
        assert!(statuses.len() < 50);
    }
    let failed = statuses.iter().filter(|s| **s != 200).count() as u64;
    assert!(failed > 0, "{statuses:?}");
    assert!(statuses.iter().all(|s| [200, 500, 503].contains(s)));
    assert!(
        statuses.windows(2).all(|w| w[0] == 200 || w[1] == 200),
        "a 5xx poll is followed by a good one: {statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "a 5xx poll does not advance the batch"
    );
    assert_eq!(server.polls(), statuses.len() as u64);
    assert_eq!(server.polls_failed(), failed);
}

#[tokio::test]
async fn openai_cancel_keeps_the_processed_half() {
    let server = Server::with(Config::batch(Api::OpenAi));
    let oa = Oa::new(&server);
    // Cancelled while validating: nothing processed.
    let early = oa.submit(&ids("a", 4)).await;
    let (status, body) = oa.cancel(&early).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("cancelling")));
    assert!(body["cancelling_at"].is_u64());
    let done = oa.finish(&early).await;
    assert_eq!(done["status"], "cancelled");
    assert!(done["output_file_id"].is_null() && done["error_file_id"].is_null());
    // Cancelled in progress: the first half of the lines processed.
    let lines = ids("b", 10);
    let id = oa.submit(&lines).await;
    assert_eq!(oa.poll(&id).await.1["status"], "in_progress");
    assert_eq!(oa.cancel(&id).await.1["status"], "cancelling");
    assert_eq!(oa.cancel(&id).await.0, 200, "cancel is idempotent");
    let done = oa.finish(&id).await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(
        done["request_counts"],
        json!({"total": 10, "completed": 5, "failed": 0})
    );
    let mut processed = custom_ids(&oa.lines(&done["output_file_id"]).await);
    processed.sort();
    assert_eq!(processed, lines[..5]);
    // A finished batch cannot be cancelled; an unknown one is not found.
    assert_eq!(oa.cancel(&id).await.0, 200, "cancelled stays cancelled");
    let other = oa.submit(&ids("c", 1)).await;
    oa.finish(&other).await;
    assert_eq!(oa.cancel(&other).await.0, 400);
    assert_eq!(oa.cancel("batch_nope").await.0, 404);
    assert_eq!(oa.poll("batch_nope").await.0, 404);
    assert_eq!(server.cancels(), 2);
    // Canceled lines may be submitted again.
    oa.submit(&lines[5..]).await;
    assert_eq!(server.resubmitted_custom_ids(), 0);
}

#[tokio::test]
async fn openai_listing_pages_newest_first() {
    let server = Server::with(Config::batch(Api::OpenAi));
    let oa = Oa::new(&server);
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(oa.submit(&ids(&format!("l{i}_"), 1)).await);
    }
    let newest: Vec<String> = created.iter().rev().cloned().collect();
    let page_ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, page1) = oa.list("limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(page1["object"], "list");
    assert_eq!(page_ids(&page1), newest[..2]);
    assert_eq!(
        (&page1["first_id"], &page1["last_id"], &page1["has_more"]),
        (&json!(newest[0]), &json!(newest[1]), &json!(true))
    );
    let (_, page2) = oa.list(&format!("limit=2&after={}", newest[1])).await;
    assert_eq!(page_ids(&page2), newest[2..4]);
    assert_eq!(page2["has_more"], true);
    let (_, page3) = oa.list(&format!("limit=2&after={}", newest[3])).await;
    assert_eq!(page_ids(&page3), newest[4..]);
    assert_eq!(page3["has_more"], false);
    let (_, all) = oa.list("").await;
    assert_eq!(page_ids(&all), newest);
    assert_eq!(all["data"][0]["metadata"], json!({"run": "r1"}));
    assert_eq!(oa.list("limit=0").await.0, 400);
    assert_eq!(oa.list("limit=101").await.0, 400);
    assert_eq!(server.polls(), 0, "listing is not polling");
    assert!(server.batches().iter().all(|b| b.status == "validating"));
}

#[tokio::test]
async fn openai_step_advances_with_wall_time() {
    let server = Server::with(Config {
        step: Duration::from_millis(100),
        ..Config::batch(Api::OpenAi)
    });
    let oa = Oa::new(&server);
    let id = oa.submit(&ids("t", 2)).await;
    assert_eq!(
        oa.poll(&id).await.1["status"],
        "validating",
        "a poll alone does not advance"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (_, body) = oa.poll(&id).await;
    assert_eq!(body["status"], "completed");
    assert_eq!(oa.lines(&body["output_file_id"]).await.len(), 2);
}

#[tokio::test]
async fn openai_held_create_is_recorded_before_it_is_answered() {
    let server = Server::with(Config {
        hold_creates: true,
        ..Config::batch(Api::OpenAi)
    });
    let oa = Oa::new(&server);
    let file = oa.upload(&oa_lines(&ids("h", 2))).await;
    let body = json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
                      "completion_window": "24h", "metadata": {"run": "held"}});
    let base = oa.base.clone();
    let create = tokio::spawn(async move {
        send(
            client()
                .post(format!("{base}/batches"))
                .bearer_auth("k")
                .json(&body),
        )
        .await
    });
    let t0 = std::time::Instant::now();
    while server.batches_created() < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the create never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!create.is_finished(), "the answer is held");
    let (_, listed) = oa.list("").await;
    assert_eq!(
        listed["data"][0]["metadata"]["run"], "held",
        "listed while held"
    );
    server.release_creates();
    let (status, created) = create.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(created["id"], listed["data"][0]["id"]);
    // Once released, creates are answered at once.
    let second = tokio::time::timeout(Duration::from_secs(5), oa.submit(&ids("i", 1))).await;
    assert!(second.is_ok());
    assert!(server.wait_for_batches(2, Duration::from_secs(1)));
    assert!(!server.wait_for_batches(3, Duration::from_millis(50)));
}

// ---------------------------------------------------------------------------------------------
// Anthropic

fn an_request(id: &str, n: usize, second: bool) -> Value {
    let content = if second {
        format!("rewrite {id} inside <response></response>")
    } else {
        format!("question {id} {n}")
    };
    json!({"custom_id": id, "params": {"model": "claude-test", "max_tokens": 64,
           "messages": [{"role": "user", "content": content}]}})
}

fn an_requests(ids: &[String]) -> Value {
    json!({"requests": ids.iter().enumerate().map(|(i, id)| an_request(id, i, false)).collect::<Vec<_>>()})
}

struct An {
    base: String,
    http: reqwest::Client,
}

impl An {
    fn new(server: &Server) -> An {
        An {
            base: server.base_url(),
            http: client(),
        }
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .header("x-api-key", "sk-ant-test")
            .header("anthropic-version", "2023-06-01")
    }

    async fn create_raw(&self, body: &Value) -> (u16, Value) {
        send(
            self.req(
                reqwest::Method::POST,
                &format!("{}/messages/batches", self.base),
            )
            .json(body),
        )
        .await
    }

    async fn submit(&self, ids: &[String]) -> String {
        let (status, body) = self.create_raw(&an_requests(ids)).await;
        assert_eq!(status, 200, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    async fn poll(&self, id: &str) -> (u16, Value) {
        send(self.req(
            reqwest::Method::GET,
            &format!("{}/messages/batches/{id}", self.base),
        ))
        .await
    }

    async fn finish(&self, id: &str) -> Value {
        for _ in 0..20 {
            let (status, body) = self.poll(id).await;
            if status == 200 && body["processing_status"] == "ended" {
                return body;
            }
        }
        panic!("batch {id} did not end in 20 polls");
    }

    async fn cancel(&self, id: &str) -> (u16, Value) {
        send(self.req(
            reqwest::Method::POST,
            &format!("{}/messages/batches/{id}/cancel", self.base),
        ))
        .await
    }

    /// The results of an ended batch, read from its `results_url`.
    async fn results(&self, batch: &Value) -> Vec<Value> {
        let url = batch["results_url"].as_str().expect("results_url");
        let res = self.req(reqwest::Method::GET, url).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 200);
        res.text()
            .await
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn list(&self, query: &str) -> (u16, Value) {
        send(self.req(
            reqwest::Method::GET,
            &format!("{}/messages/batches?{query}", self.base),
        ))
        .await
    }
}

fn result_types(results: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in results {
        *out.entry(r["result"]["type"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    out
}

#[tokio::test]
async fn anthropic_batch_ends_with_results_as_the_fake() {
    let server = Server::with(Config::batch(Api::Anthropic));
    let an = An::new(&server);
    let body = json!({"requests": [an_request("a", 0, false), an_request("b", 1, false),
                                   an_request("c", 2, true)]});
    let (status, created) = an.create_raw(&body).await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["type"], "message_batch");
    assert_eq!(created["processing_status"], "in_progress");
    assert_eq!(created["request_counts"]["processing"], 3);
    assert!(created["results_url"].is_null());
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));
    let id = created["id"].as_str().unwrap();
    // No results before it ends.
    let early = an
        .req(
            reqwest::Method::GET,
            &format!("{}/messages/batches/{id}/results", an.base),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(early.status().as_u16(), 400);

    let (_, ended) = an.poll(id).await;
    assert_eq!(ended["processing_status"], "ended");
    assert!(ended["ended_at"].is_string());
    assert_eq!(
        ended["request_counts"],
        json!({"processing": 0, "succeeded": 3, "errored": 0, "canceled": 0, "expired": 0})
    );
    let url = ended["results_url"].as_str().unwrap();
    assert_eq!(
        url,
        format!("http://{}/v1/messages/batches/{id}/results", server.addr())
    );
    let results = an.results(&ended).await;
    assert_eq!(results.len(), 3);
    let fake = FakeBackend::new();
    for r in &results {
        let cid = r["custom_id"].as_str().unwrap();
        let request = &body["requests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["custom_id"] == cid)
            .unwrap()["params"];
        assert_eq!(r["result"]["type"], "succeeded");
        let message = &r["result"]["message"];
        assert_eq!(message["type"], "message");
        assert_eq!(message["stop_reason"], "end_turn");
        assert_eq!(
            message["content"][0]["text"],
            json!(fake.answer(anthropic_seed(request), cid == "c"))
        );
        assert!(message["usage"]["output_tokens"].as_u64().unwrap() > 0);
    }
    assert_ne!(
        anthropic_seed(&body["requests"][0]["params"]),
        anthropic_seed(&body["requests"][1]["params"])
    );
    assert_eq!(server.batches()[0].status, "ended");
    assert_eq!(server.requests_submitted(), 3);
    let recorded = server.recorded();
    assert!(recorded
        .iter()
        .all(|r| r.header("x-api-key") == Some("sk-ant-test")
            && r.header("anthropic-version") == Some("2023-06-01")));

    // Both headers are required.
    let url = format!("{}/messages/batches", an.base);
    let (status, body) = send(an.http.get(&url).header("anthropic-version", "2023-06-01")).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (401, Some("authentication_error"))
    );
    let (status, _) = send(an.http.get(&url).header("x-api-key", "k")).await;
    assert_eq!(status, 400);
    // The other API's routes are not served.
    assert_eq!(
        send(an.req(reqwest::Method::GET, &format!("{}/batches", an.base)))
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn anthropic_creates_are_validated() {
    let server = Server::with(Config {
        max_lines: Some(3),
        max_bytes: Some(3000),
        fail_validation: vec![1],
        ..Config::batch(Api::Anthropic)
    });
    let an = An::new(&server);
    let long = "x".repeat(65);
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"requests": [an_request("has space", 0, false)]}),
            "custom_id",
        ),
        (
            json!({"requests": [an_request(&long, 0, false)]}),
            "custom_id",
        ),
        (json!({"requests": [an_request("", 0, false)]}), "custom_id"),
        (
            json!({"requests": [an_request("d", 0, false), an_request("d", 1, false)]}),
            "requests.1.custom_id: duplicate",
        ),
        (an_requests(&ids("c", 4)), "more than 3 requests"),
        (json!({"requests": []}), "non-empty"),
        (
            json!({"requests": [an_request("a", 0, false)], "metadata": {}}),
            "metadata: Extra inputs",
        ),
        (
            json!({"requests": [{"custom_id": "a", "params": {"model": "m", "messages": []}}]}),
            "max_tokens",
        ),
        (
            json!({"requests": [{"custom_id": "a", "params": {"model": "m", "max_tokens": 5, "messages": []}}]}),
            "messages",
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = an.create_raw(&body).await;
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{expected}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        assert!(
            message.contains(expected),
            "{expected:?} not in {message:?}"
        );
    }
    let big = json!({"requests": [{"custom_id": "big", "params": {"model": "m", "max_tokens": 5,
        "messages": [{"role": "user", "content": "y".repeat(3000)}]}}]});
    assert_eq!(an.create_raw(&big).await.0, 413);
    // The first valid create is the injected validation failure: nothing is created.
    let (status, answer) = an.create_raw(&an_requests(&ids("c", 3))).await;
    assert_eq!(status, 400);
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains(INJECTED_BATCH));
    assert_eq!(server.batches_created(), 0);
    // The same requests again are accepted.
    an.submit(&ids("c", 3)).await;
    assert_eq!(server.batches_created(), 1);
    assert_eq!(server.resubmitted_custom_ids(), 0);
}

#[tokio::test]
async fn anthropic_faults_cancel_and_shuffled_results() {
    let server = Server::with(Config {
        seed: 9,
        errored_one_in: Some(4),
        expired_one_in: Some(5),
        poll_5xx_one_in: Some(3),
        all_fail: vec![3],
        ..Config::batch(Api::Anthropic)
    });
    let an = An::new(&server);
    // 1: errored and expired lines, out of order.
    let all = ids("f", 60);
    let first = an.submit(&all).await;
    let ended = an.finish(&first).await;
    let results = an.results(&ended).await;
    let types = result_types(&results);
    assert_eq!(results.len(), 60);
    assert!(types["errored"] > 0 && types["expired"] > 0 && types["succeeded"] > 0);
    assert_eq!(
        ended["request_counts"],
        json!({"processing": 0, "succeeded": types["succeeded"], "errored": types["errored"],
               "canceled": 0, "expired": types["expired"]})
    );
    assert_ne!(custom_ids(&results), all, "results are shuffled");
    let errored = results
        .iter()
        .find(|r| r["result"]["type"] == "errored")
        .unwrap();
    assert_eq!(errored["result"]["error"]["type"], "error");
    assert!(errored["result"]["error"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains(INJECTED_BATCH));
    // 2: the failed ones again all succeed.
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r["result"]["type"] != "succeeded")
        .map(|r| r["custom_id"].as_str().unwrap().to_string())
        .collect();
    let second = an.submit(&failed).await;
    let types2 = result_types(&an.results(&an.finish(&second).await).await);
    assert_eq!(types2.get("succeeded"), Some(&failed.len()));
    assert_eq!(types2.len(), 1);
    // 3: every line errors.
    let third = an.submit(&ids("g", 4)).await;
    let types3 = result_types(&an.results(&an.finish(&third).await).await);
    assert_eq!(types3.get("errored"), Some(&4));
    assert_eq!(types3.len(), 1);
    // Some polls were answered 5xx, with Anthropic's error body, never twice in a row.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let (status, body) = an.poll(&first).await;
        if status != 200 {
            assert_eq!(body["type"], "error");
            assert!(["api_error", "overloaded_error"]
                .contains(&body["error"]["type"].as_str().unwrap()));
        }
        statuses.push(status);
    }
    assert!(statuses.iter().any(|s| *s != 200), "{statuses:?}");
    assert!(statuses.windows(2).all(|w| w[0] == 200 || w[1] == 200));
    assert!(server.polls_failed() > 0);
    assert!(server.polls() > server.polls_failed());
    assert_eq!(server.resubmitted_custom_ids(), 0);
}

#[tokio::test]
async fn anthropic_cancel_keeps_the_processed_half() {
    let server = Server::with(Config::batch(Api::Anthropic));
    let an = An::new(&server);
    // Canceled: the first half processed, the rest canceled.
    let lines = ids("h", 6);
    let id = an.submit(&lines).await;
    let (status, canceling) = an.cancel(&id).await;
    assert_eq!(status, 200);
    assert_eq!(canceling["processing_status"], "canceling");
    assert!(canceling["cancel_initiated_at"].is_string());
    let ended = an.finish(&id).await;
    let results = an.results(&ended).await;
    assert_eq!(ended["request_counts"]["canceled"], 3);
    let canceled: BTreeSet<&str> = results
        .iter()
        .filter(|r| r["result"]["type"] == "canceled")
        .map(|r| r["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        canceled,
        lines[3..]
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(
        an.cancel(&id).await.0,
        400,
        "an ended batch cannot be canceled"
    );
    assert_eq!(server.cancels(), 1);
    assert_eq!(an.cancel("msgbatch_nope").await.0, 404);
    assert_eq!(server.resubmitted_custom_ids(), 0);
    an.submit(&lines[3..]).await;
    assert_eq!(
        server.resubmitted_custom_ids(),
        0,
        "canceled lines may be submitted again"
    );
    an.submit(&lines[..3]).await;
    assert_eq!(
        server.resubmitted_custom_ids(),
        3,
        "succeeded lines again are counted"
    );
}

#[tokio::test]
async fn anthropic_listing_pages_with_after_and_before() {
    let server = Server::with(Config::batch(Api::Anthropic));
    let an = An::new(&server);
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(an.submit(&ids(&format!("l{i}_"), 1)).await);
    }
    let newest: Vec<String> = created.iter().rev().cloned().collect();
    let page_ids = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, page1) = an.list("limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(page_ids(&page1), newest[..2]);
    assert_eq!(page1["has_more"], true);
    assert_eq!(page1["first_id"], json!(newest[0]));
    assert_eq!(page1["last_id"], json!(newest[1]));
    let (_, page2) = an.list(&format!("limit=2&after_id={}", newest[1])).await;
    assert_eq!(page_ids(&page2), newest[2..4]);
    let (_, page3) = an.list(&format!("limit=2&after_id={}", newest[3])).await;
    assert_eq!(page_ids(&page3), newest[4..]);
    assert_eq!(page3["has_more"], false);
    let (_, back) = an.list(&format!("limit=2&before_id={}", newest[4])).await;
    assert_eq!(page_ids(&back), newest[2..4]);
    assert_eq!(back["has_more"], true);
    let (_, top) = an.list(&format!("limit=2&before_id={}", newest[2])).await;
    assert_eq!(page_ids(&top), newest[..2]);
    assert_eq!(top["has_more"], false);
    assert_eq!(an.list("limit=1001").await.0, 400);
    let (_, all) = an.list("").await;
    assert_eq!(page_ids(&all), newest);
    assert_eq!(all["data"][0]["type"], "message_batch");
}
