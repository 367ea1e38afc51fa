"""The plans an ``OLSSScheduler`` serves: config entries, their checks, and the plans file beside its config.

A plan entry is the JSON form of a ``Plan`` the scheduler needs: ``num_steps`` K, optional ``start_step`` s
(0: from pure noise; s > 0: an img2img / inpainting start, contract C2), ``timesteps`` (the K - s model
timesteps it calls the model at) and ``coefficients`` (K - s rows of K - s + 1 floats over
``[x_start, o_s, ..., o_{K-1}]``), plus informative ``nodes``, ``fit`` and ``spacing``. Entries are keyed
by ``(num_steps, start_step)``; a start plan's timesteps are the tail of the start-0 plan's for the same K.

The entries live in their own file, ``PLANS_FILE_NAME`` (``olss_plans.json``) beside ``scheduler_config.json``,
so that other schedulers built from an ``OLSSScheduler``'s config (``DDIMScheduler.from_config(olss.config)``)
never see them; configs written before that file existed hold them under ``"plans"`` and still load.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from olss_dist.core.plan import Plan
from olss_dist.core.teacher import check_model_timesteps, validate_timesteps

PLANS_FILE_NAME = "olss_plans.json"
PLANS_FORMAT = "olss_dist.scheduler_plans"
PLANS_FORMAT_VERSION = 1
INFORMATIVE_KEYS = ("nodes", "fit", "spacing")


def plan_config(plan: Plan) -> dict[str, Any]:
    """The part of a plan the scheduler needs, as plain JSON lists (``start_step`` only when it is not 0)."""
    entry = {"num_steps": plan.num_steps, "timesteps": plan.timesteps.tolist(), "coefficients": plan.coefficients.tolist(),
             "nodes": plan.nodes, "fit": plan.fit, "spacing": plan.spacing}
    start = int(getattr(plan, "start_step", 0))
    if start:
        entry["start_step"] = start
    return entry


def entry_key(entry: dict[str, Any]) -> tuple[int, int]:
    """``(num_steps, start_step)`` of a plan entry, checked: ``0 <= start_step < num_steps``."""
    try:
        steps, start = int(entry["num_steps"]), int(entry.get("start_step", 0))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"a plan entry needs an integer num_steps (and start_step), got keys {sorted(entry)}") from None
    if steps < 1 or not 0 <= start < steps:
        raise ValueError(f"plan entry with num_steps={steps}, start_step={start}: need 0 <= start_step < num_steps")
    return steps, start


def describe(key: tuple[int, int]) -> str:
    return f"plan for {key[0]} steps" + (f" from step {key[1]}" if key[1] else "")


def checked_entry(entry: dict[str, Any], num_train_timesteps: int, flow: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps (n,) int64 (VP) or float64 (flow), coefficients (n, n+1) float64)`` of an entry, n = K - s."""
    key = entry_key(entry)
    n = key[0] - key[1]
    timesteps = np.asarray(entry["timesteps"])
    coefficients = np.asarray(entry["coefficients"], dtype=np.float64)
    if timesteps.shape != (n,) or coefficients.shape != (n, n + 1):
        raise ValueError(f"{describe(key)} has timesteps {timesteps.shape} and coefficients {coefficients.shape}; "
                         f"expected ({n},) and ({n}, {n + 1})")
    try:
        if flow:  # float sigma * T, whole-valued ones included
            timesteps = check_model_timesteps(timesteps.astype(np.float64), num_train_timesteps)
        else:
            timesteps = validate_timesteps(timesteps, num_train_timesteps)
    except ValueError as error:
        raise ValueError(f"{describe(key)}: {error}") from None
    if not np.all(np.isfinite(coefficients)):
        raise ValueError(f"{describe(key)} has non-finite coefficients")
    return timesteps, coefficients


def plans_by_key(entries: Sequence[dict[str, Any]], num_train_timesteps: int, flow: bool
                 ) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """Every entry checked and keyed by ``(num_steps, start_step)``.

    Raises:
        ValueError: a malformed entry, two entries with one key, or a start plan whose timesteps are not the
            tail of the start-0 plan for its step count (or that has none).
    """
    plans: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for entry in entries:
        key = entry_key(entry)
        if key in plans:
            raise ValueError(f"plans must have distinct (num_steps, start_step); two for {key}")
        plans[key] = checked_entry(entry, num_train_timesteps, flow)
    for (steps, start), (timesteps, _) in plans.items():
        if start == 0:
            continue
        if (steps, 0) not in plans:
            raise ValueError(f"{describe((steps, start))} has no start-0 plan for {steps} steps to start from")
        if not np.array_equal(plans[steps, 0][0][start:], timesteps):
            raise ValueError(f"{describe((steps, start))}: timesteps are not those of the {steps}-step plan from step {start}")
    return plans


def json_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A plan entry as plain JSON values (arrays to lists), for ``plans_document``."""
    return {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in dict(entry).items()}


def plans_document(entries: Sequence[dict[str, Any]]) -> bytes:
    """The bytes of ``PLANS_FILE_NAME``: ``{"format", "format_version", "plans": [entry, ...]}``."""
    document = {"format": PLANS_FORMAT, "format_version": PLANS_FORMAT_VERSION, "plans": [json_entry(e) for e in entries]}
    return (json.dumps(document, allow_nan=False) + "\n").encode()


def read_plans_document(data: bytes, where: str) -> list[dict[str, Any]]:
    """The entries of a plans file's bytes; ValueError naming ``where`` when it is not one."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != PLANS_FORMAT:
        raise ValueError(f"{where}: not an OLSSScheduler plans file (format {PLANS_FORMAT!r})")
    if document.get("format_version") != PLANS_FORMAT_VERSION:
        raise ValueError(f"{where}: plans file format version {document.get('format_version')!r}, this olss_dist reads "
                         f"{PLANS_FORMAT_VERSION}")
    entries = document.get("plans")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{where}: 'plans' must be a list of plan entries")
    return entries
