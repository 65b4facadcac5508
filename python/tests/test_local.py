"""The in-process model (``rmboost.Local``) on the test model that scripts/test.sh installs."""

from __future__ import annotations

import os

import pytest

import rmboost
from support import second_and_first


def test_local_model_makes_rows():
    model = os.environ.get("RMBOOST_MODEL")
    if not model:
        pytest.fail(
            "RMBOOST_MODEL is not set: run the suite through scripts/test.sh (it installs the test "
            "model with scripts/setup-test-env.sh and exports RMBOOST_MODEL)"
        )
    assert os.path.isfile(model), f"RMBOOST_MODEL={model} is not a file: rerun scripts/setup-test-env.sh"
    backend = rmboost.Local(model_path=model)
    assert backend.path == os.path.abspath(model) or os.path.samefile(backend.path, model), backend.path
    assert "Local" in repr(backend)
    gen = rmboost.Generator(backend, seed=1, concurrency=2, max_tokens=32, max_reasks=6)
    prompts = [{"id": "sky", "prompt": "Why is the sky blue?"}, {"id": "tea", "prompt": "How do I make tea?"}]
    rows = list(gen.generate(prompts))
    assert gen.failed == 0, "an example failed on the local model"
    assert sorted(r["id"] for r in rows) == ["sky", "tea"]
    for row in rows:
        second, first = second_and_first(row)
        assert second.strip() and first.strip() and second != first, row
        assert "<response>" not in second, row
        assert row["metadata"]["calls"] >= 2, row["metadata"]
        assert row["metadata"]["usage"]["total"]["completion_tokens"] > 0, row["metadata"]


def test_local_model_missing_file_is_a_model_error(tmp_path):
    with pytest.raises(rmboost.Error) as info:
        rmboost.Local(model_path=tmp_path / "no-such-model.gguf", fetch=False)
    assert info.value.kind in ("model", "io", "config"), repr(info.value)
    assert "no-such-model.gguf" in info.value.message, info.value.message
