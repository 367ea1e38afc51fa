"""Reading a published calibration run for the evaluation: its shipped scheduler, plans, statistics and seeds.

The run is resolved and fetched through ``olss_dist.artifacts`` (every file verified against the
manifest); its files are found by the names ``artifacts.layout`` gives them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olss_dist.artifacts.layout import CALIBRATION_FILE, PLANS_FILE, SCHEDULER_CONFIG_FILE, SCHEDULER_PLANS_FILE
from olss_dist.core.calibration import Calibration
from olss_dist.core.plan import Plan
from olss_dist.core.scheduler_plans import read_plans_document
from olss_dist.scheduler import OLSSScheduler


@dataclass
class CalibratedRun:
    """A published calibration run, as the evaluation reads it.

    Attributes:
        uri: where it was resolved from.
        directory: its verified local copy.
        manifest: its validated manifest (model id and digest, config, teacher steps).
        scheduler_config: the shipped ``OLSSScheduler`` config (``SCHEDULER_CONFIG_FILE``) with its plans under
            ``"plans"`` (from ``SCHEDULER_PLANS_FILE``; runs published before that file hold them there already).
        plans: ``{K: Plan}`` from ``PLANS_FILE`` (nodes, fit, candidates).
        calibration: the teacher statistics (``CALIBRATION_FILE``), ``None`` when the run has none.
    """

    uri: str
    directory: Path
    manifest: dict[str, Any]
    scheduler_config: dict[str, Any]
    plans: dict[int, Plan]
    calibration: Calibration | None

    @property
    def planned_steps(self) -> list[int]:
        return sorted(self.plans)


def load_calibrated_run(uri: str, storage_options: dict[str, Any] | None = None) -> CalibratedRun:
    """Fetch and verify the run behind ``uri`` (run, model or ``latest.json`` URI, or a local run folder).

    Raises:
        ArtifactError: no complete run there, or a file that does not match its manifest.
        ValueError: the run lacks its scheduler config or plans, or they disagree.
    """
    from olss_dist.artifacts import fetch_run, resolve_run

    run = resolve_run(uri, storage_options)
    # Fetch by the resolved run's own URI: it is immutable, so the copy is of the very run whose validated
    # manifest we hold (a model URI's latest.json may move in between).
    directory = fetch_run(run.uri, storage_options)
    manifest = run.manifest
    for name in (SCHEDULER_CONFIG_FILE, PLANS_FILE):
        if name not in manifest["files"]:
            raise ValueError(f"run {uri} has no {name}; it holds {sorted(manifest['files'])}")
    scheduler_config = json.loads((directory / SCHEDULER_CONFIG_FILE).read_text())
    if scheduler_config.get("_class_name") != OLSSScheduler.__name__:
        raise ValueError(f"run {uri}: {SCHEDULER_CONFIG_FILE} is not an OLSSScheduler config")
    if "plans" not in scheduler_config and SCHEDULER_PLANS_FILE in manifest["files"]:
        scheduler_config["plans"] = read_plans_document((directory / SCHEDULER_PLANS_FILE).read_bytes(),
                                                        f"run {uri}: {SCHEDULER_PLANS_FILE}")
    plans = {}
    for entry in json.loads((directory / PLANS_FILE).read_text()):
        plan = Plan.from_dict(entry)
        if not plan.start_step:  # start plans (img2img) are served by the scheduler; evaluate compares from noise
            plans[plan.num_steps] = plan
    shipped = {int(p["num_steps"]): p["timesteps"] for p in scheduler_config.get("plans", []) if not p.get("start_step")}
    for k, plan in plans.items():
        if shipped.get(k) != plan.timesteps.tolist():
            raise ValueError(f"run {uri}: {PLANS_FILE} and {SCHEDULER_CONFIG_FILE} disagree on the {k}-step timesteps")
    calibration = Calibration.load(directory / CALIBRATION_FILE) if CALIBRATION_FILE in manifest["files"] else None
    return CalibratedRun(uri, directory, manifest, scheduler_config, plans, calibration)


def calibration_seeds(run: CalibratedRun, model, storage_options: dict[str, Any] | None = None) -> list[int] | None:
    """The seeds the run was calibrated on (fit and validation), or ``None`` when they cannot be rebuilt.

    The job derives them from its prompt source and base seed (``olss_dist.prompts.read_prompts``).
    """
    from olss_dist.prompts import read_prompts

    config = run.manifest.get("config", {})
    if "seed" not in config:
        return None
    try:
        records = read_prompts(config.get("prompts"), default_prompts=model.default_prompts(),
                               base_seed=int(config["seed"]), storage_options=storage_options)
    except (ValueError, NotImplementedError, OSError):
        return None
    return [r.seed for r in records]
