"""Held-out quality of OLSS on the analytic flow-matching mixture against every flow built-in.

    python benchmarks/quality_analytic_flow.py --guidance-scale 4 --model-seed 0 --held-out 512

Calibrates with the public API (``calibrate(..., scheduler_config=FlowMatchEulerDiscreteScheduler(shift=3).config)``,
N = 1000, ``--train`` / ``--validation`` samples), then runs the shipped plan and each flow built-in (FlowMatch
Euler, DPM-Solver++ 2M and UniPC with flow sigmas, in OLSS form) on ``--held-out`` fresh samples that no
calibration saw, and prints pooled RMSE and median per-sample RMSE of the final state against the 1000-step
teacher, with the ratio of the shipped plan to the best built-in. docs/evaluation.md records its output.
A quality measurement, not a timing: a few minutes on 2 cores.
"""

from __future__ import annotations

import time

from common import pin_threads

pin_threads()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from olss_dist import calibrate  # noqa: E402
from olss_dist.core.builtin import process_builtins  # noqa: E402
from olss_dist.core.onpolicy import rollout  # noqa: E402
from olss_dist.core.teacher import schedule_states  # noqa: E402
from olss_dist.models.analytic import GaussianMixtureFlowModel  # noqa: E402


def draw(model: GaussianMixtureFlowModel, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` float64 initial noises and class ids from one generator."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, *model.latent_shape, generator=generator, dtype=torch.float64)
    return noise, torch.randint(0, model.num_classes, (count,), generator=generator)


def scores(final: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Pooled RMSE and median per-sample RMSE of ``final`` against ``reference`` (both ``(B, *shape)``)."""
    mse = ((final - reference) ** 2).reshape(len(final), -1).mean(1).numpy()
    return float(np.sqrt(mse.mean())), float(np.median(np.sqrt(mse)))


def main(
    guidance_scale: float = typer.Option(4.0, help="classifier-free guidance of the mixture"),
    model_seed: int = typer.Option(0, help="seed of the mixture's means and scales"),
    train: int = typer.Option(160, help="calibration samples"),
    validation: int = typer.Option(64, help="validation samples that choose each plan"),
    held_out: int = typer.Option(512, help="fresh samples that score the samplers"),
    steps: str = typer.Option("5,10,20", help="step counts"),
) -> None:
    model = GaussianMixtureFlowModel(guidance_scale=guidance_scale, seed=model_seed)
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    step_counts = tuple(int(k) for k in steps.split(","))
    (noise, cond), (v_noise, v_cond), (h_noise, h_cond) = (draw(model, n, s) for n, s in ((train, 1), (validation, 2), (held_out, 3)))
    started = time.monotonic()
    plans = calibrate(model, noise, cond, scheduler_config=config, steps=step_counts, validation_noise=v_noise, validation_cond=v_cond)
    print(f"calibrated in {time.monotonic() - started:.0f} s ({train} train / {validation} validation samples, N=1000)")
    teacher = model.noise_process.teacher_schedule(1000)
    reference = schedule_states(model, h_noise, h_cond, teacher, [1000])[:, 0]
    builtins = process_builtins(model.noise_process)
    print(f"{held_out} held-out samples, guidance {guidance_scale:g}, model seed {model_seed}")
    print("| K | sampler | pooled RMSE | median RMSE |\n|---|---|---|---|")
    for k, plan in plans.items():
        rows = {f"OLSS shipped ({plan.fit}/{plan.spacing})": scores(rollout(plan.coefficients, model, h_noise, h_cond, plan.timesteps), reference)}
        for name in builtins.names:
            builtin = builtins.plan(name, k, teacher.stored_timesteps())
            rows[name] = scores(rollout(builtin.coefficients, model, h_noise, h_cond, builtin.timesteps), reference)
        for name, (pooled, median) in rows.items():
            print(f"| {k} | {name} | {pooled:.3g} | {median:.3g} |")
        shipped = next(iter(rows.values()))
        best_pooled = min(v[0] for n, v in rows.items() if not n.startswith("OLSS"))
        best_median = min(v[1] for n, v in rows.items() if not n.startswith("OLSS"))
        print(f"| {k} | **shipped / best built-in** | **{shipped[0] / best_pooled:.3f}** | **{shipped[1] / best_median:.3f}** |")


if __name__ == "__main__":
    typer.run(main)
