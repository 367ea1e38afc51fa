"""What a refit did with each model: ``Outcome`` (one row of the table, one object of ``--json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from olss_dist.apps.refit.identity import Target
from olss_dist.apps.refit.records import Attempt


class Status:
    """What a refit did with one model (``Outcome.status``)."""

    SKIPPED = "skipped"  # a complete run of these weights and this config exists
    SUBMITTED = "submitted"  # this refit submitted a Ray job
    RUNNING = "running"  # an earlier attempt is still running
    SUCCEEDED = "succeeded"  # an attempt finished and published a run
    FAILED = "failed"  # could not identify, submit or run it, or gave up after max_attempts
    QUEUED = "queued"  # due, but max_running jobs of this refit are running; a later refit (or wait) starts it
    WOULD_RUN = "would-run"  # dry run: the next attempt that a refit would start


@dataclass
class Outcome:
    """What a refit did with one model, for the table and ``--json``.

    Attributes:
        model: the model's location (its id in the store).
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


def outcome_for(target: Target, status: str, attempt: Attempt | None = None, **fields: Any) -> Outcome:
    """The outcome for ``target``, naming ``attempt`` (a record entry) when one is concerned."""
    return Outcome(
        model=target.model,
        status=status,
        model_digest=target.model_digest,
        config_digest=target.config_digest,
        attempt=attempt["attempt"] if attempt else None,
        submission_id=attempt.get("submission_id") if attempt else None,
        **fields,
    )


def is_active_job(outcome: Outcome) -> bool:
    """A Ray job of this refit's models that is submitted or still running."""
    return outcome.status in (Status.SUBMITTED, Status.RUNNING) and outcome.submission_id is not None


def any_failed(outcomes: list[Outcome]) -> bool:
    return any(outcome.status == Status.FAILED for outcome in outcomes)
