"""Calibrated runs in object storage: publish once, read by URI, verify every byte.

A run is an immutable directory ``<root>/<model-slug>/<model-digest>/<run-id>/`` of JSON and safetensors
files plus ``manifest.json`` (sha256 and size of each file, model identity, config and its digest,
versions), written last with create-only semantics: a run without a manifest does not exist for readers.
Each model has a ``latest.json`` pointer moved by compare-and-swap, so concurrent publishers never lose
an update. Readers resolve a run URI, a model URI or a ``latest.json`` URI, download into a local cache
keyed by the manifest's sha256, and refuse any file whose size or sha256 differs from the manifest.
Nothing read from storage is unpickled. See ``docs/artifacts.md``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olss_dist.artifacts.errors import ArtifactError, storage_errors
from olss_dist.artifacts.layout import (
    MANIFEST_NAME,
    POINTER_NAME,
    is_artifact_location,
    parse_document,
    sha256_hex,
    validate_manifest,
    validate_pointer,
)
from olss_dist.artifacts.stores import Store, join_key, open_store, parent_uri

__all__ = [
    "ArtifactError",
    "RunRef",
    "default_cache_dir",
    "fetch_run",
    "is_artifact_location",
    "pull_run",
    "read_manifest",
    "read_run_file",
    "resolve_run",
]

logger = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class RunRef:
    """A resolved, complete run: its URI, validated manifest, and the sha256 of the manifest bytes."""

    uri: str
    manifest: dict[str, Any]
    manifest_sha256: str
    manifest_bytes: bytes



def _read_run_at(store: Store, run_key: str) -> RunRef | None:
    """The run whose directory is ``run_key``, or None when it has no manifest (unfinished: invisible)."""
    data = store.read_optional(join_key(run_key, MANIFEST_NAME))
    if data is None:
        return None
    where = store.uri(join_key(run_key, MANIFEST_NAME))
    manifest = validate_manifest(parse_document(data, where), where)
    return RunRef(uri=store.uri(run_key), manifest=manifest, manifest_sha256=sha256_hex(data), manifest_bytes=data)


def _run_from_pointer(model_store: Store, data: bytes | None, pointer_uri: str) -> RunRef:
    """The run named by ``data``, the bytes of ``model_store``'s ``latest.json`` (None: absent) at ``pointer_uri``."""
    if data is None:
        raise ArtifactError(f"no run at {pointer_uri}: there is no latest.json")
    pointer = validate_pointer(parse_document(data, pointer_uri), pointer_uri)
    latest = pointer["latest"]
    run = _read_run_at(model_store, latest["path"])
    if run is None:
        raise ArtifactError(f"{pointer_uri} names {model_store.uri(latest['path'])}, which has no manifest.json")
    if run.manifest_sha256 != latest["manifest_sha256"]:
        raise ArtifactError(
            f"{run.uri}/{MANIFEST_NAME} was modified after publishing: its sha256 is {run.manifest_sha256}, "
            f"{pointer_uri} recorded {latest['manifest_sha256']}"
        )
    return run


def resolve_run(uri: str, storage_options: dict[str, Any] | None = None) -> RunRef:
    """The complete run behind ``uri``: a run directory, its ``manifest.json``, a model directory (its
    ``latest.json``), or a ``latest.json`` itself.

    Raises:
        ArtifactError: nothing complete there (e.g. a run without manifest), malformed documents, or storage errors.
    """
    with storage_errors("cannot read", uri):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name == POINTER_NAME:
            model_store = open_store(parent_uri(uri), storage_options)
            return _run_from_pointer(model_store, model_store.read_optional(POINTER_NAME), uri)
        if name == MANIFEST_NAME:
            uri = parent_uri(uri)
        store = open_store(uri, storage_options)
        run = _read_run_at(store, "")
        if run is not None:
            return run
        pointer = store.read_optional(POINTER_NAME)
        if pointer is not None:
            return _run_from_pointer(store, pointer, store.uri(POINTER_NAME))
        store.check_root(create=False)
    raise ArtifactError(
        f"no run at {uri}: neither {MANIFEST_NAME} (a complete run) nor {POINTER_NAME} (a model's latest run) "
        "is there; an unfinished or failed publish leaves no manifest and is not a run"
    )


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The validated manifest of the run behind ``uri`` (see ``resolve_run``)."""
    return resolve_run(uri, storage_options).manifest


# ----------------------------------------------------------------------------------------------- downloading


def default_cache_dir() -> Path:
    """``$OLSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/olss_dist/runs``, else ``~/.cache/olss_dist/runs``."""
    if os.environ.get("OLSS_CACHE_DIR"):
        return Path(os.environ["OLSS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "olss_dist" / "runs"


def _tamper_error(run_uri: str, name: str, what: str) -> ArtifactError:
    return ArtifactError(f"run {run_uri} is tampered or corrupted: {name} {what}; refusing to use it")


def _copy_verified(run_store: Store, run: RunRef, name: str, destination: Path) -> None:
    """Stream one file of ``run`` (``run_store`` is rooted at it) to ``destination``; refuse it unless its size
    and sha256 match the manifest."""
    expected = run.manifest["files"][name]
    digest = hashlib.sha256()
    size = 0
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        source = run_store.open(name)
    except FileNotFoundError:
        raise ArtifactError(f"run {run.uri} is incomplete: {name} is listed in its manifest but missing") from None
    with source, open(destination, "wb") as target:
        while chunk := source.read(COPY_CHUNK_BYTES):
            size += len(chunk)
            if size > expected["size"]:
                raise _tamper_error(run.uri, name, f"is larger than the {expected['size']} bytes in the manifest")
            digest.update(chunk)
            target.write(chunk)
    if size != expected["size"]:
        raise _tamper_error(run.uri, name, f"has {size} bytes, the manifest says {expected['size']}")
    if digest.hexdigest() != expected["sha256"]:
        raise _tamper_error(run.uri, name, f"has sha256 {digest.hexdigest()}, the manifest says {expected['sha256']}")


def verify_local_run(directory: Path, run: RunRef) -> None:
    """ArtifactError unless ``directory`` holds the manifest and every listed file with its size and sha256."""
    for name, expected in run.manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"local copy {directory} of run {run.uri} is incomplete: {name} is missing")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(COPY_CHUNK_BYTES):
                digest.update(chunk)
        if path.stat().st_size != expected["size"] or digest.hexdigest() != expected["sha256"]:
            raise ArtifactError(f"local copy {directory} of run {run.uri}: {name} does not match the manifest")
    if (directory / MANIFEST_NAME).read_bytes() != run.manifest_bytes:
        raise ArtifactError(f"local copy {directory} of run {run.uri}: {MANIFEST_NAME} differs")


def _download(run: RunRef, target: Path, storage_options: dict[str, Any] | None) -> None:
    """Download and verify every file of ``run`` into the new directory ``target``."""
    store = open_store(run.uri, storage_options)
    with storage_errors("cannot download run", run.uri):
        for name in run.manifest["files"]:
            _copy_verified(store, run, name, target / name)
    (target / MANIFEST_NAME).write_bytes(run.manifest_bytes)


def _download_into_place(run: RunRef, final: Path, storage_options: dict[str, Any] | None) -> bool:
    """Download into a sibling temporary directory, then rename it to ``final`` (readers never see half a run).

    Returns:
        True when ``final`` is this download (verified while streaming); False when another process placed
        its copy there first (not verified here).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".partial-{final.name}-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        _download(run, partial, storage_options)
        os.rename(partial, final)
        return True
    except OSError as error:
        if not final.is_dir():
            raise ArtifactError(f"cannot place the downloaded run {run.uri} at {final}: {error}") from error
        return False
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def fetch_run(
    uri: str, storage_options: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A local, verified copy of the run behind ``uri`` (run, model or ``latest.json`` URI).

    The copy lives at ``<cache_dir>/<manifest sha256>/`` (``default_cache_dir()`` when ``cache_dir`` is None)
    and holds ``manifest.json`` and every listed file. A cached copy is re-verified; a damaged one is
    downloaded again.

    Raises:
        ArtifactError: no complete run at ``uri``, a file missing or not matching its sha256/size, storage errors.
    """
    run = resolve_run(uri, storage_options)
    final = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = final / run.manifest_sha256
    if final.is_dir():
        try:
            verify_local_run(final, run)
            return final
        except ArtifactError as error:
            logger.warning("%s; downloading it again", error)
            shutil.rmtree(final, ignore_errors=True)
    if not _download_into_place(run, final, storage_options):
        verify_local_run(final, run)  # another process's copy
    return final


def pull_run(uri: str, destination: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Path:
    """Download and verify the run behind ``uri`` into ``destination``, which must not exist yet."""
    target = Path(destination)
    if target.exists():
        raise ArtifactError(f"{target} already exists; pull into a new directory")
    run = resolve_run(uri, storage_options)
    _download_into_place(run, target, storage_options)
    return target


def read_run_file(run: RunRef, name: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The bytes of one file of a resolved run, verified against its manifest entry."""
    expected = run.manifest["files"].get(name)
    if expected is None:
        raise ArtifactError(f"run {run.uri} has no file {name!r}; it holds {sorted(run.manifest['files'])}")
    store = open_store(run.uri, storage_options)
    with storage_errors("cannot read", store.uri(name)):
        data = store.read_optional(name)
    if data is None:
        raise ArtifactError(f"run {run.uri} is incomplete: {name} is listed in its manifest but missing")
    if len(data) != expected["size"] or sha256_hex(data) != expected["sha256"]:
        raise _tamper_error(run.uri, name, "does not match the size and sha256 in the manifest")
    return data
