"""The method's rollout backend on Ray: the same ``olss_dist.method.run_method``, samples on actors.

``RayRolloutBackend`` implements ``olss_dist.method.rollouts.RolloutBackend`` and does the rollout
side only: rollout handles, their histories and the calls that run them. The rest is in one module
each, wired together here:

- ``teacher_pass.TeacherPass``: checkpoint restore, teacher runs of the shards, the ``MergeTree``;
- ``parallel_search.ParallelPlanner``: the path searches right after the merge (``record_teacher``);
- ``owners.ShardOwners``: which actor keeps each shard's teacher states, owner calls, and recovery
  of lost workers under the pool's ``failure.FailurePolicy``.

Every rollout step is one call per actor covering the shards it owns, and only small reductions come
back: one ``(i+3, i+3)`` R factor per train shard per round, per-sample errors at the end. The driver
(the fitter) merges them and broadcasts the step's weights, all inside ``run_method``, so the job's
plans are the ones ``olss_dist.calibrate`` computes in one process with the same samples and
``batch_size = shard size``.

Fault tolerance: the backend keeps each open rollout's history (start timestep, broadcast weights).
When ``ShardOwners`` has rebuilt a lost worker's shards on their (new) owner, it asks the backend to
replay every open rollout on them (``_replay``); the interrupted call is then redone for those shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import ray
import torch

from olss_dist.core.calibration import Calibration
from olss_dist.core.plan import Plan
from olss_dist.core.teacher import TeacherSchedule, model_timestep
from olss_dist.distributed.checkpoints import ShardCheckpoints
from olss_dist.distributed.failure import WORKER_LOST_ERRORS
from olss_dist.distributed.merge import MergeTree
from olss_dist.distributed.owners import Item, ShardOwners
from olss_dist.distributed.parallel_search import ParallelPlanner
from olss_dist.distributed.pool import WorkerPool, get_or_raise
from olss_dist.distributed.progress import ShardProgress
from olss_dist.distributed.teacher_pass import TeacherPass, TeacherSummary
from olss_dist.method.rollouts import SCREEN, TRAIN, VALIDATION, RolloutBackend
from olss_dist.prompts import Shard

logger = logging.getLogger(__name__)

__all__ = ["PlannedCalibration", "RayRolloutBackend", "RolloutHistory", "TeacherSummary"]


class PlannedCalibration(Calibration):
    """A calibration whose ``plan(K)`` comes from the parallel planner (identical to the in-process search).

    Args:
        calibration: the merged statistics.
        plans: ``{K: Plan}`` searched by ``ParallelPlanner``; other step counts are searched in process.
    """

    def __init__(self, calibration: Calibration, plans: dict[int, Plan]):
        super().__init__(calibration.r_factor, calibration.num_samples, calibration.num_rows, calibration.timesteps)
        self.parallel_plans = plans

    def plan(self, num_steps: int) -> Plan:
        return self.parallel_plans[num_steps] if num_steps in self.parallel_plans else super().plan(num_steps)


@dataclass
class RolloutHistory:
    """What rebuilds a rollout on another worker: its split, start timestep, every broadcast so far, and the
    teacher node it started from (0: ``x_T``)."""

    split: str
    timestep: int | float
    advances: list[tuple[np.ndarray, int | float | None]] = field(default_factory=list)
    start_node: int = 0


class RayRolloutBackend(RolloutBackend):
    """Train and validation shards on a pool of actors.

    Args:
        pool: the actors (model loaded, teacher timesteps fixed) and their failure policy.
        train_shards: shards of the fit split, ids ``0..S-1``.
        validation_shards: shards of the held-out split.
        checkpoints: where finished train shards' statistics are saved and resumed from.
        progress: shard progress of the teacher pass.
        planned_steps: step counts whose paths are searched in parallel right after the merge.
        planner_parallelism: path search evaluations in flight (on the pool's actors) per search.
        screen_shards: shards of the tail screen's fresh samples (``method.rollouts.SCREEN``; no teacher runs on
            them, their rollouts are replayed like the others when a worker is lost); none: no screen.
    """

    def __init__(
        self,
        pool: WorkerPool,
        train_shards: Sequence[Shard],
        validation_shards: Sequence[Shard],
        checkpoints: ShardCheckpoints,
        progress: ShardProgress,
        planned_steps: Sequence[int],
        planner_parallelism: int,
        screen_shards: Sequence[Shard] = (),
    ):
        self.pool = pool
        self.shards = {TRAIN: list(train_shards), VALIDATION: list(validation_shards)}
        if screen_shards:
            self.shards[SCREEN] = list(screen_shards)
        self.planned_steps = list(planned_steps)
        self.planner_parallelism = planner_parallelism
        self.summary = TeacherSummary()
        self.owners = ShardOwners(
            pool, self.shards, on_restored=self._replay, on_teacher_runs=self._count_teacher_runs,
            on_recovery=self._count_recovery,
        )
        self.teacher = TeacherPass(
            pool, train_shards, validation_shards, checkpoints, progress, self.owners, self.summary
        )
        self.history: dict[int, RolloutHistory] = {}
        self.next_handle = 0
        self._num_train_rows = 0

    @property
    def num_train_rows(self) -> int:
        return self._num_train_rows

    @property
    def merge_tree(self) -> MergeTree | None:
        """The teacher pass's merge tree (merge counts and time for the report)."""
        return self.teacher.merge_tree

    # ------------------------------------------------------------------------------------ teacher pass

    def record_teacher(self, schedule: TeacherSchedule) -> Calibration:
        """Train shards -> streamed R merge (checkpointed), validation final states, parallel path search.

        The workers run their model's own teacher (``model.noise_process``); ``schedule`` must be that one.
        """
        calibration = self.teacher.merge_train_statistics()
        _check_timesteps(schedule, calibration)
        self.teacher.record_validation_targets()
        self._num_train_rows = calibration.num_rows
        planner = ParallelPlanner(calibration, self.planner_parallelism, pool=self.pool)  # on the job's own actors
        plans = planner.plans(self.planned_steps)
        planner.release()
        return PlannedCalibration(calibration, {p.num_steps: p for p in plans})

    def keep_train_states(self, nodes: Iterable[int], validation_nodes: Iterable[int] = ()) -> None:
        """Every shard gets a live owner holding exactly the needed states (teacher rerun where they are gone)."""
        self.owners.keep(nodes, validation_nodes)

    # ------------------------------------------------------------------------------- on-policy rounds

    def start(self, split: str, timestep: int | float, start_node: int = 0) -> int:
        handle = self.next_handle
        self.next_handle += 1
        timestep, start_node = model_timestep(timestep), int(start_node)
        extra = (start_node, split) if start_node else ()
        self._on_owners(split, lambda actor, shards: actor.start_rollout.remote(handle, shards, timestep, *extra))
        self.history[handle] = RolloutHistory(split, timestep, start_node=start_node)
        return handle

    def statistics(self, handle: int, target_node: int) -> list[torch.Tensor]:
        split = self.history[handle].split
        if split != TRAIN:
            raise ValueError("on-policy statistics need teacher states: only train rollouts have them")
        factors = _merged_by_shard(
            self._on_owners(split, lambda actor, shards: actor.rollout_statistics.remote(handle, shards, target_node))
        )
        return [factors[shard.shard_id] for shard in self.shards[split]]

    def advance(self, handle: int, weights: np.ndarray, next_timestep: int | float | None) -> None:
        self._advance(handle, [(weights, next_timestep)])

    def advance_steps(self, handle: int, steps: Sequence[tuple[np.ndarray, int | float | None]]) -> None:
        """All ``steps`` in one call per owner (not one round trip per step); a rollout rebuilt after a loss
        replays them like single advances."""
        self._advance(handle, steps)

    def _advance(self, handle: int, steps: Sequence[tuple[np.ndarray, int | float | None]]) -> None:
        """``advance`` and ``advance_steps``: float64 weights, one call per owner, the steps in the history."""
        history = self.history[handle]
        steps = [(np.array(weights, dtype=np.float64), next_timestep) for weights, next_timestep in steps]
        self._on_owners(history.split, lambda actor, shards: actor.advance_rollout_steps.remote(handle, shards, steps))
        history.advances.extend(steps)

    def final_errors(self, handle: int) -> np.ndarray:
        split = self.history[handle].split
        errors = _merged_by_shard(
            self._on_owners(split, lambda actor, shards: actor.rollout_final_errors.remote(handle, split, shards))
        )
        return np.concatenate([errors[shard.shard_id] for shard in self.shards[split]])

    def has_split(self, split: str) -> bool:
        return split in self.shards

    def final_differences(self, handle: int, reference: int) -> np.ndarray:
        split = self.history[handle].split
        if self.history[reference].split != split:
            raise ValueError(f"rollouts {handle} and {reference} are of different splits")
        differences = _merged_by_shard(self._on_owners(
            split, lambda actor, shards: actor.rollout_final_differences.remote(handle, reference, shards)))
        return np.concatenate([differences[shard.shard_id] for shard in self.shards[split]])

    def teacher_differences(self, handle: int, indices: Sequence[int]) -> np.ndarray:
        """Each asked screen sample's owner runs the teacher on it (once; kept on the worker) and compares."""
        split = self.history[handle].split
        if split != SCREEN:
            raise ValueError(f"teacher differences are for the screen split; the {split} split has its teacher (final_errors)")
        shards = self.shards[SCREEN]
        starts = np.cumsum([0] + [len(shard.records) for shard in shards])
        asked: dict[int, list[int]] = {}
        where = []  # per index: (shard id, position among that shard's asked samples)
        for index in (int(i) for i in indices):
            if not 0 <= index < starts[-1]:
                raise ValueError(f"screen sample {index} is not in the screen split (0..{starts[-1] - 1})")
            position = int(np.searchsorted(starts, index, side="right")) - 1
            local = asked.setdefault(shards[position].shard_id, [])
            where.append((shards[position].shard_id, len(local)))
            local.append(index - int(starts[position]))
        if not where:
            return np.zeros(0)
        differences = _merged_by_shard(self._on_owners(split, lambda actor, owned: actor.rollout_teacher_differences.remote(
            handle, [s for s in owned if s.shard_id in asked], asked)))
        return np.array([differences[shard_id][position] for shard_id, position in where], dtype=np.float64)

    def close(self, handle: int) -> None:
        self.history.pop(handle, None)
        for actor in self.pool.actors:
            actor.close_rollout.remote(handle)

    def clear_states(self) -> None:
        """Free the live workers' kept states (node-local files included) once the run is published.

        A worker dead for good cannot be asked, and one lost now is skipped: their node-local files stay
        (a rerun of the job on that node reads them back).
        """
        refs = {worker: self.pool.actors[worker].clear_states.remote() for worker in self.pool.health.live()}
        for worker, ref in refs.items():
            try:
                get_or_raise(ref)
            except WORKER_LOST_ERRORS as error:
                logger.warning("worker %d lost before clearing its states (%s)", worker, type(error).__name__)

    # ----------------------------------------------------------------------------------------- wiring

    def _on_owners(self, split: str, invoke: Callable[[Any, list[Shard]], ray.ObjectRef]) -> list[Any]:
        """``invoke(actor, its shards of split)`` on every owner, recovered by ``ShardOwners.call``."""
        return self.owners.call(split, lambda actor, items: invoke(actor, [shard for _, shard in items]))

    def _replay(self, worker: int, items: list[Item]) -> None:
        """Rebuild every open rollout on ``items``, whose states were just rebuilt on ``worker``."""
        for handle, history in self.history.items():
            shards = [shard for split, shard in items if split == history.split]
            if shards:
                actor = self.pool.actors[worker]
                extra = (history.start_node, history.split) if history.start_node else ()
                get_or_raise(actor.replay_rollout.remote(handle, shards, history.timestep, history.advances, *extra))

    def _count_teacher_runs(self, runs: int) -> None:
        self.summary.teacher_runs += runs

    def _count_recovery(self) -> None:
        self.summary.recoveries += 1


def _check_timesteps(schedule: TeacherSchedule, calibration: Calibration) -> None:
    expected = schedule.stored_timesteps()
    if expected.dtype != calibration.timesteps.dtype or not np.array_equal(expected, calibration.timesteps):
        raise ValueError("schedule: the Ray backend runs its workers' own teacher (the model's noise process) only")


def _merged_by_shard(results: list[dict[int, Any]]) -> dict[int, Any]:
    merged: dict[int, Any] = {}
    for result in results:
        merged.update(result)
    return merged
