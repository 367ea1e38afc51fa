"""Evaluating a run under the conditions users change: guidance scales, resolutions and a negative prompt.

A plan is calibrated under one guidance scale, one resolution and the prompts' negative prompts (the run
records them: ``calibrated_conditions`` in its manifest and ``report.json``); a pipeline's user changes all
three on every call. ``evaluate_conditions`` runs the whole evaluation once per condition (every guidance
scale with every resolution, the teacher rebuilt under each: the reference is the 1000-step teacher
*under the same condition*), writes each into its own folder, and summarises the shipped plan's pooled
RMSE over the best built-in's per condition and step count (``conditions.md`` / ``conditions.json``).
"""

from __future__ import annotations

import json
import math
from itertools import product
from pathlib import Path
from typing import Any, Sequence

from olss_dist.apps.evaluate.report import condition_text, evaluate_and_report, format_number, markdown_table
from olss_dist.apps.evaluate.results import Evaluation
from olss_dist.spec import SpecError, parse_resolution


def parse_guidance_scales(value: str | None, argument: str = "guidance_scales") -> list[float] | None:
    """Guidance scales from ``"3,7.5,12"`` (finite, distinct); None or blank stays None (the run's)."""
    if value is None or not value.strip():
        return None
    try:
        scales = [float(part) for part in value.split(",")]
    except ValueError:
        raise SpecError(argument, f"expected comma-separated numbers like 3,7.5,12, got {value!r}") from None
    if not all(math.isfinite(g) for g in scales):
        raise SpecError(argument, f"must be finite numbers, got {value!r}")
    if len(set(scales)) != len(scales):
        raise SpecError(argument, f"has repeated scales: {value!r}")
    return scales


def parse_resolutions(value: str | None, argument: str = "resolutions") -> list[tuple[int, int]] | None:
    """Resolutions from ``"32,64x64"`` (each ``parse_resolution``'s form); None or blank stays None (the run's)."""
    if value is None or not value.strip():
        return None
    resolutions = [parse_resolution(part.strip(), argument) for part in value.split(",")]
    if len(set(resolutions)) != len(resolutions):
        raise SpecError(argument, f"has repeated resolutions: {value!r}")
    return resolutions


def condition_name(guidance_scale: float | None, resolution: Sequence[int] | None, negative_prompt: str | None) -> str:
    """The folder of one condition: ``guidance_3``, ``guidance_3_64x64``, ``calibrated_negative`` ..."""
    parts = []
    if guidance_scale is not None:
        parts.append(f"guidance_{guidance_scale:g}".replace(".", "p"))
    if resolution is not None:
        parts.append(f"{resolution[0]}x{resolution[-1]}")
    if negative_prompt is not None:
        parts.append("negative")
    return "_".join(parts) or "calibrated"


def condition_rows(evaluations: dict[str, Evaluation]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per condition, per step count the shipped/best built-in ratio with its interval."""
    steps = sorted({k for e in evaluations.values() for k in e.steps})
    header = ["condition", *(f"{k} steps" for k in steps)]
    rows = []
    for evaluation in evaluations.values():
        by_steps = {record["num_steps"]: record for record in evaluation.confidence()}
        cells = [condition_text(evaluation.info.get("conditions", {}))]
        for k in steps:
            record = by_steps.get(k)
            cells.append("-" if record is None else
                         f"{format_number(record['ratio'])} [{format_number(record['ratio_interval'][0])}, "
                         f"{format_number(record['ratio_interval'][1])}]")
        rows.append(cells)
    return header, rows


def evaluate_conditions(
    output: str | Path,
    console=None,
    guidance_scales: Sequence[float] | None = None,
    resolutions: Sequence[Sequence[int]] | None = None,
    negative_prompt: str | None = None,
    **options: Any,
) -> dict[str, Evaluation]:
    """``evaluate_and_report`` under every (guidance scale, resolution) pair, with ``negative_prompt`` (None: the
    prompts' own), each into ``output/<condition_name>`` (into ``output`` itself when there is one condition);
    then ``conditions.md`` and ``conditions.json`` in ``output`` when there are several.

    Args:
        guidance_scales: scales to sample at (None: the run's).
        resolutions: ``(height, width)`` pixels to sample at (None: the run's); the model must take each.
        negative_prompt: one negative prompt for every held-out sample.
        options: ``run_evaluation``'s other arguments (model_spec, artifact, steps, num_samples, ...).

    Returns:
        ``{condition name: Evaluation}`` in the order run.
    """
    from rich.console import Console

    console = console or Console()
    output = Path(output)
    grid = list(product(list(guidance_scales or [None]), [None if r is None else tuple(r) for r in (resolutions or [None])]))
    evaluations: dict[str, Evaluation] = {}
    for guidance_scale, resolution in grid:
        name = condition_name(guidance_scale, resolution, negative_prompt)
        console.print(f"condition: {name}", highlight=False)
        evaluations[name] = evaluate_and_report(
            output / name if len(grid) > 1 else output, console, guidance_scale=guidance_scale,
            resolution=resolution, negative_prompt=negative_prompt, **options)
    if len(grid) > 1:
        header, rows = condition_rows(evaluations)
        table = markdown_table(header, rows)
        (output / "conditions.md").write_text(
            "# Shipped over the best built-in per condition (pooled RMSE, held out; paired bootstrap interval)\n\n"
            + table + "\n")
        (output / "conditions.json").write_text(json.dumps(
            {name: {"conditions": e.info.get("conditions"), "confidence": e.confidence()} for name, e in evaluations.items()},
            indent=1))
        console.print(table, highlight=False)
        console.print(f"wrote {output / 'conditions.md'}", highlight=False)
    return evaluations
