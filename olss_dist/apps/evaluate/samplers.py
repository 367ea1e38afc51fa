"""The samplers an evaluation compares: the shipped OLSS scheduler, OLSS refits, and diffusers' built-ins.

- ``shipped_sampler``: the run's ``scheduler_config.json`` as users load it (``OLSSScheduler``).
- ``paper_plans``: the paper's teacher-forced fit from the run's calibration statistics, on given nodes.
- ``fit_uniform_on_policy``: the method's on-policy fit (``method.run.fit_candidate`` on an
  ``InProcessBackend``) on evenly spaced nodes, from fresh fit samples.
- ``builtin_samplers``: the solvers of ``core.builtin.BUILTIN_SOLVERS`` in each of their spacings, built
  by ``core.builtin.builtin_scheduler`` (a flow model compares the flow ones: ``family_builtins``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from olss_dist.core.builtin import BUILTIN_SOLVERS, SPACINGS, builtin_scheduler, family_builtins
from olss_dist.core.calibration import Calibration
from olss_dist.core.onpolicy import DEFAULT_RIDGE
from olss_dist.core.path_search import even_nodes
from olss_dist.core.plan import Plan
from olss_dist.core.teacher import TeacherSchedule, ddim_schedule
from olss_dist.method.rollouts import InProcessBackend
from olss_dist.method.run import Candidate, fit_candidate
from olss_dist.scheduler import OLSSScheduler

if TYPE_CHECKING:
    from olss_dist.apps.evaluate.published import CalibratedRun
    from olss_dist.apps.evaluate.samples import EvaluationSet


@dataclass(frozen=True)
class Sampler:
    """One sampler of the comparison.

    Attributes:
        name: solver family, e.g. ``"olss"``, ``"olss-paper"``, ``"ddim"``.
        variant: how it is configured, e.g. ``"shipped"``, ``"uniform"``, ``"config"``, ``"trailing"``.
        new_scheduler: returns a fresh diffusers scheduler (``set_timesteps`` / ``step`` / ``timesteps``).
    """

    name: str
    variant: str
    new_scheduler: Callable[[], Any]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.variant})"


def builtin_samplers(
    model_scheduler_config: dict[str, Any],
    names: Sequence[str] = family_builtins("vp"),
    spacings: Sequence[str] = tuple(SPACINGS),
) -> list[Sampler]:
    """Every built-in solver in every spacing variant it has (flow solvers: ``"config"`` only), solver-major."""
    return [
        Sampler(name, spacing, lambda name=name, spacing=spacing: builtin_scheduler(name, model_scheduler_config, spacing))
        for name in names
        for spacing in spacings
        if spacing in BUILTIN_SOLVERS[name].spacings
    ]


def olss_sampler(
    name: str,
    variant: str,
    plans: Sequence[Plan],
    num_train_timesteps: int,
    scheduler_config: dict[str, Any] | None = None,
    mu: float | None = None,
) -> Sampler:
    """An ``OLSSScheduler`` serving ``plans`` (one per step count); ``scheduler_config`` and ``mu``: a flow
    model's own config (its noise process) and dynamic shift, None for VP models."""
    if scheduler_config is None:
        scheduler = OLSSScheduler.from_plans(plans, num_train_timesteps=num_train_timesteps)
    else:
        scheduler = OLSSScheduler.from_plans(plans, scheduler_config=dict(scheduler_config), mu=mu)
    config, entries = scheduler.config, scheduler.plans  # the plans are not part of the config
    return Sampler(name, variant, lambda: OLSSScheduler.from_config(config, plans=entries))


def shipped_sampler(run: CalibratedRun, flow: bool = False, output_type: str = "epsilon") -> Sampler:
    """The run's ``scheduler_config.json`` loaded as users load it (VP: the adapters' outputs, ``output_type``:
    epsilon, or v at zero terminal SNR; flow: as published, velocity outputs)."""
    if flow:
        return Sampler("olss", "shipped", lambda: OLSSScheduler.from_config(run.scheduler_config))
    return Sampler("olss", "shipped", lambda: OLSSScheduler.from_config(run.scheduler_config, prediction_type=output_type))


def paper_plans(calibration: Calibration, nodes_by_steps: dict[int, Sequence[int]], spacing: str) -> list[Plan]:
    """The paper's teacher-forced fits (``Calibration.fit``) on the given nodes, one plan per step count."""
    return [calibration.plan_for_nodes(nodes, spacing) for nodes in nodes_by_steps.values()]


def fit_uniform_on_policy(
    model,
    fit_samples: EvaluationSet,
    teacher: np.ndarray | TeacherSchedule,
    steps: Sequence[int],
    batch_size: int | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> list[Plan]:
    """The method's on-policy fits on evenly spaced teacher nodes, from fresh fit samples (one teacher run for all K).

    Args:
        model: a ``DiffusionModel`` (``denoiser(x, t, cond) -> guided output``).
        fit_samples: samples to fit on (disjoint from the evaluation set).
        teacher: the teacher the nodes index into: a ``TeacherSchedule`` (the model's noise process's), or
            ``(N,)`` VP train timesteps (DDIM over ``model.alphas_cumprod``).
        steps: step counts K.
        batch_size: samples per model call (None: all at once).
        ridge: relative ridge weight (``core.onpolicy.solve_step``).

    Returns:
        one Plan per K (``fit="on_policy"``, ``spacing="uniform"``).
    """
    schedule = teacher if isinstance(teacher, TeacherSchedule) else ddim_schedule(teacher, model.alphas_cumprod)
    teacher_timesteps = schedule.stored_timesteps()
    n = len(teacher_timesteps)
    candidates = [
        Candidate(f"on_policy/uniform/ridge={ridge:g}", even_nodes(n, k), "uniform", "on_policy", ridge=ridge) for k in steps
    ]
    backend = InProcessBackend(model, fit_samples.x_T, fit_samples.cond, batch_size=batch_size)
    backend.record_train_states(schedule, {node for c in candidates for node in c.nodes[1:]})
    plans = []
    for candidate in candidates:
        coefficients, step_errors = fit_candidate(backend, candidate, teacher_timesteps)
        k = len(candidate.nodes)
        plans.append(Plan(candidate.nodes, teacher_timesteps[candidate.nodes], coefficients, step_errors, np.full(k, np.nan),
                          fit=candidate.fit, spacing=candidate.spacing, num_teacher_steps=n))
    return plans
