"""Ray Jobs API submissions with typed outcomes: ``RayJobs`` over Ray's ``JobSubmissionClient``.

The SDK reports most failures as a ``RuntimeError`` whose text carries the HTTP status. ``RayJobs``
decides what happened from structure instead, and raises one ``SubmissionError`` with a ``kind``:

- ``UNREACHABLE``: no answer from the Jobs API (``requests`` connection errors and timeouts; the SDK's
  own ``ConnectionError`` from its version check).
- ``DUPLICATE``: a submission the cluster did not accept while it holds a job of the same submission id
  (``GET /api/jobs/{id}`` answers). Ray 2.x turns "submission id already exists" into HTTP 400 or 500
  depending on whether the head or its agent refused it, so the status code alone cannot tell a
  duplicate from another refusal; the job's existence does.
- ``REFUSED``: the Jobs API answered with an HTTP error (its ``status_code``), rejected the credentials
  (``ray.exceptions.AuthenticationError``), or the SDK refused the request before sending it
  (a working_dir it cannot package).

Every non-200 response goes through the SDK's ``_raise_error(response)``; the client here overrides it
to keep the response's status code, which is what lets ``info`` map HTTP 404 to "no such job".
Ray is imported on first use, so importing this module (and ``olss_dist.apps.refit``) stays light.

Token-authenticated clusters: the client sends the token Ray finds itself (``RAY_AUTH_TOKEN``, the file
named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) when ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

JOB_POLL_S = 2.0
NOT_FOUND = 404
TEXT_CHARS = 300

Result = TypeVar("Result")


class SubmissionKind:
    """Why a Jobs API call did not do what was asked (``SubmissionError.kind``)."""

    UNREACHABLE = "unreachable"  # no answer from the Jobs API at the address
    DUPLICATE = "duplicate"  # a job of this submission id exists already; nothing was started
    REFUSED = "refused"  # the Jobs API (or the SDK, before sending) refused the request


class SubmissionError(Exception):
    """A Jobs API call that failed, typed by ``kind`` (one of ``SubmissionKind``).

    Attributes:
        kind: ``SubmissionKind.UNREACHABLE``, ``DUPLICATE`` or ``REFUSED``.
        status_code: the HTTP status of a refusal the server answered; None otherwise.
        detail: what went wrong, one line.
    """

    def __init__(self, kind: str, detail: str, status_code: int | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.status_code = status_code
        self.detail = detail


class _HttpError(Exception):
    """A non-200 response of the Jobs API (raised by the client's ``_raise_error``)."""

    def __init__(self, status_code: int, text: str) -> None:
        super().__init__(f"HTTP {status_code}: {_one_line(text)}")
        self.status_code = status_code


@dataclass(frozen=True)
class JobState:
    """A submitted job as the cluster reports it.

    Attributes:
        status: Ray's ``JobStatus`` value: ``PENDING``, ``RUNNING``, ``STOPPED``, ``SUCCEEDED`` or ``FAILED``.
        active: not yet in a terminal status.
        succeeded: ended with ``SUCCEEDED``.
        message: the cluster's message about the job (why it failed, for one).
        error_type: Ray's ``JobErrorType`` value of a failed job (``RUNTIME_ENV_SETUP_FAILURE``...), or None.
    """

    status: str
    active: bool
    succeeded: bool
    message: str = ""
    error_type: str | None = None


def _one_line(text: str) -> str:
    """The last non-empty line of ``text`` (the exception line of a server traceback), at most ``TEXT_CHARS``."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= TEXT_CHARS else line[: TEXT_CHARS - 1] + "…"


@functools.cache
def _client_class() -> type:
    """``JobSubmissionClient`` raising ``_HttpError`` (with the status code) for every non-200 response."""
    from ray.job_submission import JobSubmissionClient

    class Client(JobSubmissionClient):
        def _raise_error(self, r: Any) -> None:
            raise _HttpError(r.status_code, r.text)

    return Client


class RayJobs:
    """The Ray Jobs API at ``address`` (``http://head:8265``; None: ``RAY_ADDRESS``), connected on first use.

    Every method raises ``SubmissionError`` for what the cluster did or could not do; nothing else
    from Ray or ``requests`` escapes.
    """

    def __init__(self, address: str | None):
        self.address = address
        self._client: Any = None

    def where(self) -> str:
        """The address the client talks to, for messages: Ray's own rule lets ``RAY_API_SERVER_ADDRESS``,
        then ``RAY_ADDRESS``, override the one passed."""
        environment = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
        return environment or self.address or "a local Ray"

    def _call(self, what: str, call: Callable[[], Result]) -> Result:
        """``call()`` with Ray's and ``requests``' failures mapped to ``SubmissionError``."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return call()
        except _HttpError as error:
            raise SubmissionError(SubmissionKind.REFUSED, f"{what}: {error}", error.status_code) from error
        except AuthenticationError as error:
            first_line = error.message.strip().splitlines()[0] if error.message.strip() else "authentication failed"
            raise SubmissionError(SubmissionKind.REFUSED, f"{what}: {first_line}") from error
        except requests.exceptions.HTTPError as error:  # the version check's raise_for_status: an answer
            status = None if error.response is None else error.response.status_code
            raise SubmissionError(SubmissionKind.REFUSED, f"{what}: {_one_line(str(error))}", status) from error
        except (requests.exceptions.RequestException, ConnectionError) as error:
            raise SubmissionError(SubmissionKind.UNREACHABLE, f"cannot reach the Ray Jobs API at {self.where()}: {_one_line(str(error))}") from error
        except (RuntimeError, ValueError, TypeError, OSError) as error:
            # The SDK's own checks before or after a request: a cluster too old for the Jobs API, a
            # working_dir it cannot package, an address it cannot parse.
            raise SubmissionError(SubmissionKind.REFUSED, f"{what}: {_one_line(str(error))}") from error

    def client(self) -> Any:
        """The connected ``JobSubmissionClient`` (it checks the cluster's version when it is made)."""
        if self._client is None:
            self._client = self._call(f"the Ray Jobs API at {self.where()}", lambda: _client_class()(self.address))
        return self._client

    def info(self, submission_id: str) -> JobState | None:
        """The job's state, or None when the cluster has no job of that id (HTTP 404)."""
        from ray.job_submission import JobStatus

        client = self.client()
        try:
            details = self._call(f"cannot read job {submission_id}", lambda: client.get_job_info(submission_id))
        except SubmissionError as error:
            if error.status_code == NOT_FOUND:
                return None
            raise
        return JobState(
            status=details.status.value,
            active=not details.status.is_terminal(),
            succeeded=details.status == JobStatus.SUCCEEDED,
            message=details.message or "",
            error_type=details.error_type,
        )

    def submit(self, submission_id: str, entrypoint: str, working_dir: str) -> None:
        """Submit ``entrypoint`` as job ``submission_id`` with ``working_dir`` uploaded.

        Raises:
            SubmissionError: ``DUPLICATE`` when a job of this id exists (nothing was started), else
                ``UNREACHABLE`` or ``REFUSED``.
        """
        client = self.client()
        try:
            self._call(
                f"the Ray Jobs API at {self.where()} refused {submission_id}",
                lambda: client.submit_job(
                    entrypoint=entrypoint, submission_id=submission_id, runtime_env={"working_dir": working_dir}
                ),
            )
        except SubmissionError as error:
            # A lost response may also have created the job: either way it exists and was not started twice.
            if error.kind != SubmissionKind.UNREACHABLE and self._exists(submission_id):
                raise SubmissionError(SubmissionKind.DUPLICATE, f"a Ray job {submission_id} exists already") from error
            raise

    def _exists(self, submission_id: str) -> bool:
        try:
            return self.info(submission_id) is not None
        except SubmissionError:
            return False

    def wait_any(self, submission_ids: list[str], poll_s: float = JOB_POLL_S) -> list[str]:
        """Block until at least one of the jobs has ended (or is unknown to the cluster); those ids."""
        while True:
            ended = [sid for sid in submission_ids if not self.is_active(sid)]
            if ended:
                return ended
            time.sleep(poll_s)

    def is_active(self, submission_id: str) -> bool:
        state = self.info(submission_id)
        return state is not None and state.active
