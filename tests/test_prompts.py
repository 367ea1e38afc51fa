"""Prompt reading, deterministic seeds, validation split and sharding."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from olss_dist.prompts import (
    derive_seed,
    make_shards,
    read_prompts,
    records_from_prompts,
    split_validation,
)


def test_text_file_one_prompt_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox\n\n  a blue whale  \nan owl\n")
    records = read_prompts(str(path))
    assert [r.prompt for r in records] == ["a red fox", "a blue whale", "an owl"]
    assert [r.index for r in records] == [0, 1, 2]
    assert all(r.negative_prompt == "" for r in records)


def test_parquet_keeps_given_seeds_and_negative_prompts_and_derives_missing(tmp_path):
    path = tmp_path / "prompts.parquet"
    table = pa.table(
        {
            "prompt": ["a cat", "a dog", "a bird"],
            "negative_prompt": ["blurry", None, "low quality"],
            "seed": pa.array([7, None, 123], type=pa.int64()),
        }
    )
    pq.write_table(table, path)
    records = read_prompts(str(path), base_seed=5)
    assert [r.seed for r in records] == [7, derive_seed(1, "a dog", 5), 123]
    assert [r.negative_prompt for r in records] == ["blurry", "", "low quality"]


def test_fsspec_uri_reads_the_same_as_a_local_path(tmp_path):
    import fsspec

    with fsspec.open("memory://olss-test/prompts.txt", "w") as handle:
        handle.write("one\ntwo\n")
    local = tmp_path / "prompts.txt"
    local.write_text("one\ntwo\n")
    assert read_prompts("memory://olss-test/prompts.txt") == read_prompts(str(local))


def test_seeds_are_deterministic_and_depend_on_base_seed_index_and_text():
    a = records_from_prompts(["x", "y", "x"], base_seed=0)
    b = records_from_prompts(["x", "y", "x"], base_seed=0)
    c = records_from_prompts(["x", "y", "x"], base_seed=1)
    assert a == b
    assert [r.seed for r in a] != [r.seed for r in c]
    assert a[0].seed != a[2].seed, "a repeated prompt must get a fresh seed"
    assert all(0 <= r.seed < 2**32 for r in a + c)


def test_default_prompts_used_when_no_source():
    records = read_prompts(None, default_prompts=["p", "q"])
    assert [r.prompt for r in records] == ["p", "q"]


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda tmp: None, "no prompts"),
        (lambda tmp: str(tmp / "missing.txt"), "cannot read prompts"),
        (lambda tmp: _write(tmp / "empty.txt", "\n\n"), "no prompts"),
        (lambda tmp: _write_parquet(tmp / "noprompt.parquet", {"text": ["a"]}), "no 'prompt' column"),
        (lambda tmp: _write(tmp / "bad.parquet", "not parquet"), "not a readable Parquet"),
    ],
)
def test_bad_sources_raise_one_clear_value_error(tmp_path, make_source, message):
    with pytest.raises(ValueError, match=message):
        read_prompts(make_source(tmp_path))


def test_validation_split_is_stable_disjoint_and_sized():
    records = records_from_prompts([f"prompt {i}" for i in range(40)])
    fit, validation = split_validation(records, 0.25)
    assert len(validation) == 10 and len(fit) == 30
    assert {r.index for r in fit}.isdisjoint(r.index for r in validation)
    assert split_validation(records, 0.25) == (fit, validation)
    assert [r.index for r in fit] == sorted(r.index for r in fit)
    assert max(r.index for r in validation) - min(r.index for r in validation) > 10, "spread, not a tail"


def test_validation_split_edges():
    records = records_from_prompts(["a", "b", "c"])
    assert split_validation(records, 0.0) == (records, [])
    assert len(split_validation(records, 0.01)[1]) == 1
    with pytest.raises(ValueError, match="leaves no prompt"):
        split_validation(records[:1], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_validation(records, 1.0)


def test_shards_cover_records_in_order_and_have_stable_digests():
    records = records_from_prompts([f"p{i}" for i in range(7)])
    shards = make_shards(records, 3)
    assert [len(s.records) for s in shards] == [3, 3, 1]
    assert [r for s in shards for r in s.records] == records
    assert [s.shard_id for s in shards] == [0, 1, 2]
    assert shards[0].digest() == make_shards(records, 3)[0].digest()
    assert shards[0].digest() != shards[1].digest()
    with pytest.raises(ValueError):
        make_shards(records, 0)


def _write(path, text):
    path.write_text(text)
    return str(path)


def _write_parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return str(path)
