"""OLSSScheduler in diffusers' own pipelines as DDIM is used there: the embedded digits model (text-to-image with
batches, img2img at strengths 0.3 / 0.6 / 1.0, inpainting with a mask, a callback that edits the latents, step
counts and starts without a plan) and tiny random-weight ControlNet and SDXL pipelines.

DDIM written in OLSS form (and its tails as start plans) must give DDIM's own latents in every pipeline: that
pins down everything the pipelines ask of a scheduler (add_noise, begin index, the state an edit leaves).
Where no plan exists the scheduler must be the built-in it names (DPM-Solver++ 2M, trailing).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

from olss_dist import OLSSScheduler
from olss_dist.models.embedded import EMBEDDED_MODEL_PATH
from test_scheduler import basis_rows
from tiny_sd import tiny_pipeline
from tiny_sdxl import tiny_sdxl_pipeline

STEPS = 10
PROMPT = "a handwritten digit seven"


def ddim_like(config) -> DDIMScheduler:
    """DDIM from a model's config, trailing timesteps ending at the clean sample (what OLSS plans run)."""
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)


def ddim_plans(config, steps: int = STEPS, starts=()) -> list[dict]:
    """DDIM for ``steps`` in OLSS form, and its tails from each of ``starts`` as start plans (contract C2)."""
    reference = ddim_like(config)
    reference.set_timesteps(steps)
    timesteps = reference.timesteps
    entries = [{"num_steps": steps, "timesteps": timesteps.tolist(), "coefficients": basis_rows(reference, list(timesteps))}]
    for s in starts:
        entries.append({"num_steps": steps, "start_step": s, "timesteps": timesteps[s:].tolist(),
                        "coefficients": basis_rows(reference, list(timesteps[s:]))})
    return entries


def olss(config, **kwargs) -> OLSSScheduler:
    return OLSSScheduler.from_config(config, **kwargs)


def latents(pipe, scheduler, **kwargs) -> torch.Tensor:
    pipe = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, **kwargs}
    return pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def digits() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_PATH, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def image(digits) -> torch.Tensor:
    """A 32x32 digit from the model itself, the image img2img and inpainting start from."""
    digits.set_progress_bar_config(disable=True)
    return digits("a handwritten digit three", num_inference_steps=STEPS, output_type="pt",
                  generator=torch.Generator().manual_seed(1)).images


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # float32 latents through the same model calls


def test_text_to_image_with_a_batch_per_prompt_equals_ddim(digits):
    config = digits.scheduler.config
    ours = latents(digits, olss(config, plans=ddim_plans(config)), num_images_per_prompt=2)
    assert ours.shape == (2, 4, 8, 8)
    close(ours, latents(digits, ddim_like(config), num_images_per_prompt=2))


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_img2img_with_start_plans_equals_ddim(digits, image, strength):
    config = digits.scheduler.config
    img2img = StableDiffusionImg2ImgPipeline(**digits.components)
    scheduler = olss(config, plans=ddim_plans(config, starts=(4, 7)))  # s = 10 - int(10 * strength): 7, 4, 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every start is planned: nothing to say
        ours = latents(img2img, scheduler, image=image, strength=strength)
    close(ours, latents(img2img, ddim_like(config), image=image, strength=strength))


def test_img2img_without_a_start_plan_is_dpm_solver_pp_on_the_plans_timesteps(digits, image):
    config = digits.scheduler.config
    img2img = StableDiffusionImg2ImgPipeline(**digits.components)
    plans = ddim_plans(config)
    with pytest.warns(UserWarning, match=r"no start plan for 10 steps from step 4 .* dpmsolver\+\+ .* last 6 timesteps"):
        ours = latents(img2img, olss(config, plans=plans), image=image, strength=0.6)
    reference = DPMSolverMultistepScheduler.from_config(config)  # the same timesteps, passed as custom ones
    close(ours, latents(img2img, reference, image=image, strength=0.6, timesteps=plans[0]["timesteps"]))


def test_a_step_count_without_a_plan_is_dpm_solver_pp_at_any_strength(digits, image):
    config = digits.scheduler.config
    img2img = StableDiffusionImg2ImgPipeline(**digits.components)
    reference = DPMSolverMultistepScheduler.from_config(config, timestep_spacing="trailing")
    with pytest.warns(UserWarning, match=r"no plan for 8 steps \(planned: \[10\]\); serving dpmsolver\+\+"):
        ours = latents(img2img, olss(config, plans=ddim_plans(config)), image=image, strength=0.5, num_inference_steps=8)
    close(ours, latents(img2img, reference, image=image, strength=0.5, num_inference_steps=8))


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_with_a_mask_equals_ddim(digits, image, strength):
    """The 4-channel UNet: the pipeline pastes the noised known region back after every step (add_noise)."""
    config = digits.scheduler.config
    inpaint = StableDiffusionInpaintPipeline(**digits.components)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 4:20] = 1.0
    kwargs = {"image": image, "mask_image": mask, "strength": strength}
    ours = latents(inpaint, olss(config, plans=ddim_plans(config, starts=(4,))), **kwargs)
    reference = latents(inpaint, ddim_like(config), **kwargs)
    close(ours, reference)
    known = torch.nn.functional.interpolate(1 - mask, size=(8, 8)).bool().expand_as(ours)
    assert torch.equal(ours[known], reference[known])  # the known region is the image's own latents


def test_a_callback_that_edits_the_latents_moves_the_result_as_with_ddim(digits):
    config = digits.scheduler.config

    def edit(pipe, i, t, tensors):
        if i == 6:
            tensors["latents"] = tensors["latents"] + 0.5
        return tensors

    shifts = []
    for scheduler in (olss(config, plans=ddim_plans(config)), ddim_like(config)):
        plain, edited = latents(digits, scheduler), latents(digits, scheduler, callback_on_step_end=edit)
        shifts.append(edited - plain)
    close(shifts[0], shifts[1])
    assert shifts[0].mean() > 0.05  # the edit is carried, not dropped


def test_controlnet_pipeline_equals_ddim(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(4, 8))
    control = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    config = pipe.scheduler.config
    kwargs = {"image": torch.rand(1, 3, 16, 16), "guidance_scale": 2.0, "num_inference_steps": 4}
    ours = latents(control, olss(config, plans=ddim_plans(config, 4)), **kwargs)
    close(ours, latents(control, ddim_like(config), **kwargs))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_sdxl_pipelines_equal_ddim(sdxl, strength):
    """StableDiffusionXLPipeline (strength 1) and StableDiffusionXLImg2ImgPipeline from the same components."""
    pipe = sdxl
    config = pipe.scheduler.config  # SDXL's Euler config: its schedule is the process
    if strength < 1.0:
        pipe = StableDiffusionXLImg2ImgPipeline(**pipe.components)
        kwargs = {"image": torch.rand(1, 3, 16, 16), "strength": strength}
    else:
        kwargs = {}
    kwargs = {**kwargs, "guidance_scale": 2.0, "num_inference_steps": 4}
    ours = latents(pipe, olss(config, plans=ddim_plans(config, 4, starts=(2,))), **kwargs)
    close(ours, latents(pipe, ddim_like(config), **kwargs))


def test_a_pipeline_saved_with_the_scheduler_loads_it_back_with_its_plans(tmp_path):
    """DiffusionPipeline.save_pretrained writes scheduler/{scheduler_config,olss_plans}.json; from_pretrained
    imports olss_dist's OLSSScheduler (model_index.json names it) and reads both."""
    pipe = tiny_pipeline(tmp_path)
    config = pipe.scheduler.config
    pipe.scheduler = olss(config, plans=ddim_plans(config, 4))
    pipe.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved" / "scheduler").iterdir()} == {"scheduler_config.json", "olss_plans.json"}
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None, requires_safety_checker=False)
    assert isinstance(loaded.scheduler, OLSSScheduler) and loaded.scheduler.available_steps == [4]
    torch.testing.assert_close(latents(loaded, loaded.scheduler, num_inference_steps=4, guidance_scale=2.0),
                               latents(pipe, pipe.scheduler, num_inference_steps=4, guidance_scale=2.0), rtol=0, atol=0)
