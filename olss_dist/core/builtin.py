"""Diffusers' built-in solvers: the one registry, the one way to build them, and their exact OLSS form.

``BUILTIN_SOLVERS`` lists every solver the project uses, for each noise process family: VP models (DDIM,
PNDM, DPM-Solver++ 2M, UniPC, Euler, DEIS) and flow-matching models (``FlowMatchEulerDiscreteScheduler``,
and DPM-Solver++ 2M / UniPC with ``use_flow_sigmas=True, prediction_type="flow_prediction"`` and the
model's shift as ``flow_shift``). The evaluation compares all of a model's family, and the calibration
method offers the linear ones as candidate plans (``process_builtins``). ``builtin_scheduler`` builds any
of them from a model's scheduler config and a spacing (``"config"``: the model's own, as users get it
from ``Class.from_config``; ``"trailing"``: trailing timesteps, last step to the clean sample; VP only).

A scheduler whose step is linear in ``(sample, model_output)`` with fixed timesteps (DDIM, DPM-Solver++
multistep, UniPC, DEIS; epsilon prediction, no thresholding or clipping) produces states that are fixed
linear combinations of ``x_T`` and the outputs so far. Running it on basis vectors reads those
combinations off: ``x_T = (1, 0, ..., 0)`` and the output at step ``j`` the unit vector ``j+1`` of a
``(K+1)``-dimensional space; the state after step ``i`` is row ``i`` of the coefficients. Flow-matching
Euler, DPM-Solver++ and UniPC (flow prediction) are linear the same way.

VP solvers take the model's outputs in the form ``core.noise_process.vp_output_type`` names (contract C1):
ε, except with zero terminal SNR (ᾱ_{T-1} = 0, ``rescale_betas_zero_snr``), where they run with the model's
own v (or sample) prediction and are linear in ``(sample, v)`` the same way. There each solver gets the
schedule as diffusers runs it at zero SNR (``zero_snr_solver_config``): DDIM keeps ᾱ = 0, the sigma-based
solvers clamp it to 2⁻²⁴ (DPM-Solver++ and UniPC do so themselves; DEIS and PNDM, which have no
``rescale_betas_zero_snr``, are given the clamped schedule as trained betas).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from olss_dist.core.noise_process import FlowMatchingProcess, NoiseProcess, VPProcess, vp_output_type
from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.core.plan import Plan

SPACINGS: dict[str, dict[str, Any]] = {
    "config": {},
    "trailing": {"timestep_spacing": "trailing", "set_alpha_to_one": True},
}
"""Overrides of the model's scheduler config per spacing; a key a solver does not take is left out.
Flow solvers have only ``"config"``: their sigmas come from the shift, not from a timestep spacing."""

FLOW_SETTINGS: dict[str, Any] = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
"""What runs a VP-family multistep solver on a flow-matching model (with ``flow_shift`` = the model's shift)."""

LINEAR_SETTINGS: dict[str, Any] = {"clip_sample": False, "thresholding": False}
"""What keeps a linear solver's step linear: no clipping or thresholding of the predicted clean sample."""

ZERO_SNR_CLAMP = 2.0**-24
"""ᾱ at the last train timestep that diffusers' sigma-based solvers use at zero terminal SNR (σ finite)."""


@dataclass(frozen=True)
class BuiltinSolver:
    """One diffusers solver of the registry.

    Attributes:
        scheduler_class: the diffusers scheduler class.
        settings: what names the solver (e.g. DPM-Solver++ 2M); everything else comes from the model's config.
        linear: its step is linear in ``(sample, output)`` once ``LINEAR_SETTINGS`` apply, with one model
            call per step on the state itself, so ``builtin_plan`` writes it exactly in OLSS form. PNDM
            (Runge-Kutta warm-up: more calls than steps) and Euler (model input rescaled by
            ``scale_model_input``) are not; flow-matching Euler (no rescaling) is.
        family: the noise process it runs on: ``"vp"`` or ``"flow"`` (``NoiseProcess.kind``).
    """

    scheduler_class: type
    settings: dict[str, Any] = field(default_factory=dict)
    linear: bool = False
    family: str = "vp"

    @property
    def spacings(self) -> tuple[str, ...]:
        """The spacings it is run in: every ``SPACINGS`` key for VP solvers, ``("config",)`` for flow ones."""
        return tuple(SPACINGS) if self.family == "vp" else ("config",)

    def accepts(self, key: str) -> bool:
        """Whether the scheduler's ``__init__`` takes ``key``."""
        return key in inspect.signature(self.scheduler_class.__init__).parameters

    def overrides(self, spacing: str, linear: bool = False, output_type: str = "epsilon") -> dict[str, Any]:
        """The settings over the model's config: the solver's own, the spacing's and (``linear``) ``LINEAR_SETTINGS``,
        each key only where the scheduler takes it; VP solvers predict ``output_type`` (what model adapters
        return: ε, or v / sample at zero terminal SNR, ``vp_output_type``)."""
        if spacing not in self.spacings:
            raise ValueError(f"unknown spacing {spacing!r} for a {self.family} solver; choose from {list(self.spacings)}")
        taken = {**SPACINGS[spacing], **(LINEAR_SETTINGS if linear else {})}
        overrides = {**self.settings, **{k: v for k, v in taken.items() if self.accepts(k)}}
        if self.family == "flow":
            return overrides
        return {**overrides, "prediction_type": output_type}


BUILTIN_SOLVERS: dict[str, BuiltinSolver] = {
    "ddim": BuiltinSolver(DDIMScheduler, linear=True),
    "pndm": BuiltinSolver(PNDMScheduler),
    "dpmsolver++": BuiltinSolver(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, linear=True),
    "unipc": BuiltinSolver(UniPCMultistepScheduler, linear=True),
    "euler": BuiltinSolver(EulerDiscreteScheduler),
    "deis": BuiltinSolver(DEISMultistepScheduler, linear=True),
    "flow-euler": BuiltinSolver(FlowMatchEulerDiscreteScheduler, linear=True, family="flow"),
    "flow-dpmsolver++": BuiltinSolver(
        DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, **FLOW_SETTINGS},
        linear=True, family="flow",
    ),
    "flow-unipc": BuiltinSolver(UniPCMultistepScheduler, dict(FLOW_SETTINGS), linear=True, family="flow"),
}
"""Every built-in solver, by the name reports and candidates use."""


def family_builtins(family: str, linear: bool = False) -> tuple[str, ...]:
    """The solvers of a noise process family (``"vp"`` or ``"flow"``) in registry order (``linear``: those with an OLSS form)."""
    return tuple(name for name, s in BUILTIN_SOLVERS.items() if s.family == family and (s.linear or not linear))


LINEAR_BUILTINS: tuple[str, ...] = family_builtins("vp", linear=True)
"""The VP solvers with an exact OLSS form, in registry order: ``("ddim", "dpmsolver++", "unipc", "deis")``."""

FLOW_LINEAR_BUILTINS: tuple[str, ...] = family_builtins("flow", linear=True)
"""The flow-matching solvers with an exact OLSS form: ``("flow-euler", "flow-dpmsolver++", "flow-unipc")``."""


def check_builtins(names, linear: bool = False, family: str | None = None) -> None:
    """ValueError naming the names not in ``BUILTIN_SOLVERS`` (with ``linear``: also those without an OLSS
    form; with ``family``: also those of another noise process family)."""
    unknown = [name for name in names if name not in BUILTIN_SOLVERS]
    if unknown:
        raise ValueError(f"unknown built-in solvers {unknown}; choose from {sorted(BUILTIN_SOLVERS)}")
    if family is not None:
        foreign = [name for name in names if BUILTIN_SOLVERS[name].family != family]
        if foreign:
            raise ValueError(f"built-in solvers {foreign} do not run on {family} models; choose from {list(family_builtins(family))}")
    nonlinear = [name for name in names if linear and not BUILTIN_SOLVERS[name].linear]
    if nonlinear:
        choices = family_builtins(family or BUILTIN_SOLVERS[nonlinear[0]].family, linear=True)
        raise ValueError(f"built-in solvers {nonlinear} have no OLSS form; choose from {list(choices)}")


def builtin_scheduler(name: str, model_scheduler_config: dict[str, Any], spacing: str = "config", linear: bool = False):
    """Built-in solver ``name`` from the model's scheduler config, as ``Class.from_config`` gives it to users.

    Args:
        name: a key of ``BUILTIN_SOLVERS``.
        model_scheduler_config: the model's own diffusers scheduler config (noise schedule and defaults).
        spacing: a key of ``SPACINGS``: ``"config"`` (the model's setting) or ``"trailing"``.
        linear: also apply ``LINEAR_SETTINGS`` (what ``builtin_plan`` needs); only for ``LINEAR_BUILTINS``.
    """
    check_builtins([name], linear)
    solver = BUILTIN_SOLVERS[name]
    if solver.family == "vp":
        output_type = solver_output_type(model_scheduler_config)
        if output_type != "epsilon":
            return solver.scheduler_class.from_config(
                zero_snr_solver_config(name, model_scheduler_config), **solver.overrides(spacing, linear, output_type)
            )
    overrides = solver.overrides(spacing, linear)
    if solver.family == "flow" and solver.accepts("flow_shift"):
        # The model's (static) shift; with dynamic shifting set_timesteps(mu=...) replaces it by exp(mu).
        overrides["flow_shift"] = float(model_scheduler_config.get("shift", 1.0))
    config = dict(model_scheduler_config)
    if solver.family == "flow":  # the flow-matching keys a multistep solver does not take would only warn
        config = {k: v for k, v in config.items() if k.startswith("_") or solver.accepts(k)}
    return solver.scheduler_class.from_config(config, **overrides)


def solver_output_type(model_scheduler_config: dict[str, Any]) -> str:
    """``vp_output_type`` of a VP config; ``"epsilon"`` for a beta schedule only diffusers knows (as before C1)."""
    try:
        alphas_cumprod_from_config(dict(model_scheduler_config))
    except ValueError:
        return "epsilon"
    return vp_output_type(model_scheduler_config)


def zero_snr_solver_config(name: str, model_scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """The model's zero-terminal-SNR scheduler config as VP solver ``name`` runs it (see the module docstring).

    Solvers with ``rescale_betas_zero_snr`` get it set (on an exact trained-betas schedule, whose ᾱ is already 0
    at the end, the rescaling is the identity) and handle ᾱ = 0 themselves; the others get the model's ᾱ with the
    last one clamped to ``ZERO_SNR_CLAMP``, as trained betas.
    """
    solver = BUILTIN_SOLVERS[name]
    config = dict(model_scheduler_config)
    if solver.accepts("rescale_betas_zero_snr"):
        return {**config, "rescale_betas_zero_snr": True}
    alphas_cumprod = alphas_cumprod_from_config(config)
    alphas_cumprod[-1] = ZERO_SNR_CLAMP
    config.pop("rescale_betas_zero_snr", None)
    config.pop("_use_default_values", None)  # a diffusers .config listing trained_betas there would drop ours
    return {**config, **exact_vp_config(alphas_cumprod)}


def scheduler_coefficients(scheduler, num_steps: int, mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps (K,), coefficients (K, K+1))`` of a linear diffusers scheduler run for ``num_steps``.

    ``timesteps`` are what the scheduler calls the model at: int64 for VP solvers (and flow DPM-Solver /
    UniPC, whose timesteps diffusers rounds to integers), float64 for flow-matching Euler (``sigma * 1000``).
    ``mu``: the dynamic shift of a flow model, passed to ``set_timesteps`` as pipelines do.
    """
    scheduler.set_timesteps(num_steps, **({} if mu is None else {"mu": float(mu)}))
    raw = scheduler.timesteps
    timesteps = raw.numpy().astype(np.int64) if not raw.is_floating_point() else raw.double().numpy()
    calls = len(timesteps)
    basis = torch.eye(calls + 1, dtype=torch.float64)[:, None, :]
    sample = basis[0]
    rows = []
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(basis[i + 1], t, sample).prev_sample
        rows.append(sample[0].to(torch.float64))
    return timesteps, torch.stack(rows).numpy()


def nearest_nodes(timesteps: np.ndarray, teacher_timesteps: np.ndarray) -> list[int]:
    """The nearest teacher index of each timestep, made strictly increasing (informative nodes of off-grid plans)."""
    teacher = np.asarray(teacher_timesteps, dtype=np.float64)
    nodes: list[int] = []
    for t in np.asarray(timesteps, dtype=np.float64):
        node = int(np.argmin(np.abs(teacher - t)))
        nodes.append(max(node, nodes[-1] + 1) if nodes else 0)
    if nodes[-1] >= len(teacher):
        raise ValueError(f"{len(nodes)} steps do not fit on a {len(teacher)}-step teacher")
    return nodes


def builtin_plan(
    name: str,
    num_steps: int,
    model_scheduler_config: dict[str, Any],
    teacher_timesteps: np.ndarray,
    spacing: str = "trailing",
    mu: float | None = None,
) -> Plan:
    """The built-in solver ``name`` (a linear one) at ``num_steps`` steps as a Plan (``fit == "builtin:<name>"``).

    Args:
        model_scheduler_config: the model's scheduler config (``exact_vp_config`` builds one from
            ``alphas_cumprod``; a flow model's own config).
        teacher_timesteps: ``(N,)`` the teacher the plan's nodes index into.
        spacing: one of the solver's ``spacings``.
        mu: a flow model's dynamic shift (``set_timesteps(mu=...)``).

    Raises:
        ValueError: a VP solver's timestep is not on the teacher's grid (no node index for it). Flow
            solvers' timesteps generally are not: their nodes are the nearest teacher indices (``Plan``).
    """
    scheduler = builtin_scheduler(name, model_scheduler_config, spacing, linear=True)
    timesteps, coefficients = scheduler_coefficients(scheduler, num_steps, mu)
    if BUILTIN_SOLVERS[name].family == "flow":
        nodes = nearest_nodes(timesteps, teacher_timesteps)
        timesteps = timesteps.astype(np.float64)
    else:
        position = {int(t): n for n, t in enumerate(teacher_timesteps)}
        missing = [int(t) for t in timesteps if int(t) not in position]
        if missing:
            raise ValueError(f"{name} timesteps {missing} are not teacher timesteps")
        nodes = [position[int(t)] for t in timesteps]
    return Plan(
        nodes=nodes,
        timesteps=timesteps,
        coefficients=coefficients,
        step_errors=np.full(len(timesteps), np.nan),
        search_errors=np.full(len(timesteps), np.nan),
        fit=f"builtin:{name}",
        spacing=spacing,
        num_teacher_steps=len(teacher_timesteps),
    )


def exact_vp_config(alphas_cumprod: np.ndarray) -> dict[str, Any]:
    """A diffusers scheduler config with exactly the model's noise schedule (as trained betas)."""
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    betas = 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
    return {"num_train_timesteps": len(alphas_cumprod), "trained_betas": betas.tolist()}


@dataclass(frozen=True)
class ProcessBuiltins:
    """How a noise process's built-in candidates are built (``process_builtins``).

    Attributes:
        names: its linear solvers, in registry order.
        config: the scheduler config they are built from: VP: ``exact_vp_config`` of its ``alphas_cumprod``;
            flow: the model's own config (shift, dynamic shifting).
        spacing: ``"trailing"`` (VP: last step to the clean sample, as the teacher) or ``"config"`` (flow).
        mu: a flow model's dynamic shift, else None.
    """

    names: tuple[str, ...]
    config: dict[str, Any]
    spacing: str
    mu: float | None = None

    def plan(self, name: str, num_steps: int, teacher_timesteps: np.ndarray) -> Plan:
        """``builtin_plan`` of solver ``name`` for this process."""
        return builtin_plan(name, num_steps, self.config, teacher_timesteps, self.spacing, self.mu)


def process_builtins(process: NoiseProcess) -> ProcessBuiltins:
    """The built-in candidates of a noise process: VP as DDIM, DPM-Solver++ 2M, UniPC, DEIS (trailing);
    flow matching as FlowMatch Euler, DPM-Solver++ 2M and UniPC with flow sigmas and the model's shift."""
    if isinstance(process, VPProcess):
        config = exact_vp_config(process.alphas_cumprod)
        if process.output_type != "epsilon":  # zero terminal SNR: the solvers predict what the model outputs (C1)
            config["prediction_type"] = process.output_type
        return ProcessBuiltins(LINEAR_BUILTINS, config, "trailing")
    if isinstance(process, FlowMatchingProcess):
        config = process.scheduler_config()
        if process.mu is not None and config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("scheduler_config: flow built-ins take mu only with time_shift_type 'exponential'")
        return ProcessBuiltins(FLOW_LINEAR_BUILTINS, config, "config", process.mu)
    raise ValueError(f"process: no built-in solvers for a {type(process).__name__}")
