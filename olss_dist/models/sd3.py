"""Stable Diffusion 3 / 3.5 adapter: a local diffusers ``StableDiffusion3Pipeline`` folder as a guided velocity.

Loaded up front: the ``SD3Transformer2DModel``, the two CLIP text encoders (``CLIPTextModelWithProjection``)
and the optional T5 encoder with their tokenizers, and the ``FlowMatchEulerDiscreteScheduler`` config; the
VAE is loaded on the first ``decode``. Prompts are encoded by the pipeline's own ``encode_prompt`` (a
``StableDiffusion3Pipeline`` holding these modules, without VAE), so every padding, truncation,
concatenation and zero-T5 rule is diffusers' own. Weights are read from safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from olss_dist.models.common import (
    TextConditioning,
    check_components,
    check_prompt_lists,
    decode_latents,
    encode_distinct,
    guided_pooled_output,
    index_has_component,
    open_folder,
    parse_resolution,
    vae_scale_factor,
)
from olss_dist.models.flow_common import FlowTransformerModel, dynamic_shift, flow_scheduler

PIPELINE_CLASS = "StableDiffusion3Pipeline"
REQUIRED_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
OPTIONAL_COMPONENTS = ("text_encoder_3", "tokenizer_3")
DEFAULT_GUIDANCE_SCALE = 7.0  # StableDiffusion3Pipeline's default
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # T5 tokens, StableDiffusion3Pipeline's default


def check_sd3_folder(folder: Path, index: dict[str, Any]) -> None:
    """``ModelLoadError`` unless the folder has the SD3 components (and the T5 encoder where the index names one)."""
    check_components(folder, index, REQUIRED_COMPONENTS, OPTIONAL_COMPONENTS, "Stable Diffusion 3")



def sd3_resolution(folder: Path, resolution: Any, vae_scale: int, patch: int) -> tuple[int, int]:
    """``(height, width)`` of ``resolution`` (an int or a pair), each a positive multiple of ``vae_scale * patch``.

    Raises:
        ModelLoadError: one line (``resolution: ...``) naming the folder and what it takes.
    """
    return parse_resolution(resolution, vae_scale * patch, f"{folder} (SD3, VAE scale {vae_scale}, patch {patch})")

class StableDiffusion3Model(FlowTransformerModel):
    """Classifier-free-guided velocity of a diffusers SD3 / SD3.5 transformer at the pipeline's timestep ``σ·1000``.

    Use ``StableDiffusion3Model.from_folder``. ``cond`` is a ``TextConditioning`` with ``embeddings
    (B, 2, L, D)`` (CLIP-L ⊕ CLIP-G hidden states padded to the T5 width, then the T5 tokens along L) and ``pooled
    (B, 2, P)``, index 0 the negative prompt, index 1 the prompt. With ``guidance_scale > 1`` one call runs
    the transformer once on ``[x; x]`` against ``[negatives; prompts]`` and returns ``v_u + s (v_c − v_u)``,
    exactly as ``StableDiffusion3Pipeline`` does; otherwise the conditional velocity (the pipeline's rule).

    Args:
        folder: the diffusers folder (kept for the lazily loaded VAE).
        pipeline: a ``StableDiffusion3Pipeline`` holding the transformer, text encoders and tokenizers
            (``vae=None``) on one device; its ``encode_prompt`` encodes the prompts.
        scheduler_config: the folder's ``scheduler/scheduler_config.json``.
        resolution: ``(height, width)`` in pixels the model is calibrated at.
        model_id: the spec the model was loaded from.
        digest: ``content_digest(folder)``.
        guidance_scale: classifier-free guidance scale.
        prompts: default prompts; ``None`` uses a generic list of 24.
        max_sequence_length: T5 tokens (the pipeline's ``max_sequence_length``).
        vae_scale: the VAE's down-sampling factor (``vae_scale_factor(folder)``).
    """

    def __init__(
        self,
        folder: Path,
        pipeline: Any,
        scheduler_config: dict[str, Any],
        resolution: tuple[int, int],
        *,
        model_id: str,
        digest: str,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        prompts: Sequence[str] | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        vae_scale: int = 8,
    ):
        super().__init__(
            folder, pipeline, scheduler_config, resolution, model_id=model_id, digest=digest,
            guidance_scale=guidance_scale, prompts=prompts, max_sequence_length=max_sequence_length, vae_scale=vae_scale,
        )

    def set_latent_layout(self, resolution: Any, vae_scale: int) -> float | None:
        """``resolution`` a multiple of VAE scale × patch; ``latent_shape (C, H/s, W/s)``; ``mu`` with dynamic shifting."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = int(self.transformer.config.patch_size)
        self.resolution = sd3_resolution(self.folder, resolution, vae_scale, patch)
        height, width = (side // vae_scale for side in self.resolution)
        self.latent_shape = (int(self.transformer.config.in_channels), height, width)
        scheduler = self.pipeline.scheduler.config  # with diffusers' defaults filled in, as the pipeline reads them
        # StableDiffusion3Pipeline.__call__ step 5: mu from the image sequence length in patches.
        if scheduler.get("use_dynamic_shifting", None):
            return dynamic_shift(scheduler, (height // patch) * (width // patch), calculate_shift, max_shift=1.16)
        return None

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
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ) -> "StableDiffusion3Model":
        """Load an SD3 / SD3.5 folder (no VAE until ``decode``).

        ``resolution``: pixels, an int (square) or ``(height, width)``, a positive multiple of VAE scale × patch
        size; default the model's own (``transformer.config.sample_size × VAE scale``, the pipeline's default).
        The T5 encoder is loaded when ``model_index.json`` names one; a folder saved without it (``null``)
        gets the pipeline's zero T5 tokens. Defaults: CUDA when available; fp16 weights on CUDA, fp32 on CPU.

        Raises:
            ModelLoadError: the folder is missing, incomplete or unreadable, or the resolution is invalid.
        """
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        load = open_folder(folder, check_sd3_folder, device, torch_dtype)
        folder, index = load.folder, load.index
        scheduler = flow_scheduler(load.scheduler_config, folder)
        vae_scale = vae_scale_factor(folder)
        with load.load_errors():
            transformer = load.diffusers_module(SD3Transformer2DModel, "transformer")
            if resolution is None:
                resolution = int(transformer.config.sample_size) * vae_scale
            encoders = {
                name: load.transformers_module(CLIPTextModelWithProjection, name)
                for name in ("text_encoder", "text_encoder_2")
            }
            tokenizers = {name: CLIPTokenizer.from_pretrained(folder, subfolder=name) for name in ("tokenizer", "tokenizer_2")}
            encoders["text_encoder_3"] = (
                load.transformers_module(T5EncoderModel, "text_encoder_3")
                if index_has_component(index, "text_encoder_3") else None
            )
            tokenizers["tokenizer_3"] = (
                T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_3")
                if index_has_component(index, "tokenizer_3") else None
            )
        modules = {
            name: None if module is None else load.frozen(module)
            for name, module in {"transformer": transformer, **encoders}.items()
        }
        pipeline = StableDiffusion3Pipeline(scheduler=scheduler, vae=None, **modules, **tokenizers)
        return cls.from_pipeline(
            load, pipeline, resolution, model_id=model_id, guidance_scale=guidance_scale, prompts=prompts,
            max_sequence_length=max_sequence_length, vae_scale=vae_scale,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> TextConditioning:
        """``embeddings (B, 2, L, D)`` and ``pooled (B, 2, P)``, ``[:, 0]`` negative (default empty), ``[:, 1]`` the prompt.

        ``L`` = CLIP's ``model_max_length`` + ``max_sequence_length`` (CLIP-L ⊕ CLIP-G features, zero-padded to
        the T5 width, then the T5 tokens). Each distinct string goes through
        the pipeline's ``encode_prompt`` once (negatives are encoded exactly as prompts are: the pipeline
        runs the same CLIP and T5 code on both).
        """
        prompts, negatives = check_prompt_lists(prompts, negative_prompts)
        (embeddings, pooled), row = encode_distinct(negatives + prompts, self.encode_texts)
        index = torch.tensor([[row[n], row[p]] for n, p in zip(negatives, prompts)], device=embeddings.device).reshape(-1)
        return TextConditioning(
            embeddings[index].reshape(len(prompts), 2, *embeddings.shape[1:]),
            pooled[index].reshape(len(prompts), 2, *pooled.shape[1:]),
        )

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``((n, L, D), (n, P))`` prompt embeddings of ``texts`` by ``StableDiffusion3Pipeline.encode_prompt``."""
        embeddings, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return embeddings, pooled

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, cond: TextConditioning) -> torch.Tensor:
        """Guided velocity for ``x (B, *latent_shape)`` at the pipeline's timestep ``t = σ·1000``; same shape, dtype, device.

        The transformer runs in its own dtype; guidance runs in float32.
        """
        t = float(t)
        if not 0.0 <= t <= self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside [0, {self.num_train_timesteps}]")
        if (
            tuple(x.shape[1:]) != self.latent_shape or not isinstance(cond, TextConditioning) or len(cond) != x.shape[0]
            or cond.embeddings.shape[1] != 2 or cond.pooled.shape[1] != 2
        ):
            raise ValueError(
                f"expected x (B, {', '.join(map(str, self.latent_shape))}) and a TextConditioning of B samples from "
                f"encode_prompts, got x {tuple(x.shape)} and {type(cond).__name__} of {len(cond)}"
            )
        return self.guided_velocity(x, t, cond).to(x.device, x.dtype)

    def guided_velocity(self, x: torch.Tensor, t: float, cond: TextConditioning) -> torch.Tensor:
        """``v_u + s (v_c − v_u)`` in float32 on ``self.device`` from one transformer call on ``[x; x]``; ``v_c`` for ``s ≤ 1``."""
        return guided_pooled_output(self.velocity, x, t, cond, self.guidance_scale, self.device, self.dtype)

    def velocity(self, sample: torch.Tensor, t: float, embeddings: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The transformer's output at ``t`` (a float32 timestep per sample, as the pipeline passes it)."""
        timestep = torch.full((len(sample),), t, dtype=torch.float32, device=self.device)
        return self.transformer(
            hidden_states=sample, timestep=timestep, encoder_hidden_states=embeddings, pooled_projections=pooled,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 images of ``latents (B, *latent_shape)``, ``z / scaling_factor + shift_factor`` decoded (fp32)."""
        return decode_latents(self.load_vae(), latents, batch_size)
