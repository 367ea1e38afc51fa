"""The teacher pass on the pool: shard checkpoints restored, the rest computed, all merged in a fixed tree.

Train shards with a valid checkpoint are taken from it; the others run their N-step teacher on the
actors (``pool.run_shards``), and each finished shard is checkpointed, then folded into the
``MergeTree`` as it arrives (the merged R is bit-for-bit the same whatever the order or source).
Validation shards keep only their teacher's final state, the target of the held-out errors. The
worker that ran a shard becomes its owner in ``owners.ShardOwners``: it holds the shard's states.
Worker loss during the pass is handled by ``run_shards`` under the pool's ``FailurePolicy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from olss_dist.core.calibration import Calibration
from olss_dist.distributed.checkpoints import ShardCheckpoints
from olss_dist.distributed.merge import MergeTree
from olss_dist.distributed.owners import ShardOwners
from olss_dist.distributed.pool import WorkerPool, run_shards
from olss_dist.distributed.progress import ShardProgress
from olss_dist.distributed.worker import ShardResult
from olss_dist.method.rollouts import TRAIN, VALIDATION
from olss_dist.prompts import Shard


@dataclass
class TeacherSummary:
    """Counts for the report.

    Attributes:
        computed_shards: train shards whose statistics this run computed.
        restored_shards: train shards whose statistics came from checkpoints.
        validation_teacher_runs: validation shards whose teacher ran (0 where their targets were read back).
        teacher_runs: train teacher reruns for states that were gone (restored shards, lost workers).
        recoveries: workers recovered after the teacher pass (keeping states, on-policy rounds).
    """

    computed_shards: list[int] = field(default_factory=list)
    restored_shards: list[int] = field(default_factory=list)
    validation_teacher_runs: int = 0
    teacher_runs: int = 0
    recoveries: int = 0


class TeacherPass:
    """Both splits' teacher runs on the pool; the merged train statistics.

    Args:
        pool: the actors.
        train_shards: shards of the fit split, ids ``0 ... S-1``.
        validation_shards: shards of the held-out split.
        checkpoints: where finished train shards' statistics are saved and resumed from.
        progress: shard progress of the pass (closed when the train shards are done).
        owners: told which worker ran each shard.
        summary: counts computed / restored shards and validation teacher runs.
    """

    def __init__(
        self,
        pool: WorkerPool,
        train_shards: Sequence[Shard],
        validation_shards: Sequence[Shard],
        checkpoints: ShardCheckpoints,
        progress: ShardProgress,
        owners: ShardOwners,
        summary: TeacherSummary,
    ):
        self.pool = pool
        self.train_shards = list(train_shards)
        self.validation_shards = list(validation_shards)
        self.checkpoints = checkpoints
        self.progress = progress
        self.owners = owners
        self.summary = summary
        self.merge_tree: MergeTree | None = None

    def merge_train_statistics(self) -> Calibration:
        """Restore checkpointed train shards, compute the others, return the merged ``Calibration``."""
        self.merge_tree = tree = MergeTree(len(self.train_shards))
        restored = self.checkpoints.load_finished(self.train_shards)
        for shard_id in sorted(restored):
            tree.add(shard_id, restored[shard_id])
        self.summary.restored_shards = sorted(restored)
        self.progress.restored(len(restored), sum(c.num_samples for c in restored.values()))

        def on_result(worker: int, shard: Shard, result: ShardResult) -> None:
            calibration = result.calibration()
            self.checkpoints.save(shard, calibration)
            tree.add(shard.shard_id, calibration)
            self.owners.assign(TRAIN, shard.shard_id, worker)
            self.summary.computed_shards.append(shard.shard_id)
            self.progress.shard_done(shard.shard_id, len(shard.records), result.seconds, result.worker)

        try:
            run_shards(self.pool, [s for s in self.train_shards if s.shard_id not in restored], on_result)
        finally:
            self.progress.close()
        return tree.result()

    def record_validation_targets(self) -> None:
        """Each validation shard's teacher final state, kept by the worker that ran it."""

        def on_result(worker: int, shard: Shard, result: ShardResult) -> None:
            self.owners.assign(VALIDATION, shard.shard_id, worker)
            self.summary.validation_teacher_runs += result.teacher_runs

        run_shards(
            self.pool,
            self.validation_shards,
            on_result,
            call=lambda actor, shard: actor.record_final_states.remote(VALIDATION, shard),
        )
