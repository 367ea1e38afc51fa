"""Zero terminal SNR (``rescale_betas_zero_snr``, ᾱ = 0 at t = 999) with v-prediction, end to end (contract C1).

The outputs the teacher records, the built-ins combine and the plans replay are v: the built-ins in OLSS form
equal diffusers' DDIM / DPM-Solver++ / UniPC / DEIS run on the zero-SNR v-prediction config (random linear
models), the teacher on a tiny random-weight SD 2.x-style folder (trailing, zero SNR, v) equals diffusers'
own pipeline with trailing DDIM at N=100, and ``jobs/calibrate.py`` on that folder publishes a scheduler that
drives ``StableDiffusionPipeline`` to finite images at 5 and 10 steps, each step the published plan's row over
the model's guided v. An ε model with zero terminal SNR is refused in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from olss_dist.core.builtin import LINEAR_BUILTINS, ZERO_SNR_CLAMP, builtin_scheduler, exact_vp_config, process_builtins
from olss_dist.core.noise_process import noise_process_from_config
from olss_dist.core.onpolicy import apply_step
from olss_dist.core.teacher import linear_teacher
from olss_dist.models.common import ModelLoadError
from olss_dist.models.stable_diffusion import StableDiffusionModel

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a tiny red square"
GUIDANCE_SCALE = 7.5  # the job's default, which the run is calibrated at
# An SD 2.x-style zero-SNR config (Lin et al. 2023): scaled-linear betas rescaled to zero terminal SNR, trailing.
ZERO_SNR_DDIM = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1, rescale_betas_zero_snr=True, timestep_spacing="trailing",
)
SOLVERS = {
    "ddim": (DDIMScheduler, {"set_alpha_to_one": True}),  # "trailing" built-ins end at the clean sample
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
}


def zero_snr_folder(root: Path, prediction_type: str = "v_prediction") -> Path:
    """tests/tiny_sd.py's random-weight SD folder with a zero-SNR trailing DDIM scheduler config; returns the folder."""
    from tiny_sd import tiny_pipeline

    tiny_pipeline(root, prediction_type="v_prediction")
    DDIMScheduler(**ZERO_SNR_DDIM, prediction_type=prediction_type).save_pretrained(root / "model" / "scheduler")
    return root / "model"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return zero_snr_folder(tmp_path_factory.mktemp("zero_snr"))


def replay(coefficients: np.ndarray, timesteps, model, x_T: torch.Tensor, cond) -> torch.Tensor:
    """The final state of a plan (rows over ``[x_T, o_0, ...]``) with ``o_i = model(x_i, t_i, cond)``."""
    x, outputs = x_T, []
    for i, t in enumerate(timesteps):
        outputs.append(model(x, int(t), cond))
        x = apply_step(list(coefficients[i, : i + 2]), x_T, outputs)
    return x


@pytest.mark.parametrize("name", LINEAR_BUILTINS)
def test_builtins_in_olss_form_are_diffusers_solvers_on_the_zero_snr_v_config(name):
    """Each linear built-in's OLSS form over v equals the diffusers solver on the model's own zero-SNR v config.

    diffusers' DEIS has no ``rescale_betas_zero_snr`` (it would run the unrescaled schedule): it is compared
    with DEIS on trained betas of the ᾱ diffusers' DPM-Solver++ uses at zero SNR (the last one 2⁻²⁴)."""
    config = dict(DDIMScheduler(**ZERO_SNR_DDIM, prediction_type="v_prediction").config)
    process = noise_process_from_config(config)
    assert process.output_type == "v_prediction" and process.alphas_cumprod[-1] == 0.0
    teacher_timesteps = process.teacher_schedule(1000).stored_timesteps()
    solvers = process_builtins(process)
    scheduler_class, settings = SOLVERS[name]
    if name == "deis":
        alphas = DPMSolverMultistepScheduler.from_config(config).alphas_cumprod.double().numpy()
        assert alphas[-1] == ZERO_SNR_CLAMP
        own = {k: v for k, v in config.items() if not k.startswith("_")}  # _use_default_values would drop the betas
        reference_config = {**own, **exact_vp_config(alphas), "rescale_betas_zero_snr": False}
    else:
        reference_config = config
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 6, generator=generator, dtype=torch.float64) * 0.3
    bias = torch.randn(6, generator=generator, dtype=torch.float64)
    model = lambda x, t, cond: x @ weight * (t / 1000 + 0.2) + bias * (1 - t / 1000)  # noqa: E731  a linear "v model"
    x_T = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    for num_steps in (5, 10):
        plan = solvers.plan(name, num_steps, teacher_timesteps)
        assert np.isfinite(plan.coefficients).all() and plan.timesteps[0] == 999
        scheduler = scheduler_class.from_config(reference_config, **settings)
        scheduler.set_timesteps(num_steps)
        assert np.array_equal(plan.timesteps, scheduler.timesteps.numpy())
        x = x_T.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, int(t), None), t, x).prev_sample
        ours = replay(plan.coefficients, plan.timesteps, model, x_T, None)
        assert torch.isfinite(ours).all()
        # diffusers keeps its schedule in float32 (ours: the exact float64 one); DEIS's reference schedule went
        # through float32 rescaling and back to betas (4e-5 relative in ᾱ); DEIS on the unrescaled schedule is 0.06 off
        torch.testing.assert_close(ours, x, rtol=0, atol=3e-4 if name == "deis" else 1e-5)


@pytest.mark.parametrize("name", ["ddim", "pndm", "dpmsolver++", "unipc", "euler", "deis"])
def test_every_vp_builtin_runs_the_rescaled_schedule_on_v_as_the_model_config_gives_it(name):
    """``builtin_scheduler`` from the model's own config (evaluate's "config" variant): v prediction, and the
    zero-SNR schedule even for solvers without ``rescale_betas_zero_snr`` (which from_config would drop)."""
    config = dict(DDIMScheduler(**ZERO_SNR_DDIM, prediction_type="v_prediction").config)
    scheduler = builtin_scheduler(name, config, "config")
    assert scheduler.config.prediction_type == "v_prediction"
    alphas = scheduler.alphas_cumprod.double().numpy()
    expected = noise_process_from_config(config).alphas_cumprod
    assert alphas[-1] == 0.0 or alphas[-1] == pytest.approx(ZERO_SNR_CLAMP, rel=1e-5)  # DDIM / the sigma solvers
    np.testing.assert_allclose(alphas[:-1], expected[:-1], rtol=1e-3, atol=0)
    # a model whose ᾱ stays above 0 is served on ε as before, v-prediction or not
    plain = dict(DDIMScheduler(**{**ZERO_SNR_DDIM, "rescale_betas_zero_snr": False}, prediction_type="v_prediction").config)
    assert builtin_scheduler(name, plain, "config").config.prediction_type == "epsilon"


def test_the_teacher_over_the_models_v_is_diffusers_trailing_ddim_pipeline(folder):
    """N=100: the adapter returns the guided v (no ε: it is infinite at t=999), the teacher steps in v form, and
    the final state is StableDiffusionPipeline's own with DDIM (trailing, zero SNR, ending at ᾱ = 1)."""
    model = StableDiffusionModel.from_folder(folder, device="cpu", guidance_scale=GUIDANCE_SCALE)
    assert model.output_type == "v_prediction" and model.noise_process.output_type == "v_prediction"
    schedule = model.noise_process.teacher_schedule(100)
    assert schedule.timesteps[0] == 999 and np.isfinite(schedule.output_coefficients).all()
    cond = model.encode_prompts([PROMPT])
    x_T = model.initial_noise([7])
    *_, (final, _) = linear_teacher(model, x_T, cond, schedule)
    assert torch.isfinite(final).all()

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    latents = pipe(PROMPT, num_inference_steps=100, guidance_scale=GUIDANCE_SCALE, latents=x_T.clone(),
                   output_type="latent").images
    torch.testing.assert_close(final, latents, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def epsilon_folder(tmp_path_factory) -> Path:
    return zero_snr_folder(tmp_path_factory.mktemp("zero_snr_epsilon"), prediction_type="epsilon")


def test_an_epsilon_model_with_zero_terminal_snr_is_refused_in_one_line(epsilon_folder):
    with pytest.raises(ModelLoadError, match="prediction_type 'epsilon' with zero terminal SNR") as error:
        StableDiffusionModel.from_folder(epsilon_folder, device="cpu")
    assert "\n" not in str(error.value) and str(epsilon_folder) in str(error.value)


@pytest.mark.slow  # the job's command line imports Ray and diffusers (~30 s on the loaded test machine)
def test_the_job_refuses_an_epsilon_zero_snr_folder_before_ray_starts(epsilon_folder, tmp_path):
    """One ``error:`` line, exit status 1, nothing published, no worker started."""
    from test_flow_pipelines_e2e import assert_one_error_line

    output = tmp_path / "registry"
    result = calibrate(output, epsilon_folder)
    assert_one_error_line(result, "prediction_type 'epsilon' with zero terminal SNR", output)
    assert "worker failed to start" not in result.stderr, "the driver refuses it before any worker starts"


PROMPTS = ["a tiny red square", "a blue circle", "a green line", "a yellow dot", "an orange cross", "a purple ring",
           "a black star", "a white box"]  # 6 fit, 2 held out: the job's work stays small


def calibrate(output: Path, model: Path) -> subprocess.CompletedProcess:
    """``jobs/calibrate.py --teacher-steps 50 --steps 5,10`` on 8 prompts, no start plans, a 2-CPU local Ray
    (test_flow_pipelines_e2e)."""
    from test_flow_pipelines_e2e import JOB_TIMEOUT_S, job_env

    prompts = output.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    command = [
        sys.executable, "jobs/calibrate.py", "--output", str(output), "--model", str(model), "--teacher-steps", "50",
        "--steps", "5,10", "--prompts", str(prompts), "--shard-size", "4", "--device", "cpu", "--local-cpus", "2",
        "--img2img-strengths", "none", "--quiet",  # no start plans: not under test here (tests/test_start_plans.py)
    ]
    return subprocess.run(command, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


@pytest.mark.slow
def test_the_job_publishes_v_plans_that_drive_stable_diffusion_pipeline(folder, tmp_path):
    """The published scheduler replays its plans over the pipeline's guided v: each image at 5 and 10 steps is
    finite, and its latents are the plan's rows applied to the adapter's v outputs (not to ε)."""
    from test_flow_pipelines_e2e import published_run

    from olss_dist.scheduler import OLSSScheduler

    output = tmp_path / "registry"
    run = published_run(calibrate(output, folder), output)
    manifest = json.loads((run / "manifest.json").read_text())
    config = json.loads((run / "scheduler_config.json").read_text())
    assert manifest["teacher_steps"] == 50 and manifest["planned_step_counts"] == [5, 10]
    assert config["prediction_type"] == "v_prediction"  # and the exact schedule, ᾱ = 0 at t = 999
    assert config["trained_betas"][-1] == 1.0
    # the shipped plans from pure noise (the job fits no img2img start plans here)
    plans = {p["num_steps"]: p for p in json.loads((run / "plans.json").read_text()) if p.get("start_step", 0) == 0}
    assert sorted(plans) == [5, 10] and all(p["timesteps"][0] == 999 for p in plans.values())

    model = StableDiffusionModel.from_folder(folder, device="cpu", guidance_scale=GUIDANCE_SCALE)
    cond = model.encode_prompts([PROMPT])
    x_T = model.initial_noise([3])
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, scheduler=OLSSScheduler.from_pretrained(str(run)), safety_checker=None, requires_safety_checker=False
    )
    for num_steps in (5, 10):
        latents = pipe(PROMPT, num_inference_steps=num_steps, guidance_scale=GUIDANCE_SCALE, latents=x_T.clone(),
                       output_type="latent").images
        plan = plans[num_steps]
        expected = replay(np.asarray(plan["coefficients"]), plan["timesteps"], model, x_T, cond)
        torch.testing.assert_close(latents, expected, rtol=0, atol=1e-4)
        image = pipe(PROMPT, num_inference_steps=num_steps, guidance_scale=GUIDANCE_SCALE, latents=x_T.clone(),
                     output_type="np").images[0]
        assert image.shape == (16, 16, 3) and np.isfinite(image).all()

    # olss-dist evaluate on the run: its teacher, the shipped plan, the refits and the built-ins, all over v
    from olss_dist.apps.evaluate import SHIPPED_LABEL, run_evaluation

    evaluation = run_evaluation(str(folder), str(run), steps=[5], num_samples=2, uniform_fit_samples=2, device="cpu")
    results = {r.label: r for r in evaluation.results}
    linear = [SHIPPED_LABEL, "olss-paper (same nodes)", "olss-onpolicy (uniform)",
              *(f"{name} ({spacing})" for name in LINEAR_BUILTINS for spacing in ("config", "trailing"))]
    assert all(results[label].note == "" and np.isfinite(results[label].rmse) for label in linear), results
    fit = plans[5]["fit"]
    if fit.startswith("builtin:"):  # the shipped plan is a built-in in OLSS form: it scores as diffusers' own does
        assert results[SHIPPED_LABEL].rmse == pytest.approx(results[f"{fit.split(':')[1]} (trailing)"].rmse, rel=1e-4)
