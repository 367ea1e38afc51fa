"""LoRA fine-tunes (``--model BASE --lora PATH``) end to end over the embedded model.

Two random rank-2 LoRAs of the embedded UNet's attention are built here (peft, saved with diffusers'
``save_lora_weights`` as safetensors). One goes through ``jobs/calibrate.py`` on a local Ray (N=50, K in
{5, 10}); the published scheduler drives ``StableDiffusionPipeline`` with the LoRA loaded to a finite image,
and a refit of a registry naming both LoRAs skips the calibrated one and would run the other. The model
digest covers base and LoRA; a LoRA that does not fit the base is one ``error:`` line naming ``--lora``,
before Ray starts, with nothing published; a spec without a LoRA keeps the identity it had before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from olss_dist.models.embedded import EMBEDDED_MODEL_PATH, digit_prompt
from olss_dist.models.embedded_lora import LORA_TARGET_MODULES

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 600
PROMPTS = [digit_prompt(d, s) for d in (1, 4, 7) for s in ("thick", "thin", None)]  # 9: 7 fit, 2 held out


def make_lora(folder: Path, seed: int, rank: int = 2, scale: float = 0.3) -> Path:
    """A random rank-``rank`` LoRA of every attention projection of the embedded UNet (shapes read from its
    safetensors header), saved with diffusers' ``save_lora_weights`` as ``pytorch_lora_weights.safetensors``."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    with safe_open(str(EMBEDDED_MODEL_PATH / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as unet:
        for key in sorted(unet.keys()):
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module.endswith(tuple(f".{m}" for m in LORA_TARGET_MODULES)):
                out_features, in_features = unet.get_slice(key).get_shape()
                layers[f"{module}.lora.down.weight"] = scale * torch.randn(rank, in_features, generator=generator)
                layers[f"{module}.lora.up.weight"] = scale * torch.randn(out_features, rank, generator=generator)
    assert len(layers) == 2 * 4 * 8, "q, k, v and out of 8 attention layers (self and cross in 4 blocks)"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: make_lora(root / name, seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def calibrate(output: Path, lora: Path | str, prompts: Path) -> subprocess.CompletedProcess:
    """``python jobs/calibrate.py --model embedded --lora LORA`` at N=50, K in {5, 10}, no start plans, on a
    2-CPU local Ray."""
    command = [
        sys.executable, "jobs/calibrate.py", "--output", str(output), "--model", "embedded", "--lora", str(lora),
        "--prompts", str(prompts), "--teacher-steps", "50", "--steps", "5,10", "--shard-size", "4",
        "--device", "cpu", "--local-cpus", "2", "--img2img-strengths", "none", "--quiet",  # start plans: not under test
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def published_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("manifest.json"))


@pytest.fixture(scope="module")
def lora_run(loras, prompts_file, tmp_path_factory) -> tuple[Path, Path]:
    """``(registry root, run folder)`` of the job over the embedded model with LoRA ``a``."""
    store = tmp_path_factory.mktemp("store")
    result = calibrate(store, loras["a"], prompts_file)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = published_runs(store)
    assert result.stdout.strip().splitlines()[-1].endswith(run.name)
    return store, run


# ------------------------------------------------------------------------------------------- digests


def test_the_digest_covers_base_and_lora_bytes(loras, tmp_path):
    """Two LoRAs of one base: two digests, both unlike the base's; a copy of a LoRA elsewhere is the same LoRA;
    one changed byte is another; the fused network differs from the base."""
    from olss_dist.apps.refit import model_digest
    from olss_dist.models import load_model
    from olss_dist.models.digest import content_digest

    base = load_model("embedded", device="cpu")
    fused = load_model("embedded", device="cpu", lora=str(loras["a"]))
    assert base.digest == content_digest(EMBEDDED_MODEL_PATH)
    assert fused.model_id == f"embedded+lora:{loras['a']}" and fused.digest != base.digest
    assert model_digest("embedded", lora=str(loras["a"])) == fused.digest, "refit identifies what the job publishes"
    assert model_digest("embedded", lora=str(loras["b"])) not in (fused.digest, base.digest)
    copy = tmp_path / "copy" / "weights.safetensors"
    copy.parent.mkdir()
    shutil.copy(loras["a"] / "pytorch_lora_weights.safetensors", copy)
    assert model_digest("embedded", lora=copy.as_uri()) == fused.digest
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    assert model_digest("embedded", lora=str(copy)) != fused.digest
    x = torch.randn(2, *base.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = base.encode_prompts(PROMPTS[:2])
    assert not torch.allclose(fused(x, 500, cond), base(x, 500, cond), atol=1e-4)
    assert all(type(m).__name__ == "Linear" for n, m in fused.unet.named_modules() if n.endswith(".to_q")), "fused"


def test_a_lora_from_a_uri_is_copied_once_and_is_the_same_lora(loras, tmp_path, monkeypatch):
    """A LoRA folder on fsspec storage (memory://, as s3:// would be) is copied to the model cache, once;
    the fused model and its digest are those of the local LoRA; a URI with no LoRA there is one LoraError."""
    import fsspec

    from olss_dist.apps.refit import model_digest
    from olss_dist.models.lora import LoraError, resolve_lora

    monkeypatch.setenv("OLSS_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    memory.pipe("/loras/a/pytorch_lora_weights.safetensors", (loras["a"] / "pytorch_lora_weights.safetensors").read_bytes())
    copy = resolve_lora("memory://loras/a")
    assert copy.is_relative_to(tmp_path / "cache") and resolve_lora("memory://loras/a") == copy
    assert resolve_lora("memory://loras/a/pytorch_lora_weights.safetensors").read_bytes() == copy.read_bytes()
    assert model_digest("embedded", lora="memory://loras/a") == model_digest("embedded", lora=str(loras["a"]))
    memory.pipe("/loras/empty/notes.txt", b"no weights here")
    with pytest.raises(LoraError, match="no pytorch_lora_weights.safetensors there"):
        resolve_lora("memory://loras/empty")


def test_a_spec_without_lora_keeps_its_identity():
    """``lora`` enters the identity (and the command line) only when set: runs published before it keep
    their config digest (the value below is the one this spec had before the field existed)."""
    from olss_dist.spec import CalibrationSpec

    plain = CalibrationSpec(model="embedded", steps=(5, 10, 20), teacher_steps=1000, guidance_scale=7.5,
                            validation_fraction=0.2, seed=0)
    assert "lora" not in plain.identity(None) and "--lora" not in plain.to_arguments()
    assert plain.digest(None) == "4f7490de75b5ebbfccc842fc72e1eebc42c640f35d54454f13a7ee8d15899caa"
    tuned = CalibrationSpec(model="embedded", lora="loras/a")
    assert tuned.identity(None)["lora"] == "loras/a" and tuned.digest(None) != plain.digest(None)
    assert tuned.to_arguments()[-2:] == ["--lora", "loras/a"]


# ------------------------------------------------------------------------------------------- the job


@pytest.mark.slow
def test_a_lora_job_publishes_a_scheduler_that_drives_the_pipeline_with_the_lora(lora_run, loras):
    from diffusers import StableDiffusionPipeline

    from olss_dist.apps.refit import model_digest
    from olss_dist.scheduler import OLSSScheduler

    _, run = lora_run
    manifest = json.loads((run / "manifest.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert manifest["config"]["lora"] == str(loras["a"]) and report["model"]["lora"] == str(loras["a"])
    assert manifest["model"]["id"] == f"embedded+lora:{loras['a']}"
    assert manifest["model"]["digest"] == model_digest("embedded", lora=str(loras["a"]))
    assert manifest["teacher_steps"] == 50 and manifest["planned_step_counts"] == [5, 10]

    scheduler = OLSSScheduler.from_pretrained(str(run))
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_PATH, scheduler=scheduler, safety_checker=None)
    pipe.load_lora_weights(loras["a"])
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "no plan for N steps" fallback
        image = pipe(PROMPTS[0], num_inference_steps=5, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0.01
    assert len(pipe.scheduler.timesteps) == 5


@pytest.mark.slow
def test_refit_skips_the_calibrated_lora_and_would_run_another(lora_run, loras, prompts_file, tmp_path):
    """A registry listing the embedded model with each LoRA (``lora:`` key; ``./b`` is relative to the registry
    file): the calibrated pair is skipped (unchanged LoRA at the location the job named), the other would run."""
    from olss_dist.apps.refit import RefitOptions, refit
    from olss_dist.spec import CalibrationSpec, ExecutionConfig

    store, run = lora_run
    shutil.copytree(loras["b"], tmp_path / "b")
    settings = {"prompts": str(prompts_file), "teacher_steps": 50, "steps": "5,10", "img2img_strengths": "none"}
    registry = tmp_path / "models.yaml"
    registry.write_text(json.dumps({"defaults": settings, "models": [{"uri": "embedded", "lora": str(loras["a"])},
                                                                    {"uri": "embedded", "lora": "./b"}]}))
    options = RefitOptions(ExecutionConfig(output=str(store)), inline=True)
    outcomes = {Path(o.model.split("+lora:")[1]).name: o for o in refit(str(registry), options, CalibrationSpec(), dry_run=True)}
    assert outcomes["a"].status == "skipped", outcomes["a"]
    assert outcomes["a"].model_digest == json.loads((run / "manifest.json").read_text())["model"]["digest"]
    assert outcomes["b"].status == "would-run" and outcomes["b"].model_digest != outcomes["a"].model_digest


# ------------------------------------------------------------------------------------------- bad input


def test_a_lora_that_does_not_fit_is_one_error_line_before_ray(loras, prompts_file, tmp_path, monkeypatch):
    """Wrong shapes (a LoRA trained on a wider model): ``error: --lora: ... does not fit embedded``, exit 1,
    nothing published, and refused before Ray starts (the check reads safetensors headers on the driver)."""
    import ray
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from olss_dist.cli import app
    from olss_dist.distributed import job

    weights = load_file(loras["a"] / "pytorch_lora_weights.safetensors")
    wider = {k: torch.zeros(v.shape[0], v.shape[1] + 8) if ".down." in k else v for k, v in weights.items()}
    (tmp_path / "wide").mkdir()
    save_file(wider, tmp_path / "wide" / "pytorch_lora_weights.safetensors")
    connected = []
    monkeypatch.setattr(job, "connect", lambda *a, **k: connected.append(a))  # a Ray start would be recorded
    output = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "calibrate", "--model", "embedded", "--lora", str(tmp_path / "wide"), "--output", str(output),
        "--prompts", str(prompts_file), "--teacher-steps", "100", "--steps", "5,10", "--quiet",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --lora: ") and "does not fit embedded" in errors[0], errors
    assert "is (96, 96) in the base, the LoRA's factors are (2, 104) (down)" in errors[0], errors
    assert not connected and not ray.is_initialized(), "refused before Ray started"
    assert not (output.exists() and published_runs(output))


@pytest.mark.parametrize("problem", ["no matching module", "pickle", "missing"])
def test_loras_that_cannot_load_are_one_lora_error(loras, tmp_path, problem):
    """In the loader (what every worker runs): a LoRA for modules the base lacks (diffusers would load nothing
    without a word), a pickled file and a missing path are each a ``LoraError`` naming the LoRA."""
    from safetensors.torch import load_file, save_file

    from olss_dist.models import load_model
    from olss_dist.models.lora import LoraError

    if problem == "no matching module":
        weights = load_file(loras["a"] / "pytorch_lora_weights.safetensors")
        lora = tmp_path / "other.safetensors"
        save_file({k.replace("attn1", "attn3"): v for k, v in weights.items()}, lora)
        fragment = "the base has no module unet."
    elif problem == "pickle":
        lora = tmp_path / "pytorch_lora_weights.bin"
        torch.save({}, lora)
        fragment = "not a .safetensors file"
    else:
        lora, fragment = tmp_path / "absent", "no file or folder"
    with pytest.raises(LoraError, match=fragment) as caught:
        load_model("embedded", device="cpu", lora=str(lora))
    assert str(caught.value).startswith("lora: ") and caught.value.argument == "lora"
    with pytest.raises(LoraError, match="no network weights"):
        load_model("analytic", lora=str(loras["a"]))


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_a_lora_fuses_into_the_sdxl_and_sd3_adapters(family, tmp_path):
    """The same loading serves the UNet of an SDXL folder (a pipeline built around the adapter's networks)
    and the transformer of an SD3 folder (the adapter's own pipeline), in peft's key layout: the driver's
    header check passes, the fused output differs from the base's, the digest and id name the LoRA."""
    import diffusers
    from safetensors import safe_open

    from olss_dist.models import load_model
    from olss_dist.models.lora import check_local_lora

    if family == "sdxl":
        from tiny_sdxl import tiny_sdxl_pipeline as build
        component, pipeline_class, argument = "unet", diffusers.StableDiffusionXLPipeline, "unet_lora_layers"
    else:
        from tiny_flow import tiny_sd3_pipeline as build
        component, pipeline_class, argument = "transformer", diffusers.StableDiffusion3Pipeline, "transformer_lora_layers"
    build(tmp_path)
    folder = tmp_path / "model"
    generator = torch.Generator().manual_seed(0)
    layers = {}
    with safe_open(str(folder / component / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        for key in sorted(weights.keys()):
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and module.endswith(tuple(f".{m}" for m in LORA_TARGET_MODULES)):
                out_features, in_features = weights.get_slice(key).get_shape()
                layers[f"{module}.lora_A.weight"] = 0.3 * torch.randn(2, in_features, generator=generator)
                layers[f"{module}.lora_B.weight"] = 0.3 * torch.randn(out_features, 2, generator=generator)
    pipeline_class.save_lora_weights(tmp_path / "lora", **{argument: layers}, safe_serialization=True)
    check_local_lora(str(folder), str(tmp_path / "lora"))
    base = load_model(str(folder), device="cpu")
    fused = load_model(str(folder), device="cpu", lora=str(tmp_path / "lora"))
    assert fused.digest != base.digest and fused.model_id == f"{folder}+lora:{tmp_path / 'lora'}"
    x, cond = base.initial_noise([0, 1]), base.encode_prompts(["a red square", "a cat"])
    assert not torch.allclose(fused(x, 500, cond), base(x, 500, cond), atol=1e-4)


def test_registry_lora_key_is_relative_to_the_registry_and_one_base_may_have_several(tmp_path):
    from olss_dist.apps.refit import parse_registry_document
    from olss_dist.spec import CalibrationSpec

    document = {"models": [{"uri": "embedded", "lora": "./a"}, {"uri": "embedded", "lora": "s3://b/lora"}, "embedded"]}
    specs = parse_registry_document(document, CalibrationSpec(), str(tmp_path), "models.yaml")
    assert [s.lora for s in specs] == [str(tmp_path / "a"), "s3://b/lora", None]
    with pytest.raises(ValueError, match="listed more than once"):
        parse_registry_document({"models": [{"uri": "embedded", "lora": "./a"}] * 2}, CalibrationSpec(), str(tmp_path), "m")
