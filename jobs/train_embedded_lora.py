"""Train the embedded LoRA: a "heavy strokes" style over the embedded digits model, as a diffusers LoRA.

    python jobs/train_embedded_lora.py --seed 0        # rewrites olss_dist/models/embedded_lora/

The embedded model (``olss_dist/models/embedded``, ``jobs/train_embedded_model.py``) draws thin, regular or
thick strokes. This LoRA fine-tunes it to draw every digit *heavier* than its thickest style: the same
scikit-learn digits, jittered as in the base trainer, but dilated twice (grey-scale 3×3 max-pool applied
two times, ~5 px strokes at 32×32), under the base prompts (digit named, stroke named or left open, 10 %
empty for guidance). Only the UNet's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of
every self- and cross-attention layer) get rank-``rank`` LoRA factors through peft
(``UNet2DConditionModel.add_adapter``); the base weights, the text encoder and the VAE stay frozen.

The factors are saved with ``StableDiffusionPipeline.save_lora_weights`` as ``pytorch_lora_weights.safetensors``
(diffusers' key layout, loadable with ``pipe.load_lora_weights(folder)``); ``olss-dist calibrate --model
embedded --lora olss_dist/models/embedded_lora`` calibrates the fused model. At the end the trainer prints the
mean ink of 20-step DDIM samples of the base model and of the fused model on the same seeds, so the style is
measured, not only looked at; ``--samples PATH`` also draws both on the same noise
(``--no-train`` measures and draws the LoRA already saved). The same seed and thread count give the same weights.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (see the embedded trainer): set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import typer  # noqa: E402

# Run as a script, so jobs/ is on sys.path: the data pipeline is the embedded trainer's own.
from train_embedded_model import (  # noqa: E402
    SD_SCHEDULE,
    TrainingConfig,
    cosine_lr,
    digit_ink,
    ink_to_rgb,
    jitter,
    prompt_table,
    sample_prompt_index,
)

from olss_dist.models.embedded import EMBEDDED_MODEL_PATH, STROKE_STYLES, digit_prompt  # noqa: E402
from olss_dist.models.embedded_lora import EMBEDDED_LORA_PATH, LORA_TARGET_MODULES  # noqa: E402


@dataclass(frozen=True)
class LoraTrainingConfig:
    """Steps, batch, rate and LoRA shape (defaults: a few minutes on 2 loaded CPU cores)."""

    seed: int = 0
    steps: int = 400
    batch: int = 64
    lr: float = 3e-3
    rank: int = 4
    dilations: int = 2


def heavy_images(ink: torch.Tensor, dilations: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, 3, 32, 32)`` pixels of ``ink (B, 1, 32, 32)`` dilated ``dilations`` times (3×3), then jittered."""
    for _ in range(dilations):
        ink = F.max_pool2d(ink, 3, stride=1, padding=1)
    return ink_to_rgb(jitter(ink, generator))


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's LoRA factors in diffusers' key layout (what ``save_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def train_lora(pipeline, config: LoraTrainingConfig, generator: torch.Generator, log) -> None:
    """Add a rank-``config.rank`` adapter to ``pipeline.unet``'s attention and train it on heavy-stroke digits."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    unet, vae, text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                   target_modules=list(LORA_TARGET_MODULES))
    )
    parameters = [p for p in unet.parameters() if p.requires_grad]
    log(f"LoRA rank {config.rank}: {sum(p.numel() for p in parameters)} trainable parameters")
    ink, labels = digit_ink()
    _, token_ids = prompt_table(pipeline.tokenizer)
    with torch.no_grad():
        embeddings = text_encoder(token_ids)[0]
    alphas_cumprod = DDPMScheduler(**SD_SCHEDULE).alphas_cumprod
    scaling = vae.config.scaling_factor
    prompt_config = TrainingConfig()
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    unet.train()
    for step in range(config.steps):
        index = torch.randint(len(ink), (config.batch,), generator=generator)
        with torch.no_grad():
            posterior = vae.encode(heavy_images(ink[index], config.dilations, generator)).latent_dist
            clean = posterior.sample(generator) * scaling
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(len(alphas_cumprod), (config.batch,), generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * clean + (1 - a).sqrt() * noise
        strokes = torch.randint(len(STROKE_STYLES), (config.batch,), generator=generator)
        rows = sample_prompt_index(labels[index], strokes, prompt_config, generator)
        loss = F.mse_loss(unet(noisy, t, embeddings[rows]).sample, noise)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * cosine_lr(step, config.steps, warmup=min(50, config.steps // 4))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == config.steps - 1:
            log(f"lora step {step:4d}  loss {loss.item():.4f}")
    unet.eval()


@torch.no_grad()
def sample_row(pipeline, seed: int = 1234, steps: int = 20):
    """``(32, 320, 3)`` uint8: the digits 0-9 (stroke left open), 20 DDIM steps, one fixed seed per column."""
    import numpy as np

    prompts = [digit_prompt(d) for d in range(10)]
    generators = [torch.Generator().manual_seed(seed + d) for d in range(10)]
    images = pipeline(prompts, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                      generator=generators).images
    return (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)


def save_samples(path: Path, base, fused) -> None:
    """A PNG of two rows from the same noise, base model above, base + LoRA below, upscaled 3x."""
    import numpy as np
    from PIL import Image

    grid = np.concatenate([sample_row(base), np.full((4, 320, 3), 255, np.uint8), sample_row(fused)], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


@torch.no_grad()
def mean_ink(pipeline, seed: int = 1234, steps: int = 20) -> float:
    """Mean ink (1 = black) of 40 DDIM samples, one per digit × stroke-open/thick/thin/regular prompt, fixed seeds."""
    prompts = [digit_prompt(d, s) for d in range(10) for s in (None, *STROKE_STYLES)]
    images = pipeline(prompts, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                      generator=torch.Generator().manual_seed(seed)).images
    return float(1.0 - images.mean())


def main(
    seed: int = typer.Option(0, help="Seed of every random draw (LoRA init, data order, augmentation, noise)."),
    output: Path = typer.Option(EMBEDDED_LORA_PATH, help="Folder to write pytorch_lora_weights.safetensors to."),
    steps: int = typer.Option(LoraTrainingConfig.steps, min=1, help="LoRA optimisation steps."),
    rank: int = typer.Option(LoraTrainingConfig.rank, min=1, help="LoRA rank."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads (the result depends on it)."),
    samples: Path = typer.Option(None, help="Also write a PNG: base row above, base + LoRA below, same noise."),
    train: bool = typer.Option(True, help="--no-train: measure (and draw) the LoRA already in --output."),
) -> None:
    """Train the embedded LoRA reproducibly on CPU and save it as diffusers LoRA safetensors."""
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    pipeline = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_PATH, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    base_ink = mean_ink(pipeline)
    if train:
        config = LoraTrainingConfig(seed=seed, steps=steps, rank=rank)
        train_lora(pipeline, config, torch.Generator().manual_seed(seed), log)
        output.mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline.save_lora_weights(output, unet_lora_layers=lora_state_dict(pipeline.unet),
                                                  safe_serialization=True)
        size = (output / "pytorch_lora_weights.safetensors").stat().st_size
        log(f"saved {output / 'pytorch_lora_weights.safetensors'} ({size} bytes)")

    fused = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_PATH, safety_checker=None)
    fused.set_progress_bar_config(disable=True)
    fused.load_lora_weights(output)
    fused.fuse_lora()
    log(f"mean ink of 40 samples (20 DDIM steps, same seeds): base {base_ink:.3f}, with the LoRA {mean_ink(fused):.3f}")
    if samples is not None:
        base = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_PATH, safety_checker=None)
        base.set_progress_bar_config(disable=True)
        save_samples(samples, base, fused)
        log(f"wrote {samples}")


if __name__ == "__main__":
    typer.run(main)
