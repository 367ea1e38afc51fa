"""Analytic class-conditional Gaussian mixtures whose exact guided model output has a closed form.

The data distribution of class ``c`` is a mixture of isotropic Gaussians ``N(mu_k, s_k^2 I)``. Under a
forward process ``x = p x_0 + q noise`` each component stays Gaussian with mean ``p mu_k`` and variance
``V_k = p^2 s_k^2 + q^2``, so the exact posterior means of the noise and of ``x_0`` are softmax-weighted
averages of per-component ones:

- ``GaussianMixtureModel`` (VP, ``p = sqrt(ᾱ_t)``, ``q = sqrt(1 - ᾱ_t)``): the exact epsilon;
- ``GaussianMixtureFlowModel`` (rectified flow, ``p = 1 - σ``, ``q = σ``, ``σ = t / 1000``): the exact
  velocity ``E[noise - x_0 | x] = ((q - p s_k^2) / V_k) (x - p mu_k) - mu_k`` per component.

Guidance mixes the class-conditional and unconditional outputs as classifier-free guidance does. Sharp
components and strong guidance make them hard, nonlinear tests for few-step samplers, with no network
and no download.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np
import torch

from olss_dist.models.base import DiffusionModel
from olss_dist.core.noise_schedule import alphas_cumprod_from_config

FLOW_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class GaussianMixtureModel(DiffusionModel):
    """Exact guided epsilon of a class-conditional Gaussian mixture.

    Its mode switches (a few-step sampler landing on another component) are rare, 0.1-0.4 % of samples per
    plan, and its calls cost microseconds, so its tail screen is large: 64 samples per fit prompt
    (``screen_multiple``; 8192 for 128 fit prompts).

    Args:
        latent_shape: shape of one sample; ``D = prod(latent_shape)`` dimensions.
        num_classes: number of classes (conditions).
        components_per_class: Gaussian components of each class.
        component_scale: standard deviation of each component (small = sharp).
        mean_scale: norm of component means relative to ``sqrt(D)``.
        guidance_scale: classifier-free guidance scale.
        seed: seed for the means and the per-component scales.
    """

    screen_multiple = 64

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
        self.mean_norms2 = (self.means**2).sum(1)
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

    def signal_and_noise(self, t: int | float) -> tuple[float, float, float, float]:
        """``(p, q, p^2, q^2)`` with ``x_t = p x_0 + q eps``: ``p^2 = ᾱ_t``, ``q^2 = 1 - ᾱ_t`` at train timestep ``t``
        (the squares exactly, not squared roots)."""
        alpha = float(self.alphas_cumprod[int(t)])
        return float(np.sqrt(alpha)), float(np.sqrt(1.0 - alpha)), alpha, 1.0 - alpha

    def component_coefficients(self, variance: torch.Tensor, p: float, q: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, c)``, each ``(K,)``: component ``k``'s exact epsilon is ``a_k x + c_k mu_k = q (x - p mu_k) / V_k``."""
        a = q / variance
        return a, -p * a

    def log_weights(self, flat: torch.Tensor, p: float, variance: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` unnormalised log posterior weights of the components at ``flat (B, D)``: the Gaussian
        log densities ``-||x - p mu_k||^2 / (2 V_k) - D log(V_k) / 2``, the squared distance expanded as
        ``||x||^2 - 2 p x.mu_k + p^2 ||mu_k||^2`` (one matrix product; no ``(B, K, D)`` tensor)."""
        squared = (flat**2).sum(1, keepdim=True) - 2.0 * p * (flat @ self.means.T) + p * p * self.mean_norms2[None]
        return -0.5 * squared / variance - 0.5 * flat.shape[1] * torch.log(variance)

    def mixture_output(self, flat: torch.Tensor, log_weights: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                       classes: torch.Tensor | None) -> torch.Tensor:
        """``(B, D)`` posterior mean of the components' outputs: ``sum_k w_k (a_k x + c_k mu_k)``, the weights ``w``
        the softmax of ``log_weights`` over every component (``classes`` None) or over each sample's class's."""
        if classes is not None:
            member = self.component_class[None, :] == classes[:, None]
            log_weights = log_weights.masked_fill(~member, float("-inf"))
        weights = torch.softmax(log_weights, dim=1)
        return (weights @ a)[:, None] * flat + (weights * c) @ self.means

    def class_output(self, x: torch.Tensor, t: int | float, classes: torch.Tensor | None) -> torch.Tensor:
        """Exact output of the class-conditional (``classes (B,)``) or unconditional (``None``) mixture."""
        return self.guided_output(x, t, classes, None)

    def guided_output(self, x: torch.Tensor, t: int | float, classes: torch.Tensor | None,
                      guidance_scale: float | None) -> torch.Tensor:
        """The conditional output (``guidance_scale`` None) or the guided one ``u + g (c - u)``; the distances
        and weights are computed once for both terms."""
        p, q, p2, q2 = self.signal_and_noise(t)
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        variance = p2 * self.scales**2 + q2
        log_weights = self.log_weights(flat, p, variance)
        a, c = self.component_coefficients(variance, p, q)
        output = self.mixture_output(flat, log_weights, a, c, classes)
        if guidance_scale is not None:
            unconditional = self.mixture_output(flat, log_weights, a, c, None)
            output = unconditional + guidance_scale * (output - unconditional)
        return output.reshape(x.shape).to(x.dtype)

    def __call__(self, x: torch.Tensor, t: int | float, cond: torch.Tensor) -> torch.Tensor:
        classes = torch.as_tensor(cond).reshape(-1).long()
        return self.guided_output(x, t, classes, self.guidance_scale)

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


class GaussianMixtureFlowModel(GaussianMixtureModel):
    """Exact guided velocity of a class-conditional Gaussian mixture under rectified flow.

    ``x_σ = (1 - σ) x_0 + σ noise`` with ``σ = t / 1000`` (the pipeline's timestep); the noise process is a
    ``FlowMatchEulerDiscreteScheduler`` with ``shift`` (default 3.0, as SD3), or, given ``mu``, with dynamic
    shifting at that ``mu`` (as Flux at one resolution; its sigmas are shifted by ``exp(mu)``). Other
    arguments as ``GaussianMixtureModel``; the default guidance scale is 4 (flow models are guided less than SD 1.x).
    """

    def __init__(self, *args, guidance_scale: float = 4.0, shift: float = 3.0, mu: float | None = None, **kwargs):
        super().__init__(*args, guidance_scale=guidance_scale, **kwargs)
        self.prediction_type = "flow_prediction"
        self.scheduler_config = {**FLOW_SCHEDULER_CONFIG, "shift": float(shift)}
        if mu is not None:
            self.scheduler_config["use_dynamic_shifting"] = True
        self.mu = None if mu is None else float(mu)
        self.alphas_cumprod = None
        self.model_id = self.model_id.replace("analytic:gaussian-mixture:", "analytic:flow-gaussian-mixture:") + f"-shift{shift:g}"
        if mu is not None:
            self.model_id += f"-mu{mu:g}"
        self.digest = hashlib.sha256(self.model_id.encode()).hexdigest()

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    def signal_and_noise(self, t: int | float) -> tuple[float, float, float, float]:
        sigma = float(t) / self.num_train_timesteps
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"t must lie in [0, {self.num_train_timesteps}] (sigma * 1000), got {t}")
        return 1.0 - sigma, sigma, (1.0 - sigma) ** 2, sigma**2

    def component_coefficients(self, variance: torch.Tensor, p: float, q: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Component ``k``'s exact velocity ``g_k (x - p mu_k) - mu_k`` with ``g_k = (q - p s_k^2) / V_k``, as
        ``a_k x + c_k mu_k``."""
        gain = (q - p * self.scales**2) / variance
        return gain, -p * gain - 1.0
