"""A plan: the K teacher nodes kept and the coefficients of each sampler step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Plan:
    """A K-step sampler in OLSS form.

    Step ``i`` computes ``x_{i+1} = c[i, 0] * x_T + sum_{j <= i} c[i, j+1] * eps_j`` where ``eps_j`` is the
    model's guided output at step ``j``, called at model timestep ``timesteps[j]`` (through
    ``core.teacher.model_timestep``). The plan's own ``timesteps`` are what a sampler runs; ``nodes`` say
    where they sit on the teacher.

    A plan that starts mid-way (img2img, inpainting; ``start_step = s > 0``) is the tail of a ``K``-step
    sampler: its ``K - s`` steps run from the sample at step ``s`` (the noised image), which takes the place of
    ``x_T`` in the rows: step ``r`` computes ``x_{s+r+1} = c[r, 0] * x_start + sum_{j <= r} c[r, j+1] * eps_{s+j}``.
    Its ``nodes`` and ``timesteps`` are those of the ``K``-step start-0 plan from index ``s`` on.

    Attributes:
        nodes: K (``K - start_step``) strictly increasing teacher indices, ``nodes[0] == 0`` (start-0 plans).
            For fitted plans and VP built-ins ``timesteps == teacher_timesteps[nodes]``. Flow built-ins' K-step
            timesteps are generally not on the teacher's grid: their nodes are the nearest teacher indices
            (made strictly increasing), informative only (search errors, reports); nothing samples or
            validates at them.
        timesteps: ``(K,)`` model timesteps of the steps: int64 train timesteps in ``[0, T)`` (VP) or
            float64 ``sigma * 1000`` in ``[0, T]`` (flow matching). Integer input stays int64, float input
            float64 (``core.teacher.check_model_timesteps``'s rule, without its checks).
        coefficients: ``(K, K+1)`` float64, zeros right of the diagonal ``j = i + 1``.
        step_errors: ``(K,)`` float64 mean squared error per element of each fitted step.
        search_errors: ``(K,)`` float64 local errors of the path search (NaN where not searched).
        fit: ``"teacher_forced"``, ``"on_policy"``, or ``"builtin:<solver>"`` for a converted solver.
        spacing: how the nodes were chosen (``"minimax"``, ``"uniform"``, ``"trailing"``...).
        candidates: every candidate considered for this step count with its validation scores.
        num_teacher_steps: N of the calibration the nodes index into.
        starts: for a start-0 plan, what calibrating its mid-way starts found, one record per start step
            (strength, start node, validation errors of the start plan and of the built-ins on the same
            timesteps, whether the start plan serves or the scheduler's built-in fallback does).
        start_step: ``s``, the index of the ``K``-step schedule this plan starts at (0: from pure noise); the
            shapes above are then ``(K - s,)`` and ``(K - s, K - s + 1)``, and ``num_steps`` is still ``K``.
        choice: why this candidate ships (``method.choice.Choice.record``: the best built-in, the bootstrap
            interval of the RMSE ratio, a fallback to the built-in and its reason); empty when not chosen so.
    """

    nodes: list[int]
    timesteps: np.ndarray
    coefficients: np.ndarray
    step_errors: np.ndarray
    search_errors: np.ndarray
    fit: str = "teacher_forced"
    spacing: str = "minimax"
    candidates: list[dict[str, Any]] = field(default_factory=list)
    num_teacher_steps: int | None = None
    starts: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0
    choice: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.nodes = [int(n) for n in self.nodes]
        timesteps = np.asarray(self.timesteps)
        integer = np.issubdtype(timesteps.dtype, np.integer) or timesteps.size == 0
        self.timesteps = timesteps.astype(np.int64 if integer else np.float64)
        self.coefficients = np.asarray(self.coefficients, dtype=np.float64)
        self.step_errors = np.asarray(self.step_errors, dtype=np.float64)
        self.search_errors = np.asarray(self.search_errors, dtype=np.float64)
        start = self.start_step
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"start_step must be a non-negative integer, got {self.start_step!r}")
        self.start_step = int(self.start_step)
        k = len(self.nodes)
        if self.timesteps.shape != (k,) or self.coefficients.shape != (k, k + 1):
            raise ValueError(
                f"plan with {k} nodes needs timesteps ({k},) and coefficients ({k}, {k + 1}), got "
                f"{self.timesteps.shape} and {self.coefficients.shape}"
            )

    @property
    def num_steps(self) -> int:
        """K, the step count of the schedule (a start plan runs its last ``K - start_step`` steps)."""
        return len(self.nodes) + self.start_step

    @property
    def key(self) -> tuple[int, int]:
        """``(num_steps, start_step)``: what tells plans apart (contract C2)."""
        return self.num_steps, self.start_step

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (``starts`` and ``start_step`` only when set, so other plans read as before)."""
        return {
            "num_steps": self.num_steps,
            "nodes": self.nodes,
            "timesteps": self.timesteps.tolist(),
            "coefficients": self.coefficients.tolist(),
            "step_errors": self.step_errors.tolist(),
            "search_errors": [None if np.isnan(e) else e for e in self.search_errors.tolist()],
            "fit": self.fit,
            "spacing": self.spacing,
            "candidates": self.candidates,
            "num_teacher_steps": self.num_teacher_steps,
            **({"starts": self.starts} if self.starts else {}),
            **({"start_step": self.start_step} if self.start_step else {}),
            **({"choice": self.choice} if self.choice else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        search = data.get("search_errors") or [None] * len(data["nodes"])
        return cls(
            nodes=data["nodes"],
            timesteps=data["timesteps"],
            coefficients=data["coefficients"],
            step_errors=data.get("step_errors") or [np.nan] * len(data["nodes"]),
            search_errors=[np.nan if e is None else e for e in search],
            fit=data.get("fit", "teacher_forced"),
            spacing=data.get("spacing", "minimax"),
            candidates=list(data.get("candidates", [])),
            num_teacher_steps=data.get("num_teacher_steps"),
            starts=list(data.get("starts", [])),
            start_step=data.get("start_step", 0),
            choice=dict(data.get("choice") or {}),
        )
