"""Planner benchmark: the minimax path search on the triangular factor R against the original approach.

The original OLSS approach keeps every teacher state and output of every sample and, for each candidate
step it evaluates (a prefix of nodes and one target ``s_k``), solves a least squares over all raw rows
(samples x latent elements). ``RawRowSearchErrors`` re-implements exactly that and is handed to the same
search (``olss_dist.core.path_search.search_nodes``, the search behind ``search_path``), so both make the same
decisions and differ only in how an evaluation is computed. A second baseline solves all targets of a prefix in one raw-row least squares.

Both baselines are timed on a fixed number of the evaluations the search really makes and extrapolated
to the full count (printed as ``~``); at the smallest size the per-target baseline also runs the whole
search, to check the extrapolation and that it finds the same nodes. Peak memory is measured with
tracemalloc (numpy allocations; the R reduction runs in torch, whose memory tracemalloc does not see, and
streams ``chunk_rows x (2N+1)`` float64 blocks whatever the sample count).

    python benchmarks/bench_planner.py            # N 250/500/1000, K 5/10/20, samples 8..512 (a few minutes)
    python benchmarks/bench_planner.py --quick    # N 250 only
"""

from __future__ import annotations

from common import describe_machine, pin_threads

pin_threads()  # before numpy and torch load their thread pools

import argparse
import time
import tracemalloc
from typing import Callable

import numpy as np
import torch

from olss_dist.core.calibration import Calibration
from olss_dist.models.analytic import GaussianMixtureModel
from olss_dist.core.path_search import SearchErrors, search_nodes, state_column
from olss_dist.core.teacher import record_trajectories, trailing_timesteps

TIMED_EVALUATIONS = 48
TIMED_PREFIXES = 2
TEACHER_BATCH = 64


class RawRowSearchErrors(SearchErrors):
    """The original approach: every search error is a least squares over all raw rows, one target at a time.

    Args:
        rows: ``(B*D, 2N+1)`` float64 interleaved states and outputs of every sample.
    """

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        self.num_rows = rows.shape[0]
        self.num_teacher_steps = (rows.shape[1] - 1) // 2
        self._cache = {}

    def evaluate(self, prefix: tuple[int, ...], target: int) -> float:
        """Mean squared residual of ``s_target`` on ``[s_{n_i}, e_{n_0}, ..., e_{n_i}]`` over the raw rows."""
        features = self.rows[:, [state_column(prefix[-1])] + [2 * n + 1 for n in prefix]]
        y = self.rows[:, state_column(target)]
        weights = np.linalg.lstsq(features, y, rcond=None)[0]
        residual = y - features @ weights
        return float(residual @ residual) / self.num_rows

    def from_prefix(self, prefix: tuple[int, ...]) -> np.ndarray:
        cached = self._cache.get(prefix)
        if cached is None:
            cached = np.array([self.evaluate(prefix, k) for k in range(prefix[-1] + 1, self.num_teacher_steps + 1)])
            self._cache[prefix] = cached
        return cached


def batched_prefix_errors(rows: np.ndarray, prefix: tuple[int, ...]) -> np.ndarray:
    """Second baseline: every target of one prefix in a single raw-row least squares (multi right-hand side)."""
    n = (rows.shape[1] - 1) // 2
    features = rows[:, [state_column(prefix[-1])] + [2 * j + 1 for j in prefix]]
    targets = rows[:, [state_column(k) for k in range(prefix[-1] + 1, n + 1)]]
    weights = np.linalg.lstsq(features, targets, rcond=None)[0]
    residual = targets - features @ weights
    return np.einsum("rt,rt->t", residual, residual) / rows.shape[0]


def timed(function: Callable, trace_memory: bool = False):
    """``(result, seconds, peak traced bytes or None)``; memory tracing is a separate, slower run."""
    if not trace_memory:
        start = time.perf_counter()
        result = function()
        return result, time.perf_counter() - start, None
    tracemalloc.start()
    try:
        result = function()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, None, peak


def teacher_trajectories(model, num_teacher_steps: int, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B, N+1, D)`` states and ``(B, N, D)`` outputs of the DDIM teacher, float64 numpy."""
    x_T = model.initial_noise(range(num_samples)).double()
    cond = torch.arange(num_samples) % model.num_classes
    timesteps = trailing_timesteps(num_teacher_steps)
    parts = [record_trajectories(model, x_T[i : i + TEACHER_BATCH], cond[i : i + TEACHER_BATCH], timesteps, model.alphas_cumprod)
             for i in range(0, num_samples, TEACHER_BATCH)]
    states, outputs = (torch.cat([p[j] for p in parts]).flatten(2).numpy() for j in (0, 1))
    return states, outputs


def raw_rows(states: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """``(B*D, 2N+1)`` float64 rows, columns ``s_0, e_0, ..., s_N``: what the original approach keeps in memory."""
    batch, count, dims = states.shape
    rows = np.empty((batch * dims, 2 * count - 1))
    rows[:, 0::2] = states.transpose(0, 2, 1).reshape(-1, count)
    rows[:, 1::2] = outputs.transpose(0, 2, 1).reshape(-1, count - 1)
    return rows


def planner_search(calibration: Calibration, num_steps: int) -> tuple[list[int], list[tuple[int, ...]], float, int]:
    """Nodes, evaluated prefixes, seconds and peak traced bytes of ``search_path`` on R (building the
    search errors from R included, as ``search_path`` does)."""
    built = []

    def search() -> tuple[list[int], np.ndarray]:
        built.append(SearchErrors(calibration.r_factor, calibration.num_rows))
        return search_nodes(built[-1], num_steps)

    (nodes, _), seconds, _ = timed(search)
    _, _, peak = timed(search, trace_memory=True)
    return nodes, list(built[0]._cache), seconds, peak


def baseline_estimates(rows_of: Callable[[], np.ndarray], prefixes: list[tuple[int, ...]], n: int, rng) -> dict[str, float]:
    """Both baselines over the search's ``prefixes``, extrapolated from a timed sample, and the per-target peak bytes.

    ``rows_of()`` builds the raw rows (inside the timing and the memory trace: the original approach stores them).
    """
    evaluations = [(p, k) for p in prefixes for k in range(p[-1] + 1, n + 1)]
    picked = [evaluations[i] for i in rng.choice(len(evaluations), min(TIMED_EVALUATIONS, len(evaluations)), replace=False)]
    picked_prefixes = [prefixes[i] for i in rng.choice(len(prefixes), min(TIMED_PREFIXES, len(prefixes)), replace=False)]

    def timed_sample() -> tuple[float, float]:
        raw = RawRowSearchErrors(rows_of())
        raw.evaluate(*picked[0])  # warm-up: first-call overheads are not part of the per-evaluation cost
        start = time.perf_counter()
        for prefix, target in picked:
            raw.evaluate(prefix, target)
        middle = time.perf_counter()
        for prefix in picked_prefixes:
            batched_prefix_errors(raw.rows, prefix)
        return middle - start, time.perf_counter() - middle

    (per_target, per_prefix), _, _ = timed(timed_sample)
    _, _, peak = timed(timed_sample, trace_memory=True)
    return {
        "evaluations": len(evaluations),
        "per_target_s": per_target / len(picked) * len(evaluations),
        "per_prefix_s": per_prefix / len(picked_prefixes) * len(prefixes),
        "peak": peak,
    }


def full_baseline_check(calibration: Calibration, rows: np.ndarray, num_steps: int, extrapolated_s: float, nodes: list[int]) -> None:
    """Run the per-target baseline's whole search once; print its time against the extrapolation and its nodes."""
    (raw_nodes, _), seconds, _ = timed(lambda: search_nodes(RawRowSearchErrors(rows), num_steps))
    print(f"check at N={calibration.num_teacher_steps}, K={num_steps}, {calibration.num_samples} samples: whole "
          f"raw-row search {seconds:.2f} s vs extrapolated {extrapolated_s:.2f} s (x{seconds / extrapolated_s:.2f}); "
          f"same nodes: {raw_nodes == nodes}")


def megabytes(count: int | None) -> float:
    return float("nan") if count is None else count / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=250 only")
    args = parser.parse_args()
    teacher_sizes = (250,) if args.quick else (250, 500, 1000)
    step_counts, sample_counts = (5, 10, 20), (8, 64, 512)
    model, rng = GaussianMixtureModel(), np.random.default_rng(0)
    print(describe_machine())
    print(f"model: analytic mixture, D={int(np.prod(model.latent_shape))} elements per sample; '~': extrapolated baseline")
    header = (f"{'N':>5} {'K':>3} {'samples':>7} {'R s':>6} {'search s':>8} {'baseline s':>11} {'batched s':>10} "
              f"{'x search':>9} {'x R+search':>10} {'x batched':>9} {'MB ours':>8} {'MB base':>8} {'evaluations':>11}")
    print(header)
    summary = {}
    for n in teacher_sizes:
        states, outputs = teacher_trajectories(model, n, max(sample_counts))
        timesteps = trailing_timesteps(n)
        for samples in sample_counts:
            s, e = states[:samples], outputs[:samples]
            calibration, r_seconds, _ = timed(lambda: Calibration.from_trajectories(torch.from_numpy(s), torch.from_numpy(e), timesteps))
            for k in step_counts:
                nodes, prefixes, search_s, search_peak = planner_search(calibration, k)
                base = baseline_estimates(lambda: raw_rows(s, e), prefixes, n, rng)
                row = dict(nodes=nodes, search_s=search_s, r_s=r_seconds, peak=search_peak, **{f"base_{key}": v for key, v in base.items()})
                summary[(n, k, samples)] = row
                print(f"{n:>5} {k:>3} {samples:>7} {r_seconds:>6.2f} {search_s:>8.2f} {'~%.1f' % base['per_target_s']:>11} "
                      f"{'~%.1f' % base['per_prefix_s']:>10} {base['per_target_s'] / search_s:>9.0f} "
                      f"{base['per_target_s'] / (search_s + r_seconds):>10.0f} {base['per_prefix_s'] / search_s:>9.1f} "
                      f"{megabytes(search_peak):>8.1f} {megabytes(base['peak']):>8.1f} {base['evaluations']:>11}", flush=True)
            if n == teacher_sizes[0] and samples == sample_counts[0]:
                first = summary[(n, step_counts[0], samples)]
                full_baseline_check(calibration, raw_rows(s, e), step_counts[0], first["base_per_target_s"], first["nodes"])
    print_summary(summary, teacher_sizes, step_counts, sample_counts)


def print_summary(summary: dict, teacher_sizes, step_counts, sample_counts) -> None:
    """The target (N=1000, K=10, >= 10x) and how memory scales with the sample count."""
    n = max(teacher_sizes)
    k = 10 if 10 in step_counts else step_counts[0]
    for samples in sample_counts:
        row = summary[(n, k, samples)]
        print(f"N={n}, K={k}, {samples} samples: search on R {row['search_s']:.2f} s (+ R {row['r_s']:.2f} s) vs "
              f"raw-row baseline ~{row['base_per_target_s']:.0f} s: x{row['base_per_target_s'] / row['search_s']:.0f} "
              f"(x{row['base_per_target_s'] / (row['search_s'] + row['r_s']):.0f} with R)")
    for key in ("peak", "base_peak"):
        ratios = [max(summary[(n, k, b)][key] for b in sample_counts) / min(summary[(n, k, b)][key] for b in sample_counts)
                  for n in teacher_sizes for k in step_counts]
        name = "search on R" if key == "peak" else "raw-row baseline"
        print(f"peak memory of the {name}, largest / smallest over samples {sample_counts}: up to x{max(ratios):.2f}")


if __name__ == "__main__":
    main()
