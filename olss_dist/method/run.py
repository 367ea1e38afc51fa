"""The whole method: teacher statistics, candidate paths, on-policy fits, validated choice.

For each step count K the candidates are the minimax path of the planner, evenly spaced nodes and
quadratically spaced nodes (dense at high noise), each fitted on-policy with two small ridge weights
(unregularised fits on nearly collinear outputs reach coefficients of 1e9 and blow up on new
samples; 1e-6 and 1e-5 relative to the feature norms keep them near the DDIM scale), the paper's
teacher-forced fit on the minimax path, and the built-in linear solvers (DDIM, DPM-Solver++ 2M,
UniPC, DEIS with "trailing" spacing) in OLSS form. Every candidate is scored by the
on-policy error of its final state against the teacher's on held-out validation samples; the best
one ships, and every score is kept in ``Plan.candidates``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from olss_dist.core.builtin import LINEAR_BUILTINS, builtin_plan
from olss_dist.core.calibration import Calibration, as_tensor
from olss_dist.core.onpolicy import DEFAULT_RIDGE, solve_step
from olss_dist.core.plan import Plan
from olss_dist.core.path_search import check_num_steps, even_nodes
from olss_dist.method.rollouts import TRAIN, VALIDATION, InProcessBackend, RolloutBackend, error_summary
from olss_dist.core.teacher import Denoiser, validate_timesteps
from olss_dist.core.tsqr import merge_r_factors

logger = logging.getLogger(__name__)

DEFAULT_STEPS = (5, 10, 20)
DEFAULT_BUILTINS = LINEAR_BUILTINS  # every built-in solver with an exact OLSS form
DEFAULT_RIDGES = (DEFAULT_RIDGE, 10 * DEFAULT_RIDGE)


@dataclass
class Candidate:
    """A path to score: fixed coefficients (``coefficients`` given) or to be fitted on-policy."""

    name: str
    nodes: list[int]
    spacing: str
    fit: str
    ridge: float | None = None
    coefficients: np.ndarray | None = None
    step_errors: np.ndarray | None = None


def quadratic_nodes(num_teacher_steps: int, num_steps: int) -> list[int]:
    """Nodes ``N (i/K)^2`` made strictly increasing: dense at the start (high noise), sparse at the end."""
    check_num_steps(num_teacher_steps, num_steps)
    nodes = []
    for i in range(num_steps):
        node = int(num_teacher_steps * (i / num_steps) ** 2)
        nodes.append(max(node, nodes[-1] + 1) if nodes else 0)
    overflow = nodes[-1] - (num_teacher_steps - 1)
    return nodes if overflow <= 0 else even_nodes(num_teacher_steps, num_steps)


def builtin_config(alphas_cumprod: np.ndarray) -> dict[str, Any]:
    """A diffusers scheduler config with exactly the model's noise schedule (as trained betas)."""
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    betas = 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
    return {"num_train_timesteps": len(alphas_cumprod), "trained_betas": betas.tolist()}


def candidates_for(
    calibration: Calibration,
    num_steps: int,
    alphas_cumprod: np.ndarray,
    builtins: Sequence[str] = DEFAULT_BUILTINS,
    ridges: Sequence[float] = DEFAULT_RIDGES,
) -> list[Candidate]:
    """Every candidate for ``num_steps`` steps, in a fixed order (ties go to the earlier one)."""
    n = calibration.num_teacher_steps
    minimax = calibration.plan(num_steps)
    paths = {"minimax": minimax.nodes}
    for spacing, nodes in (("uniform", even_nodes(n, num_steps)), ("quadratic", quadratic_nodes(n, num_steps))):
        if nodes not in paths.values():
            paths[spacing] = nodes
    candidates = [
        Candidate(f"on_policy/{spacing}/ridge={ridge:g}", nodes, spacing, "on_policy", ridge=ridge)
        for spacing, nodes in paths.items()
        for ridge in ridges
    ]
    candidates.append(
        Candidate("teacher_forced/minimax", minimax.nodes, "minimax", "teacher_forced",
                  coefficients=minimax.coefficients, step_errors=minimax.step_errors)
    )
    config = builtin_config(alphas_cumprod)
    for name in builtins:
        try:
            plan = builtin_plan(name, num_steps, config, calibration.timesteps)
        except ValueError as error:
            logger.warning("built-in %s skipped at %d steps: %s", name, num_steps, error)
            continue
        candidates.append(Candidate(f"builtin/{name}", plan.nodes, "trailing", plan.fit, coefficients=plan.coefficients))
    return candidates


def fit_candidate(backend: RolloutBackend, candidate: Candidate, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """On-policy coefficients ``(K, K+1)`` and step errors ``(K,)`` of a candidate's nodes, on the train split."""
    nodes = candidate.nodes
    targets = nodes[1:] + [len(timesteps)]
    coefficients = np.zeros((len(nodes), len(nodes) + 1))
    step_errors = np.zeros(len(nodes))
    handle = backend.start(TRAIN, int(timesteps[nodes[0]]))
    try:
        for i, target in enumerate(targets):
            statistics = merge_r_factors([f.cpu() for f in backend.statistics(handle, target)])
            weights, step_errors[i] = solve_step(statistics, backend.num_train_rows, candidate.ridge or 0.0)
            coefficients[i, : i + 2] = weights
            next_timestep = int(timesteps[nodes[i + 1]]) if i + 1 < len(nodes) else None
            backend.advance(handle, weights, next_timestep)
    finally:
        backend.close(handle)
    return coefficients, step_errors


def validation_errors(backend: RolloutBackend, coefficients: np.ndarray, step_timesteps: Sequence[int]) -> np.ndarray:
    """``(V,)`` per-sample mean squared error of the sampler's final state on the validation split."""
    handle = backend.start(VALIDATION, int(step_timesteps[0]))
    try:
        for i in range(len(step_timesteps)):
            next_timestep = int(step_timesteps[i + 1]) if i + 1 < len(step_timesteps) else None
            backend.advance(handle, coefficients[i, : i + 2], next_timestep)
        return backend.final_errors(handle)
    finally:
        backend.close(handle)


def candidate_record(candidate: Candidate, coefficients: np.ndarray, scores: dict[str, float]) -> dict[str, Any]:
    """The JSON-able report entry of a scored candidate."""
    return {
        "name": candidate.name,
        "nodes": candidate.nodes,
        "spacing": candidate.spacing,
        "fit": candidate.fit,
        "ridge": candidate.ridge,
        "max_abs_coefficient": float(np.abs(coefficients).max()),
        "error": scores["rmse"],
        **scores,
    }


def run_method(
    backend: RolloutBackend,
    timesteps: Any,
    alphas_cumprod: Any,
    steps: Sequence[int] = DEFAULT_STEPS,
    builtins: Sequence[str] = DEFAULT_BUILTINS,
    ridges: Sequence[float] = DEFAULT_RIDGES,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[int, Plan], Calibration]:
    """The method on any backend: returns the validated best plan per step count and the calibration."""
    progress = progress or (lambda message: None)
    timesteps = validate_timesteps(timesteps, len(alphas_cumprod))
    for k in steps:
        check_num_steps(len(timesteps), k)
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    calibration = backend.record_teacher(timesteps, alphas_cumprod)
    candidates = {k: candidates_for(calibration, k, alphas_cumprod, builtins, ridges) for k in steps}
    backend.keep_train_states({n for group in candidates.values() for c in group for n in c.nodes})
    plans = {}
    for k, group in candidates.items():
        scored = []
        for candidate in group:
            if candidate.coefficients is None:
                candidate.coefficients, candidate.step_errors = fit_candidate(backend, candidate, timesteps)
            scores = error_summary(validation_errors(backend, candidate.coefficients, timesteps[candidate.nodes]))
            scored.append(candidate_record(candidate, candidate.coefficients, scores))
            progress(f"{k} steps: {candidate.name} validation RMSE {scores['rmse']:.4g}")
        best_index = int(np.argmin([s["rmse"] for s in scored]))
        best = group[best_index]
        plans[k] = Plan(
            nodes=best.nodes,
            timesteps=timesteps[best.nodes],
            coefficients=best.coefficients,
            step_errors=best.step_errors if best.step_errors is not None else np.full(k, np.nan),
            search_errors=calibration.search_errors(best.nodes),
            fit=best.fit,
            spacing=best.spacing,
            candidates=scored,
            num_teacher_steps=len(timesteps),
        )
    return plans, calibration


def check_split(noise: Any, cond: Any, name: str) -> torch.Tensor:
    noise = as_tensor(noise)
    if noise.ndim < 2 or len(noise) == 0:
        raise ValueError(f"{name} must be a non-empty batch (B, *latent_shape), got shape {tuple(noise.shape)}")
    if len(cond) != len(noise):
        raise ValueError(f"{name} has {len(noise)} samples but its conditioning has {len(cond)}")
    if not torch.isfinite(noise).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return noise


def calibrate(
    denoiser: Denoiser,
    noise: Any,
    cond: Any,
    timesteps: Any,
    alphas_cumprod: Any,
    steps: Sequence[int] = DEFAULT_STEPS,
    validation_noise: Any = None,
    validation_cond: Any = None,
    builtins: Sequence[str] = DEFAULT_BUILTINS,
    ridges: Sequence[float] = DEFAULT_RIDGES,
    batch_size: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[int, Plan]:
    """OLSS calibration in one process: the reference the distributed job reproduces.

    Args:
        denoiser: ``denoiser(x, t, cond) -> guided eps``.
        noise: ``(B, *shape)`` train initial noise; ``cond`` its conditioning (indexable along B).
        timesteps: ``(N,)`` strictly decreasing teacher timesteps.
        alphas_cumprod: ``(num_train_timesteps,)`` the model's cumulative alphas.
        steps: step counts to plan.
        validation_noise, validation_cond: held-out samples that choose among candidates.
        builtins: built-in solvers to include as candidates.
        ridges: relative ridge weights of the on-policy fits.
        batch_size: samples per model call.
        progress: called with a line per finished stage.

    Returns:
        ``{K: Plan}``, the validated best plan per step count.
    """
    if validation_noise is None or validation_cond is None:
        raise ValueError("calibrate needs validation_noise and validation_cond (held-out samples choose the plan)")
    noise = check_split(noise, cond, "noise")
    validation_noise = check_split(validation_noise, validation_cond, "validation_noise")
    backend = InProcessBackend(denoiser, noise, cond, validation_noise, validation_cond, batch_size, progress)
    return run_method(backend, timesteps, alphas_cumprod, steps, builtins, ridges, progress)[0]
