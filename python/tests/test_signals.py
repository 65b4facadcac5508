"""A run killed mid-way resumes; Ctrl-C stops generate() and run() promptly (in a child
interpreter, against a slow loopback server)."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import rmboost
from support import read_jsonl, start_python, write_prompts

RUN = """
import rmboost
gen = rmboost.Generator(rmboost.OpenAI(model="test-model", base_url={url!r}), seed=4, concurrency={c})
print("started", flush=True)
summary = gen.run({inp!r}, {out!r}, progress=False)
print("summary", summary, flush=True)
"""

GENERATE = """
import rmboost
gen = rmboost.Generator(rmboost.OpenAI(model="test-model", base_url={url!r}), seed=4, concurrency={c})
print("started", flush=True)
for row in gen.generate(f"Slow question {{i}}" for i in range(1000)):
    print("row", row["id"], flush=True)
print("finished", flush=True)
"""


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_until(what, timeout: float, message: str) -> None:
    t0 = time.monotonic()
    while not what():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(message)
        time.sleep(0.01)


def check_every_id_once(out: Path, prompts: list[dict]) -> None:
    counts = Counter(r["id"] for r in read_jsonl(out))
    assert set(counts) == {p["id"] for p in prompts}, f"missing: {sorted({p['id'] for p in prompts} - set(counts))[:10]}"
    assert max(counts.values()) == 1, [i for i, n in counts.items() if n > 1]


def test_resume_after_sigkill(server, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "pairs.jsonl"
    prompts = write_prompts(inp, 200)
    server.latency = 0.06  # 200 examples x 2 calls x 60 ms / 8 in flight: about 3 s
    child = start_python(RUN.format(url=server.base_url, c=8, inp=str(inp), out=str(out)), cwd=tmp_path)
    try:
        wait_until(lambda: lines_in(out) >= 30 or child.poll() is not None, 30, "no rows after 30 s")
        assert child.poll() is None, f"the run ended before the kill: {child.communicate()}"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    rows = read_jsonl(out)  # whole lines only
    done = len(rows)
    assert 30 <= done < 200, done
    assert len({r["id"] for r in rows}) == done

    server.latency = 0.0
    gen = rmboost.Generator(rmboost.OpenAI(model="test-model", base_url=server.base_url), seed=4, concurrency=8)
    summary = gen.run(inp, out, progress=False)
    assert summary["outcome"] == "completed", summary
    assert summary["skipped_done"] == done, summary
    assert summary["examples"] == 200 - done, summary
    check_every_id_once(out, prompts)


def interrupt(child, ready, timeout: float = 30.0) -> float:
    """Waits until ``ready()``, sends SIGINT, returns how long the child took to exit."""
    wait_until(lambda: ready() or child.poll() is not None, timeout, "the child never got going")
    assert child.poll() is None, f"the child ended before SIGINT: {child.communicate()}"
    child.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    try:
        child.wait(15)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return time.monotonic() - t0


def test_ctrl_c_stops_generate(server, tmp_path):
    server.latency = 0.4
    child = start_python(GENERATE.format(url=server.base_url, c=8), cwd=tmp_path)
    # Some rows out, and calls in flight (each takes 0.4 s).
    took = interrupt(child, lambda: server.requests() >= 24)
    stdout, stderr = child.communicate()
    assert "KeyboardInterrupt" in stderr, stderr
    assert child.returncode != 0
    assert "finished" not in stdout
    assert took < 2.0, f"generate() took {took:.2f} s to stop after SIGINT"
    # It stopped making calls.
    seen = server.requests()
    time.sleep(0.5)
    assert server.requests() == seen, "calls went on after the interpreter stopped"


def test_ctrl_c_stops_run_with_whole_lines(server, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "pairs.jsonl"
    prompts = write_prompts(inp, 300)
    server.latency = 0.1
    child = start_python(RUN.format(url=server.base_url, c=16, inp=str(inp), out=str(out)), cwd=tmp_path)
    took = interrupt(child, lambda: lines_in(out) >= 20)
    stdout, stderr = child.communicate()
    assert "KeyboardInterrupt" in stderr, stderr
    assert child.returncode != 0
    assert "summary" not in stdout
    # The calls in flight (100 ms each, at most both calls of an example) finish first.
    assert took < 3.0, f"run() took {took:.2f} s to stop after SIGINT"
    rows = read_jsonl(out)
    assert 20 <= len(rows) < 300, len(rows)

    server.latency = 0.0
    gen = rmboost.Generator(rmboost.OpenAI(model="test-model", base_url=server.base_url), seed=4, concurrency=16)
    summary = gen.run(inp, out, progress=False)
    assert summary["outcome"] == "completed", summary
    assert summary["skipped_done"] == len(rows), summary
    check_every_id_once(out, prompts)
