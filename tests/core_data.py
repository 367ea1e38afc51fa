"""Small analytic teacher trajectories shared by the core tests."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from olss_dist.models.analytic import GaussianMixtureModel
from olss_dist.core.teacher import record_trajectories, trailing_timesteps


def small_model() -> GaussianMixtureModel:
    return GaussianMixtureModel(latent_shape=(2, 2, 2), num_classes=4, components_per_class=2, guidance_scale=3.0)


@lru_cache(maxsize=None)
def trajectories(num_teacher_steps: int = 40, batch: int = 24, seed: int = 0):
    """``(states, noise_preds, timesteps)`` of the small analytic model, float64."""
    model = small_model()
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, *model.latent_shape, generator=generator, dtype=torch.float64)
    cond = torch.arange(batch) % 4
    timesteps = trailing_timesteps(num_teacher_steps)
    states, noise_preds = record_trajectories(model, x_T, cond, timesteps, model.alphas_cumprod)
    return states, noise_preds, timesteps


def raw_rows(states: torch.Tensor, noise_preds: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(B*D, N+1)`` states and ``(B*D, N)`` outputs as plain rows (one per latent element)."""
    batch, count = states.shape[:2]
    s = states.reshape(batch, count, -1).permute(0, 2, 1).reshape(-1, count).numpy()
    e = noise_preds.reshape(batch, count - 1, -1).permute(0, 2, 1).reshape(-1, count - 1).numpy()
    return s, e


def raw_lstsq(features: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients and mean squared residual of a plain least squares over raw rows."""
    weights = np.linalg.lstsq(features, target, rcond=None)[0]
    residual = target - features @ weights
    return weights, float(residual @ residual / len(target))
