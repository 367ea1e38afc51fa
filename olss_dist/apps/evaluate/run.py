"""Running an evaluation: the teacher's reference, the sampling loop, its metrics, and ``run_evaluation``.

Every sampler runs the same generic diffusers loop from the same initial noise ``x_T``, with its own
model calls::

    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t, cond), t, x).prev_sample

and its final latent is compared with the N-step teacher's final latent from the same ``x_T``
(held-out samples: ``samples``): the model's noise process's teacher (DDIM for VP models, the model's own
flow-matching Euler schedule for flow models), whose built-in solvers are compared.

Metrics (per sample, over latent elements): RMSE against the teacher's final latent, and PSNR on latents,
``20 log10(peak_to_peak / rmse)`` with ``peak_to_peak`` the range of all teacher final latents of the set.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from olss_dist.apps.evaluate.published import calibration_seeds, load_calibrated_run
from olss_dist.apps.evaluate.results import Evaluation, SamplerResult
from olss_dist.apps.evaluate.samples import EvaluationSet, evaluation_set
from olss_dist.apps.evaluate.samplers import (
    Sampler,
    builtin_samplers,
    fit_uniform_on_policy,
    olss_sampler,
    paper_plans,
    shipped_sampler,
)
from olss_dist.spec import CalibrationSpec, SpecError
from olss_dist.core.builtin import check_builtins, exact_vp_config, family_builtins
from olss_dist.core.path_search import check_num_steps, even_nodes
from olss_dist.core.teacher import Denoiser, TeacherSchedule, ddim_schedule, schedule_states, trailing_timesteps
from olss_dist.core.teacher import model_timestep as flow_timestep
from olss_dist.method.rollouts import batch_slices, error_summary, per_sample_mse, select

GRID_SAMPLES = 8


def teacher_states(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    cond: Any,
    timesteps: Any,
    alphas_cumprod: Any,
    keep: Sequence[int],
    batch_size: int | None = None,
) -> torch.Tensor:
    """``teacher.record_states`` over batches of ``batch_size`` samples (None: all at once).

    Args:
        timesteps: ``(N,)`` VP train timesteps (DDIM over ``alphas_cumprod``), or a ``TeacherSchedule``
            (any noise process's teacher; ``alphas_cumprod`` unused, None).

    Returns:
        ``(B, len(keep), *shape)`` in the dtype of ``x_T``: the N-step teacher's states at ``keep``.
    """
    schedule = timesteps if isinstance(timesteps, TeacherSchedule) else ddim_schedule(timesteps, alphas_cumprod)
    return torch.cat([
        schedule_states(denoiser, x_T[rows], select(cond, rows), schedule, keep)
        for rows in batch_slices(len(x_T), batch_size)
    ])


def model_timestep(t: torch.Tensor | int | float) -> int:
    """A scheduler timestep as the integer train timestep a VP denoiser takes (ValueError when it is none)."""
    value = float(t)
    if not value.is_integer():
        raise ValueError(f"timestep {value} is not an integer train timestep")
    return int(value)


def is_flow(denoiser: Denoiser) -> bool:
    """Whether ``denoiser`` is a flow-matching model (its ``noise_process``); plain callables count as VP."""
    process = getattr(denoiser, "noise_process", None)
    return process is not None and process.kind == "flow"


def run_sampler(scheduler, denoiser: Denoiser, x_T: torch.Tensor, cond: Any, num_steps: int) -> tuple[torch.Tensor, int]:
    """The generic diffusers sampling loop; returns the final latent ``(B, *shape)`` and model calls per sample.

    VP models get integer train timesteps (``model_timestep``); flow models the scheduler's own timesteps
    as ``core.teacher.model_timestep`` gives them (floats ``sigma * 1000``), and their ``mu`` in
    ``set_timesteps`` as flow pipelines pass it.
    """
    flow = is_flow(denoiser)
    mu = getattr(denoiser, "mu", None) if flow else None
    scheduler.set_timesteps(num_steps, **({} if mu is None else {"mu": mu}))
    timestep = flow_timestep if flow else model_timestep
    # FlowMatchEulerDiscreteScheduler has neither: flow pipelines start at the noise and feed the state as is.
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    calls = 0
    for t in scheduler.timesteps:
        output = denoiser(scale(x, t), timestep(t), cond)
        calls += 1
        x = scheduler.step(output, t, x).prev_sample
    return x, calls


def latent_peak_to_peak(teacher_final: torch.Tensor) -> float:
    """The PSNR peak: the range of all the teacher's final latents ``(B, *shape)`` of the set."""
    return float(teacher_final.max() - teacher_final.min())


def sample_metrics(mse: np.ndarray, peak_to_peak: float) -> dict[str, float]:
    """Summary of per-sample errors ``mse (B,)`` (``per_sample_mse``): pooled RMSE, spread of per-sample RMSE, PSNR.

    Returns:
        ``rmse`` (over all samples), ``median``/``p90``/``worst`` per-sample RMSE, ``rmse_mean``/``rmse_std``
        of per-sample RMSE, and ``psnr_mean``/``psnr_std`` in dB on latents relative to ``peak_to_peak``.
    """
    if not np.all(np.isfinite(mse)):
        nan = float("nan")
        return {"rmse": float("inf"), "median": nan, "p90": nan, "worst": float("inf"),
                "rmse_mean": nan, "rmse_std": nan, "psnr_mean": nan, "psnr_std": nan}
    per_sample_rmse = np.sqrt(mse)
    with np.errstate(divide="ignore"):
        psnr = 20.0 * np.log10(peak_to_peak / per_sample_rmse)
    return {
        **error_summary(mse),
        "rmse_mean": float(per_sample_rmse.mean()),
        "rmse_std": float(per_sample_rmse.std()),
        "psnr_mean": float(psnr.mean()),
        "psnr_std": float(psnr.std()),
    }


def sample_set(sampler: Sampler, denoiser: Denoiser, samples: EvaluationSet, num_steps: int,
               batch_size: int | None = None) -> tuple[torch.Tensor, int, int]:
    """Final latents ``(B, *shape)`` of ``sampler`` over the whole set, model calls per sample, first timestep."""
    finals = []
    for rows in batch_slices(len(samples), batch_size):
        scheduler = sampler.new_scheduler()
        final, calls = run_sampler(scheduler, denoiser, samples.x_T[rows], select(samples.cond, rows), num_steps)
        finals.append(final)
    return torch.cat(finals), calls, (flow_timestep if is_flow(denoiser) else model_timestep)(scheduler.timesteps[0])


def evaluate(
    denoiser: Denoiser,
    samplers: Sequence[Sampler],
    steps: Sequence[int],
    samples: EvaluationSet,
    teacher_final: torch.Tensor,
    batch_size: int | None = None,
    grid: Sequence[int] = (),
    progress: Callable[[str], None] | None = None,
) -> tuple[list[SamplerResult], dict[int, dict[str, torch.Tensor]]]:
    """Run every sampler at every step count on-policy from ``samples.x_T`` and score it against the teacher.

    Args:
        denoiser: ``denoiser(x, t, cond) -> eps``.
        steps: step counts K.
        teacher_final: ``(B, *shape)`` the teacher's final latents from the same ``x_T``.
        batch_size: samples per model call (None: all at once).
        grid: indices of the samples whose final latents are kept for the sample grid.
        progress: called with one line per finished sampler and step count.

    Returns:
        the results (sampler-major, then K) and ``{K: {label: (len(grid), *shape) latents}}``.
    """
    progress = progress or (lambda message: None)
    peak_to_peak = latent_peak_to_peak(teacher_final)
    results, kept = [], {k: {} for k in steps}
    for sampler in samplers:
        for k in steps:
            try:
                final, calls, first = sample_set(sampler, denoiser, samples, k, batch_size)
            except (ValueError, IndexError, RuntimeError) as error:
                results.append(SamplerResult(sampler.name, sampler.variant, k, None, note=f"cannot run: {error}"))
                progress(f"{k} steps: {sampler.label} cannot run: {error}")
                continue
            mse = per_sample_mse(final, teacher_final)
            metrics = sample_metrics(mse, peak_to_peak)
            note = "diverged (non-finite output)" if not math.isfinite(metrics["rmse"]) else ""
            results.append(SamplerResult(sampler.name, sampler.variant, k, calls, metrics, note, first, np.sqrt(mse).tolist()))
            if len(grid):
                kept[k][sampler.label] = final[list(grid)]
            progress(f"{k} steps: {sampler.label} RMSE {metrics['rmse']:.4g} ({calls} calls)")
    return results, kept


def run_evaluation(
    model_spec: str,
    artifact: str,
    steps: Sequence[int] | None = None,
    num_samples: int = 32,
    prompts: str | None = None,
    seed_offset: int = 0,
    teacher_steps: int | None = None,
    uniform_fit_samples: int = 0,
    builtins: Sequence[str] | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    lora: str | None = None,
    guidance_scale: float | None = None,
    resolution: Sequence[int] | None = None,
    negative_prompt: str | None = None,
) -> Evaluation:
    """Evaluate a published run on held-out samples against the built-in solvers (what ``olss-dist evaluate`` runs).

    Args:
        model_spec: ``olss_dist.models.load_model`` spec; must be the model the run was calibrated for.
        lora: the LoRA fused into that model (path or URI), as the run was calibrated with it.
        artifact: run URI, model URI (its latest run), ``latest.json`` URI or local run folder.
        steps: step counts K (default: every step count the run planned); each must be planned.
        num_samples: held-out samples.
        prompts: prompt file (text or Parquet, path or URI); default: the model's prompts, cycled.
        seed_offset: selects an independent set of evaluation seeds.
        teacher_steps: N of the reference teacher (default: the run's teacher).
        uniform_fit_samples: fresh samples for the on-policy fit on evenly spaced nodes (0: skip that sampler).
        builtins: built-in solvers to compare (keys of ``core.builtin.BUILTIN_SOLVERS`` of the model's family);
            None: every solver of the model's family (VP: DDIM ... DEIS; flow: FlowMatch Euler, DPM-Solver++
            and UniPC with flow sigmas).
        batch_size: samples per model call (None: all at once).
        device: where the model runs (default: the adapter's choice).
        storage_options: fsspec options for the artifact and prompt locations.
        progress: called with a line per stage.
        guidance_scale: the guidance to sample and build the teacher at (default: the run's, as calibrated).
        resolution: ``(height, width)`` pixels to sample at (default: the run's); the model must take it.
        negative_prompt: one negative prompt for every held-out sample (default: the prompt file's, or none).

    Raises:
        ArtifactError: no complete run at ``artifact``.
        ValueError: a step count the run did not plan, a model other than the run's, bad sizes or prompts.
    """
    from olss_dist.models import load_model
    from olss_dist.prompts import read_prompts

    progress = progress or (lambda message: None)
    if num_samples < 1:
        raise SpecError("num_samples", f"must be at least 1, got {num_samples}")
    if uniform_fit_samples < 0:
        raise SpecError("uniform_fit_samples", f"must be at least 0, got {uniform_fit_samples}")
    if builtins is not None:
        check_builtins(builtins)
    run = load_calibrated_run(artifact, storage_options)
    steps = list(steps) if steps else run.planned_steps
    unplanned = [k for k in steps if k not in run.plans]
    if unplanned:
        raise SpecError("steps", f"the run has no plan for {unplanned} steps; it planned {run.planned_steps}")
    config = run.manifest.get("config", {})
    # The pixels the run was calibrated at (stated in its config, else recorded by the job): the latent
    # shape and a Flux-like model's mu follow them.
    calibrated = {"guidance_scale": float(config.get("guidance_scale", CalibrationSpec.guidance_scale)),
                  "resolution": config.get("resolution") or run.manifest.get("resolution")}
    resolution = calibrated["resolution"] if resolution is None else list(resolution)
    guidance_scale = calibrated["guidance_scale"] if guidance_scale is None else float(guidance_scale)
    model = load_model(model_spec, guidance_scale=guidance_scale, device=device,
                       **({} if resolution is None else {"resolution": tuple(int(v) for v in resolution)}),
                       **({} if lora is None else {"lora": lora, "storage_options": storage_options}))
    if model.digest != run.manifest["model"]["digest"]:
        raise ValueError(
            f"the run was calibrated for {run.manifest['model']['id']} (digest {run.manifest['model']['digest'][:12]}), "
            f"but model {model_spec} is {model.model_id} (digest {model.digest[:12]})"
            + (f"; the run names lora {config['lora']!r} (pass --lora)" if config.get("lora") and lora is None else "")
        )
    process = model.noise_process
    flow = process.kind == "flow"
    builtins = family_builtins(process.kind) if builtins is None else tuple(builtins)
    check_builtins(builtins, family=process.kind)
    if flow:  # the process's own teacher; the run's calibration (if any) was made on it
        fit_teacher = process.teacher_schedule(
            run.calibration.num_teacher_steps if run.calibration is not None else int(run.manifest["teacher_steps"]))
        if run.calibration is not None and not np.array_equal(fit_teacher.stored_timesteps(), run.calibration.timesteps):
            raise ValueError("the run's calibration timesteps are not this model's flow teacher (another shift or mu?)")
        reference_teacher = fit_teacher if teacher_steps is None else process.teacher_schedule(teacher_steps)
        fit_timesteps = fit_teacher.stored_timesteps()
        reference_timesteps = reference_teacher.stored_timesteps()
    else:
        fit_timesteps = run.calibration.timesteps if run.calibration is not None else trailing_timesteps(
            int(run.manifest["teacher_steps"]), model.num_train_timesteps)
        reference_timesteps = fit_timesteps if teacher_steps is None else trailing_timesteps(teacher_steps, model.num_train_timesteps)
        fit_teacher = ddim_schedule(fit_timesteps, model.alphas_cumprod, process.output_type)  # v at zero SNR
        reference_teacher = ddim_schedule(reference_timesteps, model.alphas_cumprod, process.output_type)
    for k in steps:
        check_num_steps(len(fit_timesteps), k)

    records = read_prompts(prompts, storage_options=storage_options) if prompts else None
    known_seeds = calibration_seeds(run, model, storage_options)
    prompt_texts = [r.prompt for r in records] if records else model.default_prompts()
    negatives = [r.negative_prompt for r in records] if records else None
    if negative_prompt is not None:
        negatives = [negative_prompt] * len(prompt_texts)
    samples = evaluation_set(model, num_samples, prompt_texts, negatives, seed_offset, known_seeds or ())
    progress(f"teacher: {len(reference_timesteps)} {'Euler' if flow else 'DDIM'} steps on {num_samples} held-out samples")
    teacher_final = teacher_states(model, samples.x_T, samples.cond, reference_teacher, None,
                                   [len(reference_timesteps)], batch_size)[:, 0]

    own_config = dict(model.scheduler_config) if flow else None
    if not flow and process.output_type != "epsilon":  # zero terminal SNR: refits combine v on the exact schedule
        own_config = {**exact_vp_config(model.alphas_cumprod), "prediction_type": process.output_type}
    samplers = [shipped_sampler(run, flow, process.output_type)]
    if run.calibration is not None:
        n = run.calibration.num_teacher_steps
        samplers.append(olss_sampler("olss-paper", "same nodes", paper_plans(
            run.calibration, {k: run.plans[k].nodes for k in steps}, "shipped nodes"), model.num_train_timesteps, own_config, model.mu))
        samplers.append(olss_sampler("olss-paper", "uniform", paper_plans(
            run.calibration, {k: even_nodes(n, k) for k in steps}, "uniform"), model.num_train_timesteps, own_config, model.mu))
    if uniform_fit_samples:
        fit_samples = evaluation_set(model, uniform_fit_samples, samples.prompts, samples.negative_prompts,
                                     seed_offset, [*(known_seeds or ()), *samples.seeds])
        progress(f"on-policy fit on uniform nodes: {uniform_fit_samples} fresh samples")
        samplers.append(olss_sampler("olss-onpolicy", "uniform", fit_uniform_on_policy(
            model, fit_samples, fit_teacher, steps, batch_size), model.num_train_timesteps, own_config, model.mu))
    samplers += builtin_samplers(model.scheduler_config, builtins)

    grid = grid_indices(num_samples, GRID_SAMPLES)
    results, kept = evaluate(model, samplers, steps, samples, teacher_final, batch_size, grid, progress)
    info = {
        "model": {"spec": model_spec, "id": model.model_id, "digest": model.digest, "guidance_scale": model.guidance_scale,
                  "resolution": None if model.resolution is None else list(model.resolution)},
        "artifact": {"uri": run.uri, "run_id": run.manifest.get("run_id"), "shipped": {
            k: {"fit": p.fit, "spacing": p.spacing, "nodes": p.nodes, **({"choice": p.choice} if p.choice else {})}
            for k, p in run.plans.items() if k in steps}},
        "conditions": {"guidance_scale": guidance_scale, "resolution": resolution,
                       "negative_prompt": negative_prompt if negative_prompt is not None else (
                           "from the prompt file" if negatives and any(negatives) else "")},
        "calibrated_conditions": run.manifest.get("calibrated_conditions") or {
            "guidance_scales": [calibrated["guidance_scale"]],
            "resolutions": None if calibrated["resolution"] is None else [list(calibrated["resolution"])]},
        "teacher_steps": len(reference_timesteps),
        "calibration_teacher_steps": len(fit_timesteps),
        "num_samples": num_samples,
        "seed_offset": seed_offset,
        "seeds": samples.seeds,
        "calibration_seeds_excluded": known_seeds is not None,
        "prompts": prompts or "model default prompts",
        "uniform_fit_samples": uniform_fit_samples,
        "teacher_peak_to_peak": latent_peak_to_peak(teacher_final),
        "metric": "RMSE per latent element of the final latent against the teacher's; PSNR on latents "
                  "relative to the teacher's peak-to-peak range",
    }
    return Evaluation(results, info, decoded_grids(model, teacher_final[grid], kept, len(reference_timesteps)))


def grid_indices(num_samples: int, count: int) -> list[int]:
    """``count`` sample indices spread evenly over the set (prompts cycle, so they show different prompts)."""
    return sorted({i * num_samples // count for i in range(count)})


def decoded_grids(model, teacher_latents: torch.Tensor, kept: dict[int, dict[str, torch.Tensor]], teacher_steps: int):
    """``{K: {row label: (n, H, W, 3) uint8}}`` with the teacher's row first; ``{}`` for models without a decoder."""
    teacher_images = model.decode(teacher_latents)
    if teacher_images is None:
        return {}
    teacher_row = {f"teacher ({teacher_steps} steps)": teacher_images}
    return {k: {**teacher_row, **{label: model.decode(latents) for label, latents in rows.items()}} for k, rows in kept.items()}


