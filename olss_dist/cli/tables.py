"""Terminal tables of the ``olss-dist`` commands: runs, plans, candidates, listings and refit outcomes.

Every table fits 80 columns without cutting a number (long names wrap instead).
"""

from __future__ import annotations

import json
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from olss_dist.apps.refit import Outcome
from olss_dist.artifacts import ModelListing, RunRef


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "-" if value is None else str(value)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def key_value_table(title: str, values: dict[str, Any]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in _flatten(values).items():
        table.add_row(key, _format_value(value))
    return table


def run_table(run: RunRef) -> Table:
    manifest = run.manifest
    versions = ", ".join(f"{name} {version}" for name, version in manifest["versions"].items() if version)
    return key_value_table(
        "run",
        {
            "uri": run.uri,
            "run id": manifest["run_id"],
            "created at": manifest["created_at"],
            "model": manifest["model"]["id"],
            "model digest": manifest["model"]["digest"],
            "config digest": manifest["config_digest"],
            "teacher steps": manifest["teacher_steps"],
            "planned step counts": ", ".join(map(str, manifest["planned_step_counts"])),
            "versions": versions,
            "manifest sha256": run.manifest_sha256,
        },
    )


def files_table(run: RunRef) -> Table:
    table = Table(title="files", title_justify="left")
    table.add_column("name")
    table.add_column("bytes", justify="right")
    table.add_column("sha256")
    for name, entry in run.manifest["files"].items():
        table.add_row(name, str(entry["size"]), entry["sha256"][:16] + "…")
    return table


def _is_plan(value: Any) -> bool:
    return isinstance(value, dict) and {"timesteps", "coefficients"} <= set(value)


def find_plans(document: Any) -> list[dict[str, Any]]:
    """Plan dicts (``Plan.to_dict()`` or a scheduler config entry) in a JSON document: the document itself,
    a list of plans, or the list under its ``"plans"`` key."""
    if _is_plan(document):
        return [document]
    if isinstance(document, dict):
        document = document.get("plans", [])
    return [item for item in document if _is_plan(item)] if isinstance(document, list) else []


def steps_label(plan: dict[str, Any]) -> str:
    """``"10"``, or ``"10 from 5"`` for a plan that starts mid-way (img2img: ``start_step``)."""
    start = int(plan.get("start_step") or 0)
    return f"{len(plan['timesteps']) + start} from {start}" if start else str(len(plan["timesteps"]))


def plans_table(plans: list[dict[str, Any]]) -> Table:
    """One row per plan, in the order given."""
    table = Table(title="plans", title_justify="left")
    for column in ("steps", "fit", "spacing", "timesteps", "max step error", "max |coefficient|"):
        table.add_column(column, overflow="fold")
    for plan in plans:
        errors = [e for e in plan.get("step_errors") or [] if e is not None]
        largest = max((abs(c) for row in plan["coefficients"] for c in row), default=0.0)
        table.add_row(
            steps_label(plan),
            str(plan.get("fit", "-")),
            str(plan.get("spacing", "-")),
            " ".join(map(str, plan["timesteps"])),
            _format_value(max(errors)) if errors else "-",
            _format_value(largest),
        )
    return table


def step_errors_table(plans: list[dict[str, Any]]) -> Table | None:
    """Mean squared error per latent element of each step: one row per step, one column per plan in the
    order given (so a 20-step plan stays readable at 80 columns); None when no plan has them."""
    columns = [(steps_label(plan), plan["step_errors"]) for plan in plans if plan.get("step_errors")]
    if not columns:
        return None
    table = Table(title="step errors (MSE per element)", title_justify="left")
    table.add_column("step", justify="right")
    for steps, _ in columns:
        table.add_column(f"{steps} steps", justify="right")
    for index in range(max(len(errors) for _, errors in columns)):
        cells = (_format_value(errors[index]) if index < len(errors) else "" for _, errors in columns)
        table.add_row(str(index + 1), *cells)
    return table


CANDIDATE_SCORES = ("rmse", "median", "p90", "worst")


def candidates_table(plan: dict[str, Any]) -> Table | None:
    """A plan's validated candidates (``method.candidate_record``), best first: validation RMSE of the
    final latent, its per-sample median / p90 / worst and the largest coefficient. The shipped one
    (``plan["choice"]["shipped"]``; in runs made before the robust choice, the first of lowest RMSE) is
    starred and bold. None when the plan kept no candidates."""
    candidates = sorted(plan.get("candidates") or [], key=lambda candidate: candidate["rmse"])
    if not candidates:
        return None
    table = Table(
        title=f"validation, {len(plan['timesteps'])} steps: final-latent RMSE vs teacher (* shipped)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("candidate", no_wrap=True)
    for column in ("ridge", *CANDIDATE_SCORES, "max|w|"):
        table.add_column(column, justify="right", no_wrap=True, min_width=5)
    shipped = (plan.get("choice") or {}).get("shipped", candidates[0]["name"])
    for candidate in candidates:
        ridge = candidate.get("ridge")
        chosen = candidate["name"] == shipped
        table.add_row(
            candidate["name"].partition("/ridge=")[0] + (" *" if chosen else ""),
            f"{ridge:.0e}" if ridge else "-",
            *(_format_short(candidate.get(score)) for score in (*CANDIDATE_SCORES, "max_abs_coefficient")),
            style="bold" if chosen else None,
        )
    return table


def choice_table(plans: list[dict[str, Any]]):
    """Why each plan ships (``Plan.choice``, ``method.choice``): a table of the shipped candidate, the best
    built-in, and the pooled validation RMSE ratio of the best fitted candidate over that built-in with its
    bootstrap interval; then one line per step count with the reason (a fallback to the built-in says why)
    and the sample counts, and one per img2img start of that plan (``start_line``). A ``rich`` renderable; None
    when no plan records a choice."""
    from rich.console import Group
    from rich.text import Text

    choices = {len(plan["timesteps"]): plan["choice"] for plan in plans if plan.get("choice") and not plan.get("start_step")}
    starts = {len(plan["timesteps"]): plan.get("starts") or [] for plan in plans if not plan.get("start_step")}
    if not choices:
        return None
    confidence = next((c["confidence"] for c in choices.values() if c.get("confidence")), None)
    level = f"{confidence:.0%} " if confidence else ""
    table = Table(title=f"choice: fitted / built-in validation RMSE, {level}bootstrap interval",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("K", "ships", "built-in", "ratio", "interval"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("K", "ratio") else "left")
    lines = []
    for steps, choice in sorted(choices.items()):
        bounds = choice.get("ratio_interval")
        interval = "-" if not bounds else f"[{_format_short(bounds[0])}, {_format_short(bounds[1])}]"
        shipped = escape(str(choice.get("shipped", "-"))) + (" (fallback)" if choice.get("fallback") else "")
        builtin = str(choice.get("best_builtin") or "-").removeprefix("builtin/")
        table.add_row(str(steps), shipped, escape(builtin), _format_short(choice.get("ratio")), interval)
        lines.append(Text(f"{steps} steps: {choice.get('reason', '')} ({choice.get('train_samples', '?')} fit / "
                          f"{choice.get('validation_samples', '?')} validation samples)"))
        screen = choice.get("tail_screen")
        if screen:
            failed = [name for name, entry in screen.get("screened", {}).items() if entry.get("passed") is False]
            lines.append(Text(f"  tail screen: {screen.get('samples')} fresh samples against {screen.get('reference')} at "
                              f"{screen.get('reference_steps')} steps (sees a {screen.get('tail_seen_rate', 0):.2%} tail); "
                              f"{len(screen.get('screened', {}))} screened" + (f", failed: {', '.join(failed)}" if failed else "")
                              + (f"; the teacher on {screen['teacher_samples']} of them (the reference wrong on "
                                 f"{screen.get('reference_beyond_bound', 0)})" if "teacher_samples" in screen else "")))
        lines.extend(Text(f"  {start_line(start)}") for start in starts.get(steps, []))
    return Group(table, *lines, Text(""))


def start_line(start: dict[str, Any]) -> str:
    """One start record of a K-step plan (``Plan.starts``): what serves it and why."""
    where = f"from step {start.get('start_step')} (strength {start.get('strength')})"
    if start.get("serves") == "plan":
        served = f"start plan {start.get('fit')}"
    elif start.get("serves") == "builtin":
        served = f"built-in {start.get('builtin', '?')} in OLSS form (best fit {start.get('fit', '?')})"
    else:
        served = f"built-in fallback (best {start.get('best_builtin', '?')})"
    reason = (start.get("choice") or {}).get("reason") or start.get("reason") or ""
    return f"{where}: {served}" + (f": {reason}" if reason else "")


def _format_short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else _format_value(value)


def report_tables(name: str, document: Any) -> list[Table]:
    """A quality report: its scalars as key/value rows, each list of records as its own table. Plan
    summaries (records with ``timesteps``) are left out: ``show`` renders plans and their candidates."""
    if not isinstance(document, dict):
        return [key_value_table(name, {"value": document})]
    scalars = {key: value for key, value in document.items() if not _is_record_list(value)}
    tables = [key_value_table(name, scalars)] if scalars else []
    for key, records in document.items():
        if _is_record_list(records) and not all("timesteps" in record for record in records):
            table = Table(title=f"{name}: {key}", title_justify="left")
            columns = list(dict.fromkeys(column for record in records for column in record))
            for column in columns:
                table.add_column(str(column), overflow="fold")
            for record in records:
                table.add_row(*(_format_value(record.get(column)) for column in columns))
            tables.append(table)
    return tables


def _is_record_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def model_runs_table(model: ModelListing) -> Table:
    """One model's complete runs, oldest first. The run id starts with its UTC creation time; digests are
    shown by their first 12 hex digits (``show`` prints them whole)."""
    table = Table(title=f"{model.model_id}  ({model.uri})", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("model digest", "run id", "steps", "config digest", "latest"):
        table.add_column(column, no_wrap=True)
    for run in model.runs:
        table.add_row(
            run.model_digest[:12],
            run.run_id,
            ",".join(map(str, run.planned_step_counts)),
            run.config_digest[:12],
            "latest" if run.run_id == model.latest_run_id else "",
        )
    return table



REFIT_STATUS_STYLES = {"failed": "bold red", "succeeded": "green", "submitted": "cyan", "running": "yellow", "queued": "yellow"}


def refit_table(title: str, outcomes: list[Outcome]) -> Table:
    """One row per model of a refit: status, attempt, digests, run URI or reason."""
    table = Table(title=title, title_justify="left")
    for column in ("model", "status", "attempt", "model digest", "config digest", "run / job / reason"):
        table.add_column(column, overflow="fold", no_wrap=column == "status")
    for outcome in outcomes:
        detail = " ".join(part for part in (outcome.run_uri, outcome.submission_id, outcome.message) if part)
        table.add_row(
            escape(outcome.model),
            f"[{REFIT_STATUS_STYLES[outcome.status]}]{outcome.status}[/]" if outcome.status in REFIT_STATUS_STYLES else outcome.status,
            _format_value(outcome.attempt),
            (outcome.model_digest or "-")[:12],
            (outcome.config_digest or "-")[:12],
            escape(detail),
        )
    return table


