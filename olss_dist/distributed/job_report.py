"""What a calibration job writes about itself: ``report.json`` (``job_report``) and the manifest's fields on the
model's noise process, resolution and calibrated conditions. Pure functions of the job's results."""

from __future__ import annotations

import time
from typing import Any

from olss_dist.core.calibration import Calibration
from olss_dist.core.noise_process import NoiseProcess
from olss_dist.core.plan import Plan
from olss_dist.distributed.backend import RayRolloutBackend
from olss_dist.distributed.cluster import Reservation, describe_bundles
from olss_dist.method.rollouts import TRAIN
from olss_dist.prompts import PromptRecord
from olss_dist.spec import CalibrationSpec


def process_manifest(process: NoiseProcess) -> dict[str, Any]:
    """What the manifest says about a flow model's noise process (its kind and the mu it calibrated at);
    nothing for VP models, whose manifests stay as they were."""
    if process.kind == "vp":
        return {}
    return {"noise_process": {"kind": process.kind, "mu": getattr(process, "mu", None)}}


def resolution_manifest(model: dict[str, Any]) -> dict[str, Any]:
    """``{"resolution": [height, width]}``: the pixels an image model was calibrated at (stated or its own);
    nothing for models without images (analytic)."""
    return {} if model.get("resolution") is None else {"resolution": list(model["resolution"])}


def calibrated_conditions(spec: CalibrationSpec, model: dict[str, Any], records: list[PromptRecord]) -> dict[str, Any]:
    """What the plans were calibrated under, for warnings outside it (manifest and ``report.json``):
    ``guidance_scales`` (one today), ``resolutions`` (``[[height, width]]``; ``None`` for models without
    images) and ``negative_prompts`` (the distinct non-empty ones of the prompts, at most 16; ``[]``: none)."""
    negatives = sorted({r.negative_prompt for r in records if r.negative_prompt})
    resolution = model.get("resolution")
    return {
        "guidance_scales": [spec.guidance_scale],
        "resolutions": None if resolution is None else [list(resolution)],
        "negative_prompts": negatives[:16],
    }


def job_report(
    spec: CalibrationSpec,
    model: dict[str, Any],
    workers: list[dict[str, Any]],
    run_config: dict[str, Any],
    backend: RayRolloutBackend,
    calibration: Calibration,
    plans: list[Plan],
    validation: list[PromptRecord],
    started: float,
    conditions: dict[str, Any] | None = None,
    reservation: Reservation | None = None,
) -> dict[str, Any]:
    """``report.json``: model identity, config, statistics counts, workers and per-step errors of each plan; the
    cluster reservation (``waited_s`` for it, ``granted_unix``) and ``reported_unix``: the job held the cluster from
    the one through the other at least, so two jobs' holds can be told apart."""
    summary = backend.summary
    return {
        "model": {
            "id": model["model_id"], "digest": model["model_digest"], "spec": spec.model, **resolution_manifest(model),
            **({} if spec.lora is None else {"lora": spec.lora}),
        },
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
        **({} if conditions is None else {"calibrated_conditions": conditions}),
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
                "validation_rmse": next((c["rmse"] for c in p.candidates if c["name"] == p.choice.get("shipped")),
                                        min(c["rmse"] for c in p.candidates)),
                "candidates": p.candidates,
                **({"choice": p.choice} if p.choice else {}),
                **({"starts": p.starts} if p.starts else {}),
            }
            for p in plans
        ],
        **({} if reservation is None else {"reservation": {
            "bundles": describe_bundles(reservation.bundles), "waited_s": reservation.waited_s,
            "granted_unix": reservation.granted_unix}}),
        "seconds": time.monotonic() - started,
        "reported_unix": time.time(),
    }
