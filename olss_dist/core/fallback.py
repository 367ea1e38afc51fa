"""Built-in solvers in OLSS form where no plan exists: any step count, and starts mid-way on any timesteps.

``OLSSScheduler`` serves a step count it has no plan for, and an img2img / inpainting start it has no start
plan for, with one of the linear built-ins of ``core.builtin`` (DPM-Solver++ 2M by default) written in OLSS
form: rows of coefficients over ``[x_start, o_0, ..., o_{n-1}]``, ``x_start`` being the sample at the first
step served and ``o_j`` the model outputs in the form the scheduler combines (``output_type``: ε, or v / x0 at
zero terminal SNR, or the velocity of a flow model). The rows are read off by running the diffusers solver
on basis vectors (``core.builtin``'s construction), so they are that solver exactly:

- ``FallbackSolver.own_rows(K, start)``: the solver's own K-step timesteps, stepped from index ``start`` as
  diffusers' img2img pipelines step it (``set_timesteps(K)``, ``set_begin_index(start)``).
- ``FallbackSolver.rows_on(timesteps)``: the solver on exactly these timesteps (the tail of a plan's), last
  step to the solver's final state (the clean sample): DDIM and flow Euler in closed form, the multistep
  solvers (DPM-Solver++, UniPC, DEIS) with their timestep and sigma tables replaced by these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from olss_dist.core.builtin import BUILTIN_SOLVERS, builtin_scheduler, check_builtins
from olss_dist.core.noise_schedule import alphas_cumprod_from_config

FLOW_OUTPUT = "flow_prediction"
VP_OUTPUTS = ("epsilon", "v_prediction", "sample")
VP_PROCESS_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")


def family_solver_name(name: str, flow: bool) -> str:
    """The registry name of built-in ``name`` for a family: ``"dpmsolver++"`` is ``"flow-dpmsolver++"`` on flow models."""
    if flow and not name.startswith("flow-"):
        return f"flow-{name}"
    if not flow and name.startswith("flow-"):
        return name.removeprefix("flow-")
    return name


def basis_rows(scheduler, calls: Sequence[Any]) -> np.ndarray:
    """``(n, n+1)`` float64 states of a linear diffusers scheduler stepped at ``calls`` on basis vectors: the
    start sample is ``e_0`` and the output at step ``j`` is ``e_{j+1}``; row ``i`` is the state after step ``i``."""
    basis = torch.eye(len(calls) + 1, dtype=torch.float64)[:, None, :]
    sample, rows = basis[0], []
    for i, t in enumerate(calls):
        sample = scheduler.step(basis[i + 1], t, sample).prev_sample
        rows.append(sample[0].to(torch.float64))
    return torch.stack(rows).numpy()


@dataclass
class FallbackSolver:
    """A linear built-in in OLSS form on a model's noise process.

    Args:
        name: a linear ``BUILTIN_SOLVERS`` key of the family (``family_solver_name``).
        process_config: VP: the ``VP_PROCESS_KEYS`` of the model's schedule; flow: its
            ``FlowMatchEulerDiscreteScheduler`` config (shift, dynamic shifting).
        output_type: what the rows combine: ``"epsilon"``, ``"v_prediction"`` / ``"sample"`` (zero terminal SNR,
            ``core.noise_process.vp_output_type``) or ``"flow_prediction"``.
        mu: a flow model's dynamic shift (``set_timesteps(mu=...)``), else None.

    Raises:
        ValueError: ``name`` is no linear built-in of the family.
    """

    name: str
    process_config: Mapping[str, Any]
    output_type: str = "epsilon"
    mu: float | None = None
    cache: dict[Any, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        flow = self.output_type == FLOW_OUTPUT
        if not flow and self.output_type not in VP_OUTPUTS:
            raise ValueError(f"output_type {self.output_type!r}; expected one of {[*VP_OUTPUTS, FLOW_OUTPUT]}")
        check_builtins([self.name], linear=True, family="flow" if flow else "vp")
        self.solver = BUILTIN_SOLVERS[self.name]
        self.flow = flow
        if not flow:
            self.process_config = {k: self.process_config[k] for k in VP_PROCESS_KEYS if k in self.process_config}
        self.mu = None if self.mu is None else float(self.mu)

    def scheduler(self):
        """A fresh diffusers scheduler of the solver as ``core.builtin`` builds the calibration's candidates: VP
        trailing timesteps (last step to the clean sample), no clipping, predicting the output type (ε; v / x0
        on diffusers' zero-SNR schedules, ``builtin.zero_snr_solver_config``); flow with the model's shift."""
        if self.flow:
            return builtin_scheduler(self.name, dict(self.process_config), "config", linear=True)
        return builtin_scheduler(self.name, {**self.process_config, "prediction_type": self.output_type}, "trailing", linear=True)

    def set_timesteps(self, scheduler, num_steps: int) -> None:
        scheduler.set_timesteps(num_steps, **({} if self.mu is None else {"mu": self.mu}))

    def own_rows(self, num_steps: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(timesteps (K,), rows (K-start, K-start+1))``: the solver's own ``num_steps`` timesteps (int64 VP,
        float64 flow) and its steps from index ``start`` on, from the sample there."""
        key = ("own", num_steps, start)
        if key not in self.cache:
            scheduler = self.scheduler()
            self.set_timesteps(scheduler, num_steps)
            raw = scheduler.timesteps
            timesteps = raw.double().numpy() if self.flow else raw.numpy().astype(np.int64)
            if start and hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            self.cache[key] = timesteps, basis_rows(scheduler, list(raw[start:]))
        return self.cache[key]

    def rows_on(self, timesteps: Sequence[float]) -> np.ndarray:
        """``(n, n+1)`` rows of the solver on exactly ``timesteps`` (n of them, strictly decreasing model
        timesteps: int train timesteps for VP, ``sigma * T`` for flow), from the sample at the first one."""
        timesteps = np.asarray(timesteps, dtype=np.float64)
        key = ("on", tuple(timesteps.tolist()))
        if key not in self.cache:
            if self.name == "ddim":
                rows = self.ddim_rows(timesteps.astype(np.int64))
            elif self.name == "flow-euler":
                rows = euler_rows(timesteps / self.num_train_timesteps)
            else:
                rows = self.multistep_rows(timesteps)
            self.cache[key] = timesteps, rows
        return self.cache[key][1]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.process_config.get("num_train_timesteps", 1000))

    def ddim_rows(self, timesteps: np.ndarray) -> np.ndarray:
        """Deterministic DDIM on ``timesteps`` ending at ᾱ = 1, in float64 on the exact schedule, over the output type."""
        alphas = alphas_cumprod_from_config(dict(self.process_config))
        current = alphas[timesteps]
        following = np.append(alphas[timesteps[1:]], 1.0)
        a, b = ddim_step_coefficients(current, following, self.output_type)
        n = len(timesteps)
        rows, previous = np.zeros((n, n + 1)), np.eye(1, n + 1)[0]
        for i in range(n):
            rows[i] = a[i] * previous
            rows[i, i + 1] += b[i]
            previous = rows[i]
        return rows

    def multistep_rows(self, timesteps: np.ndarray) -> np.ndarray:
        """A multistep solver (DPM-Solver++, UniPC, DEIS) on ``timesteps``: its tables for ``len(timesteps)``
        steps with the timesteps and their sigmas replaced (VP ``sqrt((1 - ᾱ) / ᾱ)`` of its own ᾱ, flow ``t / T``),
        the final sigma its own."""
        scheduler = self.scheduler()
        self.set_timesteps(scheduler, len(timesteps))
        final = scheduler.sigmas[-1:].clone()
        if self.flow:
            sigmas = torch.from_numpy(timesteps / self.num_train_timesteps)
            scheduler.timesteps = torch.from_numpy(timesteps)
        else:
            steps = torch.from_numpy(timesteps.astype(np.int64))
            alphas = scheduler.alphas_cumprod[steps].double()
            sigmas = ((1 - alphas) / alphas) ** 0.5
            scheduler.timesteps = steps
        scheduler.sigmas = torch.cat([sigmas.to(final.dtype), final])
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return basis_rows(scheduler, list(scheduler.timesteps))


def ddim_step_coefficients(current: np.ndarray, following: np.ndarray, output_type: str) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` of the DDIM steps ``x' = a x + b o`` from ᾱ = ``current`` to ᾱ = ``following``, with ``o`` the
    model output in ``output_type`` form (ε; v, finite at ᾱ = 0; or the clean sample x0)."""
    s, r = np.sqrt(current), np.sqrt(1.0 - current)
    s_next, r_next = np.sqrt(following), np.sqrt(1.0 - following)
    if output_type == "epsilon":  # x0 = (x - r eps) / s
        return s_next / s, r_next - s_next * r / s
    if output_type == "v_prediction":  # x0 = s x - r v, eps = r x + s v
        return s_next * s + r_next * r, r_next * s - s_next * r
    if output_type == "sample":  # eps = (x - s x0) / r
        return r_next / r, s_next - r_next * s / r
    raise ValueError(f"DDIM over {output_type!r} outputs: expected epsilon, v_prediction or sample")


def euler_rows(sigmas: np.ndarray) -> np.ndarray:
    """``(n, n+1)`` flow-matching Euler rows ``x_{i+1} = x_i + (σ_{i+1} - σ_i) v_i`` on ``sigmas (n,)``, ending at σ = 0."""
    n = len(sigmas)
    steps = np.diff(np.append(sigmas, 0.0))
    rows = np.zeros((n, n + 1))
    rows[:, 0] = 1.0
    for i in range(n):
        rows[i:, i + 1] = steps[i]
    return rows
