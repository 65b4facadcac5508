"""Backends written in Python: a plain ``complete`` and an ``async def`` one, and ``agenerate``."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import rmboost
from support import answer_for, content, content_id, last_user, second_and_first


class Recorder:
    """What both test backends record: every call's messages and params, calls in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[list, dict[str, Any]]] = []
        self.answers: dict[tuple[str, bool], list[str]] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    def enter(self, messages: list, params: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append((messages, params))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, messages: list, text: str) -> str:
        second = any("</response>" in content(m) for m in messages)
        with self.lock:
            self.in_flight -= 1
            self.answers.setdefault((last_user(messages), second), []).append(
                text.removeprefix("<response>").removesuffix("</response>")
            )
        return text


class SyncBackend(Recorder):
    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay

    def complete(self, messages, **params):
        self.enter(messages, params)
        if self.delay:
            time.sleep(self.delay)
        return self.leave(messages, answer_for(messages, params.get("seed", 0)))


class AsyncBackend(Recorder):
    def __init__(self, delay: float = 0.02) -> None:
        super().__init__()
        self.delay = delay
        self.loops: set[int] = set()

    async def complete(self, messages, **params):
        self.enter(messages, params)
        self.loops.add(id(asyncio.get_running_loop()))
        await asyncio.sleep(self.delay)
        return self.leave(messages, answer_for(messages, params.get("seed", 0)))


PROMPTS = [{"id": f"b{i:02}", "prompt": f"Backend question {i}: why do cats purr?"} for i in range(24)]


def check_rows(rows: list[dict[str, Any]], backend: Recorder) -> None:
    assert sorted(r["id"] for r in rows) == [p["id"] for p in PROMPTS]
    labels = set()
    for row in rows:
        text = row["prompt"][-1]["content"]
        second, first = second_and_first(row)
        assert backend.answers[(text, False)] == [first], row
        assert backend.answers[(text, True)] == [second], row
        assert row["metadata"]["calls"] == 2, row["metadata"]
        labels.add(row["label"])
    assert labels == {"better", "worse"}
    assert len(backend.calls) == 2 * len(PROMPTS)


def check_params(backend: Recorder) -> None:
    for messages, params in backend.calls:
        assert isinstance(messages, list) and messages, messages
        assert all(isinstance(m, dict) and set(m) >= {"role", "content"} for m in messages), messages
        assert messages[-1]["role"] == "user", messages
        assert params.get("temperature") == 0.5, params
        assert params.get("max_tokens") == 128, params
        assert isinstance(params.get("seed"), int), params
    # Each call has a seed of its own (drawn from the run's seed and the example's id).
    seeds = [p["seed"] for _, p in backend.calls]
    assert len(set(seeds)) == len(seeds), "seeds repeat across calls"


def test_sync_backend():
    backend = SyncBackend(delay=0.01)
    gen = rmboost.Generator(backend, seed=3, concurrency=8, temperature=0.5, max_tokens=128)
    rows = list(gen.generate(PROMPTS))
    assert gen.failed == 0
    check_rows(rows, backend)
    check_params(backend)
    # A plain complete() runs on worker threads, so calls overlap too (time.sleep drops the GIL).
    assert backend.max_in_flight > 1, backend.max_in_flight


def test_async_backend_overlaps_calls():
    backend = AsyncBackend(delay=0.05)
    gen = rmboost.Generator(backend, seed=3, concurrency=16, temperature=0.5, max_tokens=128)
    t0 = time.monotonic()
    rows = list(gen.generate(PROMPTS))
    elapsed = time.monotonic() - t0
    check_rows(rows, backend)
    check_params(backend)
    assert backend.max_in_flight > 1, backend.max_in_flight
    assert backend.max_in_flight >= 8, f"only {backend.max_in_flight} calls in flight at concurrency 16"
    # 48 calls of 50 ms one after the other would take 2.4 s.
    assert elapsed < 1.6, f"{elapsed:.2f} s: the calls did not overlap"
    assert len(backend.loops) == 1, "every call on one event loop"


def test_sync_and_async_backends_make_the_same_rows():
    a = list(rmboost.Generator(SyncBackend(), seed=9, concurrency=4).generate(PROMPTS))
    b = list(rmboost.Generator(AsyncBackend(delay=0.001), seed=9, concurrency=4).generate(PROMPTS))

    def key(rows):
        return sorted((r["id"], r["label"], r["aspects"], r["chosen"], r["rejected"]) for r in rows)

    assert key(a) == key(b)


def test_agenerate_in_asyncio_run():
    backend = AsyncBackend(delay=0.02)
    gen = rmboost.Generator(backend, seed=4, concurrency=8)
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    async def main() -> tuple[list[dict[str, Any]], set[int]]:
        stop = asyncio.Event()
        task = asyncio.create_task(ticker(stop))
        rows = [row async for row in gen.agenerate(PROMPTS)]
        stop.set()
        await task
        return rows, {id(asyncio.get_running_loop())}

    rows, loop_ids = asyncio.run(main())
    check_rows(rows, backend)
    assert backend.loops == loop_ids, "an async backend's calls run on the caller's loop"
    assert ticks > 5, "the event loop was blocked while rows were generated"

    # The same rows as generate() with the same settings.
    again = list(rmboost.Generator(AsyncBackend(delay=0.001), seed=4, concurrency=8).generate(PROMPTS))
    key = lambda rows: sorted((r["id"], r["label"], r["aspects"], r["chosen"], r["rejected"]) for r in rows)  # noqa: E731
    assert key(rows) == key(again)


def test_agenerate_with_sync_backend_and_str_prompts():
    prompts = ["Sync in async: what is rain?", "Sync in async: what is snow?"]

    async def main():
        return [row async for row in rmboost.Generator(SyncBackend(), seed=1).agenerate(prompts)]

    rows = asyncio.run(main())
    assert sorted(r["id"] for r in rows) == sorted(content_id(p) for p in prompts)


def test_backend_returning_a_non_str_stops_the_run():
    class Bad:
        def complete(self, messages, **params):
            return 42

    try:
        list(rmboost.Generator(Bad()).generate(["x y z"]))
    except rmboost.Error as e:
        assert e.kind == "fatal", repr(e)
        assert "str" in e.message, e.message
    else:
        raise AssertionError("a backend returning 42 made rows")


def test_an_object_without_complete_is_refused():
    try:
        rmboost.Generator(object())
    except TypeError as e:
        assert "complete" in str(e)
    else:
        raise AssertionError("object() accepted as a backend")


def test_generate_from_inside_a_running_loop_uses_a_loop_of_its_own():
    """As in a notebook cell: synchronous ``generate`` called while an event loop runs (and
    is blocked by the call) drives an ``async def`` backend on the package's own loop."""
    backend = AsyncBackend(delay=0.01)

    async def cell() -> list:
        return list(rmboost.Generator(backend, seed=3, concurrency=4).generate(["a?", "b?", "c?"]))

    rows = asyncio.run(cell())
    assert len(rows) == 3
    assert len(backend.loops) == 1, "every call ran on one loop"


def _rows_in_a_forked_child() -> int:
    return len(list(rmboost.Generator(SyncBackend(), seed=3).generate(["x?", "y?"])))


def test_a_child_forked_after_the_runtime_started_makes_its_own():
    import multiprocessing

    backend = SyncBackend()
    assert len(list(rmboost.Generator(backend, seed=3).generate(["x?"]))) == 1
    # The parent's runtime threads do not exist in a forked child: it must start its own
    # rather than wait forever on the parent's.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_rows_in_a_forked_child).get(timeout=60) == 2


class CountingBackend:
    """Answers as the sync backend does, and says what each call cost in tokens."""

    def complete(self, messages, **params):
        return {"text": answer_for(messages, params.get("seed", 0)), "prompt_tokens": 10, "completion_tokens": 3}


def test_a_python_backend_reports_its_tokens(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"id": "q{i}", "prompt": "question {i}?"}}\n' for i in range(6)))
    summary = rmboost.Generator(CountingBackend(), seed=4).run(prompts, tmp_path / "o.jsonl", progress=False)
    assert summary["examples"] == 6 and summary["calls"] == 12, summary
    assert summary["prompt_tokens"] == 120 and summary["completion_tokens"] == 36, summary
    # The same counts drive a cost budget: $1 per prompt token stops after the first calls.
    capped = rmboost.Generator(CountingBackend(), seed=4, concurrency=1).run(
        prompts, tmp_path / "c.jsonl", price_input=1e6, max_cost=25.0, progress=False
    )
    assert capped["outcome"] == "cost_limit" and capped["examples"] < 6, capped

    class NoText:
        def complete(self, messages, **params):
            return {"prompt_tokens": 1}

    try:
        list(rmboost.Generator(NoText()).generate(["a?"]))
    except rmboost.Error as e:
        assert e.kind == "fatal" and '"text"' in e.message, repr(e)
    else:
        raise AssertionError("a dict without text was taken as an answer")
