"""The evaluation as a report: markdown, rich terminal tables, JSON, and every output file in one directory.

``evaluate_and_report`` is what ``olss-dist evaluate`` runs: ``run.run_evaluation``, then the tables on
the console and the files (``write_outputs``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from olss_dist.apps.evaluate.plots import plot_errors, plot_grid
from olss_dist.apps.evaluate.results import SHIPPED_LABEL, Evaluation
from olss_dist.apps.evaluate.run import run_evaluation

DETAIL_HEADER = ("sampler", "calls", "first t", "RMSE", "× shipped", "median", "p90", "worst", "PSNR dB (mean ± std)")


def condition_text(conditions: dict[str, Any]) -> str:
    """``guidance 7.5, resolution 32x32, negative prompt '...'`` from an evaluation's ``conditions`` or a run's
    ``calibrated_conditions`` (lists of guidance scales and resolutions)."""
    guidance = conditions.get("guidance_scale", conditions.get("guidance_scales"))
    resolution = conditions.get("resolution", conditions.get("resolutions"))
    resolutions = [resolution] if resolution and not isinstance(resolution[0], (list, tuple)) else resolution or []
    parts = [f"guidance {', '.join(f'{g:g}' for g in (guidance if isinstance(guidance, list) else [guidance]))}"
             if guidance is not None else "guidance ?"]
    parts.append("resolution " + (", ".join(f"{r[0]}x{r[-1]}" for r in resolutions) if resolutions else "the model's own"))
    negative = conditions.get("negative_prompt", conditions.get("negative_prompts"))
    if negative:
        parts.append(f"negative prompt {negative!r}" if isinstance(negative, str) else f"negative prompts {negative!r}")
    return ", ".join(parts)


def format_number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3g}"


def detail_rows(evaluation: Evaluation, num_steps: int, psnr_spread: bool = True) -> list[list[str]]:
    """One row per sampler at ``num_steps`` steps (columns ``DETAIL_HEADER``); PSNR as mean ± std, or
    the mean alone without ``psnr_spread``."""
    shipped = next((r for r in evaluation.results if r.label == SHIPPED_LABEL and r.num_steps == num_steps), None)
    rows = []
    for r in (r for r in evaluation.results if r.num_steps == num_steps):
        if not r.metrics:
            rows.append([r.label, "-", "-", r.note, "-", "-", "-", "-", "-"])
            continue
        ratio = r.rmse / shipped.rmse if shipped is not None and shipped.metrics and shipped.rmse > 0 else float("nan")
        psnr = "-"
        if math.isfinite(r.metrics["psnr_mean"]):
            psnr = f"{r.metrics['psnr_mean']:.1f}" + (f" ± {r.metrics['psnr_std']:.1f}" if psnr_spread else "")
        rows.append([
            r.label + (f" [{r.note}]" if r.note else ""), str(r.model_calls), str(r.first_timestep),
            format_number(r.rmse), format_number(ratio), format_number(r.metrics["median"]),
            format_number(r.metrics["p90"]), format_number(r.metrics["worst"]), psnr,
        ])
    return rows


def summary_rows(evaluation: Evaluation) -> tuple[list[str], list[list[str]]]:
    """Header and rows of pooled RMSE per sampler (rows) and step count (columns); calls noted when not K."""
    header = ["sampler", *(f"{k} steps" for k in evaluation.steps)]
    rows = []
    for label in evaluation.labels():
        cells = [label]
        for k in evaluation.steps:
            r = evaluation.result(label, k)
            cell = format_number(r.rmse) if r.metrics else "cannot run"
            cells.append(cell + (f" ({r.model_calls} calls)" if r.model_calls not in (None, k) else ""))
        rows.append(cells)
    return header, rows


CONFIDENCE_HEADER = ("steps", "best built-in", "shipped / best (held out)", "interval", "calibration's claim", "shipped as")


def confidence_rows(evaluation: Evaluation) -> list[list[str]]:
    """One row per step count (``Evaluation.confidence``): the held-out ratio of the shipped plan's pooled RMSE
    to the best built-in's with its paired bootstrap interval, the validation ratio and interval the
    calibration recorded, and what it shipped (a fallback to a built-in says so)."""
    rows = []
    for record in evaluation.confidence():
        low, high = record["ratio_interval"]
        claim = record["calibration"] or {}
        claimed = claim.get("ratio_interval")
        rows.append([
            str(record["num_steps"]), record["best_builtin"], format_number(record["ratio"]),
            f"[{format_number(low)}, {format_number(high)}] ({record['confidence']:.0%}, {record['samples']} samples)",
            "-" if not claim or claim.get("ratio") is None else
            f"{format_number(claim['ratio'])} [{format_number(claimed[0])}, {format_number(claimed[1])}]",
            "-" if not claim else str(claim.get("shipped")) + (" (fallback)" if claim.get("fallback") else ""),
        ])
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(evaluation: Evaluation) -> str:
    """The evaluation as a markdown report: setup, pooled RMSE summary, one detail table per step count."""
    info = evaluation.info
    lines = [
        f"# Evaluation: {info['model']['id']}",
        "",
        f"- artifact: `{info['artifact']['uri']}`",
        f"- reference: {info['teacher_steps']}-step DDIM teacher; {info['num_samples']} held-out samples "
        f"(seed offset {info['seed_offset']}, prompts: {info['prompts']})",
        f"- metric: {info['metric']} ({format_number(info['teacher_peak_to_peak'])}); RMSE pools all samples, "
        "median / p90 / worst are per-sample RMSE",
        "",
        "## RMSE of the final latent (pooled over samples)",
        "",
        markdown_table(*summary_rows(evaluation)),
    ]
    if "conditions" in info:
        lines[5:5] = [f"- conditions: {condition_text(info['conditions'])}; calibrated under "
                      f"{condition_text(info.get('calibrated_conditions') or {})}"]
    confidence = confidence_rows(evaluation)
    if confidence:
        lines += ["", "## Confidence of the win (shipped over the best built-in, pooled RMSE; paired bootstrap)", "",
                  markdown_table(CONFIDENCE_HEADER, confidence)]
    for k in evaluation.steps:
        lines += ["", f"## {k} steps", "", markdown_table(DETAIL_HEADER, detail_rows(evaluation, k))]
    notes = sorted({f"{r.label} at {r.num_steps} steps: {r.note}" for r in evaluation.results if r.note})
    if notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


TERMINAL_DETAIL_HEADER = ("sampler", "calls", "t0", "RMSE", "×ship", "median", "p90", "worst", "PSNR")


def rich_tables(evaluation: Evaluation) -> list:
    """``rich.table.Table`` objects: the summary and one detail table per step count, laid out to stay
    readable in an 80-column terminal: columns separated by single spaces, numbers never cut (a long
    sampler name wraps when numbers need the room)."""
    from rich import box
    from rich.table import Table

    def table(header: Sequence[str], title: str) -> Table:
        compact = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0))
        compact.add_column(header[0])  # the only column that may wrap, so numbers are never cut
        for column in header[1:]:
            compact.add_column(column, justify="right", no_wrap=True)
        return compact

    header, rows = summary_rows(evaluation)
    tables = [table(header, "RMSE of the final latent vs the teacher (pooled)")]
    for row in rows:
        tables[0].add_row(*row)
    records = evaluation.confidence()
    if records:
        tables.append(table(("K", "best built-in", "ratio", "interval", "calibration's"),
                            f"shipped / best built-in pooled RMSE on {records[0]['samples']} held-out samples, "
                            f"{records[0]['confidence']:.0%} bootstrap interval; the calibration's validation ratio"))
        for record in records:
            claim = record["calibration"] or {}
            tables[-1].add_row(
                str(record["num_steps"]), record["best_builtin"], format_number(record["ratio"]),
                "[{}, {}]".format(*(format_number(v) for v in record["ratio_interval"])),
                format_number(claim.get("ratio")) + (" (fallback)" if claim.get("fallback") else ""))
    for k in evaluation.steps:
        tables.append(table(TERMINAL_DETAIL_HEADER, f"{k} steps (t0: first timestep; ×ship: RMSE over the shipped plan's; PSNR: mean, dB)"))
        for row in detail_rows(evaluation, k, psnr_spread=False):
            tables[-1].add_row(*row)
    return tables


def write_outputs(evaluation: Evaluation, directory: str | Path) -> list[Path]:
    """``evaluation.json``, ``evaluation.md``, ``errors.png`` and ``grid_<K>steps.png`` (image models) in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = directory / "evaluation.json", directory / "evaluation.md"
    json_path.write_text(json.dumps(evaluation.to_dict(), indent=1))
    markdown_path.write_text(to_markdown(evaluation))
    paths = [json_path, markdown_path, plot_errors(evaluation, directory / "errors.png")]
    for k, rows in evaluation.images.items():
        paths.append(plot_grid(rows, f"{k} steps", directory / f"grid_{k}steps.png"))
    return paths


def evaluate_and_report(output: str | Path, console=None, **options: Any) -> Evaluation:
    """``run_evaluation(**options)``, then the tables on ``console`` and every output file in ``output``."""
    from rich.console import Console

    console = console or Console()
    progress_console = Console(stderr=True)
    evaluation = run_evaluation(**options, progress=lambda line: progress_console.print(line, highlight=False))
    for table in rich_tables(evaluation):
        console.print(table)
    for path in write_outputs(evaluation, output):
        console.print(f"wrote {path}", highlight=False)
    return evaluation
