"""Sample grid of the embedded flow model with a published OLSS artifact, in StableDiffusion3Pipeline.

    python jobs/calibrate.py --model embedded-flow --guidance-scale 4 --output ./olss-registry
    python jobs/make_flow_grid.py --artifact ./olss-registry/embedded-flow/latest.json

Rows: FlowMatch Euler at 100 steps (close to the 1000-step teacher), then OLSS and FlowMatch Euler at 5 and
10 steps; same prompts and initial noise in every row. Writes docs/images/embedded_flow_grid.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline  # noqa: E402

from olss_dist import OLSSScheduler  # noqa: E402
from olss_dist.apps.evaluate.plots import plot_grid  # noqa: E402
from olss_dist.models.embedded_flow import EMBEDDED_FLOW_MODEL_PATH, GUIDANCE_SCALE, LOAD_KWARGS, digit_prompt  # noqa: E402


def main(
    artifact: str = typer.Option(..., help="the embedded-flow run (URI, latest.json or run folder)"),
    output: str = typer.Option("docs/images/embedded_flow_grid.png", help="PNG to write"),
    seed: int = typer.Option(0, help="seed of the initial noise"),
) -> None:
    pipe = StableDiffusion3Pipeline.from_pretrained(EMBEDDED_FLOW_MODEL_PATH, **LOAD_KWARGS)
    pipe.set_progress_bar_config(disable=True)
    euler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    olss = OLSSScheduler.from_pretrained(artifact)
    prompts = [digit_prompt(d) for d in range(8)]
    latents = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    rows: dict[str, np.ndarray] = {}
    for label, scheduler, steps in (("Euler, 100 steps", euler, 100), ("OLSS, 5 steps", olss, 5),
                                    ("Euler, 5 steps", euler, 5), ("OLSS, 10 steps", olss, 10),
                                    ("Euler, 10 steps", euler, 10)):
        pipe.scheduler = scheduler
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, height=32, width=32,
                      latents=latents.clone(), output_type="np").images
        rows[label] = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    print(plot_grid(rows, f"embedded flow model, guidance {GUIDANCE_SCALE:g}: same noise and prompts per column", output))


if __name__ == "__main__":
    typer.run(main)
