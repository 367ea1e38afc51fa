"""The committed embedded flow-matching model: an SD3 diffusers folder that loads, samples and stays small."""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from olss_dist.models import embedded
from olss_dist.models.embedded import EMBEDDED_MODEL_PATH
from olss_dist.models.embedded_flow import (
    EMBEDDED_FLOW_MODEL_PATH,
    GUIDANCE_SCALE,
    LOAD_KWARGS,
    default_prompts,
    digit_prompt,
)

MAX_WEIGHT_BYTES = 15 * 10**6


def config(subfolder: str) -> dict:
    name = "scheduler_config.json" if subfolder == "scheduler" else "config.json"
    return json.loads((EMBEDDED_FLOW_MODEL_PATH / subfolder / name).read_text())


def test_folder_layout_and_size():
    index = json.loads((EMBEDDED_FLOW_MODEL_PATH / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    weights = sorted(EMBEDDED_FLOW_MODEL_PATH.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert not list(EMBEDDED_FLOW_MODEL_PATH.rglob("*.bin")), "weights are safetensors only"
    assert sum(w.stat().st_size for w in weights) <= MAX_WEIGHT_BYTES


def test_configs_are_the_documented_ones():
    scheduler = config("scheduler")
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (scheduler["num_train_timesteps"], scheduler["shift"]) == (1000, 3.0)
    assert not scheduler["use_dynamic_shifting"]
    transformer = config("transformer")
    expected = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
                    num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
                    pooled_projection_dim=64, pos_embed_max_size=4, qk_norm=None, dual_attention_layers=[])
    assert {k: transformer[k] for k in expected} == expected
    for slot in ("text_encoder", "text_encoder_2"):
        text = config(slot)
        assert (text["hidden_size"], text["projection_dim"], text["num_hidden_layers"]) == (64, 32, 3)
        assert text["max_position_embeddings"] == 16
    # The CLIP sequences side by side fill the joint width; the projections side by side the pooled width.
    assert 2 * config("text_encoder")["hidden_size"] == transformer["joint_attention_dim"]
    assert 2 * config("text_encoder")["projection_dim"] == transformer["pooled_projection_dim"]


def test_autoencoder_and_tokenizers_are_the_embedded_models():
    flow_vae, sd_vae = config("vae"), json.loads((EMBEDDED_MODEL_PATH / "vae" / "config.json").read_text())
    assert flow_vae["shift_factor"] == 0.0 and flow_vae["scaling_factor"] == sd_vae["scaling_factor"]
    assert flow_vae == {**sd_vae, "shift_factor": 0.0}
    name = "diffusion_pytorch_model.safetensors"
    assert (EMBEDDED_FLOW_MODEL_PATH / "vae" / name).read_bytes() == (EMBEDDED_MODEL_PATH / "vae" / name).read_bytes()
    for slot in ("tokenizer", "tokenizer_2"):
        files = sorted(p.name for p in (EMBEDDED_FLOW_MODEL_PATH / slot).iterdir())
        assert files == sorted(p.name for p in (EMBEDDED_MODEL_PATH / "tokenizer").iterdir())
        for file in files:
            copied, original = EMBEDDED_FLOW_MODEL_PATH / slot / file, EMBEDDED_MODEL_PATH / "tokenizer" / file
            assert copied.read_bytes() == original.read_bytes(), f"{slot}/{file}"


def test_prompts_are_the_embedded_models():
    assert default_prompts() == embedded.default_prompts()
    assert digit_prompt(7, "thick") == "a handwritten digit seven, thick strokes"
    assert 1.0 < GUIDANCE_SCALE <= 10.0


def test_stable_diffusion_3_pipeline_loads_and_samples_it():
    pipe = StableDiffusion3Pipeline.from_pretrained(EMBEDDED_FLOW_MODEL_PATH, use_safetensors=True, **LOAD_KWARGS)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.text_encoder_3 is None
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [digit_prompt(3), digit_prompt(8, "thin")], num_inference_steps=4, guidance_scale=GUIDANCE_SCALE,
        height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0
    # Black ink on white paper: a digit covers a minority of the pixels.
    assert 0.5 < images.mean() < 0.95
