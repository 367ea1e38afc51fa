"""Stable Diffusion (1.x / 2.x) adapter: a local diffusers folder as a guided ε (or, zero-SNR, v) denoiser.

Only what the denoiser needs is loaded up front (UNet, text encoder, tokenizer, scheduler config);
the VAE is loaded on the first ``decode``. Weights are read from safetensors only (never pickle). The model
samples at a stated resolution (a multiple of the VAE scale, as ``StableDiffusionPipeline(height=, width=)``
takes it) or at its UNet's own (``sample_size × VAE scale``, the pipeline's default).
The denoiser's outputs are in the form of ``core.noise_process.vp_output_type`` (contract C1): ε, v-prediction
converted with the model's ᾱ_t, unless the schedule has zero terminal SNR (``rescale_betas_zero_snr``, ᾱ = 0
at t = T-1), where the guided v is returned as is (ε is infinite there) and an ε model is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from olss_dist.core.noise_process import vp_output_type
from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.models.base import DiffusionModel
from olss_dist.models.common import (
    GENERIC_PROMPTS,
    ModelLoadError,
    check_prompt_lists,
    decode_latents,
    load_vae,
    open_folder,
    parse_resolution,
    read_json,
    read_model_index,
    vae_scale_factor,
)
from olss_dist.models.digest import content_digest

DEFAULT_GUIDANCE_SCALE = 7.5  # StableDiffusionPipeline's default
REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_model_folder(folder: Path) -> None:
    """``ModelLoadError`` naming what is wrong unless ``folder`` is a supported diffusers SD folder."""
    check_model_index(folder, read_model_index(folder))


def check_model_index(folder: Path, index: dict[str, Any]) -> None:
    """``ModelLoadError`` unless ``index`` (the ``model_index.json`` of the existing ``folder``) is a supported SD one."""
    pipeline_class = str(index.get("_class_name", ""))
    if "XL" in pipeline_class or "text_encoder_2" in index:
        raise ModelLoadError(
            f"{folder} is a {pipeline_class or 'two-text-encoder'} model; load SDXL folders with load_model "
            "(StableDiffusionXLModel), not StableDiffusionModel"
        )
    missing = [c for c in REQUIRED_COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{folder} is not a diffusers Stable Diffusion folder: no {', '.join(missing)}/")


VP_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
"""The pipeline classes whose folders this adapter (and its SDXL subclass) serves: VP scheduler configs."""


def check_scheduler_config(folder: Path, pipeline: str = "StableDiffusionPipeline") -> None:
    """``ModelLoadError`` (one line naming ``folder``) unless its scheduler config names outputs the method can
    calibrate (``vp_output_type``): a known beta schedule, and no ε prediction with zero terminal SNR. What the
    job's driver checks before any worker starts (``pipeline``: the folder's class; others than ``VP_PIPELINES``
    are not checked here); a folder without a scheduler config is left to the loader."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if pipeline in VP_PIPELINES and path.is_file():
        try:
            vp_output_type(read_json(path))
        except ValueError as error:
            raise ModelLoadError(f"{folder}: {error}") from None


def sd_resolution(folder: Path, resolution: Any, vae_scale: int) -> tuple[int, int]:
    """``(height, width)`` of ``resolution`` (an int or a pair), each a positive multiple of ``vae_scale``.

    Raises:
        ModelLoadError: one line (``resolution: ...``) naming the folder and what it takes.
    """
    return parse_resolution(resolution, vae_scale, f"{folder} (Stable Diffusion, VAE scale {vae_scale})")


def own_resolution(sample_size: Any, vae_scale: int) -> tuple[int, int]:
    """``(height, width)`` pixels of a UNet's ``sample_size`` (an int or a pair): the pipeline's default size."""
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    return int(height) * vae_scale, int(width) * vae_scale


class StableDiffusionModel(DiffusionModel):
    """Classifier-free-guided ε of a diffusers Stable Diffusion UNet with its CLIP text encoder.

    Use ``StableDiffusionModel.from_folder``. ``cond`` is ``(B, 2, L, D)`` text embeddings, index 0 the
    negative (unconditional) prompt, index 1 the prompt. One call runs the UNet once on the batch
    ``[x; x]`` against ``[negatives; prompts]``; guidance combines the UNet's own outputs, as
    ``StableDiffusionPipeline`` does (CFG on v for v-prediction models; no ``guidance_rescale``). v-prediction
    outputs are then converted to ε with the model's own ᾱ_t, ``ε = √ᾱ_t · v + √(1 − ᾱ_t) · x``, except
    with zero terminal SNR, where ``output_type`` is ``"v_prediction"`` and the guided v is returned.

    Args:
        folder: the diffusers folder (kept for the lazily loaded VAE).
        unet: ``UNet2DConditionModel`` in eval mode on ``device``.
        text_encoder: ``CLIPTextModel`` on ``device``.
        tokenizer: ``CLIPTokenizer``.
        scheduler_config: the folder's ``scheduler/scheduler_config.json``.
        model_id: the spec the model was loaded from.
        digest: ``content_digest(folder)``.
        guidance_scale: classifier-free guidance scale (at most 1 runs the conditional branch only, as the pipeline does).
        prompts: default prompts; ``None`` uses a generic list of 24.
        resolution: ``(height, width)`` pixels (or an int, square), a positive multiple of the VAE scale; ``None``:
            the UNet's own. The latent shape is ``(in_channels, height / scale, width / scale)``.
    """

    def __init__(
        self,
        folder: Path,
        unet: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler_config: dict[str, Any],
        *,
        model_id: str,
        digest: str,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        prompts: Sequence[str] | None = None,
        resolution: Any = None,
    ):
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"{folder}: prediction_type {prediction_type!r} not in {PREDICTION_TYPES}")
        self.folder = Path(folder)
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.model_id = model_id
        self.digest = digest
        self.guidance_scale = float(guidance_scale)
        self.prediction_type = prediction_type
        try:
            self.alphas_cumprod = alphas_cumprod_from_config(scheduler_config)
            self.output_type = vp_output_type(scheduler_config)  # "epsilon", or "v_prediction" at zero terminal SNR
        except ValueError as error:
            raise ModelLoadError(f"{folder}: {error}") from None
        self.device = unet.device
        self.dtype = unet.dtype
        scale = vae_scale_factor(self.folder)
        own = own_resolution(unet.config.sample_size, scale)
        self.resolution = own if resolution is None else sd_resolution(self.folder, resolution, scale)
        self.latent_shape = (int(unet.config.in_channels), *(side // scale for side in self.resolution))
        self.prompts = list(prompts) if prompts is not None else list(GENERIC_PROMPTS)
        self.vae = None

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        model_id: str | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        prompts: Sequence[str] | None = None,
        resolution: int | tuple[int, int] | None = None,
    ) -> "StableDiffusionModel":
        """Load UNet, text encoder, tokenizer and scheduler config from a local diffusers SD folder.

        ``resolution``: pixels, an int (square) or ``(height, width)``, a positive multiple of the VAE scale; default
        the UNet's own (``sample_size × VAE scale``, the pipeline's default). Defaults: CUDA when available; fp16
        weights on CUDA, fp32 on CPU. Raises ``ModelLoadError`` (a ``ValueError``) naming the folder when it is
        missing, incomplete, SDXL (``StableDiffusionXLModel``'s) or unreadable, or the resolution is invalid (before
        any weights load).
        """
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        load = open_folder(folder, check_model_index, device, torch_dtype)
        if resolution is not None:
            sd_resolution(load.folder, resolution, vae_scale_factor(load.folder))  # refused before weights load
        with load.load_errors():
            unet = load.diffusers_module(UNet2DConditionModel, "unet")
            text_encoder = load.transformers_module(CLIPTextModel, "text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(load.folder, subfolder="tokenizer")
        return cls(
            load.folder,
            load.frozen(unet),
            load.frozen(text_encoder),
            tokenizer,
            load.scheduler_config,
            model_id=model_id or str(load.folder),
            digest=content_digest(load.folder),
            guidance_scale=guidance_scale,
            prompts=prompts,
            resolution=resolution,
        )

    def default_prompts(self) -> list[str]:
        return list(self.prompts)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> torch.Tensor:
        """``(B, 2, L, D)`` text embeddings, ``[:, 0]`` negative (default empty), ``[:, 1]`` the prompt.

        Each distinct string goes through the text encoder once, however often it repeats.
        """
        prompts, negatives = check_prompt_lists(prompts, negative_prompts)
        distinct = list(dict.fromkeys(negatives + prompts))
        embeddings = self.text_embeddings(distinct)
        row = {text: i for i, text in enumerate(distinct)}
        index = torch.tensor([[row[n], row[p]] for n, p in zip(negatives, prompts)], device=embeddings.device)
        return embeddings[index.reshape(-1)].reshape(len(prompts), 2, *embeddings.shape[1:])

    def text_embeddings(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """``(len(texts), L, D)`` last hidden states of the text encoder, as ``StableDiffusionPipeline`` computes them."""
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                texts[start : start + batch_size], padding="max_length", max_length=self.tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            )
            mask = tokens.attention_mask.to(self.device) if use_mask else None
            chunks.append(self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0])
        return torch.cat(chunks)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        """Guided ε (zero terminal SNR: guided v, ``output_type``) for ``x (B, *latent_shape)`` at train timestep
        ``t``; same shape, dtype and device as ``x``.

        The UNet runs in its own dtype; guidance and the v→ε conversion run in float32, or float64 when
        ``x`` is float64.
        """
        t = int(t)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside [0, {self.num_train_timesteps})")
        self.check_inputs(x, cond)
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        output = self.guided_network_output(x, t, cond).to(x.device, compute_dtype)
        if self.prediction_type == "v_prediction" and self.output_type == "epsilon":
            alpha = float(self.alphas_cumprod[t])
            output = alpha**0.5 * output + (1.0 - alpha) ** 0.5 * x.to(compute_dtype)
        return output.to(x.dtype)

    def check_inputs(self, x: torch.Tensor, cond: Any) -> None:
        """``ValueError`` unless ``x`` is ``(B, *latent_shape)`` and ``cond`` ``(B, 2, L, D)`` from ``encode_prompts``."""
        if tuple(x.shape[1:]) != self.latent_shape or cond.shape[0] != x.shape[0] or cond.shape[1] != 2:
            raise ValueError(
                f"expected x (B, {', '.join(map(str, self.latent_shape))}) and cond (B, 2, L, D), "
                f"got {tuple(x.shape)} and {tuple(cond.shape)}"
            )

    def guided_network_output(self, x: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        """``ŷ_u + s (ŷ_c − ŷ_u)`` in float32 on ``self.device`` from one UNet call on ``[x; x]``."""
        sample = x.to(self.device, self.dtype)
        cond = cond.to(self.device, self.dtype)
        timestep = torch.tensor(t, device=self.device)
        if self.guidance_scale <= 1.0:  # StableDiffusionPipeline guides only above 1
            return self.unet(sample, timestep, encoder_hidden_states=cond[:, 1]).sample.float()
        both = self.unet(
            torch.cat([sample, sample]), timestep, encoder_hidden_states=torch.cat([cond[:, 0], cond[:, 1]])
        ).sample.float()
        unconditional, conditional = both.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 images of ``latents (B, *latent_shape)`` (VAE loaded on first use, fp32)."""
        return decode_latents(self.load_vae(), latents, batch_size)

    def load_vae(self):
        """The folder's ``AutoencoderKL`` in fp32 on ``self.device``, loaded once."""
        if self.vae is None:
            self.vae = load_vae(self.folder, self.device)
        return self.vae
