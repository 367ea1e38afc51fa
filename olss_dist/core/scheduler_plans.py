"""The plans an ``OLSSScheduler`` serves: config entries, their checks, and the plans file beside its config.

A plan entry is the JSON form of a ``Plan`` the scheduler needs: ``num_steps`` K, optional ``start_step`` s
(0: from pure noise; s > 0: an img2img / inpainting start, contract C2), ``timesteps`` (the K - s model
timesteps it calls the model at) and ``coefficients`` (K - s rows of K - s + 1 floats over
``[x_start, o_s, ..., o_{K-1}]``), plus informative ``nodes``, ``fit`` and ``spacing``. Entries are keyed
by ``(num_steps, start_step)``; a start plan's timesteps are the tail of the start-0 plan's for the same K.

The entries live in their own file, ``PLANS_FILE_NAME`` (``olss_plans.json``) beside ``scheduler_config.json``,
so that other schedulers built from an ``OLSSScheduler``'s config (``DDIMScheduler.from_config(olss.config)``)
never see them; configs written before that file existed hold them under ``"plans"`` and still load.

The same file records what the plans were calibrated under (``"calibrated_conditions"``: the run's guidance
scales, resolutions and negative prompts, plus the ``latent_shapes`` the scheduler can check), so a run folder
pulled by URI carries it. Only the latent shape reaches a diffusers scheduler (``step``'s sample);
``ConditionsCheck`` words the one warning outside it. Files without the entry (older runs) never warn.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from olss_dist.core.plan import Plan
from olss_dist.core.teacher import check_model_timesteps, validate_timesteps

PLANS_FILE_NAME = "olss_plans.json"
PLANS_FORMAT = "olss_dist.scheduler_plans"
PLANS_FORMAT_VERSION = 1
INFORMATIVE_KEYS = ("nodes", "fit", "spacing")
CONDITIONS_KEY = "calibrated_conditions"


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


def plans_document(entries: Sequence[dict[str, Any]], conditions: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of ``PLANS_FILE_NAME``: ``{"format", "format_version", "plans": [entry, ...]}``, and
    ``"calibrated_conditions"`` when ``conditions`` are given (``check_conditions``)."""
    document = {"format": PLANS_FORMAT, "format_version": PLANS_FORMAT_VERSION, "plans": [json_entry(e) for e in entries]}
    if conditions is not None:
        document[CONDITIONS_KEY] = check_conditions(conditions)
    return (json.dumps(document, allow_nan=False) + "\n").encode()


def read_plans_document(data: bytes, where: str) -> list[dict[str, Any]]:
    """The entries of a plans file's bytes; ValueError naming ``where`` when it is not one."""
    return read_plans_file(data, where)[0]


def read_plans_file(data: bytes, where: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``(entries, calibrated conditions or None)`` of a plans file's bytes; ValueError naming ``where`` when it is not one."""
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
    try:
        conditions = None if document.get(CONDITIONS_KEY) is None else check_conditions(document[CONDITIONS_KEY])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return entries, conditions


def scheduler_conditions(conditions: Mapping[str, Any] | None, latent_shape: Sequence[int] | None) -> dict[str, Any] | None:
    """What the scheduler files record: a run's ``calibrated_conditions`` (manifest form: ``guidance_scales``,
    ``resolutions`` ``[[height, width]]`` or None, ``negative_prompts``) with ``latent_shapes``
    ``[list(latent_shape)]`` (the per-sample latent shape ``step`` sees); None without conditions."""
    if conditions is None:
        return None
    shapes = None if latent_shape is None else [[int(v) for v in latent_shape]]
    return check_conditions({**dict(conditions), "latent_shapes": shapes})


def check_conditions(conditions: Mapping[str, Any]) -> dict[str, Any]:
    """``conditions`` as plain JSON, checked: ``latent_shapes`` and ``resolutions`` lists of lists of positive
    ints (or None), ``guidance_scales`` numbers, ``negative_prompts`` strings; other keys are kept as given.

    Raises:
        ValueError: one line naming the key that is malformed.
    """
    if not isinstance(conditions, Mapping):
        raise ValueError(f"{CONDITIONS_KEY} must be an object, got {type(conditions).__name__}")
    checked = dict(conditions)
    for key in ("latent_shapes", "resolutions"):
        shapes = checked.get(key)
        if shapes is not None and not (isinstance(shapes, list) and all(
                isinstance(shape, list) and shape and all(type(v) is int and v > 0 for v in shape) for shape in shapes)):
            raise ValueError(f"{CONDITIONS_KEY}.{key} must be a list of lists of positive integers, got {shapes!r}")
    scales = checked.get("guidance_scales")
    if scales is not None and not (isinstance(scales, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in scales)):
        raise ValueError(f"{CONDITIONS_KEY}.guidance_scales must be a list of numbers, got {scales!r}")
    negatives = checked.get("negative_prompts")
    if negatives is not None and not (isinstance(negatives, list) and all(isinstance(v, str) for v in negatives)):
        raise ValueError(f"{CONDITIONS_KEY}.negative_prompts must be a list of strings, got {negatives!r}")
    return checked


class ConditionsCheck:
    """Says once per latent shape when a sample's latents are not those the plans were calibrated at.

    Args:
        conditions: ``check_conditions``' form (``latent_shapes``, ``resolutions``), or None (nothing recorded:
            never warns).
    """

    def __init__(self, conditions: Mapping[str, Any] | None):
        self.conditions = None if conditions is None else dict(conditions)
        self.latent_shapes = [tuple(shape) for shape in (conditions or {}).get("latent_shapes") or []]
        resolutions = [tuple(r) for r in (conditions or {}).get("resolutions") or []]
        self.resolutions = resolutions if len(resolutions) == len(self.latent_shapes) else [None] * len(self.latent_shapes)
        self.seen: set[tuple[int, ...]] = set(self.latent_shapes)

    def message(self, latent_shape: Sequence[int]) -> str | None:
        """The warning line the first time ``latent_shape`` (one sample's, ``sample.shape[1:]``) is seen outside the
        calibrated latent shapes; None otherwise (within them, already said, or nothing recorded)."""
        shape = tuple(int(v) for v in latent_shape)
        if not self.latent_shapes or shape in self.seen:
            return None
        self.seen.add(shape)
        calibrated = "; ".join(describe_latents(s, r) for s, r in zip(self.latent_shapes, self.resolutions))
        return (f"OLSSScheduler: latents {describe_latents(shape, self.pixels(shape))} are not the resolution the plans "
                f"were calibrated at ({calibrated}); the plans are replayed as calibrated and may lose their margin over "
                "the built-in solvers (calibrate at this resolution: --resolution)")

    def pixels(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """``(height, width)`` pixels of spatial latents ``(C, h, w)`` at the calibrated VAE scale, where it is whole."""
        if len(shape) != 3 or self.resolutions[0] is None or len(self.latent_shapes[0]) != 3:
            return None
        (height, width), (_, h, w) = self.resolutions[0], self.latent_shapes[0]
        if height % h or width % w or height // h != width // w:
            return None
        return shape[1] * (height // h), shape[2] * (width // w)


def describe_latents(shape: Sequence[int], resolution: Sequence[int] | None) -> str:
    """``4x16x16 (64x64 pixels)``, or the latent shape alone without a resolution."""
    latents = "x".join(map(str, shape))
    return latents if resolution is None else f"{latents} ({resolution[0]}x{resolution[-1]} pixels)"
