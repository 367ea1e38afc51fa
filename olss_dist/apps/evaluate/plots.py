"""Figures of an evaluation (matplotlib, headless): errors against model calls, and decoded sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from olss_dist.apps.evaluate.results import SHIPPED_LABEL, Evaluation
from olss_dist.core.builtin import BUILTIN_SOLVERS

SOLVER_COLORS = {
    "olss": "black", "olss-paper": "tab:gray", "olss-onpolicy": "tab:purple", "ddim": "tab:blue", "pndm": "tab:orange",
    "dpmsolver++": "tab:green", "unipc": "tab:red", "euler": "tab:brown", "deis": "tab:pink",
}
VARIANT_STYLES = {"shipped": "-", "trailing": "-", "config": "--", "same nodes": ":", "uniform": "-."}


def plot_errors(evaluation: Evaluation, path: str | Path) -> Path:
    """PNG of pooled and median per-sample RMSE against model calls per sample (log-log), a line per sampler.

    The y range ends at twice the worst built-in error; samplers above it are labelled "off scale".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {}
    for label in evaluation.labels():
        points = sorted((r.model_calls, r.rmse, r.metrics["median"]) for r in evaluation.results
                        if r.label == label and r.metrics and math.isfinite(r.rmse))
        if points:
            lines[label] = (next(r for r in evaluation.results if r.label == label), points)
    builtin_errors = [p[1] for first, points in lines.values() if first.name in BUILTIN_SOLVERS for p in points]
    top = 2.0 * max(builtin_errors) if builtin_errors else None
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharex=True)
    for label, (first, points) in lines.items():
        off_scale = top is not None and max(p[1] for p in points) > top
        style = dict(color=SOLVER_COLORS.get(first.name), linestyle=VARIANT_STYLES.get(first.variant, "-"),
                     linewidth=3 if label == SHIPPED_LABEL else 1.4, marker="o", markersize=4,
                     label=label + (" (off scale)" if off_scale else ""))
        calls = [p[0] for p in points]
        axes[0].plot(calls, [p[1] for p in points], **style)
        axes[1].plot(calls, [p[2] for p in points], **style)
    ticks = list(evaluation.steps)
    for calls in sorted({r.model_calls for r in evaluation.results if r.model_calls}):
        if all(abs(math.log(calls / tick)) > 0.15 for tick in ticks):  # unreadable when closer
            ticks.append(calls)
    for axis, title in zip(axes, ("pooled RMSE", "median per-sample RMSE")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        if top is not None:
            axis.set_ylim(top=top)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("model calls per sample (= steps, except PNDM)")
        axis.set_ylabel(f"{title} vs teacher")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle(f"{evaluation.info['model']['id']}: {evaluation.info['num_samples']} held-out samples, "
                    f"{evaluation.info['teacher_steps']}-step teacher")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_grid(rows: dict[str, np.ndarray], title: str, path: str | Path) -> Path:
    """PNG grid of decoded samples: one row per sampler (``(n, H, W, 3)`` uint8), samples across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(images) for images in rows.values())
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns + 2.2, 1.3 * len(rows)), squeeze=False)
    for axis_row, (label, images) in zip(axes, rows.items()):
        for axis, image in zip(axis_row, images):
            axis.imshow(image, interpolation="nearest")
        for axis in axis_row:
            axis.set_xticks([])
            axis.set_yticks([])
        axis_row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / len(rows)))
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

