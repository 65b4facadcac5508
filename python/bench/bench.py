"""Throughput of the Python package against the Rust CLI, on one loopback server.

Measures, in one run against the same server (the Rust throughput bench's loopback
OpenAI-compatible server, latency ``L`` per call, ~1 KB answers):

1. examples/s of ``rmboost generate --backend openai --base-url ... --concurrency C`` (the CLI,
   as a user runs it: JSONL in and out, resume on, a cold response cache in a temporary folder;
   and again with ``--no-cache``);
2. examples/s of Python's ``Generator(rmboost.OpenAI(...), concurrency=C).generate(prompts)``
   (rows as dicts, consumed in a ``for`` loop), and the ratio to the CLI (goal: >= 0.9);
3. calls/s through a trivial ``async def complete`` backend (``await asyncio.sleep(L)``) and a
   trivial plain ``def complete`` one (``time.sleep(L)``) at concurrency ``C``, against the bound
   ``C / L``.

Each side runs in a fresh process, one after the other, on the same number of prompts. The
figure of each side is the examples written per second of its generation (the CLI's own
``elapsed`` from ``--summary-json``; for Python the time of the ``generate`` loop); the CLI's
whole process life (start-up and files included) is printed too. With two calls per example
no run can beat ``C / (2 L)`` examples/s. The script builds nothing; build first (release):

    cargo build --release --features cli                          # target/release/rmboost
    cargo bench --bench throughput --all-features --no-run        # prints the bench binary
    .venv/bin/pip install --no-build-isolation ./python           # the package, release

then (from the repository root):

    .venv/bin/python python/bench/bench.py --cli target/release/rmboost \\
        --server target/release/deps/throughput-<hash> [--prompts 6000] [--concurrency 256] \\
        [--latency-ms 50] [--repeat 1]

``--server`` is the throughput bench's binary; the script starts it as
``<server> --mode serve --latency-ms L`` and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = (
    "Explain, with one worked example, how a hash table keeps lookups fast as it grows, and what "
    "happens to the cost of an insertion that triggers a resize."
)

PYTHON_GENERATE = r"""
import json, sys, time
import rmboost
url, path, c = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = [json.loads(line) for line in open(path)]
gen = rmboost.Generator(rmboost.OpenAI(model="bench-model", base_url=url), concurrency=c)
t0 = time.perf_counter()
n = 0
for row in gen.generate(prompts):
    n += len(row["chosen"]) > 0
elapsed = time.perf_counter() - t0
print(json.dumps({"examples": n, "failed": gen.failed, "elapsed": elapsed}))
"""

PYTHON_BACKEND = r"""
import asyncio, json, sys, time
import rmboost
kind, n, c, latency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
FIRST = "answer {} kan lon min nun pen ran sin ton vun ben don fin gun han jen won kal mil"
SECOND = "<response>rewrite {} kar lor mir nur per rar sir tor vur ber dor fir gur har jer wor</response>"

def text(messages, seed):
    second = any("</response>" in m["content"] for m in messages)
    return (SECOND if second else FIRST).format(seed)

class Async:
    calls = 0
    async def complete(self, messages, **params):
        Async.calls += 1
        await asyncio.sleep(latency)
        return text(messages, params.get("seed"))

class Sync:
    calls = 0
    def complete(self, messages, **params):
        Sync.calls += 1
        time.sleep(latency)
        return text(messages, params.get("seed"))

backend = Async() if kind == "async" else Sync()
gen = rmboost.Generator(backend, concurrency=c)
t0 = time.perf_counter()
rows = sum(1 for _ in gen.generate(f"{i}. bench prompt" for i in range(n)))
elapsed = time.perf_counter() - t0
print(json.dumps({"examples": rows, "failed": gen.failed, "calls": type(backend).calls, "elapsed": elapsed}))
"""


def write_prompts(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i:08}", "prompt": f"{i}. {PROMPT}"}) + "\n")


def start_server(binary: str, latency_ms: int) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [binary, "--mode", "serve", "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    t0 = time.monotonic()
    for line in server.stdout:
        if line.startswith("serving "):
            return server, line.split()[1]
        if time.monotonic() - t0 > 60:
            break
    server.kill()
    raise SystemExit(f"{binary} --mode serve did not print its URL (a bench binary with the serve mode?)")


def cpu_seconds_of_children() -> float:
    t = os.times()
    return t.children_user + t.children_system


def run_cli(cli: str, url: str, prompts: Path, work: Path, c: int, no_cache: bool) -> dict:
    out = work / ("cli-nocache.jsonl" if no_cache else "cli.jsonl")
    summary = work / (out.stem + ".summary.json")
    cmd = [
        cli, "generate", "-i", str(prompts), "-o", str(out), "--backend", "openai", "--base-url", url,
        "--model", "bench-model", "--concurrency", str(c), "--progress", "off", "--summary-json", str(summary),
    ]
    cmd += ["--no-cache"] if no_cache else ["--cache-dir", str(work / "cache")]
    cpu0 = cpu_seconds_of_children()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds_of_children() - cpu0
    if done.returncode != 0:
        raise SystemExit(f"the CLI failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    s = json.loads(summary.read_text())
    examples = sum(1 for _ in open(out))
    elapsed = find_elapsed(s)
    return {"examples": examples, "elapsed": elapsed if elapsed else wall, "wall": wall, "cpu": cpu}


def find_elapsed(summary: dict) -> float | None:
    """The run's own seconds in the CLI's summary JSON (``wall_time_secs``, at any depth)."""
    stack = [summary]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            for k in ("wall_time_secs", "elapsed_secs", "elapsed"):
                if isinstance(d.get(k), (int, float)):
                    return float(d[k])
            stack.extend(d.values())
    return None


def run_python(code: str, args: list[str]) -> dict:
    cpu0 = cpu_seconds_of_children()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"the Python side failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    r["wall"] = wall
    r["cpu"] = cpu_seconds_of_children() - cpu0
    return r


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cli", required=True, help="the rmboost binary (cargo build --release --features cli)")
    ap.add_argument("--server", required=True, help="the throughput bench binary (with --mode serve)")
    ap.add_argument("--prompts", type=int, default=6000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--latency-ms", type=int, default=50)
    ap.add_argument("--backend-prompts", type=int, default=None, help="prompts of the backend runs (default: --prompts)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each side (the best is kept)")
    a = ap.parse_args()

    import rmboost  # noqa: F401  (fail early if the package is not installed)

    c, latency = a.concurrency, a.latency_ms / 1000
    bound = c / (2 * latency)
    n_backend = a.backend_prompts or a.prompts
    work = Path(tempfile.mkdtemp(prefix="rmboost-pybench-"))
    server, url = start_server(a.server, a.latency_ms)
    try:
        prompts = work / "prompts.jsonl"
        write_prompts(prompts, a.prompts)
        print(f"rmboost Python bench: {os.cpu_count()} cores, load {load()}, C={c}, L={a.latency_ms} ms, "
              f"{a.prompts} prompts, server {url}; bound C/(2L) = {bound:.0f} examples/s", flush=True)
        results: dict[str, dict] = {}

        def best(name: str, fn) -> dict:
            runs = []
            for _ in range(a.repeat):
                runs.append(fn())
                r = runs[-1]
                print(f"  {name}: {r['examples']} examples in {r['elapsed']:.2f} s "
                      f"({r['examples'] / r['elapsed']:.0f}/s; process {r['wall']:.2f} s, CPU {r['cpu']:.2f} s)",
                      flush=True)
            results[name] = max(runs, key=lambda r: r["examples"] / r["elapsed"])
            return results[name]

        cli = best("CLI (cache on)", lambda: fresh(work) or run_cli(a.cli, url, prompts, work, c, no_cache=False))
        cli_nc = best("CLI --no-cache", lambda: fresh(work) or run_cli(a.cli, url, prompts, work, c, no_cache=True))
        py = best("Python generate", lambda: run_python(PYTHON_GENERATE, [url, str(prompts), str(c)]))
        for r in (cli, cli_nc, py):
            if r["examples"] != a.prompts:
                raise SystemExit(f"a side made {r['examples']} examples of {a.prompts}")

        backend_bound = c / latency
        rows = []
        for kind in ("async", "sync"):
            r = best(f"{kind} backend", lambda kind=kind: run_python(PYTHON_BACKEND, [kind, str(n_backend), str(c), str(latency)]))
            if r["examples"] != n_backend or r["failed"]:
                raise SystemExit(f"the {kind} backend made {r['examples']} of {n_backend} ({r['failed']} failed)")
            rows.append((kind, r["calls"] / r["elapsed"], r))

        def rate(r: dict) -> float:
            return r["examples"] / r["elapsed"]

        print()
        print(f"{'what':<40} {'figure':>12} {'of bound':>9}")
        print(f"{'CLI examples/s (cache on)':<40} {rate(cli):>12.0f} {rate(cli) / bound:>9.1%}")
        print(f"{'CLI examples/s (--no-cache)':<40} {rate(cli_nc):>12.0f} {rate(cli_nc) / bound:>9.1%}")
        print(f"{'Python generate examples/s':<40} {rate(py):>12.0f} {rate(py) / bound:>9.1%}")
        print(f"{'ratio Python / CLI (goal >= 0.9)':<40} {rate(py) / rate(cli):>12.3f}")
        print(f"{'ratio Python / CLI --no-cache':<40} {rate(py) / rate(cli_nc):>12.3f}")
        for kind, calls_per_sec, _ in rows:
            print(f"{f'{kind} Python backend calls/s':<40} {calls_per_sec:>12.0f} {calls_per_sec / backend_bound:>9.1%}")
        print(f"(bounds: C/(2L) = {bound:.0f} examples/s, C/L = {backend_bound:.0f} calls/s; load now {load()})")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


def fresh(work: Path) -> None:
    """Removes the CLI's outputs and cache of an earlier run (the CLI would resume them)."""
    for f in work.glob("cli*"):
        f.unlink()
    shutil.rmtree(work / "cache", ignore_errors=True)


if __name__ == "__main__":
    main()
