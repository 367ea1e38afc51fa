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
import random
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

from olss_dist.artifacts.errors import ArtifactError, PreconditionFailed, storage_errors
from olss_dist.artifacts.layout import (
    MANIFEST_NAME,
    POINTER_NAME,
    STAGING_DIR,
    build_manifest,
    check_config_digest,
    check_file_content,
    check_file_name,
    check_model_digest,
    config_digest,
    document_bytes,
    is_artifact_location,
    is_run_id,
    model_slug,
    new_run_id,
    parse_document,
    pointer_entry,
    pointer_runs,
    pointer_with_run,
    sha256_hex,
    utc_now,
    validate_manifest,
    validate_pointer,
)
from olss_dist.artifacts.stores import Store, join_key, open_store, parent_uri

__all__ = [
    "ArtifactError",
    "PublishedRun",
    "RunRef",
    "RunSummary",
    "ModelListing",
    "config_digest",
    "default_cache_dir",
    "fetch_run",
    "files_from_directory",
    "is_artifact_location",
    "find_complete_run",
    "list_models",
    "model_slug",
    "publish_run",
    "pull_run",
    "read_manifest",
    "read_run_file",
    "resolve_run",
    "staging_uri",
]

logger = logging.getLogger(__name__)

FileSource = Union[bytes, str, os.PathLike]
POINTER_ATTEMPTS = 16
POINTER_BACKOFF_S = 0.05
POINTER_MAX_BACKOFF_S = 2.0
COPY_CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class PublishedRun:
    """A run just published: its URI (under the root given to ``publish_run``), id and manifest."""

    uri: str
    run_id: str
    manifest: dict[str, Any]


@dataclass(frozen=True)
class RunRef:
    """A resolved, complete run: its URI, validated manifest, and the sha256 of the manifest bytes."""

    uri: str
    manifest: dict[str, Any]
    manifest_sha256: str
    manifest_bytes: bytes


@dataclass(frozen=True)
class RunSummary:
    """One complete run as ``list_models`` reports it."""

    uri: str
    run_id: str
    model_id: str
    model_digest: str
    created_at: str
    config_digest: str
    teacher_steps: int
    planned_step_counts: list[int]


@dataclass(frozen=True)
class ModelListing:
    """One model directory under a root: its complete runs (oldest first) and which one latest.json names."""

    slug: str
    uri: str
    model_id: str
    latest_run_id: str | None
    runs: list[RunSummary]


# ----------------------------------------------------------------------------------------------- publishing


def files_from_directory(directory: str | os.PathLike) -> dict[str, Path]:
    """``{relative name: path}`` of every file below a local directory (e.g. a ``save_pretrained`` output)."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    return {path.relative_to(root).as_posix(): path for path in sorted(root.rglob("*")) if path.is_file()}


def _file_bytes(name: str, source: FileSource) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            data = Path(source).read_bytes()
        except OSError as error:
            raise ValueError(f"run file {name!r}: cannot read {source}: {error}") from error
    else:
        raise ValueError(f"run file {name!r} must be bytes or a path, got {type(source).__name__}")
    check_file_content(name, data)
    return data


def _prepare_files(files: Mapping[str, FileSource]) -> dict[str, bytes]:
    if not isinstance(files, Mapping) or not files:
        raise ValueError("files must be a non-empty mapping {name: bytes | path}")
    return {check_file_name(name): _file_bytes(name, source) for name, source in sorted(files.items())}


def _create_file(store: Store, key: str, data: bytes) -> None:
    """Create-only write; an identical object already there (a retried request that had landed) is fine."""
    try:
        store.write_new(key, data)
    except PreconditionFailed:
        existing = store.read_optional(key)
        if existing is None or sha256_hex(existing) != sha256_hex(data):
            raise ArtifactError(f"{store.uri(key)} already exists with other content; run files are never overwritten")


def _discard_partial_run(store: Store, run_key: str) -> None:
    """Best effort: remove a run directory whose manifest was never written (it is invisible either way)."""
    try:
        store.remove_tree(run_key)
    except Exception as error:  # the store may be the very thing that failed; the leftover stays invisible
        logger.warning("could not remove the unfinished run %s: %s", store.uri(run_key), error)


def publish_run(
    root_uri: str,
    *,
    model_id: str,
    model_digest: str,
    config: dict[str, Any],
    files: Mapping[str, FileSource],
    extra_manifest: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> PublishedRun:
    """Publish one calibration run under ``root_uri`` and move the model's ``latest.json`` to it.

    Order: every file create-only, then ``manifest.json`` create-only (the run now exists), then the
    pointer by compare-and-swap, retried on conflict. A failure before the manifest leaves no visible run
    (and the partial directory is removed when the store still answers).

    Args:
        root_uri: registry root, any fsspec URI (``s3://bucket/prefix``, ``gs://...``, ``file://...``, a path).
        model_id: model identity, e.g. ``"runwayml/stable-diffusion-v1-5"`` or a local model path.
        model_digest: content digest of the model weights ([A-Za-z0-9._-], at most 128 characters).
        config: JSON calibration config; its canonical sha256 is the run's ``config_digest``.
        files: ``{relative name: bytes or local path}``; ``.json`` and ``.safetensors`` only, e.g.
            ``scheduler_config.json``, ``calibration.safetensors``, ``plans.json``, ``report.json``.
        extra_manifest: more JSON fields for the manifest. ``teacher_steps`` (int) and
            ``planned_step_counts`` (list of int) are required here or in ``config``.
        storage_options: fsspec options (``endpoint_url``, ``key``, ``secret``, ``config_kwargs``...).

    Returns:
        ``PublishedRun(uri, run_id, manifest)``.

    Raises:
        ValueError: bad arguments (names, digests, non-JSON config, files that are not JSON/safetensors).
        ArtifactError: storage unreachable, bucket missing, credentials absent, or the pointer could not be moved.
    """
    slug = model_slug(model_id)
    check_model_digest(model_digest)
    payloads = _prepare_files(files)
    created_at = utc_now()
    run_id = new_run_id(created_at)
    manifest = build_manifest(
        run_id=run_id,
        created_at=created_at,
        model_id=model_id,
        model_digest=model_digest,
        config=config,
        file_digests={name: {"sha256": sha256_hex(data), "size": len(data)} for name, data in payloads.items()},
        extra=dict(extra_manifest or {}),
    )
    manifest_bytes = document_bytes(manifest)
    store = open_store(root_uri, storage_options)
    run_key = join_key(slug, model_digest, run_id)
    with storage_errors("cannot publish to", root_uri):
        store.check_root(create=True)
    with storage_errors("cannot publish run", store.uri(run_key)):
        try:
            for name, data in payloads.items():
                _create_file(store, join_key(run_key, name), data)
            _create_file(store, join_key(run_key, MANIFEST_NAME), manifest_bytes)
        except BaseException:
            _discard_partial_run(store, run_key)
            raise
    logger.info("published run %s", store.uri(run_key))
    _advance_pointer(store, slug, model_id, pointer_entry(manifest, sha256_hex(manifest_bytes)))
    return PublishedRun(uri=store.uri(run_key), run_id=run_id, manifest=manifest)


def _read_pointer_versioned(store: Store, key: str) -> tuple[dict[str, Any] | None, str | None]:
    data, token = store.read_versioned(key)
    if data is None:
        return None, None
    return validate_pointer(parse_document(data, store.uri(key)), store.uri(key)), token


def _advance_pointer(store: Store, slug: str, model_id: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` to ``<slug>/latest.json`` by compare-and-swap, retrying with jittered backoff on conflict."""
    key = join_key(slug, POINTER_NAME)
    run_uri = store.uri(join_key(slug, entry["path"]))
    with storage_errors(f"run {run_uri} is published, but moving the pointer failed at", store.uri(key)):
        for attempt in range(POINTER_ATTEMPTS):
            pointer, token = _read_pointer_versioned(store, key)
            if pointer is not None and pointer.get("model_id") != model_id:
                raise ArtifactError(
                    f"{store.uri(key)} belongs to model {pointer.get('model_id')!r}, not {model_id!r} "
                    f"(both map to directory {slug!r}); publish under another root"
                )
            if any(run["run_id"] == entry["run_id"] for run in pointer_runs(pointer)):
                return  # an earlier attempt landed although its response was lost
            try:
                store.replace_if(key, document_bytes(pointer_with_run(pointer, entry, model_id)), token)
                return
            except PreconditionFailed:
                delay = min(POINTER_MAX_BACKOFF_S, POINTER_BACKOFF_S * 2**attempt) * random.uniform(0.5, 1.5)
                logger.info("latest.json changed under us (attempt %d); retrying in %.2f s", attempt + 1, delay)
                time.sleep(delay)
    raise ArtifactError(
        f"run {run_uri} is published, but {store.uri(key)} kept changing for {POINTER_ATTEMPTS} attempts; "
        "it does not name this run yet"
    )


# ----------------------------------------------------------------------------------------------- resolving


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


# ----------------------------------------------------------------------------------------------- registry


def staging_uri(root_uri: str, model_id: str, model_digest: str, config_digest: str) -> str:
    """Where a job keeps resumable state (shard checkpoints) for one model and config; never a run.

    Keyed by the config digest, not a run id, so a restarted job with the same inputs finds it.
    """
    store_root = root_uri.rstrip("/") or root_uri
    key = join_key(model_slug(model_id), check_model_digest(model_digest), STAGING_DIR, check_config_digest(config_digest))
    return f"{store_root}/{key}"


def _complete_runs(store: Store, digest_key: str) -> list[RunRef]:
    """Runs with a manifest under ``<slug>/<digest>``, oldest first."""
    runs = []
    for entry in store.list_entries(digest_key):
        if entry.is_dir and is_run_id(entry.name):
            run = _read_run_at(store, join_key(digest_key, entry.name))
            if run is not None:
                runs.append(run)
    return sorted(runs, key=lambda run: (run.manifest["created_at"], run.manifest["run_id"]))


def _has_all_files(store: Store, run_key: str, manifest: dict[str, Any]) -> bool:
    sizes = store.file_sizes(run_key)
    return all(sizes.get(name) == entry["size"] for name, entry in manifest["files"].items())


def find_complete_run(
    root_uri: str,
    model_id: str,
    model_digest: str,
    config_digest: str,
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """URI of the newest complete run of this model, weights and config, or None.

    Complete: a valid manifest for the same model id and config digest, and every listed file present with
    its listed size (sha256 is checked when the run is read, not here).
    """
    slug = model_slug(model_id)
    digest_key = join_key(slug, check_model_digest(model_digest))
    check_config_digest(config_digest)
    store = open_store(root_uri, storage_options)
    with storage_errors("cannot search runs under", store.uri(digest_key)):
        for run in reversed(_complete_runs(store, digest_key)):
            manifest = run.manifest
            if manifest["model"]["id"] != model_id or manifest["config_digest"] != config_digest:
                continue
            if _has_all_files(store, join_key(digest_key, manifest["run_id"]), manifest):
                return run.uri
    return None


def _summary(run: RunRef) -> RunSummary:
    manifest = run.manifest
    return RunSummary(
        uri=run.uri,
        run_id=manifest["run_id"],
        model_id=manifest["model"]["id"],
        model_digest=manifest["model"]["digest"],
        created_at=manifest["created_at"],
        config_digest=manifest["config_digest"],
        teacher_steps=manifest["teacher_steps"],
        planned_step_counts=list(manifest["planned_step_counts"]),
    )


def _list_model(store: Store, slug: str) -> ModelListing | None:
    pointer_data = store.read_optional(join_key(slug, POINTER_NAME))
    pointer = None
    if pointer_data is not None:
        where = store.uri(join_key(slug, POINTER_NAME))
        pointer = validate_pointer(parse_document(pointer_data, where), where)
    runs = []
    for entry in store.list_entries(slug):
        if entry.is_dir and not entry.name.startswith(("_", ".")):
            runs.extend(_summary(run) for run in _complete_runs(store, join_key(slug, entry.name)))
    if not runs and pointer is None:
        return None
    runs.sort(key=lambda run: (run.created_at, run.run_id))
    model_id = pointer["model_id"] if pointer else runs[-1].model_id
    latest = pointer["latest"]["run_id"] if pointer else None
    return ModelListing(slug=slug, uri=store.uri(slug), model_id=model_id, latest_run_id=latest, runs=runs)


def list_models(root_uri: str, storage_options: dict[str, Any] | None = None) -> list[ModelListing]:
    """Every model under ``root_uri`` with its complete runs and the run its ``latest.json`` names."""
    store = open_store(root_uri, storage_options)
    models = []
    with storage_errors("cannot list runs under", root_uri):
        store.check_root(create=False)
        for entry in store.list_entries(""):
            if entry.is_dir and not entry.name.startswith(("_", ".")):
                listing = _list_model(store, entry.name)
                if listing is not None:
                    models.append(listing)
    return models
