"""What a dense default step set costs the calibration: model calls and wall time, side by side.

    python benchmarks/bench_default_steps.py --train 64 --validation 16

Calibrates the analytic mixture in one process (``calibrate``, N = 1000, the default job's split of the
embedded model's 80 prompts: 64 fit / 16 validation) with each step set, counting the samples passed to
the model per stage (teacher, candidates) and timing the whole call. The model call is the unit of
cost on image models (a UNet call is milliseconds to seconds); the analytic model's calls are cheap,
so its wall times over-weight the per-call Python and the planner: read the call counts for image
models and the wall-time ratio as this machine's.
"""

from __future__ import annotations

import time

from common import describe_machine, pin_threads

pin_threads()

import torch  # noqa: E402
import typer  # noqa: E402

from olss_dist import calibrate  # noqa: E402
from olss_dist.core.teacher import trailing_timesteps  # noqa: E402
from olss_dist.models.analytic import GaussianMixtureModel  # noqa: E402
from olss_dist.spec import CalibrationSpec, parse_steps  # noqa: E402


class CountingModel:
    """The analytic mixture, counting the samples of every call."""

    def __init__(self, model):
        self.model, self.samples = model, 0
        self.noise_process = model.noise_process

    def __call__(self, x, t, cond):
        self.samples += len(x)
        return self.model(x, t, cond)


def main(
    train: int = typer.Option(64, help="fit samples"),
    validation: int = typer.Option(16, help="validation samples"),
    sets: str = typer.Option("5,10,20;" + ",".join(map(str, CalibrationSpec.steps)), help="step sets, ';'-separated"),
) -> None:
    print(describe_machine())
    model = GaussianMixtureModel()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(train + validation, *model.latent_shape, generator=generator, dtype=torch.float64)
    cond = torch.randint(0, model.num_classes, (train + validation,), generator=generator)
    print("| steps | model calls per fit+validation sample | teacher share | wall s | × the first set |\n|---|---|---|---|---|")
    first = None
    for text in sets.split(";"):
        steps = parse_steps(text)
        counting = CountingModel(model)
        started = time.monotonic()
        calibrate(counting, noise[:train], cond[:train], trailing_timesteps(1000), model.alphas_cumprod, steps=steps,
                  validation_noise=noise[train:], validation_cond=cond[train:])
        wall = time.monotonic() - started
        first = first or wall
        calls = counting.samples / (train + validation)
        print(f"| {text} | {calls:.0f} | {1000 / calls:.0%} | {wall:.0f} | {wall / first:.2f} |")


if __name__ == "__main__":
    typer.run(main)
