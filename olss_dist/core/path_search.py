"""Path search: which K teacher steps to keep.

The search error of a step from node ``n_i`` to a target ``k`` is the mean squared residual of
fitting the teacher state ``s_k`` on ``[s_{n_i}, e_{n_0}, ..., e_{n_i}]``: the current teacher state
plus every output seen so far. A path of exactly K nodes minimising its worst search error is found
by greedy longest steps under a bound D and bisection on D. Shorter greedy paths are split to exactly
K nodes, and evenly spaced nodes are kept as a competitor, so the result is never worse than uniform
spacing.

The longest step within D is exact, with no monotonicity assumed (the search error is not always
monotone in the step length). It is found from the longest step down, and most steps are never
evaluated: a step's error is at least the tail of its target below the feature rows of R (the part
of ``s_k`` orthogonal to every column up to ``e_{n_i}``), known for free, so only steps whose tail is
within D are evaluated, a fixed group of steps at a time, until one is within D. Every evaluated
error is kept for later rounds. ``exhaustive_greedy_path`` (every step of every prefix evaluated) is
the reference: it sees the same errors, bit for bit, so both find the same paths.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

from olss_dist.core.lstsq import orthonormal_basis, residuals_on_basis, tail_sums_of_rows

BISECTION_TOLERANCE = 1e-9
"""Bisection stops when the bound is known to this relative precision."""

GROUP = 32
"""Steps of a prefix are evaluated in fixed aligned groups (``j // GROUP``): an error's rounding then
depends on its group alone, never on which steps were asked for before, so every search, in any
order, in any process (the Ray planner's tasks), sees bit for bit the same errors."""

CACHED_BASES = 64
"""Feature bases kept (least recently used dropped): ``(2 n_i + 2, i + 2)`` float64 each."""


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
    """Search errors of every step, evaluated on demand and memoised per path prefix.

    For a prefix ``(n_0, ..., n_i)`` the steps are indexed ``j = 0 ... N - n_i - 1`` (target
    ``k = n_i + 1 + j``). One orthonormal basis of the prefix's feature block of R serves every target.

    Args:
        r: ``(2N+1, 2N+1)`` float64 R factor with interleaved columns.
        num_rows: rows of the data matrix (samples x latent elements), to turn sums into means.

    Attributes:
        evaluations: steps evaluated so far (one residual of one target each).
        bases: feature bases computed so far (one SVD of a ``(2 n_i + 2, i + 2)`` block each).
    """

    def __init__(self, r: np.ndarray, num_rows: int):
        self.r = r
        self.num_rows = num_rows
        self.num_teacher_steps = (r.shape[0] - 1) // 2
        self.state_columns = np.arange(0, r.shape[0], 2)
        # Row k is R's column of s_k: a block of targets is a contiguous gather.
        self.state_rows = np.ascontiguousarray(r[:, self.state_columns].T)
        self.state_tails = tail_sums_of_rows(self.state_rows).T
        self.evaluations = 0
        self.bases = 0
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self._bases: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._bases_lock = threading.Lock()

    def lower_bounds(self, prefix: tuple[int, ...]) -> np.ndarray:
        """``(N - n_i,)`` lower bounds of the errors of the steps from ``prefix``: each target's tail
        below the feature rows, the term every evaluated error adds to a non-negative sum."""
        current = prefix[-1]
        return self.state_tails[output_column(current) + 1, current + 1 :] / self.num_rows

    def known(self, prefix: tuple[int, ...]) -> np.ndarray:
        """``(N - n_i,)`` errors of the steps from ``prefix`` evaluated so far, NaN for the others (the
        memo itself: read, don't write)."""
        errors = self._cache.get(prefix)
        if errors is None:  # setdefault: threads sharing the memo all get the one array
            errors = self._cache.setdefault(prefix, np.full(self.num_teacher_steps - prefix[-1], np.nan))
        return errors

    def evaluate_group(self, prefix: tuple[int, ...], group: int) -> None:
        """Evaluate the steps ``group * GROUP ...`` (one aligned group) from ``prefix`` into the memo."""
        errors = self.known(prefix)
        members = np.arange(group * GROUP, min((group + 1) * GROUP, errors.size))
        errors[members] = self._evaluate(prefix, members)

    def at(self, prefix: tuple[int, ...], steps: np.ndarray) -> np.ndarray:
        """Mean squared errors of the steps ``steps`` (indices ``j``, target ``n_i + 1 + j``) from ``prefix``."""
        errors = self.known(prefix)
        steps = np.asarray(steps, dtype=int)
        missing = np.isnan(errors[steps])
        if missing.any():
            for group in np.unique(steps[missing] // GROUP):
                self.evaluate_group(prefix, int(group))
        return errors[steps]

    def from_prefix(self, prefix: tuple[int, ...]) -> np.ndarray:
        """``(N - n_i,)`` mean squared errors of the step from ``prefix[-1]`` to each ``k = n_i+1 ... N``."""
        return self.at(prefix, np.arange(self.num_teacher_steps - prefix[-1]))

    def along(self, nodes: Sequence[int]) -> np.ndarray:
        """``(K,)`` search errors of each step of the path ``nodes`` (the last step ends at N)."""
        targets = list(nodes[1:]) + [self.num_teacher_steps]
        return np.array(
            [self.at(tuple(nodes[: i + 1]), [targets[i] - nodes[i] - 1])[0] for i in range(len(nodes))]
        )

    def _basis(self, prefix: tuple[int, ...]) -> np.ndarray:
        with self._bases_lock:  # a Calibration's memo is shared by the Ray planner's threads
            basis = self._bases.get(prefix)
            if basis is not None:
                self._bases.move_to_end(prefix)
                return basis
        current = prefix[-1]
        features = [state_column(current)] + [output_column(n) for n in prefix]
        basis = orthonormal_basis(self.r[: output_column(current) + 1, features])
        with self._bases_lock:
            self.bases += 1
            self._bases[prefix] = basis
            if len(self._bases) > CACHED_BASES:
                self._bases.popitem(last=False)
        return basis

    def _evaluate(self, prefix: tuple[int, ...], steps: np.ndarray) -> np.ndarray:
        current = prefix[-1]
        top = output_column(current) + 1
        targets = current + 1 + steps
        sums = residuals_on_basis(self._basis(prefix), self.state_rows[targets, :top], self.state_tails[top, targets])
        self.evaluations += steps.size
        return np.maximum(sums, 0.0) / self.num_rows


def longest_step(errors: SearchErrors, prefix: tuple[int, ...], bound: float, shortest: int = 0) -> int | None:
    """Largest step index ``j >= shortest`` from ``prefix`` whose search error is within ``bound``, or ``None``.

    Exact: the same answer as evaluating every step. Steps whose lower bound exceeds ``bound`` cannot
    be within it (an evaluated error is its lower bound plus a non-negative sum, and rounding keeps
    that order). Of the others, those above the longest step known to be within ``bound`` are
    evaluated, the longest group first, until none is left unknown.
    """
    values = errors.known(prefix)
    candidates = shortest + np.flatnonzero(errors.lower_bounds(prefix)[shortest:] <= bound)
    while True:
        within = candidates[values[candidates] <= bound]  # NaN (not evaluated) compares False
        longest = int(within[-1]) if within.size else -1
        unknown = candidates[(candidates > longest) & np.isnan(values[candidates])]
        if unknown.size == 0:
            return longest if longest >= 0 else None
        errors.evaluate_group(prefix, int(unknown[-1]) // GROUP)


def greedy_path(errors: SearchErrors, bound: float, max_nodes: int) -> list[int] | None:
    """Longest steps whose search error stays within ``bound``; ``None`` if N is not reached in ``max_nodes``."""
    nodes = [0]
    last = errors.num_teacher_steps - 1
    while True:
        # With max_nodes nodes only the step to N is still allowed.
        step = longest_step(errors, tuple(nodes), bound, last - nodes[-1] if len(nodes) == max_nodes else 0)
        if step == last - nodes[-1]:
            return nodes
        if step is None or len(nodes) == max_nodes:
            return None
        nodes.append(nodes[-1] + 1 + step)


def exhaustive_greedy_path(errors: SearchErrors, bound: float, max_nodes: int) -> list[int] | None:
    """``greedy_path`` with every step of every prefix evaluated: the reference for the pruned scan."""
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


def search_nodes(
    errors: SearchErrors, num_steps: int,
    greedy: Callable[[SearchErrors, float, int], list[int] | None] = greedy_path,
) -> tuple[list[int], np.ndarray]:
    """``search_path``'s search on given search errors, with ``greedy`` as the greedy step
    (``exhaustive_greedy_path`` for the unpruned reference)."""
    check_num_steps(errors.num_teacher_steps, num_steps)
    uniform = even_nodes(errors.num_teacher_steps, num_steps)
    upper = max(errors.along(uniform).max(), np.finfo(float).tiny)
    while greedy(errors, upper, num_steps) is None:
        upper *= 2.0
    lower = 0.0
    while still_bisecting(lower, upper):
        middle = 0.5 * (lower + upper)
        if greedy(errors, middle, num_steps) is None:
            lower = middle
        else:
            upper = middle
    searched = split_to_length(
        greedy(errors, upper, num_steps), num_steps, errors.num_teacher_steps,
        lambda paths: [errors.along(path).max() for path in paths],
    )
    best = min([searched, uniform], key=lambda path: errors.along(path).max())
    return best, errors.along(best)
