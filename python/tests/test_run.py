"""``Generator.run``: a JSONL file in, a crash-safe, resumable JSONL file out; and ``report``."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import rmboost
from support import answer_for, last_user, read_jsonl, second_and_first, write_prompts


def generator(server, **settings):
    return rmboost.Generator(rmboost.OpenAI(model="test-model", base_url=server.base_url), **settings)


def test_run_writes_the_file_and_resumes(server, prompts_file, tmp_path):
    path, prompts = prompts_file
    out = tmp_path / "pairs.jsonl"
    summary = generator(server, seed=7, concurrency=8).run(path, out, progress=False)

    assert summary["outcome"] == "completed", summary
    assert summary["examples"] == len(prompts), summary
    assert summary["failed"] == 0 and summary["skipped_done"] == 0, summary
    assert summary["better"] + summary["worse"] == len(prompts), summary
    assert summary["calls"] == 2 * len(prompts), summary
    assert summary["examples_per_sec"] > 0 and summary["elapsed_secs"] > 0, summary
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == [p["id"] for p in prompts]
    for row in rows:
        second, first = second_and_first(row)
        assert first.startswith("answer ") and second.startswith("rewrite "), row
        assert row["metadata"]["input"] == {"topic": next(p["topic"] for p in prompts if p["id"] == row["id"])}
        assert row["metadata"]["seed"] == 7
    labels = Counter(r["label"] for r in rows)
    assert labels["better"] == summary["better"], (labels, summary)

    # The recipe of the run, beside the output.
    recipe_path = tmp_path / "pairs.run.json"
    assert recipe_path.is_file(), sorted(p.name for p in tmp_path.iterdir())
    recipe = json.loads(recipe_path.read_text())
    assert "7" in json.dumps(recipe), recipe  # the seed is part of it

    # A rerun skips every finished id and appends nothing.
    before = out.read_bytes()
    requests = server.requests()
    again = generator(server, seed=7, concurrency=8).run(path, out, progress=False)
    assert again["outcome"] == "completed", again
    assert again["skipped_done"] == len(prompts), again
    assert again["examples"] == 0, again
    assert out.read_bytes() == before
    assert server.requests() == requests, "a rerun of a finished run made calls"

    # A rerun with another seed would mix rows of two recipes: refused.
    with pytest.raises(rmboost.Error) as info:
        generator(server, seed=8).run(path, out, progress=False)
    assert info.value.kind == "config", repr(info.value)
    assert out.read_bytes() == before

    # overwrite=True starts afresh with the new settings.
    fresh = generator(server, seed=8).run(path, out, overwrite=True, progress=False)
    assert fresh["examples"] == len(prompts), fresh
    assert {r["metadata"]["seed"] for r in read_jsonl(out)} == {8}


def test_run_with_progress_bar_and_limit(server, prompts_file, tmp_path, capsys):
    path, prompts = prompts_file
    out = tmp_path / "limited.jsonl"
    summary = generator(server, seed=1).run(str(path), str(out), limit=5)
    assert summary["examples"] == 5, summary
    assert summary["outcome"] in ("limit_reached", "completed"), summary
    assert len(read_jsonl(out)) == 5
    err = capsys.readouterr().err
    assert "rmboost" in err, "the progress bar (tqdm) writes to stderr"
    # The rest on a rerun without the limit.
    rest = generator(server, seed=1).run(path, out, progress=False)
    assert rest["examples"] == len(prompts) - 5 and rest["skipped_done"] == 5, rest
    assert sorted(r["id"] for r in read_jsonl(out)) == [p["id"] for p in prompts]


class FlakyOnce:
    """Fails the example of prompt ``poison`` with ExampleError while ``broken``."""

    def __init__(self, poison: str) -> None:
        self.poison = poison
        self.broken = True

    def complete(self, messages, **params):
        if self.broken and last_user(messages) == self.poison:
            raise rmboost.ExampleError("not today")
        return answer_for(messages, params.get("seed", 0))


def test_failed_example_goes_to_the_ledger_and_a_rerun_retries_it(tmp_path):
    path = tmp_path / "prompts.jsonl"
    prompts = write_prompts(path, 8)
    poison = prompts[4]
    backend = FlakyOnce(poison["prompt"])
    out = tmp_path / "out.jsonl"
    summary = rmboost.Generator(backend, seed=2).run(path, out, progress=False)
    assert summary["examples"] == 7 and summary["failed"] == 1, summary
    assert sum(summary["failures"].values()) == 1, summary
    ledger = tmp_path / "out.failures.jsonl"
    assert ledger.is_file()
    assert poison["id"] in ledger.read_text()
    assert poison["id"] not in {r["id"] for r in read_jsonl(out)}
    report = rmboost.report(out, ledger=ledger)
    assert report["examples"] == 7
    assert report["failures"]["failed"] == 1 and sum(report["failures"]["by_kind"].values()) == 1, report["failures"]

    backend.broken = False
    again = rmboost.Generator(backend, seed=2).run(path, out, progress=False)
    assert again["examples"] == 1 and again["skipped_done"] == 7 and again["failed"] == 0, again
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == [p["id"] for p in prompts]
    # Nothing failing any more: the ledger no longer lists the id (compacted, or removed).
    assert not ledger.exists() or poison["id"] not in ledger.read_text()
    assert rmboost.report(out)["examples"] == 8


def test_report(server, prompts_file, tmp_path):
    path, prompts = prompts_file
    out = tmp_path / "pairs.jsonl"
    generator(server, seed=3).run(path, out, progress=False)
    rows = read_jsonl(out)
    report = rmboost.report(out)
    assert report["examples"] == len(prompts)
    better = sum(r["label"] == "better" for r in rows)
    assert report["labels"]["better"] == better, report["labels"]
    assert report["labels"]["worse"] == len(prompts) - better, report["labels"]
    assert report["labels"]["better_share"] == pytest.approx(better / len(prompts))
    assert report["duplicate_ids"] == 0
    assert report["methods"] == {"rmboost": len(prompts)}
    assert sum(report["aspects"].values()) == sum(len(r["aspects"]) for r in rows)


def test_report_of_a_bad_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(rmboost.Error) as info:
        rmboost.report(bad)
    assert "bad.jsonl" in info.value.message and "1" in info.value.message, info.value.message
    with pytest.raises(rmboost.Error) as info:
        rmboost.report(tmp_path / "missing.jsonl")
    assert info.value.kind == "io", repr(info.value)


def test_run_with_a_missing_input_is_an_io_error(server, tmp_path):
    with pytest.raises(rmboost.Error) as info:
        generator(server).run(tmp_path / "nope.jsonl", tmp_path / "out.jsonl", progress=False)
    assert info.value.kind == "io", repr(info.value)
    assert "nope.jsonl" in info.value.message


def test_run_refuses_input_as_output(server, prompts_file):
    path, _ = prompts_file
    before = path.read_bytes()
    with pytest.raises(rmboost.Error):
        generator(server).run(path, path, progress=False)
    assert path.read_bytes() == before


class AsyncEcho:
    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, messages, **params):
        import asyncio

        self.calls += 1
        await asyncio.sleep(0.005)
        return answer_for(messages, params.get("seed", 0))


def test_run_with_an_async_backend(prompts_file, tmp_path):
    path, prompts = prompts_file
    out = tmp_path / "async.jsonl"
    backend = AsyncEcho()
    summary = rmboost.Generator(backend, seed=5, concurrency=8).run(path, out, progress=False)
    assert summary["outcome"] == "completed" and summary["examples"] == len(prompts), summary
    assert backend.calls == 2 * len(prompts)
    assert sorted(r["id"] for r in read_jsonl(out)) == [p["id"] for p in prompts]


def test_run_cache_dir_answers_a_rerun_from_the_cache(server, prompts_file, tmp_path):
    path, prompts = prompts_file
    out, cache = tmp_path / "cached.jsonl", tmp_path / "cache"
    first = generator(server, seed=6).run(path, out, cache_dir=cache, progress=False)
    assert first["examples"] == len(prompts), first
    rows = read_jsonl(out)
    calls = server.requests()
    assert calls == 2 * len(prompts)
    # The same run afresh: every answer comes from the cache, the rows are the same.
    again = generator(server, seed=6).run(path, out, cache_dir=cache, overwrite=True, progress=False)
    assert again["examples"] == len(prompts), again
    assert server.requests() == calls, "calls were made although every answer was cached"
    key = lambda rows: sorted((r["id"], r["label"], r["chosen"], r["rejected"]) for r in rows)  # noqa: E731
    assert key(read_jsonl(out)) == key(rows)


def test_run_shards_split_the_ids(server, prompts_file, tmp_path):
    path, prompts = prompts_file
    ids = []
    for i in range(2):
        out = tmp_path / f"part{i}.jsonl"
        summary = generator(server, seed=1).run(path, out, shard=f"{i}/2", progress=False)
        part = [r["id"] for r in read_jsonl(out)]
        assert summary["examples"] == len(part) and summary["other_shard"] == len(prompts) - len(part), summary
        assert 0 < len(part) < len(prompts)
        ids += part
    assert sorted(ids) == [p["id"] for p in prompts]


def test_run_stops_taking_prompts_at_the_cost_budget(server, prompts_file, tmp_path):
    path, prompts = prompts_file
    out = tmp_path / "budget.jsonl"
    # $1 per thousand prompt tokens: the first examples' calls cross a budget of 1 cent.
    summary = generator(server, seed=2, concurrency=2).run(
        path, out, price_input=1000.0, max_cost=0.01, progress=False
    )
    assert summary["outcome"] == "cost_limit", summary
    assert 0 < summary["examples"] < len(prompts), summary
    assert summary["cost"] >= 0.01, summary
    assert len(read_jsonl(out)) == summary["examples"]
    with pytest.raises(rmboost.Error) as info:
        generator(server).run(path, tmp_path / "x.jsonl", max_cost=1.0, progress=False)
    assert info.value.kind == "config" and "price_input" in info.value.message, repr(info.value)
