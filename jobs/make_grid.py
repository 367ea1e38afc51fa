"""Draw the README grid of the embedded model: teacher, OLSS and DDIM samples from the same noise.

    python jobs/make_grid.py                        # writes docs/images/embedded_grid.png

Rows: the 1000-step DDIM teacher, OLSS at 5 and 10 steps, DDIM ("trailing" spacing, ending at the
clean sample) at 5 and 10 steps, each sampler's row followed by its per-pixel difference to the
teacher (amplified, dark = different). Columns: the digits 0-9, all from one initial noise per column.
The OLSS plans come from an in-process calibration of the embedded model on its default prompts
(``olss_dist.method.calibrate``) with seeds disjoint from the grid's. Each row's label gives its RMSE
against the teacher's final latents.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image, ImageDraw

from olss_dist.apps.evaluate import run_sampler
from olss_dist.core.builtin import builtin_scheduler
from olss_dist.method.run import calibrate
from olss_dist.models import load_model
from olss_dist.models.embedded import STROKE_STYLES, digit_prompt
from olss_dist.scheduler import OLSSScheduler
from olss_dist.core.teacher import record_states, trailing_timesteps

GRID_SEED_BASE = 10_000
CALIBRATION_SEED_BASE = 0
LABEL_WIDTH = 200
DIFFERENCE_GAIN = 4


def grid_prompts() -> list[str]:
    """One prompt per digit 0-9, cycling through the stroke styles."""
    return [digit_prompt(d, STROKE_STYLES[d % len(STROKE_STYLES)]) for d in range(10)]


def calibrated_olss(model, steps: tuple[int, ...], train_samples: int, validation_samples: int, log) -> OLSSScheduler:
    """OLSS plans for ``steps`` fitted on the model's default prompts (teacher: 1000 DDIM steps)."""
    prompts = model.default_prompts()
    count = train_samples + validation_samples
    chosen = [prompts[i % len(prompts)] for i in range(count)]
    noise = model.initial_noise(range(CALIBRATION_SEED_BASE, CALIBRATION_SEED_BASE + count))
    cond = model.encode_prompts(chosen)
    plans = calibrate(
        model, noise[:train_samples], cond[:train_samples], trailing_timesteps(1000, model.num_train_timesteps),
        model.alphas_cumprod, steps=steps, validation_noise=noise[train_samples:],
        validation_cond=cond[train_samples:], progress=log,
    )
    return OLSSScheduler.from_plans(list(plans.values()), num_train_timesteps=model.num_train_timesteps)


def labelled_row(images: np.ndarray, label: str, scale: int) -> Image.Image:
    """One grid row: ``label`` on the left, then ``images (B, H, W, 3)`` uint8 enlarged ``scale`` times."""
    height, width = images.shape[1] * scale, images.shape[2] * scale
    row = Image.new("RGB", (LABEL_WIDTH + width * len(images), height), "white")
    for column, image in enumerate(images):
        tile = Image.fromarray(image).resize((width, height), Image.NEAREST)
        row.paste(tile, (LABEL_WIDTH + column * width, 0))
    draw = ImageDraw.Draw(row)
    for line_number, line in enumerate(label.split("\n")):
        draw.text((6, height // 2 - 12 + 14 * line_number), line, fill="black")
    return row


def difference_images(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``|images − reference| · DIFFERENCE_GAIN`` per pixel, dark on white: ``(B, H, W, 3)`` uint8."""
    difference = np.abs(images.astype(np.int16) - reference.astype(np.int16)) * DIFFERENCE_GAIN
    return (255 - np.clip(difference, 0, 255)).astype(np.uint8)


def stacked(tiles: list[Image.Image]) -> Image.Image:
    """``tiles`` one below the other on white."""
    grid = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)), "white")
    top = 0
    for tile in tiles:
        grid.paste(tile, (0, top))
        top += tile.height
    return grid


def main(
    output: Path = typer.Option(Path("docs/images/embedded_grid.png"), help="PNG to write."),
    train_samples: int = typer.Option(40, min=8, help="Calibration samples (default prompts, cycled)."),
    validation_samples: int = typer.Option(10, min=1, help="Held-out samples that choose among candidate plans."),
    scale: int = typer.Option(3, min=1, help="Pixel enlargement of each 32×32 sample."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads."),
) -> None:
    """Calibrate the embedded model, sample the grid and write it."""
    torch.set_num_threads(threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    model = load_model("embedded", device="cpu")
    olss = calibrated_olss(model, (5, 10), train_samples, validation_samples, log)
    prompts = grid_prompts()
    x_T = model.initial_noise(range(GRID_SEED_BASE, GRID_SEED_BASE + len(prompts)))
    cond = model.encode_prompts(prompts)
    teacher = record_states(model, x_T, cond, trailing_timesteps(1000), model.alphas_cumprod, keep=[1000])[:, 0]
    teacher_images = model.decode(teacher)
    tiles = [labelled_row(teacher_images, "1000-step DDIM teacher", scale)]
    trailing_ddim = builtin_scheduler("ddim", model.scheduler_config, "trailing")  # last step to the clean sample
    for name, scheduler in (("OLSS", olss), ("DDIM (trailing)", trailing_ddim)):
        for steps in (5, 10):
            final = run_sampler(scheduler, model, x_T, cond, steps)[0]
            rmse = (final - teacher).pow(2).mean().sqrt().item()
            log(f"{name} {steps} steps: latent RMSE vs teacher {rmse:.4f}")
            images = model.decode(final)
            tiles.append(labelled_row(images, f"{name}, {steps} steps\nlatent RMSE vs teacher {rmse:.3f}", scale))
            difference = difference_images(images, teacher_images)
            tiles.append(labelled_row(difference, f"|difference to teacher| x{DIFFERENCE_GAIN}", scale))
    output.parent.mkdir(parents=True, exist_ok=True)
    stacked(tiles).save(output)
    log(f"wrote {output}")


if __name__ == "__main__":
    typer.run(main)
