"""On-policy fitting: each step is fitted on the states the K-step sampler itself visits.

Round ``i`` fits the teacher state ``s_{n_{i+1}}`` (``s_N`` after the last node) on
``[x_T, ê_0, ..., ê_i]``, where ``ê_j`` are the model's outputs *at the sampler's own states*
``x̂_j``, then moves every sample to ``x̂_{i+1}`` = that fit and calls the model once. K rounds, K
model calls per sample. The per-round reduction is a small ``(i+3, i+3)`` triangular factor that adds
up over samples exactly like the teacher statistics, so shards reduce independently.
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


def solve_step(
    r: np.ndarray | torch.Tensor, num_rows: int, ridge: float = DEFAULT_RIDGE, prior: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Coefficients of one on-policy step from its merged statistics.

    Args:
        r: ``(F+1, F+1)`` R factor of rows ``[features..., target]``.
        num_rows: rows behind ``r`` (samples x latent elements).
        ridge: penalty ``ridge * ||feature_j||^2 * (w_j - prior_j)^2`` added per feature (scale free).
        prior: ``(F,)`` the weights the ridge pulls towards (a trust region around a stable solver's step,
            e.g. a built-in's row); None: zeros (plain ridge). A large ridge returns the prior itself.

    Returns:
        ``(F,)`` float64 weights and the mean squared residual per element (without the penalty).
    """
    r = np.asarray(torch.as_tensor(r, dtype=torch.float64).cpu().numpy())
    features, target = r[:, :-1], r[:, -1]
    norms = np.linalg.norm(features, axis=0)
    prior = np.zeros(len(norms)) if prior is None else np.asarray(prior, dtype=np.float64)
    if prior.shape != norms.shape:
        raise ValueError(f"prior has shape {prior.shape}, the step has {len(norms)} features")
    penalty = np.sqrt(ridge) * norms
    augmented = np.vstack([features, np.diag(penalty)])
    padded_target = np.concatenate([target, penalty * prior])
    weights = np.linalg.lstsq(augmented, padded_target, rcond=None)[0]
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

