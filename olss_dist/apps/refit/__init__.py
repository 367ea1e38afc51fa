"""Scheduled refits: calibrate every model of a registry once per (weights, calibration spec).

A refit scans a model registry (a directory or bucket prefix of diffusers folders, or a YAML/JSON list of
model URIs with per-model settings: ``registry``), gives each model a ``CalibrationSpec``, computes its
content digest and the spec's identity (``identity``: the config a job of that spec publishes), and for
each pair (``refitter``):

* a complete run is already in the store -> ``skipped``;
* an attempt is still running (a Ray job, or an inline run whose heartbeat is fresh) -> ``running``;
* otherwise it claims the next attempt in the pair's refit record (``records``) and starts it: a Ray job
  submitted through the Jobs API (``olss_dist.distributed.submission``; ``submitted``) or ``run_job`` in
  this process (``succeeded`` / ``failed``). Failed attempts are retried by later refits, up to
  ``max_attempts``.

The refit record ``<root>/<model-slug>/<model-digest>/_refit/<config-digest>.json`` lists the attempts and
changes only by compare-and-swap, so two refits racing claim each attempt once; a job's submission id
``olss-refit-<model digest[:12]>-<config digest[:12]>-<attempt>`` is derived from the pair, so even a lost
record cannot start a duplicate Ray job. ``run.refit`` is one refit of a whole registry. See ``docs/refit.md``.
"""

from olss_dist.apps.refit.identity import Target, identify, model_digest, target_of
from olss_dist.apps.refit.outcomes import Outcome, Status, any_failed, is_active_job, outcome_for
from olss_dist.apps.refit.records import AttemptStatus, RefitRecord, new_attempt, record_key, shorten, with_attempt
from olss_dist.apps.refit.refitter import (
    DEFAULT_LEASE_S,
    DEFAULT_MAX_ATTEMPTS,
    Action,
    AttemptState,
    RefitOptions,
    Refitter,
    job_arguments,
    job_package,
)
from olss_dist.apps.refit.registry import (
    REGISTRY_KEYS,
    is_registry_file,
    local_or_uri,
    parse_registry_document,
    read_registry_file,
    scan_registry,
)
from olss_dist.apps.refit.run import refit, refit_models, wait_for_jobs

__all__ = [
    "DEFAULT_LEASE_S", "DEFAULT_MAX_ATTEMPTS", "REGISTRY_KEYS", "Action", "AttemptState", "AttemptStatus",
    "Outcome", "RefitOptions", "RefitRecord", "Refitter", "Status", "Target", "any_failed", "identify",
    "is_active_job", "is_registry_file", "job_arguments", "job_package", "local_or_uri", "model_digest",
    "new_attempt", "outcome_for", "parse_registry_document", "read_registry_file", "record_key", "refit",
    "refit_models", "scan_registry", "shorten", "target_of", "wait_for_jobs", "with_attempt",
]  # fmt: skip
