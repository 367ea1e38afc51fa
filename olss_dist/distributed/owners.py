"""Shard ownership: which worker keeps each shard's teacher states, and calls to owners that survive loss.

After the teacher pass every shard (train and validation) has an owner, the worker that ran its
teacher; shards restored from checkpoints get one round-robin. ``keep`` has each owner keep exactly
the teacher nodes the on-policy fits need. ``call`` sends one call per owner covering the shards it
owns (every rollout step is such a call) and collects the small results.

When an owner is lost (``failure.WORKER_LOST_ERRORS``) its shards are recovered under the pool's
``FailurePolicy``: the worker is waited for if Ray restarts it (``WorkerPool.await_restart``), else
its shards move round-robin to the live workers; the shards' states are read back from the node's
disk or recomputed (``prepare_states``, deterministic), ``on_restored`` rebuilds whatever else the
caller keeps on them (the backend replays its open rollouts), and the interrupted call is redone for
those shards only. A worker lost again while this happens is recovered the same way.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

import ray

from olss_dist.distributed.failure import WORKER_LOST_ERRORS, LossCounts
from olss_dist.distributed.pool import WorkerPool, get_or_raise
from olss_dist.prompts import Shard

logger = logging.getLogger(__name__)

Key = tuple[str, int]
"""A shard's (split, shard id)."""
Item = tuple[str, Shard]
"""A shard with its split, as workers take them."""


class ShardOwners:
    """The owner of every shard of every split, and owner calls with recovery.

    Args:
        pool: the actors, their failure policy and health.
        shards: ``{split: shards}``, shard ids ``0 ... S-1`` within each split.
        on_restored: ``on_restored(worker, items)`` after ``items``' states were rebuilt on their (new)
            owner ``worker``: restores what the caller keeps on those shards besides the states.
        on_teacher_runs: called with the teacher reruns of each ``prepare_states`` (for the report).
        on_recovery: called once per lost worker recovered.
    """

    def __init__(
        self,
        pool: WorkerPool,
        shards: Mapping[str, Sequence[Shard]],
        on_restored: Callable[[int, list[Item]], None] | None = None,
        on_teacher_runs: Callable[[int], None] | None = None,
        on_recovery: Callable[[], None] | None = None,
    ):
        self.pool = pool
        self.shards = {split: list(split_shards) for split, split_shards in shards.items()}
        self.on_restored = on_restored or (lambda worker, items: None)
        self.on_teacher_runs = on_teacher_runs or (lambda runs: None)
        self.on_recovery = on_recovery or (lambda: None)
        self.owner: dict[Key, int] = {}
        self.kept_nodes: list[int] | None = None
        self.kept_validation_nodes: list[int] = []

    def __getitem__(self, key: Key) -> int:
        """The worker index owning shard ``key = (split, shard_id)``."""
        return self.owner[key]

    def assign(self, split: str, shard_id: int, worker: int) -> None:
        """Record that ``worker`` ran the teacher of the shard and holds its states."""
        self.owner[(split, shard_id)] = worker

    def keep(self, nodes: Iterable[int], validation_nodes: Iterable[int] = ()) -> None:
        """Every shard gets a live owner holding exactly its states at ``nodes`` (train) or at
        ``validation_nodes`` (other splits), and its final state.

        Shards without a live owner (restored from checkpoints, or their worker died for good) are spread
        round-robin; the owners rerun the teacher where states are gone. Preparing is idempotent, so a
        lost owner's part is simply redone on the shards' new owner.
        """
        self.kept_nodes = sorted({int(n) for n in nodes})
        self.kept_validation_nodes = sorted({int(n) for n in validation_nodes})
        self._spread([key for key in self._all_keys() if not self._owned_by_live(key)])
        for runs in self.call(None, lambda actor, items: actor.prepare_states.remote(items, *self._kept())):
            self.on_teacher_runs(runs)

    def call(self, split: str | None, invoke: Callable[[Any, list[Item]], ray.ObjectRef]) -> list[Any]:
        """``invoke(actor, items)`` on every owner, for the shards of ``split`` it owns (all splits: None).

        Returns:
            the owners' results, in no particular order; a recovered owner's part is redone, so a
            shard's result can appear twice (the same value: the redo recomputes it from the same states).

        Raises:
            WorkerError: worker code raised.
            WorkersLostError: no live worker is left, or a shard lost its owner ``max_attempts`` times.
        """
        losses = LossCounts(self.pool.policy)
        pending = self._items_by_owner(split)
        results = []
        while pending:
            refs = {worker: invoke(self.pool.actors[worker], items) for worker, items in pending.items()}
            lost = []
            for worker, ref in refs.items():
                try:
                    results.append(get_or_raise(ref))
                except WORKER_LOST_ERRORS as error:
                    logger.warning("worker %d lost during a call to its shards (%s); recovering them", worker, type(error).__name__)
                    lost.append(worker)
            if not lost:
                break
            for worker in lost:
                for shard_split, shard in pending[worker]:
                    losses.lost((shard_split, shard.shard_id), f"{shard_split} shard {shard.shard_id}")
            redo = self._recover(lost, losses)
            pending = {
                worker: [item for item in items if (item[0], item[1].shard_id) in redo]
                for worker, items in self._items_by_owner(split).items()
            }
            pending = {worker: items for worker, items in pending.items() if items}
        return results

    def _recover(self, lost_workers: Sequence[int], losses: LossCounts) -> set[Key]:
        """Give the shards of lost workers a live owner and rebuild their states; returns every rebuilt shard.

        A shard rebuilt here lost what the interrupted call had done on it, so the caller redoes the
        call for all of them (shards of a worker lost only while recovering included).
        """
        rebuilt: set[Key] = set()
        lost = set(lost_workers)
        while lost:
            affected = sorted(key for key, owner in self.owner.items() if owner in lost)
            for worker in sorted(lost):
                self.on_recovery()
                if not self.pool.await_restart(worker):
                    self._spread(sorted(key for key, owner in self.owner.items() if owner == worker))
            rebuilt.update(affected)
            lost = set()
            by_owner: dict[int, list[Item]] = {}
            for split, shard_id in affected:
                by_owner.setdefault(self.owner[(split, shard_id)], []).append((split, self.shards[split][shard_id]))
            for worker, items in by_owner.items():
                try:
                    self._restore(worker, items)
                except WORKER_LOST_ERRORS as error:
                    logger.warning("worker %d lost while recovering shards (%s); recovering it too", worker, type(error).__name__)
                    for split, shard in items:
                        losses.lost((split, shard.shard_id), f"{split} shard {shard.shard_id}")
                    lost.add(worker)
        return rebuilt

    def _restore(self, worker: int, items: list[Item]) -> None:
        """States of ``items`` on ``worker`` (read back or recomputed), then the caller's own restore."""
        if self.kept_nodes is None:
            raise RuntimeError("shard states are recovered only after keep(nodes) chose the nodes to keep")
        self.on_teacher_runs(get_or_raise(self.pool.actors[worker].prepare_states.remote(items, *self._kept())))
        self.on_restored(worker, items)

    def _kept(self) -> tuple[list[int], list[int]]:
        """``prepare_states``' node arguments: the train nodes and the validation nodes (start plans' starts)."""
        return self.kept_nodes, self.kept_validation_nodes

    def _spread(self, keys: Sequence[Key]) -> None:
        """Give the shards ``keys`` to the live workers, round-robin."""
        if not keys:
            return
        live = self.pool.health.require_live("keep the shards' teacher states")
        for position, key in enumerate(keys):
            self.owner[key] = live[position % len(live)]

    def _owned_by_live(self, key: Key) -> bool:
        return key in self.owner and self.pool.health.is_live(self.owner[key])

    def _items_by_owner(self, split: str | None = None) -> dict[int, list[Item]]:
        """``{worker: [(split, shard), ...]}`` of the shards each worker owns (of ``split`` only, if given)."""
        by_owner: dict[int, list[Item]] = {}
        for shard_split, shards in self.shards.items():
            if split is None or shard_split == split:
                for shard in shards:
                    by_owner.setdefault(self.owner[(shard_split, shard.shard_id)], []).append((shard_split, shard))
        return by_owner

    def _all_keys(self) -> list[Key]:
        return [(split, shard.shard_id) for split, shards in self.shards.items() for shard in shards]
