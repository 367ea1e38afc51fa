"""A tiny random-weight Stable Diffusion XL pipeline built from configs, for tests (no download).

16x16-pixel images through a 2x VAE (8x8 latents with 4 channels); a two-level UNet with SDXL's
``addition_embed_type="text_time"`` (six size / crop ids of 8 features each plus the 16-wide pooled
embedding); two 2-layer CLIP encoders of width 16 (the second with a projection, as SDXL's CLIP-G), whose
penultimate hidden states concatenate to the UNet's 32-wide cross attention. Tokenizers are ``tiny_sd``'s
character-level CLIP ones, from local files. The scheduler is SDXL base's own: Euler, "leading" spacing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tiny_sd import write_tiny_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

RESOLUTION = 16
"""Pixels per side the tiny SDXL samples at by default (UNet sample size 8 x VAE scale 2)."""
CLIP_WIDTH = 16
TIME_ID_WIDTH = 8


def clip_config(vocab_size: int) -> CLIPTextConfig:
    """Two layers, so that SDXL's penultimate hidden state is a transformer layer's output."""
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=CLIP_WIDTH,
    )


def tiny_sdxl_pipeline(
    folder: Path, prediction_type: str = "epsilon", seed: int = 0, **scheduler_options
) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL pipeline saved to ``folder / "model"`` and loaded back from there.

    ``scheduler_options`` override the Euler config (e.g. ``rescale_betas_zero_snr=True, timestep_spacing="trailing"``).
    """
    torch.manual_seed(seed)
    tokenizer = write_tiny_tokenizer(folder / "tokenizer_src")
    tokenizer_2 = write_tiny_tokenizer(folder / "tokenizer_2_src")
    text_encoder = CLIPTextModel(clip_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(len(tokenizer_2)))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * CLIP_WIDTH, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        transformer_layers_per_block=(1, 1), addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_WIDTH,
        projection_class_embeddings_input_dim=6 * TIME_ID_WIDTH + CLIP_WIDTH,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(**{
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
        "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
        "prediction_type": prediction_type, **scheduler_options,
    })
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(folder / "model")
    return StableDiffusionXLPipeline.from_pretrained(folder / "model", add_watermarker=False)
