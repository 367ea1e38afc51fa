"""Deciding about one (model, config) and acting: skip, report running, give up, or claim and start an attempt.

An attempt is a Ray job submitted through the Jobs API (``olss_dist.distributed.submission.RayJobs``) or
``run_job`` in this process, which heartbeats its claim in the refit record; an inline claim whose
heartbeat is older than ``lease_s`` is taken as abandoned.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import olss_dist
from olss_dist.apps.refit.identity import Target
from olss_dist.apps.refit.outcomes import Outcome, Status, is_active_job, outcome_for
from olss_dist.apps.refit.records import (
    CAS_ROUNDS,
    Attempt,
    AttemptStatus,
    Document,
    RefitRecord,
    failed_attempts,
    finished,
    last_attempt,
    new_attempt,
    shorten,
    with_attempt,
)
from olss_dist.apps.refit.registry import local_or_uri
from olss_dist.artifacts import ArtifactError, find_complete_run
from olss_dist.artifacts.layout import utc_now
from olss_dist.artifacts.options import StorageOptionError, check_submittable
from olss_dist.artifacts.stores import open_store
from olss_dist.distributed.submission import RayJobs, SubmissionError, SubmissionKind
from olss_dist.spec import CalibrationSpec, ExecutionConfig, SpecError

logger = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_S = 600.0
JOB_PACKAGE_PARTS = ("jobs", "olss_dist")
JOB_ENTRYPOINT = ("python", "jobs/calibrate.py")


class Action:
    """What ``Refitter.refit`` may do when a model is due (no run, nothing running, attempts left)."""

    START = "start"  # claim and start the next attempt
    QUEUE = "queue"  # report it queued: no free slot under max_running
    REPORT = "report"  # report how the last attempt ended (the pass after waiting)


class PublishedRun(Protocol):
    uri: str


InlineRunner = Callable[..., PublishedRun]  # run_job(spec, execution, *, quiet) -> JobResult


@dataclass(frozen=True)
class RefitOptions:
    """How a refit runs its calibrations; nothing here changes a calibration's identity.

    Attributes:
        execution: what every job runs with: ``output`` (the registry root runs are looked up in and
            published to), device, num_workers, shard_size; ``address`` only for inline runs (the Ray
            cluster to join); ``storage_options`` for the store, the registry and every job: submitted jobs
            get them in their entrypoint, so there they may hold secrets only as ``env:NAME`` / ``file:PATH``
            references resolved on the cluster (``olss_dist.artifacts.options``; literal ones are refused).
        inline: run ``run_job`` in this process instead of submitting Ray jobs.
        address: Ray Jobs API address (``http://head:8265``) for submissions; None: ``RAY_ADDRESS``.
        working_dir: the checkout whose ``jobs/`` and ``olss_dist/`` are uploaded (as a snapshot) with each
            job (default: the one this package runs from).
        max_attempts: failed attempts per (model, config) after which refits give up.
        max_running: submitted jobs of one refit that may run at once (None: no limit); the others are
            ``queued`` and started by a waiting refit as slots free up, or by the next refit.
        lease_s: an inline attempt whose heartbeat is older than this is taken as abandoned.
    """

    execution: ExecutionConfig
    inline: bool = False
    address: str | None = None
    working_dir: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_running: int | None = None
    lease_s: float = DEFAULT_LEASE_S

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise SpecError("max_attempts", f"must be at least 1, got {self.max_attempts}")
        if self.max_running is not None and self.max_running < 1:
            raise SpecError("max_running", f"must be at least 1, got {self.max_running}")
        if self.lease_s <= 0:
            raise SpecError("lease_s", f"must be positive, got {self.lease_s}")
        if not self.inline:
            try:
                check_submittable(self.execution.storage_options)
            except StorageOptionError as error:
                raise SpecError("storage_options", str(error)) from None

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.execution.storage_options


@dataclass(frozen=True)
class AttemptState:
    """What became of a running attempt: ``AttemptStatus.RUNNING``, ``SUCCEEDED`` or ``FAILED``, and why."""

    status: str
    message: str = ""


def job_arguments(spec: CalibrationSpec, execution: ExecutionConfig) -> list[str]:
    """``jobs/calibrate.py`` arguments of a submitted job: the spec's and the execution's command-line forms,
    and the storage options when there are any, as written: references (``env:NAME``, ``file:PATH``) that the
    job resolves on the cluster, never their values.

    Raises:
        StorageOptionError: a literal secret among the storage options (``RefitOptions`` refuses them first).
    """
    check_submittable(execution.storage_options)
    options = ["--storage-options", json.dumps(execution.storage_options, sort_keys=True)]
    return [*spec.to_arguments(), *execution.to_arguments(), *(options if execution.storage_options else []), "--quiet"]


def run_job_inline(spec: CalibrationSpec, execution: ExecutionConfig, *, quiet: bool = False) -> PublishedRun:
    from olss_dist.distributed.job import run_job  # imports Ray: only for inline refits

    return run_job(spec, execution, quiet=quiet)


class Refitter:
    """Decides and acts for each model of one refit (see ``olss_dist.apps.refit``).

    Args:
        options: how jobs run.
        dry_run: decide only: no record writes, no submissions, no cluster queries.
        run_inline: the in-process runner (default ``run_job``); tests pass a counting wrapper.
    """

    def __init__(self, options: RefitOptions, dry_run: bool = False, run_inline: InlineRunner | None = None):
        self.options = options
        self.dry_run = dry_run
        # Jobs run in another working directory: a local output is made absolute.
        self.execution = replace(options.execution, output=local_or_uri(options.execution.output))
        self.store = open_store(self.execution.output, options.storage_options)
        self.jobs = RayJobs(options.address)
        self.run_inline = run_inline or run_job_inline
        self.resources = ExitStack()
        self.package: str | None = None

    def __enter__(self) -> Refitter:
        return self

    def __exit__(self, *exc: object) -> None:
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

    def decide(self, target: Target, record: RefitRecord, document: Document, token: str | None, action: str) -> Outcome | None:
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

    def next_attempt(self, target: Target, record: RefitRecord, document: Document, token: str | None, action: str) -> Outcome | None:
        """Nothing runs and no run exists: give up, report, or claim and start the next attempt."""
        failures = failed_attempts(document)
        last_error = f"; last: {failures[-1]['message']}" if failures else ""
        if len(failures) >= self.options.max_attempts:
            return outcome_for(
                target, Status.FAILED, failures[-1],
                message=f"gave up after {len(failures)} failed attempts (max_attempts {self.options.max_attempts}){last_error}",
            )  # fmt: skip
        number = len(document["attempts"]) + 1
        if self.dry_run:
            how = "run inline" if self.options.inline else f"submit {target.submission_id(number)}"
            return outcome_for(target, Status.WOULD_RUN, message=f"would {how} (attempt {number}){last_error}")
        if action == Action.REPORT:
            last = last_attempt(document)
            return outcome_for(target, Status.FAILED, last, message=f"attempt {last['attempt']} failed: {last['message']}")
        if action == Action.QUEUE:
            return outcome_for(target, Status.QUEUED, message=f"attempt {number} waits for a free slot (max_running){last_error}")
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
            self.store.root_uri, target.model, target.model_digest, target.config_digest, self.options.storage_options
        )

    def attempt_state(self, attempt: Attempt) -> AttemptState:
        """Whether a recorded running attempt still runs: its Ray job's state, or its inline heartbeat."""
        if attempt["mode"] == "inline":
            age = (utc_now() - datetime.fromisoformat(attempt["heartbeat_at"])).total_seconds()
            if age < self.options.lease_s:
                return AttemptState(AttemptStatus.RUNNING, f"running inline on {attempt['owner']}")
            return AttemptState(AttemptStatus.FAILED, f"abandoned: no heartbeat from {attempt['owner']} for {age:.0f} s")
        if self.dry_run:
            return AttemptState(AttemptStatus.RUNNING, "submitted (as recorded; a dry run does not ask the cluster)")
        job = self.jobs.info(attempt["submission_id"])
        if job is None:
            # Claimed in the record, not (yet) on the cluster: its refit is between claiming and submitting,
            # or died there, or the cluster was replaced. Only the lease tells these apart.
            age = (utc_now() - datetime.fromisoformat(attempt["started_at"])).total_seconds()
            if age < self.options.lease_s:
                return AttemptState(AttemptStatus.RUNNING, f"claimed by {attempt['owner']} {age:.0f} s ago, not yet on the cluster")
            return AttemptState(AttemptStatus.FAILED, f"the Ray cluster has no job {attempt['submission_id']} (restarted?)")
        if job.active:
            return AttemptState(AttemptStatus.RUNNING, f"Ray job {job.status.lower()}")
        if job.succeeded:
            return AttemptState(AttemptStatus.SUCCEEDED)
        why = f" ({job.error_type})" if job.error_type else ""
        return AttemptState(AttemptStatus.FAILED, f"Ray job {job.status.lower()}{why}: {shorten(job.message)}")

    def submit(self, target: Target, record: RefitRecord, attempt: Attempt) -> Outcome:
        """Submit the attempt's Ray job; a submission that never reached the cluster does not count as failed."""
        submission_id = attempt["submission_id"]
        entrypoint = shlex.join([*JOB_ENTRYPOINT, *job_arguments(target.spec, self.execution)])
        try:
            self.jobs.submit(submission_id, entrypoint, self.job_working_dir())
        except SubmissionError as error:
            if error.kind == SubmissionKind.DUPLICATE:
                return outcome_for(target, Status.RUNNING, attempt, message="a Ray job of this id already exists")
            return self.unsubmitted(target, record, attempt, f"{error.kind}: {error.detail}")
        except ValueError as error:  # not a checkout to upload
            return self.unsubmitted(target, record, attempt, str(error))
        return outcome_for(target, Status.SUBMITTED, attempt, message=f"submitted to {self.jobs.where()}")

    def unsubmitted(self, target: Target, record: RefitRecord, attempt: Attempt, why: str) -> Outcome:
        message = f"could not submit {attempt['submission_id']}: {shorten(why)}"
        record.update_attempt(attempt["attempt"], status=AttemptStatus.UNSUBMITTED, message=message)
        return outcome_for(target, Status.FAILED, attempt, message=message)

    def run_here(self, target: Target, record: RefitRecord, attempt: Attempt) -> Outcome:
        """The calibration in this process, heartbeating the record; the result is recorded either way."""
        with heartbeat(record, attempt["attempt"], self.options.lease_s / 5):
            try:
                uri = self.run_inline(target.spec, self.execution, quiet=True).uri
            except Exception as error:  # one model's failure must not stop the others; it is recorded and reported
                logger.debug("inline calibration of %s failed", target.model, exc_info=True)
                message = shorten(f"{type(error).__name__}: {error}")
                record.update_attempt(
                    attempt["attempt"], status=AttemptStatus.FAILED, message=message, finished_at=utc_now().isoformat()
                )
                return outcome_for(target, Status.FAILED, attempt, message=f"attempt {attempt['attempt']} failed: {message}")
        record.update_attempt(attempt["attempt"], status=AttemptStatus.SUCCEEDED, run_uri=uri, finished_at=utc_now().isoformat())
        return outcome_for(target, Status.SUCCEEDED, attempt, run_uri=uri)


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


@contextmanager
def job_package(checkout: str | None) -> Iterator[str]:
    """A frozen copy of ``JOB_PACKAGE_PARTS`` of ``checkout`` (default: the one this package runs from), the
    working_dir uploaded with every job of a refit.

    Ray hashes a working_dir twice while submitting (to name the package, then to upload it): a checkout
    edited in between (by a developer, or bytecode being written) leaves the job naming a package that was
    never uploaded. A snapshot cannot change, and holds only what the job needs.
    """
    source = Path(checkout).expanduser() if checkout else Path(olss_dist.__file__).resolve().parents[1]
    if not (source / "jobs" / "calibrate.py").is_file() or not (source / "olss_dist").is_dir():
        raise SpecError("working_dir", f"{source} is not an olss_dist checkout (jobs/calibrate.py, olss_dist/)")
    with tempfile.TemporaryDirectory(prefix="olss-refit-job-") as snapshot:
        for part in JOB_PACKAGE_PARTS:
            shutil.copytree(source / part, Path(snapshot) / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield snapshot
