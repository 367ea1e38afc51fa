"""One refit of a registry: identify every model, decide and act for each, then (optionally) wait."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from olss_dist.apps.refit.identity import Target, identify
from olss_dist.apps.refit.outcomes import Outcome, Status, is_active_job, outcome_for
from olss_dist.apps.refit.records import shorten
from olss_dist.apps.refit.refitter import Action, InlineRunner, RefitOptions, Refitter
from olss_dist.apps.refit.registry import scan_registry
from olss_dist.artifacts import ArtifactError
from olss_dist.distributed.submission import SubmissionError
from olss_dist.spec import CalibrationSpec


def refit(
    registry: str,
    options: RefitOptions,
    defaults: CalibrationSpec = CalibrationSpec(),
    *,
    dry_run: bool = False,
    wait: bool = False,
    run_inline: InlineRunner | None = None,
) -> list[Outcome]:
    """One refit of every model in ``registry`` (see ``olss_dist.apps.refit``); one ``Outcome`` per model.

    Args:
        registry: a directory or bucket prefix of diffusers folders, or a YAML/JSON model list.
        options: how jobs run, and the store.
        defaults: the calibration of models the registry gives no settings for (its ``model`` is not used).
        dry_run: report what would run; write and start nothing.
        wait: after submitting, wait for this refit's Ray jobs and report how they ended.
        run_inline: replaces ``run_job`` for inline runs (tests count calls with it).

    Raises:
        ValueError, ArtifactError: the registry cannot be read (per-model problems are failed outcomes instead).
    """
    specs = scan_registry(registry, defaults, options.storage_options)
    with Refitter(options, dry_run=dry_run, run_inline=run_inline) as refitter:
        return refit_models(refitter, specs, wait=wait and not dry_run and not options.inline)


def refit_models(refitter: Refitter, specs: list[CalibrationSpec], wait: bool) -> list[Outcome]:
    """``refit`` after the registry scan: identify, decide and act for each model; then wait if asked."""
    outcomes: list[Outcome] = []
    targets: dict[int, Target] = {}
    for index, spec in enumerate(specs):
        try:
            targets[index] = identify(spec, refitter.options.storage_options)
        except (ValueError, OSError, ArtifactError) as error:
            outcomes.append(Outcome(spec.model, Status.FAILED, message=f"cannot identify the model: {shorten(str(error))}"))
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
    except (ArtifactError, SubmissionError, ValueError, OSError) as error:
        return outcome_for(target, Status.FAILED, message=shorten(f"{type(error).__name__}: {error}"))


def wait_for_jobs(refitter: Refitter, targets: dict[int, Target], outcomes: list[Outcome]) -> None:
    """Until no job of ``outcomes`` runs: wait for jobs to end, report them, and start queued models in the
    freed slots. Updates ``outcomes`` in place."""
    while True:
        active = {o.submission_id: i for i, o in enumerate(outcomes) if is_active_job(o)}
        if not active:
            return
        try:
            ended = refitter.jobs.wait_any(list(active))
        except SubmissionError as error:
            for i in active.values():
                outcomes[i] = replace(outcomes[i], status=Status.FAILED, message=f"lost the cluster while waiting: {shorten(str(error))}")
            return
        for submission_id in ended:
            index = active[submission_id]
            outcomes[index] = guarded(targets[index], refitter.refit, action=Action.REPORT)
        for index, outcome in enumerate(outcomes):
            if outcome.status == Status.QUEUED and refitter.has_free_slot(outcomes):
                outcomes[index] = guarded(targets[index], refitter.refit)
