"""The ``OLSSScheduler`` settings that name a model's noise process, from any diffusers scheduler config.

``process_settings(config, mu)`` translates a VP scheduler's config (beta schedule, trained betas, zero-SNR
rescale, prediction type) or a ``FlowMatchEulerDiscreteScheduler`` config (shift, dynamic shifting) into
``OLSSScheduler`` arguments, and refuses with one ``ValueError`` line what the scheduler cannot carry
(``docs/scheduler.md``, "Building one from plans"). Sampler settings (spacing, offsets, clipping, solver
order) are not part of the process and are left behind: a plan is the sampler.
"""

from __future__ import annotations

from typing import Any, Mapping

from olss_dist.core.noise_process import is_flow_config
from olss_dist.core.noise_schedule import alphas_cumprod_from_config

OLSS_SCHEDULER = "OLSSScheduler"
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
# OLSSScheduler's own settings that are not the process's (an OLSSScheduler config keeps them).
OWN_SETTINGS = ("mu", "fallback_solver")


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
    if name == OLSS_SCHEDULER or "plans" in config:
        keys = [*VP_PROCESS_DEFAULTS, *FLOW_PROCESS_KEYS, *OWN_SETTINGS]
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
