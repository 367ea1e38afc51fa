"""Tall-skinny QR: per-shard triangular factors and their merge.

The calibration matrix has one row per latent element of every sample and one column per
trajectory quantity. Only its triangular factor R is ever kept: any least-squares fit and
residual over its columns is a small problem on R (see ``lstsq``), and R of stacked rows is the R
of the stacked R's, so shards reduce independently and merge in any order or tree.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

DEFAULT_CHUNK_ROWS = 8192


def interleave_columns(states: torch.Tensor, noise_preds: torch.Tensor) -> torch.Tensor:
    """Calibration rows of one batch with interleaved columns ``s_0, e_0, s_1, ..., e_{N-1}, s_N``.

    Args:
        states: ``(B, N+1, *shape)``.
        noise_preds: ``(B, N, *shape)``.

    Returns:
        ``(B * D, 2N+1)`` float64 with ``D = prod(shape)``; state ``s_n`` is column ``2n``, output
        ``e_n`` column ``2n+1``.
    """
    batch, num_states = states.shape[:2]
    flat_states = states.reshape(batch, num_states, -1).transpose(1, 2).reshape(-1, num_states)
    flat_preds = noise_preds.reshape(batch, num_states - 1, -1).transpose(1, 2).reshape(-1, num_states - 1)
    rows = flat_states.new_empty((flat_states.shape[0], 2 * num_states - 1), dtype=torch.float64)
    rows[:, 0::2] = flat_states
    rows[:, 1::2] = flat_preds
    return rows


def iter_row_chunks(
    states: torch.Tensor, noise_preds: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[torch.Tensor]:
    """Yield the rows of ``interleave_columns`` in float64 chunks of about ``chunk_rows`` rows.

    Chunks hold whole samples when a sample has fewer than ``chunk_rows`` elements, and slices of one
    sample otherwise, so peak memory is ``chunk_rows * (2N+1)`` float64 whatever the batch size.
    """
    batch = states.shape[0]
    elements = states[0, 0].numel()
    if elements >= chunk_rows:
        flat_states = states.reshape(batch, states.shape[1], elements)
        flat_preds = noise_preds.reshape(batch, noise_preds.shape[1], elements)
        for b in range(batch):
            for start in range(0, elements, chunk_rows):
                stop = min(start + chunk_rows, elements)
                yield interleave_columns(flat_states[b : b + 1, :, start:stop], flat_preds[b : b + 1, :, start:stop])
    else:
        samples = max(1, chunk_rows // elements)
        for start in range(0, batch, samples):
            yield interleave_columns(states[start : start + samples], noise_preds[start : start + samples])


def r_factor(rows: torch.Tensor) -> torch.Tensor:
    """``(C, C)`` float64 upper-triangular R of ``rows (M, C)`` (zero-padded when ``M < C``), on ``rows.device``."""
    rows = rows.to(torch.float64)
    r = torch.linalg.qr(rows, mode="r").R
    if r.shape[0] < rows.shape[1]:
        r = torch.cat([r, r.new_zeros((rows.shape[1] - r.shape[0], rows.shape[1]))])
    return r


def merge_r_factors(factors: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray | torch.Tensor:
    """R of the row-stacked matrices whose R factors are ``factors`` (each ``(C, C)``).

    Returns a numpy array when the first factor is numpy, a tensor otherwise. Row signs may differ
    from a QR of the original rows; every fit and residual derived from R is the same.
    """
    if len(factors) == 0:
        raise ValueError("merge_r_factors needs at least one factor")
    as_numpy = isinstance(factors[0], np.ndarray)
    # A copy of numpy input: factors fetched from Ray's object store are read-only arrays.
    tensors = [torch.tensor(f, dtype=torch.float64) if isinstance(f, np.ndarray) else f.to(torch.float64) for f in factors]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"cannot merge R factors of different shapes: {sorted(shapes)}")
    merged = tensors[0] if len(tensors) == 1 else r_factor(torch.cat(tensors))
    return merged.numpy() if as_numpy else merged


def streaming_r_factor(chunks: Iterator[torch.Tensor], num_columns: int) -> torch.Tensor:
    """R of all rows of ``chunks`` (each ``(M_i, C)``), folding one chunk at a time into a running R."""
    running: torch.Tensor | None = None
    for chunk in chunks:
        if chunk.shape[1] != num_columns:
            raise ValueError(f"chunk has {chunk.shape[1]} columns, expected {num_columns}")
        rows = chunk if running is None else torch.cat([running, chunk.to(running)])
        running = r_factor(rows)
    if running is None:
        raise ValueError("no rows to factor")
    return running
