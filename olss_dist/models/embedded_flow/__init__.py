"""The embedded flow-matching model: a small Stable Diffusion 3 (rectified flow) model of handwritten digits.

The folder holds a diffusers ``StableDiffusion3Pipeline`` (``model_index.json``, ``transformer/``,
``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``vae/``, ``scheduler/``; no
T5 encoder) trained by ``jobs/train_embedded_flow_model.py`` on the same digits, prompts, autoencoder and
tokenizer as the embedded SD model (``olss_dist.models.embedded``), whose prompt grammar it shares.
"""

from __future__ import annotations

from pathlib import Path

from olss_dist.models.embedded import DIGIT_NAMES, SAMPLES_PER_PROMPT, STROKE_STYLES, default_prompts, digit_prompt

__all__ = [
    "DIGIT_NAMES", "EMBEDDED_FLOW_MODEL_PATH", "GUIDANCE_SCALE", "LOAD_KWARGS", "SAMPLES_PER_PROMPT", "STROKE_STYLES",
    "default_prompts", "digit_prompt",
]

EMBEDDED_FLOW_MODEL_PATH = Path(__file__).resolve().parent

GUIDANCE_SCALE = 4.0
"""Classifier-free guidance scale the 28-step samples look best at. In the trainer's sweep (100 samples, 10 per
digit) an SVM on 8×8 digits reads the prompted digit in 89 / 99 / 100 / 100 / 100 / 100 % of them at guidance
1 / 2 / 3 / 4 / 5 / 7 (98 % on held-out real digits); from 5 on, strokes thicken and thin ones break up."""

LOAD_KWARGS = {"text_encoder_3": None, "tokenizer_3": None}
"""``StableDiffusion3Pipeline.from_pretrained(EMBEDDED_FLOW_MODEL_PATH, **LOAD_KWARGS)``: the folder has no T5
encoder (``model_index.json`` says ``null``), and diffusers 0.42 loads a null non-optional component only when
the caller passes it, as for the official SD3 checkpoints loaded without T5. The pipeline then appends
256 zero T5 tokens (its default ``max_sequence_length``), which is what the transformer was trained with."""
