"""On-policy node search: coordinate descent over a plan's node positions, each scored by its rollout error.

The minimax planner places nodes by the teacher-forced local error on R; at few steps (5) where the
nodes matter most, evenly spaced and minimax nodes tie. ``search_nodes`` moves one node at a time
(``nodes[0] = 0`` stays: the sampler starts at the noise) by a step that halves from ``N / 8`` down to
one teacher step, refits the plan on-policy at every trial position (``method.run.fit_candidate``: K
model calls per train sample) and keeps a move only when the train split's final-state error of the
refitted sampler drops. Validation samples are never used, so the validated choice that follows
(``method.choice``) still scores the result on samples the search did not see.

``searched_candidate`` is what ``method.run.run_method`` calls for the step counts it searches
(``DEFAULT_NODE_SEARCH_STEPS``), before the train states off the candidates' nodes are dropped.

``refine_coefficients`` measures the other idea of the issue: a few Levenberg-Marquardt (Gauss-Newton)
steps on every coefficient against the final error of the K-step rollout, with finite-difference
Jacobians (one rollout per coefficient). Both need every train teacher state the trial nodes may reach:
run them on a backend that keeps them (``InProcessBackend`` before ``keep_train_states``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from olss_dist.core.onpolicy import rollout
from olss_dist.core.teacher import Denoiser, model_timestep
from olss_dist.method.rollouts import TRAIN, RolloutBackend, per_sample_mse

NODE_SEARCH_MIN_SAMPLES = 32
"""Fewer fit samples get no node search: it is scored on the train split, and would fit their noise."""


@dataclass
class NodeSearch:
    """What ``search_nodes`` found.

    Attributes:
        nodes: the best node positions.
        coefficients: ``(K, K+1)`` their on-policy fit.
        step_errors: ``(K,)`` its per-step train errors.
        train_rmse: pooled train RMSE of the final state, of the start and of the result.
        evaluations: on-policy fits tried.
        history: ``(nodes, train_rmse)`` of every accepted move, in order.
    """

    nodes: list[int]
    coefficients: np.ndarray
    step_errors: np.ndarray
    start_rmse: float
    train_rmse: float
    evaluations: int
    history: list[tuple[list[int], float]] = field(default_factory=list)


def fit_and_score(backend: RolloutBackend, nodes: Sequence[int], timesteps: np.ndarray, ridge: float,
                  prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """On-policy fit of ``nodes`` on the train split and the pooled RMSE of its final train state against the
    teacher's (``(K, K+1)`` coefficients, ``(K,)`` step errors, RMSE); the train rollout of the fit is scored
    before it is closed, so the score costs no model call beyond the fit's K per sample."""
    from olss_dist.core.onpolicy import solve_step
    from olss_dist.core.tsqr import merge_r_factors

    nodes = list(nodes)
    targets = nodes[1:] + [len(timesteps)]
    coefficients = np.zeros((len(nodes), len(nodes) + 1))
    step_errors = np.zeros(len(nodes))
    handle = backend.start(TRAIN, model_timestep(timesteps[nodes[0]]))
    try:
        for i, target in enumerate(targets):
            statistics = merge_r_factors([f.cpu() for f in backend.statistics(handle, target)])
            row_prior = None if prior is None else prior[i, : i + 2]
            weights, step_errors[i] = solve_step(statistics, backend.num_train_rows, ridge, row_prior)
            coefficients[i, : i + 2] = weights
            next_timestep = model_timestep(timesteps[nodes[i + 1]]) if i + 1 < len(nodes) else None
            backend.advance(handle, weights, next_timestep)
        errors = backend.final_errors(handle)
    finally:
        backend.close(handle)
    return coefficients, step_errors, float(np.sqrt(np.mean(errors)))


def search_nodes(
    backend: RolloutBackend,
    nodes: Sequence[int],
    timesteps: np.ndarray,
    ridge: float,
    first_step: int | None = None,
    max_evaluations: int = 200,
    progress: Callable[[str], None] | None = None,
) -> NodeSearch:
    """Coordinate descent over ``nodes[1:]`` from ``nodes`` (see the module docstring).

    Args:
        backend: holds the train samples and every teacher state the trial nodes reach.
        nodes: K strictly increasing teacher indices from 0: the start (e.g. the validated best candidate's).
        timesteps: ``(N,)`` the teacher's model timesteps.
        ridge: relative ridge of every on-policy fit.
        first_step: the first move size in teacher steps (default ``N // 8``); it halves down to 1.
        max_evaluations: stop after this many fits.
        progress: called with a line per accepted move.

    Returns:
        ``NodeSearch`` (the start itself when no move helps).
    """
    progress = progress or (lambda message: None)
    n = len(timesteps)
    best = list(nodes)
    coefficients, step_errors, best_rmse = fit_and_score(backend, best, timesteps, ridge)
    result = NodeSearch(best, coefficients, step_errors, best_rmse, best_rmse, 1, [(list(best), best_rmse)])
    step = max(1, first_step or n // 8)
    while step >= 1 and result.evaluations < max_evaluations:
        moved = True
        while moved and result.evaluations < max_evaluations:
            moved = False
            for i in range(1, len(best)):
                for direction in (-1, 1):
                    trial = list(best)
                    trial[i] += direction * step
                    upper = trial[i + 1] if i + 1 < len(trial) else n
                    if not trial[i - 1] < trial[i] < upper or result.evaluations >= max_evaluations:
                        continue
                    trial_coefficients, trial_errors, rmse = fit_and_score(backend, trial, timesteps, ridge)
                    result.evaluations += 1
                    if np.isfinite(rmse) and rmse < best_rmse * (1 - 1e-3):
                        best, best_rmse, moved = trial, rmse, True
                        result.nodes, result.coefficients, result.step_errors = best, trial_coefficients, trial_errors
                        result.train_rmse = rmse
                        result.history.append((list(best), rmse))
                        progress(f"node search: {best} train RMSE {rmse:.4g} (step {step})")
        step //= 2
    return result


def searched_candidate(backend: RolloutBackend, group: list, timesteps: np.ndarray, evaluations: int,
                       progress: Callable[[str], None]) -> Any:
    """Fits ``group``'s full on-policy candidates on the train split (kept: they are not refitted; the reduced-basis
    ones, ``Candidate.order``, are left to ``method.run.fit_candidate``), then searches
    the nodes (``method.node_search.search_nodes``) from the one of lowest train final-state error, with its
    ridge; the result is one more on-policy candidate (``on_policy/searched/ridge=...``, spacing
    ``"searched"``), None when no move helped or ``group`` has no on-policy candidate. Validation samples are
    not used: the validated choice scores it like the others."""
    from olss_dist.method.run import Candidate  # run imports this module

    scores = []
    for candidate in (c for c in group if c.fit == "on_policy" and c.coefficients is None and c.order is None):
        candidate.coefficients, candidate.step_errors, rmse = fit_and_score(backend, candidate.nodes, timesteps, candidate.ridge or 0.0)
        scores.append((rmse, len(scores), candidate))
    if not scores:
        return None
    start = min(scores, key=lambda score: (not np.isfinite(score[0]), score[0], score[1]))[2]
    found = search_nodes(backend, start.nodes, timesteps, start.ridge or 0.0, max_evaluations=evaluations)
    progress(f"{len(start.nodes)} steps: node search from {start.name} {start.nodes}: {found.nodes}, train RMSE "
             f"{found.start_rmse:.4g} -> {found.train_rmse:.4g} ({found.evaluations} fits)")
    if found.nodes == start.nodes:
        return None
    return Candidate(f"on_policy/searched/ridge={start.ridge or 0.0:g}", found.nodes, "searched", "on_policy",
                     ridge=start.ridge, coefficients=found.coefficients, step_errors=found.step_errors)


def refine_coefficients(
    coefficients: np.ndarray,
    denoiser: Denoiser,
    x_T: torch.Tensor,
    cond: Any,
    step_timesteps: Sequence[int | float],
    target: torch.Tensor,
    iterations: int = 3,
    damping: float = 1e-3,
    epsilon: float = 1e-4,
) -> tuple[np.ndarray, list[float]]:
    """Levenberg-Marquardt steps on every coefficient against the final error of the K-step rollout.

    Args:
        coefficients: ``(K, K+1)`` the start (an on-policy fit).
        x_T, cond: the samples to refine on; ``target`` ``(B, *shape)`` their teacher final states.
        step_timesteps: ``(K,)`` the plan's model timesteps.
        iterations: LM steps; a step that does not lower the error raises the damping tenfold instead.
        damping: initial LM damping relative to the diagonal of ``J^T J``.
        epsilon: finite-difference step, relative to ``max(|c|, 1)``.

    Returns:
        the refined coefficients and the pooled RMSE after each accepted step (the start's first).
    """
    rows, columns = np.tril_indices(len(coefficients), k=1, m=len(coefficients) + 1)
    theta = coefficients[rows, columns].astype(np.float64)

    def final(values: np.ndarray) -> torch.Tensor:
        c = np.zeros_like(coefficients)
        c[rows, columns] = values
        return rollout(c, denoiser, x_T, cond, step_timesteps).to(torch.float64).reshape(-1)

    reference = target.to(torch.float64).reshape(-1)
    residual = final(theta) - reference
    history = [float(torch.sqrt((residual**2).mean()))]
    for _ in range(iterations):
        jacobian = torch.empty(len(residual), len(theta), dtype=torch.float64)
        for p in range(len(theta)):
            shifted = theta.copy()
            h = epsilon * max(abs(theta[p]), 1.0)
            shifted[p] += h
            jacobian[:, p] = (final(shifted) - reference - residual) / h
        gram = (jacobian.T @ jacobian).numpy()
        gradient = (jacobian.T @ residual).numpy()
        while damping < 1e6:
            delta = np.linalg.solve(gram + damping * np.diag(np.diag(gram) + 1e-30), -gradient)
            trial_residual = final(theta + delta) - reference
            rmse = float(torch.sqrt((trial_residual**2).mean()))
            if np.isfinite(rmse) and rmse < history[-1]:
                theta, residual, damping = theta + delta, trial_residual, damping / 10
                history.append(rmse)
                break
            damping *= 10
    refined = np.zeros_like(coefficients)
    refined[rows, columns] = theta
    return refined, history


def final_mse(coefficients: np.ndarray, denoiser: Denoiser, x_T: torch.Tensor, cond: Any,
              step_timesteps: Sequence[int | float], target: torch.Tensor) -> np.ndarray:
    """``(B,)`` per-sample MSE of the plan's rollout from ``x_T`` against ``target``."""
    return per_sample_mse(rollout(coefficients, denoiser, x_T, cond, step_timesteps), target)
