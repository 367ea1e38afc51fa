"""The method's rollout backend on Ray: the same ``olss_dist.method.run_method``, samples on actors.

``RayRolloutBackend`` implements ``olss_dist.method.rollouts.RolloutBackend``. Each shard (one batch of
samples) has an owner actor that ran its teacher and keeps its states; every rollout step is one
call per actor covering the shards it owns, and only small reductions come back: one ``(i+3, i+3)``
R factor per train shard per round, per-sample errors at the end. The driver (the fitter) merges
them and broadcasts the step's weights, all inside ``run_method``, so the job's plans are the ones
``olss_dist.calibrate`` computes in one process with the same samples and ``batch_size = shard size``.

Fault tolerance: the driver keeps each open rollout's history (start timestep, broadcast weights).
When an actor is lost during a round, its shards get a live owner (the restarted actor, or another
one), their teacher states are read back from the node's disk or recomputed (deterministically), every
open rollout is replayed on them, and the interrupted call is redone for those shards only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import ray
import torch

from olss_dist.core.calibration import Calibration
from olss_dist.distributed.checkpoints import ShardCheckpoints
from olss_dist.distributed.merge import MergeTree
from olss_dist.distributed.parallel_search import ParallelPlanner
from olss_dist.distributed.pool import RESTART_POLL_S, WORKER_LOST_ERRORS, WorkerPool, WorkersLostError, get_or_raise, run_shards
from olss_dist.distributed.progress import ShardProgress
from olss_dist.distributed.worker import ShardResult
from olss_dist.core.plan import Plan
from olss_dist.prompts import Shard
from olss_dist.method.rollouts import TRAIN, VALIDATION, RolloutBackend
from olss_dist.core.teacher import trailing_timesteps

logger = logging.getLogger(__name__)

MAX_RECOVERIES = 5
"""Worker losses one rollout call survives before the job gives up."""
RESTART_PINGS = 300
"""Pings (``RESTART_POLL_S`` apart while Ray reports the actor unavailable) before a worker counts as dead."""


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
    """What rebuilds a rollout on another worker: its split, start timestep and every broadcast so far."""

    split: str
    timestep: int
    advances: list[tuple[np.ndarray, int | None]] = field(default_factory=list)


@dataclass
class TeacherSummary:
    """Counts for the report.

    Attributes:
        computed_shards: train shards whose statistics this run computed.
        restored_shards: train shards whose statistics came from checkpoints.
        validation_teacher_runs: validation shards whose teacher ran (0 where their targets were read back).
        teacher_runs: train teacher reruns for states that were gone (restored shards, lost workers).
        recoveries: workers recovered during the on-policy rounds.
    """

    computed_shards: list[int] = field(default_factory=list)
    restored_shards: list[int] = field(default_factory=list)
    validation_teacher_runs: int = 0
    teacher_runs: int = 0
    recoveries: int = 0


class RayRolloutBackend(RolloutBackend):
    """Train and validation shards on a pool of actors.

    Args:
        pool: the actors (model loaded, teacher timesteps fixed).
        train_shards: shards of the fit split, ids ``0..S-1``.
        validation_shards: shards of the held-out split.
        checkpoints: where finished train shards' statistics are saved and resumed from.
        progress: shard progress of the teacher pass.
        planned_steps: step counts whose paths are searched in parallel right after the merge.
        planner_parallelism: tasks in flight per path search.
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
    ):
        self.pool = pool
        self.shards = {TRAIN: list(train_shards), VALIDATION: list(validation_shards)}
        self.checkpoints = checkpoints
        self.progress = progress
        self.planned_steps = list(planned_steps)
        self.planner_parallelism = planner_parallelism
        self.owner: dict[tuple[str, int], int] = {}
        self.dead_workers: set[int] = set()
        self.kept_nodes: list[int] = []
        self.history: dict[int, RolloutHistory] = {}
        self.next_handle = 0
        self.summary = TeacherSummary()
        self.merge_tree: MergeTree | None = None
        self._num_train_rows = 0

    @property
    def num_train_rows(self) -> int:
        return self._num_train_rows

    # ------------------------------------------------------------------------------------ teacher pass

    def record_teacher(self, timesteps: np.ndarray, alphas_cumprod: np.ndarray) -> Calibration:
        """Train shards -> streamed R merge (checkpointed), validation final states, parallel path search."""
        expected = trailing_timesteps(len(timesteps), len(alphas_cumprod))
        if not np.array_equal(timesteps, expected):
            raise ValueError("the Ray backend runs the trailing teacher timesteps of its workers only")
        calibration = self.merge_train_statistics()
        self.record_validation_targets()
        self._num_train_rows = calibration.num_rows
        planner = ParallelPlanner(calibration, self.planner_parallelism)
        plans = planner.plans(self.planned_steps)
        return PlannedCalibration(calibration, {p.num_steps: p for p in plans})

    def merge_train_statistics(self) -> Calibration:
        shards = self.shards[TRAIN]
        self.merge_tree = tree = MergeTree(len(shards))
        restored = self.checkpoints.load_finished(shards)
        for shard_id in sorted(restored):
            tree.add(shard_id, restored[shard_id])
        self.summary.restored_shards = sorted(restored)
        self.progress.restored(len(restored), sum(c.num_samples for c in restored.values()))

        def on_result(worker: int, shard: Shard, result: ShardResult) -> None:
            calibration = result.calibration()
            self.checkpoints.save(shard, calibration)
            tree.add(shard.shard_id, calibration)
            self.owner[(TRAIN, shard.shard_id)] = worker
            self.summary.computed_shards.append(shard.shard_id)
            self.progress.shard_done(shard.shard_id, len(shard.records), result.seconds, result.worker)

        try:
            run_shards(self.pool, [s for s in shards if s.shard_id not in restored], on_result)
        finally:
            self.progress.close()
        return tree.result()

    def record_validation_targets(self) -> None:
        def on_result(worker: int, shard: Shard, result: ShardResult) -> None:
            self.owner[(VALIDATION, shard.shard_id)] = worker
            self.summary.validation_teacher_runs += result.teacher_runs

        run_shards(
            self.pool,
            self.shards[VALIDATION],
            on_result,
            call=lambda actor, shard: actor.record_final_states.remote(VALIDATION, shard),
        )

    def keep_train_states(self, nodes: Iterable[int]) -> None:
        """Every shard gets a live owner holding exactly the needed states (teacher rerun where they are gone).

        Shards restored from checkpoints have no owner yet; they are spread round-robin. Preparing is
        idempotent, so after a worker loss it is simply repeated with the shards' new owners.
        """
        self.kept_nodes = sorted(set(int(n) for n in nodes))
        for _ in range(MAX_RECOVERIES + 1):
            self._spread([(split, s.shard_id) for split, s in self._all_items() if (split, s.shard_id) not in self.owner])
            refs = {
                worker: self.pool.actors[worker].prepare_states.remote(items, self.kept_nodes)
                for worker, items in self._items_by_owner().items()
            }
            lost = []
            for worker, ref in refs.items():
                try:
                    self.summary.teacher_runs += get_or_raise(ref)
                except WORKER_LOST_ERRORS:
                    lost.append(worker)
            if not lost:
                return
            for worker in lost:
                self._handle_lost(worker)
        raise WorkersLostError(f"workers kept dying while preparing teacher states ({MAX_RECOVERIES} recoveries)")

    # ------------------------------------------------------------------------------- on-policy rounds

    def start(self, split: str, timestep: int) -> int:
        handle = self.next_handle
        self.next_handle += 1
        self._on_owners(split, lambda actor, shards: actor.start_rollout.remote(handle, shards, timestep))
        self.history[handle] = RolloutHistory(split, int(timestep))
        return handle

    def statistics(self, handle: int, target_node: int) -> list[torch.Tensor]:
        split = self.history[handle].split
        if split != TRAIN:
            raise ValueError("on-policy statistics need teacher states: only train rollouts have them")
        factors = self._merged_by_shard(
            self._on_owners(split, lambda actor, shards: actor.rollout_statistics.remote(handle, shards, target_node))
        )
        return [factors[shard.shard_id] for shard in self.shards[split]]

    def advance(self, handle: int, weights: np.ndarray, next_timestep: int | None) -> None:
        history = self.history[handle]
        weights = np.array(weights, dtype=np.float64)
        self._on_owners(
            history.split, lambda actor, shards: actor.advance_rollout.remote(handle, shards, weights, next_timestep)
        )
        history.advances.append((weights, next_timestep))

    def final_errors(self, handle: int) -> np.ndarray:
        split = self.history[handle].split
        errors = self._merged_by_shard(
            self._on_owners(split, lambda actor, shards: actor.rollout_final_errors.remote(handle, split, shards))
        )
        return np.concatenate([errors[shard.shard_id] for shard in self.shards[split]])

    def close(self, handle: int) -> None:
        self.history.pop(handle, None)
        for actor in self.pool.actors:
            actor.close_rollout.remote(handle)

    def clear_states(self) -> None:
        """Free every worker's kept states (node-local files included) once the run is published."""
        ray.get([actor.clear_states.remote() for actor in self.pool.actors])

    # -------------------------------------------------------------------------------------- recovery

    def _items_by_owner(self, split: str | None = None) -> dict[int, list[tuple[str, Shard]]]:
        """``{worker: [(split, shard), ...]}`` of the shards each worker owns (of ``split`` only, if given)."""
        by_owner: dict[int, list[tuple[str, Shard]]] = {}
        for shard_split, shard in self._all_items():
            if split is None or shard_split == split:
                by_owner.setdefault(self.owner[(shard_split, shard.shard_id)], []).append((shard_split, shard))
        return by_owner

    def _on_owners(self, split: str, invoke: Callable[[Any, list[Shard]], ray.ObjectRef]) -> list[Any]:
        """``invoke(actor, its shards of split)`` on every owner; lost workers are recovered and their part redone."""
        pending = {worker: [shard for _, shard in items] for worker, items in self._items_by_owner(split).items()}
        results = []
        for _ in range(MAX_RECOVERIES + 1):
            refs = {worker: invoke(self.pool.actors[worker], shards) for worker, shards in pending.items()}
            lost = []
            for worker, ref in refs.items():
                try:
                    results.append(get_or_raise(ref))
                except WORKER_LOST_ERRORS as error:
                    logger.warning("worker %d lost during a rollout (%s); recovering its shards", worker, type(error).__name__)
                    lost.append(worker)
            if not lost:
                return results
            redo = {shard.shard_id for worker in lost for shard in pending[worker]}
            try:
                self._recover(lost)
            except WORKER_LOST_ERRORS as error:
                logger.warning("a worker was lost again while recovering (%s); retrying", type(error).__name__)
            pending = {
                worker: [shard for _, shard in items if shard.shard_id in redo]
                for worker, items in self._items_by_owner(split).items()
            }
            pending = {worker: shards for worker, shards in pending.items() if shards}
        raise WorkersLostError(f"workers kept dying during the on-policy rounds ({MAX_RECOVERIES} recoveries)")

    def _recover(self, lost_workers: Sequence[int]) -> None:
        """Give the shards of lost workers a live owner, rebuild their states and replay the open rollouts."""
        affected = [key for key, owner in self.owner.items() if owner in lost_workers]
        for worker in lost_workers:
            self._handle_lost(worker)
        rebuild: dict[int, list[tuple[str, Shard]]] = {}
        for split, shard_id in affected:
            rebuild.setdefault(self.owner[(split, shard_id)], []).append((split, self.shards[split][shard_id]))
        for worker, items in rebuild.items():
            self._prepare(worker, items)
            for handle, history in self.history.items():
                shards = [shard for split, shard in items if split == history.split]
                if shards:
                    actor = self.pool.actors[worker]
                    get_or_raise(actor.replay_rollout.remote(handle, shards, history.timestep, history.advances))

    def _prepare(self, worker: int, items: list[tuple[str, Shard]]) -> None:
        self.summary.teacher_runs += get_or_raise(self.pool.actors[worker].prepare_states.remote(items, self.kept_nodes))

    def _handle_lost(self, worker: int) -> None:
        """Count a recovery; a worker Ray did not bring back has its shards moved to the live ones."""
        self.summary.recoveries += 1
        if not self._restarted(worker):
            self._reassign(worker)

    def _restarted(self, worker: int) -> bool:
        """Whether Ray brought the worker back (a ping answers); False once it is dead for good."""
        for _ in range(RESTART_PINGS):
            try:
                get_or_raise(self.pool.actors[worker].pid.remote())
                return True
            except ray.exceptions.ActorUnavailableError:
                time.sleep(RESTART_POLL_S)
            except WORKER_LOST_ERRORS:
                return False
        return False

    def _reassign(self, dead: int) -> None:
        """Move a dead worker's shards to the live ones, round-robin."""
        self.dead_workers.add(dead)
        self._spread(sorted(k for k, owner in self.owner.items() if owner == dead))

    def _spread(self, keys: Sequence[tuple[str, int]]) -> None:
        """Give the shards ``keys`` ((split, shard id) pairs) to the live workers, round-robin."""
        live = [w for w in range(len(self.pool.actors)) if w not in self.dead_workers]
        if not live:
            raise WorkersLostError("every worker died during the on-policy rounds")
        for position, key in enumerate(keys):
            self.owner[key] = live[position % len(live)]

    def _all_items(self) -> list[tuple[str, Shard]]:
        return [(split, shard) for split, shards in self.shards.items() for shard in shards]

    @staticmethod
    def _merged_by_shard(results: list[dict[int, Any]]) -> dict[int, Any]:
        merged: dict[int, Any] = {}
        for result in results:
            merged.update(result)
        return merged
