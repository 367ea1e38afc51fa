"""img2img and inpainting with OLSSScheduler on the embedded digits model, beside DPM-Solver++ (README picture).

    python benchmarks/quality_img2img.py --plans /tmp/olss_img2img_plans.json    # calibrates, writes the plans
    python jobs/make_img2img_grid.py --plans /tmp/olss_img2img_plans.json
    python jobs/make_img2img_grid.py --artifact ./olss-registry/embedded/latest.json   # or a published run

Rows: source digits (100-step DDIM samples from held-out seeds), img2img at strength 0.5
and 10 steps (``StableDiffusionImg2ImgPipeline``, the prompt of the next digit) with OLSSScheduler and with
DPM-Solver++ 2M (trailing), the inpainting mask (white: repainted, the right half), and inpainting at
10 steps (``StableDiffusionInpaintPipeline``, strength 1, the next digit's prompt) with both schedulers.
Same images, prompts and generator seed in every column. Writes docs/images/img2img_inpaint.png.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from olss_dist import OLSSScheduler  # noqa: E402
from olss_dist.apps.evaluate.plots import plot_grid  # noqa: E402
from olss_dist.core.builtin import builtin_scheduler  # noqa: E402
from olss_dist.core.plan import Plan  # noqa: E402
from olss_dist.core.teacher import schedule_states  # noqa: E402
from olss_dist.method.run import builtin_config  # noqa: E402
from olss_dist.models import load_model  # noqa: E402
from olss_dist.models.embedded import EMBEDDED_MODEL_PATH, digit_prompt  # noqa: E402

DIGITS = list(range(8))


def olss_scheduler(plans: Path | None, artifact: str | None, model) -> OLSSScheduler:
    """The published run's scheduler, or one serving the plans file of ``benchmarks/quality_img2img.py``."""
    if artifact:
        return OLSSScheduler.from_pretrained(artifact)
    if plans is None:
        raise typer.BadParameter("give --plans or --artifact")
    entries = [Plan.from_dict(entry) for entry in json.loads(plans.read_text())["plans"]]
    settings = {**builtin_config(model.alphas_cumprod), "prediction_type": model.prediction_type}
    return OLSSScheduler.from_plans(entries, **settings)


def sources(model, seed: int) -> list[Image.Image]:
    """Held-out digits: 100-step DDIM samples from seeds ``seed + d`` (held out of every calibration), as PIL images."""
    cond = model.encode_prompts([digit_prompt(d) for d in DIGITS])
    noise = model.initial_noise([seed + d for d in DIGITS])
    final = schedule_states(model, noise, cond, model.noise_process.teacher_schedule(100), [100])[:, 0]
    return [Image.fromarray(image) for image in model.decode(final)]


def as_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def main(
    plans: Path = typer.Option(None, help="plans file of benchmarks/quality_img2img.py"),
    artifact: str = typer.Option(None, help="a published run of the embedded model (URI, latest.json or run folder)"),
    output: str = typer.Option("docs/images/img2img_inpaint.png", help="PNG to write"),
    seed: int = typer.Option(10_000, help="seed of the source digits (held out of every calibration)"),
    steps: int = typer.Option(10, help="K"),
) -> None:
    model = load_model("embedded", device="cpu")
    olss = olss_scheduler(plans, artifact, model)
    dpm = builtin_scheduler("dpmsolver++", model.scheduler_config, "trailing")
    images = sources(model, seed)
    mask = Image.fromarray(np.tile((np.arange(32) >= 16).astype(np.uint8) * 255, (32, 1)))
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(EMBEDDED_MODEL_PATH, safety_checker=None,
                                                              requires_safety_checker=False)
    inpaint = StableDiffusionInpaintPipeline(**img2img.components)
    for pipe in (img2img, inpaint):
        pipe.set_progress_bar_config(disable=True)
    rows: dict[str, np.ndarray] = {"source": np.stack([np.asarray(image) for image in images])}
    for name, scheduler in (("OLSS", olss), ("DPM-Solver++", dpm)):
        img2img.scheduler = scheduler
        result = img2img([digit_prompt((d + 1) % 10) for d in DIGITS], image=images, strength=0.5,
                         num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
        rows[f"img2img 0.5, {name}"] = as_uint8(result.images)
    rows["inpaint mask"] = np.stack([np.repeat(np.asarray(mask)[:, :, None], 3, axis=2)] * len(DIGITS))
    for name, scheduler in (("OLSS", olss), ("DPM-Solver++", dpm)):
        inpaint.scheduler = scheduler
        result = inpaint([digit_prompt((d + 1) % 10) for d in DIGITS], image=images, mask_image=[mask] * len(DIGITS),
                         height=32, width=32, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                         output_type="np")
        rows[f"inpaint, {name}"] = as_uint8(result.images)
    title = f"embedded digits, {steps} steps, the next digit's prompt: img2img (strength 0.5), inpainting (right half)"
    print(plot_grid(rows, title, output))


if __name__ == "__main__":
    typer.run(main)
