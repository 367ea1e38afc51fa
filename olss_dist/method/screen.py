"""The tail screen: fresh samples that a fitted winner must not lose on, scored without the teacher.

The validation samples choose among candidates, but 16 to 128 of them rarely contain a tail of 1 %: a plan
that is better on almost every sample and sends one in a hundred to another mode of the data passes them
(``method.choice.tail_seen_rate``). Seeing such a tail needs hundreds of samples, and the N-step teacher on
each costs N model calls. The screen avoids the teacher: on ``S`` fresh samples (new initial noise with the
calibration's own conditioning, the ``SCREEN`` split) it runs a **reference** sampler, the process's built-in
solver at ``R = screen_reference_steps`` steps (100; at most N) that is closest to the teacher on the
validation samples, and compares each candidate's final state with the reference's.

The comparison is exact up to the reference's own error. Write ``r_c(s)`` for a sampler's per-sample RMSE
against the reference and ``d(s)`` for the reference's against the teacher, bounded by
``w = screen_bound_factor * max_validation d``. By the triangle inequality the sampler's error against the
teacher is at least ``g_c(s) = max(r_c(s) - w, 0)``: error that is certain, zero on samples where the sampler
stays within ``w`` of the reference and of the order of the data's scale where it switched mode. ``tail(c)``
(``TailScreen.tail``) is the RMSE such samples contribute, with the rate of the ``k`` seen taken at its Poisson
upper bound: a blow-up seen once may be five times as common as one in ``S``.

**Adjudication.** ``d(s)`` is bounded on the validation samples only. On a fresh sample the reference can switch
mode itself, and the built-ins it is one of tend to switch with it (flow mixture: every flow built-in at 100 and
200 steps on the same 6 of 10240 samples): ``r_c(s)`` is then the reference's error, charged to a sampler that
follows the teacher, while a built-in that follows the reference goes free. So the teacher runs on the samples
a screened fitted sampler puts beyond ``w``, farthest first, up to ``screen_teacher_samples`` per step count
(default one per 256 screen samples, none below 256: N model calls each, next to the ``R`` of every screen sample;
``RolloutBackend.teacher_differences``), and there every sampler's ``r`` is its RMSE against the teacher itself.
Samplers measured before a sample was adjudicated are measured again there: while one step count is chosen their
rollouts stay open, so that costs the teacher differences on the new samples only, not K calls on every sample.
The record counts the adjudicated samples and those where the reference was beyond ``w``.

The screen enters the choice twice:

- **Criterion.** Each candidate's ``tail`` is added in quadrature to its validation bound
  (``method.choice.choose(tails=)``): a plan that sends a few fresh samples to another mode ranks below a
  steady one. Candidates are screened lazily, best first, until the winner has been screened.
- **Failure.** A fitted winner whose ``tail`` exceeds ``upper(b)``, the larger of the best built-in's upper
  bootstrap bound of pooled validation RMSE (against the teacher itself) and ``tail(b)``, is certainly worse on
  the fresh samples than the built-in plausibly is: it is excluded and the choice is made again, until a fitted
  plan passes or a built-in ships.

Cost: ``R`` model calls per screen sample once, plus ``K`` per screened candidate (the winner and the best
built-in; a failed winner's successor; again when samples were adjudicated after it), plus ``N`` per adjudicated
sample, a small fraction of the teacher's N when ``S`` is a few times the
validation size. Pure method code: the samples live in the backend (``RolloutBackend.final_differences``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from olss_dist.core.builtin import ProcessBuiltins
from olss_dist.method.choice import (
    Choice,
    ChoiceRules,
    choose,
    rmse_upper,
    tail_seen_rate,
)
from olss_dist.method.rollouts import SCREEN, VALIDATION, RolloutBackend, run_to_end


TEACHER_SOLVER_RMSE = 1e-4
"""Worst validation RMSE at which the teacher's own solver (``solvers.names[0]``), run on the teacher's whole grid
(reference steps = N, small test teachers), counts as the teacher itself: the other built-ins are not scored
(at N steps they differ from the teacher by discretisation, orders above this)."""


class TailScreen:
    """The screen of one calibration: its reference rollout and every screened sampler's distances to it.

    Args:
        backend: holds the ``SCREEN`` split (``backend.has_split(SCREEN)``).
        solvers: the process's built-ins; the reference is one of them.
        timesteps: ``(N,)`` the teacher's timesteps.
        rules: ``screen_reference_steps``, ``screen_bound_factor`` and ``confidence``.
        progress: called with a line per stage.
    """

    def __init__(self, backend: RolloutBackend, solvers: ProcessBuiltins, timesteps: np.ndarray,
                 rules: ChoiceRules, progress: Callable[[str], None] | None = None):
        self.backend, self.rules = backend, rules
        self.progress = progress or (lambda message: None)
        self.distances: dict[str, tuple[np.ndarray, int]] = {}  # by 'name@K': distances, how many samples were judged then
        self.open: dict[str, int] = {}  # by 'name@K': rollouts kept while one step count is chosen (``choose``)
        worst: dict[str, float] = {}
        plans = {}
        # R steps, or the teacher's own grid (N) where no built-in's R timesteps lie on it (small N)
        for steps in dict.fromkeys((min(len(timesteps), rules.screen_reference_steps), len(timesteps))):
            for name in solvers.names:
                if steps == len(timesteps) and worst.get(solvers.names[0], np.inf) <= TEACHER_SOLVER_RMSE:
                    break  # on the teacher's own grid its own solver (DDIM / FlowMatch Euler) is the teacher
                try:
                    plans[name] = solvers.plan(name, steps, timesteps)
                except ValueError:
                    continue
                handle = run_to_end(backend, VALIDATION, plans[name].coefficients, plans[name].timesteps)
                try:
                    errors = backend.final_errors(handle)
                finally:
                    backend.close(handle)
                worst[name] = float(np.sqrt(errors.max())) if np.all(np.isfinite(errors)) else float("inf")
            if worst and np.isfinite(min(worst.values())):
                break
        else:
            raise ValueError("tail screen: no built-in solver gives a finite reference")
        name = min(worst, key=lambda n: (worst[n], n))
        self.bound = rules.screen_bound_factor * worst[name]
        plan = plans[name]
        self.handle = run_to_end(backend, SCREEN, plan.coefficients, plan.timesteps)
        self.samples = len(backend.final_differences(self.handle, self.handle))
        self.judged: list[int] = []  # screen samples adjudicated by the teacher, in the order they were
        self.judged_by_steps: dict[int, int] = {}  # how many of them each step count's samplers asked for
        self.reference_errors: list[float] = []  # the reference's RMSE against the teacher on each of them
        self.record: dict[str, Any] = {
            "reference": f"builtin/{name}", "reference_steps": len(plan.timesteps),
            "reference_worst_validation_rmse": worst[name], "bound": self.bound,
        }
        self.progress(f"tail screen: reference {name} at {len(plan.timesteps)} steps, worst validation RMSE {worst[name]:.3g}")

    def distance(self, name: str, coefficients: np.ndarray, step_timesteps: Sequence[int | float],
                 adjudicate: bool = False, keep: bool = False) -> np.ndarray:
        """``(S,)`` per-sample RMSE of a sampler's final state against the reference's, and against the teacher's
        on the adjudicated samples (cached by name and K; measured again when samples were adjudicated since).

        ``adjudicate`` (fitted samplers, in ``choose``): the first time the sampler is measured, its samples beyond
        the bound that no teacher ran on yet are adjudicated, farthest first, while the step count's
        ``teacher_budget`` allows (``adjudicate``). ``keep``: the sampler's rollout stays open (until ``release``),
        so samples adjudicated later cost only their teacher differences, not K calls on every screen sample."""
        key = f"{name}@{len(step_timesteps)}"
        cached = self.distances.get(key)
        if cached is not None and cached[1] < len(self.judged) and key in self.open:
            distance, new = cached[0].copy(), self.judged[cached[1]:]
            distance[new] = np.sqrt(self.backend.teacher_differences(self.open[key], new))
            self.distances[key] = cached = (distance, len(self.judged))
        elif cached is None or cached[1] < len(self.judged):
            handle = run_to_end(self.backend, SCREEN, coefficients, step_timesteps)
            try:
                distance = np.sqrt(self.backend.final_differences(handle, self.handle))
                if cached is None and adjudicate:
                    self.adjudicate(distance, len(step_timesteps))
                if self.judged:
                    distance[self.judged] = np.sqrt(self.backend.teacher_differences(handle, self.judged))
                self.distances[key] = cached = (distance, len(self.judged))
            finally:
                if keep:
                    self.open[key] = handle
                else:
                    self.backend.close(handle)
        return cached[0]

    def release(self) -> None:
        """Close the rollouts ``distance(keep=True)`` kept open."""
        while self.open:
            self.backend.close(self.open.popitem()[1])

    @property
    def teacher_budget(self) -> int:
        """Samples the teacher may adjudicate per step count: ``ChoiceRules.screen_teacher_samples``, or one per 256
        whole screen samples: 40 of the analytic mixtures' 10240; none of a network's 2 per fit prompt below 128 fit
        prompts. The reference's own switches were 6 in 10240 on the flow mixture: a screen of a hundred samples
        rarely holds one, and each adjudication is N model calls."""
        stated = self.rules.screen_teacher_samples
        return self.samples // 256 if stated is None else stated

    def adjudicate(self, distance: np.ndarray, num_steps: int) -> None:
        """Run the teacher on the samples where ``distance`` (a K-step sampler's, to the reference) exceeds the bound
        and no teacher ran yet, farthest first, up to ``teacher_budget`` for that K.

        The bound is the reference's error on the validation samples; on a fresh sample the reference itself may
        switch mode with the sampler's own built-ins (flow mixture: every built-in at 100 and 200 steps on the
        same 6 of 10240 samples). There the distance is the reference's error, not the sampler's: on an
        adjudicated sample every sampler's distance is its RMSE against the teacher, exactly."""
        budget = self.teacher_budget - self.judged_by_steps.get(num_steps, 0)
        with np.errstate(invalid="ignore"):
            flagged = np.flatnonzero(np.isfinite(distance) & (distance > self.bound))
        judged = set(self.judged)
        new = [int(i) for i in flagged[np.argsort(-distance[flagged], kind="stable")] if int(i) not in judged][:max(budget, 0)]
        if not new:
            return
        errors = np.sqrt(self.backend.teacher_differences(self.handle, new))
        self.judged += new
        self.judged_by_steps[num_steps] = self.judged_by_steps.get(num_steps, 0) + len(new)
        self.reference_errors += [float(e) for e in errors]
        self.progress(f"tail screen: teacher on {len(new)} samples, the reference beyond the bound on "
                      f"{int(np.sum(errors > self.bound))} of them")

    def tail(self, distances: np.ndarray) -> float:
        """The certain part of a sampler's pooled RMSE on the screen, with the uncertainty of a rare event.

        ``g(s) = max(r(s) - w, 0)`` is certain error (module docstring); ``k`` samples have ``g > 0``. The rate of
        such samples may be up to ``U(k) / S`` (the one-sided ``(1 + confidence) / 2`` Poisson upper bound of a count
        ``k``: ``chi2.ppf(q, 2k + 2) / 2``, 3.0 for ``k = 0`` at 95 %, 4.74 for 1), so the tail's RMSE is at most
        ``sqrt(mean_{g>0}(g^2) * U(k) / S)``; 0 when no sample is beyond ``w``. One gross sample in a thousand thus
        counts nearly five times its share: the screen punishes blow-ups it has seen once.
        """
        from scipy.stats import chi2

        with np.errstate(invalid="ignore", over="ignore"):
            certain = np.maximum(np.where(np.isfinite(distances), distances, np.inf) - self.bound, 0.0)
        beyond = certain[certain > 0]
        if len(beyond) == 0:
            return 0.0
        if not np.all(np.isfinite(beyond)):
            return float("inf")
        rate = chi2.ppf((1.0 + self.rules.confidence) / 2.0, 2 * len(beyond) + 2) / 2.0 / len(distances)
        return float(np.sqrt(np.mean(beyond**2) * rate))

    def choose(self, names: Sequence[str], errors: Sequence[np.ndarray], builtin: Sequence[bool],
               max_abs_coefficients: Sequence[float], num_train_samples: int,
               samplers: Sequence[tuple[np.ndarray, np.ndarray]], rules: ChoiceRules) -> Choice:
        """``method.choice.choose`` with the screen. ``samplers``: per candidate ``(coefficients, step timesteps)``.

        The criterion adds each candidate's certain tail error on the screen (``tail``) to its validation bound;
        candidates are screened lazily, best first: the winner is screened (with the best built-in) and the choice
        made again until the winner was screened, since an unscreened candidate's criterion only grows when it is.
        Then a fitted winner whose ``tail`` exceeds the best built-in's bound fails: it is excluded and the
        choice is made again. The record gains ``tail_screen`` (the reference, the bound, and each screened
        candidate's tail and the failure test)."""
        excluded: dict[str, str] = {}
        tails: dict[str, float] = {}
        screened: dict[str, dict[str, Any]] = {}

        def screen(index: int) -> None:
            self.distance(names[index], *samplers[index], adjudicate=not builtin[index], keep=True)
            for other in [names.index(name) for name in tails] + [index]:  # again where samples were adjudicated since
                distance = self.distance(names[other], *samplers[other], keep=True)
                tails[names[other]] = self.tail(distance)
                screened.setdefault(names[other], {}).update({
                    "tail": tails[names[other]], "worst_distance": float(np.max(distance)),
                    "beyond_bound": int(np.sum(distance > self.bound))})

        try:
            while True:
                choice = choose(names, errors, builtin, max_abs_coefficients, num_train_samples, rules, excluded, tails)
                index = choice.index
                if choice.record["best_builtin"] is None:  # nothing to screen against: as chosen
                    break
                best = names.index(choice.record["best_builtin"])
                if names[index] not in tails or names[best] not in tails:
                    for i in {index, best}:
                        if names[i] not in tails:
                            screen(i)
                    continue
                if builtin[index]:
                    break
                upper = max(rmse_upper(np.asarray(errors[best], dtype=np.float64), rules), tails[names[best]])
                passed = tails[names[index]] <= upper
                screened[names[index]].update({"builtin_upper": upper, "passed": passed})
                if passed:
                    break
                excluded[names[index]] = (f"tail screen: RMSE at least {tails[names[index]]:.3g} on {self.samples} fresh "
                                          f"samples, above the best built-in's at most {upper:.3g}")
                self.progress(f"{len(samplers[index][1])} steps: {names[index]} fails the tail screen "
                              f"({tails[names[index]]:.3g} > {upper:.3g})")
        finally:
            self.release()  # this step count's rollouts: the next one screens other samplers
        reference_errors = np.asarray(self.reference_errors)
        choice.record["tail_screen"] = {**self.record, "samples": self.samples,
                                        "tail_seen_rate": tail_seen_rate(self.samples, rules.confidence),
                                        "teacher_samples": len(self.judged),
                                        "reference_beyond_bound": int(np.sum(reference_errors > self.bound)),
                                        "screened": screened}
        return choice

    def close(self) -> None:
        """Free the reference rollout."""
        self.backend.close(self.handle)
