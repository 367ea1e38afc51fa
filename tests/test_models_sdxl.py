"""The SDXL adapter against ``StableDiffusionXLPipeline`` itself, and a tiny SDXL through the whole job.

Exactness: the pipeline runs one step with a DDIM scheduler that records the guided output it is handed
(``RecordingDDIM``), at a chosen train timestep and initial latent; the adapter must give the same tensor
(ε, or ε from the pipeline's v) for the same prompts: zeroed empty negatives, stated negatives, a stated
resolution (the size ids), guidance 1. Loading: folder, fsspec URI, offline hub cache; the refiner, an
incomplete folder and a bad resolution are one line each. End to end: ``jobs/calibrate.py --teacher-steps 50
--steps 5,10`` publishes a run whose scheduler drives ``StableDiffusionXLPipeline`` to finite images, along
the very path the adapter's own loop over the published plan takes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from olss_dist.models import load_model
from olss_dist.models.common import ModelLoadError, TextConditioning
from olss_dist.models.digest import content_digest
from olss_dist.models.loading import PIPELINES, check_local_model
from olss_dist.models.sdxl import StableDiffusionXLModel
from olss_dist.scheduler import OLSSScheduler

PROMPTS = ["a red fox in snow", "b2 square"]
GUIDANCE_SCALE = 7.5  # the job's default, which the end-to-end run is calibrated at


class RecordingDDIM(DDIMScheduler):
    """DDIM whose single inference step is at ``fixed_timestep``, keeping the model output it is given."""

    fixed_timestep = 999
    recorded: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps, device=None):
        super().set_timesteps(num_inference_steps, device)
        self.timesteps = torch.tensor([self.fixed_timestep], device=device)

    def step(self, model_output, timestep, sample, *args, **kwargs):
        self.recorded.append(model_output.detach().clone())
        return super().step(model_output, timestep, sample, *args, **kwargs)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny_sdxl import tiny_sdxl_pipeline

    variants = {
        "epsilon": dict(prediction_type="epsilon", seed=1),
        "v_prediction": dict(prediction_type="v_prediction", seed=2),
        "zero_snr": dict(prediction_type="v_prediction", seed=3, rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    }
    made = {}
    for name, options in variants.items():
        root = tmp_path_factory.mktemp(f"sdxl-{name}")
        tiny_sdxl_pipeline(root, **options)
        made[name] = root / "model"
    return made


def pipeline_output(folder, x, t, guidance_scale, negative_prompt=None, height=16, width=16, **call):
    """The guided output ``StableDiffusionXLPipeline`` hands its scheduler at train timestep ``t`` from latents ``x``."""
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.scheduler = RecordingDDIM.from_config(pipe.scheduler.config)
    pipe.scheduler.fixed_timestep, pipe.scheduler.recorded = t, []
    pipe.set_progress_bar_config(disable=True)
    pipe(
        prompt=PROMPTS, negative_prompt=negative_prompt, latents=x.clone(), num_inference_steps=1, height=height,
        width=width, guidance_scale=guidance_scale, output_type="latent", **call,
    )
    (recorded,) = pipe.scheduler.recorded
    return recorded


@pytest.mark.parametrize("t", [999, 400])
def test_adapter_equals_the_pipelines_guided_output(folders, t):
    """Default negatives (none: zeros, force_zeros_for_empty_prompt) and stated ones, guidance 7.5."""
    model = load_model(str(folders["epsilon"]), device="cpu", guidance_scale=GUIDANCE_SCALE)
    assert isinstance(model, StableDiffusionXLModel) and model.noise_process.kind == "vp"
    assert model.resolution == (16, 16) and model.latent_shape == (4, 8, 8)
    x = model.initial_noise([3, 4])
    expected = pipeline_output(folders["epsilon"], x, t, GUIDANCE_SCALE)
    cond = model.encode_prompts(PROMPTS)
    assert isinstance(cond, TextConditioning) and cond.embeddings.shape == (2, 2, 16, 32) and cond.pooled.shape == (2, 2, 16)
    assert not cond.embeddings[:, 0].any() and not cond.pooled[:, 0].any(), "an empty negative is zeros, as in the pipeline"
    np.testing.assert_allclose(model(x, t, cond).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)

    negatives = ["blurry", "dark"]
    expected = pipeline_output(folders["epsilon"], x, t, GUIDANCE_SCALE, negative_prompt=negatives)
    # the pooled embeddings differ by 1.2e-7 here (the second text encoder batched otherwise than in the pipeline;
    # transformers 5.24), which the UNet carries to 8e-6 on outputs of scale 0.5: float32 rounding, not a change
    np.testing.assert_allclose(model(x, t, model.encode_prompts(PROMPTS, negatives)).numpy(), expected.numpy(),
                               rtol=1e-5, atol=2e-5)


def test_a_stated_resolution_reaches_the_size_ids(folders):
    """At 16x24 the latents are 8x12 and original_size = target_size = (16, 24): the pipeline's output at
    height 16, width 24; the same latents with other size ids differ (the ids matter to this network)."""
    model = load_model(str(folders["epsilon"]), device="cpu", resolution=(16, 24), guidance_scale=GUIDANCE_SCALE)
    assert model.resolution == (16, 24) and model.latent_shape == (4, 8, 12)
    assert model.add_time_ids.tolist() == [[16.0, 24.0, 0.0, 0.0, 16.0, 24.0]]
    x = model.initial_noise([5, 6])
    output = model(x, 700, model.encode_prompts(PROMPTS)).numpy()
    expected = pipeline_output(folders["epsilon"], x, 700, GUIDANCE_SCALE, height=16, width=24)
    np.testing.assert_allclose(output, expected.numpy(), rtol=1e-5, atol=1e-6)
    other = pipeline_output(folders["epsilon"], x, 700, GUIDANCE_SCALE, height=16, width=24, original_size=(64, 64))
    assert np.abs(other.numpy() - output).max() > 1e-3


def test_v_prediction_is_converted_and_guidance_one_is_conditional(folders):
    """A v model's guided v from the pipeline, as ε = √ᾱ v + √(1−ᾱ) x; guidance 1 runs the conditional branch only."""
    model = load_model(str(folders["v_prediction"]), device="cpu", guidance_scale=1.0)
    assert model.prediction_type == "v_prediction" and model.noise_process.output_type == "epsilon"
    x, t = model.initial_noise([7, 8]), 600
    v = pipeline_output(folders["v_prediction"], x, t, 1.0).double()
    alpha = float(model.alphas_cumprod[t])
    expected = alpha**0.5 * v + (1.0 - alpha) ** 0.5 * x.double()
    np.testing.assert_allclose(model(x, t, model.encode_prompts(PROMPTS)).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_zero_terminal_snr_v_model_returns_the_guided_v(folders):
    """rescale_betas_zero_snr: ᾱ_999 = 0, so the output form is v (contract C1) and the adapter returns the
    pipeline's guided v unconverted, at t = 999 (pure noise) and below."""
    model = load_model(str(folders["zero_snr"]), device="cpu", guidance_scale=GUIDANCE_SCALE)
    assert model.alphas_cumprod[-1] == 0.0 and model.noise_process.output_type == "v_prediction"
    x = model.initial_noise([9, 10])
    cond = model.encode_prompts(PROMPTS)
    for t in (999, 500):
        expected = pipeline_output(folders["zero_snr"], x, t, GUIDANCE_SCALE)
        np.testing.assert_allclose(model(x, t, cond).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_bad_calls_and_inputs_are_clear_errors(folders):
    model = load_model(str(folders["epsilon"]), device="cpu")
    x = model.initial_noise([0])
    with pytest.raises(ValueError, match="TextConditioning"):
        model(x, 10, torch.zeros(1, 2, 16, 32))
    with pytest.raises(ValueError, match="timestep 1000 outside"):
        model(x, 1000, model.encode_prompts(["a"]))
    with pytest.raises(ModelLoadError, match="^resolution: .*SDXL, VAE scale 2") as error:
        load_model(str(folders["epsilon"]), device="cpu", resolution=17)
    assert "\n" not in str(error.value)


def test_refiner_and_incomplete_folders_are_one_line(folders, tmp_path):
    refiner = shutil.copytree(folders["epsilon"], tmp_path / "refiner")
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], tokenizer=[None, None],
                 requires_aesthetics_score=True)
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="is an SDXL refiner .* calibrate the SDXL base model") as error:
        load_model(str(refiner), device="cpu")
    assert "\n" not in str(error.value)
    with pytest.raises(ModelLoadError, match="is an SDXL refiner"):  # what the job checks before Ray starts
        check_local_model(str(refiner))
    incomplete = shutil.copytree(folders["epsilon"], tmp_path / "incomplete")
    shutil.rmtree(incomplete / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="not a complete diffusers SDXL folder: no text_encoder_2/$"):
        load_model(str(incomplete), device="cpu")


def test_uri_and_offline_hub_id_load_the_sdxl_files(folders, tmp_path, monkeypatch):
    import fsspec
    import huggingface_hub.constants

    monkeypatch.setenv("OLSS_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    remote = f"memory://sdxl-{tmp_path.name}/base"
    memory.put(str(folders["epsilon"]), remote, recursive=True)
    memory.pipe(f"{remote}/notes/readme.txt", b"not part of the model")
    try:
        model = load_model(remote, device="cpu")
        assert isinstance(model, StableDiffusionXLModel) and model.digest == content_digest(folders["epsilon"])
        (copy,) = (tmp_path / "cache").glob("*/*")
        assert (copy / "text_encoder_2").is_dir() and (copy / "tokenizer_2").is_dir() and not (copy / "notes").exists()
    finally:
        memory.rm(remote, recursive=True)

    # A hub snapshot in the local cache (HF_HUB_OFFLINE): the layout huggingface_hub writes.
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--tiny-org--tiny-sdxl"
    shutil.copytree(folders["epsilon"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import otherwise
    model = load_model("tiny-org/tiny-sdxl", device="cpu")
    assert isinstance(model, StableDiffusionXLModel) and model.model_id == "tiny-org/tiny-sdxl"
    patterns = PIPELINES["StableDiffusionXLPipeline"].hub_files
    assert "unet/diffusion_pytorch_model.safetensors" in patterns and "text_encoder_2/model.safetensors" in patterns


@pytest.mark.slow
def test_job_publishes_a_scheduler_that_drives_the_sdxl_pipeline(folders, tmp_path):
    """``jobs/calibrate.py --model <folder> --teacher-steps 50 --steps 5,10``; the published scheduler in
    ``StableDiffusionXLPipeline`` gives finite images at 5 and 10 steps, and at 10 steps the pipeline's final
    latent is the adapter's own loop over the published plan (the pipeline conditions as calibrated);
    ``run_evaluation`` scores the run."""
    from test_flow_pipelines_e2e import JOB_TIMEOUT_S, REPO, job_env, published_run

    output, prompts = tmp_path / "registry", tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{color} {shape}" for color in ("red", "blue") for shape in ("dot", "box", "cat", "sun", "bar")))
    command = [
        sys.executable, "jobs/calibrate.py", "--output", str(output), "--model", str(folders["epsilon"]), "--prompts",
        str(prompts), "--teacher-steps", "50", "--steps", "5,10", "--shard-size", "4", "--device", "cpu",
        "--local-cpus", "2", "--img2img-strengths", "0.5", "--quiet",  # start plans kept (one strength): a run with both kinds
    ]
    result = subprocess.run(command, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    run = published_run(result, output)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["resolution"] == [16, 16] and manifest["model"]["digest"] == content_digest(folders["epsilon"])
    assert manifest["teacher_steps"] == 50 and manifest["planned_step_counts"] == [5, 10]
    config = json.loads((run / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "epsilon" and len(config["trained_betas"]) == 1000  # the model's own VP process

    model = load_model(str(folders["epsilon"]), device="cpu", guidance_scale=GUIDANCE_SCALE)
    prompt = "red box"
    pipe = StableDiffusionXLPipeline.from_pretrained(
        folders["epsilon"], scheduler=OLSSScheduler.from_pretrained(str(run)), add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    for steps in (5, 10):
        images = pipe(prompt, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    x_T = model.initial_noise([11])
    latents = pipe(prompt, num_inference_steps=10, guidance_scale=GUIDANCE_SCALE, latents=x_T.clone(),
                   output_type="latent").images
    scheduler = OLSSScheduler.from_pretrained(str(run))
    assert scheduler.available_steps == [5, 10], "the published plans are what the scheduler serves"
    scheduler.set_timesteps(10)
    cond, x = model.encode_prompts([prompt]), x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, int(t), cond), t, x).prev_sample
    np.testing.assert_allclose(latents.numpy(), x.numpy(), rtol=1e-4, atol=1e-5)

    # olss-dist evaluate runs on it too: the shipped plan and the built-ins against the run's own teacher.
    from olss_dist.apps.evaluate import SHIPPED_LABEL, run_evaluation

    evaluation = run_evaluation(str(folders["epsilon"]), str(run), steps=[10], num_samples=2, prompts=str(prompts),
                                device="cpu")
    assert evaluation.info["model"]["resolution"] == [16, 16]
    shipped = next(r for r in evaluation.results if r.label == SHIPPED_LABEL)
    assert np.isfinite(shipped.rmse) and all(images.shape[1:] == (16, 16, 3) for images in evaluation.images[10].values())



def test_a_lora_over_sdxl_is_fused_as_the_pipeline_fuses_it(folders, tmp_path):
    """``load_model(folder, lora=...)`` on SDXL (the adapter's own pipeline takes the LoRA): a random rank-2 UNet
    LoRA changes the output, which then equals StableDiffusionXLPipeline's with ``load_lora_weights`` + ``fuse_lora``."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(folders["epsilon"], add_watermarker=False)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a no-op LoRA would test nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))

    base = load_model(str(folders["epsilon"]), device="cpu", guidance_scale=GUIDANCE_SCALE)
    model = load_model(str(folders["epsilon"]), device="cpu", guidance_scale=GUIDANCE_SCALE, lora=str(tmp_path / "lora"))
    assert isinstance(model, StableDiffusionXLModel) and model.digest != base.digest
    x, cond = model.initial_noise([12, 13]), model.encode_prompts(PROMPTS)
    output = model(x, 500, cond)
    assert (output - base(x, 500, cond)).abs().max() > 1e-2

    reference = StableDiffusionXLPipeline.from_pretrained(folders["epsilon"], add_watermarker=False)
    reference.load_lora_weights(tmp_path / "lora")
    reference.fuse_lora()
    reference.scheduler = RecordingDDIM.from_config(reference.scheduler.config)
    reference.scheduler.fixed_timestep, reference.scheduler.recorded = 500, []
    reference(prompt=PROMPTS, latents=x.clone(), num_inference_steps=1, height=16, width=16,
              guidance_scale=GUIDANCE_SCALE, output_type="latent")
    np.testing.assert_allclose(output.numpy(), reference.scheduler.recorded[0].numpy(), rtol=1e-5, atol=1e-6)
