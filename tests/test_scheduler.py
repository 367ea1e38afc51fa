"""OLSSScheduler: replay equals the coefficient formula, config round trip, use inside a pipeline."""

import numpy as np
import pytest
import torch

from core_data import small_model, trajectories
from olss_dist import Calibration, OLSSScheduler
from tiny_sd import tiny_pipeline


@pytest.fixture(scope="module")
def plans():
    states, noise_preds, timesteps = trajectories()
    calibration = Calibration.from_trajectories(states, noise_preds, timesteps)
    return [calibration.plan(k) for k in (3, 5, 8)]


def test_replay_equals_coefficient_formula(plans):
    model = small_model()
    scheduler = OLSSScheduler.from_plans(plans)
    plan = plans[1]
    x_T = torch.randn(4, *model.latent_shape, dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 3])
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == plan.timesteps.tolist()
    x, outputs = x_T, []
    for i, t in enumerate(scheduler.timesteps):
        eps = model(x, int(t), cond)
        outputs.append(eps)
        expected = plan.coefficients[i, 0] * x_T + sum(plan.coefficients[i, j + 1] * outputs[j] for j in range(i + 1))
        x = scheduler.step(eps, t, x).prev_sample
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_set_timesteps_resets_the_run(plans):
    model = small_model()
    scheduler = OLSSScheduler.from_plans(plans)
    x_T = torch.randn(2, *model.latent_shape)
    cond = torch.tensor([0, 1])

    def sample():
        scheduler.set_timesteps(3)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, int(t), cond), t, x).prev_sample
        return x

    torch.testing.assert_close(sample(), sample())


def test_config_round_trip(plans, tmp_path):
    scheduler = OLSSScheduler.from_plans(plans)
    scheduler.save_pretrained(tmp_path)
    loaded = OLSSScheduler.from_pretrained(tmp_path)
    assert loaded.available_steps == [3, 5, 8]
    for k in (3, 5, 8):
        scheduler.set_timesteps(k)
        loaded.set_timesteps(k)
        assert torch.equal(loaded.timesteps, scheduler.timesteps)
        assert torch.equal(loaded.coefficients, scheduler.coefficients)


def test_unplanned_step_count_names_the_available_ones(plans):
    scheduler = OLSSScheduler.from_plans(plans)
    with pytest.raises(ValueError, match=r"no plan for 7 steps; available: \[3, 5, 8\]"):
        scheduler.set_timesteps(7)


def test_wrong_timestep_is_refused(plans):
    scheduler = OLSSScheduler.from_plans(plans)
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="expects timestep"):
        scheduler.step(torch.zeros(1, 2), 1, torch.zeros(1, 2))


def test_v_prediction_output_is_converted_to_epsilon(plans):
    epsilon_scheduler = OLSSScheduler.from_plans(plans)
    v_scheduler = OLSSScheduler.from_plans(plans, prediction_type="v_prediction")
    epsilon_scheduler.set_timesteps(3)
    v_scheduler.set_timesteps(3)
    t = int(epsilon_scheduler.timesteps[0])
    alpha = float(epsilon_scheduler.alphas_cumprod[t])
    x, x0 = torch.randn(2, 8), torch.randn(2, 8)
    eps = (x - alpha**0.5 * x0) / (1 - alpha) ** 0.5
    v = alpha**0.5 * eps - (1 - alpha) ** 0.5 * x0
    torch.testing.assert_close(v_scheduler.step(v, t, x).prev_sample, epsilon_scheduler.step(eps, t, x).prev_sample, rtol=1e-4, atol=1e-5)


def test_runs_inside_stable_diffusion_pipeline(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    from olss_dist.core.plan import Plan

    timesteps = np.array([999, 666, 333])
    ddim_like = Plan(nodes=[0, 333, 666], timesteps=timesteps, coefficients=np.tril(np.ones((3, 4)) * 0.1, 1),
                     step_errors=np.zeros(3), search_errors=np.zeros(3))
    pipe.scheduler = OLSSScheduler.from_plans([ddim_like])
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, kwargs_out: calls.append(int(args[1])))
    latents = pipe("seven", num_inference_steps=3, guidance_scale=2.0, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
    assert calls == [999, 666, 333]
