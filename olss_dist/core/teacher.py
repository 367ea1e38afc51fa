"""The teacher: the model's deterministic ODE, N steps each linear in (state, guided output).

``linear_teacher`` runs any ``TeacherSchedule`` ``s_{n+1} = a_n s_n + b_n o_n``; a noise process
(``core.noise_process``) says what ``a``, ``b`` and the model timesteps are: deterministic DDIM (eta 0)
over strictly decreasing train timesteps ending at the clean sample (alpha 1 after the last step) for VP
models (on ε, or written in v / x0 form where ᾱ = 0 at the first step: zero terminal SNR), Euler on the
velocity over the model's own flow-matching schedule for flow models. The teacher records every state and
every guided output, which is all the calibration statistics are made of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, Any, Any], torch.Tensor]
"""``denoiser(x (B, *shape), t, cond) -> guided output (B, *shape)``: epsilon at an int train timestep
for VP models (v or x0 with zero terminal SNR: ``core.noise_process.vp_output_type``), the velocity at the
pipeline's float timestep ``t = sigma * 1000`` for flow models."""


@dataclass(frozen=True)
class TeacherSchedule:
    """N deterministic steps ``s_{n+1} = state_coefficients[n] * s_n + output_coefficients[n] * o_n``.

    Attributes:
        timesteps: ``(N,)`` float64 model timesteps, strictly decreasing; ``o_n = denoiser(s_n, timesteps[n])``.
        state_coefficients: ``(N,)`` float64 ``a_n``.
        output_coefficients: ``(N,)`` float64 ``b_n``.
        integer_timesteps: the denoiser takes Python ints (VP train timesteps), else Python floats.
    """

    timesteps: np.ndarray
    state_coefficients: np.ndarray
    output_coefficients: np.ndarray
    integer_timesteps: bool

    def __post_init__(self) -> None:
        n = len(self.timesteps)
        if n == 0 or self.state_coefficients.shape != (n,) or self.output_coefficients.shape != (n,):
            raise ValueError(
                f"a teacher schedule needs N >= 1 timesteps and N coefficients of each kind, got {n}, "
                f"{self.state_coefficients.shape}, {self.output_coefficients.shape}"
            )
        if np.any(np.diff(self.timesteps) >= 0):
            raise ValueError("teacher timesteps must be strictly decreasing")
        if not (np.isfinite(self.state_coefficients).all() and np.isfinite(self.output_coefficients).all()):
            raise ValueError("teacher step coefficients must be finite")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def model_timestep(self, n: int) -> int | float:
        """What the denoiser is called with at step ``n``: an int (VP) or a float (flow), as ``model_timestep``
        gives for ``stored_timesteps()[n]``."""
        t = self.timesteps[n]
        return int(t) if self.integer_timesteps else float(t)

    def stored_timesteps(self) -> np.ndarray:
        """``(N,)`` the timesteps as plans and calibrations keep them: int64 (VP) or float64 (flow)."""
        return self.timesteps.astype(np.int64) if self.integer_timesteps else self.timesteps.astype(np.float64)


def model_timestep(t: Any) -> int | float:
    """The timestep a denoiser is called with: a Python int for an integer timestep (VP train timesteps:
    Python / numpy ints, integer tensors, int64 plan and calibration timesteps), a Python float for a
    floating one (flow matching's ``sigma * 1000``: float64 plan timesteps, float scheduler timesteps),
    even where its value is whole (1000.0 at sigma 1), so a flow model always sees floats.

    Every model call of the teacher, the on-policy rounds, the rollouts, the workers and the evaluation
    goes through this (or ``TeacherSchedule.model_timestep``, the same rule), so one timestep reaches the
    model in one form wherever it is called from.
    """
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"a timestep must be a scalar, got shape {tuple(t.shape)}")
        return float(t) if t.is_floating_point() else int(t)
    if isinstance(t, (bool, np.bool_)):
        raise ValueError(f"a timestep must be a number, got {t!r}")
    if isinstance(t, (int, np.integer)):
        return int(t)
    value = float(t)
    if not np.isfinite(value):
        raise ValueError(f"a timestep must be finite, got {value}")
    return value


def check_model_timesteps(timesteps: Any, num_train_timesteps: int | None = None) -> np.ndarray:
    """Model timesteps as plans and calibrations keep them: int64 when given as integers (VP train timesteps,
    in ``[0, T)``), float64 when given as floats (flow matching's ``sigma * 1000``, in ``[0, T]``).

    Raises:
        ValueError: not a non-empty 1-D strictly decreasing finite sequence within range.
    """
    array = np.asarray(timesteps)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        return validate_timesteps(array, num_train_timesteps)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"timesteps must be integers or floats, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("timesteps must be finite")
    if np.any(np.diff(array) >= 0):
        raise ValueError("timesteps must be strictly decreasing (e.g. 1000.0, 997.0, ..., 3.0)")
    if array[-1] < 0 or (num_train_timesteps is not None and array[0] > num_train_timesteps):
        raise ValueError(f"flow timesteps must lie in [0, {num_train_timesteps}], got {array[0]} ... {array[-1]}")
    return array


VP_OUTPUT_TYPES = ("epsilon", "v_prediction", "sample")
"""What a VP teacher's outputs ``o_n`` are: ε (every model whose ᾱ stays above 0), v or the clean sample (zero
terminal SNR, ``core.noise_process.vp_output_type``)."""


def ddim_schedule(timesteps: Any, alphas_cumprod: Any, output_type: str = "epsilon") -> TeacherSchedule:
    """The deterministic DDIM teacher over ``timesteps`` (strictly decreasing train timesteps), ending at alpha 1.

    Args:
        output_type: what the outputs are (``VP_OUTPUT_TYPES``): ``"epsilon"`` (``ddim_coefficients``), or the
            same DDIM step written in v or x0 (``"sample"``) form (``vp_step_coefficients``), which stays finite
            where ᾱ = 0 (zero terminal SNR).

    Raises:
        ValueError: bad timesteps, an unknown ``output_type``, or ε outputs on a schedule with ᾱ = 0 at a
            teacher timestep (the ε step divides by √ᾱ).
    """
    timesteps = validate_timesteps(timesteps)
    alphas = teacher_alphas(timesteps, alphas_cumprod)
    if output_type not in VP_OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r} not in {VP_OUTPUT_TYPES}")
    if output_type == "epsilon":
        if np.any(alphas[:-1] <= 0):
            raise ValueError(
                "alphas_cumprod is 0 at a teacher timestep (zero terminal SNR): the epsilon DDIM step divides by "
                "sqrt(alpha); record v or x0 outputs (output_type 'v_prediction' or 'sample')"
            )
        a, b = np.array([ddim_coefficients(alphas[n], alphas[n + 1]) for n in range(len(timesteps))]).T
    else:
        a, b = np.array([vp_step_coefficients(alphas[n], alphas[n + 1], output_type) for n in range(len(timesteps))]).T
    return TeacherSchedule(timesteps.astype(np.float64), a, b, integer_timesteps=True)


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


def vp_step_coefficients(alpha_now: float, alpha_next: float, output_type: str) -> tuple[float, float]:
    """``(a, b)`` with ``x_next = a * x + b * o`` for one deterministic DDIM step, ``o`` in ``output_type`` form.

    With ``x0 = sqrt(ᾱ) x - sqrt(1 - ᾱ) v`` and ``ε = sqrt(1 - ᾱ) x + sqrt(ᾱ) v`` (v prediction),
    ``x_next = sqrt(ᾱ') x0 + sqrt(1 - ᾱ') ε`` gives ``a = sqrt(ᾱ' ᾱ) + sqrt((1 - ᾱ')(1 - ᾱ))`` and
    ``b = sqrt((1 - ᾱ') ᾱ) - sqrt(ᾱ' (1 - ᾱ))``, finite at ᾱ = 0. With ``o = x0`` (``"sample"``),
    ``ε = (x - sqrt(ᾱ) x0) / sqrt(1 - ᾱ)`` gives ``a = sqrt((1 - ᾱ') / (1 - ᾱ))``, ``b = sqrt(ᾱ') - a sqrt(ᾱ)``
    (finite wherever ᾱ < 1). ``"epsilon"`` is ``ddim_coefficients``.
    """
    if output_type == "epsilon":
        return ddim_coefficients(alpha_now, alpha_next)
    if output_type == "v_prediction":
        a = float(np.sqrt(alpha_next * alpha_now) + np.sqrt((1.0 - alpha_next) * (1.0 - alpha_now)))
        b = float(np.sqrt((1.0 - alpha_next) * alpha_now) - np.sqrt(alpha_next * (1.0 - alpha_now)))
        return a, b
    if output_type == "sample":
        a = float(np.sqrt((1.0 - alpha_next) / (1.0 - alpha_now)))
        return a, float(np.sqrt(alpha_next) - a * np.sqrt(alpha_now))
    raise ValueError(f"output_type {output_type!r} not in {VP_OUTPUT_TYPES}")


def teacher_alphas(timesteps: Any, alphas_cumprod: Any) -> np.ndarray:
    """``(N+1,)`` float64 cumulative alphas at each teacher state; the last one is 1 (clean sample).

    Raises:
        ValueError: ``timesteps`` not strictly decreasing integers within ``alphas_cumprod``.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.append(alphas_cumprod[validate_timesteps(timesteps, len(alphas_cumprod))], 1.0)


def linear_teacher(
    denoiser: Denoiser, x_T: torch.Tensor, cond: Any, schedule: TeacherSchedule
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Run the N-step teacher ``schedule`` from ``x_T``, one state at a time.

    Args:
        denoiser: ``denoiser(x, t, cond) -> guided output``, see ``Denoiser``.
        x_T: ``(B, *shape)`` initial noise; ``cond`` its conditioning, passed to the denoiser untouched.
        schedule: the steps (``ddim_schedule`` or a noise process's ``teacher_schedule``).

    Yields:
        ``(s_n, o_n)`` for n = 0 .. N-1, the state ``(B, *shape)`` in the dtype of ``x_T`` and the guided
        output there, then ``(s_N, None)`` with ``s_N`` the clean sample.

    Raises:
        ValueError: a denoiser output of the wrong shape or with NaN / Inf.
    """
    x = x_T
    for n in range(schedule.num_steps):
        t = schedule.model_timestep(n)
        output = denoiser(x, t, cond)
        if output.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(output.shape)} for input {tuple(x.shape)}")
        if not torch.isfinite(output).all():
            raise ValueError(f"denoiser returned non-finite values at teacher step {n} (t={t})")
        yield x, output
        x = float(schedule.state_coefficients[n]) * x + float(schedule.output_coefficients[n]) * output.to(x.dtype)
    yield x, None


def ddim_teacher(
    denoiser: Denoiser, x_T: torch.Tensor, cond: Any, timesteps: Any, alphas_cumprod: Any
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``linear_teacher`` over ``ddim_schedule(timesteps, alphas_cumprod)`` (see both)."""
    return linear_teacher(denoiser, x_T, cond, ddim_schedule(timesteps, alphas_cumprod))


def schedule_trajectories(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    cond: Any,
    schedule: TeacherSchedule,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``record_trajectories`` for any ``TeacherSchedule`` (a noise process's teacher): states ``(B, N+1, *shape)``
    and guided outputs ``(B, N, *shape)``."""
    num_steps = schedule.num_steps
    states = x_T.new_empty((x_T.shape[0], num_steps + 1, *x_T.shape[1:]))
    outputs = x_T.new_empty((x_T.shape[0], num_steps, *x_T.shape[1:]))
    for n, (state, output) in enumerate(linear_teacher(denoiser, x_T, cond, schedule)):
        states[:, n] = state
        if output is not None:
            outputs[:, n] = output
        if n > 0 and progress is not None:
            progress(n)
    return states, outputs


def schedule_states(
    denoiser: Denoiser, x_T: torch.Tensor, cond: Any, schedule: TeacherSchedule, keep: Sequence[int]
) -> torch.Tensor:
    """``record_states`` for any ``TeacherSchedule``: ``(B, len(keep), *shape)``, the states at indices ``keep``."""
    num_steps = schedule.num_steps
    keep = [int(n) for n in keep]
    if any(not 0 <= n <= num_steps for n in keep):
        raise ValueError(f"teacher state indices must lie in [0, {num_steps}], got {keep}")
    kept = x_T.new_empty((x_T.shape[0], len(keep), *x_T.shape[1:]))
    for n, (state, _) in enumerate(linear_teacher(denoiser, x_T, cond, schedule)):
        for position, index in enumerate(keep):
            if index == n:
                kept[:, position] = state
    return kept


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
    validate_timesteps(timesteps)
    return schedule_trajectories(denoiser, x_T, cond, ddim_schedule(timesteps, alphas_cumprod), progress)


def record_states(
    denoiser: Denoiser, x_T: torch.Tensor, cond: Any, timesteps: Any, alphas_cumprod: Any, keep: Sequence[int]
) -> torch.Tensor:
    """The teacher's states at the indices ``keep`` only (memory ``B * len(keep)`` latents, not ``B * (2N+1)``).

    Args:
        keep: state indices in ``0..N`` (``N``: the clean sample); the rest as ``ddim_teacher``.

    Returns:
        ``(B, len(keep), *shape)`` in the dtype of ``x_T``, equal to ``record_trajectories``'s states there.
    """
    validate_timesteps(timesteps)
    return schedule_states(denoiser, x_T, cond, ddim_schedule(timesteps, alphas_cumprod), keep)
