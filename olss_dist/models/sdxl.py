"""Stable Diffusion XL adapter: a local diffusers ``StableDiffusionXLPipeline`` folder as a guided VP denoiser.

Loaded up front: the UNet (``addition_embed_type="text_time"``), both CLIP text encoders (``CLIPTextModel`` and
``CLIPTextModelWithProjection``) with their tokenizers, and the scheduler config; the VAE is loaded on the
first ``decode``. Prompts are encoded by the pipeline's own ``encode_prompt`` and the size / crop ids by its
own ``_get_add_time_ids`` (a ``StableDiffusionXLPipeline`` holding these modules, without VAE), so the
penultimate-layer features, the pooled CLIP-G embedding and the zeroed empty negative prompt are diffusers'
own. The noise process is the folder's scheduler config (Euler or DDIM alike: only its betas, prediction type
and spacing matter), and the output form (ε, v converted; v kept with zero terminal SNR) is
``StableDiffusionModel``'s. Weights are read from safetensors only.

The refiner (``StableDiffusionXLImg2ImgPipeline`` with ``requires_aesthetics_score``, CLIP-G only) is refused:
it is trained on the low-noise end of the schedule only and denoises a partly noised image, so a teacher
from pure noise would calibrate it on states it never sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from olss_dist.models.common import (
    ModelLoadError,
    TextConditioning,
    check_components,
    check_prompt_lists,
    encode_distinct,
    guided_pooled_output,
    open_folder,
    parse_resolution,
    pixels_to_uint8,
    vae_scale_factor,
)
from olss_dist.models.digest import content_digest
from olss_dist.models.stable_diffusion import StableDiffusionModel

PIPELINE_CLASS = "StableDiffusionXLPipeline"
REQUIRED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
DEFAULT_GUIDANCE_SCALE = 5.0  # StableDiffusionXLPipeline's default
CROPS_TOP_LEFT = (0, 0)  # the pipeline's default crops_coords_top_left


def is_refiner(index: dict[str, Any]) -> bool:
    """True for an SDXL refiner's ``model_index.json``: aesthetic-score conditioning, or CLIP-G without CLIP-L."""
    return bool(index.get("requires_aesthetics_score", False)) or (
        "text_encoder_2" in index and (index.get("text_encoder") or [None])[0] is None
    )


def refiner_error(where: str) -> ModelLoadError:
    """The one line that refuses an SDXL refiner folder (``where`` names it)."""
    return ModelLoadError(
        f"{where} is an SDXL refiner (requires_aesthetics_score, CLIP-G only), which is trained on low noise levels "
        f"to denoise a partly noised image; calibrate the SDXL base model ({PIPELINE_CLASS}) instead"
    )


def check_sdxl_folder(folder: Path, index: dict[str, Any]) -> None:
    """``ModelLoadError`` unless ``folder`` is an SDXL base folder with its two text encoders and tokenizers."""
    if is_refiner(index):
        raise refiner_error(str(folder))
    check_components(folder, index, REQUIRED_COMPONENTS, (), "SDXL")


def sdxl_resolution(folder: Path, resolution: Any, vae_scale: int) -> tuple[int, int]:
    """``(height, width)`` of ``resolution`` (an int or a pair), each a positive multiple of ``vae_scale``.

    Raises:
        ModelLoadError: one line (``resolution: ...``) naming the folder and what it takes.
    """
    return parse_resolution(resolution, vae_scale, f"{folder} (SDXL, VAE scale {vae_scale})")


class StableDiffusionXLModel(StableDiffusionModel):
    """Classifier-free-guided output of a diffusers SDXL UNet, exactly as ``StableDiffusionXLPipeline`` guides it.

    The output is ε (v-prediction converted), or the guided v itself with zero terminal SNR
    (``output_type``, ``StableDiffusionModel.__call__``).

    Use ``StableDiffusionXLModel.from_folder``. ``cond`` is a ``TextConditioning`` with ``embeddings (B, 2, L, D)``
    (CLIP-L ⊕ CLIP-G penultimate hidden states) and ``pooled (B, 2, P)`` (CLIP-G's projection), index 0 the
    negative prompt, index 1 the prompt. An empty negative prompt means "none" and is zeros when the folder's
    ``force_zeros_for_empty_prompt`` is set (SDXL's default), as the pipeline does when it is given no
    negative prompt. The size / crop ids are ``resolution + (0, 0) + resolution`` (the pipeline's defaults
    ``original_size = target_size = (height, width)``) for both branches. With ``guidance_scale > 1`` one call
    runs the UNet once on ``[x; x]`` and returns ``ε_u + s (ε_c − ε_u)``; otherwise ``ε_c`` (the pipeline's rule).

    Args:
        folder: the diffusers folder (kept for the lazily loaded VAE).
        pipeline: a ``StableDiffusionXLPipeline`` holding the UNet, text encoders and tokenizers (``vae=None``)
            on one device.
        scheduler_config: the folder's ``scheduler/scheduler_config.json``.
        resolution: ``(height, width)`` in pixels (or an int, square), a positive multiple of ``vae_scale``.
        model_id: the spec the model was loaded from.
        digest: ``content_digest(folder)``.
        guidance_scale: classifier-free guidance scale.
        prompts: default prompts; ``None`` uses a generic list of 24.
        vae_scale: the VAE's down-sampling factor (``vae_scale_factor(folder)``).

    Raises:
        ModelLoadError: a prediction type other than ε / v, a guidance-embedding (LCM-distilled) UNet, a
            resolution the model cannot take, or size ids the UNet's added embedding does not fit.
    """

    def __init__(
        self,
        folder: Path,
        pipeline: Any,
        scheduler_config: dict[str, Any],
        resolution: Any,
        *,
        model_id: str,
        digest: str,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        prompts: Sequence[str] | None = None,
        vae_scale: int = 8,
    ):
        super().__init__(
            folder, pipeline.unet, pipeline.text_encoder, pipeline.tokenizer, scheduler_config,
            model_id=model_id, digest=digest, guidance_scale=guidance_scale, prompts=prompts,
        )
        if self.unet.config.get("time_cond_proj_dim") is not None:
            raise ModelLoadError(
                f"{folder}: the UNet embeds the guidance scale (time_cond_proj_dim, a guidance-distilled model such as "
                "LCM-SDXL); only classifier-free-guided SDXL models are supported"
            )
        self.pipeline = pipeline
        self.force_zeros_for_empty_prompt = bool(pipeline.config.get("force_zeros_for_empty_prompt", True))
        self.resolution = sdxl_resolution(folder, resolution, vae_scale)
        self.latent_shape = (int(self.unet.config.in_channels), *(side // vae_scale for side in self.resolution))
        try:
            # StableDiffusionXLPipeline.__call__ step 7, which also checks the ids fit the UNet's added embedding.
            self.add_time_ids = pipeline._get_add_time_ids(
                self.resolution, CROPS_TOP_LEFT, self.resolution, dtype=self.dtype,
                text_encoder_projection_dim=int(pipeline.text_encoder_2.config.projection_dim),
            ).to(self.device)
        except ValueError as error:
            raise ModelLoadError(f"{folder}: {error}") from None

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
    ) -> "StableDiffusionXLModel":
        """Load an SDXL base folder (no VAE until ``decode``).

        ``resolution``: pixels, an int (square) or ``(height, width)``, a positive multiple of the VAE scale; default
        the model's own (``unet.config.sample_size × VAE scale``, the pipeline's default; 1024 for SDXL base). It
        sets the latent shape and the size ids. Defaults: CUDA when available; fp16 weights on CUDA, fp32 on CPU.

        Raises:
            ModelLoadError: the folder is missing, incomplete, a refiner or unreadable, or the resolution is invalid.
        """
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        load = open_folder(folder, check_sdxl_folder, device, torch_dtype)
        vae_scale = vae_scale_factor(load.folder)
        if resolution is not None:
            sdxl_resolution(load.folder, resolution, vae_scale)  # refused before gigabytes of weights load
        with load.load_errors():
            unet = load.diffusers_module(UNet2DConditionModel, "unet")
            text_encoder = load.transformers_module(CLIPTextModel, "text_encoder")
            text_encoder_2 = load.transformers_module(CLIPTextModelWithProjection, "text_encoder_2")
            tokenizers = {name: CLIPTokenizer.from_pretrained(load.folder, subfolder=name) for name in ("tokenizer", "tokenizer_2")}
        if resolution is None:
            size = unet.config.sample_size
            resolution = tuple(side * vae_scale for side in ((size, size) if isinstance(size, int) else size))
        pipeline = StableDiffusionXLPipeline(
            vae=None, text_encoder=load.frozen(text_encoder), text_encoder_2=load.frozen(text_encoder_2),
            unet=load.frozen(unet), scheduler=None, add_watermarker=False,  # the pipeline only encodes here
            force_zeros_for_empty_prompt=bool(load.index.get("force_zeros_for_empty_prompt", True)), **tokenizers,
        )
        return cls(
            load.folder, pipeline, load.scheduler_config, resolution, model_id=model_id or str(load.folder),
            digest=content_digest(load.folder), guidance_scale=guidance_scale, prompts=prompts, vae_scale=vae_scale,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> TextConditioning:
        """``embeddings (B, 2, L, D)`` and ``pooled (B, 2, P)``, ``[:, 0]`` negative (default none), ``[:, 1]`` the prompt.

        Each distinct string goes through the pipeline's ``encode_prompt`` once (the pipeline encodes negatives
        with the same code); an empty negative is zeros when ``force_zeros_for_empty_prompt``.
        """
        prompts, negatives = check_prompt_lists(prompts, negative_prompts)
        zeroed = self.force_zeros_for_empty_prompt
        texts = prompts + [n for n in negatives if n or not zeroed]
        (embeddings, pooled), row = encode_distinct(texts, self.encode_texts)
        if zeroed and "" in negatives:
            row[None] = len(embeddings)
            embeddings = torch.cat([embeddings, torch.zeros_like(embeddings[:1])])
            pooled = torch.cat([pooled, torch.zeros_like(pooled[:1])])
        keys = [(None if zeroed and not n else n, p) for n, p in zip(negatives, prompts)]
        index = torch.tensor([[row[n], row[p]] for n, p in keys], device=embeddings.device).reshape(-1)
        return TextConditioning(
            embeddings[index].reshape(len(prompts), 2, *embeddings.shape[1:]),
            pooled[index].reshape(len(prompts), 2, *pooled.shape[1:]),
        )

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``((n, L, D), (n, P))`` prompt embeddings of ``texts`` by ``StableDiffusionXLPipeline.encode_prompt``."""
        embeddings, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts, prompt_2=None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
        )
        return embeddings, pooled

    def check_inputs(self, x: torch.Tensor, cond: Any) -> None:
        """``ValueError`` unless ``x`` is ``(B, *latent_shape)`` and ``cond`` a ``TextConditioning`` of B from ``encode_prompts``."""
        if (
            tuple(x.shape[1:]) != self.latent_shape or not isinstance(cond, TextConditioning) or len(cond) != x.shape[0]
            or cond.embeddings.shape[1] != 2 or cond.pooled.shape[1] != 2
        ):
            raise ValueError(
                f"expected x (B, {', '.join(map(str, self.latent_shape))}) and a TextConditioning of B samples from "
                f"encode_prompts, got x {tuple(x.shape)} and {type(cond).__name__} of {len(cond)}"
            )

    def guided_network_output(self, x: torch.Tensor, t: int, cond: TextConditioning) -> torch.Tensor:
        """``ŷ_u + s (ŷ_c − ŷ_u)`` in float32 on ``self.device`` from one UNet call on ``[x; x]``; ``ŷ_c`` for ``s ≤ 1``."""
        return guided_pooled_output(self.network_output, x, t, cond, self.guidance_scale, self.device, self.dtype)

    def network_output(self, sample: torch.Tensor, t: int, embeddings: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The UNet's output at train timestep ``t`` with the pooled embeddings and the size ids (one row per sample)."""
        added = {"text_embeds": pooled, "time_ids": self.add_time_ids.repeat(len(sample), 1)}
        return self.unet(
            sample, torch.tensor(t, device=self.device), encoder_hidden_states=embeddings, added_cond_kwargs=added,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 images of ``latents (B, *latent_shape)``, unscaled as the pipeline does (fp32).

        ``z = latents · latents_std / scaling_factor + latents_mean`` where the VAE config has both, else
        ``latents / scaling_factor``.
        """
        vae = self.load_vae()
        config = vae.config
        mean, std = config.get("latents_mean", None), config.get("latents_std", None)
        images = []
        for start in range(0, len(latents), batch_size):
            z = latents[start : start + batch_size].to(vae.device, torch.float32)
            if mean is not None and std is not None:
                shape = (1, len(mean), 1, 1)
                z = z * torch.tensor(std, device=z.device).view(shape) / config.scaling_factor
                z = z + torch.tensor(mean, device=z.device).view(shape)
            else:
                z = z / config.scaling_factor
            images.append(pixels_to_uint8(vae.decode(z).sample))
        return np.concatenate(images)
