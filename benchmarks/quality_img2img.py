"""img2img quality on the embedded digits model: OLSS start plans against DPM-Solver++ and DDIM (issue 15).

    python benchmarks/quality_img2img.py --plans /tmp/olss_img2img_plans.json

Calibration (skipped when ``--plans`` exists; written there otherwise): the public in-process API,
``calibrate(embedded, ..., trailing_timesteps(1000), alphas_cumprod, steps=(10,), start_strengths=(0.3, 0.5,
0.75))`` at N = 1000 on ``--train`` / ``--validation`` samples (seeds 0.., the model's 40 digit prompts in a
fixed permutation).

Held-out images: the teacher's own samples from seeds no calibration saw (1000-step DDIM from seeds
10000..), decoded to 32x32 digit images and encoded back with the VAE (the latent mean times the scaling
factor, as ``StableDiffusionImg2ImgPipeline`` prepares its input image). For each strength ``σ`` and
``K = --steps``, each sampler starts at its own step ``s = K - int(K σ)`` of its own ``K``-step timesteps
(``set_timesteps(K)``, ``set_begin_index(s)``), from the image latent noised to that timestep (the same
noise for every sampler; ᾱ from the model's exact schedule), and runs to the end; its final latent is
compared with a 1000-step DDIM solve from the same noised latent at the same start timestep (DDIM over
every train timestep from it down to 0, ending at the clean sample). Samplers: ``OLSSScheduler`` serving the
calibrated plans (a fitted start plan where one was kept, else the built-in the choice kept, in OLSS form),
DPM-Solver++ 2M and DDIM with trailing spacing. Prints the RMSE per sampler and OLSS / DPM-Solver++. The held-out latents and the
references are cached in ``--held-out-cache`` (``.npz``); ``--only-references`` fills it for the built-ins'
start timesteps without calibrating. A quality measurement, not a timing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import pin_threads

pin_threads()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import typer  # noqa: E402

from olss_dist import calibrate  # noqa: E402
from olss_dist.core.builtin import builtin_scheduler  # noqa: E402
from olss_dist.core.plan import Plan  # noqa: E402
from olss_dist.core.start_plans import start_step  # noqa: E402
from olss_dist.core.teacher import ddim_schedule, schedule_states, trailing_timesteps  # noqa: E402
from olss_dist.models import load_model  # noqa: E402
from olss_dist.models.embedded import default_prompts  # noqa: E402


def prompts_for(count: int, offset: int = 0) -> list[str]:
    """The embedded model's digit prompts in a fixed permutation (every split sees every digit)."""
    prompts = default_prompts()
    return [prompts[(7 * (i + offset)) % len(prompts)] for i in range(count)]


def calibrated_plans(model, path: Path, train: int, validation: int, steps: tuple[int, ...],
                     strengths: tuple[float, ...]) -> list[Plan]:
    """The plans at ``path``, or an in-process calibration at N = 1000 written there."""
    if path.exists():
        return [Plan.from_dict(entry) for entry in json.loads(path.read_text())["plans"]]
    prompts = prompts_for(train + validation)
    noise = model.initial_noise(range(train + validation))
    cond = model.encode_prompts(prompts)
    started = time.monotonic()
    plans = calibrate(model, noise[:train], cond[:train], trailing_timesteps(1000), model.alphas_cumprod, steps=steps,
                      validation_noise=noise[train:], validation_cond=cond[train:], start_strengths=strengths,
                      progress=print)
    seconds = time.monotonic() - started
    path.write_text(json.dumps({"train": train, "validation": validation, "seconds": seconds,
                                "plans": [p.to_dict() for p in plans.values()]}))
    print(f"calibrated in {seconds:.0f} s ({train} train / {validation} validation samples, N=1000)")
    return list(plans.values())


def source_latents(model, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out image latents (teacher samples from seeds 10000.., decoded and encoded back) and their cond."""
    cond = model.encode_prompts(prompts_for(count, offset=3))
    teacher = model.noise_process.teacher_schedule(1000)
    final = schedule_states(model, model.initial_noise(range(10_000, 10_000 + count)), cond, teacher, [1000])[:, 0]
    images = model.decode(final)  # (B, 32, 32, 3) uint8 digits
    vae = model.load_vae()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    return latents.to(final.dtype).cpu(), cond


def noised(model, x0: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """``add_noise`` at train timestep ``timestep`` with the model's exact ᾱ: the one start latent every sampler
    starting there gets (the schedulers' own ``add_noise`` agree with it to float32 rounding)."""
    alpha = float(model.alphas_cumprod[timestep])
    return (alpha**0.5 * x0.double() + (1 - alpha) ** 0.5 * noise.double()).to(x0.dtype)


def run_scheduler(scheduler, model, start: torch.Tensor, cond, num_steps: int, strength: float) -> torch.Tensor:
    """An img2img run as the pipeline steps it (``set_timesteps(K)``, ``set_begin_index(s)``) from ``start``."""
    scheduler.set_timesteps(num_steps)
    s = start_step(num_steps, strength)
    if hasattr(scheduler, "set_begin_index"):  # as the img2img pipeline does (DDIM has none)
        scheduler.set_begin_index(s)
    x = start
    for t in scheduler.timesteps[s:]:
        x = scheduler.step(model(x, int(t), cond), t, x).prev_sample
    return x


def start_timestep(scheduler, num_steps: int, strength: float) -> int:
    scheduler.set_timesteps(num_steps)
    return int(scheduler.timesteps[start_step(num_steps, strength)])


def reference(model, start: torch.Tensor, cond, timestep: int) -> torch.Tensor:
    """1000-step DDIM from ``start`` at train timestep ``timestep``: every train timestep down to 0, then ᾱ = 1."""
    timesteps = np.arange(timestep, -1, -1)
    return schedule_states(model, start, cond, ddim_schedule(timesteps, model.alphas_cumprod), [len(timesteps)])[:, 0]


class HeldOut:
    """Held-out source latents and the references at each start timestep, cached in an ``.npz`` (no pickle)."""

    def __init__(self, model, count: int, path: Path):
        self.model, self.path = model, path
        self.cond = model.encode_prompts(prompts_for(count, offset=3))
        data = dict(np.load(path)) if path.exists() else {}
        if data and len(data["x0"]) == count:
            self.x0 = torch.from_numpy(data["x0"])
        else:
            data = {}
            self.x0, _ = source_latents(model, count)
        self.noise = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(20_000), dtype=self.x0.dtype)
        self.references = {int(k[4:]): torch.from_numpy(v) for k, v in data.items() if k.startswith("ref_")}
        self.save()

    def reference(self, timestep: int) -> torch.Tensor:
        if timestep not in self.references:
            self.references[timestep] = reference(self.model, noised(self.model, self.x0, self.noise, timestep),
                                                  self.cond, timestep)
            self.save()
        return self.references[timestep]

    def save(self) -> None:
        arrays = {"x0": self.x0.numpy(), **{f"ref_{t}": r.numpy() for t, r in self.references.items()}}
        np.savez(self.path, **arrays)


def main(
    plans: Path = typer.Option(Path("/tmp/olss_img2img_plans.json"), help="calibrated plans (written when missing)"),
    held_out_cache: Path = typer.Option(Path("/tmp/olss_img2img_held_out.npz"), help="held-out latents and references"),
    train: int = typer.Option(32, help="calibration samples"),
    validation: int = typer.Option(24, help="validation samples that choose each plan"),
    held_out: int = typer.Option(16, help="held-out images that score the samplers"),
    steps: int = typer.Option(10, help="K"),
    strengths: str = typer.Option("0.3,0.5,0.75", help="img2img strengths"),
    only_references: bool = typer.Option(False, help="compute the built-ins' references only (no calibration)"),
) -> None:
    from olss_dist.scheduler import OLSSScheduler

    model = load_model("embedded", device="cpu")
    strength_values = tuple(float(s) for s in strengths.split(","))
    config = model.scheduler_config
    builtins = {
        "DPM-Solver++ 2M (trailing)": lambda: builtin_scheduler("dpmsolver++", config, "trailing"),
        "DDIM (trailing)": lambda: builtin_scheduler("ddim", config, "trailing"),
    }
    data = HeldOut(model, held_out, held_out_cache)
    if only_references:
        for strength in strength_values:
            for make in builtins.values():
                data.reference(start_timestep(make(), steps, strength))
        return
    shipped = calibrated_plans(model, plans, train, validation, (steps,), strength_values)
    samplers = {"OLSSScheduler": lambda: OLSSScheduler.from_plans(shipped, **builtin_config_of(model)), **builtins}
    starts = {record["start_step"]: record for p in shipped if not p.start_step for record in p.starts}
    print(f"{held_out} held-out images (teacher samples, VAE round trip), K={steps}")
    print("| strength | start step | OLSS serves | sampler | start timestep | RMSE vs 1000-step DDIM |")
    print("|---|---|---|---|---|---|")
    for strength in strength_values:
        s = start_step(steps, strength)
        serves = starts.get(s, {}).get("serves", "-")
        rmse = {}
        for name, make in samplers.items():
            t_s = start_timestep(make(), steps, strength)
            final = run_scheduler(make(), model, noised(model, data.x0, data.noise, t_s), data.cond, steps, strength)
            rmse[name] = float((final - data.reference(t_s)).pow(2).mean().sqrt())
            print(f"| {strength:g} | {s} | {serves} | {name} | {t_s} | {rmse[name]:.4g} |")
        ratio = rmse["OLSSScheduler"] / rmse["DPM-Solver++ 2M (trailing)"]
        print(f"| {strength:g} | {s} | {serves} | **OLSS / DPM-Solver++** | | **{ratio:.3f}** |")


def builtin_config_of(model) -> dict:
    """``OLSSScheduler`` arguments of the model's exact noise schedule (trained betas)."""
    from olss_dist.method.run import builtin_config

    return {**builtin_config(model.alphas_cumprod), "prediction_type": model.prediction_type}


if __name__ == "__main__":
    typer.run(main)
