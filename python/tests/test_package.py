"""The package as installed: typed, and keys never shown."""

from __future__ import annotations

import importlib.metadata
import inspect
from pathlib import Path

import pytest

import rmboost

SECRET = "sk-test-SUPERSECRET-4242424242"


def test_installed_package_is_typed():
    files = importlib.metadata.files("rmboost")
    assert files, "rmboost's installed files are not listed (installed with pip?)"
    names = {f.as_posix() for f in files}
    for wanted in ("rmboost/py.typed", "rmboost/_rmboost.pyi", "rmboost/__init__.py"):
        assert wanted in names, f"{wanted} is not installed: {sorted(names)}"
        located = Path(next(f for f in files if f.as_posix() == wanted).locate())
        assert located.is_file(), located
    here = Path(rmboost.__file__).resolve().parent
    assert (here / "py.typed").is_file() and (here / "_rmboost.pyi").is_file(), here
    stub = (here / "_rmboost.pyi").read_text()
    for name in ("class OpenAI", "class Anthropic", "class Local", "class _Engine", "def _report"):
        assert name in stub, name


def test_public_names():
    for name in rmboost.__all__:
        assert hasattr(rmboost, name), name
    params = inspect.signature(rmboost.Generator).parameters
    for name in ("method", "aspects", "seed", "concurrency", "order", "format", "errors", "temperature", "max_tokens"):
        assert name in params, name
    assert rmboost.__version__


def test_backend_reprs_never_show_the_key(monkeypatch, server):
    monkeypatch.setenv("RMBOOST_TEST_KEY", SECRET)
    openai = rmboost.OpenAI(model="m", base_url=server.base_url, api_key_env="RMBOOST_TEST_KEY", headers={"x-trace": "t1"})
    anthropic = rmboost.Anthropic(model="m", base_url=server.base_url, api_key_env="RMBOOST_TEST_KEY")
    for backend in (openai, anthropic):
        shown = f"{backend!r} {backend!s}"
        assert SECRET not in shown, shown
        assert "m" in shown
        gen = rmboost.Generator(backend)
        assert SECRET not in repr(gen), repr(gen)
    assert openai.model == "m"
    assert openai.endpoint.startswith(server.base_url), openai.endpoint


def test_http_backends_pickle_as_their_keywords_without_the_key(monkeypatch, server):
    import pickle

    monkeypatch.setenv("RMBOOST_TEST_KEY", SECRET)
    openai = rmboost.OpenAI(model="m", base_url=server.base_url, api_key_env="RMBOOST_TEST_KEY", extra_body={"top_k": 5})
    anthropic = rmboost.Anthropic(model="c", base_url=server.base_url, api_key_env="RMBOOST_TEST_KEY")
    for backend, name in ((openai, "OpenAI"), (anthropic, "Anthropic")):
        data = pickle.dumps(backend)
        assert SECRET.encode() not in data
        copy = pickle.loads(data)
        assert type(copy) is type(backend)
        assert repr(copy) == repr(backend)
        assert repr(backend) == f"rmboost.{name}(model={backend.model!r}, endpoint={backend.endpoint!r})".replace("'", '"')
    assert b"top_k" in pickle.dumps(openai)


def test_a_named_missing_key_is_a_config_error(monkeypatch, server):
    monkeypatch.delenv("RMBOOST_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(rmboost.Error) as info:
        rmboost.OpenAI(model="m", base_url=server.base_url, api_key_env="RMBOOST_TEST_NO_SUCH_KEY")
    assert info.value.kind == "config", repr(info.value)
    assert "RMBOOST_TEST_NO_SUCH_KEY" in info.value.message


def test_errors_never_show_the_key_even_when_the_server_echoes_it(monkeypatch, server):
    monkeypatch.setenv("RMBOOST_TEST_KEY", SECRET)
    server.every = (401, "invalid api key")
    server.echo_key = True
    gen = rmboost.Generator(rmboost.OpenAI(model="m", base_url=server.base_url, api_key_env="RMBOOST_TEST_KEY"))
    with pytest.raises(rmboost.Error) as info:
        list(gen.generate(["Who am I?"]))
    e = info.value
    assert e.kind == "authentication", repr(e)
    shown = f"{e} {e!r} {e.message} {e.args}"
    assert SECRET not in shown, shown
    # The key was sent, to the server it was named for.
    sent = {r["headers"].get("authorization") for r in server.records}
    assert sent == {f"Bearer {SECRET}"}, sent


def test_openai_key_is_not_sent_to_another_server(monkeypatch, server):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    rows = list(rmboost.Generator(rmboost.OpenAI(model="m", base_url=server.base_url)).generate(["Hello there"]))
    assert len(rows) == 1
    for r in server.records:
        assert SECRET not in str(r["headers"]), r["headers"]
