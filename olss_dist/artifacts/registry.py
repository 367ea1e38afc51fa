"""The registry view of a store: complete runs of a (model, config) pair, model listings, staging areas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from olss_dist.artifacts.errors import storage_errors
from olss_dist.artifacts.layout import (
    POINTER_NAME,
    STAGING_DIR,
    check_config_digest,
    check_model_digest,
    is_run_id,
    model_slug,
    parse_document,
    validate_pointer,
)
from olss_dist.artifacts.runs import RunRef, _read_run_at
from olss_dist.artifacts.stores import Store, join_key, open_store

__all__ = ["ModelListing", "RunSummary", "find_complete_run", "list_models", "staging_uri"]


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
