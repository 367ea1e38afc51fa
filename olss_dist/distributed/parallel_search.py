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

Where the evaluations run: with a ``WorkerPool`` (the job), on the job's own actors, which are idle
between the teacher pass and the on-policy rounds; each actor keeps one memoised ``SearchErrors`` of
the R it was given (``PathSearchMethods``), so later evaluations reuse earlier steps' errors, and the
job needs no CPU outside its own reservation (two jobs on one cluster cannot starve each other's
planning). An evaluation whose actor is lost is redone on a live one. Without a pool, each evaluation
is a Ray task (``num_cpus=1``) anywhere on the cluster.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import ray

from olss_dist.core.calibration import Calibration
from olss_dist.core.plan import Plan
from olss_dist.core.path_search import SearchErrors, check_num_steps, even_nodes, greedy_path, split_to_length, still_bisecting
from olss_dist.distributed.failure import WORKER_LOST_ERRORS, LossCounts

if TYPE_CHECKING:
    from olss_dist.distributed.pool import WorkerPool

logger = logging.getLogger(__name__)

Path = list[int]


@ray.remote(num_cpus=1)
def greedy_path_task(r: np.ndarray, num_rows: int, bound: float, max_nodes: int) -> Path | None:
    """``planner.greedy_path`` on the shared R: longest steps within ``bound``, or None."""
    return greedy_path(SearchErrors(r, num_rows), bound, max_nodes)


@ray.remote(num_cpus=1)
def worst_search_error_task(r: np.ndarray, num_rows: int, nodes: Path) -> float:
    """Largest search error along ``nodes`` (the planner's score of a candidate path)."""
    return float(SearchErrors(r, num_rows).along(nodes).max())


class PathSearchMethods:
    """The planner's evaluations as actor methods (mixed into ``worker.CalibrationWorker``).

    R arrives as an object reference in a one-element list (so Ray passes the reference, not the array):
    the actor fetches it once and keeps one memoised ``SearchErrors`` for it until another R arrives.
    """

    _path_search: tuple[str, SearchErrors] | None = None

    def _search_errors(self, r_box: list[ray.ObjectRef], num_rows: int) -> SearchErrors:
        [r_ref] = r_box
        key = f"{r_ref.hex()}:{num_rows}"
        if self._path_search is None or self._path_search[0] != key:
            self._path_search = (key, SearchErrors(np.asarray(ray.get(r_ref)), num_rows))
        return self._path_search[1]

    def search_greedy_path(self, r_box: list[ray.ObjectRef], num_rows: int, bound: float, max_nodes: int) -> Path | None:
        """``greedy_path`` on the R of ``r_box`` (see ``greedy_path_task``)."""
        return greedy_path(self._search_errors(r_box, num_rows), bound, max_nodes)

    def search_worst_error(self, r_box: list[ray.ObjectRef], num_rows: int, nodes: Path) -> float:
        """Largest search error along ``nodes`` on the R of ``r_box`` (see ``worst_search_error_task``)."""
        return float(self._search_errors(r_box, num_rows).along(nodes).max())

    def release_path_search(self) -> None:
        """Drop the kept R and its memo (after planning)."""
        self._path_search = None


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
        parallelism: evaluations in flight per search (e.g. the job's actors); sets the bisection depth
            ``floor(log2(parallelism + 1))`` and the doubling width.
        pool: run the evaluations on these actors (round-robin over the live ones, redone on another
            when one is lost); ``None``: as Ray tasks anywhere on the cluster.
    """

    def __init__(self, calibration: Calibration, parallelism: int, pool: "WorkerPool | None" = None):
        self.calibration = calibration
        self.num_rows = calibration.num_rows
        self.num_teacher_steps = calibration.num_teacher_steps
        self.r_ref = ray.put(calibration.r_factor)
        self.depth = max(1, int(np.floor(np.log2(max(parallelism, 1) + 1))))
        self.width = max(1, parallelism)
        self.pool = pool
        self._next_worker = 0
        self._lock = threading.Lock()  # the searches of several step counts share the pool and its health

    def greedy_paths(self, bounds: Sequence[float], max_nodes: int) -> list[Path | None]:
        if self.pool is not None:
            return self._on_actors("search_greedy_path", [(b, max_nodes) for b in bounds])
        return ray.get([greedy_path_task.remote(self.r_ref, self.num_rows, b, max_nodes) for b in bounds])

    def worst_errors(self, paths: Sequence[Path]) -> list[float]:
        if self.pool is not None:
            return self._on_actors("search_worst_error", [(p,) for p in paths])
        return ray.get([worst_search_error_task.remote(self.r_ref, self.num_rows, p) for p in paths])

    def _on_actors(self, method: str, arguments: Sequence[tuple]) -> list[Any]:
        """``actor.method([R], num_rows, *args)`` for each ``args``, spread over the live actors; an
        evaluation whose actor is lost is submitted again (under the pool's failure policy)."""
        from olss_dist.distributed.pool import get_or_raise

        pool = self.pool
        losses = LossCounts(pool.policy)
        results: list[Any] = [None] * len(arguments)
        pending = list(range(len(arguments)))
        while pending:
            refs = {}
            for index in pending:
                worker = self._take_worker()
                actor_method = getattr(pool.actors[worker], method)
                refs[index] = (worker, actor_method.remote([self.r_ref], self.num_rows, *arguments[index]))
            pending = []
            for index, (worker, ref) in refs.items():
                try:
                    results[index] = get_or_raise(ref)
                except WORKER_LOST_ERRORS as error:
                    logger.warning("worker %d lost during path search (%s); evaluating elsewhere", worker, type(error).__name__)
                    losses.lost(index, f"path search evaluation {index}")
                    with self._lock:
                        if pool.health.is_live(worker):
                            pool.await_restart(worker)
                    pending.append(index)
        return results

    def _take_worker(self) -> int:
        with self._lock:
            live = self.pool.health.require_live("search paths")
            worker = live[self._next_worker % len(live)]
            self._next_worker += 1
            return worker

    def release(self) -> None:
        """Free the actors' copies of R and their memos (nothing to do for tasks)."""
        if self.pool is not None:
            for worker in self.pool.health.live():
                self.pool.actors[worker].release_path_search.remote()

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
