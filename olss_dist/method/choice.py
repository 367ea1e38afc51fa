"""The robust choice of the shipped plan: a tail-aware criterion, a trust region, and a significance test.

Each step count's candidates (fitted OLSS plans and the process's built-in solvers in OLSS form) are
scored on the same held-out validation samples (``(V,)`` per-sample mean squared errors of the final
state against the teacher's). The plain argmin of the pooled RMSE breaks where users take the plan:
a fitted plan that is better on almost every sample but sends a few to another mode, or whose
coefficients grew into the thousands on few samples, wins the validation and loses on new samples.
``choose`` decides in four steps (``ChoiceRules`` holds every threshold):

1. **Thin evidence.** With fewer than ``min_train_samples`` fit samples or ``min_validation_samples``
   validation samples the best built-in ships (in OLSS form), and the record says why.
2. **Trust region.** A fitted candidate is eligible only if its largest ``|w|`` stays within
   ``coefficient_bound`` times the largest of the built-ins at this step count (the built-ins are the
   stable reference: their coefficients are those of a convergent ODE solver).
3. **Criterion.** Eligible candidates and built-ins are ranked by the upper end of the bootstrap
   interval of their pooled RMSE (``rmse_upper``): a candidate whose error comes from one or two
   blown-up samples has a wide bootstrap distribution and ranks below a steady one of equal RMSE.
   With a tail screen the certain error of each candidate's tail on the fresh samples is added in
   quadrature (``tails``), so a plan that sends a few of them to another mode ranks below a steady one.
4. **Significance.** A fitted winner ships only if the upper end of the paired bootstrap interval of
   its pooled RMSE over the best built-in's (``ratio_interval``, the same resampled samples for both)
   is below 1; otherwise the best built-in ships and the record says so.
5. **Tail screen** (``method.screen``, around ``choose``): a fitted winner must also not be worse than the
   best built-in on ``screen_samples`` fresh samples, scored against a fine-step reference sampler where the
   teacher would cost N calls each; one that fails is ``excluded`` and the choice is made again.

The bootstrap is seeded (``ChoiceRules.seed``): the same errors give the same choice on every backend.
Pure numpy; ``method.run.run_method`` calls ``choose`` once per step count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class ChoiceRules:
    """Thresholds of the robust choice.

    Attributes:
        confidence: two-sided coverage of the bootstrap intervals (0.9: the upper end is a one-sided 95 %
            bound).
        resamples: bootstrap resamples of the validation samples.
        min_train_samples: fewer fit samples than this ship the best built-in.
        min_validation_samples: fewer validation samples than this ship the best built-in.
        coefficient_bound: a fitted candidate's largest ``|w|`` may be at most this many times the largest
            ``|w|`` of the built-ins at the same step count.
        seed: of the bootstrap's random resampling.
        criterion: ``"robust"`` (the four steps above) or ``"rmse"``: the lowest pooled validation RMSE
            ships, with no trust region, evidence, significance rule or tail screen (the choice before these
            rules, kept for comparisons; the bootstrap interval is still recorded).
        screen_samples: fresh samples of the tail screen (``method.screen``) that a fitted winner must pass
            against the best built-in; 0: no screen; None: ``calibrate``'s default
            (``method.run.default_screen_count``: 1024, or the model's multiple of the train samples where
            that is more). ``calibrate`` draws them; the job's come from ``CalibrationSpec.screen_count``.
        screen_reference_steps: the screen's reference sampler's steps (at most N); fixed, so a K-step plan does
            not depend on which other step counts are calibrated with it. 100: a reference that itself sends
            samples to another mode charges every plan that follows the teacher there (analytic mixture, 8192
            screen samples: DEIS at 50 steps sent 5 to another mode, worst RMSE 1.43; at 100 none, worst 0.011).
        screen_bound_factor: the reference's distance to the teacher is bounded by this many times its worst
            per-sample RMSE on the validation samples.
        screen_teacher_samples: screen samples the teacher may adjudicate per step count (``method.screen``: where
            a screened fitted sampler and the reference part beyond that bound; N model calls each); None: one per
            256 screen samples (none below 256); 0: none.
    """

    confidence: float = 0.9
    resamples: int = 2000
    min_train_samples: int = 4
    min_validation_samples: int = 8
    coefficient_bound: float = 10.0
    seed: int = 0
    criterion: str = "robust"
    screen_samples: int | None = None
    screen_reference_steps: int = 100
    screen_bound_factor: float = 2.0
    screen_teacher_samples: int | None = None

    def __post_init__(self) -> None:
        if self.criterion not in ("robust", "rmse"):
            raise ValueError(f"criterion must be 'robust' or 'rmse', got {self.criterion!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.resamples < 10:
            raise ValueError(f"resamples must be at least 10, got {self.resamples}")
        if self.coefficient_bound <= 0:
            raise ValueError(f"coefficient_bound must be positive, got {self.coefficient_bound}")
        if (self.screen_samples or 0) < 0 or self.screen_reference_steps < 1 or not self.screen_bound_factor >= 1.0 \
                or (self.screen_teacher_samples or 0) < 0:
            raise ValueError(f"screen: samples >= 0, reference steps >= 1, bound factor >= 1 and teacher samples >= 0 "
                             f"needed, got {self.screen_samples}, {self.screen_reference_steps}, {self.screen_bound_factor}, "
                             f"{self.screen_teacher_samples}")

    def thin_evidence(self, num_train_samples: int, num_validation_samples: int) -> bool:
        """Whether these sample counts are too few for a fitted candidate to ship (step 1: the best built-in ships)."""
        return num_train_samples < self.min_train_samples or num_validation_samples < self.min_validation_samples

    @property
    def screens(self) -> bool:
        """Whether a fitted winner must pass the tail screen (robust criterion with screen samples)."""
        return self.criterion == "robust" and self.screen_samples != 0


DEFAULT_RULES = ChoiceRules()


@dataclass
class Choice:
    """What ``choose`` decided for one step count.

    Attributes:
        index: the shipped candidate's position in the list given to ``choose``.
        record: the JSON-able account (``report.json``, ``plans.json``, ``olss-dist show``): ``shipped``,
            ``best_builtin``, ``fallback`` (True when a built-in ships although fitted candidates were
            scored), ``reason``, ``criterion``, ``ratio`` (pooled validation RMSE of the shipped plan over
            the best built-in's; of the best fitted candidate when a built-in ships), ``ratio_interval``
            ``[low, high]`` and ``confidence``, sample counts, ``coefficient_limit`` and the ineligible
            candidates with their reasons.
    """

    index: int
    record: dict[str, Any]


def tail_seen_rate(num_samples: int, probability: float = 0.9) -> float:
    """The smallest rate of rare samples (e.g. mode switches) that ``num_samples`` validation samples contain
    at least once with ``probability``: ``1 - (1 - probability) ** (1 / num_samples)`` (0.9: 230 samples see
    a 1 % tail, 64 samples only a 3.5 % one). Rarer tails pass validation unseen."""
    return float(1.0 - (1.0 - probability) ** (1.0 / max(int(num_samples), 1)))


def bootstrap_indices(num_samples: int, rules: ChoiceRules) -> np.ndarray:
    """``(resamples, V)`` indices into the validation samples, drawn with replacement (seeded)."""
    rng = np.random.default_rng(rules.seed)
    return rng.integers(0, num_samples, size=(rules.resamples, num_samples))


def resampled_rmse(errors: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``(resamples,)`` pooled RMSE of per-sample MSE ``errors (V,)`` over each resample of ``indices``."""
    errors = np.asarray(errors, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sqrt(errors[indices].mean(axis=1))


def rmse_upper(errors: np.ndarray, rules: ChoiceRules, indices: np.ndarray | None = None) -> float:
    """The upper end of the ``rules.confidence`` bootstrap interval of the pooled RMSE of ``errors (V,)``
    (``indices``: the resamples, default ``bootstrap_indices(V, rules)``): the criterion of step 3."""
    indices = bootstrap_indices(len(errors), rules) if indices is None else indices
    return interval(resampled_rmse(errors, indices), rules.confidence)[1]


def interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of bootstrap ``values`` (non-finite values count as +inf)."""
    values = np.where(np.isfinite(values), values, np.inf)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail], method="higher")
    return float(low), float(high)


def ratio_interval(errors: np.ndarray, reference: np.ndarray, rules: ChoiceRules = DEFAULT_RULES,
                   indices: np.ndarray | None = None) -> tuple[float, tuple[float, float]]:
    """Pooled RMSE of ``errors`` over ``reference`` (per-sample MSE of the same samples, ``(V,)`` each) and
    its paired bootstrap interval: both resampled with the same indices, so samples hard for both cancel."""
    errors, reference = np.asarray(errors, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if errors.shape != reference.shape or errors.ndim != 1 or len(errors) == 0:
        raise ValueError(f"errors {errors.shape} and reference {reference.shape} must be the same non-empty (V,)")
    indices = bootstrap_indices(len(errors), rules) if indices is None else indices
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        point = float(np.sqrt(errors.mean() / reference.mean()))
        ratios = np.sqrt(errors[indices].mean(axis=1) / reference[indices].mean(axis=1))
    ratios = np.where(np.isnan(ratios), np.inf, ratios)
    return point if np.isfinite(point) else float("inf"), interval(ratios, rules.confidence)


def choose(
    names: Sequence[str],
    errors: Sequence[np.ndarray],
    builtin: Sequence[bool],
    max_abs_coefficients: Sequence[float],
    num_train_samples: int,
    rules: ChoiceRules = DEFAULT_RULES,
    excluded: dict[str, str] | None = None,
    tails: dict[str, float] | None = None,
) -> Choice:
    """The candidate to ship for one step count, and why.

    Args:
        names: candidate names (``method.run.Candidate.name``), in their fixed order (ties go to the earlier).
        errors: per candidate, ``(V,)`` per-sample mean squared error of the final state on the validation
            samples (the same samples, in the same order, for every candidate).
        builtin: per candidate, whether it is a built-in solver in OLSS form.
        max_abs_coefficients: per candidate, its largest ``|w|``.
        num_train_samples: the samples the fitted candidates were fitted on.
        rules: thresholds (``ChoiceRules``).
        excluded: fitted candidates ruled out before the choice, with the reason (``method.screen``: failed
            the tail screen); they are listed under ``ineligible``.
        tails: per candidate name, the certain RMSE of its tail on the screen samples (``method.screen``); the
            criterion becomes ``sqrt(rmse_upper^2 + tail^2)`` (a candidate without one counts 0: its criterion is
            then a lower bound of what the screen could make it).

    Returns:
        ``Choice``: the shipped index and the record of the decision.

    Raises:
        ValueError: no candidates, or lists of different lengths.
    """
    count = len(names)
    if count == 0 or not len(errors) == len(builtin) == len(max_abs_coefficients) == count:
        raise ValueError(f"choose needs one errors array, builtin flag and coefficient size per candidate, got "
                         f"{count} names, {len(errors)} errors, {len(builtin)} flags, {len(max_abs_coefficients)} sizes")
    errors = [np.asarray(e, dtype=np.float64) for e in errors]
    num_validation = len(errors[0])
    indices = bootstrap_indices(num_validation, rules)
    pooled = np.array([np.sqrt(e.mean()) if np.all(np.isfinite(e)) else np.inf for e in errors])
    upper = np.array([rmse_upper(e, rules, indices) for e in errors])
    if tails:
        upper = np.sqrt(upper**2 + np.array([tails.get(name, 0.0) for name in names]) ** 2)
    builtins = [i for i in range(count) if builtin[i]]
    fitted = [i for i in range(count) if not builtin[i]]
    record: dict[str, Any] = {
        "criterion": "rmse_upper" if rules.criterion == "robust" else "rmse",
        "confidence": rules.confidence,
        "train_samples": int(num_train_samples),
        "validation_samples": int(num_validation),
        "rules": asdict(rules),
        "tail_seen_rate": tail_seen_rate(num_validation, rules.confidence),
    }
    if not builtins:  # nothing stable to compare with (tests, or every built-in skipped): the criterion alone
        score = upper if rules.criterion == "robust" else pooled
        best = min(range(count), key=lambda i: (score[i], i))
        return Choice(best, {**record, "shipped": names[best], "best_builtin": None, "fallback": False,
                             "reason": "no built-in candidate to compare with: the criterion alone",
                             "ratio": None, "ratio_interval": None, "ineligible": {}})
    best_builtin = min(builtins, key=lambda i: (pooled[i], i))
    limit = rules.coefficient_bound * max(float(max_abs_coefficients[i]) for i in builtins)
    ineligible = {}
    for i in fitted:
        if excluded and names[i] in excluded:
            ineligible[names[i]] = excluded[names[i]]
        elif not np.all(np.isfinite(errors[i])):
            ineligible[names[i]] = "non-finite validation error"
        elif not float(max_abs_coefficients[i]) <= limit:
            ineligible[names[i]] = f"max |w| {float(max_abs_coefficients[i]):.3g} over the trust region {limit:.3g}"
    eligible = [i for i in fitted if names[i] not in ineligible]
    record.update({"best_builtin": names[best_builtin], "coefficient_limit": limit, "ineligible": ineligible})
    ranked = sorted(eligible + builtins, key=lambda i: (upper[i], i))
    best_fitted = next((i for i in ranked if not builtin[i]), None)
    if best_fitted is not None:
        ratio, (low, high) = ratio_interval(errors[best_fitted], errors[best_builtin], rules, indices)
        record.update({"best_fitted": names[best_fitted], "ratio": ratio, "ratio_interval": [low, high]})
    else:
        record.update({"best_fitted": None, "ratio": None, "ratio_interval": None})

    def ship(index: int, reason: str) -> Choice:
        fallback = bool(builtin[index]) and bool(fitted)
        return Choice(index, {**record, "shipped": names[index], "fallback": fallback, "reason": reason})

    if rules.criterion == "rmse":
        lowest = min(range(count), key=lambda i: (pooled[i], i))
        if not builtin[lowest]:
            ratio, (low, high) = ratio_interval(errors[lowest], errors[best_builtin], rules, indices)
            record.update({"best_fitted": names[lowest], "ratio": ratio, "ratio_interval": [low, high]})
        return ship(lowest, "lowest validation RMSE (criterion 'rmse')")
    if rules.thin_evidence(num_train_samples, num_validation):
        return ship(best_builtin, f"thin evidence: {num_train_samples} fit and {num_validation} validation samples "
                                  f"(at least {rules.min_train_samples} and {rules.min_validation_samples} needed)")
    if best_fitted is None:
        return ship(best_builtin, "no fitted candidate inside the trust region" if fitted else "only built-ins")
    if builtin[ranked[0]]:
        return ship(ranked[0], f"a built-in ranks first on the criterion (upper RMSE bound {upper[ranked[0]]:.3g})")
    if not record["ratio_interval"][1] < 1.0:
        return ship(best_builtin, f"no significant win: RMSE ratio {record['ratio']:.3g}, {rules.confidence:.0%} "
                                  f"interval [{low:.3g}, {high:.3g}] reaches 1")
    return ship(best_fitted, f"significant win: RMSE ratio {record['ratio']:.3g}, {rules.confidence:.0%} interval "
                             f"[{low:.3g}, {high:.3g}] below 1")
