"""On-policy fitting, built-in solvers in OLSS form, and the validated method in one process."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from core_data import raw_lstsq, small_model, trajectories
from olss_dist import calibrate, fit_on_policy, trailing_timesteps
from olss_dist.core.builtin import builtin_plan, builtin_scheduler, scheduler_coefficients
from olss_dist.method.run import builtin_config
from olss_dist.core.onpolicy import rollout
from olss_dist.core.teacher import ddim_schedule
from olss_dist.method.rollouts import InProcessBackend
from olss_dist.method.run import Candidate, fit_candidate


def test_sequential_fit_equals_raw_row_lstsq_loop():
    states, _, timesteps = trajectories()
    model, cond = small_model(), torch.arange(24) % 4
    nodes = [0, 6, 15, 30]
    plan = fit_on_policy(nodes, model, states, cond, timesteps=timesteps, ridge=0.0)
    x_T = states[:, 0]
    outputs, x = [], x_T
    targets = nodes[1:] + [40]
    for i, node in enumerate(nodes):
        outputs.append(model(x, int(timesteps[node]), cond))
        features = np.column_stack([v.reshape(-1).numpy() for v in [x_T, *outputs]])
        weights, error = raw_lstsq(features, states[:, targets[i]].reshape(-1).numpy())
        np.testing.assert_allclose(plan.coefficients[i, : i + 2], weights, rtol=1e-8)
        np.testing.assert_allclose(plan.step_errors[i], error, rtol=1e-6)
        x = torch.from_numpy(features @ weights).reshape(x_T.shape)
    assert plan.fit == "on_policy" and plan.timesteps.tolist() == timesteps[nodes].tolist()


def test_merged_per_step_pieces_equal_single_batch_fit():
    states, _, timesteps = trajectories()
    model, cond = small_model(), torch.arange(24) % 4
    candidate = Candidate("x", [0, 5, 12, 25], "given", "on_policy", ridge=1e-6)
    results = []
    for batch_size in (None, 5):
        backend = InProcessBackend(model, states[:, 0], cond, states[:3, 0], cond[:3], batch_size=batch_size)
        backend.record_teacher(ddim_schedule(timesteps, model.alphas_cumprod))
        results.append(fit_candidate(backend, candidate, timesteps))
    for whole, chunked in zip(*results):
        np.testing.assert_allclose(chunked, whole, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name,scheduler_class", [
    ("ddim", DDIMScheduler), ("dpmsolver++", DPMSolverMultistepScheduler),
    ("unipc", UniPCMultistepScheduler), ("deis", DEISMultistepScheduler),
])
def test_builtin_in_olss_form_reproduces_the_diffusers_scheduler(name, scheduler_class):
    model = small_model()
    x_T = torch.randn(6, *model.latent_shape, dtype=torch.float64)
    cond = torch.arange(6) % 4
    scheduler = builtin_scheduler(name, builtin_config(model.alphas_cumprod), "trailing", linear=True)
    assert isinstance(scheduler, scheduler_class)
    scheduler.set_timesteps(7)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, int(t), cond), t, x).prev_sample
    timesteps, coefficients = scheduler_coefficients(builtin_scheduler(name, builtin_config(model.alphas_cumprod), "trailing", linear=True), 7)
    torch.testing.assert_close(rollout(coefficients, model, x_T, cond, timesteps), x, rtol=1e-5, atol=1e-5)


def test_builtin_plan_maps_timesteps_to_teacher_nodes():
    teacher = trailing_timesteps(1000)
    plan = builtin_plan("ddim", 10, builtin_config(small_model().alphas_cumprod), teacher)
    assert plan.nodes == list(range(0, 1000, 100)) and plan.fit == "builtin:ddim"
    with pytest.raises(ValueError, match="not teacher timesteps"):
        builtin_plan("ddim", 10, builtin_config(small_model().alphas_cumprod), trailing_timesteps(7))


@pytest.fixture(scope="module")
def method_run():
    model = small_model()
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(24, *model.latent_shape, generator=generator, dtype=torch.float64)
    validation = torch.randn(32, *model.latent_shape, generator=generator, dtype=torch.float64)
    args = dict(
        denoiser=model, noise=noise, cond=torch.arange(24) % 4, timesteps=trailing_timesteps(200),
        alphas_cumprod=model.alphas_cumprod, steps=(5, 10), validation_noise=validation,
        validation_cond=torch.arange(32) % 4,
    )
    return args, calibrate(**args)


def test_calibrate_ships_the_validated_best_and_beats_builtins_and_teacher_forcing(method_run):
    _, plans = method_run
    for k, plan in plans.items():
        assert plan.num_steps == k and len(plan.candidates) >= 6
        errors = {c["name"]: c["rmse"] for c in plan.candidates}
        shipped = min(errors.values())
        assert plan.fit == "on_policy"
        assert shipped < min(errors[f"builtin/{n}"] for n in ("ddim", "dpmsolver++", "unipc"))
        assert shipped < errors["teacher_forced/minimax"]
        for c in plan.candidates:
            assert {"nodes", "spacing", "error", "median", "p90", "worst"} <= set(c)
    assert min(c["rmse"] for c in plans[10].candidates) < min(c["rmse"] for c in plans[5].candidates)


def test_calibrate_is_deterministic(method_run):
    args, plans = method_run
    again = calibrate(**{**args, "steps": (5,)})
    assert again[5].nodes == plans[5].nodes
    np.testing.assert_array_equal(again[5].coefficients, plans[5].coefficients)


def test_calibrate_rejects_bad_input():
    model = small_model()
    noise = torch.randn(4, *model.latent_shape)
    common = dict(denoiser=model, noise=noise, cond=torch.arange(4) % 4, timesteps=trailing_timesteps(20), alphas_cumprod=model.alphas_cumprod)
    with pytest.raises(ValueError, match="validation_noise must be a non-empty batch"):
        calibrate(**common, validation_noise=noise[:0], validation_cond=torch.arange(0))
    with pytest.raises(ValueError, match="needs validation_noise"):
        calibrate(**common)
    with pytest.raises(ValueError, match="num_steps must be between 1 and"):
        calibrate(**common, steps=(30,), validation_noise=noise, validation_cond=torch.arange(4))
    states, _, timesteps = trajectories()
    with pytest.raises(ValueError, match="strictly increasing"):
        fit_on_policy([0, 4, 2], model, states, torch.arange(24) % 4, timesteps=timesteps)
    broken = states.clone()
    broken[1, 2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_on_policy([0, 4], model, broken, torch.arange(24) % 4, timesteps=timesteps)
