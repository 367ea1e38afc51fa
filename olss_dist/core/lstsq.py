"""Least squares over the rows of a tall matrix, computed from its triangular factor R alone.

For feature columns F and target columns Y of A = QR, the fit of A[:, Y] on A[:, F] equals the fit of
R[:, Y] on R[:, F], with the same residual sum of squares. R is upper triangular, so only the rows
up to the largest column index involved carry anything.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def solve_from_r(
    r: np.ndarray, features: Sequence[int], targets: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients and residual sums of squares of ``targets`` on ``features``.

    Args:
        r: ``(C, C)`` float64 upper-triangular factor of the data matrix.
        features: column indices of the regressors, ``F`` of them.
        targets: column indices of the targets, ``T`` of them.

    Returns:
        coefficients ``(F, T)`` and residual sums of squares ``(T,)``, both float64, summed over
        every row of the data matrix (divide by the row count for a mean).
    """
    features = list(features)
    targets = list(targets)
    top = max(features + targets) + 1
    a = r[:top, features]
    y = r[:top, targets]
    coefficients = np.linalg.lstsq(a, y, rcond=None)[0]
    residual = y - a @ coefficients
    return coefficients, np.einsum("rt,rt->t", residual, residual)


def orthonormal_basis(a: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """``(M, rank)`` orthonormal basis of the column space of ``a (M, F)``, by SVD.

    Nearly dependent columns (neighbouring outputs are) are dropped below ``rtol`` times the largest
    singular value instead of inflating the span with rounding noise.
    """
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return u[:, :0]
    return u[:, s > s[0] * rtol]


def tail_sums_of_squares(r: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """``(C+1, len(columns))``: entry ``[k, j]`` is the sum of ``r[k:, columns[j]] ** 2``."""
    block = r[:, list(columns)] ** 2
    tails = np.zeros((r.shape[0] + 1, block.shape[1]))
    tails[:-1] = np.cumsum(block[::-1], axis=0)[::-1]
    return tails


def tail_sums_of_rows(rows: np.ndarray) -> np.ndarray:
    """``(T, C+1)``: entry ``[j, k]`` is the sum of ``rows[j, k:] ** 2`` (``tail_sums_of_squares`` with the
    columns of R given as the rows of ``rows (T, C)``, e.g. a contiguous transposed copy: faster)."""
    tails = np.zeros((rows.shape[0], rows.shape[1] + 1))
    reversed_tails = tails[:, -2::-1]  # columns C-1 ... 0: the sums run from the last column back
    np.square(rows[:, ::-1], out=reversed_tails)
    np.cumsum(reversed_tails, axis=1, out=reversed_tails)
    return tails


def residuals_of_many(
    r: np.ndarray, features: Sequence[int], targets: np.ndarray, target_tails: np.ndarray
) -> np.ndarray:
    """Residual sums of squares of many targets on one feature set, with one QR of the features.

    The features live in rows ``0..top-1`` (``top = max(features) + 1``); the part of each target below
    that is orthogonal to every feature and enters through ``target_tails``.

    Args:
        r: ``(C, C)`` upper-triangular factor.
        features: feature column indices.
        targets: ``(T,)`` target column indices.
        target_tails: ``(C+1, T)`` tail sums of squares of the targets (``tail_sums_of_squares``).

    Returns:
        ``(T,)`` residual sums of squares.
    """
    top = max(features) + 1
    q = orthonormal_basis(r[:top, list(features)])
    return residuals_on_basis(q, r[:top, targets].T, target_tails[top])


def residuals_on_basis(q: np.ndarray, y_rows: np.ndarray, tails: np.ndarray) -> np.ndarray:
    """Residual sums of squares of many targets off the span of ``q (top, rank)``.

    ``q`` is ``orthonormal_basis`` of the feature block of R (rows ``0..top-1``); row ``t`` of
    ``y_rows (T, top)`` holds the same rows of target ``t`` (targets as rows: a contiguous block to
    gather when R's target columns are kept transposed); ``tails (T,)`` are the targets' squares
    below row ``top``. Every result is at least its tail: the search uses the tails alone as free
    lower bounds.
    """
    residual = y_rows - (y_rows @ q) @ q.T
    return np.einsum("tr,tr->t", residual, residual) + tails
