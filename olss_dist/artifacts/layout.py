"""Names, digests and the two JSON documents of the run registry: a run's manifest and a model's latest.json.

Layout under a root URI::

    <root>/<model-slug>/latest.json                                   pointer, moved by compare-and-swap
    <root>/<model-slug>/<model-digest>/<run-id>/<files...>            immutable, create-only
    <root>/<model-slug>/<model-digest>/<run-id>/manifest.json         written last: the run exists from here on
    <root>/<model-slug>/<model-digest>/_staging/<config-digest>/      resumable job state, not a run
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import secrets
import struct
from datetime import datetime, timezone
from typing import Any

from olss_dist.artifacts.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
POINTER_NAME = "latest.json"
STAGING_DIR = "_staging"

# The files of a calibrated run: the job writes exactly these, readers look for them by these names.
SCHEDULER_CONFIG_FILE = "scheduler_config.json"  # OLSSScheduler config: the model's noise process (runs before
# the plans file also hold the plans here, under "plans"; OLSSScheduler still loads them)
SCHEDULER_PLANS_FILE = "olss_plans.json"  # the plans OLSSScheduler serves (core.scheduler_plans.PLANS_FILE_NAME)
CALIBRATION_FILE = "calibration.safetensors"  # the merged statistics R, counts and timesteps
PLANS_FILE = "plans.json"  # one Plan.to_dict() per step count
REPORT_FILE = "report.json"  # model identity, config, statistics counts, every candidate's scores
RUN_FILES = (SCHEDULER_CONFIG_FILE, SCHEDULER_PLANS_FILE, CALIBRATION_FILE, PLANS_FILE, REPORT_FILE)


def is_artifact_location(location: str | os.PathLike) -> bool:
    """True for URIs with a scheme and for local folders or files of a published run (manifest / latest pointer)."""
    text = os.fspath(location)
    if "://" in text:
        return True
    markers = (MANIFEST_NAME, POINTER_NAME)
    return os.path.basename(text.rstrip("/")) in markers or any(os.path.isfile(os.path.join(text, m)) for m in markers)
MANIFEST_FORMAT = "olss_dist.run"
POINTER_FORMAT = "olss_dist.latest"
FORMAT_VERSION = 1
ALLOWED_SUFFIXES = (".json", ".safetensors")
POINTER_HISTORY = 100
VERSIONED_PACKAGES = ("olss-dist", "torch", "diffusers", "numpy", "ray", "safetensors", "fsspec", "s3fs")

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DIGEST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Sorted-key, whitespace-free UTF-8 JSON; ValueError for NaN, Inf or anything JSON cannot hold."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise ValueError(f"not JSON-serialisable: {error}") from error


def document_bytes(value: dict[str, Any]) -> bytes:
    """The stored form of a manifest or pointer: indented, sorted keys, trailing newline."""
    return (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def config_digest(config: dict[str, Any]) -> str:
    """sha256 (64 hex characters) of the canonical JSON of a calibration config."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    return sha256_hex(canonical_json(config))


def model_slug(model_id: str) -> str:
    """A path-safe directory name for a model id: ``"org/name"`` -> ``"org--name"``, other odd characters -> ``-``."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    slug = re.sub(r"[^A-Za-z0-9._-]", "-", model_id.strip().strip("/").replace("/", "--")).strip("-.")
    if not slug:
        raise ValueError(f"model_id {model_id!r} has no characters usable in a path")
    return slug


def check_model_digest(model_digest: str) -> str:
    if not isinstance(model_digest, str) or not _DIGEST.match(model_digest):
        raise ValueError(
            f"model_digest must be 1-128 characters of [A-Za-z0-9._-] starting with a letter or digit, got {model_digest!r}"
        )
    return model_digest


def check_config_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise ValueError(f"config digest must be 64 lowercase hex characters (config_digest(config)), got {digest!r}")
    return digest


def is_run_id(name: str) -> bool:
    return bool(_RUN_ID.match(name))


def new_run_id(created_at: datetime) -> str:
    """``YYYYMMDDTHHMMSSZ-<8 hex>``: sorts by creation time, unique across concurrent publishers."""
    return f"{created_at.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_file_name(name: str) -> str:
    """A run file name: relative ``/``-path of safe parts, ``.json`` or ``.safetensors``, not the manifest."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or not all(_SAFE_PART.match(part) for part in parts):
        raise ValueError(
            f"run file name {name!r} must be a relative path of [A-Za-z0-9._-] parts, none starting with '.' or '-'"
        )
    if not name.endswith(ALLOWED_SUFFIXES):
        raise ValueError(f"run file {name!r}: only JSON and safetensors files are stored ({', '.join(ALLOWED_SUFFIXES)})")
    if name == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME} is written by publish_run, not passed in files")
    return name


def check_file_content(name: str, data: bytes) -> None:
    """ValueError unless a ``.json`` file parses as JSON and a ``.safetensors`` file has a valid header."""
    if name.endswith(".json"):
        try:
            json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"run file {name!r} is not valid JSON: {error}") from error
        return
    if len(data) < 8:
        raise ValueError(f"run file {name!r} is not safetensors: {len(data)} bytes, no header")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(len(data) - 8, _MAX_SAFETENSORS_HEADER):
        raise ValueError(f"run file {name!r} is not safetensors: header size {header_size} exceeds the file")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"run file {name!r} is not safetensors: header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"run file {name!r} is not safetensors: header is not a JSON object")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (None where not installed), and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


_RESERVED_KEYS = {
    "format",
    "format_version",
    "run_id",
    "created_at",
    "model",
    "config",
    "config_digest",
    "teacher_steps",
    "planned_step_counts",
    "files",
    "versions",
}


def _planning_fields(config: dict[str, Any], extra: dict[str, Any]) -> tuple[int, list[int]]:
    """``teacher_steps`` and ``planned_step_counts``, from ``extra`` first, then ``config``."""
    source = {**config, **extra}
    teacher_steps = source.get("teacher_steps")
    counts = source.get("planned_step_counts")
    if isinstance(teacher_steps, bool) or not isinstance(teacher_steps, int) or teacher_steps < 1:
        raise ValueError(f"teacher_steps (a positive int in config or extra_manifest) is required, got {teacher_steps!r}")
    if not isinstance(counts, (list, tuple)) or not counts or not all(
        isinstance(k, int) and not isinstance(k, bool) and 0 < k <= teacher_steps for k in counts
    ):
        raise ValueError(
            "planned_step_counts (a non-empty list of ints in 1..teacher_steps, in config or extra_manifest) is "
            f"required, got {counts!r}"
        )
    return teacher_steps, [int(k) for k in counts]


def build_manifest(
    *,
    run_id: str,
    created_at: datetime,
    model_id: str,
    model_digest: str,
    config: dict[str, Any],
    file_digests: dict[str, dict[str, Any]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of one run.

    Args:
        file_digests: ``{name: {"sha256": hex, "size": bytes}}`` of every file in the run but the manifest.
        extra: further JSON fields (reports, timings); may not reuse the manifest's own keys except
            ``teacher_steps`` and ``planned_step_counts``.
    """
    clashes = sorted(set(extra) & (_RESERVED_KEYS - {"teacher_steps", "planned_step_counts"}))
    if clashes:
        raise ValueError(f"extra_manifest may not set {clashes}: publish_run writes them")
    teacher_steps, counts = _planning_fields(config, extra)
    manifest = {
        **{name: value for name, value in extra.items() if name not in {"teacher_steps", "planned_step_counts"}},
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "created_at": iso_utc(created_at),
        "model": {"id": model_id, "digest": model_digest, "slug": model_slug(model_id)},
        "config": config,
        "config_digest": config_digest(config),
        "teacher_steps": teacher_steps,
        "planned_step_counts": counts,
        "files": {name: dict(file_digests[name]) for name in sorted(file_digests)},
        "versions": package_versions(),
    }
    canonical_json(manifest)
    return manifest


def parse_document(data: bytes, what: str) -> dict[str, Any]:
    """JSON object from stored bytes, or ArtifactError naming ``what``."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{what} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ArtifactError(f"{what} is not a JSON object")
    return value


def validate_manifest(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """The manifest itself when it is well formed; ArtifactError naming the first problem otherwise."""
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{where}: not an olss_dist run manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: manifest format version {manifest.get('format_version')!r}, this olss_dist reads {FORMAT_VERSION}"
        )
    missing = sorted(_RESERVED_KEYS - set(manifest))
    if missing:
        raise ArtifactError(f"{where}: manifest lacks {missing}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{where}: manifest lists no files")
    for name, entry in files.items():
        try:
            check_file_name(name)
        except ValueError as error:
            raise ArtifactError(f"{where}: manifest lists a file it may not hold: {error}") from error
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and _SHA256.match(entry["sha256"])
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
        ):
            raise ArtifactError(f"{where}: manifest entry for {name!r} needs a sha256 and a size, got {entry!r}")
    return manifest


def pointer_entry(manifest: dict[str, Any], manifest_sha256: str) -> dict[str, Any]:
    """How latest.json names a run: its path relative to the model directory and what it must hash to."""
    return {
        "run_id": manifest["run_id"],
        "path": f"{manifest['model']['digest']}/{manifest['run_id']}",
        "model_digest": manifest["model"]["digest"],
        "config_digest": manifest["config_digest"],
        "created_at": manifest["created_at"],
        "manifest_sha256": manifest_sha256,
    }


def pointer_runs(pointer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The runs a pointer knows, newest first."""
    if pointer is None:
        return []
    return [pointer["latest"], *pointer.get("previous", [])]


def pointer_with_run(pointer: dict[str, Any] | None, entry: dict[str, Any], model_id: str) -> dict[str, Any]:
    """The pointer after publishing ``entry``: latest is the newest run by creation time, history bounded."""
    runs = {run["run_id"]: run for run in pointer_runs(pointer)}
    runs[entry["run_id"]] = entry
    ordered = sorted(runs.values(), key=lambda run: (run["created_at"], run["run_id"]), reverse=True)
    ordered = ordered[:POINTER_HISTORY]
    return {
        "format": POINTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "latest": ordered[0],
        "previous": ordered[1:],
    }


def validate_pointer(pointer: dict[str, Any], where: str) -> dict[str, Any]:
    if pointer.get("format") != POINTER_FORMAT or pointer.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: not an olss_dist latest.json (format {pointer.get('format')!r} "
            f"version {pointer.get('format_version')!r})"
        )
    latest = pointer.get("latest")
    if not isinstance(latest, dict) or not isinstance(latest.get("path"), str) or not isinstance(
        latest.get("manifest_sha256"), str
    ):
        raise ArtifactError(f"{where}: latest.json names no run")
    digest, _, run_id = latest["path"].partition("/")
    if not _DIGEST.match(digest) or not is_run_id(run_id):
        raise ArtifactError(f"{where}: latest.json names an invalid run path {latest['path']!r}")
    return pointer
