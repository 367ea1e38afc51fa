"""A diffusers scheduler that replays OLSS plans.

Each planned step is a fixed linear combination of the initial noise and the model outputs seen so
far, ``x_{i+1} = c[i, 0] x_T + sum_{j <= i} c[i, j+1] eps_j``. The scheduler keeps ``x_T`` and the
outputs of the current run and resets them in ``set_timesteps``.

It depends on ``olss_dist.core`` only; ``from_pretrained`` of a published run's URI asks the artifact
store (``olss_dist.artifacts.fetch_run``) for a verified local copy first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.core.onpolicy import apply_step
from olss_dist.core.plan import Plan
from olss_dist.core.teacher import validate_timesteps

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
    return {
        "num_steps": plan.num_steps,
        "timesteps": plan.timesteps.tolist(),
        "coefficients": plan.coefficients.tolist(),
        "nodes": plan.nodes,
        "fit": plan.fit,
        "spacing": plan.spacing,
    }


class OLSSScheduler(SchedulerMixin, ConfigMixin):
    """Replays OLSS plans (one per supported step count) in a standard diffusers sampling loop.

    Args:
        num_train_timesteps (`int`, defaults to 1000): train timesteps of the model.
        plans (`list[dict]`, defaults to `[]`): one entry per step count K with ``num_steps``, ``timesteps``
            (K train timesteps, decreasing), ``coefficients`` (K rows of K+1 floats), and informative
            ``nodes``, ``fit`` and ``spacing``.
        prediction_type (`str`, defaults to `"epsilon"`): what the model outputs; ``"v_prediction"`` and
            ``"sample"`` are converted to epsilon with the beta schedule below before the plan is applied.
        beta_start (`float`, defaults to 0.00085), beta_end (`float`, defaults to 0.012),
        beta_schedule (`str`, defaults to `"scaled_linear"`), trained_betas (`list[float]`, optional):
            the model's noise schedule (as ``noise_schedule.alphas_cumprod_from_config`` reads it), used for
            that conversion and for ``pred_original_sample``.
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
    ):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        schedule = {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
                    "beta_schedule": beta_schedule, "trained_betas": trained_betas}
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod_from_config(schedule))
        self.plans_by_steps = {}
        for entry in plans or []:
            self.plans_by_steps[int(entry["num_steps"])] = self.checked_plan_entry(entry, num_train_timesteps)
        if len(self.plans_by_steps) != len(plans or []):
            raise ValueError("plans must have distinct num_steps")
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.long)
        self.coefficients: torch.Tensor | None = None
        self.reset_run()

    @staticmethod
    def checked_plan_entry(entry: dict[str, Any], num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
        """``(timesteps (K,) int64, coefficients (K, K+1) float64)`` of a config entry, validated."""
        steps = int(entry["num_steps"])
        timesteps = np.asarray(entry["timesteps"])
        coefficients = np.asarray(entry["coefficients"], dtype=np.float64)
        if timesteps.shape != (steps,) or coefficients.shape != (steps, steps + 1):
            raise ValueError(f"plan for {steps} steps has timesteps {timesteps.shape} and coefficients {coefficients.shape}")
        try:
            timesteps = validate_timesteps(timesteps, num_train_timesteps)
        except ValueError as error:
            raise ValueError(f"plan for {steps} steps: {error}") from None
        if not np.all(np.isfinite(coefficients)):
            raise ValueError(f"plan for {steps} steps has non-finite coefficients")
        return timesteps, coefficients

    @classmethod
    def from_plans(cls, plans: Sequence[Plan], num_train_timesteps: int = 1000, **config: Any) -> "OLSSScheduler":
        """A scheduler serving every plan in ``plans`` (one per step count)."""
        return cls(num_train_timesteps=num_train_timesteps, plans=[plan_config(p) for p in plans], **config)

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

    def reset_run(self) -> None:
        """Forget the initial noise and outputs of the previous run."""
        self.initial_noise: torch.Tensor | None = None
        self.outputs: list[torch.Tensor] = []
        self.step_index = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None, **kwargs: Any) -> None:
        """Select the plan for ``num_inference_steps`` and start a new run.

        Raises:
            ValueError: no plan for that step count (the message names the available ones).
        """
        if kwargs.get("timesteps") is not None or kwargs.get("sigmas") is not None:
            raise ValueError("OLSSScheduler uses the timesteps of its plans; custom timesteps or sigmas are not supported")
        if num_inference_steps not in self.plans_by_steps:
            raise ValueError(
                f"OLSSScheduler has no plan for {num_inference_steps} steps; available: {self.available_steps}"
            )
        timesteps, coefficients = self.plans_by_steps[num_inference_steps]
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.coefficients = torch.from_numpy(coefficients)
        self.reset_run()

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def epsilon(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """The model output converted to epsilon according to ``prediction_type``."""
        alpha = float(self.alphas_cumprod[timestep])
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "v_prediction":
            return alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
        return (sample - alpha**0.5 * model_output) / (1 - alpha) ** 0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> OLSSSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Apply row ``i`` of the plan, ``i`` being the number of steps taken since ``set_timesteps``.

        Args:
            model_output: ``(B, *latent_shape)`` the model's (guided) output at ``timestep``.
            timestep: the train timestep of this step; must be the plan's ``timesteps[i]``.
            sample: ``(B, *latent_shape)`` the current state (``x_T`` at the first step).
        """
        if self.coefficients is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        i = self.step_index
        if i >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps of this run are done; call set_timesteps again")
        timestep = int(timestep)
        if timestep != int(self.timesteps[i]):
            raise ValueError(
                f"step {i} of the {self.num_inference_steps}-step plan expects timestep {int(self.timesteps[i])}, got "
                f"{timestep}; OLSS plans run from pure noise through their own timesteps (no img2img start)"
            )
        if i == 0:
            self.initial_noise = sample.to(torch.float32)
        epsilon = self.epsilon(model_output.to(torch.float32), timestep, sample.to(torch.float32))
        self.outputs.append(epsilon)
        prev = apply_step(self.coefficients[i, : i + 2].tolist(), self.initial_noise, self.outputs)
        alpha = float(self.alphas_cumprod[timestep])
        pred_original = (sample.to(torch.float32) - (1 - alpha) ** 0.5 * epsilon) / alpha**0.5
        self.step_index = i + 1
        prev, pred_original = prev.to(sample.dtype), pred_original.to(sample.dtype)
        if not return_dict:
            return prev, pred_original
        return OLSSSchedulerOutput(prev_sample=prev, pred_original_sample=pred_original)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
