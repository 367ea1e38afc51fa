"""The embedded default model: a small text-conditioned latent diffusion model of handwritten digits.

The folder holds a diffusers Stable Diffusion pipeline (``model_index.json``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``vae/``, ``scheduler/``) trained by ``jobs/train_embedded_model.py`` on scikit-learn's
bundled 8×8 digits upscaled to 32×32. Its prompt grammar lives here because both the trainer and the
adapter (default prompts) need it.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_MODEL_PATH = Path(__file__).resolve().parent

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STROKE_STYLES = ("thick", "thin", "regular")


def digit_prompt(digit: int, stroke: str | None = None) -> str:
    """The prompt for ``digit`` (0-9), e.g. ``"a handwritten digit seven, thick strokes"``.

    ``stroke`` is one of ``STROKE_STYLES``, or ``None`` for a prompt that leaves the stroke open.
    """
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    base = f"a handwritten digit {DIGIT_NAMES[digit]}"
    if stroke is None:
        return base
    if stroke not in STROKE_STYLES:
        raise ValueError(f"stroke must be one of {STROKE_STYLES} or None, got {stroke!r}")
    return f"{base}, {stroke} strokes"


SAMPLES_PER_PROMPT = 2
"""Default prompts repeat: the calibration derives a distinct seed per position, so 80 samples."""


def default_prompts() -> list[str]:
    """80 prompts: every digit with each stroke style and without one (digit-major order), twice."""
    return [digit_prompt(d, s) for _ in range(SAMPLES_PER_PROMPT) for d in range(10) for s in (*STROKE_STYLES, None)]
