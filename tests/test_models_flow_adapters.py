"""The SD3 and Flux adapters and ``load_model``'s family dispatch, on tiny random pipelines built from configs.

The strongest check per family: the N-step teacher (``linear_teacher`` over the model's own
``teacher_schedule(N)``) ends where the diffusers pipeline does from the same initial latents, prompts and
guidance, to float32 round-off.
"""

from __future__ import annotations

import json
import shutil
from fnmatch import fnmatch

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tiny_flow import RESOLUTION, T5_TOKENS, tiny_flux_pipeline, tiny_sd3_pipeline
from tiny_sd import tiny_pipeline

from olss_dist.core.teacher import linear_teacher
from olss_dist.models import FluxModel, ModelLoadError, StableDiffusion3Model, TextConditioning, content_digest, load_model
from olss_dist.models.loading import PIPELINES

PROMPTS = ["a red cat", "two dogs 7", "a red cat"]
NEGATIVES = ["", "blurry", "blurry"]
STEPS = 4
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``{"sd3", "sd3_no_t5", "flux", "sd"}``: tiny pipeline folders (SD3 with and without T5, Flux, SD 1.x)."""
    root = tmp_path_factory.mktemp("flow")
    tiny_sd3_pipeline(root / "sd3")
    tiny_sd3_pipeline(root / "sd3_no_t5", seed=1, with_t5=False)
    tiny_flux_pipeline(root / "flux")
    tiny_pipeline(root / "sd")
    return {name: root / name / "model" for name in ("sd3", "sd3_no_t5", "flux", "sd")}


@pytest.fixture(scope="module")
def sd3(folders):
    return StableDiffusion3Model.from_folder(folders["sd3"], device="cpu", guidance_scale=5.0, max_sequence_length=T5_TOKENS)


@pytest.fixture(scope="module")
def flux(folders):
    return FluxModel.from_folder(
        folders["flux"], device="cpu", guidance_scale=3.5, resolution=RESOLUTION, max_sequence_length=T5_TOKENS
    )


def final_state(model, x_T, cond, steps):
    """The last state of the model's own ``steps``-step teacher."""
    *_, (last, _) = linear_teacher(model, x_T, cond, model.noise_process.teacher_schedule(steps))
    return last


def pipeline_pixels(images: np.ndarray) -> np.ndarray:
    """The pipeline's ``output_type="np"`` images in [0, 1] as 0..255 floats, rounded as the adapters round."""
    return np.round(images * 255.0)


# ------------------------------------------------------------------------------------------------ SD3


def test_sd3_attributes(folders, sd3):
    assert sd3.latent_shape == (4, 8, 8) and sd3.resolution == (RESOLUTION, RESOLUTION)
    assert sd3.prediction_type == "flow_prediction" and sd3.alphas_cumprod is None and sd3.mu is None
    assert sd3.noise_process.kind == "flow" and sd3.scheduler_config["shift"] == 3.0
    assert sd3.digest == content_digest(folders["sd3"]) and sd3.model_id == str(folders["sd3"])
    assert len(sd3.default_prompts()) == 24


def test_sd3_denoiser_equals_the_pipelines_guided_transformer(folders, sd3):
    pipe = StableDiffusion3Pipeline.from_pretrained(folders["sd3"])
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVES,
        max_sequence_length=T5_TOKENS,
    )
    cond = sd3.encode_prompts(PROMPTS, NEGATIVES)
    assert isinstance(cond, TextConditioning) and len(cond) == 3
    assert cond.embeddings.shape == (3, 2, 16 + T5_TOKENS, 32) and cond.pooled.shape == (3, 2, 32)
    x = torch.randn(3, *sd3.latent_shape, generator=torch.Generator().manual_seed(1))
    for t in (1000.0, 637.5, 3.0):
        timestep = torch.full((3,), t)
        with torch.no_grad():
            unconditional = pipe.transformer(
                x, encoder_hidden_states=negative, pooled_projections=negative_pooled, timestep=timestep
            ).sample
            conditional = pipe.transformer(
                x, encoder_hidden_states=positive, pooled_projections=pooled, timestep=timestep
            ).sample
        torch.testing.assert_close(sd3(x, t, cond), unconditional + 5.0 * (conditional - unconditional), **TOLERANCE)
    torch.testing.assert_close(sd3(x[1:], 500.0, cond[1:]), sd3(x, 500.0, cond)[1:], **TOLERANCE)


def test_sd3_teacher_equals_the_pipeline_and_decodes_as_it_does(folders, sd3):
    pipe = StableDiffusion3Pipeline.from_pretrained(folders["sd3"])
    x_T = sd3.initial_noise([0, 1, 2])
    expected = pipe(
        PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, guidance_scale=5.0, latents=x_T.clone(),
        height=RESOLUTION, width=RESOLUTION, max_sequence_length=T5_TOKENS, output_type="latent",
    ).images
    last = final_state(sd3, x_T, sd3.encode_prompts(PROMPTS, NEGATIVES), STEPS)
    torch.testing.assert_close(last, expected, **TOLERANCE)
    images = pipe(
        PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, guidance_scale=5.0, latents=x_T.clone(),
        height=RESOLUTION, width=RESOLUTION, max_sequence_length=T5_TOKENS, output_type="np",
    ).images
    decoded = sd3.decode(last)
    assert decoded.shape == (3, RESOLUTION, RESOLUTION, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(float) - pipeline_pixels(images)).max() <= 1


def test_sd3_without_t5_gets_the_pipelines_zero_tokens(folders):
    model = StableDiffusion3Model.from_folder(folders["sd3_no_t5"], device="cpu", guidance_scale=4.0)
    assert model.pipeline.text_encoder_3 is None
    cond = model.encode_prompts(PROMPTS[:2])
    assert cond.embeddings.shape == (2, 2, 16 + 256, 32)  # the pipeline's default max_sequence_length
    assert torch.all(cond.embeddings[:, :, 16:] == 0)
    pipe = StableDiffusion3Pipeline.from_pretrained(folders["sd3_no_t5"], text_encoder_3=None, tokenizer_3=None)
    x_T = model.initial_noise([5, 6])
    expected = pipe(
        PROMPTS[:2], num_inference_steps=2, guidance_scale=4.0, latents=x_T.clone(), output_type="latent"
    ).images
    torch.testing.assert_close(final_state(model, x_T, cond, 2), expected, **TOLERANCE)


def test_sd3_with_dynamic_shifting_takes_the_pipelines_mu(folders, tmp_path):
    folder = shutil.copytree(folders["sd3"], tmp_path / "dynamic")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    del config["max_shift"]  # the scheduler's default (1.15) applies, not calculate_shift's (1.16)
    config_path.write_text(json.dumps({**config, "use_dynamic_shifting": True}))
    model = StableDiffusion3Model.from_folder(folder, device="cpu", guidance_scale=3.0, max_sequence_length=T5_TOKENS)
    assert model.mu == pytest.approx(calculate_shift(16, 256, 4096, 0.5, 1.15))
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    x_T = model.initial_noise([3, 4])
    expected = pipe(
        PROMPTS[:2], num_inference_steps=3, guidance_scale=3.0, latents=x_T.clone(), max_sequence_length=T5_TOKENS,
        output_type="latent",
    ).images
    torch.testing.assert_close(final_state(model, x_T, model.encode_prompts(PROMPTS[:2]), 3), expected, **TOLERANCE)


# ----------------------------------------------------------------------------------------------- Flux


def test_flux_attributes_and_mu(folders, flux):
    assert flux.latent_shape == (16, 16), "packed: (8/2)*(8/2) patches of 4 channels x 2x2"
    assert flux.mu == pytest.approx(calculate_shift(16, 256, 4096, 0.5, 1.15))
    assert flux.noise_process.mu == flux.mu and flux.prediction_type == "flow_prediction"
    assert flux.digest == content_digest(folders["flux"])


def test_flux_denoiser_equals_the_pipelines_transformer_call(folders, flux):
    pipe = FluxPipeline.from_pretrained(folders["flux"])
    embeddings, pooled, text_ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=T5_TOKENS)
    cond = flux.encode_prompts(PROMPTS)
    assert cond.embeddings.shape == (3, T5_TOKENS, 32) and cond.pooled.shape == (3, 16)
    x = torch.randn(3, *flux.latent_shape, generator=torch.Generator().manual_seed(2))
    _, image_ids = pipe.prepare_latents(3, 4, RESOLUTION, RESOLUTION, embeddings.dtype, "cpu", None, latents=x)
    for t in (1000.0, 512.25, 2.0):
        with torch.no_grad():
            expected = pipe.transformer(
                hidden_states=x, timestep=torch.full((3,), t) / 1000, guidance=torch.full((3,), 3.5),
                pooled_projections=pooled, encoder_hidden_states=embeddings, txt_ids=text_ids, img_ids=image_ids,
            ).sample
        torch.testing.assert_close(flux(x, t, cond), expected, **TOLERANCE)
    torch.testing.assert_close(flux(x[:1], 300.0, cond[:1]), flux(x, 300.0, cond)[:1], **TOLERANCE)


def test_flux_teacher_equals_the_pipeline_and_decodes_as_it_does(folders, flux):
    pipe = FluxPipeline.from_pretrained(folders["flux"])
    # FluxPipeline passes sigmas = linspace(1, 1/N, N) by default; the scheduler's own N-step schedule (the
    # teacher's) is linspace(sigma_max, sigma_min, N). The two agree at N = 1000, the calibration teacher.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sigmas = np.linspace(scheduler.sigma_max, scheduler.sigma_min, STEPS)
    x_T = flux.initial_noise([0, 1, 2])
    run = dict(
        num_inference_steps=STEPS, sigmas=sigmas, guidance_scale=3.5, height=RESOLUTION, width=RESOLUTION,
        max_sequence_length=T5_TOKENS,
    )
    expected = pipe(PROMPTS, latents=x_T.clone(), output_type="latent", **run).images
    last = final_state(flux, x_T, flux.encode_prompts(PROMPTS), STEPS)
    torch.testing.assert_close(last, expected, **TOLERANCE)
    images = pipe(PROMPTS, latents=x_T.clone(), output_type="np", **run).images
    decoded = flux.decode(last)
    assert decoded.shape == (3, RESOLUTION, RESOLUTION, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(float) - pipeline_pixels(images)).max() <= 1


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_non_square_resolution_equals_the_pipeline(folders, family):
    height, width = RESOLUTION, 2 * RESOLUTION
    adapter, pipeline = (StableDiffusion3Model, StableDiffusion3Pipeline) if family == "sd3" else (FluxModel, FluxPipeline)
    model = adapter.from_folder(
        folders[family], device="cpu", guidance_scale=3.0, resolution=(height, width), max_sequence_length=T5_TOKENS
    )
    assert model.latent_shape == ((4, 8, 16) if family == "sd3" else (32, 16))
    pipe = pipeline.from_pretrained(folders[family])
    run = {"num_inference_steps": 2, "guidance_scale": 3.0, "height": height, "width": width, "max_sequence_length": T5_TOKENS}
    if family == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        run["sigmas"] = np.linspace(scheduler.sigma_max, scheduler.sigma_min, 2)
    x_T = model.initial_noise([7])
    last = final_state(model, x_T, model.encode_prompts(PROMPTS[:1]), 2)
    torch.testing.assert_close(last, pipe(PROMPTS[:1], latents=x_T.clone(), output_type="latent", **run).images, **TOLERANCE)
    images = pipe(PROMPTS[:1], latents=x_T.clone(), output_type="np", **run).images
    decoded = model.decode(last)
    assert decoded.shape == (1, height, width, 3)
    assert np.abs(decoded.astype(float) - pipeline_pixels(images)).max() <= 1


def test_flux_default_schedule_matches_the_teacher_at_1000_steps(flux):
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler_config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 1000), mu=flux.mu)  # what FluxPipeline passes
    timesteps = flux.noise_process.teacher_schedule(1000).timesteps
    np.testing.assert_allclose(scheduler.timesteps.double().numpy(), timesteps, rtol=1e-6)


def test_flux_refuses_negative_prompts(flux):
    with pytest.raises(ValueError, match="negative_prompts: Flux is guidance-distilled"):
        flux.encode_prompts(PROMPTS, NEGATIVES)
    torch.testing.assert_close(flux.encode_prompts(PROMPTS, [""] * 3).embeddings, flux.encode_prompts(PROMPTS).embeddings)


# ----------------------------------------------------------------------------------------- load_model


def test_load_model_dispatches_on_the_pipeline_class(folders):
    sd3 = load_model(str(folders["sd3"]), device="cpu", guidance_scale=6.0)
    assert isinstance(sd3, StableDiffusion3Model) and sd3.guidance_scale == 6.0 and sd3.max_sequence_length == 256
    flux = load_model(str(folders["flux"]), device="cpu", resolution=(RESOLUTION, 2 * RESOLUTION))
    assert isinstance(flux, FluxModel) and flux.latent_shape == (32, 16) and flux.max_sequence_length == 512
    assert flux.mu == pytest.approx(calculate_shift(32, 256, 4096, 0.5, 1.15))
    assert load_model(str(folders["sd"]), device="cpu", resolution=RESOLUTION).latent_shape == (4, 8, 8)


def test_digest_covers_the_transformer(folders, tmp_path):
    copy = shutil.copytree(folders["sd3"], tmp_path / "copy")
    digest = content_digest(copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert content_digest(copy) != digest


def test_unsupported_pipeline_class_is_one_clear_line(folders, tmp_path):
    other = shutil.copytree(folders["sd3"], tmp_path / "pixart")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ModelLoadError) as error:
        load_model(str(other), device="cpu")
    message = str(error.value)
    assert "\n" not in message and "'PixArtAlphaPipeline' is not supported" in message
    assert all(name in message for name in ("StableDiffusionPipeline", "StableDiffusion3Pipeline", "FluxPipeline"))


def test_incomplete_flow_folder_is_refused(folders, tmp_path):
    incomplete = shutil.copytree(folders["flux"], tmp_path / "incomplete")
    shutil.rmtree(incomplete / "transformer")
    with pytest.raises(ModelLoadError, match="not a complete diffusers Flux folder: no transformer/"):
        load_model(str(incomplete), device="cpu", resolution=RESOLUTION)


@pytest.mark.parametrize(
    "family, resolution",
    [("sd3", 17), ("sd3", 0), ("sd3", -16), ("sd3", (16, 18)), ("sd3", "16"), ("sd3", True), ("flux", 18), ("sd", 17)],
)
def test_bad_resolution_is_one_clear_line(folders, family, resolution):
    with pytest.raises(ModelLoadError, match="^resolution: ") as error:
        load_model(str(folders[family]), device="cpu", resolution=resolution)
    assert "\n" not in str(error.value)


def test_analytic_models_take_no_resolution():
    with pytest.raises(ModelLoadError, match="resolution: the analytic-flow model has no image resolution"):
        load_model("analytic-flow", resolution=64)


def test_remote_flow_folder_copies_its_family_files_only(folders, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("OLSS_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    remote = f"memory://flow-{tmp_path.name}/sd3"
    memory.put(str(folders["sd3"]), remote, recursive=True)
    memory.pipe(f"{remote}/notes/readme.txt", b"not part of the model")
    try:
        model = load_model(remote, device="cpu")
        assert isinstance(model, StableDiffusion3Model) and model.digest == content_digest(folders["sd3"])
        (copy,) = (tmp_path / "cache").glob("*/*")
        assert (copy / "text_encoder_3").is_dir() and (copy / "tokenizer_3").is_dir() and not (copy / "notes").exists()
    finally:
        memory.rm(remote, recursive=True)


def test_hub_patterns_take_sharded_fp32_weights_only():
    patterns = PIPELINES["StableDiffusion3Pipeline"].hub_files + PIPELINES["FluxPipeline"].hub_files
    wanted = [
        "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model.safetensors.index.json",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors", "tokenizer_3/spiece.model",
        "vae/diffusion_pytorch_model.safetensors", "text_encoder_2/config.json",
    ]
    unwanted = [
        "text_encoder_3/model.fp16-00001-of-00002.safetensors", "transformer/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/pytorch_model.bin", "sd3_medium.safetensors",
    ]
    assert all(any(fnmatch(name, p) for p in patterns) for name in wanted)
    assert not any(fnmatch(name, p) for name in unwanted for p in patterns)


def test_embedded_flow_spec():
    from olss_dist.models import embedded_flow

    if not (embedded_flow.EMBEDDED_FLOW_MODEL_PATH / "model_index.json").is_file():
        with pytest.raises(ModelLoadError, match="'embedded-flow': no trained model"):
            load_model("embedded-flow", device="cpu")
        return
    model = load_model("embedded-flow", device="cpu", guidance_scale=embedded_flow.GUIDANCE_SCALE)
    assert isinstance(model, StableDiffusion3Model) and model.model_id == "embedded-flow"
    assert model.default_prompts() == embedded_flow.default_prompts()
    pipe = StableDiffusion3Pipeline.from_pretrained(embedded_flow.EMBEDDED_FLOW_MODEL_PATH, **embedded_flow.LOAD_KWARGS)
    x_T = model.initial_noise([0])
    prompt = embedded_flow.default_prompts()[:1]
    expected = pipe(
        prompt, num_inference_steps=2, guidance_scale=embedded_flow.GUIDANCE_SCALE, latents=x_T.clone(), output_type="latent"
    ).images
    torch.testing.assert_close(final_state(model, x_T, model.encode_prompts(prompt), 2), expected, **TOLERANCE)
