"""Publishing a calibrated run: every file create-only, the manifest last, then ``latest.json`` by CAS.

A failure before the manifest leaves no visible run; the pointer moves by compare-and-swap with
jittered backoff, so concurrent publishers never lose an update. See ``docs/artifacts.md``.

A publisher killed between its manifest and the pointer leaves a complete run that ``latest.json``
does not name. With ``adopt_unlisted=True`` (the calibration job's rerun) such a run of the same model
digest and config is adopted: the pointer moves to it and nothing new is written, so a rerun after the
kill publishes once. A publisher killed before its manifest left only files without a manifest, which
no reader sees; the rerun publishes its own run.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

from olss_dist.artifacts.errors import ArtifactError, PreconditionFailed, storage_errors
from olss_dist.artifacts.layout import (
    MANIFEST_NAME,
    POINTER_HISTORY,
    POINTER_NAME,
    build_manifest,
    check_file_content,
    check_file_name,
    check_model_digest,
    document_bytes,
    is_run_id,
    model_slug,
    new_run_id,
    parse_document,
    pointer_entry,
    pointer_runs,
    pointer_with_run,
    sha256_hex,
    utc_now,
    validate_pointer,
)
from olss_dist.artifacts.stores import Store, join_key, open_store

__all__ = ["PublishedRun", "files_from_directory", "publish_run"]

logger = logging.getLogger(__name__)

FileSource = Union[bytes, str, os.PathLike]
POINTER_ATTEMPTS = 16
POINTER_BACKOFF_S = 0.05
POINTER_MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class PublishedRun:
    """A run just published: its URI (under the root given to ``publish_run``), id and manifest."""

    uri: str
    run_id: str
    manifest: dict[str, Any]



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
    adopt_unlisted: bool = False,
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
        adopt_unlisted: when a complete run of this model digest and config exists that ``latest.json``
            does not name (its publisher died between manifest and pointer), move the pointer to that
            run and return it instead of writing a new one.

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
    if adopt_unlisted:
        with storage_errors("cannot look for unlisted runs under", store.uri(join_key(slug, model_digest))):
            orphan = _unlisted_run(store, slug, model_id, model_digest, manifest["config_digest"])
        if orphan is not None:
            orphan_manifest, orphan_bytes, orphan_key = orphan
            logger.warning(
                "adopting %s: a complete run of this config that latest.json did not name (its publisher stopped "
                "before moving the pointer)", store.uri(orphan_key)
            )
            _advance_pointer(store, slug, model_id, pointer_entry(orphan_manifest, sha256_hex(orphan_bytes)))
            return PublishedRun(uri=store.uri(orphan_key), run_id=orphan_manifest["run_id"], manifest=orphan_manifest)
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


def _unlisted_run(
    store: Store, slug: str, model_id: str, model_digest: str, config: str
) -> tuple[dict[str, Any], bytes, str] | None:
    """The newest complete run of ``model_digest`` with config digest ``config`` that ``latest.json`` does not
    name, as ``(manifest, manifest bytes, run key)``; None when every such run is named.

    A run older than the pointer's oldest entry, when its history is full, may simply have aged out of it,
    and is not adopted.
    """
    from olss_dist.artifacts.runs import _read_run_at

    pointer_data = store.read_optional(join_key(slug, POINTER_NAME))
    pointer = None
    if pointer_data is not None:
        pointer = validate_pointer(parse_document(pointer_data, store.uri(join_key(slug, POINTER_NAME))), store.uri(slug))
    listed = pointer_runs(pointer)
    named = {run["run_id"] for run in listed}
    cut = min(run["created_at"] for run in listed) if len(listed) >= POINTER_HISTORY else ""
    digest_key = join_key(slug, model_digest)
    candidates = []
    for entry in store.list_entries(digest_key):
        if not entry.is_dir or not is_run_id(entry.name) or entry.name in named:
            continue
        run = _read_run_at(store, join_key(digest_key, entry.name))
        if run is None:
            continue  # no manifest: never visible
        manifest = run.manifest
        if manifest["model"]["id"] != model_id or manifest["config_digest"] != config or manifest["created_at"] < cut:
            continue
        sizes = store.file_sizes(join_key(digest_key, entry.name))
        if all(sizes.get(name) == item["size"] for name, item in manifest["files"].items()):
            candidates.append((manifest["created_at"], manifest["run_id"], manifest, run.manifest_bytes, join_key(digest_key, entry.name)))
    if not candidates:
        return None
    *_, manifest, data, key = max(candidates, key=lambda c: (c[0], c[1]))
    return manifest, data, key


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
