"""The Stable Diffusion adapter, the content digest and ``load_model`` on tiny SD folders built from configs."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from tiny_sd import tiny_pipeline

from olss_dist.models import ModelLoadError, StableDiffusionModel, content_digest, load_model
from olss_dist.models.analytic import GaussianMixtureModel
from olss_dist.core.noise_schedule import alphas_cumprod_from_config

PROMPTS = ["a red cat", "two dogs 7", "a red cat"]
NEGATIVES = ["", "blurry", "blurry"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """``{prediction_type: folder}`` of two tiny random SD pipelines (epsilon and v-prediction)."""
    folders = {}
    for prediction_type in ("epsilon", "v_prediction"):
        root = tmp_path_factory.mktemp(prediction_type)
        tiny_pipeline(root, prediction_type=prediction_type)
        folders[prediction_type] = root / "model"
    return folders


@pytest.fixture(scope="module")
def tiny_model(tiny_folders):
    return StableDiffusionModel.from_folder(tiny_folders["epsilon"], device="cpu", guidance_scale=7.5)


def handwritten_guided_output(pipe: StableDiffusionPipeline, x, t, prompts, negatives, scale):
    """Two separate UNet calls on the pipeline's own prompt embeddings, combined by the CFG formula."""
    positive, negative = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negatives)
    with torch.no_grad():
        unconditional = pipe.unet(x, t, encoder_hidden_states=negative).sample
        conditional = pipe.unet(x, t, encoder_hidden_states=positive).sample
    return unconditional + scale * (conditional - unconditional)


def test_denoiser_equals_handwritten_cfg(tiny_folders, tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folders["epsilon"], safety_checker=None)
    x = torch.randn(len(PROMPTS), *tiny_model.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = tiny_model.encode_prompts(PROMPTS, NEGATIVES)
    assert cond.shape == (3, 2, 16, 16)
    for t in (999, 500, 0):
        expected = handwritten_guided_output(pipe, x, t, PROMPTS, NEGATIVES, 7.5)
        torch.testing.assert_close(tiny_model(x, t, cond), expected, rtol=1e-5, atol=1e-5)


def test_default_negative_prompt_is_empty_and_cond_slices_per_sample(tiny_model):
    cond = tiny_model.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond, tiny_model.encode_prompts(PROMPTS, [""] * 3))
    x = torch.randn(3, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(tiny_model(x[1:], 400, cond[1:]), tiny_model(x, 400, cond)[1:], rtol=1e-4, atol=1e-5)


def test_each_distinct_prompt_is_encoded_once(tiny_model):
    rows_encoded = []
    hook = tiny_model.text_encoder.register_forward_hook(lambda module, args, output: rows_encoded.append(len(args[0])))
    try:
        tiny_model.encode_prompts(PROMPTS * 5, NEGATIVES * 5)
    finally:
        hook.remove()
    assert sum(rows_encoded) == len(set(PROMPTS) | set(NEGATIVES))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_guidance_scale_at_most_one_is_the_conditional_prediction(tiny_folders, scale):
    """StableDiffusionPipeline guides only when guidance_scale > 1 (``do_classifier_free_guidance``); at 0.5 it
    runs the conditional branch alone, and so must the teacher it is compared with."""
    model = StableDiffusionModel.from_folder(tiny_folders["epsilon"], device="cpu", guidance_scale=scale)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folders["epsilon"], safety_checker=None)
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    positive, _ = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, False)
    with torch.no_grad():
        expected = pipe.unet(x, 300, encoder_hidden_states=positive).sample
    torch.testing.assert_close(model(x, 300, model.encode_prompts(PROMPTS[:2])), expected, rtol=1e-5, atol=1e-5)


def test_float32_and_float64_paths_agree(tiny_model):
    x = torch.randn(3, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cond = tiny_model.encode_prompts(PROMPTS, NEGATIVES)
    eps64, eps32 = tiny_model(x, 700, cond), tiny_model(x.float(), 700, cond)
    assert eps64.dtype == torch.float64 and eps32.dtype == torch.float32
    torch.testing.assert_close(eps64, eps32.double(), rtol=1e-6, atol=1e-6)


def test_v_prediction_is_converted_to_epsilon(tiny_folders):
    model = StableDiffusionModel.from_folder(tiny_folders["v_prediction"], device="cpu", guidance_scale=5.0)
    assert model.prediction_type == "v_prediction"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folders["v_prediction"], safety_checker=None)
    x = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cond = model.encode_prompts(PROMPTS, NEGATIVES)
    for t in (900, 250):
        v = handwritten_guided_output(pipe, x.float(), t, PROMPTS, NEGATIVES, 5.0).double()
        eps = model(x, t, cond)
        alpha = float(model.alphas_cumprod[t])
        # The clean-sample estimate from the returned epsilon must equal the one from v directly.
        x0_from_eps = (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        x0_from_v = alpha**0.5 * x - (1 - alpha) ** 0.5 * v
        torch.testing.assert_close(x0_from_eps, x0_from_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True},
    ],
)
def test_alphas_cumprod_match_diffusers(config):
    expected = DDPMScheduler(**config).alphas_cumprod.double().numpy()
    actual = alphas_cumprod_from_config({"num_train_timesteps": 1000, **config})
    assert actual.dtype == np.float64 and actual.shape == (1000,)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def test_model_attributes(tiny_folders, tiny_model):
    assert tiny_model.latent_shape == (4, 8, 8)
    assert tiny_model.model_id == str(tiny_folders["epsilon"])
    assert tiny_model.digest == content_digest(tiny_folders["epsilon"])
    assert tiny_model.scheduler_config["_class_name"] == "DDIMScheduler"
    assert tiny_model.device == torch.device("cpu") and tiny_model.unet.dtype == torch.float32
    assert tiny_model.initial_noise([3, 4]).shape == (2, 4, 8, 8)


def test_decode_matches_the_vae(tiny_folders, tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folders["epsilon"], safety_checker=None)
    latents = torch.randn(2, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(6))
    images = tiny_model.decode(latents)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(float) - expected).max() <= 1


def flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_digest_is_stable_and_sees_one_byte(tiny_folders, tmp_path):
    copy = shutil.copytree(tiny_folders["epsilon"], tmp_path / "copy")
    digest = content_digest(copy)
    assert digest == content_digest(copy) == content_digest(tiny_folders["epsilon"])
    assert len(digest) == 64
    flip_one_byte(copy / "vae" / "diffusion_pytorch_model.safetensors")
    assert content_digest(copy) == digest, "the VAE does not affect sampling"
    flip_one_byte(copy / "unet" / "diffusion_pytorch_model.safetensors")
    changed = content_digest(copy)
    assert changed != digest
    (copy / "scheduler" / "scheduler_config.json").rename(copy / "scheduler" / "renamed.json")
    assert content_digest(copy) != changed, "paths are part of the digest"


def test_digest_of_a_folder_without_model_files_is_an_error(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds none of"):
        content_digest(tmp_path)


def test_file_uri_is_the_local_folder_in_place(tiny_folders, tmp_path, monkeypatch):
    monkeypatch.setenv("OLSS_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    model = load_model(f"file://{tiny_folders['epsilon']}", device="cpu")
    assert model.folder == tiny_folders["epsilon"] and not (tmp_path / "cache").exists()


def test_missing_folder_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no folder .*no-such-model"):
        load_model(str(missing))
    with pytest.raises(ModelLoadError, match="does not exist"):
        StableDiffusionModel.from_folder(missing)


def test_incomplete_and_sdxl_folders_are_refused(tiny_folders, tmp_path):
    incomplete = shutil.copytree(tiny_folders["epsilon"], tmp_path / "incomplete")
    shutil.rmtree(incomplete / "unet")
    with pytest.raises(ModelLoadError, match="no unet/"):
        load_model(str(incomplete), device="cpu")
    sdxl = shutil.copytree(tiny_folders["epsilon"], tmp_path / "sdxl")
    index = (sdxl / "model_index.json").read_text().replace("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    (sdxl / "model_index.json").write_text(index)
    with pytest.raises(ModelLoadError, match="SDXL"):
        load_model(str(sdxl), device="cpu")


def test_offline_hub_id_is_one_clear_error_without_hanging(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"'someone/not-cached'.*local hub cache \(HF_HUB_OFFLINE is set\)"):
        load_model("someone/not-cached")
    assert time.monotonic() - started < 30


def test_bad_specs_are_refused():
    with pytest.raises(ModelLoadError, match="non-empty string"):
        load_model("")
    with pytest.raises(ModelLoadError, match="not a hub id"):
        load_model("not a model id!")


def test_fsspec_uri_is_copied_once_to_the_cache(tiny_folders, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("OLSS_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    remote = f"memory://models-{tmp_path.name}/tiny"
    memory.put(str(tiny_folders["epsilon"]), remote, recursive=True)
    try:
        model = load_model(remote, device="cpu")
        assert model.model_id == remote
        assert model.digest == content_digest(tiny_folders["epsilon"])
        copies = list((tmp_path / "cache").glob("*/*"))
        assert len(copies) == 1 and copies[0].is_dir()
        load_model(remote, device="cpu")
        assert list((tmp_path / "cache").glob("*/*")) == copies, "an unchanged remote folder is not copied again"
        memory.pipe(f"{remote}/unet/config.json", memory.cat(f"{remote}/unet/config.json") + b"\n")
        assert load_model(remote, device="cpu").digest != model.digest, "a changed remote folder is copied again"
    finally:
        memory.rm(remote, recursive=True)


def test_fsspec_uri_without_a_model_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OLSS_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(f"memory://empty-{tmp_path.name}/nothing")


def test_analytic_spec(tiny_folders):
    model = load_model("analytic", guidance_scale=3.0)
    assert isinstance(model, GaussianMixtureModel) and model.guidance_scale == 3.0
