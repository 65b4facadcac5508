"""Rows straight into Hugging Face ``datasets`` (``Dataset.from_generator``)."""

from __future__ import annotations

import datasets

import rmboost


def rmboost_rows(base_url: str, prompts: list[str], seed: int):
    """A module-level generator function (datasets hashes and pickles it with its kwargs)."""
    gen = rmboost.Generator(rmboost.OpenAI(model="test-model", base_url=base_url), seed=seed, concurrency=8)
    yield from gen.generate(prompts)


def test_dataset_from_generator(server, tmp_path):
    prompts = [f"Dataset question {i}: what is a lighthouse for?" for i in range(16)]
    ds = datasets.Dataset.from_generator(
        rmboost_rows,
        gen_kwargs={"base_url": server.base_url, "prompts": prompts, "seed": 1},
        cache_dir=str(tmp_path / "hf-cache"),
        keep_in_memory=True,
    )
    assert isinstance(ds, datasets.Dataset)
    assert ds.num_rows == len(prompts)
    assert {"prompt", "chosen", "rejected", "id", "label", "aspects", "metadata"} <= set(ds.column_names)
    assert server.requests() == 2 * len(prompts)
    row = ds[0]
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
    assert set(ds["label"]) <= {"better", "worse"}
    assert len(set(ds["id"])) == len(prompts)
    # TRL's preference columns, as TRL reads them: conversational lists of messages.
    for column in ("prompt", "chosen", "rejected"):
        feature = ds.features[column]
        assert isinstance(feature, (datasets.Sequence, list)), (column, feature)
