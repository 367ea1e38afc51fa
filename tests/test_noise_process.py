"""Noise processes: the teacher steps they define equal diffusers' own schedulers, step for step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from olss_dist.core.noise_process import FlowMatchingProcess, VPProcess, noise_process_from_config
from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.core.teacher import ddim_teacher, linear_teacher, trailing_timesteps

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def toy_denoiser(dim: int = 8, seed: int = 0):
    weight = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)) * 0.3
    return lambda x, t, cond: torch.tanh(x @ weight) * (float(t) / 1000.0 + 0.1)


def final_state(denoiser, x_T, schedule):
    *_, (last, _) = linear_teacher(denoiser, x_T, None, schedule)
    return last


@pytest.mark.parametrize(
    "config, mu",
    [
        (FlowMatchEulerDiscreteScheduler(shift=3.0).config, None),
        (FlowMatchEulerDiscreteScheduler(shift=1.0).config, None),
        (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15).config, 0.9),
    ],
)
def test_flow_teacher_is_the_schedulers_own_euler_loop(config, mu):
    process = noise_process_from_config(config, mu=mu)
    assert isinstance(process, FlowMatchingProcess) and process.output_type == "flow_prediction"
    denoiser, x_T = toy_denoiser(), torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(60, mu=mu)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(denoiser(x, float(t), None), t, x).prev_sample
    schedule = process.teacher_schedule(60)
    assert np.array_equal(schedule.timesteps, scheduler.timesteps.double().numpy())
    assert isinstance(schedule.model_timestep(0), float) and schedule.model_timestep(0) == 1000.0
    assert torch.equal(final_state(denoiser, x_T, schedule), x)


def test_vp_teacher_is_trailing_ddim_ending_at_alpha_one():
    config = DDIMScheduler(**SD_BETAS).config
    process = noise_process_from_config(config)
    assert isinstance(process, VPProcess) and process.output_type == "epsilon"
    schedule = process.teacher_schedule(20)
    assert np.array_equal(schedule.timesteps, trailing_timesteps(20, 1000).astype(np.float64))
    assert isinstance(schedule.model_timestep(0), int)
    denoiser, x_T = toy_denoiser(), torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    *_, (expected, _) = ddim_teacher(denoiser, x_T, None, trailing_timesteps(20, 1000), alphas_cumprod_from_config(config))
    assert torch.equal(final_state(denoiser, x_T, schedule), expected)
    # the last DDIM step lands on alpha 1: x0 = (x - sqrt(1 - a) eps) / sqrt(a)
    alpha = process.alphas_cumprod[int(schedule.timesteps[-1])]
    assert schedule.state_coefficients[-1] == pytest.approx(1 / np.sqrt(alpha))
    assert schedule.output_coefficients[-1] == pytest.approx(-np.sqrt((1 - alpha) / alpha))


def test_mu_is_required_with_dynamic_shifting_and_refused_without():
    with pytest.raises(ValueError, match="^mu: .*needs mu"):
        noise_process_from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="^mu: .*fixed shift"):
        noise_process_from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, mu=1.0)
    with pytest.raises(ValueError, match="^mu: only flow"):
        noise_process_from_config(DDIMScheduler(**SD_BETAS).config, mu=1.0)


def test_stochastic_flow_sampling_has_no_deterministic_teacher():
    with pytest.raises(ValueError, match="stochastic"):
        noise_process_from_config(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config)
