"""Teacher states kept on a worker's node between the statistics pass and the on-policy rounds.

States stay on the node: in the worker's host memory, or as one ``.npy`` file per shard on local
disk (read back memory-mapped, so only the steps the on-policy fit needs are loaded). The disk
directory is named after the run, so a worker restarted on the same node reads back the states its
predecessor wrote instead of recomputing them. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

KEEP_MODES = ("none", "memory", "disk")


class TeacherStateStore:
    """Teacher states ``(B, N+1, *shape)`` of shards computed on this node.

    Args:
        mode: ``"none"`` (keep nothing), ``"memory"`` (CPU tensors in this process) or ``"disk"``.
        run_key: names the run's directory (the job's config digest), shared by the node's workers.
        root: parent directory for ``"disk"``; ``None`` uses the system temp dir.
    """

    def __init__(self, mode: str = "none", run_key: str = "run", root: str | None = None):
        if mode not in KEEP_MODES:
            raise ValueError(f"keep_states must be one of {KEEP_MODES}, got {mode!r}")
        self.mode = mode
        self._memory: dict[int, torch.Tensor] = {}
        self.directory = Path(root or tempfile.gettempdir()) / f"olss-states-{run_key}"
        if mode == "disk":
            self.directory.mkdir(parents=True, exist_ok=True)

    def keep(self, shard_id: int, states: torch.Tensor) -> None:
        """Keep ``states (B, N+1, *shape)`` of ``shard_id`` (moved to the CPU, float32)."""
        if self.mode == "none":
            return
        host = states.detach().to("cpu", torch.float32)
        if self.mode == "memory":
            self._memory[shard_id] = host
            return
        partial = self.directory / f".{shard_id}.{os.getpid()}.npy"
        np.save(partial, host.numpy())
        partial.replace(self._path(shard_id))

    def has(self, shard_id: int) -> bool:
        if self.mode == "memory":
            return shard_id in self._memory
        return self.mode == "disk" and self._path(shard_id).exists()

    def read(self, shard_id: int, steps: Sequence[int]) -> torch.Tensor:
        """States of ``shard_id`` at teacher indices ``steps``: ``(B, len(steps), *shape)`` float32 CPU."""
        if not self.has(shard_id):
            raise KeyError(f"no teacher states kept for shard {shard_id}")
        index = list(steps)
        if self.mode == "memory":
            return self._memory[shard_id][:, index].clone()
        mapped = np.load(self._path(shard_id), mmap_mode="r")
        return torch.from_numpy(np.ascontiguousarray(mapped[:, index]))

    def clear(self) -> None:
        """Forget every kept state of the run on this node (deleting its directory)."""
        self._memory.clear()
        if self.mode == "disk":
            shutil.rmtree(self.directory, ignore_errors=True)

    def _path(self, shard_id: int) -> Path:
        return self.directory / f"{shard_id}.npy"
