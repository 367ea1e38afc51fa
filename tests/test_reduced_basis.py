"""Fewer outputs per step: the reduced-basis fit (``core.onpolicy.step_basis``, ``solve_step(basis=)``) and its
candidates (``on_policy/<spacing>/order=q``)."""

import numpy as np
import pytest
import torch

from core_data import raw_lstsq, small_model, trajectories
from olss_dist import calibrate, trailing_timesteps
from olss_dist.core.onpolicy import apply_step, rollout, solve_step, step_basis
from olss_dist.core.teacher import ddim_schedule, model_timestep
from olss_dist.core.tsqr import r_factor
from olss_dist.method.rollouts import InProcessBackend
from olss_dist.method.run import Candidate, fit_candidate


def explicit_features(features: np.ndarray, previous: np.ndarray, order: int) -> np.ndarray:
    """``[x̂_i, o_{i-q+1}, ..., o_i]`` built by hand from raw feature rows ``[x_T, o_0, ..., o_i]``."""
    state = features[:, : len(previous)] @ previous
    return np.column_stack([state, features[:, features.shape[1] - order:]])


@pytest.mark.parametrize("order", [1, 2, 3])
def test_reduced_fit_equals_direct_least_squares_on_the_explicit_features(order):
    rng = np.random.default_rng(order)
    step, rows = 5, 400
    features = rng.standard_normal((rows, step + 2))
    target = features @ rng.standard_normal(step + 2) + 0.1 * rng.standard_normal(rows)
    previous = rng.standard_normal(step + 1)
    basis = step_basis(previous, order)
    assert basis.shape == (step + 2, order + 1)
    r = r_factor(torch.from_numpy(np.column_stack([features, target])))
    explicit = explicit_features(features, previous, order)

    weights, error = solve_step(r, rows, ridge=0.0, basis=basis)
    direct, direct_error = raw_lstsq(explicit, target)
    np.testing.assert_allclose(weights, basis @ direct, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(features @ weights, explicit @ direct, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(error, direct_error, rtol=1e-9)

    # the ridge on the reduced coefficients, towards the prior's least-squares projection on the reduced span
    ridge, prior = 0.3, rng.standard_normal(step + 2)
    weights, _ = solve_step(r, rows, ridge=ridge, prior=prior, basis=basis)
    projected = np.linalg.lstsq(explicit, features @ prior, rcond=None)[0]
    penalty = np.sqrt(ridge) * np.linalg.norm(explicit, axis=0)
    augmented = np.vstack([explicit, np.diag(penalty)])
    direct = np.linalg.lstsq(augmented, np.concatenate([target, penalty * projected]), rcond=None)[0]
    np.testing.assert_allclose(weights, basis @ direct, rtol=1e-8, atol=1e-11)
    far, _ = solve_step(r, rows, ridge=1e12, prior=prior, basis=basis)
    np.testing.assert_allclose(far, basis @ projected, rtol=1e-5, atol=1e-8)


def test_order_at_least_the_outputs_is_the_full_fit():
    assert step_basis(None, 1) is None and step_basis(None, None) is None
    assert step_basis(np.ones(3), 3) is None and step_basis(np.ones(3), 2).shape == (4, 3)
    with pytest.raises(ValueError, match="order"):
        step_basis(np.ones(3), 0)
    states, _, timesteps = trajectories()
    model, cond = small_model(), torch.arange(24) % 4
    backend = InProcessBackend(model, states[:, 0], cond, states[:3, 0], cond[:3])
    backend.record_teacher(ddim_schedule(timesteps, model.alphas_cumprod))
    nodes = [0, 6, 15, 30]
    full = fit_candidate(backend, Candidate("full", nodes, "given", "on_policy", ridge=1e-6), timesteps)
    same = fit_candidate(backend, Candidate("q", nodes, "given", "on_policy", ridge=1e-6, order=len(nodes)), timesteps)
    for a, b in zip(full, same):
        np.testing.assert_array_equal(a, b)
    reduced = fit_candidate(backend, Candidate("q1", nodes, "given", "on_policy", ridge=1e-6, order=1), timesteps)
    np.testing.assert_array_equal(reduced[0][0], full[0][0])  # step 0: [x_T, o_0] either way ...
    for i in range(1, len(nodes)):  # ... later steps: [x̂_i, o_i], whose weights differ from the full fit's
        assert not np.allclose(reduced[0][i], full[0][i])


@pytest.mark.parametrize("order", [1, 2])
def test_weights_in_olss_form_reproduce_the_reduced_basis_sampler(order):
    """An independent on-policy loop on hand-built features ``[x̂_i, o_{i-q+1}, ..., o_i]`` over raw rows."""
    states, _, timesteps = trajectories()
    model, cond = small_model(), torch.arange(24) % 4
    nodes = [0, 5, 12, 22, 31]
    backend = InProcessBackend(model, states[:, 0], cond, states[:3, 0], cond[:3])
    backend.record_teacher(ddim_schedule(timesteps, model.alphas_cumprod))
    coefficients, step_errors = fit_candidate(backend, Candidate("q", nodes, "given", "on_policy", ridge=0.0, order=order),
                                              timesteps)
    targets = nodes[1:] + [len(timesteps)]
    x = x_T = states[:, 0]
    outputs = []
    for i, node in enumerate(nodes):
        outputs.append(model(x, model_timestep(timesteps[node]), cond))
        used = outputs[-min(order, i + 1):]
        features = np.column_stack([v.reshape(-1).numpy() for v in ([x] if i >= order else [x_T]) + used])
        direct, error = raw_lstsq(features, states[:, targets[i]].reshape(-1).numpy())
        x = torch.from_numpy(features @ direct).reshape(x_T.shape)
        np.testing.assert_allclose(apply_step(coefficients[i, : i + 2], x_T, outputs), x, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(step_errors[i], error, rtol=1e-6)
        assert np.all(coefficients[i, i + 2:] == 0)
    np.testing.assert_allclose(rollout(coefficients, model, x_T, cond, timesteps[nodes]), x, rtol=1e-7, atol=1e-9)


def test_collinear_outputs_blow_up_the_full_fit_and_not_the_reduced_one():
    """Outputs that differ only by small independent parts, few rows: the full fit grows large weights on those
    parts and its error on new rows is well above the reduced fit's (with no ridge, and with the method's)."""
    rng = np.random.default_rng(0)
    step = 12

    def draw(rows):
        x_T = rng.standard_normal(rows)
        base = rng.standard_normal(rows)
        outputs = [base + 1e-3 * rng.standard_normal(rows) for _ in range(step + 1)]
        features = np.column_stack([x_T, *outputs])
        target = 0.7 * x_T + 0.4 * outputs[-1] + 0.05 * rng.standard_normal(rows)
        return features, target

    previous = np.zeros(step + 1)
    previous[0] = 1.0  # the sampler's state x̂_i = x_T (as after DDIM-like steps that ignore the outputs)
    train, train_target = draw(20)
    held, held_target = draw(4000)
    r = r_factor(torch.from_numpy(np.column_stack([train, train_target])))
    full, full_train = solve_step(r, len(train), ridge=0.0)
    ridged, _ = solve_step(r, len(train))
    reduced, reduced_train = solve_step(r, len(train), ridge=0.0, basis=step_basis(previous, 1))
    held_error = lambda w: float(np.mean((held @ w - held_target) ** 2))
    assert full_train < reduced_train  # the full fit always fits its own rows better ...
    assert held_error(reduced) < 0.5 * held_error(full)  # ... and is worse on new ones
    assert held_error(reduced) < 0.9 * held_error(ridged)
    assert np.abs(full).max() > 30 * np.abs(reduced).max()
    np.testing.assert_allclose(reduced[[0, -1]], [0.7, 0.4], atol=0.05)


def test_reduced_candidates_are_listed_fitted_and_scored():
    model = small_model()
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(16, *model.latent_shape, generator=generator, dtype=torch.float64)
    validation = torch.randn(16, *model.latent_shape, generator=generator, dtype=torch.float64)
    timesteps = trailing_timesteps(100)
    plans = calibrate(model, noise, torch.arange(16) % 4, timesteps, model.alphas_cumprod, steps=(1, 4),
                      validation_noise=validation, validation_cond=torch.arange(16) % 4, orders=(1, 2))
    records = {c["name"]: c for c in plans[4].candidates}
    for order in (1, 2):
        record = records[f"on_policy/minimax/order={order}"]
        assert record["fit"] == "on_policy" and record["order"] == order and np.isfinite(record["rmse"])
        assert record["max_abs_coefficient"] > 0
    assert sum("order=" in name for name in records) == 2  # on the minimax nodes only
    assert all(c["order"] is None for c in records.values() if "order=" not in c["name"])
    assert not any("order=" in c["name"] for c in plans[1].candidates)  # q >= K: the full fit, left out
    without = calibrate(model, noise, torch.arange(16) % 4, timesteps, model.alphas_cumprod, steps=(4,),
                        validation_noise=validation, validation_cond=torch.arange(16) % 4, orders=())
    assert not any("order=" in c["name"] for c in without[4].candidates)
