"""A diffusers scheduler that replays OLSS plans, for VP models (SD 1.x/2.x) and flow-matching ones (SD3, Flux).

Each planned step is a fixed linear combination of the initial noise and the model outputs seen so
far, ``x_{i+1} = c[i, 0] x_T + sum_{j <= i} c[i, j+1] o_j``, ``o_j`` being epsilon (VP; v-prediction and
sample outputs are converted) or the velocity (flow matching). The scheduler keeps ``x_T`` and the outputs
of the current run and resets them in ``set_timesteps``.

It depends on ``olss_dist.core`` only; ``from_plans(..., scheduler_config=...)`` takes the noise process
over from any diffusers scheduler config, and ``from_pretrained`` of a published run's URI asks the
artifact store (``olss_dist.artifacts.fetch_run``) for a verified local copy first.

Why this module is long: one class serves both families as their diffusers pipelines call it (one code
path for the replay, the timestep checks and the dtypes), next to the translation of a model's scheduler
config into the settings that name its noise process, which ``from_plans`` needs and nothing else does.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from olss_dist.core.noise_process import is_flow_config
from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.core.onpolicy import apply_step
from olss_dist.core.plan import Plan
from olss_dist.core.teacher import check_model_timesteps, validate_timesteps

FLOW_PREDICTION = "flow_prediction"
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")
# What names a VP process in a diffusers config, with diffusers' DDPM defaults for the keys a config lacks.
VP_PROCESS_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                       "trained_betas": None, "rescale_betas_zero_snr": False, "prediction_type": "epsilon"}
# What names a flow process in a FlowMatchEulerDiscreteScheduler config: its teacher schedule, and the mu that
# the SD3 / Flux pipelines compute from the image size.
FLOW_PROCESS_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                     "base_image_seq_len", "max_image_seq_len")
# FlowMatchEulerDiscreteScheduler settings that change its schedule and that OLSSScheduler does not carry: other
# values are refused (the teacher would not be the one scheduler_config.json names).
FLOW_FIXED_SETTINGS = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
                       "use_exponential_sigmas": False, "use_beta_sigmas": False, "time_shift_type": "exponential",
                       "stochastic_sampling": False}


@dataclass
class OLSSSchedulerOutput(BaseOutput):
    """Output of ``OLSSScheduler.step``.

    Args:
        prev_sample: ``(B, *latent_shape)`` the next state ``x_{i+1}``.
        pred_original_sample: ``(B, *latent_shape)`` the clean sample predicted from the current output.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def plan_config(plan: Plan) -> dict[str, Any]:
    """The part of a plan the scheduler needs, as plain JSON lists."""
    return {"num_steps": plan.num_steps, "timesteps": plan.timesteps.tolist(), "coefficients": plan.coefficients.tolist(),
            "nodes": plan.nodes, "fit": plan.fit, "spacing": plan.spacing}


def process_settings(scheduler_config: Mapping[str, Any], mu: float | None = None) -> dict[str, Any]:
    """The ``OLSSScheduler`` arguments naming the noise process of a diffusers scheduler config.

    Flow (``FlowMatchEulerDiscreteScheduler``): ``FLOW_PROCESS_KEYS`` (diffusers' defaults filled in),
    ``prediction_type="flow_prediction"`` and ``mu``; VP: ``VP_PROCESS_DEFAULTS``' keys. An ``OLSSScheduler``
    config gives its own.

    Raises:
        ValueError: a config whose process OLSSScheduler cannot carry (another flow scheduler class, a setting
            of ``FLOW_FIXED_SETTINGS`` changed, an unknown flow setting, a VP config with no beta schedule or
            an unsupported one), or ``mu`` with a fixed shift.
    """
    config = dict(scheduler_config)
    name = config.get("_class_name")
    if name == OLSSScheduler.__name__ or "plans" in config:
        keys = [*VP_PROCESS_DEFAULTS, *FLOW_PROCESS_KEYS, "mu"]
        settings = {key: config[key] for key in keys if key in config}
        if mu is not None:
            settings["mu"] = mu
        return settings
    if is_flow_config(config):
        return flow_settings(config, mu)
    if mu is not None:
        raise ValueError(f"mu: only flow-matching scheduler configs take a dynamic shift, got mu={mu} for a VP config")
    if "beta_schedule" not in config and config.get("trained_betas") is None:
        raise ValueError(
            f"scheduler_config: {name or 'the config'} names no noise process OLSSScheduler supports (VP configs have "
            "beta_schedule or trained_betas; flow ones are FlowMatchEulerDiscreteScheduler configs)"
        )
    settings = {key: config.get(key, default) for key, default in VP_PROCESS_DEFAULTS.items()}
    try:
        alphas_cumprod_from_config(settings)
    except ValueError as error:
        raise ValueError(f"scheduler_config: {error}") from None
    return settings


def flow_settings(config: dict[str, Any], mu: float | None) -> dict[str, Any]:
    """``process_settings`` of a flow config (see there)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    # a diffusers scheduler's .config has no _class_name: other flow solvers are told apart by their own keys
    name = config.get("_class_name") or ("a use_flow_sigmas solver" if "use_flow_sigmas" in config else None)
    if name is not None and name != FlowMatchEulerDiscreteScheduler.__name__:
        raise ValueError(
            f"scheduler_config: {name} config; flow-matching plans take the model's FlowMatchEulerDiscreteScheduler "
            "config (its shift and dynamic shifting name the noise process)"
        )
    if config.get("prediction_type", FLOW_PREDICTION) != FLOW_PREDICTION:
        raise ValueError(f"scheduler_config: prediction_type {config['prediction_type']!r} in a flow-matching config")
    known = {*FLOW_PROCESS_KEYS, *FLOW_FIXED_SETTINGS, "prediction_type"}
    unknown = sorted(key for key in config if not key.startswith("_") and key not in known)
    if unknown:
        raise ValueError(f"scheduler_config: flow settings OLSSScheduler does not carry: {unknown}")
    for key, default in FLOW_FIXED_SETTINGS.items():
        if config.get(key, default) != default:
            raise ValueError(f"scheduler_config: {key}={config[key]!r} changes the flow schedule; OLSSScheduler needs {default!r}")
    filled = FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in config.items() if k in FLOW_PROCESS_KEYS}).config
    if mu is not None and not filled.use_dynamic_shifting:
        raise ValueError(f"mu: the scheduler config has a fixed shift ({filled.shift}); mu={mu} would be ignored")
    settings = {key: filled[key] for key in FLOW_PROCESS_KEYS}
    return {**settings, "prediction_type": FLOW_PREDICTION, "mu": None if mu is None else float(mu)}


class OLSSScheduler(SchedulerMixin, ConfigMixin):
    """Replays OLSS plans (one per supported step count) in a standard diffusers sampling loop.

    The config names the model's noise process, so ``scheduler_config.json`` alone rebuilds it
    (``core.noise_process.noise_process_from_config(config, mu=config.mu)``); ``from_plans(plans,
    scheduler_config=...)`` fills it from the model's own scheduler config.

    Args:
        num_train_timesteps (`int`, defaults to 1000): train timesteps T of the model.
        plans (`list[dict]`, defaults to `[]`): one entry per step count K with ``num_steps``, ``timesteps``
            (K model timesteps, strictly decreasing: int train timesteps in ``[0, T)`` for VP, float
            ``sigma * T`` in ``[0, T]`` for flow matching), ``coefficients`` (K rows of K+1 floats), and
            informative ``nodes``, ``fit`` and ``spacing``.
        prediction_type (`str`, defaults to `"epsilon"`): what the model outputs. ``"flow_prediction"``: the
            velocity ``v = noise - x0`` of a flow-matching model (SD3, Flux), which the plans combine as is;
            ``"epsilon"``, ``"v_prediction"`` and ``"sample"``: a VP model, converted to epsilon with the
            beta schedule below before the plan is applied.
        beta_start (`float`, defaults to 0.00085), beta_end (`float`, defaults to 0.012),
        beta_schedule (`str`, defaults to `"scaled_linear"`), trained_betas (`list[float]`, optional),
        rescale_betas_zero_snr (`bool`, defaults to `False`): VP only, the model's noise schedule (as
            ``noise_schedule.alphas_cumprod_from_config`` reads it), used for that conversion and for
            ``pred_original_sample``.
        shift (`float`, defaults to 1.0), use_dynamic_shifting (`bool`, defaults to `False`),
        base_shift (`float`, defaults to 0.5), max_shift (`float`, defaults to 1.15),
        base_image_seq_len (`int`, defaults to 256), max_image_seq_len (`int`, defaults to 4096): flow only,
            the model's ``FlowMatchEulerDiscreteScheduler`` settings (its teacher schedule; Flux and SD3
            pipelines compute ``mu`` from the last four). Sampling replays the plans' own timesteps.
        mu (`float`, optional): flow with dynamic shifting only, the ``mu`` (image size) the plans were
            calibrated at; ``set_timesteps`` warns when a pipeline passes another.
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        plans: list[dict[str, Any]] | None = None,
        prediction_type: str = "epsilon",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        mu: float | None = None,
    ):
        if prediction_type not in (*VP_PREDICTIONS, FLOW_PREDICTION):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {[*VP_PREDICTIONS, FLOW_PREDICTION]}")
        self.is_flow = prediction_type == FLOW_PREDICTION
        if mu is not None and not (self.is_flow and use_dynamic_shifting):
            raise ValueError(f"mu: only flow-matching configs with use_dynamic_shifting record a calibration mu, got mu={mu}")
        self.alphas_cumprod: torch.Tensor | None = None
        if not self.is_flow:
            schedule = {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
                        "beta_schedule": beta_schedule, "trained_betas": trained_betas,
                        "rescale_betas_zero_snr": rescale_betas_zero_snr}
            self.alphas_cumprod = torch.from_numpy(alphas_cumprod_from_config(schedule))
        self.plans_by_steps = {}
        for entry in plans or []:
            self.plans_by_steps[int(entry["num_steps"])] = self.checked_plan_entry(entry, num_train_timesteps, self.is_flow)
        if len(self.plans_by_steps) != len(plans or []):
            raise ValueError("plans must have distinct num_steps")
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.float32 if self.is_flow else torch.long)
        self.sigmas = torch.empty(0, dtype=torch.float32)  # flow only: (K+1,) sigma of each state, ending at 0
        self.coefficients: torch.Tensor | None = None
        self.plan_timesteps: np.ndarray | None = None
        self._begin_index: int | None = None
        self.reset_run()

    @staticmethod
    def checked_plan_entry(entry: dict[str, Any], num_train_timesteps: int, flow: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(timesteps (K,) int64 (VP) or float64 (flow), coefficients (K, K+1) float64)`` of a config entry, validated."""
        steps = int(entry["num_steps"])
        timesteps = np.asarray(entry["timesteps"])
        coefficients = np.asarray(entry["coefficients"], dtype=np.float64)
        if timesteps.shape != (steps,) or coefficients.shape != (steps, steps + 1):
            raise ValueError(f"plan for {steps} steps has timesteps {timesteps.shape} and coefficients {coefficients.shape}")
        try:
            if flow:  # float sigma * T, whole-valued ones included
                timesteps = check_model_timesteps(timesteps.astype(np.float64), num_train_timesteps)
            else:
                timesteps = validate_timesteps(timesteps, num_train_timesteps)
        except ValueError as error:
            raise ValueError(f"plan for {steps} steps: {error}") from None
        if not np.all(np.isfinite(coefficients)):
            raise ValueError(f"plan for {steps} steps has non-finite coefficients")
        return timesteps, coefficients

    @classmethod
    def from_plans(
        cls,
        plans: Sequence[Plan],
        num_train_timesteps: int | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        mu: float | None = None,
        **config: Any,
    ) -> "OLSSScheduler":
        """A scheduler serving every plan in ``plans`` (one per step count).

        Args:
            scheduler_config: the model's diffusers scheduler config (a ``FlowMatchEulerDiscreteScheduler``'s for
                flow models, any VP scheduler's otherwise); its noise process is taken over (``process_settings``).
            mu: flow with dynamic shifting: the ``mu`` the plans were calibrated at (recorded in the config).
            num_train_timesteps, config: further ``OLSSScheduler`` arguments; they override the scheduler config's.

        Raises:
            ValueError: a scheduler config OLSSScheduler cannot honour (see ``process_settings``), or plans that
                do not fit the process (integer VP timesteps, float flow timesteps ``sigma * T``).
        """
        settings = {"mu": mu} if scheduler_config is None else process_settings(scheduler_config, mu)
        if num_train_timesteps is not None:
            settings["num_train_timesteps"] = num_train_timesteps
        settings.update(config)
        return cls(plans=[plan_config(p) for p in plans], **settings)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Load from a folder or hub id as diffusers does, or from a published run by URI.

        ``s3://``, ``gs://``, ``file://`` run URIs, a model's ``latest`` location and local run folders
        (with ``manifest.json``) are downloaded and verified by ``olss_dist.artifacts.fetch_run`` first.
        """
        # Imported here, not at the top: the scheduler is maths over core/; only a published run's URI needs
        # the artifact store (fsspec), and pipelines that load from a plain folder never import it.
        from olss_dist.artifacts import fetch_run, is_artifact_location

        if pretrained_model_name_or_path is not None and is_artifact_location(pretrained_model_name_or_path):
            pretrained_model_name_or_path = fetch_run(str(pretrained_model_name_or_path), storage_options=storage_options)
        return super().from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, return_unused_kwargs=return_unused_kwargs, **kwargs
        )

    @property
    def available_steps(self) -> list[int]:
        return sorted(self.plans_by_steps)

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Pipelines call this before their loop; OLSS plans start at their first timestep only (index 0)."""
        if begin_index != 0:
            raise ValueError(
                f"begin_index: OLSS plans run from pure noise through their own timesteps (0), got {begin_index}; "
                "img2img and inpainting starts mid-way are not supported"
            )
        self._begin_index = begin_index

    def reset_run(self) -> None:
        """Forget the initial noise and outputs of the previous run."""
        self.initial_noise: torch.Tensor | None = None
        self.outputs: list[torch.Tensor] = []
        self.step_index = 0

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        """Select the plan for ``num_inference_steps`` and start a new run.

        Flow models: ``sigmas`` (Flux always passes its default ``linspace(1, 1/K, K)``) only give the step
        count when ``num_inference_steps`` is None; the plan's own timesteps are replayed (a warning when
        they were not the default); ``mu`` is accepted (a warning when it differs from the calibration's).

        Raises:
            ValueError: custom ``timesteps`` (any model) or ``sigmas`` / ``mu`` (VP models), ``sigmas`` of
                another length than ``num_inference_steps``, or no plan for that step count (the message
                names the available ones).
        """
        if timesteps is not None or (sigmas is not None and not self.is_flow):
            raise ValueError("OLSSScheduler uses the timesteps of its plans; custom timesteps or sigmas are not supported")
        if mu is not None and not self.is_flow:
            raise ValueError(f"mu: only flow-matching schedulers take a dynamic shift, got mu={mu}")
        if sigmas is not None:
            if num_inference_steps is None:
                num_inference_steps = len(sigmas)
            elif len(sigmas) != num_inference_steps:
                raise ValueError(f"sigmas: {len(sigmas)} values for num_inference_steps={num_inference_steps}")
        if num_inference_steps not in self.plans_by_steps:
            raise ValueError(
                f"OLSSScheduler has no plan for {num_inference_steps} steps; available: {self.available_steps}"
            )
        plan_timesteps, coefficients = self.plans_by_steps[num_inference_steps]
        self.num_inference_steps = num_inference_steps
        self.plan_timesteps = plan_timesteps
        self.coefficients = torch.from_numpy(coefficients)
        if self.is_flow:
            self.warn_about_pipeline_schedule(num_inference_steps, sigmas, mu)
            plan_sigmas = np.append(plan_timesteps / self.config.num_train_timesteps, 0.0)
            self.timesteps = torch.from_numpy(plan_timesteps).to(device=device, dtype=torch.float32)
            self.sigmas = torch.from_numpy(plan_sigmas).to(device=device, dtype=torch.float32)
        else:
            self.timesteps = torch.from_numpy(plan_timesteps).to(device)
        self._begin_index = None
        self.reset_run()

    def warn_about_pipeline_schedule(self, num_steps: int, sigmas: Sequence[float] | None, mu: float | None) -> None:
        """One warning line each when a pipeline's ``sigmas`` or ``mu`` are not what the plans were made for."""
        if sigmas is not None:
            given = np.asarray(sigmas, dtype=np.float64)
            flux_default = np.linspace(1.0, 1.0 / num_steps, num_steps)
            own = self.plan_timesteps / self.config.num_train_timesteps
            if not (np.allclose(given, flux_default, rtol=0, atol=1e-6) or np.allclose(given, own, rtol=0, atol=1e-6)):
                warnings.warn(f"sigmas: OLSSScheduler ignores the custom sigmas and replays its {num_steps}-step plan's own timesteps",
                              stacklevel=3)
        calibrated = self.config.mu
        if mu is not None and calibrated is not None and abs(float(mu) - calibrated) > 1e-6 * max(1.0, abs(calibrated)):
            warnings.warn(f"mu: the pipeline's mu={float(mu):.6g} (its image size) differs from mu={calibrated:.6g} the plans "
                          "were calibrated at; the plans' own timesteps are replayed (calibrate at this resolution)",
                          stacklevel=3)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | float | None = None) -> torch.Tensor:
        return sample

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Flow only: ``x_sigma = (1 - sigma) sample + sigma noise`` with ``sigma = timestep / T`` (per batch element
        when ``timestep`` is ``(B,)``), as ``FlowMatchEulerDiscreteScheduler.scale_noise``."""
        if not self.is_flow:
            raise ValueError("scale_noise: only flow-matching OLSS schedulers (prediction_type='flow_prediction') have it")
        sigma = torch.as_tensor(timestep).detach().to(device=sample.device, dtype=torch.float64).reshape(-1)
        sigma = (sigma / self.config.num_train_timesteps).to(sample.dtype)
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        return sigma * noise + (1.0 - sigma) * sample

    def epsilon(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """The model output converted to epsilon according to ``prediction_type`` (VP only)."""
        alpha = float(self.alphas_cumprod[timestep])
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "v_prediction":
            return alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
        return (sample - alpha**0.5 * model_output) / (1 - alpha) ** 0.5

    def vp_original(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
        """The clean sample a VP output predicts; from v directly, so it stays finite at zero terminal SNR (alpha 0)."""
        alpha = float(self.alphas_cumprod[timestep])
        if self.config.prediction_type == "v_prediction":
            return alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output
        if self.config.prediction_type == "sample":
            return model_output
        return (sample - (1 - alpha) ** 0.5 * epsilon) / alpha**0.5

    def checked_timestep(self, i: int, timestep: int | float | torch.Tensor) -> int | float:
        """``timestep`` as the plan's ``timesteps[i]`` (int for VP, float for flow), or ValueError if it is another."""
        expected = self.plan_timesteps[i]
        given = float(timestep) if self.is_flow else int(timestep)
        # flow timesteps reach the pipeline as float32; the plan keeps them in float64
        if (self.is_flow and abs(given - expected) > 1e-5 * max(1.0, abs(expected))) or (not self.is_flow and given != expected):
            shown = f"{float(expected):g}" if self.is_flow else f"{int(expected)}"
            raise ValueError(
                f"step {i} of the {self.num_inference_steps}-step plan expects timestep {shown}, got "
                f"{given}; OLSS plans run from pure noise through their own timesteps (no img2img start)"
            )
        return float(expected) if self.is_flow else int(expected)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> OLSSSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Apply row ``i`` of the plan, ``i`` being the number of steps taken since ``set_timesteps``.

        Computed in float32 (float64 samples: float64); returned in the dtype of ``sample``.

        Args:
            model_output: ``(B, *latent_shape)`` the model's (guided) output at ``timestep``: epsilon /
                v / sample (VP) or the velocity (flow).
            timestep: the model timestep of this step; must be the plan's ``timesteps[i]``.
            sample: ``(B, *latent_shape)`` the current state (``x_T`` at the first step).

        Returns:
            ``prev_sample`` and ``pred_original_sample`` (flow: ``sample - sigma * v``).
        """
        if self.coefficients is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        i = self.step_index
        if i >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps of this run are done; call set_timesteps again")
        t = self.checked_timestep(i, timestep)
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        current = sample.to(work)
        if i == 0:
            self.initial_noise = current
        if self.is_flow:
            output = model_output.to(work)
            pred_original = current - (t / self.config.num_train_timesteps) * output
        else:
            output = self.epsilon(model_output.to(work), t, current)
            pred_original = self.vp_original(model_output.to(work), t, current, output)
        self.outputs.append(output)
        prev = apply_step(self.coefficients[i, : i + 2].tolist(), self.initial_noise, self.outputs)
        self.step_index = i + 1
        prev, pred_original = prev.to(sample.dtype), pred_original.to(sample.dtype)
        if not return_dict:
            return prev, pred_original
        return OLSSSchedulerOutput(prev_sample=prev, pred_original_sample=pred_original)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

