"""The refit record of one (model, config): its attempts, changed only by compare-and-swap.

``<root>/<model-slug>/<model-digest>/_refit/<config-digest>.json`` lists the attempts in order; two refits
racing read it, decide, and write it back only if it is unchanged (``Store.replace_if``), so each attempt
is claimed once.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from olss_dist.apps.refit.identity import Target
from olss_dist.artifacts import ArtifactError
from olss_dist.artifacts.errors import PreconditionFailed, storage_errors
from olss_dist.artifacts.layout import document_bytes, model_slug, parse_document, utc_now
from olss_dist.artifacts.stores import Store, join_key

RECORD_DIR = "_refit"
RECORD_FORMAT = "olss_dist.apps.refit"
RECORD_FORMAT_VERSION = 1
CAS_ROUNDS = 16
MESSAGE_CHARS = 500

Attempt = dict[str, Any]  # one entry of a record's "attempts" (see RefitRecord)
Document = dict[str, Any]  # a whole refit record


class AttemptStatus:
    """An attempt's status in the refit record. Only ``FAILED`` attempts count against ``max_attempts``."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNSUBMITTED = "unsubmitted"  # the submission never reached the cluster (unreachable, refused)


def record_key(target: Target) -> str:
    """Key of the pair's refit record under the registry root."""
    return join_key(model_slug(target.model), target.model_digest, RECORD_DIR, f"{target.config_digest}.json")


def new_record(target: Target) -> Document:
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "model_id": target.model,
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

    def read(self) -> tuple[Document, str | None]:
        """``(document, token)``; a new empty document and ``None`` when there is no record yet."""
        with storage_errors("cannot read the refit record", self.store.uri(self.key)):
            data, token = self.store.read_versioned(self.key)
        if data is None:
            return new_record(self.target), None
        document = parse_document(data, self.store.uri(self.key))
        if document.get("format") != RECORD_FORMAT or not isinstance(document.get("attempts"), list):
            raise ArtifactError(f"{self.store.uri(self.key)} is not an olss_dist refit record")
        return document, token

    def replace(self, document: Document, token: str | None) -> bool:
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


def new_attempt(number: int, submission_id: str | None) -> Attempt:
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


def last_attempt(document: Document) -> Attempt | None:
    return document["attempts"][-1] if document["attempts"] else None


def failed_attempts(document: Document) -> list[Attempt]:
    return [a for a in document["attempts"] if a["status"] == AttemptStatus.FAILED]


def finished(attempt: Attempt, status: str, **fields: Any) -> Attempt:
    return {**attempt, "status": status, "finished_at": utc_now().isoformat(), **fields}


def with_attempt(document: Document, attempt: Attempt, max_attempts: int) -> Document:
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
