"""Noise processes: the teacher steps they define equal diffusers' own schedulers, step for step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from olss_dist.core.noise_process import FlowMatchingProcess, VPProcess, noise_process_from_config, vp_output_type
from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.core.teacher import ddim_schedule, ddim_teacher, linear_teacher, trailing_timesteps

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


# Zero terminal SNR (contract C1): the outputs are v (or x0) and DDIM is written in that form.
ZERO_SNR = dict(SD_BETAS, rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)


def zero_snr_config(prediction_type: str) -> dict:
    return dict(DDIMScheduler(**ZERO_SNR, prediction_type=prediction_type).config)


@pytest.mark.parametrize(
    "config, expected",
    [
        (dict(DDIMScheduler(**SD_BETAS).config), "epsilon"),
        (dict(DDIMScheduler(**SD_BETAS, prediction_type="v_prediction").config), "epsilon"),  # adapters convert v to ε
        (dict(DDIMScheduler(**SD_BETAS, prediction_type="sample").config), "epsilon"),
        (zero_snr_config("v_prediction"), "v_prediction"),
        (zero_snr_config("sample"), "sample"),
        ({"prediction_type": "v_prediction"}, "epsilon"),  # diffusers' defaults: linear betas
    ],
)
def test_vp_output_type_is_epsilon_unless_the_terminal_alpha_is_zero(config, expected):
    assert vp_output_type(config) == expected
    assert noise_process_from_config(config).output_type == expected


def test_vp_output_type_reads_zero_snr_from_trained_betas():
    alphas = alphas_cumprod_from_config(zero_snr_config("v_prediction"))
    assert alphas[-1] == 0.0 and alphas[-2] > 0.0
    betas = 1.0 - alphas / np.concatenate([[1.0], alphas[:-1]])
    exact = {"num_train_timesteps": 1000, "trained_betas": betas.tolist(), "prediction_type": "v_prediction"}
    assert vp_output_type(exact) == "v_prediction"
    assert VPProcess(alphas, exact).output_type == "v_prediction" and VPProcess(alphas, exact).zero_terminal_snr


def test_an_epsilon_model_with_zero_terminal_snr_is_refused_in_one_line():
    for make in (lambda: vp_output_type(zero_snr_config("epsilon")),
                 lambda: noise_process_from_config(zero_snr_config("epsilon")),
                 lambda: VPProcess(alphas_cumprod_from_config(zero_snr_config("epsilon")))):  # no config: epsilon
        with pytest.raises(ValueError, match="^prediction_type 'epsilon' with zero terminal SNR") as error:
            make()
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="zero terminal SNR.*epsilon DDIM step divides"):
        ddim_schedule(trailing_timesteps(10), alphas_cumprod_from_config(zero_snr_config("v_prediction")))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_zero_snr_teacher_is_diffusers_trailing_ddim_on_the_models_own_outputs(prediction_type):
    """N=100 steps of diffusers' DDIMScheduler (trailing, zero SNR, set_alpha_to_one) on the same outputs."""
    config = zero_snr_config(prediction_type)
    process = noise_process_from_config(config)
    assert process.output_type == prediction_type and process.zero_terminal_snr
    schedule = process.teacher_schedule(100)
    assert np.isfinite(schedule.state_coefficients).all() and np.isfinite(schedule.output_coefficients).all()
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(100)
    assert np.array_equal(schedule.timesteps, scheduler.timesteps.double().numpy()) and schedule.timesteps[0] == 999
    network = toy_denoiser(seed=3)
    denoiser = lambda x, t, cond: network(x.float(), t, cond).to(x.dtype)  # noqa: E731
    x_T = torch.randn(3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(denoiser(x, int(t), None), t, x).prev_sample
    ours = final_state(denoiser, x_T, schedule)
    assert torch.isfinite(ours).all()
    # diffusers keeps ᾱ in float32; the teacher in float64
    torch.testing.assert_close(ours, x, rtol=0, atol=2e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_x0_forms_are_the_epsilon_step_on_converted_outputs(prediction_type):
    """Where ᾱ > 0 the three forms are one DDIM step: o = v or x0, converted to ε with the same ᾱ."""
    alphas = alphas_cumprod_from_config(SD_BETAS)
    timesteps = trailing_timesteps(25)
    epsilon_form, other = ddim_schedule(timesteps, alphas), ddim_schedule(timesteps, alphas, prediction_type)
    network = toy_denoiser(seed=5)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    denoiser = lambda x, t, cond: network(x.float(), t, cond).to(x.dtype)  # noqa: E731
    for n, t in enumerate(timesteps):
        a, s = float(alphas[t]), float(alphas[t]) ** 0.5
        output = denoiser(x, int(t), None)
        if prediction_type == "v_prediction":
            epsilon = s * output + (1 - a) ** 0.5 * x
        else:
            epsilon = (x - s * output) / (1 - a) ** 0.5
        expected = epsilon_form.state_coefficients[n] * x + epsilon_form.output_coefficients[n] * epsilon
        x = other.state_coefficients[n] * x + other.output_coefficients[n] * output
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
