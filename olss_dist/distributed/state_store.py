"""Teacher states kept on a worker's node between the teacher pass and the on-policy rounds.

A shard's states are kept per teacher index ("node"): all ``N+1`` after the teacher run, then only
the nodes the on-policy fits need (``restrict``). In ``"memory"`` mode they are CPU tensors in the
worker process; in ``"disk"`` mode one ``.npy`` file per (shard, node) under a directory named after
the run on the node's local disk, written atomically (temp file + rename). A worker restarted on the
same node, or a rerun of the same job there, reads those files back instead of rerunning the teacher.
Shards are keyed by their content digest, so a file can never belong to different samples.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

KEEP_MODES = ("memory", "disk")


class TeacherStateStore:
    """Teacher states ``(B, *shape)`` per (shard key, node).

    Args:
        mode: ``"memory"`` (CPU tensors in this process) or ``"disk"`` (node-local ``.npy`` files).
        run_key: names the run's directory, shared by the node's workers and by reruns of the job.
        root: parent directory for ``"disk"``; ``None`` uses the system temp dir.
    """

    def __init__(self, mode: str = "memory", run_key: str = "run", root: str | None = None):
        if mode not in KEEP_MODES:
            raise ValueError(f"keep_states must be one of {KEEP_MODES}, got {mode!r}")
        self.mode = mode
        self._memory: dict[str, dict[int, torch.Tensor]] = {}
        self.directory = Path(root or tempfile.gettempdir()) / f"olss-states-{run_key}"

    def keep(self, key: str, states: torch.Tensor, nodes: Iterable[int]) -> None:
        """Keep ``states[:, j]`` (moved to the CPU, float32) as node ``nodes[j]`` of shard ``key``."""
        host = states.detach().to("cpu", torch.float32)
        for column, node in enumerate(nodes):
            if self.mode == "memory":
                self._memory.setdefault(key, {})[node] = host[:, column].clone()
            else:
                self._write(key, node, host[:, column])

    def has(self, key: str, nodes: Iterable[int]) -> bool:
        """Whether every one of ``nodes`` of shard ``key`` is kept."""
        if self.mode == "memory":
            kept = self._memory.get(key, {})
            return all(node in kept for node in nodes)
        return all(self._path(key, node).exists() for node in nodes)

    def read(self, key: str, node: int) -> torch.Tensor:
        """``(B, *shape)`` float32 CPU state of shard ``key`` at teacher index ``node``."""
        if not self.has(key, [node]):
            raise KeyError(f"no teacher state kept for shard {key} at node {node}")
        if self.mode == "memory":
            return self._memory[key][node]
        return torch.from_numpy(np.load(self._path(key, node)))

    def restrict(self, key: str, nodes: Iterable[int]) -> None:
        """Forget every node of shard ``key`` except ``nodes``."""
        keep = set(nodes)
        if self.mode == "memory":
            self._memory[key] = {n: s for n, s in self._memory.get(key, {}).items() if n in keep}
            return
        for path in self._shard_dir(key).glob("*.npy"):
            # ".<node>.<pid>.npy": a partial write of a process killed mid-write (``_write``); never a state
            if path.name.startswith(".") or int(path.stem) not in keep:
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget every kept state of the run on this node (deleting its directory)."""
        self._memory.clear()
        if self.mode == "disk":
            shutil.rmtree(self.directory, ignore_errors=True)

    def _shard_dir(self, key: str) -> Path:
        return self.directory / key

    def _path(self, key: str, node: int) -> Path:
        return self._shard_dir(key) / f"{node}.npy"

    def _write(self, key: str, node: int, state: torch.Tensor) -> None:
        final = self._path(key, node)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.parent / f".{node}.{os.getpid()}.npy"
        np.save(partial, state.numpy())
        partial.replace(final)
