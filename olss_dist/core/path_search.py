"""Path search: which K teacher steps to keep.

The search error of a step from node ``n_i`` to a target ``k`` is the mean squared residual of
fitting the teacher state ``s_k`` on ``[s_{n_i}, e_{n_0}, ..., e_{n_i}]``: the current teacher state
plus every output seen so far. A path of exactly K nodes minimising its worst search error is found
by greedy longest steps under a bound D (exact linear scans over all targets, no monotonicity
assumed) and bisection on D. Shorter greedy paths are split to exactly K nodes, and evenly spaced
nodes are kept as a competitor, so the result is never worse than uniform spacing.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from olss_dist.core.lstsq import residuals_of_many, tail_sums_of_squares

BISECTION_TOLERANCE = 1e-9
"""Bisection stops when the bound is known to this relative precision."""


def state_column(n: int) -> int:
    """Column of teacher state ``s_n`` in the interleaved statistics."""
    return 2 * n


def output_column(n: int) -> int:
    """Column of teacher output ``e_n`` in the interleaved statistics."""
    return 2 * n + 1


def even_nodes(num_teacher_steps: int, num_steps: int) -> list[int]:
    """``num_steps`` evenly spaced teacher indices starting at 0, all below ``num_teacher_steps``."""
    check_num_steps(num_teacher_steps, num_steps)
    return np.floor(np.arange(num_steps) * num_teacher_steps / num_steps).astype(int).tolist()


def check_num_steps(num_teacher_steps: int, num_steps: int) -> None:
    if not 1 <= num_steps <= num_teacher_steps:
        raise ValueError(
            f"num_steps must be between 1 and the number of teacher steps ({num_teacher_steps}), got {num_steps}"
        )


def check_nodes(nodes: Sequence[int], num_teacher_steps: int) -> list[int]:
    """Return ``nodes`` as ints, or raise ValueError unless strictly increasing from 0 and below N."""
    nodes = [int(n) for n in nodes]
    if not nodes or nodes[0] != 0:
        raise ValueError(f"nodes must start at 0, got {nodes[:3]}")
    if any(b <= a for a, b in zip(nodes, nodes[1:])):
        raise ValueError(f"nodes must be strictly increasing, got {nodes}")
    if nodes[-1] >= num_teacher_steps:
        raise ValueError(f"nodes must be below the number of teacher steps ({num_teacher_steps}), got {nodes[-1]}")
    return nodes


class SearchErrors:
    """Search errors of every step, memoised per path prefix.

    One call for a prefix ``(n_0, ..., n_i)`` solves one small least squares on R for all targets
    ``k = n_i + 1 ... N`` at once.

    Args:
        r: ``(2N+1, 2N+1)`` float64 R factor with interleaved columns.
        num_rows: rows of the data matrix (samples x latent elements), to turn sums into means.
    """

    def __init__(self, r: np.ndarray, num_rows: int):
        self.r = r
        self.num_rows = num_rows
        self.num_teacher_steps = (r.shape[0] - 1) // 2
        self.state_columns = np.arange(0, r.shape[0], 2)
        self.state_tails = tail_sums_of_squares(r, self.state_columns)
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def from_prefix(self, prefix: tuple[int, ...]) -> np.ndarray:
        """``(N - n_i,)`` mean squared errors of the step from ``prefix[-1]`` to each ``k = n_i+1 ... N``."""
        cached = self._cache.get(prefix)
        if cached is None:
            current = prefix[-1]
            features = [state_column(current)] + [output_column(n) for n in prefix]
            targets = self.state_columns[current + 1 :]
            sums = residuals_of_many(self.r, features, targets, self.state_tails[:, current + 1 :])
            cached = np.maximum(sums, 0.0) / self.num_rows
            self._cache[prefix] = cached
        return cached

    def along(self, nodes: Sequence[int]) -> np.ndarray:
        """``(K,)`` search errors of each step of the path ``nodes`` (the last step ends at N)."""
        targets = list(nodes[1:]) + [self.num_teacher_steps]
        return np.array(
            [self.from_prefix(tuple(nodes[: i + 1]))[targets[i] - nodes[i] - 1] for i in range(len(nodes))]
        )


def greedy_path(errors: SearchErrors, bound: float, max_nodes: int) -> list[int] | None:
    """Longest steps whose search error stays within ``bound``; ``None`` if N is not reached in ``max_nodes``."""
    nodes = [0]
    while True:
        step_errors = errors.from_prefix(tuple(nodes))
        if step_errors[-1] <= bound:
            return nodes
        within = np.flatnonzero(step_errors[:-1] <= bound)
        if len(nodes) == max_nodes or within.size == 0:
            return None
        nodes.append(nodes[-1] + 1 + int(within[-1]))


def still_bisecting(lower: float, upper: float) -> bool:
    """Whether the bisection on the error bound ``[lower, upper]`` has not converged yet."""
    return upper - lower > BISECTION_TOLERANCE * upper


def split_to_length(
    nodes: list[int], num_steps: int, num_teacher_steps: int, worst_errors: Callable[[list[list[int]]], list[float]]
) -> list[int]:
    """Insert nodes until the path has ``num_steps`` nodes, each time the split with the lowest worst error.

    Args:
        nodes: a path from 0 with fewer than ``num_steps`` nodes; ``num_teacher_steps`` is its end N.
        worst_errors: the largest search error along each of a list of paths (serial or in parallel).
    """
    while len(nodes) < num_steps:
        bounds = list(zip(nodes, nodes[1:] + [num_teacher_steps]))
        options = [sorted(nodes + [(a + b) // 2]) for a, b in bounds if b - a >= 2]
        scores = worst_errors(options)
        nodes = options[scores.index(min(scores))]
    return nodes


def search_path(r: np.ndarray, num_rows: int, num_steps: int) -> tuple[list[int], np.ndarray]:
    """Nodes of a path of exactly ``num_steps`` steps minimising the worst search error.

    Args:
        r: ``(2N+1, 2N+1)`` float64 R factor with interleaved columns.
        num_rows: rows of the data matrix behind ``r``.
        num_steps: K, between 1 and N.

    Returns:
        ``nodes`` (K strictly increasing teacher indices from 0) and their ``(K,)`` search errors.
    """
    return search_nodes(SearchErrors(r, num_rows), num_steps)


def search_nodes(errors: SearchErrors, num_steps: int) -> tuple[list[int], np.ndarray]:
    """``search_path``'s search on given search errors (``SearchErrors`` or another source with its
    ``num_teacher_steps``, ``from_prefix`` and ``along``, e.g. a benchmark's baseline)."""
    check_num_steps(errors.num_teacher_steps, num_steps)
    uniform = even_nodes(errors.num_teacher_steps, num_steps)
    upper = max(errors.along(uniform).max(), np.finfo(float).tiny)
    while greedy_path(errors, upper, num_steps) is None:
        upper *= 2.0
    lower = 0.0
    while still_bisecting(lower, upper):
        middle = 0.5 * (lower + upper)
        if greedy_path(errors, middle, num_steps) is None:
            lower = middle
        else:
            upper = middle
    searched = split_to_length(
        greedy_path(errors, upper, num_steps), num_steps, errors.num_teacher_steps,
        lambda paths: [errors.along(path).max() for path in paths],
    )
    best = min([searched, uniform], key=lambda path: errors.along(path).max())
    return best, errors.along(best)
