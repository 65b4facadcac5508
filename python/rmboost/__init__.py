"""Synthetic preference data for reward models with the RMBoost method.

For each prompt the generator asks the model for a first response, draws the label first
(the second response must be *better* or *worse*), draws the quality aspects, then asks for
a second response that is better or worse than the first on those aspects. The pair is
right by construction, with no LLM judge. The engine is the Rust crate ``rmboost``; this
package drives it from Python.

>>> import rmboost
>>> gen = rmboost.Generator(rmboost.OpenAI(model="qwen", base_url="http://127.0.0.1:8000/v1"),
...                         concurrency=64, seed=1)                      # doctest: +SKIP
>>> for row in gen.generate(["Why is the sky blue?"]):                   # doctest: +SKIP
...     row["chosen"], row["rejected"]

Rows are dicts with TRL's columns (``prompt``, ``chosen``, ``rejected``) plus ``id``,
``label``, ``aspects`` and ``metadata``: exactly the lines ``rmboost generate`` writes.

A backend is :class:`OpenAI` (vLLM, llama.cpp, Ollama, SGLang, OpenAI ...), :class:`Anthropic`,
:class:`Local` (a small model in process, no server or key), or any object of your own with a
``complete(messages, **params)`` method, plain or ``async def``, that returns the answer's
text (or a dict ``{"text": ..., "prompt_tokens": n, "completion_tokens": m}``, so that the
summary and a cost budget count its tokens). Raise :class:`RetryableError` (or :class:`RateLimitedError`) from it for a call worth
retrying, :class:`ExampleError` to fail only this example; any other exception stops the run.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

from ._rmboost import Anthropic, Local, OpenAI, _Engine, _report

__all__ = [
    "Anthropic",
    "Error",
    "ExampleError",
    "FatalError",
    "Generator",
    "Local",
    "OpenAI",
    "RateLimitedError",
    "RetryableError",
    "report",
]

__version__ = "0.1.0"

_log = logging.getLogger("rmboost")


class Error(Exception):
    """A failure of the engine: a bad setting, a file, a fatal backend error, a failed example.

    ``kind`` is a stable snake_case name (``config``, ``io``, ``parse``, ``model``,
    ``unusable``, or the backend's: ``rate_limited``, ``timeout``, ``authentication``,
    ``fatal`` ...); ``example_id`` names the example where there is one; ``message`` is the
    whole chain of causes on one line (never a key).
    """

    def __init__(self, message: str, kind: str, example_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.example_id = example_id

    def __repr__(self) -> str:
        return f"rmboost.Error(kind={self.kind!r}, example_id={self.example_id!r}, message={self.message!r})"


class RetryableError(Exception):
    """Raise from a backend of your own: this call may succeed if sent again.

    The retry layer waits (``retry_after`` seconds when given, else with backoff) and tries
    again; after the last attempt the example fails and a rerun tries it again.
    """

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(RetryableError):
    """Raise from a backend of your own when the model server said "slow down" (HTTP 429).

    Besides being retried, it tells the adaptive limit on calls in flight that there is
    congestion, as a 429 from an HTTP backend does.
    """


class ExampleError(Exception):
    """Raise from a backend of your own: this example fails (written to the failure ledger by
    :meth:`Generator.run`), the run goes on."""


class FatalError(Exception):
    """Raise from a backend of your own: stop the run (what any other exception does too)."""


def _classify(exc: BaseException) -> tuple[str, str, float | None]:
    """The crate's kind of a backend's exception: (kind, message, retry_after)."""
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, RateLimitedError):
        return "rate_limited", message, exc.retry_after
    if isinstance(exc, RetryableError):
        return "retryable", message, exc.retry_after
    if isinstance(exc, TimeoutError):
        return "timeout", message, None
    if isinstance(exc, ConnectionError):
        return "connection", message, None
    if isinstance(exc, ExampleError):
        return "example", message, None
    return "fatal", message, None


def _call_async(backend: Any, messages: list, params: dict, loop: asyncio.AbstractEventLoop, done: Any) -> Any:
    """Schedules ``backend.complete`` on ``loop`` (a running loop in another thread) and
    calls ``done(future)`` when it ends. Returns the future (the engine cancels it when the
    example is dropped)."""
    future = asyncio.run_coroutine_threadsafe(backend.complete(messages, **params), loop)
    future.add_done_callback(done)
    return future


_background: tuple[int, asyncio.AbstractEventLoop] | None = None
_background_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    """An event loop running in a daemon thread, for ``async def`` backends driven from
    synchronous code (:meth:`Generator.generate`, :meth:`Generator.run`). One per process: a
    forked child makes its own."""
    global _background
    with _background_lock:
        if _background is None or _background[0] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="rmboost-asyncio", daemon=True).start()
            _background = (os.getpid(), loop)
        return _background[1]


def _lines(prompts: Iterable[str | Mapping[str, Any]]) -> Iterator[str]:
    """Prompts as the engine reads them: one JSON object per item. Errors name the item as
    the engine's do, ``prompts:N`` with N from 1."""
    if isinstance(prompts, (str, bytes, Mapping)):
        raise TypeError("prompts must be an iterable of prompts (str or dict), not a single prompt")
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            yield json.dumps({"prompt": prompt})
        elif isinstance(prompt, Mapping):
            try:
                yield json.dumps(dict(prompt))
            except (TypeError, ValueError) as e:
                raise TypeError(f"prompts:{index + 1}: not JSON-serialisable: {e}") from None
        else:
            raise TypeError(f"prompts:{index + 1}: expected str or dict, got {type(prompt).__name__}")


class Generator:
    """RMBoost (or a baseline of the paper) over one backend.

    Every keyword has the Rust crate's default (and the ``rmboost generate`` flag's):

    - ``method``: ``"rmboost"``, or a baseline: ``"rlcd"``, ``"rlaif"``, ``"west-of-n"``.
    - ``aspects``: a preset (``"general"``, ``"qa"``, ``"ultrafeedback"``,
      ``"summarization"``), a JSON file's path, or your own: a list of ``(name, definition)``
      pairs or ``{"name": ..., "definition": ...}`` dicts. ``aspect_sampling``: ``"all"``,
      ``"K"``, ``"MIN-MAX"`` or ``"model-picks[:K]"``.
    - ``labels``: ``"bernoulli"`` (better with probability ``p_better``) or ``"graded"``
      (also "slightly"/"much", with a margin).
    - ``seed``: every draw of an example comes from it and the example's id, so a rerun, a
      resume or another concurrency makes the same rows.
    - ``concurrency``: examples in flight; for an HTTP backend also the cap of the adaptive
      limit on calls in flight (``adaptive=False`` fixes it there).
    - ``retries``: retries of a failed call (HTTP and Python backends); ``requests_per_minute``
      and ``tokens_per_minute``: a client-side rate limit.
    - ``format``: ``"conversational"`` (TRL's chat columns) or ``"standard"`` (plain text);
      ``order``: ``"completion"`` or ``"input"``.
    - ``errors``: what :meth:`generate` does with an example that failed (its calls failed
      after the retries, or the answers stayed unusable): ``"skip"`` it (logged on the
      ``rmboost`` logger, counted in :attr:`failed`) or ``"raise"`` :class:`Error`. Fatal errors
      (a bad key, a missing model, :class:`FatalError`) always raise.

    :raises Error: ``kind="config"`` for a setting out of range, naming it.
    """

    def __init__(
        self,
        backend: Any,
        *,
        method: str = "rmboost",
        aspects: str | os.PathLike[str] | Iterable[tuple[str, str] | Mapping[str, str]] = "general",
        aspect_sampling: str | None = None,
        labels: str = "bernoulli",
        p_better: float = 0.5,
        seed: int = 0,
        concurrency: int = 8,
        order: str = "completion",
        format: str = "conversational",
        temperature: float = 0.7,
        max_tokens: int | None = None,
        max_reasks: int = 3,
        samples: int = 4,
        retries: int = 5,
        adaptive: bool = True,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        errors: str = "skip",
    ) -> None:
        self._settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if errors not in ("skip", "raise"):
            raise ValueError(f"errors must be 'skip' or 'raise', not {errors!r}")
        if isinstance(aspects, os.PathLike):
            aspects = os.fspath(aspects)
        if not isinstance(aspects, str):
            aspects = [_aspect(i, a) for i, a in enumerate(aspects)]
        self._is_async = _is_async_backend(backend)
        self._engine = _Engine(
            backend,
            method=method,
            aspects=aspects,
            aspect_sampling=aspect_sampling,
            labels=labels,
            p_better=p_better,
            seed=seed,
            concurrency=concurrency,
            order=order,
            format=format,
            temperature=temperature,
            max_tokens=max_tokens,
            max_reasks=max_reasks,
            samples=samples,
            retries=retries,
            adaptive=adaptive,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )
        self._errors = errors
        self.failed = 0
        """Examples that failed (and were skipped) in the last :meth:`generate` or
        :meth:`agenerate`."""

    def __repr__(self) -> str:
        return f"rmboost.Generator({self._engine.describe()})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles as its settings (the backend pickles as its own), so that `datasets` can
        # hash the function that yields the rows, and a worker process can make its own.
        settings = dict(self._settings)
        backend = settings.pop("backend")
        return (_make_generator, (backend, settings))

    def generate(self, prompts: Iterable[str | Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        """Generates one row per prompt, as dicts, while the engine works on the next ones.

        ``prompts`` is any iterable (read lazily, only as fast as the engine takes them) of
        strings or dicts ``{"id": ..., "prompt": ...}`` / ``{"id": ..., "messages": [...]}``
        (``id`` optional; other keys are carried into ``metadata["input"]``). Rows come in
        completion order unless ``order="input"``. The GIL is released while the engine
        works; Ctrl-C raises :class:`KeyboardInterrupt` within a tenth of a second and stops
        the calls in flight. Closing the iterator (or leaving a ``for`` loop early) stops them
        too.

        :raises Error: for a fatal error, a bad prompt (``kind="parse"``, naming the item), or
            a failed example with ``errors="raise"``.
        """
        loop = _background_loop() if self._is_async else None
        stream = self._engine.stream(_lines(prompts), loop)
        self.failed = 0
        try:
            while True:
                item = stream.next()
                if item is None:
                    return
                if isinstance(item, Error):
                    self._failed(item)
                    continue
                yield json.loads(item)
        finally:
            stream.close()

    async def agenerate(self, prompts: Iterable[str | Mapping[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        """As :meth:`generate`, for ``async for`` inside a running event loop (a notebook,
        an async application). An ``async def`` backend's calls run on this loop."""
        loop = asyncio.get_running_loop()
        stream = self._engine.stream(_lines(prompts), loop if self._is_async else None)
        self.failed = 0
        try:
            while True:
                item = await loop.run_in_executor(None, stream.next)
                if item is None:
                    return
                if isinstance(item, Error):
                    self._failed(item)
                    continue
                yield json.loads(item)
        finally:
            stream.close()

    def _failed(self, error: Error) -> None:
        if self._errors == "raise":
            raise error
        self.failed += 1
        _log.warning("example %s failed: %s", error.example_id, error.message)

    def run(
        self,
        input: str | os.PathLike[str],
        output: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        limit: int | None = None,
        shard: str | None = None,
        ledger: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        on_bad_line: str = "skip",
        price_input: float | None = None,
        price_output: float | None = None,
        max_cost: float | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Runs the generation from the JSONL file ``input`` into the JSONL file ``output``,
        as ``rmboost generate`` does: crash-safe (whole lines only), resumable (a rerun
        skips finished ids and retries the failed ones, listed in ``OUTPUT.failures.jsonl``
        or ``ledger``), and refusing to mix rows made with other settings (recorded in
        ``OUTPUT.run.json``). ``shard="I/N"`` takes every N-th id; ``limit`` stops after
        that many prompts; ``cache_dir`` keeps every answer in a response cache there, so a
        rerun after a crash pays only for the calls it had not finished. With ``max_cost`` (and
        ``price_input``/``price_output``, per million tokens) the run takes no new prompt once
        the calls that reached the backend cost that much (``outcome="cost_limit"``; the
        summary's ``cost``). ``on_bad_line="stop"`` stops at the first bad input line instead
        of skipping it. ``progress`` shows a bar (tqdm).

        Ctrl-C stops taking prompts, lets the calls in flight finish (a few seconds at most),
        then raises :class:`KeyboardInterrupt`: the file holds whole lines and a rerun
        resumes.

        Returns the summary: ``outcome`` (``"completed"``, ``"limit_reached"``,
        ``"unreachable"`` ...), ``examples`` written, ``better``, ``failed`` (and
        ``failures`` by kind), ``skipped_done``, ``bad_lines``, ``calls``, tokens, ``cost``
        (with a budget), ``elapsed_secs`` and ``examples_per_sec``.

        :raises Error: if a file cannot be used (``kind="io"``, ``"config"``), or a fatal
            error stops the run; the rows written so far stay.
        """
        loop = _background_loop() if self._is_async else None
        handle = self._engine.run(
            os.fspath(input),
            os.fspath(output),
            overwrite=overwrite,
            limit=limit,
            shard=shard,
            ledger=None if ledger is None else os.fspath(ledger),
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            on_bad_line=on_bad_line,
            price_input=price_input,
            price_output=price_output,
            max_cost=max_cost,
            event_loop=loop,
        )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="rmboost", unit="ex", total=handle.expected())
        try:
            done = 0
            while not handle.wait(0.1):
                if bar is not None:
                    now = handle.progress()
                    bar.update(now - done)
                    done = now
        except KeyboardInterrupt:
            handle.stop()
            while not handle.wait(0.1):
                pass
            raise
        finally:
            if bar is not None:
                bar.update(handle.progress() - done)
                bar.close()
        return handle.summary()


def _make_generator(backend: Any, settings: dict[str, Any]) -> Generator:
    return Generator(backend, **settings)


def _is_async_backend(backend: Any) -> bool:
    if isinstance(backend, (OpenAI, Anthropic, Local)):
        return False
    complete = getattr(backend, "complete", None)
    if not callable(complete):
        raise TypeError(
            "a backend is rmboost.OpenAI, rmboost.Anthropic, rmboost.Local, or an object with a "
            f"complete(messages, **params) method; got {type(backend).__name__}"
        )
    return inspect.iscoroutinefunction(complete)


def _aspect(index: int, aspect: Any) -> tuple[str, str]:
    if isinstance(aspect, Mapping):
        try:
            return str(aspect["name"]), str(aspect["definition"])
        except KeyError as e:
            raise TypeError(f"aspects[{index}]: missing key {e}") from None
    if isinstance(aspect, tuple) and len(aspect) == 2:
        return str(aspect[0]), str(aspect[1])
    raise TypeError(f"aspects[{index}]: expected a (name, definition) pair or a dict with them")


def report(path: str | os.PathLike[str], *, ledger: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The quality report of a dataset (JSONL of rows): label balance, length bias,
    near-identical pairs, lexical diversity, aspects, calls and tokens, and failures when the
    run's failure ledger is given. As ``rmboost report --json``.

    :raises Error: if a file cannot be read, or a line is not a row (naming file and line).
    """
    return json.loads(_report(os.fspath(path), None if ledger is None else os.fspath(ledger)))
