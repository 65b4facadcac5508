"""Fixtures of the rmboost package's tests (the helpers are in support.py)."""

from __future__ import annotations

import pytest

from support import FakeServer, write_prompts


@pytest.fixture
def server():
    s = FakeServer()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def prompts_file(tmp_path):
    """A JSONL file of 20 prompts (ids p0000..p0019, an extra ``topic`` field)."""
    path = tmp_path / "prompts.jsonl"
    rows = write_prompts(path, 20)
    return path, rows


