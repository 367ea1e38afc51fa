"""Train the embedded default model: a tiny text-conditioned latent diffusion model of handwritten digits.

    python jobs/train_embedded_model.py --seed 0          # rewrites olss_dist/models/embedded/

Data needs no download: scikit-learn's bundled 8×8 digits, upscaled to 32×32, drawn with thick, thin
or regular strokes (grey-scale dilation / erosion) and lightly jittered (rotation, scale, shift).
Three stages, all on CPU:

1. ``AutoencoderKL`` 3×32×32 ↔ 4×8×8, reconstruction MSE plus a small KL term; its
   ``scaling_factor`` is set to 1 / std of the training latents, as for Stable Diffusion.
2. A BPE ``CLIPTokenizer`` whose vocabulary is learned from the prompt grammar
   (``olss_dist.models.embedded.digit_prompt``), so every prompt word is one token.
3. ``UNet2DConditionModel`` and a 2-layer ``CLIPTextModel`` trained together on the ε-prediction loss
   under the Stable Diffusion noise schedule (scaled_linear 0.00085–0.012, 1000 steps), with 10 %
   empty prompts for classifier-free guidance and an exponential moving average of the weights.

The result is saved with ``StableDiffusionPipeline.save_pretrained`` (safetensors). The same seed and
thread count give the same weights.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads burn most
# of the CPU waiting for descheduled peers (10x slower steps). Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import typer  # noqa: E402

from olss_dist.models.embedded import EMBEDDED_MODEL_PATH, STROKE_STYLES, digit_prompt  # noqa: E402

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
TEXT_WIDTH = 64
MAX_PROMPT_TOKENS = 16
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class TrainingConfig:
    """Step counts and rates of the three stages (defaults: about 15 minutes on 2 CPU cores)."""

    seed: int = 0
    vae_steps: int = 800
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    augmentations_per_image: int = 4
    unet_steps: int = 2000
    unet_batch: int = 128
    unet_lr: float = 2e-3
    ema_decay: float = 0.999
    empty_prompt_fraction: float = 0.1
    open_stroke_fraction: float = 0.3


# ---------------------------------------------------------------------------------------------- data


def digit_ink() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits upscaled: ``ink (1797, 1, 32, 32)`` in [0, 1] (1 = ink) and ``labels (1797,)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    ink = F.interpolate(small, size=IMAGE_SIZE, mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return ink, torch.tensor(digits.target, dtype=torch.long)


def with_strokes(ink: torch.Tensor, strokes: torch.Tensor) -> torch.Tensor:
    """Grey-scale 3×3 dilation where ``strokes`` names "thick", erosion for "thin", unchanged for "regular".

    ``ink (B, 1, H, W)``; ``strokes (B,)`` indices into ``STROKE_STYLES``.
    """
    dilated = F.max_pool2d(ink, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-ink, 3, stride=1, padding=1)
    style = strokes.view(-1, 1, 1, 1)
    return torch.where(
        style == STROKE_STYLES.index("thick"), dilated, torch.where(style == STROKE_STYLES.index("thin"), eroded, ink)
    )


def jitter(ink: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light random similarity transform: rotation ±10°, scale 0.9–1.1, shift ±2 px (of 32). Same shape."""
    batch = ink.shape[0]
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(batch, generator=generator)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (2.0 / (IMAGE_SIZE / 2))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(ink.shape), align_corners=False)
    return F.grid_sample(ink, grid, padding_mode="zeros", align_corners=False)


def ink_to_rgb(ink: torch.Tensor) -> torch.Tensor:
    """Black ink on white paper: ``(B, 1, H, W)`` ink in [0, 1] → ``(B, 3, H, W)`` pixels in [-1, 1]."""
    return (1.0 - 2.0 * ink).expand(-1, 3, -1, -1).contiguous()


def augmented_images(ink: torch.Tensor, strokes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(B, 3, 32, 32)`` training pixels for ``ink (B, 1, 32, 32)`` drawn with ``strokes (B,)``, jittered."""
    return ink_to_rgb(jitter(with_strokes(ink, strokes), generator))


# ---------------------------------------------------------------------------------------------- models


def learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (CLIP's ``</w>`` end-of-word convention) until every word is a single token.

    Deterministic: the most frequent adjacent pair wins, ties go to the lexicographically smallest pair.
    """
    segmented = [tuple(word[:-1]) + (word[-1] + "</w>",) for word in words]
    merges = []
    while True:
        pairs = Counter(pair for symbols in segmented for pair in zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        segmented = [merge_pair(symbols, best) for symbols in segmented]


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """``symbols`` with every left-to-right occurrence of ``pair`` joined into one symbol."""
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def build_tokenizer():
    """A CLIP BPE tokenizer whose vocabulary holds every prompt word as one token (16 tokens max).

    Single letters, digits and punctuation are in the vocabulary too, so any lowercase ASCII text
    tokenizes without unknown tokens.
    """
    from transformers import CLIPTokenizer

    prompts = [digit_prompt(d, s) for d in range(10) for s in (*STROKE_STYLES, None)]
    words = sorted({word for prompt in prompts for word in re.findall(r"[a-z]+|[^\sa-z]", prompt)})
    alphabet = sorted(string.ascii_lowercase + string.digits + ",.!?'-")
    merges = learn_bpe_merges(words)
    symbols = [BOS, EOS] + alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab = {symbol: index for index, symbol in enumerate(dict.fromkeys(symbols))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)


def save_slow_tokenizer_files(tokenizer, directory: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` next to ``tokenizer.json``: transformers 4.x's slow
    ``CLIPTokenizer`` (what ``model_index.json`` names) reads these instead."""
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [" ".join(m) for m in bpe["merges"]]
    Path(directory, "vocab.json").write_text(json.dumps(bpe["vocab"], indent=0, sort_keys=True) + "\n")
    Path(directory, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_text_encoder(tokenizer):
    """A 2-layer, 64-wide ``CLIPTextModel`` over ``tokenizer``'s vocabulary (≈ 70 K parameters)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, projection_dim=TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_PROMPT_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae():
    """``AutoencoderKL`` 3×32×32 → 4×8×8 (≈ 0.25 M parameters)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
    )


def build_unet():
    """``UNet2DConditionModel`` on 4×8×8 latents (≈ 2.5 M parameters).

    Attention (self and cross) only at 4×4 and in the middle block: at 8×8 it would double the cost of
    a step, and the prompt (digit, stroke) is global information that the coarse level carries.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 96), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
    )


def build_scheduler():
    """DDIM with the Stable Diffusion noise schedule and SD 1.x's step conventions."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SD_SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


# ---------------------------------------------------------------------------------------------- training


def cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def train_vae(vae, ink: torch.Tensor, config: TrainingConfig, generator: torch.Generator, log) -> None:
    """Fit ``vae`` to jittered digits in random stroke styles: pixel MSE + ``vae_kl_weight`` · KL per pixel."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    pixels_per_image = 3 * IMAGE_SIZE * IMAGE_SIZE
    vae.train()
    for step in range(config.vae_steps):
        index = torch.randint(len(ink), (config.vae_batch,), generator=generator)
        strokes = torch.randint(len(STROKE_STYLES), (config.vae_batch,), generator=generator)
        images = augmented_images(ink[index], strokes, generator)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(reconstruction, images)
        loss = mse + config.vae_kl_weight * posterior.kl().mean() / pixels_per_image
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * cosine_lr(step, config.vae_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.vae_steps - 1:
            log(f"vae step {step:5d}  mse {mse.item():.5f}")
    vae.eval()


@torch.no_grad()
def encode_training_set(vae, ink, labels, config: TrainingConfig, generator: torch.Generator):
    """Latent posteriors of ``augmentations_per_image`` jittered copies of every digit in every stroke style.

    Returns ``mean, std (M, 4, 8, 8)`` (unscaled), ``labels (M,)`` and ``strokes (M,)``
    with ``M = 1797 · 3 · augmentations_per_image``.
    """
    copies = config.augmentations_per_image * len(STROKE_STYLES)
    all_ink = ink.repeat(copies, 1, 1, 1)
    all_labels = labels.repeat(copies)
    all_strokes = torch.arange(len(STROKE_STYLES)).repeat_interleave(len(ink)).repeat(config.augmentations_per_image)
    means, stds = [], []
    for start in range(0, len(all_ink), 512):
        images = augmented_images(all_ink[start : start + 512], all_strokes[start : start + 512], generator)
        posterior = vae.encode(images).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), all_labels, all_strokes


def prompt_table(tokenizer) -> tuple[list[str], torch.Tensor]:
    """Every training prompt and its padded token ids ``(P, 16)``; index 0 is the empty prompt.

    Prompt ``1 + 4·d + s`` is digit ``d`` with stroke ``STROKE_STYLES[s]`` (``s = 3``: no stroke words).
    """
    prompts = [""] + [digit_prompt(d, s) for d in range(10) for s in (*STROKE_STYLES, None)]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return prompts, ids


def sample_prompt_index(labels, strokes, config: TrainingConfig, generator: torch.Generator) -> torch.Tensor:
    """Row of ``prompt_table`` per example: empty, stroke left open, or digit and stroke named."""
    u = torch.rand(len(labels), generator=generator)
    stroke_slot = torch.where(u < config.empty_prompt_fraction + config.open_stroke_fraction, len(STROKE_STYLES), strokes)
    return torch.where(u < config.empty_prompt_fraction, 0, 1 + (len(STROKE_STYLES) + 1) * labels + stroke_slot)


def train_denoiser(unet, text_encoder, tokenizer, latents, config: TrainingConfig, generator, log) -> None:
    """Train ``unet`` and ``text_encoder`` together on ε-prediction; leave the EMA weights in both.

    ``latents``: ``(mean, std, labels, strokes)`` from ``encode_training_set``, already scaled.
    """
    from diffusers import DDPMScheduler

    mean, std, labels, strokes = latents
    _, token_ids = prompt_table(tokenizer)
    alphas_cumprod = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    parameters = [p for module in (unet, text_encoder) for p in module.parameters()]
    ema = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=1e-2)
    unet.train()
    text_encoder.train()
    for step in range(config.unet_steps):
        index = torch.randint(len(mean), (config.unet_batch,), generator=generator)
        clean = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(len(alphas_cumprod), (config.unet_batch,), generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * clean + (1 - a).sqrt() * noise
        ids = token_ids[sample_prompt_index(labels[index], strokes[index], config, generator)]
        prediction = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        for group in optimizer.param_groups:
            group["lr"] = config.unet_lr * cosine_lr(step, config.unet_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in parameters], 1.0 - decay)
        if step % 100 == 0 or step == config.unet_steps - 1:
            log(f"unet step {step:5d}  loss {loss.item():.4f}")
    with torch.no_grad():
        for p, averaged in zip(parameters, ema):
            p.copy_(averaged)
    unet.eval()
    text_encoder.eval()


def train_embedded_model(config: TrainingConfig, output: Path, log=print) -> None:
    """Run the three stages and save the pipeline to ``output`` (its weight folders are replaced)."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    ink, labels = digit_ink()

    vae = build_vae()
    train_vae(vae, ink, config, generator, log)
    mean, std, latent_labels, strokes = encode_training_set(vae, ink, labels, config, generator)
    scaling_factor = round(1.0 / mean.std().item(), 5)
    vae.register_to_config(scaling_factor=scaling_factor)
    log(f"autoencoder done; scaling_factor {scaling_factor}")

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet()
    latents = (mean * scaling_factor, std * scaling_factor, latent_labels, strokes)
    train_denoiser(unet, text_encoder, tokenizer, latents, config, generator, log)
    log("denoiser done")

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(output, safe_serialization=True)
    save_slow_tokenizer_files(tokenizer, output / "tokenizer")
    log(f"saved to {output}")


def main(
    seed: int = typer.Option(0, help="Seed of every random draw (weights, data order, augmentation, noise)."),
    output: Path = typer.Option(EMBEDDED_MODEL_PATH, help="Folder to write the diffusers pipeline to."),
    vae_steps: int = typer.Option(TrainingConfig.vae_steps, min=1, help="Autoencoder optimisation steps."),
    unet_steps: int = typer.Option(TrainingConfig.unet_steps, min=1, help="UNet + text encoder steps."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads (the result depends on it)."),
) -> None:
    """Train the embedded digits model reproducibly on CPU and save it in the diffusers SD layout."""
    torch.set_num_threads(threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    train_embedded_model(TrainingConfig(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps), output, log)


if __name__ == "__main__":
    typer.run(main)
