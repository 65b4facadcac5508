"""The rmboost package's tests' helpers: a loopback OpenAI-compatible server (which also
answers Anthropic's ``POST /v1/messages``), prompt files,
and the deterministic answers both the server and the tests' Python backends give.

The server answers ``POST /v1/chat/completions`` as the Rust tests' server does
(tests/it/support/server.rs): a first-response request gets ``answer <h> <seed> <words>``;
a second-response request (one whose messages mention ``</response>``, as the default template's
instructions do) gets ``<response>rewrite <h> <seed> <words></response>``, where ``h`` is a hash
of the last user message and the words are pseudo-words of two vocabularies that share nothing,
so the pair passes the response checks (not near-identical, not repetitive). ``usage`` counts a
token per 4 bytes. Every request is recorded (path, headers, body, answer). Faults are switched
on per test: a fixed latency, a share of 500s, a share of 429s with ``Retry-After``, one status
for every request (e.g. a 401 that echoes the key it was sent).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

_SYL = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "be", "do", "fi", "gu", "ha", "je", "wo"]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def content(message: Any) -> str:
    if isinstance(message, dict):
        return message.get("content") or ""
    return getattr(message, "content", "") or ""


def role(message: Any) -> str:
    if isinstance(message, dict):
        return message.get("role") or ""
    return getattr(message, "role", "") or ""


def last_user(messages: list) -> str:
    for m in reversed(messages):
        if role(m) == "user":
            return content(m)
    raise AssertionError(f"no user message in {messages!r}")


def is_second(messages: list) -> bool:
    return any("</response>" in content(m) for m in messages)


def words(key: str, vocab: int, n: int = 24) -> str:
    """``n`` pseudo-words of vocabulary ``vocab`` (0 or 1; the two share no word)."""
    rng = random.Random(key)
    suffix = "n" if vocab == 0 else "r"
    return " ".join(rng.choice(_SYL) + rng.choice(_SYL[8 * vocab : 8 * vocab + 8]) + suffix for _ in range(n))


def answer_for(messages: list, seed: Any) -> str:
    """The deterministic answer to a request (the server's and the Python test backends')."""
    user = last_user(messages)
    h = text_hash(user)
    if is_second(messages):
        return f"<response>rewrite {h} {seed} {words(f'{h}/{seed}/2', 1)}</response>"
    return f"answer {h} {seed} {words(f'{h}/{seed}/1', 0)}"


def first_text(prompt_text: str, seed: Any) -> str:
    return answer_for([{"role": "user", "content": prompt_text}], seed)


class FakeServer:
    """A loopback OpenAI-compatible chat-completions server on a free port, in a thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency = 0.0
        self.jitter = 0.0
        self.fail_500 = 0.0
        self.fail_429 = 0.0
        self.retry_after = 0
        self.fail_first = 0  # the first this many requests get 429 with Retry-After
        self.every: tuple[int, str] | None = None
        self.echo_key = False
        self.rng = random.Random(7)
        self.records: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.faults = {"500": 0, "429": 0}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                server._handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=f"fake-openai-{self.port}", daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- what the tests read --------------------------------------------------------------

    def requests(self) -> int:
        with self.lock:
            return len(self.records)

    def ok(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.records if r["status"] == 200]

    def answers(self, prompt_text: str, second: bool) -> list[str]:
        """The texts this server answered (200) to requests for this prompt, of one kind."""
        out = []
        for r in self.ok():
            messages = list(r["body"]["messages"])
            if r["body"].get("system"):
                messages.insert(0, {"role": "system", "content": r["body"]["system"]})
            if last_user(messages) == prompt_text and is_second(messages) == second:
                out.append(r["answer"])
        return out

    def wait_for_requests(self, n: int, timeout: float = 30.0) -> None:
        t0 = time.monotonic()
        while self.requests() < n:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"the server saw {self.requests()} requests in {timeout} s, not {n}")
            time.sleep(0.01)

    # -- serving ---------------------------------------------------------------------------

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        try:
            h.wfile.write(data)
            h.wfile.flush()
        except OSError:
            pass

    def _handle(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        record: dict[str, Any] = {
            "path": h.path,
            "headers": {k.lower(): v for k, v in h.headers.items()},
            "body": body,
            "status": None,
            "answer": None,
            "t": time.monotonic(),
        }
        with self.lock:
            self.records.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            draw = self.rng.random()
            forced_429 = len(self.records) <= self.fail_first
            latency, every = self.latency + self.jitter * self.rng.random(), self.every
            fail_500, fail_429, retry_after = self.fail_500, self.fail_429, self.retry_after
        try:
            if latency:
                time.sleep(latency)
            anthropic = h.path.endswith("/messages")
            if not (h.path.endswith("/chat/completions") or anthropic) or not isinstance(body, dict):
                record["status"] = 404
                self._send(h, 404, {"error": {"message": "no such route", "type": "invalid_request_error"}})
                return
            if every is not None:
                status, message = every
                if self.echo_key:
                    message = f"{message}: key {h.headers.get('authorization', '')!r} is not valid"
                record["status"] = status
                self._send(h, status, {"error": {"message": message, "type": "invalid_request_error", "code": None}})
                return
            if draw < fail_500:
                with self.lock:
                    self.faults["500"] += 1
                record["status"] = 500
                self._send(h, 500, {"error": {"message": "injected fault: 500", "type": "server_error"}})
                return
            if forced_429 or fail_500 <= draw < fail_500 + fail_429:
                with self.lock:
                    self.faults["429"] += 1
                record["status"] = 429
                self._send(
                    h,
                    429,
                    {"error": {"message": "injected fault: rate limited", "type": "rate_limit_exceeded"}},
                    {"retry-after": str(retry_after)},
                )
                return
            messages = list(body.get("messages") or [])
            if anthropic and body.get("system"):
                messages.insert(0, {"role": "system", "content": body["system"]})
            text = answer_for(messages, body.get("seed", 0))
            prompt_tokens = sum(len(content(m)) for m in messages) // 4
            completion_tokens = len(text) // 4
            record["status"] = 200
            record["answer"] = text.removeprefix("<response>").removesuffix("</response>")
            if anthropic:
                self._send(
                    h,
                    200,
                    {
                        "id": "msg_test",
                        "type": "message",
                        "role": "assistant",
                        "model": body.get("model", "test"),
                        "content": [{"type": "text", "text": text}],
                        "stop_reason": "end_turn",
                        "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
                    },
                )
                return
            self._send(
                h,
                200,
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "model": body.get("model", "test"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                },
            )
        finally:
            with self.lock:
                self.in_flight -= 1


def write_prompts(path: Path, n: int, prefix: str = "p") -> list[dict[str, Any]]:
    """A JSONL prompts file of ``n`` prompts with ids ``<prefix>0000``... and an extra field."""
    rows = [{"id": f"{prefix}{i:04}", "prompt": f"Question {i}: why is the number {i} interesting?", "topic": f"t{i % 3}"} for i in range(n)]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file, checking that it holds whole lines only."""
    data = Path(path).read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path} ends with a torn line: {data[-200:]!r}"
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def second_and_first(row: dict[str, Any]) -> tuple[str, str]:
    """The second response and the first of a conversational row, by the construction rule."""
    chosen, rejected = row["chosen"], row["rejected"]
    assert isinstance(chosen, list) and len(chosen) == 1 and chosen[0]["role"] == "assistant", row
    assert isinstance(rejected, list) and len(rejected) == 1 and rejected[0]["role"] == "assistant", row
    c, r = chosen[0]["content"], rejected[0]["content"]
    if row["label"] == "better":
        return c, r
    assert row["label"] == "worse", row
    return r, c


def prompt_text(row: dict[str, Any]) -> str:
    return last_user(row["prompt"])


def content_id(text: str) -> str:
    """The id the engine derives from a text prompt (``Prompt::content_id``)."""
    return hashlib.sha256(b"text\0" + text.encode()).hexdigest()[:16]


def start_python(code: str, cwd: Path) -> subprocess.Popen:
    """Starts ``code`` in a fresh interpreter (this one's, with rmboost installed), in ``cwd``
    (not the source tree, whose ``rmboost`` folder has no native module), with its stdout and
    stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
