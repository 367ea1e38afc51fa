"""Planner benchmark: the path search on the triangular factor R against the original OLSS search on raw rows.

Both get the same teacher trajectories (the analytic mixture, 64 latent elements per sample) and the same
local error: the mean squared residual of fitting ``s_k`` on ``[s_{n_i}, e_{n_0}, ..., e_{n_i}]``.

- **Original** (``OriginalSearch``, re-implemented from its description): the states and outputs of every
  sample stay in memory. The path is built greedily; each step's length is found by bisection on the
  next node (the largest node whose local error is within the bound, as if that error grew with the
  step), and the bound itself by ``BOUND_ROUNDS`` rounds of bisection so that the path has K steps.
  Every local error is one ``numpy.linalg.lstsq`` over all raw rows (samples x latent elements) of the
  step's columns; ``solves`` counts them.
- **Ours**: ``Calibration.from_trajectories`` (the reduction of the same trajectories to R, streamed;
  once for every K) and ``search_path`` on R. ``evaluated`` counts the steps whose error it computed.
  The exhaustive scan (every step of every prefix, ``exhaustive_greedy_path``) runs too, to check that
  the search returns its nodes and to show what the pruning saves.

Each time is the best of ``--repeats`` calls (wall seconds; the machine may be shared), the same rule
for ours and the original; memory is the first call's peak resident set above its start
(``common.measured``: numpy, torch and LAPACK alike; the trajectories are resident before and not
counted). The exhaustive scan is timed once. ``worst error`` is each path's largest local error on R, original / ours (>= 1: ours is
the minimax path).

    python benchmarks/bench_planner.py            # N = 1000, K = 5/10/20, 8/64/512 samples (~2 min)
    python benchmarks/bench_planner.py --quick    # N = 250, K = 5/10, 8/64 samples (~5 s)
"""

from __future__ import annotations

from common import describe_machine, measured, pin_threads

pin_threads()  # before numpy and torch load their thread pools

import argparse

import numpy as np
import torch

from olss_dist.core.calibration import Calibration
from olss_dist.core.path_search import SearchErrors, exhaustive_greedy_path, search_nodes
from olss_dist.core.teacher import record_trajectories, trailing_timesteps
from olss_dist.models.analytic import GaussianMixtureModel

BOUND_ROUNDS = 20
"""Bisection rounds on the original's error bound (the bound known to 1e-6 of its first value)."""

TEACHER_BATCH = 64


class OriginalSearch:
    """The original OLSS path search over raw rows, counting its least-squares solves.

    Args:
        states: ``(B, N+1, D)`` float64 teacher states of every sample.
        outputs: ``(B, N, D)`` float64 teacher outputs.
    """

    def __init__(self, states: np.ndarray, outputs: np.ndarray):
        self.states = states
        self.outputs = outputs
        self.num_teacher_steps = outputs.shape[1]
        self.solves = 0

    def local_error(self, nodes: list[int], target: int) -> float:
        """Mean squared residual of ``s_target`` fitted on ``[s_{n_i}, e_{n_0}, ..., e_{n_i}]`` over all rows."""
        columns = [self.states[:, nodes[-1]]] + [self.outputs[:, n] for n in nodes]
        features = np.stack([column.ravel() for column in columns], axis=1)
        target_column = self.states[:, target].ravel()
        weights = np.linalg.lstsq(features, target_column, rcond=None)[0]
        residual = target_column - features @ weights
        self.solves += 1
        return float(residual @ residual) / target_column.size

    def next_node(self, nodes: list[int], bound: float) -> int:
        """Bisection on the next node: the largest ``k`` in ``(n_i, N]`` within ``bound`` if the error grows
        with ``k`` (``n_i + 1`` when none is)."""
        low, high = nodes[-1] + 1, self.num_teacher_steps
        while low < high:
            middle = (low + high + 1) // 2
            if self.local_error(nodes, middle) <= bound:
                low = middle
            else:
                high = middle - 1
        return low

    def greedy(self, bound: float, num_steps: int) -> list[int] | None:
        """Nodes of the greedy path under ``bound``, or ``None`` when it needs more than ``num_steps`` steps."""
        nodes = [0]
        while len(nodes) < num_steps:
            node = self.next_node(nodes, bound)
            if node == self.num_teacher_steps:
                return nodes
            nodes.append(node)
        # K nodes already: only the last step, to N, is left to check (one solve, not a bisection).
        return nodes if self.local_error(nodes, self.num_teacher_steps) <= bound else None

    def search(self, num_steps: int) -> list[int]:
        """``num_steps`` nodes: bisection on the bound between 0 and the error of the single step 0 -> N."""
        lower, upper = 0.0, self.local_error([0], self.num_teacher_steps)
        best = [0]
        for _ in range(BOUND_ROUNDS):
            middle = 0.5 * (lower + upper)
            nodes = self.greedy(middle, num_steps)
            if nodes is None:
                lower = middle
            else:
                upper, best = middle, nodes
        while len(best) < num_steps:  # a shorter path: split its longest step (no solves)
            ends = best[1:] + [self.num_teacher_steps]
            longest = int(np.argmax(np.subtract(ends, best)))
            best = sorted(best + [(best[longest] + ends[longest]) // 2])
        return best


def teacher_trajectories(model, num_teacher_steps: int, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, N+1, D)`` states and ``(B, N, D)`` outputs of the DDIM teacher, float64 numpy."""
    x_T = model.initial_noise(range(num_samples)).double()
    cond = torch.arange(num_samples) % model.num_classes
    timesteps = trailing_timesteps(num_teacher_steps)
    parts = [record_trajectories(model, x_T[i : i + TEACHER_BATCH], cond[i : i + TEACHER_BATCH], timesteps, model.alphas_cumprod)
             for i in range(0, num_samples, TEACHER_BATCH)]
    states, outputs = (torch.cat([p[j] for p in parts]).flatten(2).numpy() for j in (0, 1))
    return states, outputs


def ours(calibration: Calibration, num_steps: int, greedy=None) -> tuple[list[int], int]:
    """``search_path`` on R (search errors built inside, as ``search_path`` does): nodes and evaluated steps."""
    errors = SearchErrors(calibration.r_factor, calibration.num_rows)
    nodes, _ = search_nodes(errors, num_steps) if greedy is None else search_nodes(errors, num_steps, greedy=greedy)
    return nodes, errors.evaluations


def best_of(repeats: int, function):
    """``(result, best seconds, first call's peak bytes)`` of ``repeats`` calls of ``function``."""
    result, seconds, peak = measured(function)
    for _ in range(repeats - 1):
        seconds = min(seconds, measured(function)[1])
    return result, seconds, peak


def megabytes(count: int) -> float:
    return count / 2**20


HEADER = (f"{'N':>5} {'K':>3} {'samples':>7} {'R s':>6} {'search s':>8} {'exhaustive s':>12} {'original s':>10} "
          f"{'x search':>8} {'x R+search':>10} {'solves':>6} {'evaluated':>9} {'worst error':>11} "
          f"{'MB R':>6} {'MB search':>9} {'MB original':>11} {'same nodes':>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=250, K=5/10, 8/64 samples")
    parser.add_argument("--repeats", type=int, default=3, help="calls per timing, best taken (default 3)")
    args = parser.parse_args()
    n, step_counts, sample_counts = (250, (5, 10), (8, 64)) if args.quick else (1000, (5, 10, 20), (8, 64, 512))
    model = GaussianMixtureModel()
    print(describe_machine())
    states, outputs = teacher_trajectories(model, n, max(sample_counts))
    timesteps = trailing_timesteps(n)
    print(f"trajectories: analytic mixture, N={n}, D={states.shape[2]} elements per sample; "
          f"{megabytes(states[:1].nbytes + outputs[:1].nbytes):.2f} MB per sample (float64), held by both and not counted")
    print(HEADER)
    summary = {}
    for samples in sample_counts:
        s, e = states[:samples], outputs[:samples]
        calibration, r_seconds, r_peak = best_of(
            args.repeats, lambda: Calibration.from_trajectories(torch.from_numpy(s), torch.from_numpy(e), timesteps))
        for k in step_counts:
            (nodes, evaluated), search_s, search_peak = best_of(args.repeats, lambda: ours(calibration, k))
            (full_nodes, _), full_s, _ = measured(lambda: ours(calibration, k, exhaustive_greedy_path))
            original_nodes, original_s, original_peak = best_of(args.repeats, lambda: OriginalSearch(s, e).search(k))
            original = OriginalSearch(s, e)
            original.search(k)  # once more, for its solve count (the same every call)
            errors = SearchErrors(calibration.r_factor, calibration.num_rows)
            worst = errors.along(original_nodes).max() / errors.along(nodes).max()
            row = dict(r_s=r_seconds, search_s=search_s, original_s=original_s, solves=original.solves,
                       r_peak=r_peak, search_peak=search_peak, original_peak=original_peak)
            summary[(k, samples)] = row
            print(f"{n:>5} {k:>3} {samples:>7} {r_seconds:>6.2f} {search_s:>8.3f} {full_s:>12.3f} {original_s:>10.2f} "
                  f"{original_s / search_s:>8.1f} {original_s / (r_seconds + search_s):>10.2f} {original.solves:>6} "
                  f"{evaluated:>9} {worst:>11.3f} {megabytes(r_peak):>6.1f} {megabytes(search_peak):>9.1f} "
                  f"{megabytes(original_peak):>11.1f} {str(nodes == full_nodes):>10}", flush=True)
    print_summary(summary, n, step_counts, sample_counts)


def print_summary(summary: dict, n: int, step_counts, sample_counts) -> None:
    """The ratios at K = 10 (or the middle K), the reduction shared by every K, and memory over sample counts."""
    k = 10 if 10 in step_counts else step_counts[len(step_counts) // 2]
    for samples in sample_counts:
        row = summary[(k, samples)]
        every_k = sum(summary[(j, samples)]["original_s"] for j in step_counts)
        ours_every_k = row["r_s"] + sum(summary[(j, samples)]["search_s"] for j in step_counts)
        print(f"N={n}, K={k}, {samples} samples: original {row['original_s']:.2f} s ({row['solves']} solves); "
              f"search on R {row['search_s']:.3f} s: x{row['original_s'] / row['search_s']:.1f}; with the reduction "
              f"({row['r_s']:.2f} s): x{row['original_s'] / (row['r_s'] + row['search_s']):.2f}; all K {step_counts} "
              f"(one reduction): x{every_k / ours_every_k:.2f}")
    for key, name in (("r_peak", "reduction to R"), ("search_peak", "search on R"), ("original_peak", "original")):
        peaks = [summary[(k, b)][key] for b in sample_counts]
        print(f"peak memory of the {name} over samples {sample_counts} at K={k}: "
              + " / ".join(f"{megabytes(p):.1f}" for p in peaks) + " MB")


if __name__ == "__main__":
    main()
