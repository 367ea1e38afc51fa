"""A diffusers scheduler that replays OLSS plans, for VP models (SD 1.x/2.x, SDXL) and flow-matching ones (SD3, Flux).

Each planned step is a fixed linear combination of the start sample and the model outputs seen so far,
row ``i`` giving ``x_{i+1} = c[i, 0] x_start + sum_{j <= i} c[i, j+1] o_j``; ``o_j`` is epsilon (VP;
v-prediction and sample outputs are converted), v or x0 at zero terminal SNR (``vp_output_type``), or the
velocity (flow matching). The step applies the *change* of row to the current sample,
``x_{i+1} = a_i x_i + (c_i - a_i c_{i-1}) · [x_start, o_0 … o_i]`` (``c_{-1} = e_0``, ``a_i`` DDIM's factor on
the sample, 1 for flow), which equals the row when nothing touches the latents and carries an edit of ``x_i``
(a callback, an inpainting mask) forward as DDIM does.

Step counts without a plan, and img2img / inpainting starts (``set_begin_index(s)``) without a start plan,
are served by the ``fallback_solver`` built-in in OLSS form (``core.fallback``), with one warning line.
Latents of another shape than the plans were calibrated at (another resolution) get one warning line too
(``core.scheduler_plans.ConditionsCheck``); guidance scale and negative prompt never reach a scheduler.

It depends on ``olss_dist.core`` only at import; ``from_pretrained`` of a published run's URI asks the
artifact store (``olss_dist.artifacts.fetch_run``) for a verified local copy first. The plans live in
``olss_plans.json`` beside ``scheduler_config.json`` (``core.scheduler_plans``), not in ``config``.

Why this module is long: one class serves both families as diffusers pipelines call it (plans and
fallbacks, begin indices, the incremental step, the noise process's add_noise / velocity), and it owns
its two files (config and plans) in from_pretrained / save_config / from_config.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from olss_dist.core.fallback import FallbackSolver, ddim_step_coefficients, family_solver_name
from olss_dist.core.noise_process import vp_output_type
from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.core.onpolicy import apply_step
from olss_dist.core.plan import Plan
from olss_dist.core.process_settings import (
    FLOW_PREDICTION, FLOW_PROCESS_KEYS, VP_PREDICTIONS, VP_PROCESS_DEFAULTS, process_settings,
)
from olss_dist.core.scheduler_plans import (
    PLANS_FILE_NAME, ConditionsCheck, check_conditions, json_entry, plan_config, plans_by_key, plans_document, read_plans_file,
)

DEFAULT_FALLBACK = "dpmsolver++"
# from_pretrained keywords that say where a hub file comes from; the plans file is fetched like the config.
HUB_KEYWORDS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision")


@dataclass
class OLSSSchedulerOutput(BaseOutput):
    """Output of ``OLSSScheduler.step``.

    Args:
        prev_sample: ``(B, *latent_shape)`` the next state ``x_{i+1}``.
        pred_original_sample: ``(B, *latent_shape)`` the clean sample predicted from the current output.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def one_line(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


class OLSSScheduler(SchedulerMixin, ConfigMixin):
    """Replays OLSS plans (one per step count, and per img2img start) in a standard diffusers sampling loop.

    The config names the model's noise process, so ``scheduler_config.json`` alone rebuilds it
    (``core.noise_process.noise_process_from_config(config, mu=config.mu)``); ``from_plans(plans,
    scheduler_config=...)`` fills it from the model's own scheduler config. The plans are ``scheduler.plans``
    and ``olss_plans.json``, not part of ``config``.

    Args:
        num_train_timesteps (`int`, defaults to 1000): train timesteps T of the model.
        plans (`list[dict]`, defaults to `[]`): one entry per step count K (and start step, ``start_step``;
            ``core.scheduler_plans``) with ``num_steps``, ``timesteps`` (strictly decreasing model timesteps:
            int train timesteps in ``[0, T)`` for VP, float ``sigma * T`` in ``[0, T]`` for flow matching),
            ``coefficients`` (K rows of K+1 floats over x_T and the outputs), and informative ``nodes``,
            ``fit`` and ``spacing``.
        prediction_type (`str`, defaults to `"epsilon"`): what the model outputs. ``"flow_prediction"``: the
            velocity ``v = noise - x0`` of a flow-matching model (SD3, Flux), combined as is; ``"epsilon"``,
            ``"v_prediction"`` and ``"sample"``: a VP model, converted to epsilon with the beta schedule
            below (kept as v / x0 at zero terminal SNR) before a row is applied.
        beta_start (`float`, defaults to 0.00085), beta_end (`float`, defaults to 0.012),
        beta_schedule (`str`, defaults to `"scaled_linear"`), trained_betas (`list[float]`, optional),
        rescale_betas_zero_snr (`bool`, defaults to `False`): VP only, the model's noise schedule (as
            ``noise_schedule.alphas_cumprod_from_config`` reads it; ᾱ_{T-1} = 0 exactly with the rescale).
        shift (`float`, defaults to 1.0), use_dynamic_shifting (`bool`, defaults to `False`),
        base_shift (`float`, defaults to 0.5), max_shift (`float`, defaults to 1.15),
        base_image_seq_len (`int`, defaults to 256), max_image_seq_len (`int`, defaults to 4096): flow only,
            the model's ``FlowMatchEulerDiscreteScheduler`` settings. Sampling replays the plans' own timesteps.
        mu (`float`, optional): flow with dynamic shifting only, the ``mu`` (image size) the plans were
            calibrated at; ``set_timesteps`` warns when a pipeline passes another.
        fallback_solver (`str`, defaults to `"dpmsolver++"`): the linear built-in (``core.builtin``: ``ddim``,
            ``dpmsolver++``, ``unipc``, ``deis``; ``flow-`` ones on flow models) that serves step counts and
            img2img starts without a plan, in OLSS form (DPM-Solver++ 2M, trailing, by default).
        calibrated_conditions (`dict`, optional): what the plans were calibrated under (``olss_plans.json``, not
            ``config``): the run's guidance scales, resolutions, negative prompts and ``latent_shapes``; ``step``
            warns once per latent shape outside them. None (older runs): no warning.
    """

    order = 1
    init_noise_sigma = 1.0
    plans_file_name = PLANS_FILE_NAME

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
        fallback_solver: str = DEFAULT_FALLBACK,
        calibrated_conditions: dict[str, Any] | None = None,
    ):
        self.keep_plans_out_of_config()
        if prediction_type not in (*VP_PREDICTIONS, FLOW_PREDICTION):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {[*VP_PREDICTIONS, FLOW_PREDICTION]}")
        self.is_flow = prediction_type == FLOW_PREDICTION
        if mu is not None and not (self.is_flow and use_dynamic_shifting):
            raise ValueError(f"mu: only flow-matching configs with use_dynamic_shifting record a calibration mu, got mu={mu}")
        self.alphas_cumprod: torch.Tensor | None = None
        self.betas = self.alphas = None
        self.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)  # the last step ends at the clean sample
        if self.is_flow:
            self.output_type = FLOW_PREDICTION
            self.process_config = {key: self.config[key] for key in FLOW_PROCESS_KEYS}
        else:
            self.process_config = {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
                                   "beta_schedule": beta_schedule, "trained_betas": trained_betas,
                                   "rescale_betas_zero_snr": rescale_betas_zero_snr}
            self.alphas_cumprod = torch.from_numpy(alphas_cumprod_from_config(self.process_config))
            previous = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
            self.alphas = self.alphas_cumprod / previous
            self.betas = 1.0 - self.alphas
            self.output_type = vp_output_type({**self.process_config, "prediction_type": prediction_type})
        self.fallbacks: dict[float | None, FallbackSolver] = {}
        self.fallback_name = family_solver_name(fallback_solver, self.is_flow)
        self.fallback(mu)  # refuses an unknown solver, or one that cannot carry the schedule, here
        self.plans = [json_entry(entry) for entry in plans or []]
        self.plans_by_key = plans_by_key(self.plans, num_train_timesteps, self.is_flow)
        self.calibrated_conditions = calibrated_conditions
        if not self.plans:
            one_line(f"OLSSScheduler has no plans (they live in {PLANS_FILE_NAME} beside scheduler_config.json): every "
                     f"step count is served by {self.fallback_name}; load a calibrated run with "
                     "OLSSScheduler.from_pretrained(<run URI or folder>)")
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.float32 if self.is_flow else torch.long)
        self.sigmas = torch.empty(0, dtype=torch.float32)  # flow only: (K+1,) sigma of each state, ending at 0
        self.coefficients: torch.Tensor | None = None  # (K, K+1) rows from pure noise (plan or fallback)
        self.plan_timesteps: np.ndarray | None = None
        self.serving: str | None = None  # "plan" or the fallback solver's name, for the step count
        self.rows: np.ndarray | None = None  # rows from the begin index on
        self.rows_start = 0
        self.serving_fallback: FallbackSolver | None = None  # the fallback serving the step count, if any
        self._begin_index: int | None = None
        self.reset_run()

    def keep_plans_out_of_config(self) -> None:
        """``register_to_config`` recorded ``plans`` and ``calibrated_conditions``; drop them, so that ``config`` (and
        any scheduler built from it, e.g. ``DDIMScheduler.from_config(olss.config)``) names the process only. The process settings count
        as given even where they are defaults: diffusers builds other schedulers with *their* defaults for keys
        in ``_use_default_values``, and theirs (DDPM's linear betas) are not this scheduler's."""
        internal = {key: value for key, value in self._internal_dict.items() if key not in ("plans", "calibrated_conditions")}
        if "_use_default_values" in internal:
            process = {"plans", "calibrated_conditions", *VP_PROCESS_DEFAULTS, *FLOW_PROCESS_KEYS}
            internal["_use_default_values"] = [key for key in internal["_use_default_values"] if key not in process]
            if not internal["_use_default_values"]:  # as diffusers leaves it when every key was given
                del internal["_use_default_values"]
        self._internal_dict = FrozenDict(internal)

    @property
    def calibrated_conditions(self) -> dict[str, Any] | None:
        """What the plans were calibrated under (saved in ``olss_plans.json``); setting it checks it."""
        return self.conditions_check.conditions

    @calibrated_conditions.setter
    def calibrated_conditions(self, conditions: Mapping[str, Any] | None) -> None:
        self.conditions_check = ConditionsCheck(None if conditions is None else check_conditions(conditions))

    def fallback(self, mu: float | None = None) -> FallbackSolver:
        """The fallback built-in on this scheduler's process (at a flow model's ``mu``)."""
        if mu not in self.fallbacks:
            self.fallbacks[mu] = FallbackSolver(self.fallback_name, self.process_config, self.output_type,
                                                mu if self.config.use_dynamic_shifting else None)
        return self.fallbacks[mu]

    @classmethod
    def from_plans(cls, plans: Sequence[Plan], num_train_timesteps: int | None = None,
                   scheduler_config: Mapping[str, Any] | None = None, mu: float | None = None, **config: Any) -> "OLSSScheduler":
        """A scheduler serving every plan in ``plans`` (one per step count and start step).

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
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """diffusers' ``from_config``; another scheduler's config (``pipe.scheduler.config``) gives its noise process
        (``process_settings``: refused with one ``ValueError`` line when it cannot be carried) and no plans, so the
        fallback serves (with a warning naming ``from_pretrained``). An ``OLSSScheduler`` config that still holds
        ``plans`` (written before ``olss_plans.json``) loads them; ``plans=`` passes them explicitly."""
        if isinstance(config, Mapping) and cls.is_foreign_config(config):
            own = {key: config[key] for key in ("plans", "fallback_solver") if key in config}
            config = {**process_settings(config), **own}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def is_foreign_config(cls, config: Mapping[str, Any]) -> bool:
        """True for another scheduler's config: another ``_class_name``, or keys ``__init__`` does not take."""
        name = config.get("_class_name")
        if name is not None:
            return name != cls.__name__
        return any(not key.startswith("_") and key not in cls._get_init_keys(cls) for key in config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, storage_options: dict[str, Any] | None = None, **kwargs: Any):
        """Load ``scheduler_config.json`` and ``olss_plans.json`` from a folder or hub id, or a published run by URI.

        ``s3://``, ``gs://``, ``file://`` run URIs, a model's ``latest`` location and local run folders
        (with ``manifest.json``) are downloaded and verified by ``olss_dist.artifacts.fetch_run`` first. A
        config that holds its plans itself (runs published before the plans file) needs no plans file.

        Raises:
            ValueError: a plans file that is not one (``core.scheduler_plans.read_plans_file``).
        """
        # Imported here, not at the top: the scheduler is maths over core/; only a published run's URI needs
        # the artifact store (fsspec), and pipelines that load from a plain folder never import it.
        from olss_dist.artifacts import fetch_run, is_artifact_location

        location = pretrained_model_name_or_path
        if location is not None and is_artifact_location(location):
            location = fetch_run(str(location), storage_options=storage_options)
        hub = {key: kwargs[key] for key in HUB_KEYWORDS if key in kwargs}
        config, unused = cls.load_config(location, subfolder=subfolder, return_unused_kwargs=True, **kwargs)
        if "plans" not in config and "plans" not in unused:
            entries, conditions = cls.read_plans_file(location, subfolder, hub)
            if entries is not None:
                unused["plans"] = entries
            if conditions is not None:
                unused.setdefault("calibrated_conditions", conditions)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **unused)

    @classmethod
    def read_plans_file(cls, location: str | os.PathLike, subfolder: str | None, hub: dict[str, Any]
                        ) -> tuple[list[dict] | None, dict | None]:
        """``(entries, calibrated conditions)`` of ``olss_plans.json`` beside the config (local folder or hub repo);
        None for what it does not hold, or both when there is none."""
        folder = os.path.join(os.fspath(location), subfolder or "")
        if os.path.isdir(os.fspath(location)):
            path = os.path.join(folder, PLANS_FILE_NAME)
            if not os.path.isfile(path):
                return None, None
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.utils import EntryNotFoundError

            try:
                path = hf_hub_download(os.fspath(location), PLANS_FILE_NAME, subfolder=subfolder, **hub)
            except EntryNotFoundError:
                return None, None
        with open(path, "rb") as handle:
            return read_plans_file(handle.read(), path)

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write ``olss_plans.json`` (the plans) and ``scheduler_config.json`` (the process) into ``save_directory``
        (``save_pretrained`` calls this)."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, PLANS_FILE_NAME), "wb") as handle:
            handle.write(plans_document(self.plans, self.calibrated_conditions))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def scheduler_files(self) -> dict[str, bytes]:
        """``{file name: bytes}`` of what ``save_pretrained`` writes: ``scheduler_config.json`` and ``olss_plans.json``."""
        return {self.config_name: self.to_json_string().encode(),
                PLANS_FILE_NAME: plans_document(self.plans, self.calibrated_conditions)}

    @property
    def compatibles(self) -> list[type]:
        """The diffusers schedulers of the same family that can be built from this config."""
        import diffusers

        names = (["FlowMatchEulerDiscreteScheduler"] if self.is_flow else
                 ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                  "EulerDiscreteScheduler", "PNDMScheduler"])
        return [getattr(diffusers, name) for name in names]

    @property
    def available_steps(self) -> list[int]:
        """The step counts with a plan from pure noise."""
        return sorted(steps for steps, start in self.plans_by_key if start == 0)

    @property
    def available_starts(self) -> dict[int, list[int]]:
        """``{K: [start steps with a start plan]}``."""
        return {k: sorted(s for steps, s in self.plans_by_key if steps == k and s) for k in self.available_steps}

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        """The index in ``timesteps`` of the next step; None before the first step of a run."""
        return self._step_index

    def reset_run(self) -> None:
        """Forget the start sample and outputs of the previous run."""
        self.initial_noise: torch.Tensor | None = None
        self.outputs: list[torch.Tensor] = []
        self._step_index: int | None = None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: Sequence[float] | None = None, mu: float | None = None,
                      timesteps: Sequence[float] | None = None) -> None:
        """Select the plan for ``num_inference_steps`` (or the fallback built-in, with a warning) and start a run.

        Flow models: ``sigmas`` (Flux always passes its default ``linspace(1, 1/K, K)``) only give the step
        count when ``num_inference_steps`` is None; the plan's own timesteps are replayed (a warning when
        they were not the default); ``mu`` is accepted (a warning when it differs from the calibration's).

        Raises:
            ValueError: custom ``timesteps`` (any model) or ``sigmas`` / ``mu`` (VP models), ``sigmas`` of
                another length than ``num_inference_steps``, or a step count that is not a positive integer.
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
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        steps = int(num_inference_steps)
        if (steps, 0) in self.plans_by_key:
            plan_timesteps, coefficients = self.plans_by_key[steps, 0]
            self.serving, self.serving_fallback = "plan", None
            if self.is_flow:
                self.warn_about_pipeline_schedule(steps, sigmas, mu, plan_timesteps)
        else:
            fallback = self.fallback(None if mu is None else float(mu)) if self.is_flow else self.fallback()
            if self.is_flow and fallback.mu is None and self.config.use_dynamic_shifting:
                fallback = self.fallback(self.config.mu)
            plan_timesteps, coefficients = fallback.own_rows(steps)
            self.serving, self.serving_fallback = fallback.name, fallback
            one_line(f"OLSSScheduler has no plan for {steps} steps (planned: {self.available_steps}); serving "
                     f"{fallback.name} in OLSS form on its own {steps} timesteps")
        self.num_inference_steps = steps
        self.plan_timesteps = plan_timesteps
        self.coefficients = torch.from_numpy(coefficients)
        if self.is_flow:
            plan_sigmas = np.append(plan_timesteps / self.config.num_train_timesteps, 0.0)
            self.timesteps = torch.from_numpy(plan_timesteps).to(device=device, dtype=torch.float32)
            self.sigmas = torch.from_numpy(plan_sigmas).to(device=device, dtype=torch.float32)
        else:
            self.timesteps = torch.from_numpy(plan_timesteps).to(device)
        self._begin_index = None
        self.use_rows(coefficients, 0)
        self.reset_run()

    def warn_about_pipeline_schedule(self, num_steps: int, sigmas: Sequence[float] | None, mu: float | None,
                                     plan_timesteps: np.ndarray) -> None:
        """One warning line each when a pipeline's ``sigmas`` or ``mu`` are not what the plans were made for."""
        if sigmas is not None:
            given = np.asarray(sigmas, dtype=np.float64)
            flux_default = np.linspace(1.0, 1.0 / num_steps, num_steps)
            own = plan_timesteps / self.config.num_train_timesteps
            if not (np.allclose(given, flux_default, rtol=0, atol=1e-6) or np.allclose(given, own, rtol=0, atol=1e-6)):
                one_line(f"sigmas: OLSSScheduler ignores the custom sigmas and replays its {num_steps}-step plan's own timesteps")
        calibrated = self.config.mu
        if mu is not None and calibrated is not None and abs(float(mu) - calibrated) > 1e-6 * max(1.0, abs(calibrated)):
            one_line(f"mu: the pipeline's mu={float(mu):.6g} (its image size) differs from mu={calibrated:.6g} the plans "
                     "were calibrated at; the plans' own timesteps are replayed (calibrate at this resolution)")

    def set_begin_index(self, begin_index: int = 0, quiet: bool = False) -> None:
        """Start the run at ``timesteps[begin_index]`` (img2img / inpainting: ``K - int(K * strength)``), from the
        sample of the first step there: the start plan for ``(K, begin_index)`` if there is one, else the fallback
        built-in on the remaining timesteps (a warning line when the step count itself has a plan).

        Raises:
            ValueError: ``begin_index`` is not an integer in ``[0, K]``.
        """
        steps = self.num_inference_steps
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0 or (
                steps is not None and begin_index > steps):
            raise ValueError(f"begin_index must be an integer in [0, {steps}], got {begin_index!r}")
        self._begin_index = int(begin_index)
        self.reset_run()
        if steps is not None:
            self.use_rows(self.rows_from(self._begin_index, quiet), self._begin_index)

    def use_rows(self, rows: np.ndarray, start: int) -> None:
        """Serve ``rows`` from index ``start``, with the factors that carry an edit of the sample (``carry``)."""
        self.rows, self.rows_start = rows, start
        self.carry = self.carry_factors(self.plan_timesteps[start:])

    def carry_factors(self, timesteps: np.ndarray) -> np.ndarray:
        """``(n,)`` what each step multiplies the current sample by, as DDIM does (``x' = a x + b o`` with the output
        ``o`` held fixed, in the rows' output form; ᾱ = 1 after the last step); 1 for flow models, as Euler does."""
        if self.is_flow:
            return np.ones(len(timesteps))
        alphas = self.alphas_cumprod.numpy()[np.asarray(timesteps, dtype=np.int64)]
        return ddim_step_coefficients(alphas, np.append(alphas[1:], 1.0), self.output_type)[0]

    def rows_from(self, start: int, quiet: bool = False) -> np.ndarray:
        """``(K - start, K - start + 1)`` rows over ``[x_start, o_start, ...]`` for a run starting at index ``start``."""
        steps = self.num_inference_steps
        if start == 0:
            return self.coefficients.numpy()
        if start == steps:
            return np.zeros((0, 1))
        if self.serving_fallback is not None:
            return self.serving_fallback.own_rows(steps, start)[1]
        if (steps, start) in self.plans_by_key:
            return self.plans_by_key[steps, start][1]
        if not quiet:
            one_line(f"OLSSScheduler has no start plan for {steps} steps from step {start} (planned starts: "
                     f"{self.available_starts.get(steps, [])}); serving {self.fallback_name} in OLSS form on the plan's "
                     f"last {steps - start} timesteps")
        return self.fallback(self.config.mu if self.is_flow else None).rows_on(self.plan_timesteps[start:])

    def scale_model_input(self, sample: torch.Tensor, timestep: int | float | None = None) -> torch.Tensor:
        return sample

    def broadcast(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values (B,)`` or ``(1,)`` float64 as ``like``'s dtype and device, shaped to broadcast over its batch."""
        return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def vp_alphas(self, timesteps: int | torch.Tensor, what: str) -> torch.Tensor:
        if self.is_flow:
            raise ValueError(f"{what}: flow-matching OLSS schedulers have no VP schedule (use scale_noise)")
        return self.alphas_cumprod[torch.as_tensor(timesteps).detach().cpu().long().reshape(-1)]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor) -> torch.Tensor:
        """``sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise`` from the model's schedule, per batch element for ``timesteps (B,)``
        (a scalar for all), on the device and in the dtype of ``original_samples``. Flow models: ``scale_noise``."""
        if self.is_flow:
            return self.scale_noise(original_samples, timesteps, noise)
        alphas = self.vp_alphas(timesteps, "add_noise")
        return self.broadcast(alphas.sqrt(), original_samples) * original_samples + self.broadcast((1 - alphas).sqrt(), noise) * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) x0`` (VP only)."""
        alphas = self.vp_alphas(timesteps, "get_velocity")
        return self.broadcast(alphas.sqrt(), sample) * noise - self.broadcast((1 - alphas).sqrt(), sample) * sample

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Flow only: ``x_sigma = (1 - sigma) sample + sigma noise`` with ``sigma = timestep / T`` (per batch element
        when ``timestep`` is ``(B,)``), as ``FlowMatchEulerDiscreteScheduler.scale_noise``."""
        if not self.is_flow:
            raise ValueError("scale_noise: only flow-matching OLSS schedulers (prediction_type='flow_prediction') have it")
        sigma = torch.as_tensor(timestep).detach().to(device=sample.device, dtype=torch.float64).reshape(-1)
        sigma = self.broadcast(sigma / self.config.num_train_timesteps, sample)
        return sigma * noise + (1.0 - sigma) * sample

    def epsilon(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """The model output converted to epsilon according to ``prediction_type`` (VP only)."""
        alpha = float(self.alphas_cumprod[timestep])
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "v_prediction":
            return alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
        return (sample - alpha**0.5 * model_output) / (1 - alpha) ** 0.5

    def plan_output(self, model_output: torch.Tensor, timestep: int | float, sample: torch.Tensor) -> torch.Tensor:
        """The model output in the form the rows combine (``output_type``): the velocity, ε, or at zero terminal
        SNR the model's own v / x0 (``vp_output_type`` equals its prediction type then)."""
        if self.is_flow or self.output_type != "epsilon":
            return model_output
        return self.epsilon(model_output, timestep, sample)

    def vp_original(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        """The clean sample a VP output predicts; from v directly, so it stays finite at zero terminal SNR (alpha 0)."""
        alpha = float(self.alphas_cumprod[timestep])
        if self.config.prediction_type == "v_prediction":
            return alpha**0.5 * sample - (1 - alpha) ** 0.5 * model_output
        if self.config.prediction_type == "sample":
            return model_output
        return (sample - (1 - alpha) ** 0.5 * model_output) / alpha**0.5

    def matches(self, index: int, timestep: int | float | torch.Tensor) -> bool:
        """Whether ``timestep`` is ``timesteps[index]`` (flow: to float32 precision)."""
        expected = self.plan_timesteps[index]
        if self.is_flow:
            return abs(float(timestep) - expected) <= 1e-5 * max(1.0, abs(expected))
        return int(timestep) == expected

    def position(self, timestep: int | float | torch.Tensor) -> int:
        """The index of this step in ``timesteps``: the next one of the run; at a run's first step the index of
        ``timestep`` (a pipeline that starts mid-way without ``set_begin_index``). A timestep off the schedule
        starts a new run there from this sample (the last index when it is not on the schedule, as diffusers'
        schedulers do), with a warning line."""
        steps, index = self.num_inference_steps, self._step_index
        if index is None:
            index = self._begin_index if self._begin_index is not None else 0
            if index < steps and self.matches(index, timestep):
                if self._begin_index is None:
                    self.set_begin_index(index)
                return index
        elif index < steps and self.matches(index, timestep):
            return index
        found = next((i for i in range(steps) if self.matches(i, timestep)), None)
        if self._step_index is None and self._begin_index is None and found is not None:
            self.set_begin_index(found)
            return found
        shown = "the end of the run" if index >= steps else f"{float(self.plan_timesteps[index]):g}"
        start = steps - 1 if found is None else found
        one_line(f"step: timestep {float(timestep):g} is not the {steps}-step schedule's next one ({shown}); "
                 f"starting a new run at step {start} from this sample")
        self.set_begin_index(start, quiet=True)
        return start

    def step(self, model_output: torch.Tensor, timestep: int | float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True, **kwargs: Any) -> OLSSSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One step of the run: ``x_{i+1} = a_r x_i + (c_r - a_r c_{r-1}) · [x_start, o_0 … o_r]`` with ``r`` the
        step's row (``i`` minus the begin index), ``x_i = sample`` as the pipeline hands it over (edits included)
        and ``a_r`` DDIM's factor on the sample (``carry_factors``; 1 for flow). Without an edit ``x_i`` is
        ``c_{r-1} · [...]`` and this is row ``r`` itself; an edit is carried forward as DDIM carries it.

        Computed in float32 (float64 samples: float64); returned in the dtype of ``sample``.

        Args:
            model_output: ``(B, *latent_shape)`` the model's (guided) output at ``timestep``: epsilon /
                v / sample (VP) or the velocity (flow).
            timestep: the model timestep of this step, ``timesteps[i]``.
            sample: ``(B, *latent_shape)`` the current state (``x_start`` at the first step).

        Returns:
            ``prev_sample`` and ``pred_original_sample`` (flow: ``sample - sigma * v``).

        Raises:
            ValueError: ``set_timesteps`` was not called.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        i = self.position(timestep)
        r = i - self.rows_start
        t = float(self.plan_timesteps[i]) if self.is_flow else int(self.plan_timesteps[i])
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        current = sample.to(work)
        if r == 0:
            self.initial_noise, self.outputs = current, []
        message = self.conditions_check.message(sample.shape[1:])
        if message:
            one_line(message)
        raw = model_output.to(work)
        if self.is_flow:
            pred_original = current - (t / self.config.num_train_timesteps) * raw
        else:
            pred_original = self.vp_original(raw, t, current)
        self.outputs.append(self.plan_output(raw, t, current))
        previous = self.rows[r - 1, : r + 2] if r else np.eye(1, r + 2)[0]
        carry = float(self.carry[r])
        change = self.rows[r, : r + 2] - carry * previous
        prev = carry * current + apply_step(change.tolist(), self.initial_noise, self.outputs)
        self._step_index = i + 1
        prev, pred_original = prev.to(sample.dtype), pred_original.to(sample.dtype)
        if not return_dict:
            return prev, pred_original
        return OLSSSchedulerOutput(prev_sample=prev, pred_original_sample=pred_original)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
