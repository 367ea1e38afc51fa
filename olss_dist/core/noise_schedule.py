"""Noise schedules: the cumulative alphas ᾱ_t of a diffusers scheduler config, in float64 (pure numpy)."""

from __future__ import annotations

from typing import Any

import numpy as np


def alphas_cumprod_from_config(config: dict[str, Any]) -> np.ndarray:
    """``(num_train_timesteps,)`` float64 ᾱ_t of a diffusers scheduler config.

    Follows diffusers' ``DDPMScheduler`` (``trained_betas``, ``linear``, ``scaled_linear``,
    ``squaredcos_cap_v2``, ``rescale_betas_zero_snr``) but in float64 throughout.
    """
    steps = int(config.get("num_train_timesteps", 1000))
    beta_start, beta_end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    elif schedule == "linear":
        betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        alpha_bar = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        grid = np.arange(steps, dtype=np.float64)
        betas = np.minimum(1.0 - alpha_bar((grid + 1) / steps) / alpha_bar(grid / steps), 0.999)
    else:
        raise ValueError(f"unsupported beta_schedule {schedule!r} in the scheduler config")
    if config.get("rescale_betas_zero_snr", False):
        betas = zero_terminal_snr_betas(betas)
    return np.cumprod(1.0 - betas)


def zero_terminal_snr_betas(betas: np.ndarray) -> np.ndarray:
    """Rescale ``betas (T,)`` so that ᾱ at the last step is 0 (Lin et al. 2023, Algorithm 1)."""
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas
