"""On-policy fitting: each step is fitted on the states the K-step sampler itself visits.

Round ``i`` fits the teacher state ``s_{n_{i+1}}`` (``s_N`` after the last node) on
``[x_T, ê_0, ..., ê_i]``, where ``ê_j`` are the model's outputs *at the sampler's own states*
``x̂_j``, then moves every sample to ``x̂_{i+1}`` = that fit and calls the model once. K rounds, K
model calls per sample. The per-round reduction is a small ``(i+3, i+3)`` triangular factor that adds
up over samples exactly like the teacher statistics, so shards reduce independently.

**Fewer outputs per step** (``step_basis``): where many outputs are nearly collinear, the ``i+2`` free
weights of a late step grow and blow up on new samples. A reduced basis of order ``q`` fits step ``i`` on
``[x̂_i, ê_{i-q+1}, ..., ê_i]`` instead, ``x̂_i`` the sampler's current state (itself the combination
``row i-1`` of ``[x_T, ê_0, ..., ê_{i-1}]``): features ``X @ T`` with a small ``(i+2, q+1)`` matrix ``T``,
solved on the same R factor (``solve_step(basis=T)``), weights ``T @ b`` in OLSS form. Order 1 is a
DDIM-like step ``a x̂_i + b ê_i``, order 2 the form of a two-step multistep solver (DPM-Solver++ 2M).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from olss_dist.core.calibration import as_tensor
from olss_dist.core.path_search import check_nodes
from olss_dist.core.plan import Plan
from olss_dist.core.teacher import Denoiser, check_model_timesteps, model_timestep, trailing_timesteps
from olss_dist.core.tsqr import r_factor

DEFAULT_RIDGE = 1e-6
"""Ridge weight relative to each feature's squared norm; tames near-collinear outputs."""


def step_rows(x_T: torch.Tensor, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """``(B*D, i+3)`` float64 rows ``[x_T, ê_0, ..., ê_i, target]``, one per latent element."""
    columns = [x_T, *outputs, target]
    return torch.stack([c.reshape(-1).to(torch.float64) for c in columns], dim=1)


def step_statistics(x_T: torch.Tensor, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """``(i+3, i+3)`` float64 R factor of ``step_rows``; merge shards with ``merge_r_factors``."""
    return r_factor(step_rows(x_T, outputs, target))


def step_basis(previous: np.ndarray | None, order: int | None) -> np.ndarray | None:
    """The reduced basis ``T`` of order ``q`` at step ``i``: features ``[x̂_i, ê_{i-q+1}, ..., ê_i]`` = ``X @ T``.

    Args:
        previous: ``(i+1,)`` the OLSS weights of step ``i-1`` on ``[x_T, ê_0, ..., ê_{i-1}]`` (they give the
            sampler's current state ``x̂_i``); None at step 0 (``x̂_0 = x_T``).
        order: ``q >= 1``, the model outputs the step may use besides ``x̂_i``; None: all of them.

    Returns:
        ``(i+2, q+1)`` float64 ``T`` over the step's features ``[x_T, ê_0, ..., ê_i]``; None where the
        reduced basis is the full fit (``order`` None or ``q >= i+1``).
    """
    if order is None:
        return None
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be a positive integer or None, got {order!r}")
    step = 0 if previous is None else len(previous) - 1
    if order >= step + 1:
        return None
    basis = np.zeros((step + 2, order + 1))
    basis[: step + 1, 0] = np.asarray(previous, dtype=np.float64)
    basis[step + 2 - order:, 1:] = np.eye(order)
    return basis


def solve_step(
    r: np.ndarray | torch.Tensor,
    num_rows: int,
    ridge: float = DEFAULT_RIDGE,
    prior: np.ndarray | None = None,
    basis: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Coefficients of one on-policy step from its merged statistics.

    Args:
        r: ``(F+1, F+1)`` R factor of rows ``[features..., target]``.
        num_rows: rows behind ``r`` (samples x latent elements).
        ridge: penalty ``ridge * ||feature_j||^2 * (w_j - prior_j)^2`` added per feature (scale free); with
            ``basis``, per reduced feature ``X @ T[:, k]`` on its coefficient ``b_k``.
        prior: ``(F,)`` the weights the ridge pulls towards (a trust region around a stable solver's step,
            e.g. a built-in's row); None: zeros (plain ridge). A large ridge returns the prior itself; with
            ``basis``, the reduced coefficients pull towards the prior's projection on the reduced span (the
            least-squares ``b`` of ``X @ T @ b ~ X @ prior`` on the same rows), and a large ridge returns that.
        basis: ``(F, q+1)`` the reduced basis ``T`` (``step_basis``): the fit is over ``X @ T``, a small
            problem on ``r`` (never on ``rᵀr``); None: all ``F`` features.

    Returns:
        ``(F,)`` float64 weights (``T @ b`` with ``basis``) and the mean squared residual per element (without
        the penalty).
    """
    r = np.asarray(torch.as_tensor(r, dtype=torch.float64).cpu().numpy())
    features, target = r[:, :-1], r[:, -1]
    size = features.shape[1]
    prior = np.zeros(size) if prior is None else np.asarray(prior, dtype=np.float64)
    if prior.shape != (size,):
        raise ValueError(f"prior has shape {prior.shape}, the step has {size} features")
    if basis is not None:
        basis = np.asarray(basis, dtype=np.float64)
        if basis.ndim != 2 or basis.shape[0] != size or not 1 <= basis.shape[1] <= size:
            raise ValueError(f"basis has shape {basis.shape}, the step has {size} features")
    reduced = features if basis is None else features @ basis
    reduced_prior = prior if basis is None else np.linalg.lstsq(reduced, features @ prior, rcond=None)[0]
    penalty = np.sqrt(ridge) * np.linalg.norm(reduced, axis=0)
    augmented = np.vstack([reduced, np.diag(penalty)])
    padded_target = np.concatenate([target, penalty * reduced_prior])
    weights = np.linalg.lstsq(augmented, padded_target, rcond=None)[0]
    weights = weights if basis is None else basis @ weights
    residual = target - features @ weights
    return weights, float(residual @ residual / num_rows)


def apply_step(weights: Sequence[float], x_T: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``w_0 x_T + sum_j w_{j+1} ê_j`` in the dtype of ``x_T``; ``len(weights) == len(outputs) + 1``."""
    if len(weights) != len(outputs) + 1:
        raise ValueError(f"{len(weights)} weights for x_T and {len(outputs)} outputs")
    result = float(weights[0]) * x_T
    for weight, output in zip(weights[1:], outputs):
        result = result + float(weight) * output.to(x_T.dtype)
    return result


def rollout(
    coefficients: np.ndarray, denoiser: Denoiser, x_T: torch.Tensor, cond: Any, timesteps: Sequence[int | float]
) -> torch.Tensor:
    """Run a K-step OLSS sampler with its own model calls; returns the final state ``(B, *shape)``.

    Args:
        coefficients: ``(K, K+1)`` plan coefficients.
        timesteps: ``(K,)`` model timesteps of the steps (``Plan.timesteps``).
    """
    outputs: list[torch.Tensor] = []
    x = x_T
    for i, t in enumerate(timesteps):
        outputs.append(denoiser(x, model_timestep(t), cond))
        x = apply_step(coefficients[i, : i + 2], x_T, outputs)
    return x


def fit_on_policy(
    nodes: Sequence[int],
    denoiser: Denoiser,
    states: Any,
    cond: Any,
    timesteps: Sequence[int] | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Plan:
    """On-policy OLSS fit of a path, in one process.

    Args:
        nodes: K strictly increasing teacher indices from 0.
        denoiser: ``denoiser(x, t, cond) -> eps``.
        states: ``(B, N+1, *shape)`` teacher states (numpy or torch); ``x_T = states[:, 0]``.
        cond: conditioning for the B samples.
        timesteps: ``(N,)`` teacher model timesteps (int VP, float flow); default ``trailing_timesteps(N)`` of a
            1000-step VP model.
        ridge: relative ridge weight (see ``solve_step``).

    Returns:
        A Plan with ``fit == "on_policy"`` and the on-policy step errors.
    """
    states = as_tensor(states)
    num_teacher_steps = states.shape[1] - 1
    timesteps = trailing_timesteps(num_teacher_steps) if timesteps is None else check_model_timesteps(timesteps)
    if len(timesteps) != num_teacher_steps:
        raise ValueError(f"{len(timesteps)} timesteps for states with {num_teacher_steps} teacher steps")
    if not torch.isfinite(states).all():
        raise ValueError("states contain NaN or Inf")
    nodes = check_nodes(nodes, num_teacher_steps)
    targets = states[:, nodes[1:] + [num_teacher_steps]]
    coefficients, step_errors = fit_on_policy_targets(
        timesteps[nodes], denoiser, states[:, 0], targets.transpose(0, 1), cond, ridge
    )
    return Plan(
        nodes=nodes,
        timesteps=timesteps[nodes],
        coefficients=coefficients,
        step_errors=step_errors,
        search_errors=np.full(len(nodes), np.nan),
        fit="on_policy",
        spacing="given",
        num_teacher_steps=num_teacher_steps,
    )


def fit_on_policy_targets(
    step_timesteps: Sequence[int | float],
    denoiser: Denoiser,
    x_T: torch.Tensor,
    targets: Sequence[torch.Tensor],
    cond: Any,
    ridge: float = DEFAULT_RIDGE,
) -> tuple[np.ndarray, np.ndarray]:
    """The K on-policy rounds over one batch.

    Args:
        step_timesteps: ``(K,)`` model timesteps of the nodes.
        x_T: ``(B, *shape)`` initial noise.
        targets: K tensors ``(B, *shape)``: teacher states at ``nodes[1:]`` and the final state.

    Returns:
        coefficients ``(K, K+1)`` and step_errors ``(K,)``.
    """
    steps = len(step_timesteps)
    coefficients = np.zeros((steps, steps + 1))
    step_errors = np.zeros(steps)
    outputs: list[torch.Tensor] = []
    x = x_T
    for i in range(steps):
        outputs.append(denoiser(x, model_timestep(step_timesteps[i]), cond))
        statistics = step_statistics(x_T, outputs, targets[i])
        weights, step_errors[i] = solve_step(statistics, targets[i].numel(), ridge)
        coefficients[i, : i + 2] = weights
        x = apply_step(weights, x_T, outputs)
    return coefficients, step_errors

