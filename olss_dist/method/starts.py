"""The start-plan stage of the method: plans that start mid-way (img2img, inpainting), contract C2.

For each shipped K-step plan on the teacher's grid and each start step ``s`` of the img2img strengths
(``core.start_plans.start_steps``), the candidates run on the plan's nodes from index ``s`` on, starting
from the teacher's state at node ``n_s`` (in place of ``x_T``): the teacher-forced fit from R
(``Calibration.fit_start``) and on-policy fits (train split, one per ridge). They are scored like every
candidate, by the final error against the teacher on the validation split started from the teacher's
validation state at ``n_s``, beside the built-ins in OLSS form on the same timesteps started there
(``core.start_plans.start_builtins``: what ``OLSSScheduler`` falls back to without a plan). What serves the
start is decided by the start-0 plans' robust choice (``method.choice.choose``: thin evidence, trust region,
the bootstrap upper bound of pooled RMSE as criterion, and a fit ships as a ``Plan`` with ``start_step = s``
only when its paired bootstrap interval over the best built-in lies below 1, else the built-in the choice keeps
ships as the start plan in OLSS form, ``fit = "builtin:<name>"``, so that the scheduler serves the solver measured
here rather than its configured fallback); there is no tail screen from a mid-way start. Either way the K-step
plan's ``starts`` records the scores, the choice and what serves the start (``serves``: ``"plan"`` or
``"builtin"``, with ``builtin`` naming it; ``"fallback"`` only for a plan off the teacher's grid).

The rollouts start at teacher nodes, so the backend keeps the train states at the candidates' nodes (it
does for the start-0 candidates already) and the validation states at ``start_nodes`` (a few per K).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from olss_dist.core.calibration import Calibration
from olss_dist.core.noise_process import NoiseProcess
from olss_dist.core.onpolicy import solve_step
from olss_dist.core.plan import Plan
from olss_dist.core.start_plans import start_builtins, start_steps
from olss_dist.core.teacher import model_timestep
from olss_dist.core.tsqr import merge_r_factors
from olss_dist.method.choice import DEFAULT_RULES, ChoiceRules, choose
from olss_dist.method.rollouts import TRAIN, VALIDATION, RolloutBackend, error_summary, run_to_end


def on_teacher_grid(nodes: Sequence[int], timesteps: np.ndarray, teacher_timesteps: np.ndarray) -> bool:
    """Whether a path's model timesteps are the teacher's at its nodes (a flow built-in's generally are not)."""
    teacher = np.asarray(teacher_timesteps, dtype=np.float64)
    return bool(np.array_equal(np.asarray(timesteps, dtype=np.float64), teacher[list(nodes)]))


def start_nodes(paths: Iterable[Sequence[int]], strengths: Sequence[float]) -> set[int]:
    """Every teacher node a start plan on one of ``paths`` (the nodes of K-step candidates) may start at:
    ``nodes[s]`` for each start step of ``strengths``. Paths off the teacher's grid count too: a candidate
    fitted later on their nodes (the trust-region fits around a flow built-in) samples at the teacher's
    timesteps there. A few states per K, whatever N."""
    return {int(nodes[s]) for nodes in paths for _, s in start_steps(len(nodes), strengths)}


def fit_start_on_policy(backend: RolloutBackend, nodes: Sequence[int], timesteps: np.ndarray, num_teacher_steps: int,
                        ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """On-policy coefficients ``(M, M+1)`` and step errors ``(M,)`` of the path ``nodes`` (M of them, the tail of a
    plan) on the train split, started from the teacher's state at ``nodes[0]``; ``timesteps (N,)`` the teacher's."""
    nodes = [int(n) for n in nodes]
    targets = nodes[1:] + [num_teacher_steps]
    coefficients = np.zeros((len(nodes), len(nodes) + 1))
    step_errors = np.zeros(len(nodes))
    handle = backend.start(TRAIN, model_timestep(timesteps[nodes[0]]), start_node=nodes[0])
    try:
        for i, target in enumerate(targets):
            statistics = merge_r_factors([f.cpu() for f in backend.statistics(handle, target)])
            weights, step_errors[i] = solve_step(statistics, backend.num_train_rows, ridge)
            coefficients[i, : i + 2] = weights
            backend.advance(handle, weights, model_timestep(timesteps[nodes[i + 1]]) if i + 1 < len(nodes) else None)
    finally:
        backend.close(handle)
    return coefficients, step_errors


def start_validation_errors(backend: RolloutBackend, coefficients: np.ndarray, step_timesteps: Sequence[int | float],
                            start_node: int) -> np.ndarray:
    """``(V,)`` per-sample mean squared final error on the validation split of a sampler started from the
    teacher's validation state at ``start_node``, calling the model at ``step_timesteps``."""
    handle = run_to_end(backend, VALIDATION, coefficients, step_timesteps, start_node=start_node)
    try:
        return backend.final_errors(handle)
    finally:
        backend.close(handle)


def fit_start_plans(
    backend: RolloutBackend,
    process: NoiseProcess,
    calibration: Calibration,
    plans: dict[int, Plan],
    strengths: Sequence[float],
    ridges: Sequence[float],
    progress: Callable[[str], None] | None = None,
    rules: ChoiceRules = DEFAULT_RULES,
) -> dict[tuple[int, int], Plan]:
    """Start plans of the shipped ``plans`` for ``strengths``; fills each K-step plan's ``starts`` records.

    Args:
        backend: the method's backend after the start-0 stage, holding the train states at the plans'
            nodes and the validation states at their start nodes (``start_nodes``).
        process: the model's noise process (the built-ins on the same timesteps).
        calibration: the train statistics (the teacher-forced start fit).
        plans: ``{K: Plan}`` the shipped start-0 plans.
        strengths: img2img strengths; each gives ``s = K - int(K * strength)`` (skipped unless ``0 < s < K``).
        ridges: ridges of the on-policy start fits.
        progress: called with a line per start.
        rules: the choice's thresholds (``method.choice.ChoiceRules``; its screen fields are not used here).

    Returns:
        ``{(K, s): Plan}`` one start plan per start on the teacher's grid (``Plan.start_step == s``): the fit the
        choice ships, or the built-in it keeps, in OLSS form.
    """
    progress = progress or (lambda message: None)
    teacher_timesteps = calibration.timesteps
    n = calibration.num_teacher_steps
    found: dict[tuple[int, int], Plan] = {}
    for k, plan in plans.items():
        plan.starts = []
        for strength, s in start_steps(k, strengths):
            record = {"strength": strength, "start_step": s, "start_node": int(plan.nodes[s]),
                      "timesteps": plan.timesteps[s:].tolist()}
            if not on_teacher_grid(plan.nodes, plan.timesteps, teacher_timesteps):
                plan.starts.append({**record, "serves": "fallback",
                                    "reason": "the plan's timesteps are off the teacher's grid"})
                progress(f"{k} steps from step {s}: fallback (the plan is off the teacher's grid)")
                continue
            nodes, tail = plan.nodes[s:], plan.timesteps[s:]
            fitted = [("teacher_forced", None, *calibration.fit_start(plan.nodes, s))]
            fitted += [("on_policy", ridge, *fit_start_on_policy(backend, nodes, teacher_timesteps, n, ridge))
                       for ridge in ridges]
            scored, errors = [], []
            for fit, ridge, coefficients, step_errors in fitted:
                errors.append(start_validation_errors(backend, coefficients, tail, nodes[0]))
                name = fit if ridge is None else f"{fit}/ridge={ridge:g}"
                scored.append({"name": name, "fit": fit, "ridge": ridge,
                               "max_abs_coefficient": float(np.abs(coefficients).max()), **error_summary(errors[-1])})
            builtin_scores, builtin_rows = {}, start_builtins(process, plan.timesteps, s)
            for name, coefficients in builtin_rows.items():
                errors.append(start_validation_errors(backend, coefficients, tail, nodes[0]))
                builtin_scores[name] = error_summary(errors[-1])
                scored.append({"name": f"builtin/{name}", "fit": f"builtin:{name}", "ridge": None,
                               "max_abs_coefficient": float(np.abs(coefficients).max()), **builtin_scores[name]})
            choice = choose([c["name"] for c in scored], errors, [i >= len(fitted) for i in range(len(scored))],
                            [c["max_abs_coefficient"] for c in scored], calibration.num_samples, rules)
            shipped = choice.index < len(fitted)
            # the fit the record names: the shipped one, else the one the choice measured against the built-ins
            best = choice.index if shipped else next(
                (i for i, c in enumerate(scored[: len(fitted)]) if c["name"] == choice.record.get("best_fitted")),
                int(np.argmin([c["rmse"] for c in scored[: len(fitted)]])))
            best_builtin = min(builtin_scores, key=lambda name: builtin_scores[name]["rmse"])
            if shipped:
                fit, coefficients, step_errors = fitted[best][0], fitted[best][2], fitted[best][3]
                serves, served = {"serves": "plan"}, "start plan"
            else:  # the built-in the choice keeps ships in OLSS form: the scheduler serves what was measured here
                kept = scored[choice.index]["name"].removeprefix("builtin/")
                fit, coefficients, step_errors = f"builtin:{kept}", builtin_rows[kept], np.full(len(nodes), np.nan)
                serves, served = {"serves": "builtin", "builtin": kept}, f"built-in {kept}"
            plan.starts.append({**record, **serves, "fit": scored[best]["name"], "validation_rmse": scored[best]["rmse"],
                                "builtin_rmse": {name: v["rmse"] for name, v in builtin_scores.items()},
                                "best_builtin": best_builtin, "candidates": scored, "choice": choice.record})
            progress(f"{k} steps from step {s} (strength {strength:g}): {served}, {scored[best]['name']} RMSE "
                     f"{scored[best]['rmse']:.4g} vs {best_builtin} {builtin_scores[best_builtin]['rmse']:.4g}: "
                     f"{choice.record['reason']}")
            found[(k, s)] = Plan(
                nodes=nodes, timesteps=tail, coefficients=coefficients, step_errors=step_errors,
                search_errors=np.full(len(nodes), np.nan), fit=fit, spacing=plan.spacing,
                candidates=scored, num_teacher_steps=n, start_step=s,
            )
    return found
