"""Train the embedded flow model: a tiny Stable Diffusion 3 (rectified flow) model of handwritten digits.

    python jobs/train_embedded_flow_model.py --seed 0     # rewrites olss_dist/models/embedded_flow/

The folder is a diffusers ``StableDiffusion3Pipeline`` (``transformer/``, ``text_encoder/``,
``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``vae/``, ``scheduler/``; no T5 encoder, so the
pipeline appends 256 all-zero T5 tokens to the prompt embedding). It reuses the embedded SD model
(``jobs/train_embedded_model.py``): its data pipeline and prompt sampling are imported from that trainer,
its trained ``AutoencoderKL`` is copied byte for byte (``shift_factor`` 0.0 added to the config, the
``scaling_factor`` kept) and its tokenizer files serve both CLIP slots. Trained here, jointly:

- ``SD3Transformer2DModel`` on 4×8×8 latents (patch 2, 4 joint blocks, width 128) and
- two ``CLIPTextModelWithProjection`` (3 layers, width 64, projection 32),

on the rectified-flow objective: x_σ = (1 − σ)·x0 + σ·noise, target velocity v = noise − x0, the
transformer fed t = σ·1000; σ = shift(u) with u ~ U(0, 1) and shift(u) = 3u / (1 + 2u), which is the
density ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` visits when sampling with evenly spaced steps.
10 % empty prompts (classifier-free guidance), 30 % without stroke words, EMA of the weights.

A tenth of the digit images (every tenth index) is held out: the validation flow-matching loss is
measured on them, and a scikit-learn SVM trained on 8×8 down-sampled training digits (all stroke styles)
reads the digits that the trained model draws for each prompt, per guidance scale.

The same seed and thread count give the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (see the embedded trainer): set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import typer  # noqa: E402
from diffusers.models.attention_processor import JointAttnProcessor2_0  # noqa: E402

# Run as a script, so jobs/ is on sys.path: the data pipeline is the embedded trainer's own.
from train_embedded_model import (  # noqa: E402
    MAX_PROMPT_TOKENS,
    TrainingConfig,
    augmented_images,
    build_vae,
    cosine_lr,
    digit_ink,
    encode_training_set,
    prompt_table,
    sample_prompt_index,
)

from olss_dist.models.embedded import EMBEDDED_MODEL_PATH, STROKE_STYLES, digit_prompt  # noqa: E402
from olss_dist.models.embedded_flow import EMBEDDED_FLOW_MODEL_PATH, GUIDANCE_SCALE, LOAD_KWARGS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIFT = 3.0
T5_TOKENS = 256
"""Zero T5 tokens the SD3 pipeline appends without a T5 encoder (its default ``max_sequence_length``)."""
TEXT_WIDTH = 64
TEXT_PROJECTION = 32
HELD_OUT_EVERY = 10
EVAL_GUIDANCE = (1.0, 2.0, 3.0, 4.0, 5.0, 7.0)


@dataclass(frozen=True)
class FlowTrainingConfig:
    """Steps and rates of the transformer + text encoder training (defaults: ~10 minutes on 2 idle CPU cores).

    ``data`` is the embedded trainer's config: its augmentation count and prompt-dropout fractions are
    what its imported data functions read.
    """

    seed: int = 0
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    data: TrainingConfig = TrainingConfig()
    validation_batches: int = 8
    eval_samples_per_digit: int = 10


# ---------------------------------------------------------------------------------------------- models


def build_text_encoder(tokenizer, seed: int):
    """A 3-layer, 64-wide ``CLIPTextModelWithProjection`` (projection 32) over ``tokenizer``'s vocabulary.

    Three layers because the SD3 pipeline reads the sequence from the penultimate hidden state and the
    pooled vector from the last layer's projection.
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        projection_dim=TEXT_PROJECTION, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config)


def build_transformer():
    """``SD3Transformer2DModel`` on 4×8×8 latents: 2×2 patches (16 image tokens), 4 joint blocks, width 128.

    The context is the two CLIP sequences side by side (64 + 64 = ``joint_attention_dim`` 128, so the
    pipeline pads nothing) followed by the zero T5 tokens; the pooled vector is both projections (32 + 32).
    """
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=2 * TEXT_WIDTH,
        caption_projection_dim=128, pooled_projection_dim=2 * TEXT_PROJECTION, pos_embed_max_size=4,
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def embedded_vae():
    """The embedded model's trained ``AutoencoderKL`` (its architecture, weights and ``scaling_factor``), with
    the ``shift_factor`` 0.0 that SD3 decoding reads. Built, not ``from_pretrained``, so that the saved config
    holds no local path."""
    from safetensors.torch import load_file

    vae = build_vae()
    vae.load_state_dict(load_file(EMBEDDED_MODEL_PATH / "vae" / "diffusion_pytorch_model.safetensors"))
    scaling_factor = json.loads((EMBEDDED_MODEL_PATH / "vae" / "config.json").read_text())["scaling_factor"]
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=0.0)
    return vae.eval().requires_grad_(False)


class RepeatedLastContextToken(JointAttnProcessor2_0):
    """diffusers' SD3 joint attention in which the last context token counts as ``copies`` identical tokens.

    The pipeline without a T5 encoder appends 256 all-zero T5 tokens. SD3 gives the context no positional
    embedding and treats its tokens independently outside attention, so identical tokens stay identical
    through every block, and in a softmax ``m`` identical keys (with identical values) weigh exactly as one
    key with ``log m`` added to its logit. Training on one zero token with that bias is therefore the same
    function as the pipeline's 256, at 33 instead of 288 tokens a sample.
    """

    def __init__(self, copies: int):
        super().__init__()
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image_tokens, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, H·D) -> (B, H, N, D)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        context_query = heads(attn.add_q_proj(encoder_hidden_states))
        context_key = heads(attn.add_k_proj(encoder_hidden_states))
        context_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.norm_added_q is not None:
            context_query, context_key = attn.norm_added_q(context_query), attn.norm_added_k(context_key)
        query = torch.cat([query, context_query], dim=2)
        key = torch.cat([key, context_key], dim=2)
        value = torch.cat([value, context_value], dim=2)
        bias = torch.zeros(key.shape[2], dtype=query.dtype, device=query.device)
        bias[-1] = self.log_copies
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.view(1, -1))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def padded_token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """``(B, 16)`` token ids padded as the SD3 pipeline pads them for its CLIP encoders."""
    return tokenizer(prompts, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def compact_prompt_embeddings(text_encoders, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt(..., max_sequence_length=1)`` returns, from token ids.

    ``token_ids (B, 16)`` → ``prompt_embeds (B, 17, 128)`` (both CLIPs' penultimate hidden states side by
    side, then one zero T5 token) and ``pooled (B, 64)`` (both projections). With
    ``RepeatedLastContextToken(256)`` the transformer sees what the pipeline's default 256 zero tokens give.
    """
    sequences, pooled = [], []
    for encoder in text_encoders:
        out = encoder(token_ids, output_hidden_states=True)
        sequences.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    sequence = torch.cat(sequences, dim=-1)
    zero_t5 = sequence.new_zeros(sequence.shape[0], 1, sequence.shape[-1])
    return torch.cat([sequence, zero_t5], dim=1), torch.cat(pooled, dim=-1)


def use_compact_context(transformer, compact: bool) -> None:
    """Attention for ``compact_prompt_embeddings`` (True) or diffusers' own for the pipeline's full context."""
    transformer.set_attn_processor(RepeatedLastContextToken(T5_TOKENS) if compact else JointAttnProcessor2_0())


def check_compact_context(pipeline, log) -> None:
    """The compact context reproduces the pipeline's full 256-token one (a guard on the training shortcut)."""
    transformer = pipeline.transformer
    prompts = [digit_prompt(7, "thick"), ""]
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timestep = torch.tensor([900.0, 120.0])
    with torch.no_grad():
        full, _, full_pooled, _ = pipeline.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        ids = padded_token_ids(pipeline.tokenizer, prompts)
        compact, pooled = compact_prompt_embeddings((pipeline.text_encoder, pipeline.text_encoder_2), ids)
        use_compact_context(transformer, False)
        reference = transformer(latents, full, full_pooled, timestep).sample
        use_compact_context(transformer, True)
        shortcut = transformer(latents, compact, pooled, timestep).sample
    assert full.shape[1] == MAX_PROMPT_TOKENS + T5_TOKENS and torch.equal(pooled, full_pooled)
    error = (shortcut - reference).abs().max().item()
    assert error < 1e-4 * max(1.0, reference.abs().max().item()), f"compact context differs by {error}"
    log(f"compact context check: max |difference| {error:.2e} against the pipeline's 272-token context")


# ---------------------------------------------------------------------------------------------- training


def shifted_sigmas(count: int, generator: torch.Generator) -> torch.Tensor:
    """σ = 3u / (1 + 2u), u ~ U(0, 1): ``(count,)`` noise levels with the shift-3 scheduler's density."""
    u = torch.rand(count, generator=generator)
    return SHIFT * u / (1.0 + (SHIFT - 1.0) * u)


def flow_loss(transformer, text_encoders, token_ids, clean, noise, sigma) -> torch.Tensor:
    """Mean squared error of the predicted velocity against ``noise − clean`` at ``x_σ``; shapes ``(B, 4, 8, 8)``."""
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * clean + s * noise
    context, pooled = compact_prompt_embeddings(text_encoders, token_ids)
    velocity = transformer(noisy, context, pooled, sigma * 1000.0).sample
    return F.mse_loss(velocity, noise - clean)


def validation_set(latents, token_ids, config: FlowTrainingConfig, generator: torch.Generator):
    """Fixed held-out batches: ``(ids, clean, noise, σ)`` each, prompts drawn as in training."""
    mean, std, labels, strokes = latents
    batches = []
    for _ in range(config.validation_batches):
        index = torch.randint(len(mean), (config.batch,), generator=generator)
        clean = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        ids = token_ids[sample_prompt_index(labels[index], strokes[index], config.data, generator)]
        noise = torch.randn(clean.shape, generator=generator)
        batches.append((ids, clean, noise, shifted_sigmas(config.batch, generator)))
    return batches


@torch.no_grad()
def validation_loss(transformer, text_encoders, batches) -> float:
    return sum(flow_loss(transformer, text_encoders, *batch).item() for batch in batches) / len(batches)


def train_flow(transformer, text_encoders, tokenizer, latents, validation, config, generator, log) -> dict:
    """Train ``transformer`` and both text encoders together; leave the EMA weights in them.

    ``latents``: ``(mean, std, labels, strokes)`` from ``encode_training_set``, already scaled.
    Returns the last-100-step mean training loss and the validation loss of the raw and EMA weights.
    """
    mean, std, labels, strokes = latents
    _, token_ids = prompt_table(tokenizer)
    modules = (transformer, *text_encoders)
    parameters = [p for module in modules for p in module.parameters()]
    ema = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=1e-2)
    recent = []
    for module in modules:
        module.train()
    for step in range(config.steps):
        index = torch.randint(len(mean), (config.batch,), generator=generator)
        clean = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        sigma = shifted_sigmas(config.batch, generator)
        ids = token_ids[sample_prompt_index(labels[index], strokes[index], config.data, generator)]
        loss = flow_loss(transformer, text_encoders, ids, clean, noise, sigma)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * cosine_lr(step, config.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in parameters], 1.0 - decay)
        recent = (recent + [loss.item()])[-100:]
        if step % 100 == 0 or step == config.steps - 1:
            log(f"flow step {step:5d}  loss {loss.item():.4f}  (last 100: {sum(recent) / len(recent):.4f})")
    for module in modules:
        module.eval()
    figures = {"train_loss_last_100": sum(recent) / len(recent)}
    figures["validation_loss_raw"] = validation_loss(transformer, text_encoders, validation)
    with torch.no_grad():
        for p, averaged in zip(parameters, ema):
            p.copy_(averaged)
    figures["validation_loss_ema"] = validation_loss(transformer, text_encoders, validation)
    return figures


# ---------------------------------------------------------------------------------------------- evaluation


def to_digit_features(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 32, 32)`` black-on-white pixels in [0, 1] → ``(B, 64)`` ink on sklearn's 8×8 0–16 scale."""
    ink = (1.0 - pixels.mean(dim=1, keepdim=True)).clamp(0.0, 1.0)
    return (16.0 * F.avg_pool2d(ink, 4)).flatten(1)


def digit_classifier(ink, labels, held_out, generator: torch.Generator, log):
    """An RBF SVM on 8×8 down-sampled training digits in every stroke style (jittered, 3 copies each).

    Returns the classifier; logs its accuracy on the held-out digits drawn the same way.
    """
    from sklearn.svm import SVC

    def features(mask: torch.Tensor, copies: int):
        chosen_ink, chosen_labels = ink[mask].repeat(copies, 1, 1, 1), labels[mask].repeat(copies)
        strokes = torch.randint(len(STROKE_STYLES), (len(chosen_ink),), generator=generator)
        pixels = (augmented_images(chosen_ink, strokes, generator) + 1.0) / 2.0
        return to_digit_features(pixels).numpy(), chosen_labels.numpy()

    classifier = SVC(gamma="scale", C=10.0).fit(*features(~held_out, 3))
    test_x, test_y = features(held_out, 3)
    log(f"digit classifier: {100 * (classifier.predict(test_x) == test_y).mean():.1f} % on held-out real digits")
    return classifier


def eval_prompts(samples_per_digit: int) -> tuple[list[str], list[int]]:
    """Prompts digit-major, the stroke cycling thick, thin, regular, none; and each prompt's digit."""
    styles = (*STROKE_STYLES, None)
    prompts = [digit_prompt(d, styles[i % len(styles)]) for d in range(10) for i in range(samples_per_digit)]
    return prompts, [d for d in range(10) for _ in range(samples_per_digit)]


@torch.no_grad()
def sample_compact(pipeline, prompts: list[str], guidance: float, seed: int, steps: int = 28) -> torch.Tensor:
    """The pipeline's own sampling loop and decoding, with the compact (exactly equivalent) context.

    Returns ``(B, 3, 32, 32)`` pixels in [0, 1].
    """
    encoders = (pipeline.text_encoder, pipeline.text_encoder_2)
    context, pooled = compact_prompt_embeddings(encoders, padded_token_ids(pipeline.tokenizer, prompts))
    empty = padded_token_ids(pipeline.tokenizer, [""] * len(prompts))
    negative, negative_pooled = compact_prompt_embeddings(encoders, empty)
    use_compact_context(pipeline.transformer, True)
    try:
        return pipeline(
            prompt_embeds=context, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=steps, guidance_scale=guidance,
            height=32, width=32, generator=torch.Generator().manual_seed(seed), output_type="pt",
        ).images
    finally:
        use_compact_context(pipeline.transformer, False)


def guidance_sweep(pipeline, classifier, config: FlowTrainingConfig, log) -> tuple[dict, dict]:
    """Classifier accuracy (%) of 28-step samples per guidance scale, and the samples ``(B, 3, 32, 32)``."""
    prompts, digits = eval_prompts(config.eval_samples_per_digit)
    accuracy, samples = {}, {}
    for guidance in EVAL_GUIDANCE:
        images = sample_compact(pipeline, prompts, guidance, seed=config.seed + 1)
        predicted = classifier.predict(to_digit_features(images).numpy())
        accuracy[guidance] = 100.0 * float((predicted == torch.tensor(digits).numpy()).mean())
        samples[guidance] = images
        log(f"guidance {guidance:.1f}: the classifier reads the prompted digit in {accuracy[guidance]:.0f} % "
            f"of {len(prompts)} samples")
    return accuracy, samples


def save_grid(rows: list[torch.Tensor], path: Path, zoom: int = 2) -> None:
    """Write rows of ``(N, 3, 32, 32)`` [0, 1] images as one PNG, each tile ``zoom``× nearest-upscaled."""
    from PIL import Image

    tiles = torch.stack([torch.cat(list(row), dim=2) for row in rows])  # (R, 3, 32, N·32)
    grid = torch.cat(list(tiles), dim=1)
    grid = F.interpolate(grid[None], scale_factor=zoom, mode="nearest")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(path)


@torch.no_grad()
def sample_grid_from_folder(folder: Path, guidance: float, path: Path, classifier, seed: int, log) -> None:
    """``StableDiffusion3Pipeline.from_pretrained(folder)`` as a user calls it: one row per digit,
    columns thick, thin, regular, no stroke words (two seeds each), 28 steps at ``guidance``."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, use_safetensors=True, **LOAD_KWARGS)
    pipe.set_progress_bar_config(disable=True)
    styles = [s for s in (*STROKE_STYLES, None) for _ in range(2)]
    prompts = [digit_prompt(d, s) for d in range(10) for s in styles]
    images = pipe(prompts, num_inference_steps=28, guidance_scale=guidance, height=32, width=32,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    assert torch.isfinite(images).all() and images.shape == (len(prompts), 3, 32, 32)
    predicted = classifier.predict(to_digit_features(images).numpy())
    correct = (predicted == torch.arange(10).repeat_interleave(len(styles)).numpy()).mean()
    log(f"from_pretrained grid at guidance {guidance}: classifier reads {100 * correct:.0f} % of {len(prompts)}")
    save_grid(list(images.split(len(styles))), path)
    log(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- main


def train_embedded_flow_model(config: FlowTrainingConfig, output: Path, log=print) -> dict:
    """Train, save the SD3 pipeline to ``output`` and return the quality figures."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    ink, labels = digit_ink()
    held_out = torch.arange(len(ink)) % HELD_OUT_EVERY == 0
    vae = embedded_vae()
    scaling = vae.config.scaling_factor
    encoded = encode_training_set(vae, ink[~held_out], labels[~held_out], config.data, generator)
    validation_data = dataclasses.replace(config.data, augmentations_per_image=1)
    held_encoded = encode_training_set(vae, ink[held_out], labels[held_out], validation_data, generator)
    latents = (encoded[0] * scaling, encoded[1] * scaling, encoded[2], encoded[3])
    held_latents = (held_encoded[0] * scaling, held_encoded[1] * scaling, held_encoded[2], held_encoded[3])
    log(f"encoded {len(latents[0])} training and {len(held_latents[0])} held-out latents (scaling_factor {scaling})")

    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL_PATH, subfolder="tokenizer")
    text_encoders = (build_text_encoder(tokenizer, config.seed), build_text_encoder(tokenizer, config.seed + 1))
    torch.manual_seed(config.seed + 2)
    transformer = build_transformer()
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=build_scheduler(), vae=vae, text_encoder=text_encoders[0],
        tokenizer=tokenizer, text_encoder_2=text_encoders[1], tokenizer_2=tokenizer, text_encoder_3=None,
        tokenizer_3=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    check_compact_context(pipeline, log)
    use_compact_context(transformer, True)

    _, token_ids = prompt_table(tokenizer)
    validation = validation_set(held_latents, token_ids, config, generator)
    figures = {"validation_loss_init": validation_loss(transformer, text_encoders, validation)}
    figures |= train_flow(transformer, text_encoders, tokenizer, latents, validation, config, generator, log)
    use_compact_context(transformer, False)
    log("flow losses: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))

    pipeline.save_pretrained(output, safe_serialization=True)
    # The embedded model's files, byte for byte: same autoencoder weights, same tokenizer in both slots.
    shutil.copyfile(EMBEDDED_MODEL_PATH / "vae" / "diffusion_pytorch_model.safetensors",
                    output / "vae" / "diffusion_pytorch_model.safetensors")
    for slot in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(output / slot)
        shutil.copytree(EMBEDDED_MODEL_PATH / "tokenizer", output / slot)
    log(f"saved to {output}")

    classifier = digit_classifier(ink, labels, held_out, torch.Generator().manual_seed(config.seed + 3), log)
    figures["sample_accuracy_percent"], samples = guidance_sweep(pipeline, classifier, config, log)
    return figures | {"classifier": classifier, "sweep_samples": samples}


def main(
    seed: int = typer.Option(0, help="Seed of every random draw (weights, data order, augmentation, noise)."),
    output: Path = typer.Option(EMBEDDED_FLOW_MODEL_PATH, help="Folder to write the diffusers SD3 pipeline to."),
    steps: int = typer.Option(FlowTrainingConfig.steps, min=1, help="Transformer + text encoder steps."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads (the result depends on it)."),
    samples_image: Path = typer.Option(
        REPO / "docs" / "images" / "embedded_flow_samples.png", help="Sample grid drawn from the saved folder."
    ),
    guidance: float = typer.Option(GUIDANCE_SCALE, help="Guidance scale of the sample grid."),
    guidance_image: Path = typer.Option(
        REPO / "docs" / "images" / "embedded_flow_guidance.png",
        help="One row per swept guidance scale (1, 2, 3, 4, 5, 7): two samples per digit.",
    ),
) -> None:
    """Train the embedded flow-matching digits model reproducibly on CPU and save it in the diffusers SD3 layout."""
    torch.set_num_threads(threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    figures = train_embedded_flow_model(FlowTrainingConfig(seed=seed, steps=steps), output, log)
    sweep = figures.pop("sweep_samples")
    per_digit = FlowTrainingConfig.eval_samples_per_digit
    save_grid([images.view(10, per_digit, 3, 32, 32)[:, :2].flatten(0, 1) for images in sweep.values()], guidance_image)
    log(f"wrote {guidance_image}")
    sample_grid_from_folder(output, guidance, samples_image, figures.pop("classifier"), seed, log)
    log(f"done: {figures}")


if __name__ == "__main__":
    typer.run(main)
