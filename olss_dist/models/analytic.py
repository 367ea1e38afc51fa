"""An analytic class-conditional Gaussian mixture whose exact guided epsilon has a closed form.

The data distribution of class ``c`` is a mixture of isotropic Gaussians ``N(mu_k, sigma_k^2 I)``. Under
the forward process ``x_t = sqrt(a) x_0 + sqrt(1 - a) eps`` each component stays Gaussian with mean
``sqrt(a) mu_k`` and variance ``a sigma_k^2 + 1 - a``, so the exact epsilon is a softmax-weighted
average of per-component epsilons. Guidance mixes the class-conditional and unconditional
predictions as classifier-free guidance does. Sharp components and strong guidance make it a hard,
nonlinear test for few-step samplers, with no network and no download.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np
import torch

from olss_dist.models.base import DiffusionModel
from olss_dist.core.noise_schedule import alphas_cumprod_from_config

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class GaussianMixtureModel(DiffusionModel):
    """Exact guided epsilon of a class-conditional Gaussian mixture.

    Args:
        latent_shape: shape of one sample; ``D = prod(latent_shape)`` dimensions.
        num_classes: number of classes (conditions).
        components_per_class: Gaussian components of each class.
        component_scale: standard deviation of each component (small = sharp).
        mean_scale: norm of component means relative to ``sqrt(D)``.
        guidance_scale: classifier-free guidance scale.
        seed: seed for the means and the per-component scales.
    """

    def __init__(
        self,
        latent_shape: tuple[int, ...] = (4, 4, 4),
        num_classes: int = 10,
        components_per_class: int = 3,
        component_scale: float = 0.15,
        mean_scale: float = 1.0,
        guidance_scale: float = 7.5,
        seed: int = 0,
    ):
        generator = np.random.default_rng(seed)
        dims = int(np.prod(latent_shape))
        num_components = num_classes * components_per_class
        means = generator.standard_normal((num_components, dims))
        means *= mean_scale * np.sqrt(dims) / np.linalg.norm(means, axis=1, keepdims=True)
        self.means = torch.from_numpy(means)
        self.scales = torch.from_numpy(component_scale * generator.uniform(0.5, 1.5, num_components))
        self.component_class = torch.arange(num_components) // components_per_class
        self.num_classes = num_classes
        self.latent_shape = tuple(latent_shape)
        self.guidance_scale = float(guidance_scale)
        self.prediction_type = "epsilon"
        self.scheduler_config = {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "timestep_spacing": "leading",
        }
        self.alphas_cumprod = alphas_cumprod_from_config(self.scheduler_config)
        self.device = torch.device("cpu")
        parameters = f"{latent_shape}-{num_classes}-{components_per_class}-{component_scale}-{mean_scale}-{seed}"
        self.model_id = f"analytic:gaussian-mixture:{parameters}"
        self.digest = hashlib.sha256(self.model_id.encode()).hexdigest()

    def class_epsilon(self, x: torch.Tensor, t: int, classes: torch.Tensor | None) -> torch.Tensor:
        """Exact epsilon of the class-conditional (``classes (B,)``) or unconditional (``None``) mixture."""
        alpha = float(self.alphas_cumprod[t])
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        variance = alpha * self.scales**2 + (1.0 - alpha)
        offsets = flat[:, None, :] - np.sqrt(alpha) * self.means[None]
        dims = flat.shape[1]
        log_weights = -0.5 * (offsets**2).sum(-1) / variance - 0.5 * dims * torch.log(variance)
        if classes is not None:
            member = self.component_class[None, :] == classes[:, None]
            log_weights = log_weights.masked_fill(~member, float("-inf"))
        weights = torch.softmax(log_weights, dim=1)
        component_eps = np.sqrt(1.0 - alpha) * offsets / variance[None, :, None]
        eps = (weights[..., None] * component_eps).sum(1)
        return eps.reshape(x.shape).to(x.dtype)

    def __call__(self, x: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        classes = torch.as_tensor(cond).reshape(-1).long()
        unconditional = self.class_epsilon(x, t, None)
        conditional = self.class_epsilon(x, t, classes)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Class ids ``(B,)``: the first number (digit or word) in the prompt, else a stable hash."""
        return torch.tensor([self.class_of(p) for p in prompts], dtype=torch.long)

    def class_of(self, prompt: str) -> int:
        words = re.findall(r"[a-z]+|\d+", prompt.lower())
        for word in words:
            if word.isdigit():
                return int(word) % self.num_classes
            if word in NUMBER_WORDS:
                return NUMBER_WORDS.index(word) % self.num_classes
        return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % self.num_classes

    def default_prompts(self) -> list[str]:
        return [f"a sample of class {NUMBER_WORDS[c % 10]}" for c in range(self.num_classes)]
