"""Shard checkpoints: finished shards' statistics kept under the output location so a killed job resumes.

They live in the run registry's staging prefix (``olss_dist.artifacts.staging_uri``), keyed by the
digest of everything that determines a shard's statistics, so rerunning the same command finds them.
For shard ``s`` two objects are written: ``shard-<s>.safetensors`` (the shard's ``Calibration``: R
factor and counts) and then ``shard-<s>.json`` (shard id, shard digest, statistics digest, sha256 of
the safetensors bytes). The JSON is written last and is the commit mark: a shard counts as finished
only when its JSON names the same statistics and shard digests and the bytes hash to the recorded
sha256. Nothing is unpickled; a stale or corrupt checkpoint is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any, Iterable

from olss_dist.core.calibration import Calibration
from olss_dist.prompts import Shard
from olss_dist.artifacts.errors import storage_errors
from olss_dist.artifacts.stores import Store, open_store

FORMAT = "olss_dist.shard_checkpoint"


class ShardCheckpoints:
    """Checkpoints of one statistics configuration under ``uri``.

    Args:
        uri: staging directory (local path or fsspec URI).
        statistics_digest: digest of everything that determines a shard's statistics besides its records.
        storage_options: fsspec options (credentials, endpoint).
    """

    def __init__(self, uri: str, statistics_digest: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri
        self.statistics_digest = statistics_digest
        self.store = open_store(uri, storage_options)

    def save(self, shard: Shard, calibration: Calibration) -> None:
        """Write the shard's statistics, then its commit mark (both overwrite a stale pair)."""
        data = calibration.to_bytes()
        mark = {
            "format": FORMAT,
            "shard_id": shard.shard_id,
            "shard_digest": shard.digest(),
            "statistics_digest": self.statistics_digest,
            "num_samples": calibration.num_samples,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        with storage_errors("cannot write shard checkpoint to", self.uri):
            self._write(self._key(shard.shard_id, "safetensors"), data)
            self._write(self._key(shard.shard_id, "json"), json.dumps(mark, indent=1).encode())

    def load(self, shard: Shard) -> Calibration | None:
        """The shard's checkpointed statistics, or ``None`` when absent, stale or corrupt."""
        with storage_errors("cannot read shard checkpoint from", self.uri):
            mark_bytes = self.store.read_optional(self._key(shard.shard_id, "json"))
            data = None if mark_bytes is None else self.store.read_optional(self._key(shard.shard_id, "safetensors"))
        if mark_bytes is None or data is None:
            return None
        try:
            mark = json.loads(mark_bytes)
        except json.JSONDecodeError:
            return None
        expected = (FORMAT, shard.shard_id, shard.digest(), self.statistics_digest, hashlib.sha256(data).hexdigest())
        found = tuple(mark.get(k) for k in ("format", "shard_id", "shard_digest", "statistics_digest", "sha256"))
        return Calibration.from_bytes(data) if found == expected else None

    def load_finished(self, shards: Iterable[Shard]) -> dict[int, Calibration]:
        """``{shard_id: statistics}`` of every shard with a valid checkpoint."""
        finished = {}
        for shard in shards:
            calibration = self.load(shard)
            if calibration is not None:
                finished[shard.shard_id] = calibration
        return finished

    def remove_all(self) -> None:
        """Delete every checkpoint (after the run is published)."""
        with storage_errors("cannot remove shard checkpoints under", self.uri):
            if self.store.file_sizes(""):
                self.store.remove_tree("")

    def _write(self, key: str, data: bytes) -> None:
        write_object(self.store, key, data)

    @staticmethod
    def _key(shard_id: int, suffix: str) -> str:
        return f"shard-{shard_id:06d}.{suffix}"


def write_object(store: Store, key: str, data: bytes) -> None:
    """Write (or overwrite) one object under ``store``, creating local directories as needed."""
    path = store.path(key)
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, data)


def check_writable(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write and delete a probe object under ``uri``.

    Raises:
        ArtifactError: the location refuses writes (permissions, missing bucket, no credentials).
    """
    store = open_store(uri, storage_options)
    key = f".olss-write-probe-{secrets.token_hex(6)}"
    with storage_errors("output is not writable:", uri):
        # Before any write: s3fs would create a missing bucket instead of failing.
        store.check_root(create=True)
        write_object(store, key, b"")
        store.fs.rm(store.path(key))
