"""Tiny random-weight SD3 and Flux pipelines through the whole job: ``jobs/calibrate.py`` on a local Ray
publishes a run, ``OLSSScheduler.from_pretrained(<run>)`` drives the family's diffusers pipeline (loaded
from the same folder) to a finite image, and the artifact says what it was calibrated at (resolution, the
flow process, Flux's mu). Bad input (an unsupported family, a resolution the model cannot take, one that
is no resolution) is one ``error:`` line, exit status 1 and nothing published.

Each job runs in a subprocess that starts its own local Ray (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, two
CPUs: one worker and one for planning), as tests/test_job_submit.py's local jobs do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from olss_dist.scheduler import OLSSScheduler

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300
PROMPT = "a tiny red square"
GUIDANCE_SCALE = 7.5  # the job's default, which the runs are calibrated at


def job_env() -> dict[str, str]:
    """The job's environment: a local Ray on loopback, no usage stats, passive OpenMP threads."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", OMP_WAIT_POLICY="PASSIVE")
    return env


# 6 fit, 2 held out: the job's work stays small (the folders' default prompts are 24)
PROMPTS = ["a tiny red square", "a blue circle", "a green line", "a yellow dot", "an orange cross", "a purple ring",
           "a black star", "a white box"]


def calibrate(output: Path, model: Path | str, *options: str) -> subprocess.CompletedProcess:
    """``python jobs/calibrate.py`` at N=40, K in {4, 6}, on ``PROMPTS`` in shards of 4, no start plans, on a
    2-CPU local Ray."""
    prompts = output.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    command = [
        sys.executable, "jobs/calibrate.py", "--output", str(output), "--model", str(model), "--teacher-steps", "40",
        "--steps", "4,6", "--prompts", str(prompts), "--shard-size", "4", "--device", "cpu", "--local-cpus", "2",
        "--img2img-strengths", "none", "--quiet", *options,
    ]  # no start plans: they are not under test here (tests/test_start_plans.py)
    return subprocess.run(command, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def published_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("manifest.json"))


def assert_one_error_line(result: subprocess.CompletedProcess, fragment: str, output: Path) -> None:
    """Exit status 1, exactly one ``error:`` line, naming ``fragment``, last on stderr; nothing published."""
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0], "the error line comes last"
    assert not (output.is_dir() and published_runs(output))


def published_run(result: subprocess.CompletedProcess, output: Path) -> Path:
    """The one run the job published (its folder), checked against the URI it printed."""
    assert result.returncode == 0, result.stderr[-3000:]
    runs = published_runs(output)
    assert len(runs) == 1
    assert result.stdout.strip().splitlines()[-1].endswith(runs[0].name)
    return runs[0]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> Path:
    from tiny_flow import tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("sd3")
    tiny_sd3_pipeline(root)
    return root / "model"


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    from tiny_flow import tiny_flux_pipeline

    root = tmp_path_factory.mktemp("flux")
    tiny_flux_pipeline(root)
    return root / "model"


def check_artifact(run: Path, resolution: list[int], planned=(4, 6)) -> dict:
    """The manifest, report and scheduler config name the flow process and the resolution; returns the config."""
    manifest = json.loads((run / "manifest.json").read_text())
    report = json.loads((run / "report.json").read_text())
    config = json.loads((run / "scheduler_config.json").read_text())
    assert "plans" not in config  # the plans have their own file beside it
    config["plans"] = json.loads((run / "olss_plans.json").read_text())["plans"]
    assert manifest["resolution"] == resolution and report["model"]["resolution"] == resolution
    assert manifest["noise_process"]["kind"] == "flow"
    assert manifest["teacher_steps"] == 40 and manifest["planned_step_counts"] == list(planned)
    # The flow process by name: flow prediction and the model's own shift (no VP keys to read it from).
    assert config["_class_name"] == "OLSSScheduler" and config["prediction_type"] == "flow_prediction"
    assert config["shift"] == 3.0
    assert sorted(p["num_steps"] for p in config["plans"] if not p.get("start_step")) == list(planned)
    return {"manifest": manifest, "report": report, "config": config}


def run_pipeline(pipeline_class, folder: Path, run: Path, height: int, width: int) -> tuple[np.ndarray, OLSSScheduler]:
    """The family's pipeline from ``folder`` with the published scheduler, 4 steps, one image (H, W, 3) in [0, 1]."""
    scheduler = OLSSScheduler.from_pretrained(str(run))
    assert scheduler.is_flow
    pipe = pipeline_class.from_pretrained(folder, scheduler=scheduler)
    images = pipe(
        PROMPT, num_inference_steps=4, height=height, width=width, output_type="np", max_sequence_length=16,
        guidance_scale=GUIDANCE_SCALE, generator=torch.Generator().manual_seed(0),
    ).images
    return np.asarray(images[0]), pipe.scheduler


@pytest.mark.slow
def test_sd3_job_publishes_a_scheduler_that_drives_the_sd3_pipeline(sd3_folder, tmp_path):
    """Default resolution (the transformer's own 16x16): recorded in the manifest although not stated."""
    from diffusers import StableDiffusion3Pipeline

    output = tmp_path / "registry"
    run = published_run(calibrate(output, sd3_folder), output)
    artifact = check_artifact(run, [16, 16])
    assert "resolution" not in artifact["manifest"]["config"]  # not stated: the identity is as before
    assert artifact["manifest"]["noise_process"]["mu"] is None and artifact["config"].get("mu") is None

    image, scheduler = run_pipeline(StableDiffusion3Pipeline, sd3_folder, run, 16, 16)
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()
    shipped = next(p for p in artifact["config"]["plans"] if p["num_steps"] == 4)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), np.asarray(shipped["timesteps"], dtype=np.float32))


@pytest.mark.slow
def test_flux_job_at_a_stated_resolution_records_its_mu_and_drives_the_flux_pipeline(flux_folder, tmp_path):
    """``--resolution 24x32``: the workers' latents and mu follow it; the artifact records both, and
    FluxPipeline at that size passes the same mu (no warning) and gives a finite image."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from olss_dist.apps.evaluate import SHIPPED_LABEL, run_evaluation
    from olss_dist.models import load_model

    output = tmp_path / "registry"
    run = published_run(calibrate(output, flux_folder, "--resolution", "24x32"), output)
    artifact = check_artifact(run, [24, 32])
    assert artifact["manifest"]["config"]["resolution"] == [24, 32]

    # The adapter's mu at 24x32 (VAE scale 2, 2x2 packing: 6x8 = 48 image tokens) is what the run recorded.
    scheduler_config = json.loads((flux_folder / "scheduler" / "scheduler_config.json").read_text())
    expected_mu = calculate_shift(48, scheduler_config["base_image_seq_len"], scheduler_config["max_image_seq_len"],
                                  scheduler_config["base_shift"], scheduler_config["max_shift"])
    model = load_model(str(flux_folder), device="cpu", resolution=(24, 32))
    assert model.mu == pytest.approx(expected_mu, abs=1e-12)
    default_mu = load_model(str(flux_folder), device="cpu").mu
    assert abs(default_mu - model.mu) > 1e-3, "the stated resolution must change mu for the test to mean anything"
    assert artifact["manifest"]["noise_process"]["mu"] == pytest.approx(model.mu, abs=1e-12)
    assert artifact["config"]["mu"] == pytest.approx(model.mu, abs=1e-12)
    assert artifact["config"]["use_dynamic_shifting"] is True

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, scheduler = run_pipeline(FluxPipeline, flux_folder, run, 24, 32)
    # FluxPipeline at 24x32 passes the calibration's own mu and its default sigmas: the scheduler has no complaint.
    assert not [w for w in caught if str(w.message).startswith(("mu:", "sigmas:"))]
    assert image.shape == (24, 32, 3) and np.isfinite(image).all()
    shipped = next(p for p in artifact["config"]["plans"] if p["num_steps"] == 4)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), np.asarray(shipped["timesteps"], dtype=np.float32))

    # olss-dist evaluate loads the model at the run's resolution (else its mu, hence its teacher, would differ).
    evaluation = run_evaluation(str(flux_folder), str(run), steps=[4], num_samples=2, device="cpu")
    assert evaluation.info["model"]["resolution"] == [24, 32]
    shipped_result = next(r for r in evaluation.results if r.label == SHIPPED_LABEL)
    assert np.isfinite(shipped_result.rmse)
    assert all(images.shape[1:] == (24, 32, 3) for images in evaluation.images[4].values())


def test_a_resolution_the_model_cannot_take_is_one_error_line(sd3_folder, tmp_path):
    output = tmp_path / "registry"
    result = calibrate(output, sd3_folder, "--resolution", "33", "--num-workers", "1")
    assert_one_error_line(result, "resolution", output)
    assert "(SD3, VAE scale" in result.stderr and "patch" in result.stderr  # the multiple, from the folder's configs
    assert "worker failed to start" not in result.stderr, "a local folder's resolution is checked before any worker starts"


def test_a_folder_of_an_unsupported_family_is_one_error_line(tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    index = {"_class_name": "KandinskyPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    output = tmp_path / "registry"
    result = calibrate(output, folder)
    assert_one_error_line(result, "KandinskyPipeline", output)
    assert "worker failed to start" not in result.stderr, "a local folder's family is checked before any worker starts"


def test_a_resolution_that_is_not_one_is_one_error_line(tmp_path):
    output = tmp_path / "registry"
    assert_one_error_line(calibrate(output, "analytic", "--resolution", "abc"), "--resolution", output)
