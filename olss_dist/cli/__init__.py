"""``olss-dist``: the command line.

Adding a command takes a few lines::

    @app.command()
    @reports_errors
    def refit(root: str, storage_options: StorageOptionsFlag = None) -> None:
        \"\"\"One line of help.\"\"\"
        do_refit(root, storage_options=parse_storage_options(storage_options))

``reports_errors`` turns ``ValueError`` and ``ArtifactError`` into one ``error: ...`` line on stderr and
exit status 1; ``StorageOptionsFlag`` is the shared ``--storage-options JSON`` flag. Keep heavy imports
(torch, ray) inside command bodies so ``olss-dist --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape

from olss_dist.artifacts import (
    ArtifactError,
    list_models,
    pull_run,
    read_run_file,
    resolve_run,
)
from olss_dist.apps.refit import DEFAULT_MAX_ATTEMPTS  # neither Ray nor torch nor pyarrow on import
from olss_dist.cli.tables import (
    candidates_table,
    choice_table,
    files_table,
    find_plans,
    key_value_table,
    model_runs_table,
    plans_table,
    refit_table,
    report_tables,
    run_table,
    step_errors_table,
)
from olss_dist.cli.errors import StorageOptionsFlag, error_console, error_text, exit_with_error, parse_storage_options, reports_errors
from olss_dist.spec import DEVICES, KEEP_STATES, CalibrationSpec, ExecutionConfig, format_strengths, parse_steps, parse_strengths

app = typer.Typer(
    name="olss-dist",
    help="Distributed OLSS calibration: publish, inspect and pull calibrated schedulers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()



# ----------------------------------------------------------------------------------------------- commands


@app.command()
@reports_errors
def show(
    uri: Annotated[str, typer.Argument(help="run URI, model URI (its latest run) or a latest.json URI")],
    storage_options: StorageOptionsFlag = None,
) -> None:
    """Show a run: manifest, plans, step errors and quality report (every file read is verified)."""
    options = parse_storage_options(storage_options)
    run = resolve_run(uri, options)
    console.print(run_table(run))
    console.print(files_table(run))
    console.print(key_value_table("config", run.manifest["config"]))
    documents = {
        name: json.loads(read_run_file(run, name, options)) for name in run.manifest["files"] if name.endswith(".json")
    }
    scheduler_files = ("olss_plans.json", "scheduler_config.json")  # what the scheduler serves, if nothing else
    plans = [plan for name, doc in documents.items() if name not in scheduler_files for plan in find_plans(doc)]
    plans = plans or find_plans(documents.get(scheduler_files[0])) or find_plans(documents.get(scheduler_files[1]))
    plans.sort(key=lambda plan: len(plan["timesteps"]))
    if plans:
        console.print(plans_table(plans))
        errors = step_errors_table(plans)
        if errors is not None:
            console.print(errors)
        for plan in plans:
            candidates = candidates_table(plan)
            if candidates is not None:
                console.print(candidates)
        choices = choice_table(plans)
        if choices is not None:
            console.print(choices)
    for name, document in documents.items():
        if "report" in Path(name).stem:
            for table in report_tables(name, document):
                console.print(table)


@app.command()
@reports_errors
def pull(
    uri: Annotated[str, typer.Argument(help="run URI, model URI (its latest run) or a latest.json URI")],
    directory: Annotated[Path, typer.Argument(help="new local directory to download into")],
    storage_options: StorageOptionsFlag = None,
) -> None:
    """Download a run into DIRECTORY, verifying every file against its manifest."""
    options = parse_storage_options(storage_options)
    run = resolve_run(uri, options)
    target = pull_run(run.uri, directory, options)
    console.print(f"pulled {run.uri} -> {target} ({len(run.manifest['files'])} files verified)", highlight=False)


@app.command("list")
@reports_errors
def list_runs(
    root: Annotated[str, typer.Argument(help="registry root, e.g. s3://bucket/prefix or a local directory")],
    storage_options: StorageOptionsFlag = None,
) -> None:
    """List models and their complete runs under ROOT, marking the one each latest.json names."""
    models = list_models(root, parse_storage_options(storage_options))
    if not any(model.runs for model in models):
        console.print(f"no runs under {root}", highlight=False)
        return
    console.print(f"runs under {root}", highlight=False)
    for model in models:
        if model.runs:
            console.print(model_runs_table(model))


@app.command()
@reports_errors
def evaluate(
    model: Annotated[str, typer.Option(help="model spec: 'embedded', 'analytic', a diffusers folder, hub id or URI")],
    artifact: Annotated[str, typer.Option(help="run URI, model URI (its latest run), latest.json URI or run folder")],
    lora: Annotated[Optional[str], typer.Option(help="the LoRA the run was calibrated with (fused into --model)")] = None,
    steps: Annotated[Optional[str], typer.Option(help="comma-separated step counts (default: every planned one)")] = None,
    num_samples: Annotated[int, typer.Option(help="held-out samples")] = 32,
    prompts: Annotated[Optional[str], typer.Option(help="prompt file (text or Parquet), path or URI; default: the model's")] = None,
    seed_offset: Annotated[int, typer.Option(help="picks another independent set of held-out seeds")] = 0,
    teacher_steps: Annotated[Optional[int], typer.Option(help="N of the reference DDIM teacher (default: the run's)")] = None,
    uniform_fit_samples: Annotated[int, typer.Option(help="fresh samples for an on-policy fit on uniform nodes (0: skip)")] = 0,
    batch_size: Annotated[Optional[int], typer.Option(help="samples per model call (default: all)")] = None,
    output: Annotated[Path, typer.Option(help="directory for evaluation.json/.md and the PNG plots")] = Path("evaluation"),
    storage_options: StorageOptionsFlag = None,
    guidance_scales: Annotated[Optional[str], typer.Option(
        help="comma-separated guidance scales to evaluate at, one evaluation each (default: the run's)")] = None,
    resolutions: Annotated[Optional[str], typer.Option(
        help="comma-separated resolutions (e.g. 512,768x1344) to evaluate at, with every scale (default: the run's)")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(
        help="negative prompt for every held-out sample (default: the prompt file's, or none)")] = None,
) -> None:
    """Compare a run's OLSS plans with diffusers' built-in solvers on held-out samples (see docs/evaluation.md)."""
    from olss_dist.apps.evaluate.conditions import evaluate_conditions, parse_guidance_scales, parse_resolutions  # torch

    step_counts = None if steps is None or not steps.strip() else list(parse_steps(steps))
    scales, sizes = parse_guidance_scales(guidance_scales), parse_resolutions(resolutions)

    evaluate_conditions(
        output, console, scales, sizes, negative_prompt,
        model_spec=model, artifact=artifact, lora=lora, steps=step_counts, num_samples=num_samples,
        prompts=prompts, seed_offset=seed_offset, teacher_steps=teacher_steps, uniform_fit_samples=uniform_fit_samples,
        batch_size=batch_size, storage_options=parse_storage_options(storage_options),
    )


# ----------------------------------------------------------------------------------------------- calibrate

SPEC = CalibrationSpec()  # every calibrate default is a field default of these two
EXECUTION = ExecutionConfig()

# Help of each calibration option, by the field it sets (olss-dist calibrate, jobs/calibrate.py).
CALIBRATION_HELP = {
    "model": "model: 'embedded' (the committed digits model), 'analytic' (Gaussian mixture test model), a diffusers folder, hub id or URI",
    "prompts": "Parquet (column 'prompt'; optional 'negative_prompt', 'seed') or text file, path or URI; default: the model's prompts",
    "steps": "comma-separated step counts to plan",
    "teacher_steps": "N, the teacher's DDIM step count",
    "guidance_scale": "classifier-free guidance scale",
    "validation_fraction": "share of prompts held out of the fit to choose each plan",
    "seed": "base seed of the per-prompt seeds",
    "resolution": "pixels to calibrate at, e.g. 1024 or 768x1344 (height x width); default: the model's own",
    "lora": "diffusers LoRA fused into --model before calibrating: a .safetensors file or a folder of one, path or URI",
    "img2img_strengths": "comma-separated img2img / inpainting strengths to calibrate start plans for ('none': none)",
    "screen_samples": "fresh samples (fit prompts, new seeds) a fitted plan must not lose to the best built-in on (0: no tail screen; default: the model's multiple of the fit prompts, 2 for networks, 64 for the analytic mixtures)",
    "output": "registry root the run is published under: a path or fsspec URI (s3://...)",
    "device": f"worker device: {', '.join(DEVICES)} (auto: GPUs when the cluster has any)",
    "num_workers": "actors (default: one per GPU, or one per CPU)",
    "shard_size": "samples per shard (one batch on one worker)",
    "wait_for_gpus_s": "with --device cuda, seconds to wait for the autoscaler to add GPU nodes",
    "keep_states": f"where workers keep teacher states for the on-policy rounds: {' or '.join(KEEP_STATES)} (disk: node-local, survives restarts)",
    "state_dir": "node-local directory for --keep-states disk (default: the node's temp dir)",
    "address": "Ray address (default: RAY_ADDRESS, else a local Ray)",
    "local_cpus": "logical CPUs of a local Ray (default: the machine's)",
    "max_restarts": "restarts of each actor after its process dies",
    "keep_checkpoints": "keep shard checkpoints after publishing",
    "reserve_timeout_s": "seconds to wait for the cluster to hold the job's actors while other jobs hold them (default: wait until it can)",
}


def calibration_config(
    *,
    model: str,
    prompts: str | None,
    steps: str,
    teacher_steps: int,
    guidance_scale: float,
    validation_fraction: float,
    seed: int,
    resolution: str | None,
    lora: str | None,
    output: str,
    device: str,
    num_workers: int | None,
    shard_size: int,
    wait_for_gpus: float,
    keep_states: str,
    state_dir: str | None,
    address: str | None,
    local_cpus: int | None,
    max_restarts: int,
    keep_checkpoints: bool,
    storage_options: str | None,
    quiet: bool,
    reserve_timeout: float | None = None,
    img2img_strengths: str = format_strengths(SPEC.img2img_strengths),
    screen_samples: int | None = SPEC.screen_samples,
) -> tuple[CalibrationSpec, ExecutionConfig, bool]:
    """``olss-dist calibrate``'s options as the job's spec, execution config and ``quiet``; SpecError otherwise."""
    spec = CalibrationSpec(
        model=model, prompts=prompts, steps=parse_steps(steps), teacher_steps=teacher_steps, guidance_scale=guidance_scale,
        validation_fraction=validation_fraction, seed=seed, resolution=resolution, lora=lora,
        img2img_strengths=parse_strengths(img2img_strengths), screen_samples=screen_samples,
    )  # fmt: skip
    execution = ExecutionConfig(
        output=output, device=device, num_workers=num_workers, shard_size=shard_size, wait_for_gpus_s=wait_for_gpus,
        keep_states=keep_states, state_dir=state_dir, address=address, local_cpus=local_cpus, max_restarts=max_restarts,
        keep_checkpoints=keep_checkpoints, storage_options=parse_storage_options(storage_options) or {},
        reserve_timeout_s=reserve_timeout,
    )  # fmt: skip
    return spec, execution, quiet


def parse_calibrate_arguments(arguments: Sequence[str]) -> tuple[CalibrationSpec, ExecutionConfig, bool]:
    """What ``olss-dist calibrate ARGUMENTS`` would run, without running it (e.g. ``spec.to_arguments()``
    + ``execution.to_arguments()`` + ``["--quiet"]``, the form refit submits jobs in)."""
    command = typer.main.get_command(app).commands["calibrate"]  # type: ignore[attr-defined]
    with command.make_context("calibrate", list(arguments)) as context:
        return calibration_config(**context.params)


@app.command()
@reports_errors
def calibrate(
    model: Annotated[str, typer.Option(help=CALIBRATION_HELP["model"])] = SPEC.model,
    prompts: Annotated[Optional[str], typer.Option(help=CALIBRATION_HELP["prompts"])] = SPEC.prompts,
    steps: Annotated[str, typer.Option(help=CALIBRATION_HELP["steps"])] = ",".join(map(str, SPEC.steps)),
    teacher_steps: Annotated[int, typer.Option(help=CALIBRATION_HELP["teacher_steps"])] = SPEC.teacher_steps,
    guidance_scale: Annotated[float, typer.Option(help=CALIBRATION_HELP["guidance_scale"])] = SPEC.guidance_scale,
    validation_fraction: Annotated[float, typer.Option(help=CALIBRATION_HELP["validation_fraction"])] = SPEC.validation_fraction,
    seed: Annotated[int, typer.Option(help=CALIBRATION_HELP["seed"])] = SPEC.seed,
    resolution: Annotated[Optional[str], typer.Option(help=CALIBRATION_HELP["resolution"])] = SPEC.resolution,
    lora: Annotated[Optional[str], typer.Option(help=CALIBRATION_HELP["lora"])] = SPEC.lora,
    output: Annotated[str, typer.Option(help=CALIBRATION_HELP["output"])] = EXECUTION.output,
    device: Annotated[str, typer.Option(help=CALIBRATION_HELP["device"])] = EXECUTION.device,
    num_workers: Annotated[Optional[int], typer.Option(help=CALIBRATION_HELP["num_workers"])] = EXECUTION.num_workers,
    shard_size: Annotated[int, typer.Option(help=CALIBRATION_HELP["shard_size"])] = EXECUTION.shard_size,
    wait_for_gpus: Annotated[float, typer.Option(help=CALIBRATION_HELP["wait_for_gpus_s"])] = EXECUTION.wait_for_gpus_s,
    keep_states: Annotated[str, typer.Option(help=CALIBRATION_HELP["keep_states"])] = EXECUTION.keep_states,
    state_dir: Annotated[Optional[str], typer.Option(help=CALIBRATION_HELP["state_dir"])] = EXECUTION.state_dir,
    address: Annotated[Optional[str], typer.Option(help=CALIBRATION_HELP["address"])] = EXECUTION.address,
    local_cpus: Annotated[Optional[int], typer.Option(help=CALIBRATION_HELP["local_cpus"])] = EXECUTION.local_cpus,
    max_restarts: Annotated[int, typer.Option(help=CALIBRATION_HELP["max_restarts"])] = EXECUTION.max_restarts,
    keep_checkpoints: Annotated[bool, typer.Option(help=CALIBRATION_HELP["keep_checkpoints"])] = EXECUTION.keep_checkpoints,
    storage_options: StorageOptionsFlag = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress output (for cron); the URI is still printed")] = False,
    reserve_timeout: Annotated[Optional[float], typer.Option(help=CALIBRATION_HELP["reserve_timeout_s"])] = EXECUTION.reserve_timeout_s,
    img2img_strengths: Annotated[str, typer.Option(help=CALIBRATION_HELP["img2img_strengths"])] = format_strengths(SPEC.img2img_strengths),
    screen_samples: Annotated[Optional[int], typer.Option(help=CALIBRATION_HELP["screen_samples"])] = SPEC.screen_samples,
) -> None:
    """Calibrate a model's OLSS schedulers on a Ray cluster and publish the run (see docs/distributed.md).

    Under 'ray job submit' (or with RAY_ADDRESS set) the job joins the cluster, otherwise it starts a
    local Ray with CPU workers. Prints the published run's URI on stdout; bad input is one error line
    and exit status 1, with nothing published.
    """
    spec, execution, quiet = calibration_config(**locals())  # the options above, by name
    if spec.model == "analytic" and not quiet:
        typer.echo("model: analytic Gaussian mixture (built-in test model, not an image model); pass --model for a real one")
    from olss_dist.distributed.job import JOB_ERRORS, run_job_from_command  # loads torch and Ray

    try:
        result = run_job_from_command(spec, execution, quiet=quiet)
    except JOB_ERRORS as error:
        exit_with_error(error)
    typer.echo(result.uri)


# ----------------------------------------------------------------------------------------------- refit

def refit_help(field: str) -> str:
    """Help of a refit calibration option: the calibrate option's, as the default of models without settings."""
    return f"for models the registry gives no setting: {CALIBRATION_HELP[field]}"


@app.command()
@reports_errors
def refit(
    models: Annotated[str, typer.Argument(help="model registry: a directory or bucket prefix whose subfolders are diffusers models, or a YAML/JSON file listing model URIs with optional settings")],
    output: Annotated[str, typer.Option(help="registry root (artifact store) where runs are looked up and published")],
    inline: Annotated[bool, typer.Option("--inline", help="calibrate in this process on the Ray cluster it joins (--address, RAY_ADDRESS or a local Ray) instead of submitting Ray jobs")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray Jobs API address for submissions, e.g. http://head:8265 (default: RAY_ADDRESS); with --inline, the Ray cluster address")] = None,
    working_dir: Annotated[Optional[str], typer.Option(help="checkout holding jobs/calibrate.py, uploaded with each job (default: the one olss_dist runs from)")] = None,
    prompts: Annotated[Optional[str], typer.Option(help=refit_help("prompts"))] = SPEC.prompts,
    steps: Annotated[str, typer.Option(help=refit_help("steps"))] = ",".join(map(str, SPEC.steps)),
    teacher_steps: Annotated[int, typer.Option(help=refit_help("teacher_steps"))] = SPEC.teacher_steps,
    guidance_scale: Annotated[float, typer.Option(help=refit_help("guidance_scale"))] = SPEC.guidance_scale,
    validation_fraction: Annotated[float, typer.Option(help=refit_help("validation_fraction"))] = SPEC.validation_fraction,
    seed: Annotated[int, typer.Option(help=refit_help("seed"))] = SPEC.seed,
    resolution: Annotated[Optional[str], typer.Option(help=refit_help("resolution"))] = SPEC.resolution,
    device: Annotated[str, typer.Option(help=f"every job's {CALIBRATION_HELP['device']}")] = EXECUTION.device,
    num_workers: Annotated[Optional[int], typer.Option(help=f"every job's {CALIBRATION_HELP['num_workers']}")] = EXECUTION.num_workers,
    shard_size: Annotated[int, typer.Option(help=f"every job's {CALIBRATION_HELP['shard_size']}")] = EXECUTION.shard_size,
    max_attempts: Annotated[int, typer.Option(help="failed attempts per model and config before refits give up (kept in the store)")] = DEFAULT_MAX_ATTEMPTS,
    max_running: Annotated[Optional[int], typer.Option(help="jobs of this refit running at once; the rest are queued for --wait or the next refit (default: no limit)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the submitted jobs and report how they ended")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would run; write and start nothing")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="one JSON list of outcomes per refit on stdout instead of a table")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="refit again every --interval seconds")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refits with --watch")] = 600.0,
    cycles: Annotated[Optional[int], typer.Option(help="with --watch, stop after this many refits (default: until interrupted)")] = None,
    storage_options: StorageOptionsFlag = None,
) -> None:
    """Calibrate each model of a registry that has no run for its weights and config yet (see docs/refit.md).

    Models without settings get the calibrate defaults (``CalibrationSpec``), so a refit finds the runs
    of default ``olss-dist calibrate`` jobs. Exit status 1 when any model failed (in the last refit, with --watch).
    """
    import time

    from olss_dist.apps.refit import RefitOptions, any_failed
    from olss_dist.apps.refit import refit as refit_registry

    if interval <= 0 or (cycles is not None and (cycles < 1 or not watch)):
        raise ValueError("--interval must be positive, and --cycles a positive count used with --watch")
    execution = ExecutionConfig(
        output=output, device=device, num_workers=num_workers, shard_size=shard_size, address=address if inline else None,
        storage_options=parse_storage_options(storage_options) or {},
    )  # fmt: skip
    options = RefitOptions(
        execution, inline=inline, address=None if inline else address, working_dir=working_dir, max_attempts=max_attempts,
        max_running=max_running,
    )  # fmt: skip
    defaults = CalibrationSpec(
        prompts=prompts, steps=parse_steps(steps), teacher_steps=teacher_steps, guidance_scale=guidance_scale,
        validation_fraction=validation_fraction, seed=seed, resolution=resolution,
    )  # fmt: skip
    cycle, failed = 0, False
    while True:
        cycle += 1
        try:
            outcomes = refit_registry(models, options, defaults, dry_run=dry_run, wait=wait)
        except (ValueError, ArtifactError) as error:
            if not watch:
                raise
            error_console.print(f"[bold red]error:[/] {escape(error_text(error))}", highlight=False, soft_wrap=True)
            outcomes, failed = [], True
        else:
            failed = any_failed(outcomes)
            if json_output:
                typer.echo(json.dumps([outcome.to_dict() for outcome in outcomes]))
            else:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                console.print(refit_table(f"refit of {escape(models)} ({stamp}{', dry run' if dry_run else ''})", outcomes))
        if not watch or (cycles is not None and cycle >= cycles):
            break
        time.sleep(interval)
    if failed:
        raise typer.Exit(code=1)
