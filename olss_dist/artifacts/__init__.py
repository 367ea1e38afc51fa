"""Storage edge: calibrated runs in any fsspec store (publish once, read by URI, verify every byte).

- ``stores``: ``open_store`` and the ``Store`` protocol (create-only files, compare-and-swap, timeouts).
- ``layout``: the run directory, its file names, ``manifest.json`` and ``latest.json`` documents.
- ``publish``: ``publish_run`` (files create-only, manifest last, ``latest.json`` by CAS).
- ``runs``: resolve, fetch (verified, cached), pull and read published runs.
- ``registry``: complete runs of a (model, config) pair, listings, staging areas for checkpoints.
- ``errors``: ``ArtifactError`` and the mapping of storage exceptions onto it.
"""

from olss_dist.artifacts.errors import ArtifactError
from olss_dist.artifacts.layout import config_digest, model_slug
from olss_dist.artifacts.publish import PublishedRun, files_from_directory, publish_run
from olss_dist.artifacts.registry import (
    ModelListing,
    RunSummary,
    find_complete_run,
    list_models,
    staging_uri,
)
from olss_dist.artifacts.runs import (
    RunRef,
    default_cache_dir,
    fetch_run,
    is_artifact_location,
    pull_run,
    read_manifest,
    read_run_file,
    resolve_run,
)

__all__ = [
    "ArtifactError", "ModelListing", "PublishedRun", "RunRef", "RunSummary", "config_digest", "default_cache_dir",
    "fetch_run", "files_from_directory", "find_complete_run", "is_artifact_location", "list_models", "model_slug",
    "publish_run", "pull_run", "read_manifest", "read_run_file", "resolve_run", "staging_uri",
]  # fmt: skip
