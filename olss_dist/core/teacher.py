"""The teacher: deterministic DDIM (eta 0) with the model's guided noise predictions.

The teacher runs N steps over strictly decreasing train timesteps and ends at the clean sample
(alpha 1 after the last step). It records every state and every guided output, which is all the
calibration statistics are made of.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, int, Any], torch.Tensor]
"""``denoiser(x (B, *shape), t: int, cond) -> guided epsilon (B, *shape)``."""


def trailing_timesteps(num_teacher_steps: int = 1000, num_train_timesteps: int = 1000) -> np.ndarray:
    """``(N,)`` int64 train timesteps with diffusers' "trailing" spacing, starting at ``T - 1``.

    For ``N == T`` this is ``T-1, ..., 0``. "leading" spacing with an offset is never used: at
    ``N == T`` it would leave the range.
    """
    if not 1 <= num_teacher_steps <= num_train_timesteps:
        raise ValueError(
            f"num_teacher_steps must be in [1, {num_train_timesteps}], got {num_teacher_steps}"
        )
    ratio = num_train_timesteps / num_teacher_steps
    return (np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1).astype(np.int64)


def validate_timesteps(timesteps: Any, num_train_timesteps: int | None = None) -> np.ndarray:
    """Return ``timesteps`` as ``(N,)`` int64, or raise ValueError if not strictly decreasing in range."""
    timesteps = np.asarray(timesteps)
    if timesteps.ndim != 1 or timesteps.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {timesteps.shape}")
    if not np.all(np.equal(np.mod(timesteps, 1), 0)):
        raise ValueError("timesteps must be integers")
    timesteps = timesteps.astype(np.int64)
    if np.any(np.diff(timesteps) >= 0):
        raise ValueError("timesteps must be strictly decreasing (e.g. 999, 998, ..., 0)")
    if timesteps[-1] < 0 or (num_train_timesteps is not None and timesteps[0] >= num_train_timesteps):
        raise ValueError(
            f"timesteps must lie in [0, {num_train_timesteps}), got {timesteps[0]} ... {timesteps[-1]}"
        )
    return timesteps


def ddim_coefficients(alpha_now: float, alpha_next: float) -> tuple[float, float]:
    """``(a, b)`` with ``x_next = a * x + b * eps`` for one deterministic DDIM step.

    ``a = sqrt(alpha_next / alpha_now)``, ``b = sqrt(1 - alpha_next) - sqrt(alpha_next (1 - alpha_now) / alpha_now)``;
    alphas are cumulative products (``alphas_cumprod``), 1 meaning the clean sample.
    """
    a = float(np.sqrt(alpha_next / alpha_now))
    b = float(np.sqrt(1.0 - alpha_next) - np.sqrt(alpha_next * (1.0 - alpha_now) / alpha_now))
    return a, b


def teacher_alphas(timesteps: Any, alphas_cumprod: Any) -> np.ndarray:
    """``(N+1,)`` float64 cumulative alphas at each teacher state; the last one is 1 (clean sample).

    Raises:
        ValueError: ``timesteps`` not strictly decreasing integers within ``alphas_cumprod``.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.append(alphas_cumprod[validate_timesteps(timesteps, len(alphas_cumprod))], 1.0)


def ddim_teacher(
    denoiser: Denoiser, x_T: torch.Tensor, cond: Any, timesteps: Any, alphas_cumprod: Any
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Run the N-step deterministic DDIM teacher from ``x_T``, one state at a time.

    Args:
        denoiser: ``denoiser(x, t, cond) -> eps``, see ``Denoiser``.
        x_T: ``(B, *shape)`` initial noise; ``cond`` its conditioning, passed to the denoiser untouched.
        timesteps: ``(N,)`` strictly decreasing train timesteps.
        alphas_cumprod: ``(num_train_timesteps,)`` cumulative alphas of the model.

    Yields:
        ``(s_n, e_n)`` for n = 0 .. N-1, the state ``(B, *shape)`` in the dtype of ``x_T`` and the guided
        output there, then ``(s_N, None)`` with ``s_N`` the clean sample.

    Raises:
        ValueError: bad timesteps, or a denoiser output of the wrong shape or with NaN / Inf.
    """
    timesteps = validate_timesteps(timesteps)
    alphas = teacher_alphas(timesteps, alphas_cumprod)
    x = x_T
    for n, t in enumerate(timesteps.tolist()):
        eps = denoiser(x, t, cond)
        if eps.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(eps.shape)} for input {tuple(x.shape)}")
        if not torch.isfinite(eps).all():
            raise ValueError(f"denoiser returned non-finite values at teacher step {n} (t={t})")
        yield x, eps
        a, b = ddim_coefficients(alphas[n], alphas[n + 1])
        x = a * x + b * eps.to(x.dtype)
    yield x, None


def record_trajectories(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    cond: Any,
    timesteps: Any,
    alphas_cumprod: Any,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the N-step DDIM teacher from ``x_T`` and record its states and guided outputs.

    Args:
        denoiser: ``denoiser(x, t, cond) -> eps``, see ``Denoiser``.
        x_T: ``(B, *shape)`` initial noise.
        cond: conditioning passed to the denoiser untouched.
        timesteps: ``(N,)`` strictly decreasing train timesteps.
        alphas_cumprod: ``(num_train_timesteps,)`` cumulative alphas of the model.
        progress: called with the number of finished steps after each step.

    Returns:
        states: ``(B, N+1, *shape)`` with ``states[:, 0] == x_T`` and ``states[:, N]`` the clean sample.
        noise_preds: ``(B, N, *shape)``, the guided output at each state.
    """
    num_steps = len(validate_timesteps(timesteps))
    states = x_T.new_empty((x_T.shape[0], num_steps + 1, *x_T.shape[1:]))
    noise_preds = x_T.new_empty((x_T.shape[0], num_steps, *x_T.shape[1:]))
    for n, (state, eps) in enumerate(ddim_teacher(denoiser, x_T, cond, timesteps, alphas_cumprod)):
        states[:, n] = state
        if eps is not None:
            noise_preds[:, n] = eps
        if n > 0 and progress is not None:
            progress(n)
    return states, noise_preds


def record_states(
    denoiser: Denoiser, x_T: torch.Tensor, cond: Any, timesteps: Any, alphas_cumprod: Any, keep: Sequence[int]
) -> torch.Tensor:
    """The teacher's states at the indices ``keep`` only (memory ``B * len(keep)`` latents, not ``B * (2N+1)``).

    Args:
        keep: state indices in ``0..N`` (``N``: the clean sample); the rest as ``ddim_teacher``.

    Returns:
        ``(B, len(keep), *shape)`` in the dtype of ``x_T``, equal to ``record_trajectories``'s states there.
    """
    num_steps = len(validate_timesteps(timesteps))
    keep = [int(n) for n in keep]
    if any(not 0 <= n <= num_steps for n in keep):
        raise ValueError(f"teacher state indices must lie in [0, {num_steps}], got {keep}")
    kept = x_T.new_empty((x_T.shape[0], len(keep), *x_T.shape[1:]))
    for n, (state, _) in enumerate(ddim_teacher(denoiser, x_T, cond, timesteps, alphas_cumprod)):
        for position, index in enumerate(keep):
            if index == n:
                kept[:, position] = state
    return kept
