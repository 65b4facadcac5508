"""Generation against a loopback OpenAI-compatible server through ``rmboost.OpenAI``."""

from __future__ import annotations

from typing import Any

import rmboost
from support import content_id, prompt_text, second_and_first

ROW_KEYS = {"id", "prompt", "chosen", "rejected", "label", "aspects", "margin", "metadata"}


def generator(server, **settings: Any) -> rmboost.Generator:
    return rmboost.Generator(rmboost.OpenAI(model="test-model", base_url=server.base_url), **settings)


def mixed_prompts(n: int) -> list[Any]:
    """A third plain strings, a third dicts with a prompt and extra fields, a third dicts with
    messages (a system turn, then the user's)."""
    out: list[Any] = []
    for i in range(n):
        text = f"Prompt {i}: how do tides depend on the moon, case {i}?"
        if i % 3 == 0:
            out.append(text)
        elif i % 3 == 1:
            out.append({"id": f"dict-{i}", "prompt": text, "source": "unit", "n": i, "tags": ["a", "b"]})
        else:
            out.append(
                {
                    "id": f"chat-{i}",
                    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
                    "source": "chat",
                }
            )
    return out


def expected_id(p: Any) -> str:
    return content_id(p) if isinstance(p, str) else p["id"]


def user_text(p: Any) -> str:
    if isinstance(p, str):
        return p
    return p.get("prompt") or p["messages"][-1]["content"]


def check_row_shape(row: dict[str, Any], seed: int) -> None:
    assert ROW_KEYS <= row.keys(), row.keys()
    assert isinstance(row["prompt"], list) and row["prompt"], row
    for m in row["prompt"]:
        assert set(m) == {"role", "content"} and isinstance(m["content"], str), row["prompt"]
    assert row["prompt"][-1]["role"] == "user", row["prompt"]
    for column in ("chosen", "rejected"):
        assert isinstance(row[column], list) and len(row[column]) == 1, row[column]
        assert row[column][0]["role"] == "assistant" and isinstance(row[column][0]["content"], str), row[column]
        assert row[column][0]["content"].strip(), row
    assert row["chosen"] != row["rejected"], row
    assert row["label"] in ("better", "worse"), row
    assert isinstance(row["aspects"], list) and row["aspects"], row
    assert all(isinstance(a, str) and a for a in row["aspects"]), row
    meta = row["metadata"]
    assert meta["method"] == "rmboost", meta
    assert meta["seed"] == seed, meta
    assert meta["calls"] == 2 and meta["reasks"] == 0, meta
    total = meta["usage"]["total"]
    assert total["prompt_tokens"] > 0 and total["completion_tokens"] > 0, meta["usage"]


def test_rows_from_str_and_dict_prompts_obey_the_construction_rule(server):
    prompts = mixed_prompts(24)
    gen = generator(server, seed=11, concurrency=8)
    rows = list(gen.generate(prompts))

    assert len(rows) == len(prompts)
    assert gen.failed == 0
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids), ids
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {expected_id(p) for p in prompts}
    assert server.requests() == 2 * len(prompts), "two calls per example, no more"

    labels = set()
    for p in prompts:
        row = by_id[expected_id(p)]
        check_row_shape(row, seed=11)
        text = user_text(p)
        assert prompt_text(row) == text
        if isinstance(p, dict) and "messages" in p:
            assert row["prompt"] == p["messages"], row["prompt"]
        else:
            assert row["prompt"] == [{"role": "user", "content": text}], row["prompt"]
        # The construction rule, against what the server actually answered for this prompt.
        second, first = second_and_first(row)
        assert first.startswith("answer ") and second.startswith("rewrite "), row
        assert "<response>" not in second and "</response>" not in second, second
        assert server.answers(text, second=False) == [first], row
        assert server.answers(text, second=True) == [second], row
        labels.add(row["label"])
        # Extra fields of a dict are carried into metadata.input; a str has none.
        extra = {k: v for k, v in p.items() if k not in ("id", "prompt", "messages")} if isinstance(p, dict) else {}
        assert row["metadata"].get("input", {}) == extra, row["metadata"]
    assert labels == {"better", "worse"}, "24 examples at p_better 0.5 give both labels"

    # The server was sent what the generator was configured with.
    bodies = [r["body"] for r in server.ok()]
    assert all(b["model"] == "test-model" for b in bodies)
    assert all(isinstance(b.get("seed"), int) for b in bodies), "every call carries a seed"
    assert all(b.get("temperature") == 0.7 for b in bodies), {b.get("temperature") for b in bodies}


def summary_of(rows: list[dict[str, Any]]) -> dict[str, tuple]:
    return {r["id"]: (r["label"], tuple(r["aspects"]), r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows}


def test_same_seed_same_rows_across_runs_and_concurrency(server):
    prompts = [f"Question {i}: what makes bread rise?" for i in range(24)]
    server.jitter = 0.01  # completion order varies with concurrency
    one = summary_of(list(generator(server, seed=5, concurrency=1).generate(prompts)))
    again = summary_of(list(generator(server, seed=5, concurrency=1).generate(prompts)))
    wide = summary_of(list(generator(server, seed=5, concurrency=16).generate(prompts)))
    other = summary_of(list(generator(server, seed=6, concurrency=16).generate(prompts)))
    assert len(one) == 24
    assert one == again
    assert one == wide
    # Another seed draws other labels and aspects (24 coin flips cannot all agree by chance
    # in practice), and other backend seeds.
    assert [v[:2] for v in one.values()] != [other[k][:2] for k in one]
    assert all(one[k][2:] != other[k][2:] for k in one)


def test_order_input_keeps_the_input_order(server):
    prompts = [{"id": f"o{i:02}", "prompt": f"Ordering question {i}"} for i in range(32)]
    server.jitter = 0.03
    rows = list(generator(server, seed=1, concurrency=16, order="input").generate(prompts))
    assert [r["id"] for r in rows] == [p["id"] for p in prompts]
    # The default, completion order, does reorder with this server (so the check above means
    # something).
    rows = list(generator(server, seed=1, concurrency=16).generate(prompts))
    assert sorted(r["id"] for r in rows) == [p["id"] for p in prompts]
    assert [r["id"] for r in rows] != [p["id"] for p in prompts]


def test_standard_format_writes_plain_strings(server):
    rows = list(generator(server, format="standard").generate(["What is a prime number?"]))
    assert len(rows) == 1
    row = rows[0]
    assert row["prompt"] == "What is a prime number?"
    assert isinstance(row["chosen"], str) and isinstance(row["rejected"], str), row
    second = row["chosen"] if row["label"] == "better" else row["rejected"]
    assert second.startswith("rewrite "), row


def test_generate_is_lazy_and_closing_it_stops_the_work(server):
    server.latency = 0.02
    pulled = []

    def prompts():
        for i in range(1000):
            pulled.append(i)
            yield f"Lazy question {i}"

    gen = generator(server, concurrency=4)
    it = gen.generate(prompts())
    first = next(it)
    assert first["id"]
    it.close()
    seen = server.requests()
    assert len(pulled) < 100, f"{len(pulled)} prompts pulled for one row at concurrency 4"
    import time

    time.sleep(0.2)
    assert server.requests() <= seen + 8, "calls went on after the iterator was closed"


def test_http_faults_are_retried(server):
    server.fail_500 = 0.15
    server.fail_429 = 0.15
    server.retry_after = 0
    prompts = [f"Faulty question {i}" for i in range(20)]
    gen = generator(server, seed=2, concurrency=8)
    rows = list(gen.generate(prompts))
    assert gen.failed == 0
    assert sorted(r["id"] for r in rows) == sorted(content_id(p) for p in prompts)
    assert server.faults["500"] > 0 and server.faults["429"] > 0, server.faults
    for row in rows:
        second, first = second_and_first(row)
        assert first.startswith("answer ") and second.startswith("rewrite "), row
        assert "injected fault" not in str(row)


def test_anthropic_backend(server, monkeypatch):
    monkeypatch.setenv("RMBOOST_TEST_ANTHROPIC_KEY", "test-anthropic-key")
    backend = rmboost.Anthropic(model="claude-test", base_url=server.base_url, api_key_env="RMBOOST_TEST_ANTHROPIC_KEY")
    assert backend.model == "claude-test"
    prompts = [{"id": f"a{i}", "prompt": f"Anthropic question {i}: what is a comet?"} for i in range(6)]
    rows = list(rmboost.Generator(backend, seed=2, concurrency=4, max_tokens=300).generate(prompts))
    assert sorted(r["id"] for r in rows) == [p["id"] for p in prompts]
    for row in rows:
        second, first = second_and_first(row)
        assert server.answers(prompt_text(row), second=False) == [first], row
        assert server.answers(prompt_text(row), second=True) == [second], row
        assert row["metadata"]["models"], row["metadata"]
    records = server.ok()
    assert len(records) == 12 and all(r["path"].endswith("/v1/messages") for r in records)
    assert all(r["headers"].get("x-api-key") == "test-anthropic-key" for r in records)
    assert all(r["headers"].get("anthropic-version") for r in records)
    assert all(r["body"]["model"] == "claude-test" and r["body"]["max_tokens"] == 300 for r in records)
    # The instructions of a second call go in the top-level system field.
    assert sum("</response>" in (r["body"].get("system") or "") for r in records) == 6


def test_generator_repr_names_backend_and_settings(server):
    gen = generator(server, seed=3, concurrency=5)
    shown = repr(gen)
    assert "rmboost.Generator(" in shown and "test-model" in shown, shown
    assert "seed=3" in shown and "concurrency=5" in shown and "rmboost" in shown, shown


def test_retry_after_is_honoured(server):
    server.fail_first = 1
    server.retry_after = 1
    gen = generator(server, seed=1)
    rows = list(gen.generate(["Patience, please"]))
    assert len(rows) == 1 and gen.failed == 0
    first, retried = server.records[0], server.records[1]
    assert first["status"] == 429 and retried["status"] == 200
    waited = retried["t"] - first["t"]
    assert waited >= 0.95, f"retried {waited:.2f} s after a 429 with Retry-After: 1"
