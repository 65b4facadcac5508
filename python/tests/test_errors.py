"""Errors: bad settings, a backend's exceptions, bad prompts."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import rmboost
from support import answer_for, content_id, last_user


def echo_backend():
    class Echo:
        def complete(self, messages, **params):
            return answer_for(messages, params.get("seed", 0))

    return Echo()


class Raising:
    """Answers as the server does, but raises ``exc`` (an instance or a factory called with the
    attempt number) for calls whose last user message is ``poison``."""

    def __init__(self, exc: Any, poison: str = "poison", times: int | None = None) -> None:
        self.exc = exc
        self.poison = poison
        self.times = times
        self.attempts = 0
        self.lock = threading.Lock()

    def complete(self, messages, **params):
        if last_user(messages) == self.poison:
            with self.lock:
                self.attempts += 1
                attempt = self.attempts
            if self.times is None or attempt <= self.times:
                raise self.exc(attempt) if callable(self.exc) and not isinstance(self.exc, BaseException) else self.exc
        return answer_for(messages, params.get("seed", 0))


@pytest.mark.parametrize(
    "settings, names",
    [
        ({"p_better": 2}, "p_better"),
        ({"p_better": -0.1}, "p_better"),
        ({"method": "no-such-method"}, "no-such-method"),
        ({"aspects": "no-such-preset"}, "no-such-preset"),
        ({"labels": "sometimes"}, "sometimes"),
        ({"format": "yaml"}, "yaml"),
        ({"order": "random"}, "random"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
def test_bad_setting_is_a_config_error(settings, names):
    with pytest.raises(rmboost.Error) as info:
        rmboost.Generator(echo_backend(), **settings)
    e = info.value
    assert e.kind == "config", repr(e)
    assert names in e.message, e.message
    assert e.example_id is None
    assert str(e) == e.message


def test_error_classes():
    assert issubclass(rmboost.Error, Exception)
    assert issubclass(rmboost.RateLimitedError, rmboost.RetryableError)
    for cls in (rmboost.RetryableError, rmboost.ExampleError, rmboost.FatalError):
        assert issubclass(cls, Exception)
        assert not issubclass(cls, rmboost.Error)


@pytest.mark.parametrize(
    "exc, text",
    [
        (rmboost.FatalError("the disk is on fire"), "the disk is on fire"),
        (ValueError("a value nobody expected"), "a value nobody expected"),
        (KeyError("missing-key-xyz"), "missing-key-xyz"),
    ],
)
def test_fatal_exception_stops_the_run(exc, text):
    prompts = [f"Fine question {i}" for i in range(10)] + ["poison"] + [f"Late question {i}" for i in range(40)]
    backend = Raising(exc)
    gen = rmboost.Generator(backend, concurrency=2)
    rows = []
    t0 = time.monotonic()
    with pytest.raises(rmboost.Error) as info:
        for row in gen.generate(prompts):
            rows.append(row)
    assert time.monotonic() - t0 < 10
    e = info.value
    assert e.kind == "fatal", repr(e)
    assert text in e.message, e.message
    assert type(exc).__name__ in e.message, e.message
    assert backend.attempts == 1, "a fatal error is not retried"
    assert len(rows) < len(prompts) - 1, "the run went on after a fatal error"


def test_example_error_skips_the_example(caplog):
    prompts = [{"id": f"ok{i}", "prompt": f"Good question {i}"} for i in range(6)]
    prompts.insert(3, {"id": "bad-one", "prompt": "poison"})
    backend = Raising(rmboost.ExampleError("this prompt cannot be answered"))
    gen = rmboost.Generator(backend, concurrency=4)
    with caplog.at_level("WARNING", logger="rmboost"):
        rows = list(gen.generate(prompts))
    assert sorted(r["id"] for r in rows) == sorted(f"ok{i}" for i in range(6))
    assert gen.failed == 1
    warned = [r.getMessage() for r in caplog.records if r.name == "rmboost"]
    assert any("bad-one" in m and "this prompt cannot be answered" in m for m in warned), warned
    assert backend.attempts == 1, "an ExampleError is not retried"
    # failed counts the last generate() only.
    list(gen.generate(prompts[:2]))
    assert gen.failed == 0


def test_example_error_with_errors_raise_names_the_example():
    prompts = [{"id": "ok0", "prompt": "Good question"}, {"id": "bad-one", "prompt": "poison"}]
    gen = rmboost.Generator(Raising(rmboost.ExampleError("this prompt cannot be answered")), errors="raise")
    with pytest.raises(rmboost.Error) as info:
        list(gen.generate(prompts))
    e = info.value
    assert e.example_id == "bad-one", repr(e)
    assert "this prompt cannot be answered" in e.message, e.message
    assert e.kind not in ("config", "fatal"), repr(e)


def test_errors_must_be_skip_or_raise():
    with pytest.raises((ValueError, rmboost.Error)):
        rmboost.Generator(echo_backend(), errors="ignore")


@pytest.mark.parametrize("cls", [rmboost.RetryableError, rmboost.RateLimitedError])
def test_retryable_error_is_retried(cls):
    backend = Raising(lambda attempt: cls(f"busy, attempt {attempt}", retry_after=0.01), times=2)
    gen = rmboost.Generator(backend, seed=1, errors="raise")
    t0 = time.monotonic()
    rows = list(gen.generate(["Fine question", "poison"]))
    assert time.monotonic() - t0 < 10
    assert sorted(r["id"] for r in rows) == sorted(content_id(p) for p in ["Fine question", "poison"])
    # Two failed attempts of the first call, then it and the second call.
    assert backend.attempts == 4, backend.attempts
    poisoned = next(r for r in rows if r["id"] == content_id("poison"))
    assert poisoned["metadata"]["calls"] == 2, "retries are not calls of the example"


def test_retryable_error_past_the_retries_fails_the_example():
    backend = Raising(rmboost.RetryableError("always busy", retry_after=0.001))
    gen = rmboost.Generator(backend, retries=2)
    rows = list(gen.generate(["Fine question", "poison"]))
    assert [r["id"] for r in rows] == [content_id("Fine question")]
    assert gen.failed == 1
    assert backend.attempts == 3, "the call and two retries"


def test_bad_prompt_item_is_a_parse_error_naming_it():
    gen = rmboost.Generator(echo_backend())
    with pytest.raises(rmboost.Error) as info:
        list(gen.generate(["fine", {"id": "no-text", "text": "where is the prompt?"}, "fine too"]))
    e = info.value
    assert e.kind == "parse", repr(e)
    # Names the item: prompts[1] (its index, as the TypeError of a wrong type does) or
    # prompts:2 (its 1-based number, as a file's line is named).
    assert "prompts[1]" in e.message or "prompts:2" in e.message, e.message
    assert "prompt" in e.message, e.message


def test_bad_messages_are_a_parse_error():
    gen = rmboost.Generator(echo_backend())
    bad = {"id": "ends-with-assistant", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(rmboost.Error) as info:
        list(gen.generate([bad]))
    assert info.value.kind == "parse", repr(info.value)
    assert "user" in info.value.message, info.value.message


def test_prompts_of_the_wrong_type():
    gen = rmboost.Generator(echo_backend())
    with pytest.raises(TypeError, match=r"prompts:2: expected str or dict, got int"):
        list(gen.generate(["fine", 42]))
    with pytest.raises(TypeError):
        list(gen.generate("a single string is not a list of prompts"))
