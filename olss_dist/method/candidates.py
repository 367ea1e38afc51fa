"""The candidates of one step count: fitted paths on planner, even and quadratic nodes, the same on planner
nodes with fewer outputs per step (a reduced basis of order ``q``, ``core.onpolicy.step_basis``), the
paper's fit, the built-ins in OLSS form, and the trust-region fits around the best built-in (``method.run``
scores them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from olss_dist.core.builtin import ProcessBuiltins, exact_vp_config
from olss_dist.core.calibration import Calibration
from olss_dist.core.onpolicy import DEFAULT_RIDGE
from olss_dist.core.path_search import check_num_steps, even_nodes

logger = logging.getLogger(__name__)

DEFAULT_RIDGES = (DEFAULT_RIDGE, 10 * DEFAULT_RIDGE)
DEFAULT_ORDERS = (2,)
"""Orders of the reduced-basis candidates (step ``i`` fits ``[x̂_i, ê_{i-q+1}, ..., ê_i]``; docs/evaluation.md, "Fewer
outputs per step": order 1 never shipped, order 3 won once and lost once)."""
REDUCED_SPACINGS = ("minimax",)
"""Paths of the reduced-basis candidates (even nodes, the trailing built-ins' own, never shipped one: left out)."""


@dataclass
class Candidate:
    """A path to score: fixed coefficients (``coefficients`` given) or to be fitted on-policy.

    ``timesteps``: ``(K,)`` the model timesteps it samples at; None: the teacher's at ``nodes``
    (every fitted candidate). Built-ins carry their own (a flow built-in's are off the teacher's grid).
    """

    name: str
    nodes: list[int]
    spacing: str
    fit: str
    ridge: float | None = None
    coefficients: np.ndarray | None = None
    step_errors: np.ndarray | None = None
    timesteps: np.ndarray | None = None
    prior: np.ndarray | None = None
    order: int | None = None

    def step_timesteps(self, teacher_timesteps: np.ndarray) -> np.ndarray:
        """``(K,)`` the model timesteps of its steps."""
        return teacher_timesteps[self.nodes] if self.timesteps is None else self.timesteps


def quadratic_nodes(num_teacher_steps: int, num_steps: int) -> list[int]:
    """Nodes ``N (i/K)^2`` made strictly increasing: dense at the start (high noise), sparse at the end."""
    check_num_steps(num_teacher_steps, num_steps)
    nodes = []
    for i in range(num_steps):
        node = int(num_teacher_steps * (i / num_steps) ** 2)
        nodes.append(max(node, nodes[-1] + 1) if nodes else 0)
    overflow = nodes[-1] - (num_teacher_steps - 1)
    return nodes if overflow <= 0 else even_nodes(num_teacher_steps, num_steps)


builtin_config = exact_vp_config
"""A diffusers scheduler config with exactly a VP model's noise schedule (``core.builtin.exact_vp_config``)."""


def candidates_for(
    calibration: Calibration,
    num_steps: int,
    process_solvers: ProcessBuiltins,
    builtins: Sequence[str] | None = None,
    ridges: Sequence[float] = DEFAULT_RIDGES,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> list[Candidate]:
    """Every candidate for ``num_steps`` steps, in a fixed order (ties go to the earlier one).

    Args:
        process_solvers: how the noise process's built-ins are built (``core.builtin.process_builtins``).
        builtins: the built-in solvers to include; None: the process's (``process_solvers.names``).
        ridges: relative ridge weights of the full on-policy fits.
        orders: reduced-basis orders ``q`` fitted on the ``REDUCED_SPACINGS`` nodes (with ``DEFAULT_RIDGE``); an
            order that is the full fit at every step (``q >= num_steps``) is left out; (): none.
    """
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
    candidates += [
        Candidate(f"on_policy/{spacing}/order={order}", nodes, spacing, "on_policy", ridge=DEFAULT_RIDGE, order=int(order))
        for spacing, nodes in paths.items() if spacing in REDUCED_SPACINGS
        for order in orders if order < num_steps
    ]
    candidates.append(
        Candidate("teacher_forced/minimax", minimax.nodes, "minimax", "teacher_forced",
                  coefficients=minimax.coefficients, step_errors=minimax.step_errors)
    )
    for name in process_solvers.names if builtins is None else builtins:
        try:
            plan = process_solvers.plan(name, num_steps, calibration.timesteps)
        except ValueError as error:
            logger.warning("built-in %s skipped at %d steps: %s", name, num_steps, error)
            continue
        candidates.append(Candidate(f"builtin/{name}", plan.nodes, plan.spacing, plan.fit,
                                    coefficients=plan.coefficients, timesteps=plan.timesteps))
    return candidates


def candidate_record(candidate: Candidate, coefficients: np.ndarray, scores: dict[str, float]) -> dict[str, Any]:
    """The JSON-able report entry of a scored candidate."""
    return {
        "name": candidate.name,
        "nodes": candidate.nodes,
        "spacing": candidate.spacing,
        "fit": candidate.fit,
        "ridge": candidate.ridge,
        "order": candidate.order,
        "max_abs_coefficient": float(np.abs(coefficients).max()),
        "error": scores["rmse"],
        **scores,
    }


def trust_region_candidates(group: Sequence[Candidate], rmse: Sequence[float], ridges: Sequence[float]) -> list[Candidate]:
    """On-policy fits on the nodes of the best built-in (lowest ``rmse`` among ``group``'s built-ins) whose
    ridge pulls each step towards that built-in's row instead of towards zero: a trust region around a
    stable solver (a large ridge gives the built-in back; ``ridges`` from small to large trade the fit's gain
    for the built-in's robustness, and validation picks). None without a built-in or ridges.

    The candidate calls the model at the teacher's timesteps of those nodes (a flow built-in's own
    timesteps are generally off the teacher's grid, its nodes the nearest teacher indices).
    """
    builtins = [(r, i) for i, (c, r) in enumerate(zip(group, rmse)) if c.fit.startswith("builtin") and np.isfinite(r)]
    if not builtins or not ridges:
        return []
    best = group[min(builtins)[1]]
    solver = best.fit.partition(":")[2]
    return [
        Candidate(f"trust_region/{solver}/ridge={ridge:g}", list(best.nodes), best.spacing, "on_policy",
                  ridge=float(ridge), prior=np.asarray(best.coefficients, dtype=np.float64))
        for ridge in ridges
    ]
