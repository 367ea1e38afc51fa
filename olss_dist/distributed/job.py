"""The distributed calibration job: prompts -> shards on Ray actors -> streaming merge -> parallel path
search -> on-policy fits and validated choice (``olss_dist.method.run_method`` on ``RayRolloutBackend``)
-> artifact.

``run_job(CalibrationSpec(...), ExecutionConfig(...))`` is the whole job; ``olss-dist calibrate`` (and
its wrapper ``jobs/calibrate.py``) is a thin command line over it. The spec and the execution config
are checked when they are built, the prompt file and the output location before any worker starts,
and nothing is published unless the run succeeds.

The job reserves its actors up front as one placement group (``cluster.reserve``) and runs its path
searches on those same actors, so it needs nothing else from the cluster: a second job on a cluster
too small for both waits (saying so) until the first releases its reservation, and neither starves.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from olss_dist.artifacts import ArtifactError, config_digest, publish_run, staging_uri
from olss_dist.artifacts.layout import CALIBRATION_FILE, PLANS_FILE, REPORT_FILE
from olss_dist.core.calibration import Calibration
from olss_dist.core.noise_process import NoiseProcess, VPProcess, noise_process_from_config
from olss_dist.core.plan import Plan
from olss_dist.core.scheduler_plans import scheduler_conditions
from olss_dist.distributed.backend import RayRolloutBackend, TeacherSummary
from olss_dist.distributed.checkpoints import ShardCheckpoints, check_writable
from olss_dist.distributed.cluster import ReservationTimeout, cluster_cpus, cluster_gpus, connect, reserve, wait_for_gpus
from olss_dist.distributed.job_report import calibrated_conditions, job_report, process_manifest, resolution_manifest
from olss_dist.distributed.pool import WorkerError, WorkerPool, WorkerResources, WorkersLostError
from olss_dist.distributed.progress import ShardProgress
from olss_dist.distributed.worker import ModelSpec
from olss_dist.method.choice import ChoiceRules
from olss_dist.method.run import builtin_config, run_method
from olss_dist.models.loading import check_local_model
from olss_dist.models.lora import check_local_lora
from olss_dist.prompts import PromptRecord, make_shards, prompts_digest, read_prompts, screen_records, spec_prompt_records, split_validation
from olss_dist.scheduler import OLSSScheduler
from olss_dist.spec import CalibrationSpec, ExecutionConfig, SpecError


@dataclass
class JobResult:
    """What a finished job produced.

    Attributes:
        uri: the published run.
        run_id: its id in the registry.
        plans: one plan per step count, in ``CalibrationSpec.steps`` order.
        calibration: the merged statistics of every fit shard.
        report: the JSON report that was published.
        summary: shards computed / restored, teacher reruns and worker recoveries of this run.
    """

    uri: str
    run_id: str
    plans: list[Plan]
    calibration: Calibration
    report: dict[str, Any]
    summary: TeacherSummary


def resolve_device(execution: ExecutionConfig) -> str:
    """``"cuda"`` or ``"cpu"`` for the workers, from the request and the cluster's GPUs."""
    if execution.device == "cpu":
        return "cpu"
    gpus = cluster_gpus()
    if execution.device == "cuda" and gpus == 0:
        gpus = wait_for_gpus(execution.num_workers or 1, execution.wait_for_gpus_s)
        if gpus == 0:
            waited = f" after waiting {execution.wait_for_gpus_s:g}s" if execution.wait_for_gpus_s > 0 else ""
            raise SpecError("device", f"cuda was requested but the Ray cluster has no GPU{waited}")
    return "cuda" if gpus > 0 else "cpu"


def worker_layout(execution: ExecutionConfig, device: str) -> tuple[int, WorkerResources]:
    """Number of actors and each one's resources: one per GPU, or one per CPU of the cluster.

    Every actor is one bundle of the job's reservation; the path search runs on the same actors after
    the teacher pass, so no CPU is kept aside for it and every core works during the teacher.
    """
    if device == "cuda":
        return execution.num_workers or max(1, cluster_gpus()), WorkerResources(1, 1, execution.max_restarts)
    cpus = max(1, cluster_cpus())
    if execution.num_workers is not None and execution.num_workers > cpus:
        raise SpecError(
            "num_workers", f"{execution.num_workers} CPU workers need {execution.num_workers} CPUs; the cluster has {cluster_cpus()}"
        )
    return execution.num_workers or cpus, WorkerResources(0, 1, execution.max_restarts)


def validation_shard_size(execution: ExecutionConfig, num_validation: int, num_workers: int) -> int:
    """Samples per validation shard: the shard size, or less so that every worker gets a share of the
    held-out prompts (their teacher and rollouts run on all workers at once)."""
    return max(1, min(execution.shard_size, math.ceil(num_validation / num_workers)))


def wait_log(message: str) -> None:
    """Where the reservation's waiting messages go: stderr, also with ``quiet`` (an operator needs to
    know why a job is not running)."""
    print(message, file=sys.stderr, flush=True)


def thin_evidence_warning(num_fit: int, num_validation: int, rules: ChoiceRules) -> str | None:
    """The line a job prints before its teacher runs when its prompts are too few for the choice to ship a fitted
    plan (``ChoiceRules.min_train_samples`` / ``min_validation_samples``): every step count will ship its best
    built-in in OLSS form, and the user can fix that before spending the teacher's model calls."""
    if not rules.thin_evidence(num_fit, num_validation):
        return None
    return (f"warning: {num_fit} fit and {num_validation} held-out prompts are too few for a fitted plan to ship (at "
            f"least {rules.min_train_samples} and {rules.min_validation_samples}): every step count will ship its best "
            f"built-in; pass more prompts (--prompts) or a larger --validation-fraction")


def statistics_config(
    spec: CalibrationSpec, execution: ExecutionConfig, device: str, model: dict[str, Any], fit: list[PromptRecord]
) -> dict[str, Any]:
    """What a shard's statistics depend on, besides its own records: the key of the shard checkpoints."""
    config = {
        "model_id": model["model_id"],
        "model_digest": model["model_digest"],
        "device": device,
        "guidance_scale": spec.guidance_scale,
        "teacher_steps": spec.teacher_steps,
        "shard_size": execution.shard_size,
        "fit_prompts": [[r.index, r.prompt, r.negative_prompt, r.seed] for r in fit],
    }
    if spec.resolution is not None:  # the latent shape and a dynamic shift follow it (other keys stay as they were)
        config["resolution"] = list(spec.resolution)
    if model.get("mu") is not None:
        config["mu"] = model["mu"]
    return config


def model_process(model: dict[str, Any]) -> NoiseProcess:
    """The noise process of the workers' model (``CalibrationWorker.describe``): VP from its exact
    ``alphas_cumprod``, flow matching from its scheduler config and ``mu``."""
    if model.get("noise_process", "vp") == "vp":
        return VPProcess(np.asarray(model["alphas_cumprod"], dtype=np.float64), model.get("scheduler_config"))
    return noise_process_from_config(model["scheduler_config"], mu=model.get("mu"))


def job_scheduler(
    plans: list[Plan],
    alphas_cumprod: np.ndarray | None,
    prediction_type: str,
    scheduler_config: dict[str, Any] | None = None,
    mu: float | None = None,
) -> OLSSScheduler:
    """The ``OLSSScheduler`` serving ``plans`` in the model's own pipeline.

    VP (``scheduler_config`` None): the UNet's ``prediction_type`` and its exact noise schedule
    ``alphas_cumprod (T,)`` (as trained betas). Flow matching: the model's own ``scheduler_config`` (its noise
    process: shift, dynamic shifting) and the ``mu`` it was calibrated at, which
    ``OLSSScheduler.from_plans(..., scheduler_config=..., mu=...)`` carries.
    """
    if scheduler_config is None:
        return OLSSScheduler.from_plans(plans, **builtin_config(alphas_cumprod), prediction_type=prediction_type)
    return OLSSScheduler.from_plans(plans, scheduler_config=dict(scheduler_config), mu=mu)


def scheduler_config_bytes(
    plans: list[Plan],
    alphas_cumprod: np.ndarray | None,
    prediction_type: str,
    scheduler_config: dict[str, Any] | None = None,
    mu: float | None = None,
) -> bytes:
    """``scheduler_config.json`` of ``job_scheduler(...)``: the model's noise process (the plans are its
    ``olss_plans.json``, ``OLSSScheduler.scheduler_files``)."""
    return job_scheduler(plans, alphas_cumprod, prediction_type, scheduler_config, mu).to_json_string().encode()


def model_scheduler_files(plans: list[Plan], model: dict[str, Any], conditions: dict[str, Any] | None = None) -> dict[str, bytes]:
    """``scheduler_config.json`` and ``olss_plans.json`` of ``job_scheduler`` for the workers' model
    (``CalibrationWorker.describe``), as ``OLSSScheduler.save_pretrained`` writes them; the plans file records the run's
    ``conditions`` (``calibrated_conditions``) with the model's latent shape, for the scheduler's warning outside them."""
    if model.get("noise_process", "vp") == "vp":
        scheduler = job_scheduler(plans, np.asarray(model["alphas_cumprod"], dtype=np.float64), model["prediction_type"])
    else:
        scheduler = job_scheduler(plans, None, model["prediction_type"], model["scheduler_config"], model.get("mu"))
    scheduler.calibrated_conditions = scheduler_conditions(conditions, model.get("latent_shape"))
    return scheduler.scheduler_files()


def run_job(spec: CalibrationSpec, execution: ExecutionConfig, *, quiet: bool = False) -> JobResult:
    """Run the whole calibration job and publish its artifact.

    Args:
        spec: what to calibrate; its ``identity`` (with the prompt file's digest) is the published config.
        execution: where and how it runs (output store, device, workers, shards, state keeping).
        quiet: no progress output.

    Raises:
        ValueError: (``SpecError`` naming the argument) no prompts, CUDA requested without GPUs, more CPU
            workers than the cluster holds, a model that does not load.
        ArtifactError: the output location is not writable or publishing failed.
        WorkerError: a worker failed while computing.
        WorkersLostError: workers kept dying.
    """
    started = time.monotonic()
    records = spec_prompt_records(spec, execution.storage_options)
    run_config = spec.identity(None if records is None else prompts_digest(records))
    check_writable(execution.output, execution.storage_options)
    check_local_model(spec.model, spec.resolution)  # a bad local folder or resolution fails here, not in a worker
    check_local_lora(spec.model, spec.lora)  # so does a local LoRA that does not fit a local base
    connect(execution.address, num_cpus=execution.local_cpus)
    device = resolve_device(execution)
    num_workers, resources = worker_layout(execution, device)
    model_spec = ModelSpec(spec.model, spec.guidance_scale, device, spec.resolution, spec.lora)
    # a unique name: the jobs of one driver (inline refits) share a Ray namespace, where a second group of the same
    # name fails to register
    group_name = f"olss-calibrate-{uuid.uuid4().hex[:8]}"
    reservation = reserve([resources.bundle()] * num_workers, execution.reserve_timeout_s, wait_log, name=group_name)
    try:
        pool = WorkerPool(
            model_spec, num_workers, spec.teacher_steps, resources, execution.keep_states, execution.state_dir,
            reservation=reservation,
        )  # fmt: skip
    except BaseException:
        reservation.release()
        raise
    try:
        workers = pool.describe()
        model = workers[0]
        if records is None:
            records = read_prompts(None, default_prompts=model["default_prompts"], base_seed=spec.seed)
        fit, validation = split_validation(records, spec.validation_fraction, base_seed=spec.seed)
        statistics_digest = config_digest(statistics_config(spec, execution, device, model, fit))
        checkpoints = ShardCheckpoints(
            staging_uri(execution.output, model["model_id"], model["model_digest"], statistics_digest),
            statistics_digest,
            execution.storage_options,
        )
        train_shards = make_shards(fit, execution.shard_size)
        screen = spec.screen_count(len(fit), model["screen_multiple"])
        choice_rules = ChoiceRules(screen_samples=screen)
        thin = thin_evidence_warning(len(fit), len(validation), choice_rules)
        if thin:
            wait_log(thin)  # before the teacher's hours, also with --quiet
        progress = ShardProgress(len(train_shards), len(fit), quiet=quiet)
        progress.log(
            f"calibrating {model['model_id']} on {num_workers} {device} workers: {len(fit)} fit prompts, "
            f"{len(validation)} held out, shards of {execution.shard_size}, N={spec.teacher_steps}"
        )
        backend = RayRolloutBackend(
            pool,
            train_shards,
            make_shards(validation, validation_shard_size(execution, len(validation), num_workers)),
            checkpoints,
            progress,
            planned_steps=spec.steps,
            planner_parallelism=num_workers,
            screen_shards=make_shards(screen_records(fit, screen, spec.seed),  # the tail screen's samples
                                      validation_shard_size(execution, screen, num_workers)) if screen else (),
        )
        process = model_process(model)
        plans_by_steps, calibration = run_method(backend, process, spec.teacher_steps, spec.steps, progress=progress.log,
                                                 start_strengths=spec.img2img_strengths,
                                                 choice_rules=choice_rules)
        plans = [plans_by_steps[k] for k in spec.steps]
        start_plans = served_start_plans(plans_by_steps)
        conditions = calibrated_conditions(spec, model, records)
        report = job_report(spec, model, workers, run_config, backend, calibration, plans, validation, started, conditions,
                            reservation)
        published = publish_run(
            execution.output,
            model_id=model["model_id"],
            model_digest=model["model_digest"],
            config=run_config,
            files={
                **model_scheduler_files(plans + start_plans, model, conditions),
                CALIBRATION_FILE: calibration.to_bytes(),
                PLANS_FILE: json.dumps([p.to_dict() for p in plans + start_plans], indent=1).encode(),
                REPORT_FILE: json.dumps(report, indent=1).encode(),
            },
            extra_manifest={
                **process_manifest(process),
                **resolution_manifest(model),
                "teacher_steps": spec.teacher_steps,
                "planned_step_counts": list(spec.steps),
                "calibrated_conditions": conditions,
                "execution": {
                    "device": device,
                    "num_workers": num_workers,
                    "shard_size": execution.shard_size,
                    "prompts_digest": prompts_digest(records),
                },
            },
            storage_options=execution.storage_options,
            adopt_unlisted=True,  # a rerun after a publish killed before its pointer moved publishes once
        )
        backend.clear_states()
        if not execution.keep_checkpoints:
            checkpoints.remove_all()
    finally:
        pool.shutdown()
        reservation.release()
    return JobResult(published.uri, published.run_id, plans, calibration, report, backend.summary)


def served_start_plans(plans_by_steps: dict[Any, Plan]) -> list[Plan]:
    """The start plans of ``run_method``'s result (keys ``(K, s)``), in key order, that the scheduler can serve:
    all of them once ``scheduler.plan_config`` writes ``start_step`` (contract C2); none before."""
    from olss_dist.scheduler import plan_config

    starts = [plans_by_steps[key] for key in sorted(k for k in plans_by_steps if isinstance(k, tuple))]
    return starts if starts and "start_step" in plan_config(starts[0]) else []


JOB_ERRORS = (ValueError, ArtifactError, WorkerError, WorkersLostError, OSError, ReservationTimeout)
"""What a job reports to its user as one error line: bad input, storage failures, failed or lost workers,
a cluster that could not hold the job in time."""


def run_job_from_command(spec: CalibrationSpec, execution: ExecutionConfig, *, quiet: bool = False) -> JobResult:
    """``run_job`` for a command line (``olss-dist calibrate``): on one of ``JOB_ERRORS`` Ray is shut down
    before the error propagates, which stops the worker logs Ray forwards, so the caller's error line is
    the last line of the output."""
    try:
        return run_job(spec, execution, quiet=quiet)
    except JOB_ERRORS:
        ray.shutdown()
        raise
