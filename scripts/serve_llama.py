#!/usr/bin/env python3
"""Serve a GGUF model over llama.cpp's OpenAI-compatible HTTP API, for rmboost's tests.

Uses the `xllamacpp` package (a prebuilt llama.cpp server). Prints one line
`LISTENING http://HOST:PORT` on stdout once the server accepts connections, then stays up
until SIGTERM or SIGINT, or until its standard input is closed (so a test process that dies
without cleaning up does not leave a server behind). Use --no-stdin-watch to keep running
with stdin detached (e.g. `< /dev/null` from a shell).

    python scripts/serve_llama.py --model PATH.gguf [--port 0] [--n-ctx 4096]
        [--parallel 2] [--threads 2] [--poll 0]
"""

import argparse
import os
import signal
import sys
import threading


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("RMBOOST_MODEL"),
                   help="path of the .gguf file (default: $RMBOOST_MODEL)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default)")
    p.add_argument("--n-ctx", type=int, default=4096,
                   help="total context tokens, shared by the slots (default 4096)")
    p.add_argument("--parallel", type=int, default=2,
                   help="number of slots decoding at once (default 2)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--poll", type=int, default=0,
                   help="busy-wait level of idle threads, 0-100 (default 0: sleep, which "
                        "behaves far better on a machine shared with other work)")
    p.add_argument("--no-stdin-watch", action="store_true",
                   help="do not exit when standard input closes")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.model:
        print("error: no model: pass --model or set RMBOOST_MODEL", file=sys.stderr)
        return 2
    if not os.path.isfile(args.model):
        print(f"error: model file not found: {args.model}", file=sys.stderr)
        return 2
    try:
        import xllamacpp
    except ImportError as e:
        print(f"error: cannot import xllamacpp ({e}); run scripts/setup-test-env.sh",
              file=sys.stderr)
        return 2

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.n_ctx
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.cpuparams.poll = args.poll
    params.cpuparams_batch.poll = args.poll

    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = xllamacpp.Server(params)
    address = server.listening_address
    if not address.startswith("http"):
        address = "http://" + address
    print(f"LISTENING {address}", flush=True)

    if not args.no_stdin_watch:
        def watch_stdin():
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            except (OSError, ValueError):
                pass
            stop.set()

        threading.Thread(target=watch_stdin, daemon=True).start()

    while not stop.wait(0.5):
        pass
    # Leave without running llama.cpp's teardown in the interpreter's shutdown path.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
