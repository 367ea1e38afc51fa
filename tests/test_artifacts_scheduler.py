"""A calibrated OLSSScheduler published to S3 and loaded by URI in one line, inside a StableDiffusionPipeline;
a tampered scheduler config is refused on both bucket stores (``bucket_root``: S3 and GCS)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from core_data import trajectories
from olss_dist import Calibration, OLSSScheduler
from olss_dist.artifacts import ArtifactError, files_from_directory, publish_run
from tiny_sd import tiny_pipeline

STEP_COUNTS = [3, 5]
TEACHER_STEPS = 20


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    states, noise_preds, timesteps = trajectories(num_teacher_steps=TEACHER_STEPS, batch=8)
    return Calibration.from_trajectories(states, noise_preds, timesteps)


def publish_scheduler(root: str, calibration: Calibration, workdir) -> OLSSScheduler:
    plans = [calibration.plan(k) for k in STEP_COUNTS]
    scheduler = OLSSScheduler.from_plans(plans)
    scheduler.save_pretrained(workdir / "scheduler")
    files = {
        **files_from_directory(workdir / "scheduler"),
        "calibration.safetensors": calibration.to_bytes(),
        "plans.json": json.dumps([plan.to_dict() for plan in plans]).encode(),
    }
    publish_run(
        root,
        model_id="tiny/sd",
        model_digest="tinyweights",
        config={"teacher_steps": TEACHER_STEPS, "planned_step_counts": STEP_COUNTS, "samples": 8},
        files=files,
    )
    return scheduler


def sample_latents(pipe: StableDiffusionPipeline, steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe("seven", num_inference_steps=steps, guidance_scale=2.0, output_type="latent", generator=generator).images


def test_pipeline_with_scheduler_loaded_by_uri(s3_root, run_cache, calibration, tmp_path):
    reference = publish_scheduler(s3_root, calibration, tmp_path)
    pipe = tiny_pipeline(tmp_path / "pipe")
    loaded_pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": OLSSScheduler.from_pretrained(f"{s3_root}/tiny--sd")})
    reference_pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": reference})
    for steps in STEP_COUNTS:
        torch.testing.assert_close(sample_latents(loaded_pipe, steps), sample_latents(reference_pipe, steps), rtol=0, atol=0)
    assert any(run_cache.iterdir())  # downloaded into the cache, not read in place


def test_tampered_scheduler_config_is_refused(bucket_root, bucket_fs, run_cache, calibration, tmp_path):
    publish_scheduler(bucket_root, calibration, tmp_path)
    fs = bucket_fs
    [config_path] = fs.glob(f"{bucket_root}/tiny--sd/tinyweights/*/scheduler_config.json")
    config = json.loads(fs.cat_file(config_path))
    config["beta_end"] += 1e-3
    fs.pipe_file(config_path, json.dumps(config).encode())
    with pytest.raises(ArtifactError, match="scheduler_config.json"):
        OLSSScheduler.from_pretrained(f"{bucket_root}/tiny--sd/latest.json")
