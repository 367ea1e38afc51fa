"""The SD 1.x/2.x adapter at a stated resolution, against ``StableDiffusionPipeline(height=, width=)`` itself.

Exactness: the pipeline runs one step with a DDIM scheduler that records the sample and the guided output it
is handed (``RecordingDDIM``) at a chosen train timestep, from its own seeded latents; the adapter's latent shape
must be that sample's, and its output on that sample the recorded one. Default and identity: no resolution is
the UNet's own, and the digest does not depend on it. A resolution that is not a multiple of the VAE scale is
one line, before any weights load. ``olss-dist evaluate --resolutions`` runs on a tiny SD-1.x run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tiny_sd import tiny_pipeline
from typer.testing import CliRunner

from olss_dist.cli import app
from olss_dist.models import ModelLoadError, StableDiffusionModel, load_model

PROMPTS = ["a red cat", "two dogs 7"]
NEGATIVES = ["", "blurry"]
GUIDANCE_SCALE = 7.5


class RecordingDDIM(DDIMScheduler):
    """DDIM whose single inference step is at ``fixed_timestep``, keeping the sample and model output it is given."""

    fixed_timestep = 999
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        self.timesteps = torch.tensor([self.fixed_timestep], device=device)

    def step(self, model_output, timestep, sample, *args, **kwargs):
        self.recorded.append((sample.detach().clone(), model_output.detach().clone()))
        return super().step(model_output, timestep, sample, *args, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random SD pipeline: 8x8 latents, VAE scale 2 (its own resolution 16x16)."""
    root = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline(root)
    return root / "model"


def pipeline_step(folder, t: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sample, guided output)`` ``StableDiffusionPipeline`` hands its scheduler at train timestep ``t``."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = RecordingDDIM.from_config(pipe.scheduler.config)
    pipe.scheduler.fixed_timestep, pipe.scheduler.recorded = t, []
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=1, height=height, width=width,
         guidance_scale=GUIDANCE_SCALE, output_type="latent", generator=torch.Generator().manual_seed(3))
    (recorded,) = pipe.scheduler.recorded
    return recorded


@pytest.mark.parametrize("resolution, latent", [((16, 24), (4, 8, 12)), (32, (4, 16, 16))])
def test_stated_resolution_equals_the_pipelines_latents_and_guided_output(folder, resolution, latent):
    model = load_model(str(folder), device="cpu", resolution=resolution, guidance_scale=GUIDANCE_SCALE)
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    assert isinstance(model, StableDiffusionModel)
    assert model.resolution == (height, width) and model.latent_shape == latent
    sample, expected = pipeline_step(folder, 700, height, width)
    assert tuple(sample.shape) == (len(PROMPTS), *model.latent_shape)  # the pipeline's own latent shape
    output = model(sample, 700, model.encode_prompts(PROMPTS, NEGATIVES))
    np.testing.assert_allclose(output.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_default_is_the_unets_own_and_the_digest_ignores_the_resolution(folder):
    own = load_model(str(folder), device="cpu")
    assert own.resolution == (16, 16) and own.latent_shape == (4, 8, 8)
    stated = StableDiffusionModel.from_folder(folder, device="cpu", resolution=(16, 24))
    assert stated.latent_shape == (4, 8, 12) and stated.digest == own.digest
    assert load_model(str(folder), device="cpu", resolution=16).latent_shape == own.latent_shape


@pytest.mark.parametrize("resolution", [17, (16, 25), 0, "32", True])
def test_a_resolution_off_the_vae_scale_is_one_line_before_weights_load(folder, tmp_path, resolution):
    broken = shutil.copytree(folder, tmp_path / "no-weights")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # any load would fail with another error
    with pytest.raises(ModelLoadError, match=r"^resolution: .*\(Stable Diffusion, VAE scale 2\) takes a positive "
                                             r"multiple of 2 pixels") as error:
        load_model(str(broken), device="cpu", resolution=resolution)
    assert "\n" not in str(error.value)



def test_the_jobs_driver_refuses_the_same_resolution_from_the_folders_configs(folder):
    """``check_local_model`` (the job, before Ray starts) applies the adapter's rule from the VAE config alone."""
    from olss_dist.models.loading import check_local_model

    check_local_model(str(folder), (32, 48))
    check_local_model(str(folder), None)
    with pytest.raises(ModelLoadError, match=r"^resolution: .*\(Stable Diffusion, VAE scale 2\) takes a positive "
                                             r"multiple of 2 pixels"):
        check_local_model(str(folder), 17)

def test_the_embedded_model_takes_a_resolution():
    model = load_model("embedded", device="cpu", resolution=64)
    assert model.resolution == (64, 64) and model.latent_shape == (4, 16, 16)
    x = model.initial_noise([0])
    assert x.shape == (1, 4, 16, 16) and model(x, 500, model.encode_prompts(model.default_prompts()[:1])).isfinite().all()


def test_evaluate_at_other_resolutions_on_an_sd_model(folder, tmp_path, monkeypatch):
    from test_evaluate import publish_calibrated_run

    monkeypatch.setenv("OLSS_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model(str(folder), device="cpu", guidance_scale=3.0)
    uri = publish_calibrated_run(model, str(folder), tmp_path / "runs", tmp_path / "prompts.txt", 8, 10, (2,))
    output = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "evaluate", "--model", str(folder), "--artifact", uri, "--num-samples", "2", "--steps", "2",
        "--resolutions", "16,16x24", "--output", str(output),
    ], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name, resolution in (("16x16", [16, 16]), ("16x24", [16, 24])):
        info = json.loads((output / name / "evaluation.json").read_text())["info"]
        assert info["model"]["resolution"] == resolution and info["conditions"]["resolution"] == resolution
    assert (output / "conditions.md").is_file()
