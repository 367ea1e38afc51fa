"""benchmarks/bench_gpu.py in its CPU dry run: the real adapters, teacher and TSQR on tiny random UNets, no Ray
(transformers is not imported by the benchmark, but diffusers imports it when it is installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_gpu", None)


def test_dry_run_measures_both_unets_without_ray(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # an import of Ray during the run fails
    rows = bench.main(["--dry-run", "--teacher-steps", "3", "--target-steps", "6", "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(rows))
    assert [row["model"] for row in rows] == [bench.TINY_SD.name, bench.TINY_SDXL.name]
    for row, size in zip(rows, (bench.TINY_SD, bench.TINY_SDXL)):
        assert row["r_shape"] == [7, 7], "the shard's R factor over 2N+1 columns"
        assert row["check_final_latents_max_abs_diff"] == 0.0, "the bare loop computes what the teacher records"
        assert row["device"] == "cpu" and row["dtype"] == "float32"
        for key in ("ratio", "bare_samples_per_s", "calibrate_samples_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert [shard["batch"] for shard in row["shards"]] == list(size.shard_sizes)
        elements = math.prod(row["latent_shape"])
        assert [shard["trajectory_bytes"] for shard in row["shards"]] == [b * 13 * elements * 4 for b in size.shard_sizes]
        e = row["extrapolation"]
        assert (e["prompts"], e["steps"], e["gpus"]) == (1024, 6, 8)
        assert e["shards_per_gpu"] == math.ceil(1024 / 8 / row["batch"])
        assert e["wall_seconds"] == pytest.approx(e["shards_per_gpu"] * e["shard_seconds"])


def test_the_sdxl_adapter_sees_the_size_ids_the_pipeline_would(bench, tmp_path):
    model = bench.build_model(bench.TINY_SDXL, torch.device("cpu"), torch.float32, 7.5, tmp_path)
    assert model.latent_shape == (4, 8, 8) and model.resolution == (64, 64)
    assert model.add_time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    cond = model.encode_prompts(["a", "b"])
    assert cond.embeddings.shape == (2, 2, 77, 32) and cond.pooled.shape == (2, 2, 16)
    assert torch.equal(cond.embeddings[:, 0], torch.zeros_like(cond.embeddings[:, 0])), "empty negatives zeroed"
    again = model.encode_prompts(["a", "b"])
    assert torch.equal(cond.embeddings, again.embeddings), "the same text, the same random embedding"


def test_without_cuda_the_real_run_is_one_clear_error(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the real run would start")
    with pytest.raises(SystemExit) as exit_:
        bench.main([])
    assert exit_.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--models", "sd3"])


def test_the_full_size_unets_are_sd15_and_sdxl_and_run(bench, tmp_path):
    """The GPU run's own configs, built and called on the meta device (shapes only, no memory): a config error
    shows here, not first on a lent GPU. Parameter counts are those of the published SD 1.5 and SDXL base UNets."""
    for size, parameters in ((bench.SD15, 859_520_964), (bench.SDXL, 2_567_463_684)):
        model = bench.build_model(size, torch.device("meta"), torch.float16, 7.5, tmp_path)
        assert sum(p.numel() for p in model.unet.parameters()) == parameters, size.name
        x = torch.empty((2, *model.latent_shape), device="meta")
        assert model(x, 999, model.encode_prompts(["a", "b"])).shape == x.shape
