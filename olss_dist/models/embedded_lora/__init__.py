"""The embedded LoRA: a "heavy strokes" fine-tune of the embedded digits model, as diffusers LoRA weights.

The folder holds ``pytorch_lora_weights.safetensors`` (diffusers' key layout, UNet attention only) trained by
``jobs/train_embedded_lora.py`` over ``olss_dist/models/embedded``: digits drawn with strokes dilated twice,
heavier than the base model's "thick" style. Calibrate the fused model with
``olss-dist calibrate --model embedded --lora olss_dist/models/embedded_lora``; sample it with
``StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_PATH)`` then ``pipe.load_lora_weights(EMBEDDED_LORA_PATH)``.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_LORA_PATH = Path(__file__).resolve().parent

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
"""The UNet modules the LoRA adapts: every attention layer's query, key, value and output projections."""
