"""Tiny random-weight Stable Diffusion 3 and Flux pipelines built from configs, for tests (no download).

Both have 16x16-pixel images, a 2x VAE (8x8 latents with 4 channels), one-layer CLIP and T5 encoders and a
one-block transformer. Tokenizers are built from local files only: the CLIP ones as ``tiny_sd``'s, the T5
one a character-level Unigram ``tokenizer.json`` made with the tokenizers library.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tiny_sd import write_tiny_tokenizer
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

RESOLUTION = 16
"""Pixels per side the tiny pipelines sample at (VAE scale 2: 8x8 latents)."""
T5_TOKENS = 16
"""``max_sequence_length`` the tests run the tiny pipelines with (the pipelines' defaults are 256 / 512)."""
CLIP_WIDTH = 16
T5_WIDTH = 32


def write_tiny_t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """A character-level T5 tokenizer (Unigram over lower-case letters, digits and ``▁``), saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(symbol, -3.0) for symbol in string.ascii_lowercase + string.digits]
    pieces += [("▁" + symbol, -2.5) for symbol in string.ascii_lowercase + string.digits]
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), extra_ids=0, model_max_length=T5_TOKENS)


def tiny_clip(vocab_size: int, projection: bool):
    """A one-layer CLIP text encoder of width 16 (with a 16-wide projection when ``projection``)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CLIP_WIDTH, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=CLIP_WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_t5(vocab_size: int) -> T5EncoderModel:
    """A one-layer T5 encoder of width 32."""
    return T5EncoderModel(
        T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=32, num_layers=1, num_heads=4, decoder_start_token_id=0)
    )


def tiny_vae(shift_factor: float) -> AutoencoderKL:
    """A 2x ``AutoencoderKL`` (3x16x16 <-> 4x8x8) with SD3/Flux-style ``scaling_factor`` and ``shift_factor``."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=1.5, shift_factor=shift_factor,
    )


def tiny_sd3_pipeline(folder: Path, seed: int = 0, with_t5: bool = True) -> StableDiffusion3Pipeline:
    """A randomly initialised SD3 pipeline saved to ``folder / "model"`` and loaded back (``with_t5=False``: no T5)."""
    torch.manual_seed(seed)
    tokenizer = write_tiny_tokenizer(folder / "tokenizer_src")
    tokenizer_3 = write_tiny_t5_tokenizer(folder / "tokenizer_3_src") if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16, pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=8,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(0.1),
        text_encoder=tiny_clip(len(tokenizer), True), tokenizer=tokenizer,
        text_encoder_2=tiny_clip(len(tokenizer), True), tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5(len(tokenizer_3)) if with_t5 else None, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder / "model")
    extra = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    return StableDiffusion3Pipeline.from_pretrained(folder / "model", **extra)


def tiny_flux_pipeline(folder: Path, seed: int = 0) -> FluxPipeline:
    """A randomly initialised guidance-distilled Flux pipeline saved to ``folder / "model"`` and loaded back."""
    torch.manual_seed(seed)
    tokenizer = write_tiny_tokenizer(folder / "tokenizer_src")
    tokenizer_2 = write_tiny_t5_tokenizer(folder / "tokenizer_2_src")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=tiny_vae(0.05), text_encoder=tiny_clip(len(tokenizer), False), tokenizer=tokenizer,
        text_encoder_2=tiny_t5(len(tokenizer_2)), tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.save_pretrained(folder / "model")
    return FluxPipeline.from_pretrained(folder / "model")
