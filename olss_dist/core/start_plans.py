"""Plans that start mid-way (img2img, inpainting): where they start, and the built-ins they must beat.

An img2img or inpainting pipeline asked for strength ``σ`` and ``K`` steps calls ``set_timesteps(K)`` and
keeps the last ``K - s`` timesteps, ``s = K - int(K * σ)`` (diffusers' ``get_timesteps``), starting from the
noised image there. A start plan for ``(K, s)`` runs on the nodes of the shipped ``K``-step plan from index
``s`` on, with the sample at step ``s`` in place of ``x_T`` (contract C2, ../shared/MATH.md "Starting
mid-way"). It ships only where it beats the built-ins in OLSS form on the same timesteps, the ones
``OLSSScheduler`` would otherwise fall back to: DDIM (VP; FlowMatch Euler on flow models) over those
timesteps, and DPM-Solver++ 2M over them (VP), both started at step ``s`` as diffusers starts them (first
order at the first step).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from olss_dist.core.builtin import builtin_scheduler, exact_vp_config
from olss_dist.core.noise_process import FlowMatchingProcess, NoiseProcess, VPProcess
from olss_dist.core.teacher import TeacherSchedule, ddim_schedule

def start_step(num_steps: int, strength: float) -> int:
    """``s = K - int(K * strength)``: the index of the first step an img2img pipeline runs (``get_timesteps``)."""
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    return int(num_steps) - int(int(num_steps) * float(strength))


def start_steps(num_steps: int, strengths: Sequence[float]) -> list[tuple[float, int]]:
    """``[(strength, s), ...]`` of the strengths that start strictly inside a ``K``-step schedule (``0 < s < K``),
    the first strength of each distinct ``s`` only, in the order given."""
    seen: set[int] = set()
    starts = []
    for strength in strengths:
        s = start_step(num_steps, strength)
        if 0 < s < num_steps and s not in seen:
            seen.add(s)
            starts.append((float(strength), s))
    return starts


def schedule_coefficients(schedule: TeacherSchedule) -> np.ndarray:
    """``(K, K+1)`` OLSS rows of a schedule linear in state and output, over ``[x_start, o_0, ..., o_{K-1}]``.

    ``x_{i+1} = a_i x_i + b_i o_i`` gives row ``i = a_i * row_{i-1} + b_i * e_{i+1}`` with ``row_{-1} = e_0``.
    """
    steps = schedule.num_steps
    rows = np.zeros((steps, steps + 1))
    row = np.zeros(steps + 1)
    row[0] = 1.0
    for i in range(steps):
        row = schedule.state_coefficients[i] * row
        row[i + 1] += schedule.output_coefficients[i]
        rows[i] = row
    return rows


def first_order_schedule(process: NoiseProcess, timesteps: Sequence[int | float]) -> TeacherSchedule:
    """The first-order solver of ``process`` over ``timesteps`` (strictly decreasing), ending at the clean sample:
    DDIM (VP, its outputs in ``process.output_type`` form) or FlowMatch Euler (flow, ``σ = t / T``)."""
    timesteps = np.asarray(timesteps)
    if isinstance(process, VPProcess):
        return ddim_schedule(timesteps.astype(np.int64), process.alphas_cumprod, output_type=process.output_type)
    if isinstance(process, FlowMatchingProcess):
        sigmas = np.append(timesteps.astype(np.float64) / process.num_train_timesteps, 0.0)
        steps = len(timesteps)
        return TeacherSchedule(timesteps.astype(np.float64), np.ones(steps), np.diff(sigmas), integer_timesteps=False)
    raise ValueError(f"process: no first-order solver for a {type(process).__name__}")


def dpmsolver_start_coefficients(process: VPProcess, timesteps: Sequence[int], start: int) -> np.ndarray:
    """``(K-s, K-s+1)`` OLSS rows of DPM-Solver++ 2M over the K ``timesteps``, started at index ``start``
    (``set_begin_index``), read off diffusers' scheduler on basis vectors (``core.builtin``'s method)."""
    scheduler = builtin_scheduler("dpmsolver++", exact_vp_config(process.alphas_cumprod), "trailing", linear=True)
    scheduler.set_timesteps(timesteps=[int(t) for t in timesteps])
    scheduler.set_begin_index(int(start))
    calls = len(timesteps) - int(start)
    basis = torch.eye(calls + 1, dtype=torch.float64)[:, None, :]
    sample, rows = basis[0], []
    for i, t in enumerate(scheduler.timesteps[int(start):]):
        sample = scheduler.step(basis[i + 1], t, sample).prev_sample
        rows.append(sample[0].to(torch.float64))
    return torch.stack(rows).numpy()


def start_builtins(process: NoiseProcess, timesteps: Sequence[int | float], start: int) -> dict[str, np.ndarray]:
    """``{name: (K-s, K-s+1) coefficients}`` of the built-ins a start plan must beat on the K-step ``timesteps``
    started at index ``start``: ``"ddim"`` and ``"dpmsolver++"`` (VP, epsilon outputs; ``"ddim"`` alone for
    v / x0 outputs) or ``"flow-euler"`` (flow)."""
    tail = np.asarray(timesteps)[int(start):]
    first_order = schedule_coefficients(first_order_schedule(process, tail))
    if isinstance(process, FlowMatchingProcess):
        return {"flow-euler": first_order}
    builtins = {"ddim": first_order}
    if getattr(process, "output_type", "epsilon") == "epsilon" and len(tail) > 1:
        builtins["dpmsolver++"] = dpmsolver_start_coefficients(process, timesteps, start)
    return builtins


def tail_of(plan_timesteps: Any, start: int) -> np.ndarray:
    """The timesteps a start plan keeps: ``plan_timesteps[start:]`` (contract C2)."""
    return np.asarray(plan_timesteps)[int(start):]
