"""Diffusers' built-in solvers: the one registry, the one way to build them, and their exact OLSS form.

``BUILTIN_SOLVERS`` lists every solver the project uses: the evaluation compares all of them, and
the calibration method offers the linear ones as candidate plans. ``builtin_scheduler`` builds any of
them from a model's scheduler config and a spacing (``"config"``: the model's own, as users get it
from ``Class.from_config``; ``"trailing"``: trailing timesteps, last step to the clean sample).

A scheduler whose step is linear in ``(sample, model_output)`` with fixed timesteps (DDIM, DPM-Solver++
multistep, UniPC, DEIS; epsilon prediction, no thresholding or clipping) produces states that are fixed
linear combinations of ``x_T`` and the outputs so far. Running it on basis vectors reads those
combinations off: ``x_T = (1, 0, ..., 0)`` and the output at step ``j`` the unit vector ``j+1`` of a
``(K+1)``-dimensional space; the state after step ``i`` is row ``i`` of the coefficients.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from olss_dist.core.plan import Plan

SPACINGS: dict[str, dict[str, Any]] = {
    "config": {},
    "trailing": {"timestep_spacing": "trailing", "set_alpha_to_one": True},
}
"""Overrides of the model's scheduler config per spacing; a key a solver does not take is left out."""

LINEAR_SETTINGS: dict[str, Any] = {"clip_sample": False, "thresholding": False}
"""What keeps a linear solver's step linear: no clipping or thresholding of the predicted clean sample."""


@dataclass(frozen=True)
class BuiltinSolver:
    """One diffusers solver of the registry.

    Attributes:
        scheduler_class: the diffusers scheduler class.
        settings: what names the solver (e.g. DPM-Solver++ 2M); everything else comes from the model's config.
        linear: its step is linear in ``(sample, output)`` once ``LINEAR_SETTINGS`` apply, with one model
            call per step on the state itself, so ``builtin_plan`` writes it exactly in OLSS form. PNDM
            (Runge-Kutta warm-up: more calls than steps) and Euler (model input rescaled by
            ``scale_model_input``) are not.
    """

    scheduler_class: type
    settings: dict[str, Any] = field(default_factory=dict)
    linear: bool = False

    def accepts(self, key: str) -> bool:
        """Whether the scheduler's ``__init__`` takes ``key``."""
        return key in inspect.signature(self.scheduler_class.__init__).parameters

    def overrides(self, spacing: str, linear: bool = False) -> dict[str, Any]:
        """The settings over the model's config: the solver's own, the spacing's and (``linear``) ``LINEAR_SETTINGS``,
        each key only where the scheduler takes it; always epsilon prediction (model adapters return epsilon)."""
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; choose from {sorted(SPACINGS)}")
        taken = {**SPACINGS[spacing], **(LINEAR_SETTINGS if linear else {})}
        return {**self.settings, **{k: v for k, v in taken.items() if self.accepts(k)}, "prediction_type": "epsilon"}


BUILTIN_SOLVERS: dict[str, BuiltinSolver] = {
    "ddim": BuiltinSolver(DDIMScheduler, linear=True),
    "pndm": BuiltinSolver(PNDMScheduler),
    "dpmsolver++": BuiltinSolver(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, linear=True),
    "unipc": BuiltinSolver(UniPCMultistepScheduler, linear=True),
    "euler": BuiltinSolver(EulerDiscreteScheduler),
    "deis": BuiltinSolver(DEISMultistepScheduler, linear=True),
}
"""Every built-in solver, by the name reports and candidates use."""

LINEAR_BUILTINS: tuple[str, ...] = tuple(name for name, solver in BUILTIN_SOLVERS.items() if solver.linear)
"""The solvers with an exact OLSS form, in registry order: ``("ddim", "dpmsolver++", "unipc", "deis")``."""


def check_builtins(names, linear: bool = False) -> None:
    """ValueError naming the names not in ``BUILTIN_SOLVERS`` (with ``linear``: also those without an OLSS form)."""
    unknown = [name for name in names if name not in BUILTIN_SOLVERS]
    if unknown:
        raise ValueError(f"unknown built-in solvers {unknown}; choose from {sorted(BUILTIN_SOLVERS)}")
    nonlinear = [name for name in names if linear and not BUILTIN_SOLVERS[name].linear]
    if nonlinear:
        raise ValueError(f"built-in solvers {nonlinear} have no OLSS form; choose from {list(LINEAR_BUILTINS)}")


def builtin_scheduler(name: str, model_scheduler_config: dict[str, Any], spacing: str = "config", linear: bool = False):
    """Built-in solver ``name`` from the model's scheduler config, as ``Class.from_config`` gives it to users.

    Args:
        name: a key of ``BUILTIN_SOLVERS``.
        model_scheduler_config: the model's own diffusers scheduler config (noise schedule and defaults).
        spacing: a key of ``SPACINGS``: ``"config"`` (the model's setting) or ``"trailing"``.
        linear: also apply ``LINEAR_SETTINGS`` (what ``builtin_plan`` needs); only for ``LINEAR_BUILTINS``.
    """
    check_builtins([name], linear)
    solver = BUILTIN_SOLVERS[name]
    return solver.scheduler_class.from_config(dict(model_scheduler_config), **solver.overrides(spacing, linear))


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
    """The built-in solver ``name`` (one of ``LINEAR_BUILTINS``) at ``num_steps`` steps as a Plan (``fit == "builtin:<name>"``).

    Args:
        model_scheduler_config: the model's scheduler config (``method.run.builtin_config`` builds one from
            ``alphas_cumprod``).
        teacher_timesteps: ``(N,)`` the teacher the plan's nodes index into.
        spacing: a key of ``SPACINGS``.

    Raises:
        ValueError: a timestep of the solver is not on the teacher's grid (no node index for it).
    """
    scheduler = builtin_scheduler(name, model_scheduler_config, spacing, linear=True)
    timesteps, coefficients = scheduler_coefficients(scheduler, num_steps)
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
