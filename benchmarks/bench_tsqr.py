"""TSQR benchmark: R from shard factors merged in a binary tree against one QR of all rows.

The rows are real calibration rows (teacher trajectories of an analytic mixture with 1024-element latents,
columns ``s_0, e_0, ..., s_N``, nearly collinear neighbours), with shards of 4 samples = 4096 rows, many
more than the 2N+1 columns, as with image latents. For each size the script factors the rows three ways and
prints times and agreement with the single QR (the baseline, same process):

- ``tree``: ``r_factor`` per shard, then pairwise ``merge_r_factors`` level by level (what the Ray job does);
- ``flat``: ``r_factor`` per shard, then one ``merge_r_factors`` of all shard factors;
- ``stream``: ``streaming_r_factor`` over the shards in order (one worker folding its chunks into R in
  place, LAPACK ``dtpqrt``).

Agreement: the Gram matrices, ``||R^T R - R_qr^T R_qr||_F / ||R_qr^T R_qr||_F`` (R itself is not a stable
target: its rows for near-dependent columns move a lot under rounding, while every least squares it serves
does not), and the largest relative differences of the teacher-forced coefficients and step errors of a
10-step plan computed from each R. The tree's critical path is the time with one worker per shard: one
shard factor plus, per level, one merge. For one QR and the stream the script also prints the peak
resident memory above the start (``common.measured``; the rows themselves are resident before).

    python benchmarks/bench_tsqr.py
"""

from __future__ import annotations

from common import describe_machine, measured, pin_threads

pin_threads()  # before numpy and torch load their thread pools

import time

import numpy as np
import torch

from olss_dist.core.calibration import Calibration
from olss_dist.models.analytic import GaussianMixtureModel
from olss_dist.core.path_search import even_nodes
from olss_dist.core.teacher import record_trajectories, trailing_timesteps
from olss_dist.core.tsqr import interleave_columns, merge_r_factors, r_factor, streaming_r_factor

LATENT_SHAPE = (4, 16, 16)
SAMPLES_PER_SHARD = 4
SIZES = ((250, 64), (500, 64), (1000, 32))
"""(teacher steps N, samples)."""


def calibration_rows(num_teacher_steps: int, num_samples: int) -> tuple[torch.Tensor, np.ndarray]:
    """``(B*D, 2N+1)`` float64 rows of the analytic model's teacher trajectories, and the teacher timesteps."""
    model = GaussianMixtureModel(latent_shape=LATENT_SHAPE)
    timesteps = trailing_timesteps(num_teacher_steps)
    x_T = model.initial_noise(range(num_samples)).double()
    states, outputs = record_trajectories(model, x_T, torch.arange(num_samples) % 10, timesteps, model.alphas_cumprod)
    return interleave_columns(states, outputs), timesteps


def tree_merge(factors: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise merges, level by level, until one factor is left."""
    while len(factors) > 1:
        factors = [merge_r_factors(factors[i : i + 2]) for i in range(0, len(factors), 2)]
    return factors[0]


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def compare(name: str, r: np.ndarray, reference: np.ndarray, num_rows: int, timesteps: np.ndarray, seconds: float,
            baseline_seconds: float, reference_fit: tuple[np.ndarray, np.ndarray], nodes: list[int]) -> None:
    gram, reference_gram = r.T @ r, reference.T @ reference
    difference = np.linalg.norm(gram - reference_gram) / np.linalg.norm(reference_gram)
    coefficients, step_errors = Calibration(r, 1, num_rows, timesteps).fit(nodes)
    coefficient_difference = np.abs(coefficients - reference_fit[0]).max() / np.abs(reference_fit[0]).max()
    error_difference = np.abs(step_errors / reference_fit[1] - 1).max()
    print(f"  {name:<7} {seconds:7.2f} s  x{seconds / baseline_seconds:5.2f} of one QR   Gram rel diff {difference:.1e}   "
          f"10-step plan: coefficients {coefficient_difference:.1e}, step errors {error_difference:.1e}")


def main() -> None:
    print(describe_machine())
    print("times are wall seconds, every stage serial in this process (shard factors run in parallel in the job)")
    for num_teacher_steps, num_samples in SIZES:
        rows, timesteps = calibration_rows(num_teacher_steps, num_samples)
        num_shards = num_samples // SAMPLES_PER_SHARD
        shards = list(torch.chunk(rows, num_shards))
        print(f"N={num_teacher_steps}: {rows.shape[0]} rows x {rows.shape[1]} columns, {num_shards} shards of "
              f"{shards[0].shape[0]} rows")
        reference, baseline_seconds, baseline_peak = measured(lambda: r_factor(rows).numpy())
        nodes = even_nodes(num_teacher_steps, 10)
        reference_fit = Calibration(reference, 1, rows.shape[0], timesteps).fit(nodes)
        print(f"  one QR  {baseline_seconds:7.2f} s   peak {baseline_peak / 2**20:.0f} MB above the rows")
        shard_factors, shard_seconds = timed(lambda: [r_factor(s) for s in shards])
        tree, tree_seconds = timed(lambda: tree_merge(shard_factors))
        flat, flat_seconds = timed(lambda: merge_r_factors(shard_factors))
        streamed, stream_seconds, stream_peak = measured(lambda: streaming_r_factor(iter(shards), rows.shape[1]))
        common = (reference, rows.shape[0], timesteps)
        compare("tree", tree.numpy(), *common, shard_seconds + tree_seconds, baseline_seconds, reference_fit, nodes)
        levels = int(np.ceil(np.log2(num_shards)))
        critical = shard_seconds / num_shards + levels * tree_seconds / (num_shards - 1)
        print(f"          shard factors {shard_seconds:.2f} s, {num_shards - 1} merges {tree_seconds:.2f} s; critical path "
              f"with a worker per shard ~{critical:.2f} s (x{critical / baseline_seconds:.2f} of one QR, {levels} levels)")
        compare("flat", flat.numpy(), *common, shard_seconds + flat_seconds, baseline_seconds, reference_fit, nodes)
        compare("stream", streamed.numpy(), *common, stream_seconds, baseline_seconds, reference_fit, nodes)
        print(f"          stream peak {stream_peak / 2**20:.0f} MB above the rows (R and one {shards[0].shape[0]}-row chunk)")


if __name__ == "__main__":
    main()
