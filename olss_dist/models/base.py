"""The model-adapter contract shared by the teacher, the on-policy fit, the Ray job and evaluation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch

from olss_dist.core.noise_process import NoiseProcess, noise_process_from_config


class DiffusionModel(ABC):
    """A guided noise predictor with everything calibration needs to know about it.

    Attributes:
        model_id: human-readable identity (hub id, path, ``"embedded"``, ``"analytic"``).
        digest: sha256 hex digest of the content that affects sampling (weights and configs).
        latent_shape: shape of one latent sample, e.g. ``(4, 64, 64)``.
        alphas_cumprod: ``(num_train_timesteps,)`` float64, a VP model's own noise schedule (``None`` for
            flow-matching models).
        prediction_type: what the network predicts (``"epsilon"``, ``"v_prediction"`` or
            ``"flow_prediction"``); ``__call__`` returns epsilon for VP models (v converted; v itself with
            zero terminal SNR) and the velocity for flow-matching models, i.e. ``noise_process.output_type``.
        scheduler_config: the model's own diffusers scheduler config (names the noise process; built-ins).
        mu: the dynamic shift of a flow model with ``use_dynamic_shifting`` at its calibration resolution
            (Flux: from the image sequence length); ``None`` otherwise.
        guidance_scale: classifier-free guidance scale used by ``__call__``.
        device: where ``__call__`` runs.
        resolution: ``(height, width)`` pixels of the images it samples (the latent shape follows it); ``None``
            for models without images (analytic).
        screen_multiple: the tail screen's samples per fit prompt when a calibration does not state how many
            (``CalibrationSpec.screen_count``; ``method.screen``): a tail of rate ``r`` needs about ``3 / r``
            samples to be seen at all and ten times that to rank candidates by it, and each costs ~100 + K model
            calls. 2 for networks (about a third of the teacher's calls); the analytic mixtures, whose calls are
            closed form, take 64 (docs/evaluation.md, "How many screen samples").
    """

    model_id: str
    digest: str
    latent_shape: tuple[int, ...]
    alphas_cumprod: np.ndarray
    prediction_type: str
    scheduler_config: dict[str, Any]
    guidance_scale: float
    device: torch.device
    mu: float | None = None
    resolution: tuple[int, int] | None = None
    screen_multiple: int = 2

    @property
    def noise_process(self) -> NoiseProcess:
        """The model's noise process (VP or flow matching), from its scheduler config and ``mu``."""
        return noise_process_from_config(self.scheduler_config, mu=self.mu)

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_process.num_train_timesteps

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> Any:
        """Conditioning for a batch of prompts, indexable along the batch (first) dimension."""

    @abstractmethod
    def __call__(self, x: torch.Tensor, t: int | float, cond: Any) -> torch.Tensor:
        """Guided output for ``x (B, *latent_shape)`` at model timestep ``t`` (an int train timestep for VP
        models, ``σ·1000`` for flow models); same shape and dtype as ``x``."""

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """``(B, *latent_shape)`` float32 standard normal latents, one CPU generator per seed.

        Each sample depends on its own seed only, so any shard can be recomputed bit for bit.
        """
        return torch.stack(
            [torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        )

    def default_prompts(self) -> list[str]:
        """Prompts used when the user gives none."""
        raise NotImplementedError(f"{type(self).__name__} has no default prompts; pass a prompt file (prompts=...)")

    def decode(self, latents: torch.Tensor) -> np.ndarray | None:
        """``(B, H, W, 3)`` uint8 images for image models; ``None`` where there is no decoder."""
        return None
