"""Sampling overhead: wall time per image of a Stable Diffusion pipeline with OLSSScheduler vs DDIMScheduler.

Both schedulers run the same model at the same step count and timesteps: the OLSS plan is DDIM's own
"trailing" update written in OLSS form (``olss_dist.core.builtin.builtin_plan``), so the outputs agree and
only the scheduler's own work differs. Runs alternate (DDIM, OLSS, DDIM, ...) after a warm-up, and the
median per-image time of each is compared; the target ratio is at most 1.05. Because whole-pipeline
times on a shared machine swing by several percent, the script also times each scheduler's own work
alone (``set_timesteps`` and every ``step`` on stored model outputs, many repetitions): that difference
divided by the pipeline time is the overhead without the noise.

    python benchmarks/bench_sampling.py                       # the embedded digits model
    python benchmarks/bench_sampling.py --model path/to/sd    # any diffusers SD folder
"""

from __future__ import annotations

from common import describe_machine, pin_threads

pin_threads()  # before numpy and torch load their thread pools

import argparse
import statistics
import time

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from olss_dist.core.builtin import builtin_plan
from olss_dist.models.embedded import EMBEDDED_MODEL_PATH, digit_prompt
from olss_dist.scheduler import OLSSScheduler
from olss_dist.core.teacher import trailing_timesteps

NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def schedulers(config: dict, num_steps: int) -> dict[str, object]:
    """DDIM with trailing spacing from the model's scheduler ``config``, and an OLSSScheduler replaying
    exactly that DDIM run."""
    ddim = DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    plan = builtin_plan("ddim", num_steps, config, trailing_timesteps(1000, config["num_train_timesteps"]))
    olss = OLSSScheduler.from_plans(
        [plan], prediction_type=config.get("prediction_type", "epsilon"),
        **{k: config[k] for k in NOISE_KEYS if config.get(k) is not None},
    )
    return {"ddim": ddim, "olss": olss}


def sample(pipe: StableDiffusionPipeline, scheduler, prompts: list[str], num_steps: int) -> tuple[np.ndarray, float]:
    """Images ``(B, H, W, 3)`` float and the wall seconds of one pipeline call."""
    pipe.scheduler = scheduler
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    images = pipe(prompts, num_inference_steps=num_steps, generator=generator, output_type="np").images
    return images, time.perf_counter() - start


def scheduler_seconds(scheduler, latents: torch.Tensor, num_steps: int, repeats: int = 50) -> float:
    """Median seconds of one run of the scheduler alone: ``set_timesteps`` and ``num_steps`` steps on fixed outputs."""
    outputs = torch.randn(num_steps, *latents.shape, generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scheduler.set_timesteps(num_steps)
        x = latents
        for t, output in zip(scheduler.timesteps, outputs):
            x = scheduler.step(output, t, x).prev_sample
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_PATH), help="diffusers Stable Diffusion folder")
    parser.add_argument("--steps", default="10,20", help="comma-separated step counts")
    parser.add_argument("--batch", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per scheduler and step count")
    args = parser.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    model_scheduler_config = dict(pipe.scheduler.config)  # before sample() swaps the pipeline's scheduler
    prompts = [digit_prompt(d % 10) for d in range(args.batch)]
    unet_parameters = sum(p.numel() for p in pipe.unet.parameters())
    print(describe_machine())
    print(f"model {args.model}: UNet {unet_parameters / 1e6:.2f} M parameters, sample size {pipe.unet.config.sample_size}, "
          f"{args.batch} images per call, CPU")
    for num_steps in (int(k) for k in args.steps.split(",")):
        chosen = schedulers(model_scheduler_config, num_steps)
        outputs = {name: sample(pipe, scheduler, prompts, num_steps)[0] for name, scheduler in chosen.items()}  # warm-up
        times = {name: [] for name in chosen}
        for _ in range(args.repeats):
            for name, scheduler in chosen.items():
                times[name].append(sample(pipe, scheduler, prompts, num_steps)[1] / args.batch)
        ddim, olss = (statistics.median(times[name]) for name in ("ddim", "olss"))
        difference = float(np.abs(outputs["olss"] - outputs["ddim"]).max())
        latents = torch.randn(args.batch, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        own = {name: scheduler_seconds(scheduler, latents, num_steps) / args.batch for name, scheduler in chosen.items()}
        print(f"{num_steps:>3} steps: DDIM {ddim * 1e3:8.2f} ms/image   OLSS {olss * 1e3:8.2f} ms/image   "
              f"ratio {olss / ddim:.3f} (target <= 1.05)   max |image difference| {difference:.1e}")
        print(f"           schedulers alone: DDIM {own['ddim'] * 1e3:.3f} ms/image, OLSS {own['olss'] * 1e3:.3f} ms/image; "
              f"OLSS's extra work is {(own['olss'] - own['ddim']) / ddim * 100:+.2f}% of the DDIM pipeline time")


if __name__ == "__main__":
    main()
