"""The path search of ``olss_dist.core.path_search.search_path`` with its evaluations run as parallel Ray tasks.

R goes into the object store once (``ray.put``); every task reads that one shared copy. The search
makes exactly the decisions of the in-process planner, so it returns exactly the same nodes:

- doubling of the initial bound: ``width`` consecutive doublings are tried at once, the first
  feasible one is taken;
- bisection: instead of one midpoint, the ``2**depth - 1`` midpoints of the next ``depth`` bisection
  levels are evaluated at once (speculatively), then the sequential walk through them is replayed;
- splitting a short path and comparing with even spacing: all candidate paths are scored at once,
  and the first best is taken, as ``min`` does.

A greedy feasibility test and a candidate score are pure functions of (R, bound or path), so a task
computes the same floats the in-process planner does.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import ray

from olss_dist.core.calibration import Calibration
from olss_dist.core.plan import Plan
from olss_dist.core.path_search import SearchErrors, check_num_steps, even_nodes, greedy_path, split_to_length, still_bisecting

Path = list[int]


@ray.remote(num_cpus=1)
def greedy_path_task(r: np.ndarray, num_rows: int, bound: float, max_nodes: int) -> Path | None:
    """``planner.greedy_path`` on the shared R: longest steps within ``bound``, or None."""
    return greedy_path(SearchErrors(r, num_rows), bound, max_nodes)


@ray.remote(num_cpus=1)
def worst_search_error_task(r: np.ndarray, num_rows: int, nodes: Path) -> float:
    """Largest search error along ``nodes`` (the planner's score of a candidate path)."""
    return float(SearchErrors(r, num_rows).along(nodes).max())


def speculative_midpoints(lower: float, upper: float, depth: int) -> list[float]:
    """Every midpoint the next ``depth`` bisection steps from ``[lower, upper]`` could test (at most ``2**depth - 1``)."""
    if depth == 0 or not still_bisecting(lower, upper):
        return []
    middle = 0.5 * (lower + upper)
    return [middle] + speculative_midpoints(lower, middle, depth - 1) + speculative_midpoints(middle, upper, depth - 1)


class ParallelPlanner:
    """Plans from one calibration, the search's evaluations spread over Ray tasks.

    Args:
        calibration: merged statistics; its R factor is put in the object store once.
        parallelism: tasks in flight per search (e.g. the cluster's CPUs); sets the bisection depth
            ``floor(log2(parallelism + 1))`` and the doubling width.
    """

    def __init__(self, calibration: Calibration, parallelism: int):
        self.calibration = calibration
        self.num_rows = calibration.num_rows
        self.num_teacher_steps = calibration.num_teacher_steps
        self.r_ref = ray.put(calibration.r_factor)
        self.depth = max(1, int(np.floor(np.log2(max(parallelism, 1) + 1))))
        self.width = max(1, parallelism)

    def greedy_paths(self, bounds: Sequence[float], max_nodes: int) -> list[Path | None]:
        return ray.get([greedy_path_task.remote(self.r_ref, self.num_rows, b, max_nodes) for b in bounds])

    def worst_errors(self, paths: Sequence[Path]) -> list[float]:
        return ray.get([worst_search_error_task.remote(self.r_ref, self.num_rows, p) for p in paths])

    def search_path(self, num_steps: int) -> tuple[Path, np.ndarray]:
        """Same contract and result as ``planner.search_path(R, num_rows, num_steps)``."""
        check_num_steps(self.num_teacher_steps, num_steps)
        uniform = even_nodes(self.num_teacher_steps, num_steps)
        [uniform_error] = self.worst_errors([uniform])
        upper, path = self.first_feasible_bound(max(uniform_error, np.finfo(float).tiny), num_steps)
        upper, path = self.bisect(0.0, upper, path, num_steps)
        searched = split_to_length(path, num_steps, self.num_teacher_steps, self.worst_errors)
        [searched_error] = self.worst_errors([searched])
        best = searched if searched_error <= uniform_error else uniform
        return best, self.calibration.search_errors(best)

    def first_feasible_bound(self, upper: float, num_steps: int) -> tuple[float, Path]:
        """The first of ``upper, 2 upper, 4 upper, ...`` with a greedy path, and that path."""
        while True:
            bounds = [upper]
            for _ in range(self.width - 1):
                bounds.append(bounds[-1] * 2.0)
            for bound, path in zip(bounds, self.greedy_paths(bounds, num_steps)):
                if path is not None:
                    return bound, path
            upper = bounds[-1] * 2.0

    def bisect(self, lower: float, upper: float, path: Path, num_steps: int) -> tuple[float, Path]:
        """Bisection on the bound, ``depth`` levels per round of parallel tasks."""
        while still_bisecting(lower, upper):
            probes = speculative_midpoints(lower, upper, self.depth)
            outcomes = dict(zip(probes, self.greedy_paths(probes, num_steps)))
            for _ in range(self.depth):
                if not still_bisecting(lower, upper):
                    break
                middle = 0.5 * (lower + upper)
                if outcomes[middle] is None:
                    lower = middle
                else:
                    upper, path = middle, outcomes[middle]
        return upper, path

    def plan(self, num_steps: int) -> Plan:
        """``Calibration.plan(num_steps)``, searched in parallel."""
        nodes, _ = self.search_path(num_steps)
        return self.calibration.plan_for_searched_nodes(nodes)

    def plans(self, step_counts: Sequence[int]) -> list[Plan]:
        """One plan per step count; the searches for different counts also run concurrently."""
        with ThreadPoolExecutor(max_workers=max(1, len(step_counts))) as pool:
            return list(pool.map(self.plan, step_counts))
