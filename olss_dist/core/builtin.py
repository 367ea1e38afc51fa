"""Built-in diffusers solvers written exactly in OLSS form.

A scheduler whose step is linear in ``(sample, model_output)`` with fixed timesteps (DDIM, DPM-Solver++
multistep, UniPC, DEIS; epsilon prediction, no thresholding or clipping) produces states that are fixed
linear combinations of ``x_T`` and the outputs so far. Running it on basis vectors reads those
combinations off: ``x_T = (1, 0, ..., 0)`` and the output at step ``j`` the unit vector ``j+1`` of a
``(K+1)``-dimensional space; the state after step ``i`` is row ``i`` of the coefficients.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from olss_dist.core.plan import Plan

LINEAR_SOLVERS = {
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": True}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, "thresholding": False}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2, "thresholding": False}),
    "deis": (DEISMultistepScheduler, {"solver_order": 2, "thresholding": False}),
}
"""Solvers whose steps are linear in (sample, output), with the settings that keep them linear."""

BASE_CONFIG_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "steps_offset")


def make_builtin_scheduler(name: str, model_scheduler_config: dict[str, Any], spacing: str = "trailing"):
    """A diffusers scheduler ``name`` with the model's noise schedule and the given timestep spacing.

    Args:
        name: a key of ``LINEAR_SOLVERS``.
        model_scheduler_config: the model's own scheduler config (noise schedule keys are taken from it).
        spacing: diffusers' ``timestep_spacing``: ``"trailing"``, ``"leading"`` or ``"linspace"``.
    """
    if name not in LINEAR_SOLVERS:
        raise ValueError(f"unknown built-in solver {name!r}; choose from {sorted(LINEAR_SOLVERS)}")
    scheduler_class, settings = LINEAR_SOLVERS[name]
    config = {k: model_scheduler_config[k] for k in BASE_CONFIG_KEYS if model_scheduler_config.get(k) is not None}
    return scheduler_class(**config, **settings, timestep_spacing=spacing, prediction_type="epsilon")


def scheduler_coefficients(scheduler, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps (K,), coefficients (K, K+1))`` of a linear diffusers scheduler run for ``num_steps``."""
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.numpy().astype(np.int64)
    calls = len(timesteps)
    basis = torch.eye(calls + 1, dtype=torch.float64)[:, None, :]
    sample = basis[0]
    rows = []
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(basis[i + 1], t, sample).prev_sample
        rows.append(sample[0].to(torch.float64))
    return timesteps, torch.stack(rows).numpy()


def builtin_plan(
    name: str, num_steps: int, model_scheduler_config: dict[str, Any], teacher_timesteps: np.ndarray, spacing: str = "trailing"
) -> Plan:
    """The built-in solver ``name`` at ``num_steps`` steps as a Plan (``fit == "builtin:<name>"``).

    Raises:
        ValueError: a timestep of the solver is not on the teacher's grid (no node index for it).
    """
    timesteps, coefficients = scheduler_coefficients(make_builtin_scheduler(name, model_scheduler_config, spacing), num_steps)
    position = {int(t): n for n, t in enumerate(teacher_timesteps)}
    missing = [int(t) for t in timesteps if int(t) not in position]
    if missing:
        raise ValueError(f"{name} timesteps {missing} are not teacher timesteps")
    return Plan(
        nodes=[position[int(t)] for t in timesteps],
        timesteps=timesteps,
        coefficients=coefficients,
        step_errors=np.full(len(timesteps), np.nan),
        search_errors=np.full(len(timesteps), np.nan),
        fit=f"builtin:{name}",
        spacing=spacing,
        num_teacher_steps=len(teacher_timesteps),
    )
