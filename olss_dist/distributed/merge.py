"""Streaming TSQR merge: shard R factors folded into a fixed binary tree as they arrive.

The tree is fixed by shard ids, not by arrival order: leaf ``s`` is shard ``s``; at level ``L`` node
``j`` covers shards ``[j 2^L, (j+1) 2^L)`` and is the merge of its two children as soon as both
exist (a node without a right sibling moves up unchanged). Every merge is one small QR of two
stacked ``(C, C)`` factors, so the driver's work per arriving shard is ``O(log S)`` merges at most,
and the merged R is bit-for-bit the same whatever order the shards finish in, whichever worker
computed them, and whether they came from a checkpoint.
"""

from __future__ import annotations

import time

from olss_dist.core.calibration import Calibration


class MergeTree:
    """Merge shard calibrations into one, along the binary tree over shard ids.

    Args:
        num_shards: S, the number of leaves; shard ids are ``0 ... S-1``.
    """

    def __init__(self, num_shards: int):
        if num_shards < 1:
            raise ValueError(f"a merge tree needs at least one shard, got {num_shards}")
        self.num_shards = num_shards
        self.merged_shards: set[int] = set()
        self.num_merges = 0
        self.merge_seconds = 0.0
        self._pending: dict[tuple[int, int], Calibration] = {}
        self._root: Calibration | None = None

    def add(self, shard_id: int, calibration: Calibration) -> None:
        """Fold in one shard's statistics, merging every subtree it completes.

        Raises:
            ValueError: if the shard id is out of range or the shard was already added.
        """
        if not 0 <= shard_id < self.num_shards:
            raise ValueError(f"shard id {shard_id} is outside 0 ... {self.num_shards - 1}")
        if shard_id in self.merged_shards:
            raise ValueError(f"shard {shard_id} was already merged")
        self.merged_shards.add(shard_id)
        node, level, index = calibration, 0, shard_id
        while (1 << level) < self.num_shards:
            sibling = index ^ 1
            if (sibling << level) < self.num_shards:
                other = self._pending.pop((level, sibling), None)
                if other is None:
                    self._pending[(level, index)] = node
                    return
                node = self._merge(other, node) if sibling < index else self._merge(node, other)
            level, index = level + 1, index // 2
        self._root = node

    @property
    def complete(self) -> bool:
        return self._root is not None

    def result(self) -> Calibration:
        """The merged statistics of all shards.

        Raises:
            RuntimeError: while shards are missing.
        """
        if self._root is None:
            missing = sorted(set(range(self.num_shards)) - self.merged_shards)
            raise RuntimeError(f"merge incomplete: shards {missing[:10]} not merged yet")
        return self._root

    def _merge(self, left: Calibration, right: Calibration) -> Calibration:
        start = time.perf_counter()
        merged = Calibration.merge([left, right])
        self.merge_seconds += time.perf_counter() - start
        self.num_merges += 1
        return merged
