"""Driver-side merge cost against the shard count: the streaming merge tree vs one gather at the end.

For S shards of ``C = 2N+1`` columns the job folds each arriving shard's R into ``MergeTree``; after the
last shard arrives only the merges on its path to the root remain (at most ``ceil(log2 S)``). A gather
at the end instead stacks all S factors and runs one QR of ``S*C`` rows after the last arrival. The
script prints, per S, the tree's total merge time (spread over the run, overlapping the workers), its
tail (time of the last ``add``: what the driver adds after the last shard), the flat merge's time (all
of it tail), and their agreement (``R^T R``, relative).

The shard factors are real: analytic-model teacher trajectories, one shard of ``--shard-size`` samples
each, computed once and reused (shard s uses factor ``s mod 8``, which costs the same to merge).

    python benchmarks/bench_merge.py --teacher-steps 200 --shards 2,8,32,128
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from olss_dist.core.calibration import Calibration
from olss_dist.distributed.merge import MergeTree
from olss_dist.models.analytic import GaussianMixtureModel
from olss_dist.core.teacher import record_trajectories, trailing_timesteps
from olss_dist.core.tsqr import merge_r_factors

DISTINCT_FACTORS = 8


def shard_calibrations(num_teacher_steps: int, shard_size: int) -> list[Calibration]:
    """``DISTINCT_FACTORS`` shard calibrations of the analytic model (float64 R, ``(2N+1, 2N+1)``)."""
    model = GaussianMixtureModel(guidance_scale=3.0)
    timesteps = trailing_timesteps(num_teacher_steps)
    calibrations = []
    for shard in range(DISTINCT_FACTORS):
        seeds = range(shard * shard_size, (shard + 1) * shard_size)
        cond = torch.tensor([s % model.num_classes for s in seeds])
        states, outputs = record_trajectories(model, model.initial_noise(seeds), cond, timesteps, model.alphas_cumprod)
        calibrations.append(Calibration.from_trajectories(states, outputs, timesteps))
    return calibrations


def tree_merge(calibrations: list[Calibration], num_shards: int) -> tuple[Calibration, float, float, int]:
    """Merged result, total seconds, seconds of the last ``add`` and number of merges, shards in a shuffled order."""
    order = np.random.default_rng(0).permutation(num_shards)
    tree = MergeTree(num_shards)
    total = tail = 0.0
    for shard_id in order:
        start = time.perf_counter()
        tree.add(int(shard_id), calibrations[shard_id % DISTINCT_FACTORS])
        tail = time.perf_counter() - start
        total += tail
    return tree.result(), total, tail, tree.num_merges


def flat_merge(calibrations: list[Calibration], num_shards: int) -> tuple[np.ndarray, float]:
    factors = [calibrations[s % DISTINCT_FACTORS].r_factor for s in range(num_shards)]
    start = time.perf_counter()
    merged = merge_r_factors(factors)
    return merged, time.perf_counter() - start


def gram_difference(a: np.ndarray, b: np.ndarray) -> float:
    gram_a, gram_b = a.T @ a, b.T @ b
    return float(np.abs(gram_a - gram_b).max() / np.abs(gram_b).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--shards", default="2,8,32,128")
    args = parser.parse_args()
    shard_counts = [int(s) for s in args.shards.split(",")]

    calibrations = shard_calibrations(args.teacher_steps, args.shard_size)
    columns = 2 * args.teacher_steps + 1
    print(f"N={args.teacher_steps} (R is {columns}x{columns} float64), torch threads={torch.get_num_threads()}")
    print(f"{'shards':>6} {'merges':>6} {'tree total s':>12} {'per merge s':>11} {'tree tail s':>11} "
          f"{'flat (tail) s':>13} {'tail ratio':>10} {'gram diff':>9}")
    for num_shards in shard_counts:
        tree_result, total, tail, merges = tree_merge(calibrations, num_shards)
        flat, flat_seconds = flat_merge(calibrations, num_shards)
        per_merge = total / max(merges, 1)
        print(f"{num_shards:>6} {merges:>6} {total:>12.3f} {per_merge:>11.4f} {tail:>11.4f} "
              f"{flat_seconds:>13.3f} {flat_seconds / max(tail, 1e-9):>10.1f} "
              f"{gram_difference(tree_result.r_factor, flat):>9.1e}")


if __name__ == "__main__":
    main()
