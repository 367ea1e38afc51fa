"""Held-out quality of the robust choice (``olss_dist.method.choice``) on the analytic VP mixture.

    python benchmarks/quality_robust_choice.py --train 128 --validation 64 --held-out 256 --steps 5,10,20

Calibrates the analytic mixture (SD's scaled-linear schedule, N = 1000) in one process twice from the same
samples: with the plain choice (``ChoiceRules(criterion="rmse")``, no trust-region candidates: the method
before the robust choice) and with the robust one (the defaults). Then runs both shipped plans and every
built-in on ``--held-out`` fresh samples that neither calibration saw: the linear ones in OLSS form with
trailing spacing (the calibration's candidates) and every VP built-in as users configure it
(``from_config(model.scheduler_config)``, "leading" spacing), through the generic diffusers loop. Prints
pooled / median / worst per-sample RMSE of the final state against the 1000-step teacher, the number of
samples above 0.1 (mode switches), the ratio to the best built-in, and each choice's record.
A quality measurement, not a timing.

``--compare-orders 1,2`` compares instead the robust choice without the reduced-basis candidates
(``orders=()``, "fewer outputs per step") and with those orders, from the same samples in the same run, and
prints each shipped plan's largest |w| (docs/evaluation.md, "Fewer outputs per step").
"""

from __future__ import annotations

import json
import time

from common import pin_threads

pin_threads()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402

from olss_dist import calibrate  # noqa: E402
from olss_dist.apps.evaluate.run import run_sampler  # noqa: E402
from olss_dist.core.builtin import builtin_scheduler, family_builtins, process_builtins  # noqa: E402
from olss_dist.core.onpolicy import rollout  # noqa: E402
from olss_dist.core.teacher import schedule_states, trailing_timesteps  # noqa: E402
from olss_dist.method.choice import ChoiceRules, ratio_interval  # noqa: E402
from olss_dist.models.analytic import GaussianMixtureModel  # noqa: E402


def draw(model: GaussianMixtureModel, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` float64 initial noises and class ids from one generator."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, *model.latent_shape, generator=generator, dtype=torch.float64)
    return noise, torch.randint(0, model.num_classes, (count,), generator=generator)


def job_samples(model: GaussianMixtureModel, num_prompts: int, validation_fraction: float, held_out: int, seed_offset: int):
    """Train, validation and held-out ``(noise, cond)`` as ``jobs/calibrate.py`` (prompt seeds, ``split_validation``)
    and ``olss-dist evaluate`` (its own seed domain, calibration seeds excluded) draw them (docs/evaluation.md)."""
    import tempfile

    from olss_dist.apps.evaluate.samples import evaluation_set
    from olss_dist.prompts import read_prompts, split_validation

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as handle:
        handle.write("\n".join(f"a sample of class {words[i % 10]}" for i in range(num_prompts)))
        handle.flush()
        records = read_prompts(handle.name)
    fit, validation = split_validation(records, validation_fraction, base_seed=0)
    encode = lambda rs: (model.initial_noise([r.seed for r in rs]).double(), model.encode_prompts([r.prompt for r in rs]))
    held = evaluation_set(model, held_out, None, None, seed_offset, [r.seed for r in records])
    return encode(fit), encode(validation), (held.x_T.double(), held.cond)


def per_sample(final: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    return ((final - reference) ** 2).reshape(len(final), -1).mean(1).numpy()


def main(
    guidance_scale: float = typer.Option(7.5, help="classifier-free guidance of the mixture"),
    model_seed: int = typer.Option(0, help="seed of the mixture's means and scales"),
    train: int = typer.Option(128, help="calibration samples"),
    validation: int = typer.Option(64, help="validation samples that choose each plan"),
    held_out: int = typer.Option(256, help="fresh samples that score the samplers"),
    sample_seed: int = typer.Option(0, help="offset of the sample seeds (train, validation, held out)"),
    steps: str = typer.Option("5,10,20", help="step counts"),
    output: str = typer.Option("", help="also write the results as JSON here"),
    job_prompts: int = typer.Option(0, help="draw the samples as the job and evaluate do instead: this many prompts "
                                           "'a sample of class <zero..nine>' cycled, split by --validation-fraction "
                                           "(--train / --validation unused), held-out seeds of olss-dist evaluate"),
    validation_fraction: float = typer.Option(0.3334, help="with --job-prompts: the held-out share"),
    compare_orders: str = typer.Option("", help="compare the robust choice without reduced-basis candidates and "
                                                "with these orders (e.g. 1,2) instead of plain against robust"),
) -> None:
    model = GaussianMixtureModel(guidance_scale=guidance_scale, seed=model_seed)
    step_counts = tuple(int(k) for k in steps.split(","))
    if job_prompts:
        (noise, cond), (v_noise, v_cond), (h_noise, h_cond) = job_samples(model, job_prompts, validation_fraction, held_out, sample_seed)
        train, validation = len(noise), len(v_noise)
    else:
        base = 10 * sample_seed
        (noise, cond), (v_noise, v_cond), (h_noise, h_cond) = (
            draw(model, n, base + s) for n, s in ((train, 1), (validation, 2), (held_out, 3)))
    timesteps = trailing_timesteps(1000)
    common = dict(steps=step_counts, validation_noise=v_noise, validation_cond=v_cond)
    if compare_orders:
        orders = tuple(int(q) for q in compare_orders.split(","))
        arms = {"without orders": dict(orders=()), f"with orders {compare_orders}": dict(orders=orders)}
    else:
        arms = {"plain": dict(trust_ridges=(), choice_rules=ChoiceRules(criterion="rmse"), orders=()), "robust": {}}
    plans, seconds = {}, {}
    for label, options in arms.items():
        started = time.monotonic()
        plans[label] = calibrate(model, noise, cond, timesteps, model.alphas_cumprod, **options, **common)
        seconds[label] = time.monotonic() - started
    print("calibrated: " + ", ".join(f"{label} {s:.0f} s" for label, s in seconds.items())
          + f" ({train} train / {validation} validation samples, N=1000)")
    reference = schedule_states(model, h_noise, h_cond, model.noise_process.teacher_schedule(1000), [1000])[:, 0]
    solvers = process_builtins(model.noise_process)
    print(f"{held_out} held-out samples, guidance {guidance_scale:g}, model seed {model_seed}, sample seed {sample_seed}")
    print("| K | sampler | pooled RMSE | median | worst | > 0.1 | / best built-in |\n|---|---|---|---|---|---|---|")
    results = {}
    for k in step_counts:
        rows = {}
        for label in arms:
            plan = plans[label][k]
            sizes = f"max abs w {abs(plan.coefficients).max():.3g}, on outputs {abs(plan.coefficients[:, 1:]).max():.3g}"
            rows[f"{label} choice: {plan.choice['shipped']} ({sizes})"] = per_sample(
                rollout(plan.coefficients, model, h_noise, h_cond, plan.timesteps), reference)
        for name in solvers.names:
            builtin = solvers.plan(name, k, timesteps)
            rows[f"{name} (trailing)"] = per_sample(rollout(builtin.coefficients, model, h_noise, h_cond, builtin.timesteps), reference)
        for name in family_builtins("vp"):
            scheduler = builtin_scheduler(name, dict(model.scheduler_config))
            rows[f"{name} (config)"] = per_sample(run_sampler(scheduler, model, h_noise.float(), h_cond, k)[0].double(), reference)
        builtin_rows = {n: e for n, e in rows.items() if "choice" not in n}
        best = min(builtin_rows, key=lambda n: builtin_rows[n].mean())
        for name, errors in rows.items():
            root = np.sqrt(errors)
            ratio, (low, high) = ratio_interval(errors, builtin_rows[best])
            print(f"| {k} | {name} | {np.sqrt(errors.mean()):.3g} | {np.median(root):.3g} | {root.max():.3g} | "
                  f"{int((root > 0.1).sum())} | {ratio:.3g} [{low:.3g}, {high:.3g}] |")
        print(f"best built-in at {k} steps: {best}")
        for label in arms:
            record = {key: plans[label][k].choice.get(key) for key in ("shipped", "best_builtin", "ratio", "ratio_interval", "reason")}
            print(f"  {label} choice: {json.dumps(record)}")
        results[k] = {"best_builtin": best, **{n: float(np.sqrt(e.mean())) for n, e in rows.items()},
                      "choices": {label: plans[label][k].choice for label in arms},
                      "candidates": {label: plans[label][k].candidates for label in arms}}
    if output:
        with open(output, "w") as handle:
            json.dump(results, handle, indent=1, default=float)


if __name__ == "__main__":
    typer.run(main)
