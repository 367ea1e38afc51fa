"""Where the samples live: the rollout backend the method runs on, and its in-process implementation.

The method (``olss_dist.method.run``) only ever sees reductions: the merged teacher calibration, the
per-round on-policy statistics (small R factors, one per shard) and per-sample validation errors.
The samples, teacher states and model calls stay in the backend: in this process here, on Ray actors
in ``olss_dist.distributed``. Both run the same method code, so they give the same plans.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from olss_dist.core.calibration import Calibration
from olss_dist.core.onpolicy import apply_step, step_statistics
from olss_dist.core.teacher import (
    Denoiser,
    TeacherSchedule,
    model_timestep,
    schedule_states,
    schedule_trajectories,
)

TRAIN = "train"
VALIDATION = "validation"
SCREEN = "screen"
"""Fresh samples without a teacher: the tail screen (``method.screen``) compares rollouts there with a reference rollout."""


class RolloutBackend(ABC):
    """Samples of a train and a validation split, their teacher runs, and K-step sampler rollouts.

    A rollout is one run of a K-step sampler over every sample of a split, advanced one step at a time
    by the method: ``start`` calls the model at ``x_T``; ``statistics`` reduces the rows
    ``[x_T, ê_0..ê_i, s_target]`` to R factors; ``advance`` moves to ``x̂_{i+1}`` and calls the model again.
    A rollout that starts mid-way (img2img start plans) starts from the teacher's state at a node
    ``start_node`` instead, which then takes the place of ``x_T`` in all three.
    """

    @property
    @abstractmethod
    def num_train_rows(self) -> int:
        """Train samples times latent elements."""

    @abstractmethod
    def record_teacher(self, schedule: TeacherSchedule) -> Calibration:
        """Run the teacher ``schedule`` (a noise process's ``teacher_schedule(N)``) on both splits; keep every
        state of both until ``keep_train_states``; return the train calibration (timesteps
        ``schedule.stored_timesteps()``)."""

    @abstractmethod
    def keep_train_states(self, nodes: Iterable[int], validation_nodes: Iterable[int] = ()) -> None:
        """Drop the teacher train states except at ``nodes``, and the validation states except at
        ``validation_nodes`` (where start plans start), keeping each split's final state."""

    @abstractmethod
    def start(self, split: str, timestep: int | float, start_node: int = 0) -> int:
        """Begin a rollout of ``split`` from ``x_T`` (``start_node`` 0) or from the teacher's state at node
        ``start_node`` (kept by ``keep_train_states``), with the model called at ``timestep``
        (``teacher.model_timestep`` form: int VP train timestep, float flow ``sigma * 1000``); returns its handle."""

    @abstractmethod
    def statistics(self, handle: int, target_node: int) -> list[torch.Tensor]:
        """R factors (one per shard, in shard order) of ``[x_T, ê_0..ê_i, s_target_node]`` of a train rollout."""

    @abstractmethod
    def advance(self, handle: int, weights: np.ndarray, next_timestep: int | float | None) -> None:
        """``x̂ = weights · [x_T, ê_0..ê_i]``; then call the model at ``next_timestep`` unless it is None."""

    def advance_steps(self, handle: int, steps: Sequence[tuple[np.ndarray, int | float | None]]) -> None:
        """``advance(handle, weights, next_timestep)`` for each step in order: a fixed sampler's steps, with no
        statistics between them (validation, the screen), which a distributed backend runs in one round."""
        for weights, next_timestep in steps:
            self.advance(handle, weights, next_timestep)

    @abstractmethod
    def final_errors(self, handle: int) -> np.ndarray:
        """``(B_split,)`` mean squared error per element of each sample's last state against the teacher's."""

    @abstractmethod
    def close(self, handle: int) -> None:
        """Free the rollout."""

    def has_split(self, split: str) -> bool:
        """Whether the backend holds samples of ``split`` (the screen split is optional)."""
        return split in (TRAIN, VALIDATION)

    def final_differences(self, handle: int, reference: int) -> np.ndarray:
        """``(B_split,)`` mean squared difference per element between the last states of two finished rollouts
        of one split (``method.screen``: a sampler against the reference sampler on the screen split)."""
        raise NotImplementedError(f"{type(self).__name__} has no screen split")

    def teacher_differences(self, handle: int, indices: Sequence[int]) -> np.ndarray:
        """``(len(indices),)`` mean squared difference per element between a finished screen rollout's last states
        at samples ``indices`` (positions in the split) and the teacher's final states there. The teacher runs on
        a sample the first time one is asked for (N model calls each) and is kept: the screen's adjudication of
        the few samples where a sampler and the reference part (``method.screen``)."""
        raise NotImplementedError(f"{type(self).__name__} has no screen split")


def run_to_end(backend: RolloutBackend, split: str, coefficients: np.ndarray, step_timesteps: Sequence[int | float],
               start_node: int = 0) -> int:
    """Start a rollout of ``split`` (from ``x_T``, or from the teacher's state at ``start_node``) and run the sampler
    ``coefficients (K, K+1)`` through all its steps, calling the model at ``step_timesteps (K,)``, in one
    ``advance_steps``; returns the open handle (the caller closes it)."""
    handle = backend.start(split, model_timestep(step_timesteps[0]), start_node=start_node)
    try:
        following = [model_timestep(t) for t in step_timesteps[1:]] + [None]
        backend.advance_steps(handle, [(coefficients[i, : i + 2], following[i]) for i in range(len(step_timesteps))])
    except BaseException:
        backend.close(handle)
        raise
    return handle


@dataclass
class Rollout:
    """One sampler run over a batch: its initial noise, outputs so far and current state."""

    x_T: torch.Tensor
    cond: Any
    outputs: list[torch.Tensor] = field(default_factory=list)
    state: torch.Tensor | None = None


def batch_slices(size: int, batch_size: int | None) -> list[slice]:
    """Consecutive slices of at most ``batch_size`` (all at once when None)."""
    step = size if not batch_size else batch_size
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


def select(cond: Any, rows: slice) -> Any:
    """The conditioning of samples ``rows``; ``cond`` is indexable along the batch."""
    return cond[rows]


def take(cond: Any, indices: Sequence[int]) -> Any:
    """The conditioning of samples ``indices`` (any order, repeats allowed): a tensor, a list or tuple, or
    anything indexable by an integer array."""
    if isinstance(cond, torch.Tensor):
        return cond[torch.as_tensor(np.asarray(indices, dtype=np.int64), device=cond.device)]
    if isinstance(cond, (list, tuple)):
        return type(cond)(cond[int(i)] for i in indices)
    return cond[np.asarray(indices, dtype=np.int64)]


class InProcessBackend(RolloutBackend):
    """All samples in this process; model calls in batches of ``batch_size`` samples.

    Args:
        denoiser: ``denoiser(x, t, cond) -> eps``.
        noise: ``(B, *shape)`` train initial noise; ``cond`` its conditioning.
        validation_noise: ``(V, *shape)``; ``validation_cond`` its conditioning. None: no validation split,
            for on-policy fits of given nodes alone (``record_train_states``, ``method.run.fit_candidate``).
        screen_noise: ``(S, *shape)`` fresh samples of the tail screen (``SCREEN``; no teacher runs on them);
            ``screen_cond`` their conditioning. None: no screen split.
        batch_size: samples per model call (None: a split at once).
        progress: called with a short description of each finished stage.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        noise: torch.Tensor,
        cond: Any,
        validation_noise: torch.Tensor | None = None,
        validation_cond: Any = None,
        batch_size: int | None = None,
        progress: Callable[[str], None] | None = None,
        screen_noise: torch.Tensor | None = None,
        screen_cond: Any = None,
    ):
        self.denoiser = denoiser
        self.splits = {TRAIN: (noise, cond)}
        if validation_noise is not None:
            self.splits[VALIDATION] = (validation_noise, validation_cond)
        if screen_noise is not None:
            self.splits[SCREEN] = (screen_noise, screen_cond)
        self.batch_size = batch_size
        self.progress = progress or (lambda message: None)
        self.train_states: dict[int, torch.Tensor] = {}
        self.validation_states: dict[int, torch.Tensor] = {}
        self.rollouts: dict[int, tuple[str, list[Rollout]]] = {}
        self.next_handle = 0
        self.schedule: TeacherSchedule | None = None  # the teacher of record_teacher, run on screen samples asked for
        self.screen_teacher: dict[int, torch.Tensor] = {}  # screen sample -> the teacher's final state there

    @property
    def num_train_rows(self) -> int:
        return self.splits[TRAIN][0].numel()

    def record_teacher(self, schedule: TeacherSchedule) -> Calibration:
        self.schedule = schedule
        noise, cond = self.splits[TRAIN]
        timesteps = schedule.stored_timesteps()
        calibrations, states = [], []
        for rows in batch_slices(len(noise), self.batch_size):
            batch_states, batch_preds = schedule_trajectories(self.denoiser, noise[rows], select(cond, rows), schedule)
            calibrations.append(Calibration.from_trajectories(batch_states, batch_preds, timesteps))
            states.append(batch_states)
        all_states = torch.cat(states)
        self.train_states = {n: all_states[:, n] for n in range(all_states.shape[1])}
        self.progress(f"teacher: {len(noise)} train trajectories")
        if VALIDATION not in self.splits:
            return Calibration.merge(calibrations)
        noise, cond = self.splits[VALIDATION]
        every = list(range(len(timesteps) + 1))  # restricted by keep_train_states, as the train states are
        states = torch.cat([
            schedule_states(self.denoiser, noise[rows], select(cond, rows), schedule, every)
            for rows in batch_slices(len(noise), self.batch_size)
        ])
        self.validation_states = {n: states[:, n] for n in every}
        self.progress(f"teacher: {len(noise)} validation trajectories")
        return Calibration.merge(calibrations)

    def record_train_states(self, schedule: TeacherSchedule, keep: Iterable[int]) -> None:
        """Run the teacher on the train split keeping its states at ``keep`` and the final one, without
        calibration statistics: all that on-policy fits of given nodes need (``method.run.fit_candidate``).

        Args:
            schedule: the N-step teacher; ``keep`` indexes its states ``0..N``.
        """
        noise, cond = self.splits[TRAIN]
        keep = sorted(set(keep) | {schedule.num_steps})
        self.schedule = schedule
        states = torch.cat([
            schedule_states(self.denoiser, noise[rows], select(cond, rows), schedule, keep)
            for rows in batch_slices(len(noise), self.batch_size)
        ])
        self.train_states = {n: states[:, i] for i, n in enumerate(keep)}
        self.progress(f"teacher: {len(noise)} train samples, {len(keep)} states kept")

    @property
    def validation_final(self) -> torch.Tensor | None:
        """``(V, *shape)`` the validation split's teacher final states (None before ``record_teacher``)."""
        return self.validation_states[max(self.validation_states)] if self.validation_states else None

    def keep_train_states(self, nodes: Iterable[int], validation_nodes: Iterable[int] = ()) -> None:
        keep = set(nodes) | {max(self.train_states)}
        self.train_states = {n: s.clone() for n, s in self.train_states.items() if n in keep}
        if self.validation_states:
            keep = set(validation_nodes) | {max(self.validation_states)}
            self.validation_states = {n: s.clone() for n, s in self.validation_states.items() if n in keep}

    def start(self, split: str, timestep: int | float, start_node: int = 0) -> int:
        if split not in self.splits:
            raise ValueError(f"no {split} split: this backend was built without one")
        noise, cond = self.splits[split]
        if start_node:
            kept = self.train_states if split == TRAIN else self.validation_states
            if start_node not in kept:
                raise ValueError(f"no teacher state of the {split} split kept at node {start_node}")
            noise = kept[start_node]
        batches = [Rollout(noise[rows], select(cond, rows)) for rows in batch_slices(len(noise), self.batch_size)]
        for batch in batches:
            batch.outputs.append(self.denoiser(batch.x_T, timestep, batch.cond))
        handle = self.next_handle  # a counter: rollouts stay open side by side (the screen's reference)
        self.next_handle += 1
        self.rollouts[handle] = (split, batches)
        return handle

    def statistics(self, handle: int, target_node: int) -> list[torch.Tensor]:
        split, batches = self.rollouts[handle]
        if split != TRAIN:
            raise ValueError("on-policy statistics need teacher states: only train rollouts have them")
        target = self.train_states[target_node]
        factors, start = [], 0
        for batch in batches:
            stop = start + len(batch.x_T)
            factors.append(step_statistics(batch.x_T, batch.outputs, target[start:stop]))
            start = stop
        return factors

    def advance(self, handle: int, weights: np.ndarray, next_timestep: int | float | None) -> None:
        for batch in self.rollouts[handle][1]:
            batch.state = apply_step(weights, batch.x_T, batch.outputs)
            if next_timestep is not None:
                batch.outputs.append(self.denoiser(batch.state, next_timestep, batch.cond))

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def final_differences(self, handle: int, reference: int) -> np.ndarray:
        (split, batches), (reference_split, references) = self.rollouts[handle], self.rollouts[reference]
        if split != reference_split:
            raise ValueError(f"rollouts {handle} ({split}) and {reference} ({reference_split}) are of different splits")
        return per_sample_mse(torch.cat([b.state for b in batches]), torch.cat([b.state for b in references]))

    def teacher_differences(self, handle: int, indices: Sequence[int]) -> np.ndarray:
        split, batches = self.rollouts[handle]
        if split != SCREEN:
            raise ValueError(f"teacher differences are for the screen split; the {split} split has its teacher (final_errors)")
        if self.schedule is None:
            raise ValueError("no teacher yet: record_teacher first")
        indices = [int(i) for i in indices]
        missing = [i for i in dict.fromkeys(indices) if i not in self.screen_teacher]
        if missing:
            noise, cond = self.splits[SCREEN]
            noise, cond = noise[torch.as_tensor(missing)], take(cond, missing)
            finals = torch.cat([
                schedule_states(self.denoiser, noise[rows], select(cond, rows), self.schedule, [self.schedule.num_steps])[:, 0]
                for rows in batch_slices(len(missing), self.batch_size)
            ])
            self.screen_teacher.update(zip(missing, finals))
            self.progress(f"teacher: {len(missing)} screen samples")
        if not indices:
            return np.zeros(0)
        final = torch.cat([batch.state for batch in batches])[torch.as_tensor(indices)]
        return per_sample_mse(final, torch.stack([self.screen_teacher[i] for i in indices]))

    def final_errors(self, handle: int) -> np.ndarray:
        split, batches = self.rollouts[handle]
        if split == SCREEN:
            raise ValueError("the screen split has no teacher: compare rollouts there with final_differences")
        final = torch.cat([batch.state for batch in batches])
        reference = self.validation_final if split == VALIDATION else self.train_states[max(self.train_states)]
        return per_sample_mse(final, reference)

    def close(self, handle: int) -> None:
        del self.rollouts[handle]


def per_sample_mse(samples: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """``(B,)`` float64 mean squared difference per element of each sample."""
    difference = (samples.to(torch.float64) - reference.to(torch.float64)).reshape(len(samples), -1)
    return (difference**2).mean(dim=1).cpu().numpy()


def error_summary(per_sample: Sequence[float]) -> dict[str, float]:
    """RMSE over all samples and the median, 90th percentile and worst per-sample RMSE."""
    per_sample = np.asarray(per_sample, dtype=np.float64)
    root = np.sqrt(per_sample)
    return {
        "rmse": float(np.sqrt(per_sample.mean())),
        "median": float(np.median(root)),
        "p90": float(np.percentile(root, 90)),
        "worst": float(root.max()),
    }
