"""What an evaluation produces: one ``SamplerResult`` per sampler and step count, gathered in an ``Evaluation``.

``run`` fills them; ``report`` and ``plots`` only read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from olss_dist.method.choice import DEFAULT_RULES, ChoiceRules, ratio_interval

SHIPPED_LABEL = "olss (shipped)"
"""The label of the run's own scheduler, the row every other sampler is compared with."""


@dataclass
class SamplerResult:
    """One sampler at one step count.

    Attributes:
        name, variant: the sampler (see ``samplers.Sampler``).
        num_steps: the step count asked for (``set_timesteps``).
        model_calls: model calls per sample (PNDM's Runge-Kutta warm-up makes more than ``num_steps``).
        metrics: ``run.sample_metrics``; empty when the sampler could not run.
        note: why it could not run, or a remark (``"diverged"``); ``""`` otherwise.
        first_timestep: the first timestep the sampler used (``None`` when it could not run).
        per_sample_rmse: ``(B,)`` RMSE of each sample, in the evaluation set's order (empty when it could not run).
    """

    name: str
    variant: str
    num_steps: int
    model_calls: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""
    first_timestep: int | None = None
    per_sample_rmse: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.variant})"

    @property
    def rmse(self) -> float:
        return self.metrics.get("rmse", float("nan"))


@dataclass
class Evaluation:
    """Results of every sampler at every step count, and what they were measured on.

    Attributes:
        results: one per sampler and step count, samplers in the order given.
        info: JSON-able description (model, artifact, teacher, samples, seeds, peak-to-peak range...).
        images: ``{row label: (n, H, W, 3) uint8}`` per step count for the sample grid (image models only).
    """

    results: list[SamplerResult]
    info: dict[str, Any]
    images: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return sorted({r.num_steps for r in self.results})

    def result(self, label: str, num_steps: int) -> SamplerResult:
        for r in self.results:
            if r.label == label and r.num_steps == num_steps:
                return r
        raise KeyError(f"no result for {label} at {num_steps} steps")

    def labels(self) -> list[str]:
        return list(dict.fromkeys(r.label for r in self.results))

    def confidence(self) -> list[dict[str, Any]]:
        """Per step count, the confidence of the shipped plan's win (``win_confidence``)."""
        return win_confidence(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; non-finite numbers become ``null``."""
        return {
            "info": self.info,
            "confidence": self.confidence(),
            "results": [
                {"sampler": r.name, "variant": r.variant, "num_steps": r.num_steps, "model_calls": r.model_calls,
                 "first_timestep": r.first_timestep, "note": r.note,
                 **{k: finite_or_none(v) for k, v in r.metrics.items()},
                 "per_sample_rmse": [finite_or_none(v) for v in r.per_sample_rmse]}
                for r in self.results
            ],
        }


def finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def win_confidence(evaluation: Evaluation, confidence: float = DEFAULT_RULES.confidence) -> list[dict[str, Any]]:
    """Per step count: the shipped plan's pooled RMSE over the best built-in's on these held-out samples
    (the built-in of lowest pooled RMSE among every built-in sampler that ran), with the paired bootstrap
    interval (``method.choice.ratio_interval``: both resampled over the same samples), and what the
    calibration claimed on its validation samples (``info.artifact.shipped[K].choice``), when it recorded it.

    Returns:
        one record per K with ``best_builtin`` (label), ``shipped_rmse``, ``best_builtin_rmse``, ``ratio``,
        ``ratio_interval`` ``[low, high]``, ``confidence``, ``samples`` and ``calibration`` (or None).
    """
    rules = ChoiceRules(confidence=confidence)
    shipped_choices = evaluation.info.get("artifact", {}).get("shipped", {})
    records = []
    for k in evaluation.steps:
        shipped = next((r for r in evaluation.results if r.label == SHIPPED_LABEL and r.num_steps == k), None)
        builtins = [r for r in evaluation.results if r.num_steps == k and not r.name.startswith("olss")
                    and r.metrics and math.isfinite(r.rmse) and r.per_sample_rmse]
        if shipped is None or not shipped.per_sample_rmse or not builtins:
            continue
        best = min(builtins, key=lambda r: r.rmse)
        mse = np.square(np.asarray(shipped.per_sample_rmse, dtype=np.float64))
        reference = np.square(np.asarray(best.per_sample_rmse, dtype=np.float64))
        ratio, (low, high) = ratio_interval(mse, reference, rules)
        claimed = (shipped_choices.get(k) or shipped_choices.get(str(k)) or {}).get("choice")
        records.append({
            "num_steps": k, "best_builtin": best.label, "shipped_rmse": finite_or_none(shipped.rmse),
            "best_builtin_rmse": finite_or_none(best.rmse), "ratio": finite_or_none(ratio),
            "ratio_interval": [finite_or_none(low), finite_or_none(high)], "confidence": rules.confidence,
            "samples": len(mse),
            "calibration": None if not claimed else {
                key: claimed.get(key) for key in ("shipped", "best_builtin", "ratio", "ratio_interval", "fallback", "reason")},
        })
    return records
