"""The distributed calibration job: prompts -> shards on Ray actors -> streaming merge -> parallel path
search -> on-policy fits and validated choice (``olss_dist.method.run_method`` on ``RayRolloutBackend``)
-> artifact.

``run_job(JobConfig(...))`` is the whole job; ``jobs/calibrate.py`` is a thin command line over it.
Inputs are checked before any work starts, and nothing is published unless the run succeeds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from olss_dist.artifacts import config_digest, publish_run, staging_uri
from olss_dist.core.calibration import Calibration
from olss_dist.distributed.backend import RayRolloutBackend, TeacherSummary
from olss_dist.distributed.checkpoints import ShardCheckpoints, check_writable
from olss_dist.distributed.cluster import cluster_cpus, cluster_gpus, connect, wait_for_gpus
from olss_dist.distributed.pool import WorkerPool, WorkerResources
from olss_dist.distributed.progress import ShardProgress
from olss_dist.distributed.state_store import KEEP_MODES
from olss_dist.distributed.worker import ModelSpec
from olss_dist.method.run import builtin_config, run_method
from olss_dist.core.plan import Plan
from olss_dist.prompts import PromptRecord, make_shards, prompts_digest, read_prompts, spec_prompt_records, split_validation
from olss_dist.spec import CalibrationSpec
from olss_dist.method.rollouts import TRAIN
from olss_dist.scheduler import OLSSScheduler
from olss_dist.core.teacher import trailing_timesteps

DEVICES = ("auto", "cuda", "cpu")


@dataclass
class JobConfig:
    """Everything the job needs; the fields that change results make up the published config.

    Attributes:
        output: registry root (local path or fsspec URI) the run is published under.
        model: model spec (``"embedded"``, ``"analytic"``, a diffusers folder, a hub id, a URI).
        prompts: Parquet or text file (path or URI); ``None`` uses the model's default prompts.
        steps: step counts K to plan, each at most ``teacher_steps``.
        teacher_steps: N, the teacher's step count.
        guidance_scale: classifier-free guidance scale.
        validation_fraction: share of prompts held out of the fit.
        seed: base seed of every derived per-prompt seed.
        shard_size: samples per shard (one batch on one worker).
        device: ``"cuda"`` (GPU actors, fails without GPUs), ``"cpu"`` or ``"auto"`` (GPUs when the cluster has any).
        num_workers: actors; ``None``: one per GPU, or the cluster's CPUs minus one for CPU workers.
        wait_for_gpus_s: with ``device="cuda"``, how long to wait for an autoscaler to add GPU nodes.
        keep_states: where workers keep teacher states for the on-policy rounds: ``"disk"`` (node-local
            files, survive worker restarts and job reruns on the node) or ``"memory"``.
        state_dir: node-local directory for ``"disk"`` states (``None``: the node's temp dir).
        address: Ray address; ``None`` uses ``RAY_ADDRESS`` or starts a local Ray.
        local_cpus: logical CPUs of a local Ray (``None``: the machine's).
        max_restarts: restarts of each actor after its process dies.
        keep_checkpoints: keep shard checkpoints after publishing (default: remove them).
        quiet: no progress output.
        storage_options: fsspec options for the output and prompt locations.
    """

    output: str = "olss-registry"
    model: str = "embedded"
    prompts: str | None = None
    steps: tuple[int, ...] = (5, 10, 20)
    teacher_steps: int = 1000
    guidance_scale: float = 7.5
    validation_fraction: float = 0.2
    seed: int = 0
    shard_size: int = 16
    device: str = "auto"
    num_workers: int | None = None
    wait_for_gpus_s: float = 0.0
    keep_states: str = "disk"
    state_dir: str | None = None
    address: str | None = None
    local_cpus: int | None = None
    max_restarts: int = 2
    keep_checkpoints: bool = False
    quiet: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobResult:
    """What a finished job produced.

    Attributes:
        uri: the published run.
        run_id: its id in the registry.
        plans: one plan per step count, in ``JobConfig.steps`` order.
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


def check_config(config: JobConfig) -> None:
    """Raise ValueError, naming the option, for anything that cannot run."""
    if config.teacher_steps < 1:
        raise ValueError(f"--teacher-steps must be at least 1, got {config.teacher_steps}")
    if not config.steps:
        raise ValueError("--steps needs at least one step count")
    for k in config.steps:
        if not 1 <= k <= config.teacher_steps:
            raise ValueError(f"--steps {k} must be between 1 and --teacher-steps ({config.teacher_steps})")
    if len(set(config.steps)) != len(config.steps):
        raise ValueError(f"--steps has repeated step counts: {list(config.steps)}")
    if config.device not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}, got {config.device!r}")
    if config.num_workers is not None and config.num_workers < 1:
        raise ValueError(f"--num-workers must be at least 1, got {config.num_workers}")
    if config.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {config.shard_size}")
    if not 0.0 < config.validation_fraction < 1.0:
        raise ValueError(
            f"--validation-fraction must be in (0, 1): held-out prompts choose the plan, got {config.validation_fraction}"
        )
    if config.keep_states not in KEEP_MODES:
        raise ValueError(f"--keep-states must be one of {KEEP_MODES}, got {config.keep_states!r}")


def resolve_device(config: JobConfig) -> str:
    """``"cuda"`` or ``"cpu"`` for the workers, from the request and the cluster's GPUs."""
    if config.device == "cpu":
        return "cpu"
    gpus = cluster_gpus()
    if config.device == "cuda" and gpus == 0:
        gpus = wait_for_gpus(config.num_workers or 1, config.wait_for_gpus_s)
        if gpus == 0:
            waited = f" after waiting {config.wait_for_gpus_s:g}s" if config.wait_for_gpus_s > 0 else ""
            raise ValueError(f"--device cuda was requested but the Ray cluster has no GPU{waited}")
    return "cuda" if gpus > 0 else "cpu"


def worker_layout(config: JobConfig, device: str) -> tuple[int, WorkerResources]:
    """Number of actors and each one's resources: one per GPU, or one CPU each leaving one for planning."""
    if device == "cuda":
        return config.num_workers or max(1, cluster_gpus()), WorkerResources(1, 1, config.max_restarts)
    spare = max(1, cluster_cpus() - 1)
    if config.num_workers is not None and config.num_workers > spare:
        raise ValueError(
            f"--num-workers {config.num_workers} CPU workers need {config.num_workers + 1} CPUs "
            f"(one stays free for planning tasks); the cluster has {cluster_cpus()}"
        )
    return config.num_workers or spare, WorkerResources(0, 1, config.max_restarts)


def statistics_config(config: JobConfig, device: str, model: dict[str, Any], fit: list[PromptRecord]) -> dict[str, Any]:
    """What a shard's statistics depend on, besides its own records: the key of the shard checkpoints."""
    return {
        "model_id": model["model_id"],
        "model_digest": model["model_digest"],
        "device": device,
        "guidance_scale": config.guidance_scale,
        "teacher_steps": config.teacher_steps,
        "shard_size": config.shard_size,
        "fit_prompts": [[r.index, r.prompt, r.negative_prompt, r.seed] for r in fit],
    }


def prompt_file_records(config: JobConfig) -> list[PromptRecord] | None:
    """The records of ``config.prompts``; None when the job uses the model's default prompts."""
    return spec_prompt_records(CalibrationSpec(config.model, config.prompts, config.steps, config.teacher_steps,
                                               config.guidance_scale, config.validation_fraction, config.seed),
                               config.storage_options)


def calibration_identity(config: JobConfig, file_records: list[PromptRecord] | None) -> dict[str, Any]:
    """The run's config in the registry: what its plans mean, not how they were computed.

    Its digest and the model digest identify a calibration: ``olss_dist.apps.refit`` computes it before
    submitting a job (and skips models already calibrated), the job publishes it. Execution details
    (device, workers, shard size, where states are kept) stay out. ``file_records`` are
    ``prompt_file_records(config)``; the model's default prompts (``None``) are identified by the model
    digest, so no model has to be loaded to know the identity.
    """
    return {
        "model": config.model,
        "prompts": config.prompts,
        "prompts_digest": None if file_records is None else prompts_digest(file_records),
        "steps": list(config.steps),
        "teacher_steps": config.teacher_steps,
        "guidance_scale": config.guidance_scale,
        "validation_fraction": config.validation_fraction,
        "seed": config.seed,
    }


def scheduler_config_bytes(plans: list[Plan], alphas_cumprod: np.ndarray, prediction_type: str) -> bytes:
    """``scheduler_config.json`` of an ``OLSSScheduler`` serving ``plans`` in the model's own pipeline: its
    UNet's ``prediction_type`` and its exact noise schedule ``alphas_cumprod (T,)`` (as trained betas)."""
    scheduler = OLSSScheduler.from_plans(plans, **builtin_config(alphas_cumprod), prediction_type=prediction_type)
    return scheduler.to_json_string().encode()


def run_job(config: JobConfig) -> JobResult:
    """Run the whole calibration job and publish its artifact.

    Raises:
        ValueError: bad options, no prompts, CUDA requested without GPUs, a model that does not load.
        ArtifactError: the output location is not writable or publishing failed.
        WorkerError: a worker failed while computing.
        WorkersLostError: workers kept dying.
    """
    started = time.monotonic()
    check_config(config)
    records = prompt_file_records(config)
    run_config = calibration_identity(config, records)
    check_writable(config.output, config.storage_options)
    connect(config.address, num_cpus=config.local_cpus)
    device = resolve_device(config)
    num_workers, resources = worker_layout(config, device)
    model_spec = ModelSpec(config.model, config.guidance_scale, device)
    pool = WorkerPool(model_spec, num_workers, config.teacher_steps, resources, config.keep_states, config.state_dir)
    try:
        workers = pool.describe()
        model = workers[0]
        if records is None:
            records = read_prompts(None, default_prompts=model["default_prompts"], base_seed=config.seed)
        fit, validation = split_validation(records, config.validation_fraction, base_seed=config.seed)
        statistics_digest = config_digest(statistics_config(config, device, model, fit))
        checkpoints = ShardCheckpoints(
            staging_uri(config.output, model["model_id"], model["model_digest"], statistics_digest),
            statistics_digest,
            config.storage_options,
        )
        train_shards = make_shards(fit, config.shard_size)
        progress = ShardProgress(len(train_shards), len(fit), quiet=config.quiet)
        progress.log(
            f"calibrating {model['model_id']} on {num_workers} {device} workers: {len(fit)} fit prompts, "
            f"{len(validation)} held out, shards of {config.shard_size}, N={config.teacher_steps}"
        )
        backend = RayRolloutBackend(
            pool,
            train_shards,
            make_shards(validation, config.shard_size),
            checkpoints,
            progress,
            planned_steps=config.steps,
            planner_parallelism=max(1, cluster_cpus() - num_workers),
        )
        alphas_cumprod = np.asarray(model["alphas_cumprod"], dtype=np.float64)
        timesteps = trailing_timesteps(config.teacher_steps, len(alphas_cumprod))
        plans_by_steps, calibration = run_method(backend, timesteps, alphas_cumprod, config.steps, progress=progress.log)
        plans = [plans_by_steps[k] for k in config.steps]
        report = job_report(config, model, workers, run_config, backend, calibration, plans, validation, started)
        published = publish_run(
            config.output,
            model_id=model["model_id"],
            model_digest=model["model_digest"],
            config=run_config,
            files={
                "scheduler_config.json": scheduler_config_bytes(plans, alphas_cumprod, model["prediction_type"]),
                "calibration.safetensors": calibration.to_bytes(),
                "plans.json": json.dumps([p.to_dict() for p in plans], indent=1).encode(),
                "report.json": json.dumps(report, indent=1).encode(),
            },
            extra_manifest={
                "teacher_steps": config.teacher_steps,
                "planned_step_counts": list(config.steps),
                "execution": {
                    "device": device,
                    "num_workers": num_workers,
                    "shard_size": config.shard_size,
                    "prompts_digest": prompts_digest(records),
                },
            },
            storage_options=config.storage_options,
        )
        backend.clear_states()
        if not config.keep_checkpoints:
            checkpoints.remove_all()
    finally:
        pool.shutdown()
    return JobResult(published.uri, published.run_id, plans, calibration, report, backend.summary)


def job_report(
    config: JobConfig,
    model: dict[str, Any],
    workers: list[dict[str, Any]],
    run_config: dict[str, Any],
    backend: RayRolloutBackend,
    calibration: Calibration,
    plans: list[Plan],
    validation: list[PromptRecord],
    started: float,
) -> dict[str, Any]:
    """``report.json``: model identity, config, statistics counts, workers and per-step errors of each plan."""
    summary = backend.summary
    return {
        "model": {"id": model["model_id"], "digest": model["model_digest"], "spec": config.model},
        "config": run_config,
        "statistics": {
            "num_samples": calibration.num_samples,
            "num_rows": calibration.num_rows,
            "num_shards": len(backend.shards[TRAIN]),
            "computed_shards": len(summary.computed_shards),
            "restored_shards": len(summary.restored_shards),
            "num_merges": backend.merge_tree.num_merges,
            "merge_seconds": backend.merge_tree.merge_seconds,
            "validation_teacher_runs": summary.validation_teacher_runs,
            "teacher_reruns": summary.teacher_runs,
            "worker_recoveries": summary.recoveries,
        },
        "validation_prompts": [r.index for r in validation],
        "workers": [{k: w[k] for k in ("worker", "device", "node_id", "gpu_ids")} for w in workers],
        "plans": [
            {
                "num_steps": p.num_steps,
                "nodes": p.nodes,
                "timesteps": p.timesteps.tolist(),
                "fit": p.fit,
                "spacing": p.spacing,
                "step_errors": p.step_errors.tolist(),
                "search_errors": p.search_errors.tolist(),
                "validation_rmse": min(c["rmse"] for c in p.candidates),
                "candidates": p.candidates,
            }
            for p in plans
        ],
        "seconds": time.monotonic() - started,
    }
