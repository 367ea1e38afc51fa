"""The whole method: teacher statistics, candidate paths, on-policy fits, validated choice.

For each step count K the candidates are the minimax path of the planner, evenly spaced nodes and
quadratically spaced nodes (dense at high noise), each fitted on-policy with two small ridge weights
(unregularised fits on nearly collinear outputs reach coefficients of 1e9 and blow up on new
samples; 1e-6 and 1e-5 relative to the feature norms keep them near the DDIM scale), the paper's
teacher-forced fit on the minimax path, and the noise process's built-in linear solvers in OLSS form
(``core.builtin.process_builtins``: VP: DDIM, DPM-Solver++ 2M, UniPC, DEIS with "trailing" spacing;
flow matching: FlowMatch Euler, DPM-Solver++ 2M and UniPC with flow sigmas). Every candidate is scored
by the on-policy error of its final state against the teacher's on held-out validation samples, run at
the candidate's own timesteps (a flow built-in's are generally off the teacher's grid). Then the
trust-region candidates (``trust_region_candidates``: fits on the best built-in's nodes pulled towards
its rows) are scored the same way, and ``method.choice.choose`` picks what ships: a fitted plan only
inside the trust region of bounded coefficients and with a significant bootstrap win over the best
built-in, else that built-in (``Plan.choice`` says which and why); every score is kept in
``Plan.candidates``.

The method is the same for every noise process: the teacher is ``process.teacher_schedule(N)`` (or a
given ``TeacherSchedule``), and only the built-in candidates depend on the family.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

from olss_dist.core.builtin import (
    LINEAR_BUILTINS,
    process_builtins,
)
from olss_dist.core.calibration import Calibration, as_tensor
from olss_dist.core.noise_process import (
    NoiseProcess,
    VPProcess,
    noise_process_from_config,
)
from olss_dist.core.onpolicy import solve_step, step_basis
from olss_dist.core.path_search import check_num_steps
from olss_dist.core.plan import Plan
from olss_dist.core.teacher import (
    Denoiser,
    TeacherSchedule,
    ddim_schedule,
    model_timestep,
    validate_timesteps,
)
from olss_dist.core.tsqr import merge_r_factors
from olss_dist.method.candidates import (  # noqa: F401  (Candidate, builtin_config: imported from here too)
    DEFAULT_ORDERS,
    DEFAULT_RIDGES,
    Candidate,
    builtin_config,
    candidate_record,
    candidates_for,
    quadratic_nodes,
    trust_region_candidates,
)
from olss_dist.method.choice import DEFAULT_RULES, ChoiceRules, choose
from olss_dist.method.node_search import NODE_SEARCH_MIN_SAMPLES, searched_candidate
from olss_dist.method.rollouts import (
    SCREEN,
    TRAIN,
    VALIDATION,
    InProcessBackend,
    RolloutBackend,
    error_summary,
    run_to_end,
    take,
)
from olss_dist.method.screen import TailScreen
from olss_dist.method.starts import fit_start_plans, start_nodes
from olss_dist.spec import CalibrationSpec

logger = logging.getLogger(__name__)

DEFAULT_STEPS = CalibrationSpec.steps  # the one default step list
DEFAULT_BUILTINS = LINEAR_BUILTINS  # every VP built-in solver with an exact OLSS form (flow: the process's)
DEFAULT_TEACHER_STEPS = CalibrationSpec.teacher_steps
DEFAULT_TRUST_RIDGES = (1e-4, 1e-2)
"""Ridges of the trust-region candidates: on-policy fits on the best built-in's nodes pulled towards its rows."""
DEFAULT_NODE_SEARCH_STEPS = (4, 5, 6)
"""Step counts whose nodes are searched on-policy (``method.node_search``): where node positions matter most."""
DEFAULT_NODE_SEARCH_EVALUATIONS = 40


def fit_candidate(backend: RolloutBackend, candidate: Candidate, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """On-policy coefficients ``(K, K+1)`` and step errors ``(K,)`` of a candidate's nodes, on the train split
    (with ``candidate.order``, each step on its reduced basis ``core.onpolicy.step_basis``)."""
    nodes = candidate.nodes
    targets = nodes[1:] + [len(timesteps)]
    coefficients = np.zeros((len(nodes), len(nodes) + 1))
    step_errors = np.zeros(len(nodes))
    handle = backend.start(TRAIN, model_timestep(timesteps[nodes[0]]))
    try:
        for i, target in enumerate(targets):
            statistics = merge_r_factors([f.cpu() for f in backend.statistics(handle, target)])
            prior = None if candidate.prior is None else candidate.prior[i, : i + 2]
            basis = step_basis(coefficients[i - 1, : i + 1] if i else None, candidate.order)
            weights, step_errors[i] = solve_step(statistics, backend.num_train_rows, candidate.ridge or 0.0, prior, basis)
            coefficients[i, : i + 2] = weights
            next_timestep = model_timestep(timesteps[nodes[i + 1]]) if i + 1 < len(nodes) else None
            backend.advance(handle, weights, next_timestep)
    finally:
        backend.close(handle)
    return coefficients, step_errors


def validation_errors(backend: RolloutBackend, coefficients: np.ndarray, step_timesteps: Sequence[int | float]) -> np.ndarray:
    """``(V,)`` per-sample mean squared error of the sampler's final state on the validation split, the
    sampler calling the model at ``step_timesteps (K,)``."""
    handle = run_to_end(backend, VALIDATION, coefficients, step_timesteps)
    try:
        return backend.final_errors(handle)
    finally:
        backend.close(handle)


def run_method(
    backend: RolloutBackend,
    process: NoiseProcess,
    teacher: int | TeacherSchedule = DEFAULT_TEACHER_STEPS,
    steps: Sequence[int] = DEFAULT_STEPS,
    builtins: Sequence[str] | None = None,
    ridges: Sequence[float] = DEFAULT_RIDGES,
    progress: Callable[[str], None] | None = None,
    trust_ridges: Sequence[float] = DEFAULT_TRUST_RIDGES,
    choice_rules: ChoiceRules = DEFAULT_RULES,
    start_strengths: Sequence[float] = (),
    node_search_steps: Sequence[int] = DEFAULT_NODE_SEARCH_STEPS,
    node_search_evaluations: int = DEFAULT_NODE_SEARCH_EVALUATIONS,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> tuple[dict[int, Plan], Calibration]:
    """The method on any backend: returns the validated best plan per step count and the calibration.

    Args:
        backend: where the samples live.
        process: the model's noise process (VP or flow matching): its teacher and built-in candidates.
        teacher: N (the teacher is ``process.teacher_schedule(N)``) or a given schedule (e.g. DDIM over
            chosen train timesteps).
        steps: step counts K to plan.
        builtins: built-in solvers to include as candidates; None: the process's linear ones.
        ridges: relative ridge weights of the on-policy fits.
        progress: called with a line per scored candidate.
        trust_ridges: ridges of the trust-region candidates (``trust_region_candidates``); () for none.
        choice_rules: the robust choice's thresholds (``method.choice``).
        node_search_steps: step counts that also get an on-policy node search candidate (``searched_candidate``),
            with at least ``NODE_SEARCH_MIN_SAMPLES`` fit samples.
        node_search_evaluations: on-policy fits each node search may try (K model calls per train sample each).
        orders: reduced-basis orders of the fewer-outputs candidates (``method.candidates.candidates_for``); () for none.
        start_strengths: img2img strengths to fit start plans for after the start-0 plans
            (``method.starts.fit_start_plans``); their plans are returned under keys ``(K, start_step)``
            and each K-step plan's ``starts`` records what serves each start.
    """
    progress = progress or (lambda message: None)
    schedule = process.teacher_schedule(int(teacher)) if not isinstance(teacher, TeacherSchedule) else teacher
    timesteps = schedule.stored_timesteps()
    for k in steps:
        check_num_steps(len(timesteps), k)
    calibration = backend.record_teacher(schedule)
    solvers = process_builtins(process)
    candidates = {k: candidates_for(calibration, k, solvers, builtins, ridges, orders) for k in steps}
    searched_steps = [k for k in steps if k in node_search_steps and calibration.num_samples >= NODE_SEARCH_MIN_SAMPLES]
    for k in searched_steps:  # before states are dropped: the search reaches any node
        searched = searched_candidate(backend, candidates[k], timesteps, node_search_evaluations, progress)
        candidates[k] += [] if searched is None else [searched]
    paths = [c.nodes for group in candidates.values() for c in group]
    backend.keep_train_states({n for nodes in paths for n in nodes}, start_nodes(paths, start_strengths))
    screen = TailScreen(backend, solvers, timesteps, choice_rules, progress) \
        if choice_rules.screens and backend.has_split(SCREEN) else None
    try:
        plans = {k: choose_plan(backend, calibration, k, group, timesteps, trust_ridges, choice_rules, screen, progress)
                 for k, group in candidates.items()}
    finally:
        if screen is not None:
            screen.close()
    if start_strengths:
        plans.update(fit_start_plans(backend, process, calibration, plans, start_strengths, ridges, progress, choice_rules))
    return plans, calibration


def choose_plan(
    backend: RolloutBackend,
    calibration: Calibration,
    k: int,
    group: list[Candidate],
    timesteps: np.ndarray,
    trust_ridges: Sequence[float],
    choice_rules: ChoiceRules,
    screen: TailScreen | None,
    progress: Callable[[str], None],
) -> Plan:
    """Fit and score ``group`` (the K-step candidates) and the trust-region candidates on the validation
    samples, and choose what ships (``method.choice.choose``; through ``screen`` when there is one)."""
    scored, errors = [], []

    def score(candidate: Candidate) -> None:
        if candidate.coefficients is None:
            candidate.coefficients, candidate.step_errors = fit_candidate(backend, candidate, timesteps)
        errors.append(validation_errors(backend, candidate.coefficients, candidate.step_timesteps(timesteps)))
        scores = error_summary(errors[-1])
        scored.append(candidate_record(candidate, candidate.coefficients, scores))
        progress(f"{k} steps: {candidate.name} validation RMSE {scores['rmse']:.4g}")

    for candidate in group:
        score(candidate)
    group = group + trust_region_candidates(group, [s["rmse"] for s in scored], trust_ridges)
    for candidate in group[len(scored):]:
        score(candidate)
    arguments = ([c.name for c in group], errors, [c.fit.startswith("builtin") for c in group],
                 [s["max_abs_coefficient"] for s in scored], calibration.num_samples)
    if screen is None:
        choice = choose(*arguments, choice_rules)
    else:
        choice = screen.choose(*arguments, [(c.coefficients, c.step_timesteps(timesteps)) for c in group], choice_rules)
    progress(f"{k} steps: ships {group[choice.index].name}: {choice.record['reason']}")
    best = group[choice.index]
    return Plan(
        nodes=best.nodes,
        timesteps=best.step_timesteps(timesteps),
        coefficients=best.coefficients,
        step_errors=best.step_errors if best.step_errors is not None else np.full(k, np.nan),
        search_errors=calibration.search_errors(best.nodes),
        fit=best.fit,
        spacing=best.spacing,
        candidates=scored,
        num_teacher_steps=len(timesteps),
        choice=choice.record,
    )


def check_split(noise: Any, cond: Any, name: str) -> torch.Tensor:
    noise = as_tensor(noise)
    if noise.ndim < 2 or len(noise) == 0:
        raise ValueError(f"{name} must be a non-empty batch (B, *latent_shape), got shape {tuple(noise.shape)}")
    if len(cond) != len(noise):
        raise ValueError(f"{name} has {len(noise)} samples but its conditioning has {len(cond)}")
    if not torch.isfinite(noise).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return noise


def calibrate(
    denoiser: Denoiser,
    noise: Any,
    cond: Any,
    timesteps: Any = None,
    alphas_cumprod: Any = None,
    steps: Sequence[int] = DEFAULT_STEPS,
    validation_noise: Any = None,
    validation_cond: Any = None,
    builtins: Sequence[str] | None = None,
    ridges: Sequence[float] = DEFAULT_RIDGES,
    batch_size: int | None = None,
    progress: Callable[[str], None] | None = None,
    scheduler_config: dict[str, Any] | None = None,
    mu: float | None = None,
    num_teacher_steps: int = DEFAULT_TEACHER_STEPS,
    trust_ridges: Sequence[float] = DEFAULT_TRUST_RIDGES,
    choice_rules: ChoiceRules = DEFAULT_RULES,
    start_strengths: Sequence[float] = (),
    screen_noise: Any = None,
    screen_cond: Any = None,
    orders: Sequence[int] = DEFAULT_ORDERS,
) -> dict[int | tuple[int, int], Plan]:
    """OLSS calibration in one process: the reference the distributed job reproduces.

    The teacher is named one of two ways: ``scheduler_config`` (any diffusers scheduler config of the
    model: a ``FlowMatchEulerDiscreteScheduler`` config for flow matching, whose own ``num_teacher_steps``
    schedule is the teacher, or a VP model's config: trailing DDIM), or ``timesteps`` with
    ``alphas_cumprod`` (DDIM over those train timesteps of a VP model).

    Args:
        denoiser: ``denoiser(x, t, cond) -> guided output`` (epsilon for VP, the velocity for flow matching)
            at model timestep ``t`` (``core.teacher.Denoiser``).
        noise: ``(B, *shape)`` train initial noise; ``cond`` its conditioning (indexable along B).
        timesteps: ``(N,)`` strictly decreasing teacher train timesteps (VP, with ``alphas_cumprod``).
        alphas_cumprod: ``(num_train_timesteps,)`` the VP model's cumulative alphas.
        steps: step counts to plan.
        validation_noise, validation_cond: held-out samples that choose among candidates.
        builtins: built-in solvers to include as candidates; None: the noise process's linear ones.
        ridges: relative ridge weights of the on-policy fits.
        batch_size: samples per model call.
        progress: called with a line per finished stage.
        scheduler_config: the model's diffusers scheduler config (names the noise process).
        mu: the dynamic shift of a flow config with ``use_dynamic_shifting`` (Flux: from the image size).
        num_teacher_steps: N of the ``scheduler_config`` teacher.
        trust_ridges: ridges of the trust-region candidates around the best built-in (``run_method``).
        choice_rules: the robust choice's thresholds (``method.choice.ChoiceRules``).
        start_strengths: img2img strengths to fit start plans for (``method.starts``; the job's are
            ``CalibrationSpec.img2img_strengths``); none by default.
        screen_noise, screen_cond: the tail screen's fresh samples (``method.screen``; no teacher runs on them);
            None: ``choice_rules.screen_samples`` initial noises (None: ``default_screen_count``) drawn here (seeded)
            with the train conditioning cycled. Unused when ``choice_rules`` has no screen.
        orders: reduced-basis orders of the fewer-outputs candidates (``run_method``); () for none.

    Returns:
        ``{K: Plan}``, the validated best plan per step count, and ``{(K, s): Plan}`` the start plans that
        beat the built-ins for ``start_strengths`` (``Plan.start_step == s``; ``plans[K].starts`` records
        every start).
    """
    if validation_noise is None or validation_cond is None:
        raise ValueError("calibrate needs validation_noise and validation_cond (held-out samples choose the plan)")
    process, teacher = calibration_teacher(timesteps, alphas_cumprod, scheduler_config, mu, num_teacher_steps)
    noise = check_split(noise, cond, "noise")
    validation_noise = check_split(validation_noise, validation_cond, "validation_noise")
    if not choice_rules.screens:
        screen_noise = screen_cond = None
    elif screen_noise is None:
        screen_noise, screen_cond = screen_samples(noise, cond, choice_rules, default_screen_count(denoiser, len(noise)))
    else:
        screen_noise = check_split(screen_noise, screen_cond, "screen_noise")
    backend = InProcessBackend(denoiser, noise, cond, validation_noise, validation_cond, batch_size, progress,
                               screen_noise, screen_cond)
    return run_method(backend, process, teacher, steps, builtins, ridges, progress, trust_ridges, choice_rules,
                      start_strengths=start_strengths, orders=orders)[0]


SCREEN_SEED = 2**31 - 2
"""Seed of the screen's fresh initial noise in ``calibrate`` (plus ``ChoiceRules.seed``), far from usual sample seeds."""


DEFAULT_SCREEN_SAMPLES = 1024
"""The least tail screen of ``calibrate`` when the rules do not state one: sees a 0.22 % tail with 90 % probability."""


def default_screen_count(denoiser: Any, num_train: int) -> int:
    """``calibrate``'s screen size when ``ChoiceRules.screen_samples`` is None: ``DEFAULT_SCREEN_SAMPLES``, or the
    denoiser's ``screen_multiple`` (``DiffusionModel.screen_multiple``; 64 for the analytic mixtures) of the train
    samples where that is more (8192 for 128 analytic train samples)."""
    return max(DEFAULT_SCREEN_SAMPLES, int(getattr(denoiser, "screen_multiple", 0)) * int(num_train))


def screen_samples(noise: torch.Tensor, cond: Any, rules: ChoiceRules, default: int = DEFAULT_SCREEN_SAMPLES) -> tuple[torch.Tensor, Any]:
    """``rules.screen_samples`` (None: ``default``) fresh initial noises like ``noise`` (seeded) with the train
    conditioning cycled: the tail screen's samples in ``calibrate`` (``method.screen``)."""
    count = default if rules.screen_samples is None else rules.screen_samples
    generator = torch.Generator().manual_seed(SCREEN_SEED + rules.seed)
    fresh = torch.randn((count, *noise.shape[1:]), generator=generator, dtype=torch.float64)
    return fresh.to(noise.dtype).to(noise.device), take(cond, np.arange(count) % len(noise))


def calibration_teacher(
    timesteps: Any, alphas_cumprod: Any, scheduler_config: dict[str, Any] | None, mu: float | None, num_teacher_steps: int
) -> tuple[NoiseProcess, int | TeacherSchedule]:
    """``(process, teacher)`` of ``calibrate``'s two forms (see there); ValueError naming a wrong combination."""
    if scheduler_config is not None:
        if timesteps is not None or alphas_cumprod is not None:
            raise ValueError("scheduler_config: give it alone, or timesteps with alphas_cumprod, not both")
        if isinstance(num_teacher_steps, bool) or not isinstance(num_teacher_steps, (int, np.integer)) or num_teacher_steps < 1:
            raise ValueError(f"num_teacher_steps must be a positive integer, got {num_teacher_steps!r}")
        return noise_process_from_config(dict(scheduler_config), mu=mu), int(num_teacher_steps)
    if timesteps is None or alphas_cumprod is None:
        raise ValueError("calibrate needs scheduler_config, or timesteps with alphas_cumprod (the teacher)")
    if mu is not None:
        raise ValueError("mu: only a flow-matching scheduler_config takes a dynamic shift")
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    timesteps = validate_timesteps(timesteps, len(alphas_cumprod))
    return VPProcess(alphas_cumprod), ddim_schedule(timesteps, alphas_cumprod)
