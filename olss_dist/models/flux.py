"""Flux adapter: a local diffusers ``FluxPipeline`` folder as a guidance-distilled velocity on packed latents.

Loaded up front: the ``FluxTransformer2DModel``, the CLIP text encoder (``CLIPTextModel``, pooled output) and
the T5 encoder with their tokenizers, and the ``FlowMatchEulerDiscreteScheduler`` config; the VAE is loaded
on the first ``decode``. Prompts are encoded by the pipeline's own ``encode_prompt`` (a ``FluxPipeline``
holding these modules, without VAE). Weights are read from safetensors only.

Flux is guidance-distilled: the guidance scale goes into the transformer's guidance embedding and there is
no classifier-free doubling, so there are no negative prompts. Its latents are packed: the state the
pipeline's scheduler steps on is ``(seq_len, channels)`` with ``seq_len = (H / 2s) (W / 2s)`` 2×2 patches of
the VAE latent (``s`` the VAE scale) and ``channels = 4 × latent channels``. The schedule's dynamic shift
``mu`` follows that sequence length exactly as ``FluxPipeline`` computes it.
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
    open_folder,
    parse_resolution,
    vae_scale_factor,
)
from olss_dist.models.flow_common import FlowTransformerModel, dynamic_shift, flow_scheduler

PIPELINE_CLASS = "FluxPipeline"
REQUIRED_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
DEFAULT_GUIDANCE_SCALE = 3.5  # FluxPipeline's default
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # T5 tokens, FluxPipeline's default
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: latent pixels per side (1024 px with the 8x VAE)


def default_flux_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (Flux overflows in fp16), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_flux_folder(folder: Path, index: dict[str, Any]) -> None:
    """``ModelLoadError`` unless the folder has every Flux component."""
    check_components(folder, index, REQUIRED_COMPONENTS, (), "Flux")



def flux_resolution(folder: Path, resolution: Any, vae_scale: int) -> tuple[int, int]:
    """``(height, width)`` of ``resolution`` (an int or a pair), each a positive multiple of ``2 * vae_scale``
    (the VAE's scale and FluxPipeline's 2x2 packing).

    Raises:
        ModelLoadError: one line (``resolution: ...``) naming the folder and what it takes.
    """
    return parse_resolution(resolution, 2 * vae_scale, f"{folder} (Flux, VAE scale {vae_scale}, 2x2 packing)")

class FluxModel(FlowTransformerModel):
    """Guidance-embedded velocity of a diffusers Flux transformer on packed latents, at the pipeline's timestep ``σ·1000``.

    Use ``FluxModel.from_folder``. ``x`` is ``(B, seq_len, channels)`` packed latents; ``cond`` is a
    ``TextConditioning`` with ``embeddings (B, L, D)`` (T5) and ``pooled (B, P)`` (CLIP). One transformer
    call per ``__call__``, fed ``timestep = t / 1000``, ``guidance = guidance_scale`` (where the transformer
    has a guidance embedding; FLUX.1-schnell has none and ignores it), the text ids (zeros) and image ids
    (row, column of each patch) as ``FluxPipeline`` builds them.

    Args:
        folder: the diffusers folder (kept for the lazily loaded VAE).
        pipeline: a ``FluxPipeline`` holding the transformer, text encoders and tokenizers (``vae=None``).
        scheduler_config: the folder's ``scheduler/scheduler_config.json``.
        resolution: ``(height, width)`` in pixels the model is calibrated at.
        model_id: the spec the model was loaded from.
        digest: ``content_digest(folder)``.
        guidance_scale: the distilled guidance scale fed to the guidance embedding.
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
        """``resolution`` a multiple of 2 × VAE scale; packed ``latent_shape (seq_len, channels)``, image ids, ``mu``."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        pipeline = self.pipeline
        self.vae_scale = int(vae_scale)
        self.resolution = flux_resolution(self.folder, resolution, self.vae_scale)
        # FluxPipeline.prepare_latents: VAE latent of H/s x W/s, packed into (H/2s)(W/2s) patches of 4 channels each.
        self.latent_size = tuple(2 * (side // (2 * self.vae_scale)) for side in self.resolution)
        channels = int(self.transformer.config.in_channels) // 4
        self.latent_shape = ((self.latent_size[0] // 2) * (self.latent_size[1] // 2), channels * 4)
        self.image_ids = pipeline._prepare_latent_image_ids(
            1, self.latent_size[0] // 2, self.latent_size[1] // 2, self.device, pipeline.text_encoder_2.dtype
        )  # the pipeline builds them in the prompt embeddings' dtype
        scheduler = pipeline.scheduler.config  # with diffusers' defaults filled in, as the pipeline reads them
        # FluxPipeline always computes mu and passes it; the scheduler uses it only with dynamic shifting.
        mu = dynamic_shift(scheduler, self.latent_shape[0], calculate_shift, max_shift=1.15)
        return mu if scheduler.get("use_dynamic_shifting", False) else None

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
    ) -> "FluxModel":
        """Load a Flux folder (no VAE until ``decode``).

        ``resolution``: pixels, an int (square) or ``(height, width)``, a positive multiple of 2 × VAE scale;
        default ``FluxPipeline``'s own (``128 × VAE scale``: 1024). Defaults: CUDA when available; bf16
        weights on CUDA, fp32 on CPU.

        Raises:
            ModelLoadError: the folder is missing, incomplete or unreadable, or the resolution is invalid.
        """
        from diffusers import FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        load = open_folder(folder, check_flux_folder, device, torch_dtype, dtype_for=default_flux_dtype)
        folder = load.folder
        scheduler = flow_scheduler(load.scheduler_config, folder)
        vae_scale = vae_scale_factor(folder)
        if resolution is None:
            resolution = DEFAULT_SAMPLE_SIZE * vae_scale
        with load.load_errors():
            modules = {
                "transformer": load.diffusers_module(FluxTransformer2DModel, "transformer"),
                "text_encoder": load.transformers_module(CLIPTextModel, "text_encoder"),
                "text_encoder_2": load.transformers_module(T5EncoderModel, "text_encoder_2"),
            }
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
            tokenizer_2 = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")
        modules = {name: load.frozen(module) for name, module in modules.items()}
        pipeline = FluxPipeline(scheduler=scheduler, vae=None, tokenizer=tokenizer, tokenizer_2=tokenizer_2, **modules)
        return cls.from_pipeline(
            load, pipeline, resolution, model_id=model_id, guidance_scale=guidance_scale, prompts=prompts,
            max_sequence_length=max_sequence_length, vae_scale=vae_scale,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None) -> TextConditioning:
        """``embeddings (B, max_sequence_length, D)`` (T5) and ``pooled (B, P)`` (CLIP), each distinct prompt encoded once.

        Raises:
            ValueError: a non-empty negative prompt (guidance-distilled Flux has no unconditional branch, so a
                negative prompt would silently change nothing).
        """
        prompts, negatives = check_prompt_lists(prompts, negative_prompts)
        if any(negatives):
            raise ValueError("negative_prompts: Flux is guidance-distilled (no classifier-free guidance), so it takes none")
        (embeddings, pooled), row = encode_distinct(prompts, self.encode_texts)
        index = torch.tensor([row[p] for p in prompts], device=embeddings.device)
        return TextConditioning(embeddings[index], pooled[index])

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``((n, L, D), (n, P))`` T5 and pooled CLIP embeddings of ``texts`` by ``FluxPipeline.encode_prompt``."""
        embeddings, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return embeddings, pooled

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, cond: TextConditioning) -> torch.Tensor:
        """Velocity for packed ``x (B, seq_len, channels)`` at the pipeline's timestep ``t = σ·1000``; shape, dtype, device of x."""
        t = float(t)
        if not 0.0 <= t <= self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside [0, {self.num_train_timesteps}]")
        if (
            tuple(x.shape[1:]) != self.latent_shape or not isinstance(cond, TextConditioning) or len(cond) != x.shape[0]
            or cond.embeddings.ndim != 3 or cond.pooled.ndim != 2
        ):
            raise ValueError(
                f"expected packed x (B, {', '.join(map(str, self.latent_shape))}) and a TextConditioning of B samples "
                f"from encode_prompts, got x {tuple(x.shape)} and {type(cond).__name__} of {len(cond)}"
            )
        return self.velocity(x, t, cond).to(x.device, x.dtype)

    def velocity(self, x: torch.Tensor, t: float, cond: TextConditioning) -> torch.Tensor:
        """The transformer's output on ``self.device``, its inputs built as in ``FluxPipeline.__call__``'s denoising loop."""
        sample = x.to(self.device, self.dtype)
        embeddings = cond.embeddings.to(self.device, self.dtype)
        batch = len(sample)
        # The pipeline's t is the scheduler's float32 timestep, cast to the latents' dtype, then divided by 1000.
        timestep = torch.full((batch,), t, dtype=torch.float32, device=self.device).to(self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=self.device, dtype=torch.float32).expand(batch)
        text_ids = torch.zeros(embeddings.shape[1], 3, device=self.device, dtype=self.pipeline.text_encoder.dtype)
        return self.transformer(
            hidden_states=sample, timestep=timestep / 1000, guidance=guidance,
            pooled_projections=cond.pooled.to(self.device, self.dtype), encoder_hidden_states=embeddings,
            txt_ids=text_ids, img_ids=self.image_ids, return_dict=False,
        )[0]

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, H/s, W/s)`` VAE latents of packed ``latents (B, seq_len, channels)`` (``FluxPipeline._unpack_latents``)."""
        return self.pipeline._unpack_latents(latents, *self.resolution, self.vae_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """``(B, H, W, 3)`` uint8 images of packed ``latents``: unpacked, ``z / scaling_factor + shift_factor``, decoded (fp32)."""
        return decode_latents(self.load_vae(), self.unpack(latents), batch_size)
