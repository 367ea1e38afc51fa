"""Tall-skinny QR: per-shard triangular factors and their merge.

The calibration matrix has one row per latent element of every sample and one column per
trajectory quantity. Only its triangular factor R is ever kept: any least-squares fit and
residual over its columns is a small problem on R (see ``lstsq``), and R of stacked rows is the R
of the stacked R's, so shards reduce independently and merge in any order or tree.

Within a shard the rows stream: on the CPU each chunk is folded into the running R in place by
LAPACK's triangular-pentagonal QR (``dtpqrt``: the QR of ``[R; chunk]`` that never touches R's zeros
and never stacks the two), so the reduction holds R plus two chunks whatever the number of rows; on
another device chunks are gathered to ``DEVICE_FOLD_ROWS`` rows and folded by a QR of ``[R; rows]``.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from scipy.linalg import lapack

DEFAULT_CHUNK_ROWS = 1024
"""Rows per streamed chunk: at N = 1000 (2001 columns) a 16 MB float64 chunk, beside R's 32 MB."""

DEVICE_FOLD_ROWS = 16384
"""Off the CPU, rows gathered before each QR of ``[R; rows]`` (that QR also refactors R's C rows)."""

TPQRT_BLOCK = 64
"""Block size of the in-place fold (LAPACK's ``nb``)."""


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


def chunk_spans(batch: int, elements: int, chunk_rows: int) -> Iterator[tuple[int, int, int, int]]:
    """``(first_sample, end_sample, first_element, end_element)`` of each chunk of about ``chunk_rows`` rows.

    Chunks hold whole samples when a sample has fewer than ``chunk_rows`` elements, and slices of one
    sample otherwise.
    """
    if elements >= chunk_rows:
        for b in range(batch):
            for start in range(0, elements, chunk_rows):
                yield b, b + 1, start, min(start + chunk_rows, elements)
    else:
        samples = max(1, chunk_rows // elements)
        for start in range(0, batch, samples):
            yield start, min(start + samples, batch), 0, elements


def iter_row_chunks(
    states: torch.Tensor, noise_preds: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[torch.Tensor]:
    """Yield the rows of ``interleave_columns`` in float64 chunks of about ``chunk_rows`` rows (``chunk_spans``),
    so a chunk is at most ``max(chunk_rows, D) * (2N+1)`` float64 whatever the batch size."""
    batch = states.shape[0]
    elements = states[0, 0].numel()
    flat_states = states.reshape(batch, states.shape[1], elements)
    flat_preds = noise_preds.reshape(batch, noise_preds.shape[1], elements)
    for b0, b1, e0, e1 in chunk_spans(batch, elements, chunk_rows):
        yield interleave_columns(flat_states[b0:b1, :, e0:e1], flat_preds[b0:b1, :, e0:e1])


def trajectory_r_factor(
    states: torch.Tensor, noise_preds: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """R of ``interleave_columns(states, noise_preds)``, streamed ``chunk_rows`` rows at a time.

    Args:
        states: ``(B, N+1, *shape)``, any float dtype; noise_preds: ``(B, N, *shape)``.

    Returns:
        ``(2N+1, 2N+1)`` float64 on the trajectories' device. On the CPU the rows are written into one
        column-major float64 chunk, reused, and folded in place (``fold_into``): the reduction holds R
        and one chunk beside the trajectories, however many samples there are.
    """
    num_columns = 2 * states.shape[1] - 1
    if states.device.type != "cpu" or states.dtype == torch.bfloat16:  # numpy has no bfloat16
        return streaming_r_factor(iter_row_chunks(states, noise_preds, chunk_rows), num_columns)
    batch, elements = states.shape[0], states[0, 0].numel()
    flat_states = states.reshape(batch, states.shape[1], elements).numpy()
    flat_preds = noise_preds.reshape(batch, noise_preds.shape[1], elements).numpy()
    r = np.zeros((num_columns, num_columns), order="F")
    chunk = np.empty((0, num_columns), order="F")
    for b0, b1, e0, e1 in chunk_spans(batch, elements, chunk_rows):
        width = e1 - e0
        if chunk.shape[0] != (b1 - b0) * width:
            chunk = np.empty(((b1 - b0) * width, num_columns), order="F")
        for i, b in enumerate(range(b0, b1)):
            rows = slice(i * width, (i + 1) * width)
            chunk[rows, 0::2] = flat_states[b, :, e0:e1].T
            chunk[rows, 1::2] = flat_preds[b, :, e0:e1].T
        if b0 == 0 and e0 == 0:
            first_r_into(r, chunk)
        else:
            fold_into(r, chunk, overwrite_rows=True)
    return torch.from_numpy(np.ascontiguousarray(r))


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
    """R of all rows of ``chunks`` (each ``(M_i, C)``), folding them one at a time into a running R.

    CPU chunks are folded in place (``fold_into``, chunks left as they are): memory is R and a
    column-major copy of one chunk.
    Chunks on another device are gathered to ``DEVICE_FOLD_ROWS`` rows per QR of ``[R; rows]``.
    Returns ``(C, C)`` float64 on the chunks' device.
    """
    running: np.ndarray | torch.Tensor | None = None
    pending: list[torch.Tensor] = []
    pending_rows = 0
    for chunk in chunks:
        if chunk.ndim != 2 or chunk.shape[1] != num_columns:
            raise ValueError(f"chunk has {chunk.shape[1] if chunk.ndim == 2 else 'no'} columns, expected {num_columns}")
        if chunk.device.type == "cpu":
            if running is None:
                running = np.zeros((num_columns, num_columns), order="F")
                first_r_into(running, chunk.numpy())
            else:
                fold_into(running, chunk.numpy())
            continue
        pending.append(chunk.to(torch.float64))
        pending_rows += chunk.shape[0]
        if pending_rows >= DEVICE_FOLD_ROWS:
            running = r_factor(torch.cat(([running] if running is not None else []) + pending))
            pending, pending_rows = [], 0
    if pending:
        running = r_factor(torch.cat(([running] if running is not None else []) + pending))
    if running is None:
        raise ValueError("no rows to factor")
    return torch.from_numpy(np.ascontiguousarray(running)) if isinstance(running, np.ndarray) else running


def first_r_into(r: np.ndarray, rows: np.ndarray) -> None:
    """Set ``r (C, C)`` (column-major) to the R of ``rows (M, C)`` alone, zero-padded when ``M < C``.

    The first chunk's own QR: with fewer rows than columns it costs ``2 M^2 C`` flops where a fold
    into a zero R costs ``2 M C^2``.
    """
    top = np.linalg.qr(np.asarray(rows, dtype=np.float64), mode="r")
    r[...] = 0.0
    r[: top.shape[0]] = top


def fold_into(r: np.ndarray, rows: np.ndarray, overwrite_rows: bool = False) -> None:
    """Replace ``r (C, C)`` (float64, column-major, upper triangular) by the R of ``[r; rows (M, C)]``, in place.

    ``rows`` is left as it is unless ``overwrite_rows`` (then a column-major float64 ``rows`` becomes
    LAPACK's workspace and is destroyed: no copy). Row signs may differ from a QR of all rows at
    once; every fit and residual from R is the same.
    """
    if rows.shape[0] == 0:
        return
    block = np.asfortranarray(rows, dtype=np.float64) if overwrite_rows else np.array(rows, dtype=np.float64, order="F")
    folded, _, _, info = lapack.dtpqrt(0, min(TPQRT_BLOCK, r.shape[1]), r, block, overwrite_a=True, overwrite_b=True)
    if info != 0:
        raise ValueError(f"LAPACK dtpqrt failed on a ({rows.shape[0]}, {rows.shape[1]}) chunk (info {info})")
    if folded is not r:  # the wrapper copies when r is not column-major float64
        r[...] = folded
