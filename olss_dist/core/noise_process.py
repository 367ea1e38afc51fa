"""Noise processes: what a model's states are, and the teacher's deterministic steps between them.

OLSS needs only that each teacher step is linear in the current state and the model output, so one
small object per model family serves the teacher, the built-in solvers and the scheduler:

- ``VPProcess`` (DDPM-trained models: SD 1.x/2.x, SDXL): ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε``; the
  teacher is deterministic DDIM over "trailing" train timesteps ``T-1 … 0``, ending at ᾱ = 1; the
  denoiser returns ε at an int train timestep. Zero terminal SNR (ᾱ_{T-1} = 0, ``rescale_betas_zero_snr``):
  the ε step divides by √ᾱ, so the outputs are v (or x0 for "sample" models) and DDIM is written in that
  form (``vp_output_type``, ``core.teacher.vp_step_coefficients``).
- ``FlowMatchingProcess`` (SD3/SD3.5, Flux): ``x_σ = (1 - σ) x0 + σ noise``; the model predicts the
  velocity ``v = noise - x0``; the teacher is one Euler step ``x_{σ'} = x_σ + (σ' - σ) v`` per timestep of
  the model's own ``FlowMatchEulerDiscreteScheduler`` schedule (its shift, or ``mu`` with dynamic
  shifting), ending at σ = 0; the denoiser is called at the pipeline's float timestep ``t = σ·1000``.

``noise_process_from_config(scheduler_config, mu=...)`` picks the process a diffusers scheduler config names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

import numpy as np

from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.core.teacher import TeacherSchedule, ddim_schedule, trailing_timesteps

FLOW_CONFIG_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


class NoiseProcess(ABC):
    """A model's forward noise process and its deterministic N-step teacher.

    Attributes:
        kind: ``"vp"`` or ``"flow"``.
        num_train_timesteps: the model's train timesteps T (1000 for every supported family).
        output_type: what the denoiser returns: ``"epsilon"`` (VP; adapters convert v-prediction), for VP
            models with zero terminal SNR ``"v_prediction"`` or ``"sample"`` (``vp_output_type``), or
            ``"flow_prediction"`` (the velocity).
    """

    kind: str
    num_train_timesteps: int
    output_type: str

    @abstractmethod
    def teacher_schedule(self, num_steps: int) -> TeacherSchedule:
        """The teacher's ``num_steps`` steps (model timesteps and step coefficients)."""

    @abstractmethod
    def scheduler_config(self) -> dict[str, Any]:
        """The diffusers scheduler config that names this process (built-ins and OLSSScheduler read it)."""


class VPProcess(NoiseProcess):
    """Variance-preserving diffusion with cumulative alphas ``alphas_cumprod (T,)`` float64.

    Args:
        alphas_cumprod: ``(T,)`` the model's ᾱ_t, decreasing in t.
        config: the model's scheduler config (kept for built-ins: beta schedule, spacing, offsets; its
            ``prediction_type`` names the outputs when ``alphas_cumprod[-1] == 0``).

    Attributes:
        output_type: ``vp_output_type``'s answer for this schedule and config: ``"epsilon"`` unless ᾱ_{T-1} = 0.

    Raises:
        ValueError: ᾱ_{T-1} = 0 with an epsilon (or unknown) ``prediction_type`` (see ``zero_snr_output_type``).
    """

    kind = "vp"
    output_type = "epsilon"

    def __init__(self, alphas_cumprod: Any, config: dict[str, Any] | None = None) -> None:
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        if self.alphas_cumprod.ndim != 1 or self.alphas_cumprod.size < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D array of at least 2 values, got shape {self.alphas_cumprod.shape}")
        self.num_train_timesteps = int(self.alphas_cumprod.size)
        self._config = dict(config or {"num_train_timesteps": self.num_train_timesteps})
        self.output_type = zero_snr_output_type(self.alphas_cumprod[-1], self._config.get("prediction_type", "epsilon"))

    @property
    def zero_terminal_snr(self) -> bool:
        """ᾱ_{T-1} = 0: pure noise at the first trailing timestep (``rescale_betas_zero_snr``)."""
        return bool(self.alphas_cumprod[-1] == 0.0)

    def teacher_schedule(self, num_steps: int) -> TeacherSchedule:
        """Trailing DDIM over ``num_steps`` train timesteps, its outputs in ``output_type`` form."""
        timesteps = trailing_timesteps(num_steps, self.num_train_timesteps)
        if self.output_type == "epsilon":
            return ddim_schedule(timesteps, self.alphas_cumprod)
        return ddim_schedule(timesteps, self.alphas_cumprod, output_type=self.output_type)

    def scheduler_config(self) -> dict[str, Any]:
        return dict(self._config)


class FlowMatchingProcess(NoiseProcess):
    """Rectified flow ``x_σ = (1 - σ) x0 + σ noise`` on the schedule of a ``FlowMatchEulerDiscreteScheduler`` config.

    Args:
        config: the model's scheduler config (``shift``, ``use_dynamic_shifting``, ...).
        mu: the dynamic shift (Flux: from the image sequence length); required when the config has
            ``use_dynamic_shifting``, refused otherwise.
    """

    kind = "flow"
    output_type = "flow_prediction"

    def __init__(self, config: dict[str, Any], mu: float | None = None) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self._config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self._config)
        dynamic = bool(self.scheduler.config.use_dynamic_shifting)
        if dynamic and mu is None:
            raise ValueError("mu: the scheduler config uses dynamic shifting, so the teacher needs mu (from the image size)")
        if not dynamic and mu is not None:
            raise ValueError(f"mu: the scheduler config has a fixed shift ({self.scheduler.config.shift}); mu={mu} would be ignored")
        if self.scheduler.config.stochastic_sampling or self.scheduler.config.invert_sigmas:
            raise ValueError("the flow scheduler config samples stochastically or inverts sigmas: no deterministic teacher")
        self.mu = None if mu is None else float(mu)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def sigmas(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """``(timesteps (N,), sigmas (N+1,))`` float64 of the scheduler's own ``num_steps`` schedule (last σ = 0)."""
        self.scheduler.set_timesteps(num_steps, mu=self.mu)
        timesteps = self.scheduler.timesteps.double().cpu().numpy()
        sigmas = self.scheduler.sigmas.double().cpu().numpy()
        if sigmas.shape != (num_steps + 1,) or sigmas[-1] != 0.0:
            raise ValueError(f"the flow scheduler's {num_steps}-step schedule does not end at sigma 0")
        return timesteps, sigmas

    def teacher_schedule(self, num_steps: int) -> TeacherSchedule:
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        timesteps, sigmas = self.sigmas(num_steps)
        return TeacherSchedule(timesteps, np.ones(num_steps), np.diff(sigmas), integer_timesteps=False)

    def scheduler_config(self) -> dict[str, Any]:
        return dict(self._config)


def zero_snr_output_type(terminal_alpha: float, prediction_type: str) -> str:
    """The form of a VP model's outputs given its last ᾱ and its ``prediction_type`` (contract C1).

    ``"epsilon"`` unless ``terminal_alpha == 0``; then ``"v_prediction"`` or ``"sample"`` as the model predicts.

    Raises:
        ValueError: ``terminal_alpha == 0`` with ``prediction_type`` epsilon (an ε model cannot be sampled from
            ᾱ = 0: x0 = (x - √(1-ᾱ) ε) / √ᾱ) or anything other than v / sample.
    """
    if float(terminal_alpha) != 0.0:
        return "epsilon"
    if prediction_type in ("v_prediction", "sample"):
        return prediction_type
    raise ValueError(
        f"prediction_type {prediction_type!r} with zero terminal SNR (alphas_cumprod = 0 at the last train timestep, "
        "rescale_betas_zero_snr): an epsilon model cannot be sampled from pure noise; zero-SNR models must predict "
        "v_prediction or sample"
    )


def vp_output_type(config: Mapping[str, Any]) -> str:
    """What a VP model's teacher, built-ins and OLSS plans combine, from its diffusers scheduler config (C1).

    ``"epsilon"`` unless the schedule's terminal ᾱ (after ``rescale_betas_zero_snr``) is 0; then
    ``"v_prediction"`` for a v-prediction config and ``"sample"`` for a sample one. Every model whose ᾱ stays
    above 0 keeps ε (adapters convert v), so plans and artifacts made before zero-SNR support stay valid.

    Raises:
        ValueError: zero terminal SNR with ``prediction_type`` ``"epsilon"`` (one line), or a beta schedule
            ``alphas_cumprod_from_config`` does not know.
    """
    config = dict(config)
    return zero_snr_output_type(alphas_cumprod_from_config(config)[-1], config.get("prediction_type", "epsilon"))


def is_flow_config(config: dict[str, Any]) -> bool:
    """True for a flow-matching scheduler config (``FlowMatch*`` class, ``use_flow_sigmas`` or flow prediction)."""
    name = str(config.get("_class_name", ""))
    return (
        name.startswith("FlowMatch")
        or bool(config.get("use_flow_sigmas", False))
        or config.get("prediction_type") == "flow_prediction"
        or ("shift" in config and "beta_schedule" not in config and "trained_betas" not in config)
    )


def noise_process_from_config(config: dict[str, Any], mu: float | None = None) -> NoiseProcess:
    """The noise process a diffusers scheduler config names (see the module docstring).

    Raises:
        ValueError: an unsupported beta schedule, or ``mu`` missing / superfluous for a flow config.
    """
    config = dict(config)
    if is_flow_config(config):
        return FlowMatchingProcess(config, mu=mu)
    if mu is not None:
        raise ValueError(f"mu: only flow-matching schedulers take a dynamic shift, got mu={mu} for a VP scheduler config")
    return VPProcess(alphas_cumprod_from_config(config), config)
