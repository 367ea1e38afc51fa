"""Scheduled refits: calibrate every model of a registry once per (weights, calibration config).

A refit scans a model registry (a directory or bucket prefix of diffusers folders, or a YAML/JSON list of
model URIs with per-model settings), computes each model's content digest and its calibration identity
(``olss_dist.distributed.job.calibration_identity``, the config the job publishes), and for each pair:

* a complete run is already in the store -> ``skipped``;
* an attempt is still running (a Ray job, or an inline run whose heartbeat is fresh) -> ``running``;
* otherwise it claims the next attempt in the pair's refit record and starts it: a Ray job submitted
  through ``JobSubmissionClient`` (``submitted``) or ``run_job`` in this process (``succeeded`` /
  ``failed``). Failed attempts are retried by later refits, up to ``max_attempts``.

The refit record ``<root>/<model-slug>/<model-digest>/_refit/<config-digest>.json`` lists the attempts and
changes only by compare-and-swap, so two refits racing claim each attempt once; a job's submission id
``olss-refit-<model digest[:12]>-<config digest[:12]>-<attempt>`` is derived from the pair, so even a lost
record cannot start a duplicate Ray job. See ``docs/refit.md``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from olss_dist.artifacts import ArtifactError, config_digest, find_complete_run
from olss_dist.artifacts.errors import PreconditionFailed, storage_errors
from olss_dist.artifacts.layout import check_model_digest, document_bytes, model_slug, parse_document, utc_now
from olss_dist.artifacts.stores import Store, join_key, open_store, parent_uri

logger = logging.getLogger(__name__)

REGISTRY_FILE_SUFFIXES = (".yaml", ".yml", ".json")
SETTING_KEYS = ("prompts", "steps", "teacher_steps", "guidance_scale", "validation_fraction", "seed")
RECORD_DIR = "_refit"
RECORD_FORMAT = "olss_dist.apps.refit"
RECORD_FORMAT_VERSION = 1
CAS_ROUNDS = 16
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_S = 600.0
JOB_POLL_S = 2.0
JOB_PACKAGE_PARTS = ("jobs", "olss_dist")
MESSAGE_CHARS = 500


class Status:
    """What a refit did with one model (``Outcome.status``)."""

    SKIPPED = "skipped"  # a complete run of these weights and this config exists
    SUBMITTED = "submitted"  # this refit submitted a Ray job
    RUNNING = "running"  # an earlier attempt is still running
    SUCCEEDED = "succeeded"  # an attempt finished and published a run
    FAILED = "failed"  # could not identify, submit or run it, or gave up after max_attempts
    QUEUED = "queued"  # due, but max_running jobs of this refit are running; a later refit (or --wait) starts it
    WOULD_RUN = "would-run"  # --dry-run: the next attempt that a refit would start


class Action:
    """What ``Refitter.refit`` may do when a model is due (no run, nothing running, attempts left)."""

    START = "start"  # claim and start the next attempt
    QUEUE = "queue"  # report it queued: no free slot under max_running
    REPORT = "report"  # report how the last attempt ended (the pass after --wait)


class AttemptStatus:
    """An attempt's status in the refit record. Only ``FAILED`` attempts count against ``max_attempts``."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNSUBMITTED = "unsubmitted"  # the submission never reached the cluster (unreachable, refused)


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Settings:
    """Per-model calibration settings (the options of ``jobs/calibrate.py`` that change the result).

    Attributes:
        prompts: prompt file (text or Parquet), path or URI; ``None`` uses the model's default prompts.
        steps: step counts K to plan.
        teacher_steps: N, the teacher's DDIM step count.
        guidance_scale: classifier-free guidance scale.
        validation_fraction: share of prompts held out to choose each plan.
        seed: base seed of the per-prompt seeds.
    """

    prompts: str | None = None
    steps: tuple[int, ...] = (5, 10, 20)
    teacher_steps: int = 1000
    guidance_scale: float = 7.5
    validation_fraction: float = 0.2  # as JobConfig (not imported here: it would load torch and ray)
    seed: int = 0


@dataclass(frozen=True)
class RegistryModel:
    """One model of a registry: its spec (``--model`` of the job, and its id in the store) and settings."""

    spec: str
    settings: Settings


def parse_steps(value: Any) -> tuple[int, ...]:
    """Step counts from ``"5,10,20"`` or ``[5, 10, 20]``; ValueError otherwise."""
    if isinstance(value, str):
        try:
            steps = tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError:
            raise ValueError(f"steps must be integers like 5,10,20, got {value!r}") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(k, int) and not isinstance(k, bool) for k in value):
        steps = tuple(value)
    else:
        raise ValueError(f"steps must be a list of integers or a string like 5,10,20, got {value!r}")
    if not steps:
        raise ValueError(f"steps must name at least one step count, got {value!r}")
    return steps


def settings_with(base: Settings, overrides: dict[str, Any], where: str) -> Settings:
    """``base`` with the registry entry's ``overrides``; ValueError naming ``where`` for unknown keys or types."""
    unknown = sorted(set(overrides) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}; allowed: {', '.join(SETTING_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        try:
            if key == "steps":
                values[key] = parse_steps(value)
            elif key == "prompts":
                values[key] = None if value is None else _non_empty_string(value, key)
            elif key in ("teacher_steps", "seed"):
                values[key] = _integer(value, key)
            else:
                values[key] = _number(value, key)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    return replace(base, **values)


def _non_empty_string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def is_registry_file(uri: str) -> bool:
    """True when ``uri`` names a YAML/JSON model list rather than a directory of model folders."""
    return uri.rstrip("/").lower().endswith(REGISTRY_FILE_SUFFIXES)


def local_or_uri(location: str) -> str:
    """A local path made absolute (jobs run in another working directory); URIs unchanged."""
    return location if "://" in location else str(Path(location).expanduser().resolve())


def scan_registry(
    registry: str, defaults: Settings, storage_options: dict[str, Any] | None = None
) -> list[RegistryModel]:
    """The models of a registry: a directory or bucket prefix (every subfolder not starting with ``.``
    or ``_``, with ``defaults``), or a YAML/JSON file (see ``parse_registry_document``).

    Raises:
        ValueError: a malformed registry file, or a directory with no subfolder.
        ArtifactError: the registry cannot be read.
    """
    registry = local_or_uri(registry)
    if is_registry_file(registry):
        return read_registry_file(registry, defaults, storage_options)
    store = open_store(registry, storage_options)
    with storage_errors("cannot list the model registry", registry):
        store.check_root(create=False)
        names = [e.name for e in store.list_entries("") if e.is_dir and not e.name.startswith((".", "_"))]
    if not names:
        raise ValueError(f"model registry {registry} has no model folders")
    return [RegistryModel(store.uri(name), defaults) for name in names]


def read_registry_file(uri: str, defaults: Settings, storage_options: dict[str, Any] | None = None) -> list[RegistryModel]:
    """The models listed in a YAML or JSON registry file (local path or URI)."""
    import yaml

    store = open_store(parent_uri(uri), storage_options)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    with storage_errors("cannot read the model registry", uri):
        data = store.read(name)
    try:
        document = json.loads(data) if uri.lower().endswith(".json") else yaml.safe_load(data)
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(f"model registry {uri} is not valid {'JSON' if uri.lower().endswith('.json') else 'YAML'}: {error}") from None
    return parse_registry_document(document, defaults, parent_uri(uri), uri)


def parse_registry_document(document: Any, defaults: Settings, base: str, where: str) -> list[RegistryModel]:
    """Models from a registry document.

    Accepted forms: a list of entries, or ``{"defaults": {settings}, "models": [entries]}``. An entry is a
    model URI string or ``{"uri": ..., <settings>}`` with settings from ``SETTING_KEYS``. ``uri`` and
    ``prompts`` starting with ``./`` or ``../`` are relative to the registry file's folder ``base``.

    Raises:
        ValueError: naming the entry, for anything else.
    """
    if isinstance(document, dict):
        unknown = sorted(set(document) - {"defaults", "models"})
        if unknown or "models" not in document:
            raise ValueError(f"{where}: expected keys 'models' and optionally 'defaults', got {sorted(document)}")
        shared = document.get("defaults") or {}
        if not isinstance(shared, dict):
            raise ValueError(f"{where}: 'defaults' must be a mapping of settings")
        defaults = settings_with(defaults, _with_relative_prompts(shared, base), f"{where} defaults")
        document = document["models"]
    if not isinstance(document, list) or not document:
        raise ValueError(f"{where}: expected a non-empty list of models")
    models = [_registry_entry(entry, defaults, base, f"{where} model {i + 1}") for i, entry in enumerate(document)]
    specs = [model.spec for model in models]
    repeated = sorted({spec for spec in specs if specs.count(spec) > 1})
    if repeated:
        raise ValueError(f"{where}: models listed more than once: {repeated}")
    return models


def _registry_entry(entry: Any, defaults: Settings, base: str, where: str) -> RegistryModel:
    if isinstance(entry, str):
        entry = {"uri": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("uri"), str) or not entry["uri"].strip():
        raise ValueError(f"{where}: expected a URI string or a mapping with a 'uri', got {entry!r}")
    settings = {key: value for key, value in entry.items() if key != "uri"}
    spec = _relative_to(base, entry["uri"].strip())
    return RegistryModel(spec, settings_with(defaults, _with_relative_prompts(settings, base), f"{where} ({spec})"))


def _with_relative_prompts(settings: dict[str, Any], base: str) -> dict[str, Any]:
    if isinstance(settings.get("prompts"), str):
        return {**settings, "prompts": _relative_to(base, settings["prompts"])}
    return settings


def _relative_to(base: str, location: str) -> str:
    """``./x`` and ``../x`` resolved against the registry file's folder; anything else unchanged."""
    if not location.startswith(("./", "../")):
        return location
    if "://" in base:
        parts = base.rstrip("/").split("/")
        for part in location.split("/"):
            if part == "..":
                parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        return "/".join(parts)
    return str((Path(base) / location).resolve())


# ----------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class RefitOptions:
    """How a refit runs its calibrations; nothing here changes a calibration's identity.

    Attributes:
        output: registry root (artifact store) runs are looked up in and published to.
        inline: run ``run_job`` in this process instead of submitting Ray jobs.
        address: Ray Jobs API address (``http://head:8265``) for submissions; with ``inline``, the Ray
            cluster to join. ``None``: ``RAY_ADDRESS``, else a local Ray.
        working_dir: the checkout whose ``jobs/`` and ``olss_dist/`` are uploaded (as a snapshot) with each
            job (default: the one this package runs from).
        device, num_workers, shard_size: passed to every job (see ``JobConfig``).
        max_attempts: failed attempts per (model, config) after which refits give up.
        max_running: submitted jobs of one refit that may run at once (None: no limit); the others are
            ``queued`` and started by ``--wait`` as slots free up, or by the next refit.
        lease_s: an inline attempt whose heartbeat is older than this is taken as abandoned.
        storage_options: fsspec options for the store and the registry, and for inline jobs; submitted
            jobs use the cluster's environment.
    """

    output: str
    inline: bool = False
    address: str | None = None
    working_dir: str | None = None
    device: str = "auto"
    num_workers: int | None = None
    shard_size: int = 4
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_running: int | None = None
    lease_s: float = DEFAULT_LEASE_S
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts must be at least 1, got {self.max_attempts}")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"--max-running must be at least 1, got {self.max_running}")
        if self.lease_s <= 0:
            raise ValueError(f"the inline lease must be positive, got {self.lease_s}")


@dataclass(frozen=True)
class Target:
    """A model with its identity: what a refit decides about.

    Attributes:
        spec: the model spec (the store's model id).
        job: the job's full config.
        model_digest: ``content_digest`` of the model folder.
        config: ``calibration_identity`` of ``job``, the config a run of it publishes.
        config_digest: sha256 of ``config``.
    """

    spec: str
    job: Any  # olss_dist.distributed.job.JobConfig (imported lazily: it pulls in Ray)
    model_digest: str
    config: dict[str, Any]
    config_digest: str

    def submission_id(self, attempt: int) -> str:
        return f"olss-refit-{self.model_digest[:12]}-{self.config_digest[:12]}-{attempt}"


def job_config(model: RegistryModel, options: RefitOptions):
    """The ``JobConfig`` of ``model``'s calibration under ``options`` (checked like the job checks it)."""
    from olss_dist.distributed.job import JobConfig, check_config

    s = model.settings
    config = JobConfig(
        output=local_or_uri(options.output),
        model=model.spec,
        prompts=local_or_uri(s.prompts) if s.prompts else None,
        steps=s.steps,
        teacher_steps=s.teacher_steps,
        guidance_scale=s.guidance_scale,
        validation_fraction=s.validation_fraction,
        seed=s.seed,
        shard_size=options.shard_size,
        device=options.device,
        num_workers=options.num_workers,
        address=options.address if options.inline else None,
        quiet=True,
        storage_options=dict(options.storage_options),
    )
    check_config(config)
    return config


def model_digest(spec: str, storage_options: dict[str, Any] | None = None) -> str:
    """``content_digest`` of the diffusers folder behind ``spec`` (a URI is copied to the model cache first).

    Raises:
        ValueError: (``ModelLoadError``) nothing loadable at ``spec``; FileNotFoundError: not a diffusers folder.
    """
    from olss_dist.models.digest import content_digest
    from olss_dist.models.loading import local_folder

    return content_digest(local_folder(spec, storage_options))


def identify(model: RegistryModel, options: RefitOptions) -> Target:
    """The model's digest and calibration identity, exactly as the job will publish them."""
    from olss_dist.distributed.job import calibration_identity, prompt_file_records

    config = job_config(model, options)
    identity = calibration_identity(config, prompt_file_records(config))
    digest = check_model_digest(model_digest(model.spec, options.storage_options))
    return Target(model.spec, config, digest, identity, config_digest(identity))


def calibrate_arguments(config) -> list[str]:
    """``jobs/calibrate.py`` arguments that make the job run ``config`` (a ``JobConfig``)."""
    arguments = [
        "--output", config.output,
        "--model", config.model,
        "--steps", ",".join(map(str, config.steps)),
        "--teacher-steps", str(config.teacher_steps),
        "--guidance-scale", repr(float(config.guidance_scale)),
        "--validation-fraction", repr(float(config.validation_fraction)),
        "--seed", str(config.seed),
        "--shard-size", str(config.shard_size),
        "--device", config.device,
        "--quiet",
    ]  # fmt: skip
    if config.prompts:
        arguments += ["--prompts", config.prompts]
    if config.num_workers is not None:
        arguments += ["--num-workers", str(config.num_workers)]
    return arguments


# ----------------------------------------------------------------------------------------------- record


def record_key(target: Target) -> str:
    """Key of the pair's refit record under the registry root."""
    return join_key(model_slug(target.spec), target.model_digest, RECORD_DIR, f"{target.config_digest}.json")


def new_record(target: Target) -> dict[str, Any]:
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "model_id": target.spec,
        "model_digest": target.model_digest,
        "config_digest": target.config_digest,
        "config": target.config,
        "max_attempts": None,
        "attempts": [],
    }


class RefitRecord:
    """The refit record of one (model, config) in the store, read and written by compare-and-swap.

    The document: ``format``, ``model_id``, ``model_digest``, ``config_digest``, ``config``,
    ``max_attempts`` (the limit the last writer applied) and ``attempts``: ``{attempt, mode
    ("submit"|"inline"), status, submission_id, owner ("host:pid"), started_at, heartbeat_at,
    finished_at, run_uri, message}`` in attempt order.
    """

    def __init__(self, store: Store, target: Target):
        self.store = store
        self.target = target
        self.key = record_key(target)

    def read(self) -> tuple[dict[str, Any], str | None]:
        """``(document, token)``; a new empty document and ``None`` when there is no record yet."""
        with storage_errors("cannot read the refit record", self.store.uri(self.key)):
            data, token = self.store.read_versioned(self.key)
        if data is None:
            return new_record(self.target), None
        document = parse_document(data, self.store.uri(self.key))
        if document.get("format") != RECORD_FORMAT or not isinstance(document.get("attempts"), list):
            raise ArtifactError(f"{self.store.uri(self.key)} is not an olss_dist refit record")
        return document, token

    def replace(self, document: dict[str, Any], token: str | None) -> bool:
        """Write ``document`` if the record still has ``token``; False when another refit changed it first."""
        with storage_errors("cannot write the refit record", self.store.uri(self.key)):
            try:
                self.store.replace_if(self.key, document_bytes(document), token)
            except PreconditionFailed:
                return False
        return True

    def update_attempt(self, number: int, **changes: Any) -> None:
        """Change fields of attempt ``number``, retrying on conflicting writes."""
        for _ in range(CAS_ROUNDS):
            document, token = self.read()
            attempts = [dict(a, **changes) if a["attempt"] == number else a for a in document["attempts"]]
            if self.replace({**document, "attempts": attempts}, token):
                return
        raise ArtifactError(f"{self.store.uri(self.key)} kept changing for {CAS_ROUNDS} attempts")


def last_attempt(document: dict[str, Any]) -> dict[str, Any] | None:
    return document["attempts"][-1] if document["attempts"] else None


def failed_attempts(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in document["attempts"] if a["status"] == AttemptStatus.FAILED]


def finished(attempt: dict[str, Any], status: str, **fields: Any) -> dict[str, Any]:
    return {**attempt, "status": status, "finished_at": utc_now().isoformat(), **fields}


def with_attempt(document: dict[str, Any], attempt: dict[str, Any], max_attempts: int) -> dict[str, Any]:
    """``document`` with ``attempt`` replacing the attempt of the same number, or appended."""
    attempts = [a for a in document["attempts"] if a["attempt"] != attempt["attempt"]] + [attempt]
    return {**document, "max_attempts": max_attempts, "attempts": sorted(attempts, key=lambda a: a["attempt"])}


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def shorten(message: str) -> str:
    """One line of at most ``MESSAGE_CHARS`` characters: an ``error:`` line when there is one, else the tail."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    text = errors[-1] if errors else " ".join(lines)
    return text if len(text) <= MESSAGE_CHARS else "…" + text[-MESSAGE_CHARS:]


# ----------------------------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """What a refit did with one model, for the table and ``--json``.

    Attributes:
        model: the model spec.
        status: one of ``Status``.
        model_digest, config_digest: the pair's identity (None when the model could not be identified).
        attempt: the attempt number concerned (None when no attempt is involved).
        submission_id: the Ray job's submission id, for submitted attempts.
        run_uri: the complete run, when there is one.
        message: why (errors, what a dry run would do, what is running where).
    """

    model: str
    status: str
    model_digest: str | None = None
    config_digest: str | None = None
    attempt: int | None = None
    submission_id: str | None = None
    run_uri: str | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def outcome_for(target: Target, status: str, attempt: dict[str, Any] | None = None, **fields: Any) -> Outcome:
    return Outcome(
        model=target.spec,
        status=status,
        model_digest=target.model_digest,
        config_digest=target.config_digest,
        attempt=attempt["attempt"] if attempt else None,
        submission_id=attempt.get("submission_id") if attempt else None,
        **fields,
    )


# ----------------------------------------------------------------------------------------------- Ray jobs


class RayJobs:
    """The Ray Jobs API at ``address`` (``JobSubmissionClient``), connected on first use.

    Token-authenticated clusters: the client sends the token Ray finds itself (``RAY_AUTH_TOKEN``, the file
    named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) when ``RAY_AUTH_MODE=token``.
    """

    def __init__(self, address: str | None):
        self.address = address
        self._client = None

    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = self.address or os.environ.get("RAY_ADDRESS") or "the default address"
                raise RuntimeError(f"cannot reach the Ray Jobs API at {where}: {shorten(str(error))}") from error
        return self._client

    def info(self, submission_id: str):
        """The job's ``JobDetails``, or None when the cluster has no job of that id."""
        try:
            return self.client().get_job_info(submission_id)
        except RuntimeError as error:
            if "status code 404" in str(error) or "does not exist" in str(error):
                return None
            raise

    def submit(self, submission_id: str, entrypoint: str, working_dir: str) -> bool:
        """Submit ``entrypoint``; False when a job with this id already exists (nothing is started then)."""
        try:
            self.client().submit_job(
                entrypoint=entrypoint, submission_id=submission_id, runtime_env={"working_dir": working_dir}
            )
        except RuntimeError as error:
            if "already exists" in str(error):
                return False
            raise
        return True

    def wait_any(self, submission_ids: list[str], poll_s: float = JOB_POLL_S) -> list[str]:
        """Block until at least one of the jobs has ended (or is unknown to the cluster); those ids."""
        while True:
            ended = [sid for sid in submission_ids if not self.is_active(sid)]
            if ended:
                return ended
            time.sleep(poll_s)

    def is_active(self, submission_id: str) -> bool:
        info = self.info(submission_id)
        return info is not None and not info.status.is_terminal()


@contextmanager
def job_package(checkout: str | None) -> Iterator[str]:
    """A frozen copy of ``JOB_PACKAGE_PARTS`` of ``checkout`` (default: the one this package runs from), the
    working_dir uploaded with every job of a refit.

    Ray hashes a working_dir twice while submitting (to name the package, then to upload it): a checkout
    edited in between (by a developer, or bytecode being written) leaves the job naming a package that was
    never uploaded. A snapshot cannot change, and holds only what the job needs.
    """
    source = Path(checkout).expanduser() if checkout else Path(__file__).resolve().parents[1]
    if not (source / "jobs" / "calibrate.py").is_file() or not (source / "olss_dist").is_dir():
        raise ValueError(f"{source} is not an olss_dist checkout (jobs/calibrate.py, olss_dist/); pass --working-dir")
    with tempfile.TemporaryDirectory(prefix="olss-refit-job-") as snapshot:
        for part in JOB_PACKAGE_PARTS:
            shutil.copytree(source / part, Path(snapshot) / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield snapshot


# ----------------------------------------------------------------------------------------------- deciding


@dataclass(frozen=True)
class AttemptState:
    """What became of a running attempt: ``AttemptStatus.RUNNING``, ``SUCCEEDED`` or ``FAILED``, and why."""

    status: str
    message: str = ""


class Refitter:
    """Decides and acts for each model of one refit (see the module docstring).

    Args:
        options: how jobs run.
        dry_run: decide only: no record writes, no submissions, no cluster queries.
        run_inline: the in-process runner (default ``run_job``); tests pass a counting wrapper.
    """

    def __init__(self, options: RefitOptions, dry_run: bool = False, run_inline: Callable | None = None):
        self.options = options
        self.dry_run = dry_run
        self.store = open_store(local_or_uri(options.output), options.storage_options)
        self.jobs = RayJobs(options.address)
        self.run_inline = run_inline or _run_job
        self.resources = ExitStack()
        self.package: str | None = None

    def __enter__(self) -> "Refitter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.resources.close()

    def job_working_dir(self) -> str:
        """The snapshot of the checkout that this refit's jobs run in (made on first use)."""
        if self.package is None:
            self.package = self.resources.enter_context(job_package(self.options.working_dir))
        return self.package

    def refit(self, target: Target, action: str = Action.START) -> Outcome:
        """Decide about ``target``; when it is due, do ``action`` (one of ``Action``)."""
        record = RefitRecord(self.store, target)
        for _ in range(CAS_ROUNDS):
            document, token = record.read()
            outcome = self.decide(target, record, document, token, action)
            if outcome is not None:
                return outcome
        return outcome_for(target, Status.FAILED, message=f"its refit record kept changing for {CAS_ROUNDS} rounds")

    def decide(
        self, target: Target, record: RefitRecord, document: dict[str, Any], token: str | None, action: str
    ) -> Outcome | None:
        """One round of the decision on one read of the record; None when another refit wrote first."""
        last = last_attempt(document)
        running = last is not None and last["status"] == AttemptStatus.RUNNING
        run_uri = self.complete_run(target)
        if run_uri is None and running:
            state = self.attempt_state(last)
            if state.status == AttemptStatus.RUNNING:
                return outcome_for(target, Status.RUNNING, last, message=state.message)
            if state.status == AttemptStatus.SUCCEEDED:
                run_uri = self.complete_run(target)  # the job may have published since the first look
            if run_uri is None:
                message = state.message or "the job succeeded but left no complete run of this config in the store"
                failed = with_attempt(document, finished(last, AttemptStatus.FAILED, message=message), self.options.max_attempts)
                if self.dry_run:
                    return self.next_attempt(target, record, failed, token, action)
                record.replace(failed, token)  # recorded, or another refit wrote first: read again either way
                return None
        if run_uri is not None:
            if not running:
                return outcome_for(target, Status.SKIPPED, last, run_uri=run_uri)
            done = with_attempt(document, finished(last, AttemptStatus.SUCCEEDED, run_uri=run_uri), self.options.max_attempts)
            if not self.dry_run and not record.replace(done, token):
                return None
            return outcome_for(target, Status.SUCCEEDED, last, run_uri=run_uri)
        return self.next_attempt(target, record, document, token, action)

    def next_attempt(
        self, target: Target, record: RefitRecord, document: dict[str, Any], token: str | None, action: str
    ) -> Outcome | None:
        """Nothing runs and no run exists: give up, report, or claim and start the next attempt."""
        failures = failed_attempts(document)
        last_error = f"; last: {failures[-1]['message']}" if failures else ""
        if len(failures) >= self.options.max_attempts:
            return outcome_for(
                target, Status.FAILED, failures[-1],
                message=f"gave up after {len(failures)} failed attempts (--max-attempts {self.options.max_attempts}){last_error}",
            )  # fmt: skip
        number = len(document["attempts"]) + 1
        if self.dry_run:
            how = "run inline" if self.options.inline else f"submit {target.submission_id(number)}"
            return outcome_for(target, Status.WOULD_RUN, message=f"would {how} (attempt {number}){last_error}")
        if action == Action.REPORT:
            last = last_attempt(document)
            return outcome_for(target, Status.FAILED, last, message=f"attempt {last['attempt']} failed: {last['message']}")
        if action == Action.QUEUE:
            return outcome_for(target, Status.QUEUED, message=f"attempt {number} waits for a free slot (--max-running){last_error}")
        attempt = new_attempt(number, None if self.options.inline else target.submission_id(number))
        if not record.replace(with_attempt(document, attempt, self.options.max_attempts), token):
            return None
        if self.options.inline:
            return self.run_here(target, record, attempt)
        return self.submit(target, record, attempt)

    def has_free_slot(self, outcomes: list[Outcome]) -> bool:
        """Whether another job may start next to the active jobs among ``outcomes`` (``max_running``)."""
        limit = self.options.max_running
        return self.options.inline or limit is None or sum(map(is_active_job, outcomes)) < limit

    def complete_run(self, target: Target) -> str | None:
        return find_complete_run(
            self.store.root_uri, target.spec, target.model_digest, target.config_digest, self.options.storage_options
        )

    def attempt_state(self, attempt: dict[str, Any]) -> AttemptState:
        """Whether a recorded running attempt still runs: its Ray job's status, or its inline heartbeat."""
        if attempt["mode"] == "inline":
            age = (utc_now() - datetime.fromisoformat(attempt["heartbeat_at"])).total_seconds()
            if age < self.options.lease_s:
                return AttemptState(AttemptStatus.RUNNING, f"running inline on {attempt['owner']}")
            return AttemptState(AttemptStatus.FAILED, f"abandoned: no heartbeat from {attempt['owner']} for {age:.0f} s")
        if self.dry_run:
            return AttemptState(AttemptStatus.RUNNING, "submitted (as recorded; --dry-run does not ask the cluster)")
        info = self.jobs.info(attempt["submission_id"])
        if info is None:
            # Claimed in the record, not (yet) on the cluster: its refit is between claiming and submitting,
            # or died there, or the cluster was replaced. Only the lease tells these apart.
            age = (utc_now() - datetime.fromisoformat(attempt["started_at"])).total_seconds()
            if age < self.options.lease_s:
                return AttemptState(AttemptStatus.RUNNING, f"claimed by {attempt['owner']} {age:.0f} s ago, not yet on the cluster")
            return AttemptState(AttemptStatus.FAILED, f"the Ray cluster has no job {attempt['submission_id']} (restarted?)")
        status = info.status.value
        if status in ("PENDING", "RUNNING"):
            return AttemptState(AttemptStatus.RUNNING, f"Ray job {status.lower()}")
        if status == "SUCCEEDED":
            return AttemptState(AttemptStatus.SUCCEEDED)
        return AttemptState(AttemptStatus.FAILED, f"Ray job {status.lower()}: {shorten(info.message or '')}")

    def submit(self, target: Target, record: RefitRecord, attempt: dict[str, Any]) -> Outcome:
        """Submit the attempt's Ray job; a submission that never reached the cluster does not count as failed."""
        entrypoint = shlex.join(["python", "jobs/calibrate.py", *calibrate_arguments(target.job)])
        try:
            created = self.jobs.submit(attempt["submission_id"], entrypoint, self.job_working_dir())
        except (RuntimeError, ValueError, ConnectionError) as error:
            message = f"could not submit {attempt['submission_id']}: {shorten(str(error))}"
            record.update_attempt(attempt["attempt"], status=AttemptStatus.UNSUBMITTED, message=message)
            return outcome_for(target, Status.FAILED, attempt, message=message)
        if not created:
            return outcome_for(target, Status.RUNNING, attempt, message="a Ray job of this id already exists")
        return outcome_for(target, Status.SUBMITTED, attempt, message=f"submitted to {self.jobs.address or 'RAY_ADDRESS'}")

    def run_here(self, target: Target, record: RefitRecord, attempt: dict[str, Any]) -> Outcome:
        """The calibration in this process, heartbeating the record; the result is recorded either way."""
        with heartbeat(record, attempt["attempt"], self.options.lease_s / 5):
            try:
                uri = self.run_inline(target.job).uri
            except Exception as error:  # one model's failure must not stop the others; it is recorded and reported
                logger.debug("inline calibration of %s failed", target.spec, exc_info=True)
                message = shorten(f"{type(error).__name__}: {error}")
                record.update_attempt(
                    attempt["attempt"], status=AttemptStatus.FAILED, message=message, finished_at=utc_now().isoformat()
                )
                return outcome_for(target, Status.FAILED, attempt, message=f"attempt {attempt['attempt']} failed: {message}")
        record.update_attempt(attempt["attempt"], status=AttemptStatus.SUCCEEDED, run_uri=uri, finished_at=utc_now().isoformat())
        return outcome_for(target, Status.SUCCEEDED, attempt, run_uri=uri)


def new_attempt(number: int, submission_id: str | None) -> dict[str, Any]:
    """A claimed attempt: ``submission_id`` for a Ray job, None for an inline run."""
    now = utc_now().isoformat()
    return {
        "attempt": number,
        "mode": "inline" if submission_id is None else "submit",
        "status": AttemptStatus.RUNNING,
        "submission_id": submission_id,
        "owner": owner_name(),
        "started_at": now,
        "heartbeat_at": now,
        "finished_at": None,
        "run_uri": None,
        "message": "",
    }


def _run_job(config):
    from olss_dist.distributed.job import run_job

    return run_job(config)


@contextmanager
def heartbeat(record: RefitRecord, number: int, interval_s: float) -> Iterator[None]:
    """Refresh attempt ``number``'s ``heartbeat_at`` every ``interval_s`` seconds while the block runs."""
    stopped = threading.Event()

    def beat() -> None:
        while not stopped.wait(interval_s):
            try:
                record.update_attempt(number, heartbeat_at=utc_now().isoformat())
            except ArtifactError as error:  # a missed beat only risks a second run after lease_s
                logger.warning("refit heartbeat failed: %s", error)

    thread = threading.Thread(target=beat, name=f"refit-heartbeat-{number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()


# ----------------------------------------------------------------------------------------------- refit


def refit(
    registry: str,
    options: RefitOptions,
    defaults: Settings = Settings(),
    *,
    dry_run: bool = False,
    wait: bool = False,
    run_inline: Callable | None = None,
) -> list[Outcome]:
    """One refit of every model in ``registry`` (see the module docstring); one ``Outcome`` per model.

    Args:
        registry: a directory or bucket prefix of diffusers folders, or a YAML/JSON model list.
        options: how jobs run, and the store.
        defaults: settings of models the registry gives none for.
        dry_run: report what would run; write and start nothing.
        wait: after submitting, wait for this refit's Ray jobs and report how they ended.
        run_inline: replaces ``run_job`` for inline runs (tests count calls with it).

    Raises:
        ValueError, ArtifactError: the registry cannot be read or the options are bad (per-model problems
        are failed outcomes instead).
    """
    models = scan_registry(registry, defaults, options.storage_options)
    with Refitter(options, dry_run=dry_run, run_inline=run_inline) as refitter:
        return refit_models(refitter, models, wait=wait and not dry_run and not options.inline)


def refit_models(refitter: Refitter, models: list[RegistryModel], wait: bool) -> list[Outcome]:
    """``refit`` after the registry scan: identify, decide and act for each model; then ``--wait``."""
    outcomes: list[Outcome] = []
    targets: dict[int, Target] = {}
    for index, model in enumerate(models):
        try:
            targets[index] = identify(model, refitter.options)
        except (ValueError, OSError, ArtifactError) as error:
            outcomes.append(Outcome(model.spec, Status.FAILED, message=f"cannot identify the model: {shorten(str(error))}"))
            continue
        action = Action.START if refitter.has_free_slot(outcomes) else Action.QUEUE
        outcomes.append(guarded(targets[index], refitter.refit, action=action))
    if wait:
        wait_for_jobs(refitter, targets, outcomes)
    return outcomes


def guarded(target: Target, refit_one: Callable[..., Outcome], **kwargs: Any) -> Outcome:
    """``refit_one(target)``, with any error turned into a failed outcome so the other models still run."""
    try:
        return refit_one(target, **kwargs)
    except (ArtifactError, RuntimeError, ValueError, OSError) as error:
        return outcome_for(target, Status.FAILED, message=shorten(f"{type(error).__name__}: {error}"))


def is_active_job(outcome: Outcome) -> bool:
    """A Ray job of this refit's models that is submitted or still running."""
    return outcome.status in (Status.SUBMITTED, Status.RUNNING) and outcome.submission_id is not None


def wait_for_jobs(refitter: Refitter, targets: dict[int, Target], outcomes: list[Outcome]) -> None:
    """Until no job of ``outcomes`` runs: wait for jobs to end, report them, and start queued models in the
    freed slots. Updates ``outcomes`` in place."""
    while True:
        active = {o.submission_id: i for i, o in enumerate(outcomes) if is_active_job(o)}
        if not active:
            return
        try:
            ended = refitter.jobs.wait_any(list(active))
        except (RuntimeError, ConnectionError) as error:
            for i in active.values():
                outcomes[i] = replace(outcomes[i], status=Status.FAILED, message=f"lost the cluster while waiting: {shorten(str(error))}")
            return
        for submission_id in ended:
            index = active[submission_id]
            outcomes[index] = guarded(targets[index], refitter.refit, action=Action.REPORT)
        for index, outcome in enumerate(outcomes):
            if outcome.status == Status.QUEUED and refitter.has_free_slot(outcomes):
                outcomes[index] = guarded(targets[index], refitter.refit)


def any_failed(outcomes: list[Outcome]) -> bool:
    return any(outcome.status == Status.FAILED for outcome in outcomes)
