"""Calibrate a diffusion model's OLSS schedulers on a Ray cluster and publish the result.

    ray job submit --working-dir . -- python jobs/calibrate.py --output s3://bucket/registry --device cuda
    python jobs/calibrate.py --output ./registry                     # the same job on a local Ray

Under ``ray job submit`` (or with RAY_ADDRESS set) the job joins the cluster; otherwise it starts a
local Ray with CPU workers. On success it prints the published run's URI on stdout; on bad input it
prints one error line and exits non-zero without publishing anything.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import ray
import typer

from olss_dist.distributed.job import DEVICES, JobConfig, run_job
from olss_dist.distributed.pool import WorkerError, WorkersLostError
from olss_dist.artifacts.errors import ArtifactError

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers like 5,10,20, got {text!r}") from None


@app.command()
def calibrate(
    output: str = typer.Option(JobConfig.output, help="Registry root the run is published under: a path or fsspec URI (s3://...)."),
    model: str = typer.Option(JobConfig.model, help="Model: 'embedded' (the committed digits model), 'analytic' (Gaussian mixture test model), a diffusers folder, hub id or URI."),
    prompts: Optional[str] = typer.Option(None, help="Parquet (column 'prompt'; optional 'negative_prompt', 'seed') or text file, path or URI. Default: the model's prompts."),
    steps: str = typer.Option(",".join(map(str, JobConfig.steps)), help="Comma-separated step counts to plan."),
    teacher_steps: int = typer.Option(JobConfig.teacher_steps, help="N, the teacher's DDIM step count."),
    guidance_scale: float = typer.Option(JobConfig.guidance_scale, help="Classifier-free guidance scale."),
    validation_fraction: float = typer.Option(JobConfig.validation_fraction, help="Share of prompts held out of the fit."),
    seed: int = typer.Option(JobConfig.seed, help="Base seed of the per-prompt seeds."),
    shard_size: int = typer.Option(JobConfig.shard_size, help="Samples per shard (one batch on one worker)."),
    device: str = typer.Option(JobConfig.device, help=f"Worker device: {', '.join(DEVICES)} (auto: GPUs when the cluster has any)."),
    num_workers: Optional[int] = typer.Option(None, help="Actors (default: one per GPU, or CPUs minus one)."),
    wait_for_gpus: float = typer.Option(0.0, help="With --device cuda, seconds to wait for the autoscaler to add GPU nodes."),
    keep_states: str = typer.Option("disk", help="Where workers keep teacher states for the on-policy rounds: disk (node-local, survives restarts) or memory."),
    state_dir: Optional[str] = typer.Option(None, help="Node-local directory for --keep-states disk (default: the node's temp dir)."),
    address: Optional[str] = typer.Option(None, help="Ray address (default: RAY_ADDRESS, else a local Ray)."),
    local_cpus: Optional[int] = typer.Option(None, help="Logical CPUs of a local Ray."),
    keep_checkpoints: bool = typer.Option(False, help="Keep shard checkpoints after publishing."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output (for cron); the URI is still printed."),
) -> None:
    config = JobConfig(
        output=output,
        model=model,
        prompts=prompts,
        steps=parse_steps(steps),
        teacher_steps=teacher_steps,
        guidance_scale=guidance_scale,
        validation_fraction=validation_fraction,
        seed=seed,
        shard_size=shard_size,
        device=device,
        num_workers=num_workers,
        wait_for_gpus_s=wait_for_gpus,
        keep_states=keep_states,
        state_dir=state_dir,
        address=address,
        local_cpus=local_cpus,
        keep_checkpoints=keep_checkpoints,
        quiet=quiet,
    )
    if model == "analytic" and not quiet:
        typer.echo("model: analytic Gaussian mixture (built-in test model, not an image model); pass --model for a real one")
    try:
        result = run_job(config)
    except (ValueError, ArtifactError, WorkerError, WorkersLostError, OSError) as error:
        ray.shutdown()  # stops forwarding worker logs, so the error line is the last line
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(result.uri)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()
