"""On-policy evaluation of OLSS plans against diffusers' built-in solvers.

Every sampler runs the same generic diffusers loop from the same initial noise ``x_T``, with its own
model calls::

    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t, cond), t, x).prev_sample

and its final latent is compared with the N-step DDIM teacher's final latent from the same ``x_T``.

Samplers:

- ``olss (shipped)``: the artifact's ``scheduler_config.json`` as users load it (``OLSSScheduler``).
- ``olss-paper (same nodes)`` / ``olss-paper (uniform)``: the paper's teacher-forced fit from the
  artifact's calibration statistics, on the shipped nodes and on evenly spaced nodes.
- ``olss-onpolicy (uniform)``: the on-policy fit on evenly spaced nodes, refitted here on fresh fit samples
  (the artifact keeps no teacher states) when ``uniform_fit_samples > 0``.
- ``ddim``, ``pndm``, ``dpmsolver++`` (2M), ``unipc``, ``euler``, ``deis``, each twice: ``(config)`` built
  with ``from_config(model.scheduler_config)`` as users do, and ``(trailing)`` with ``timestep_spacing=
  "trailing"`` and, where the solver has it, ``set_alpha_to_one=True`` (the last step reaches the clean
  sample, as the teacher's does). Both use ``prediction_type="epsilon"``: model adapters return epsilon.

Held-out samples: seeds come from their own hash domain (``evaluation_seeds``), never from the
calibration's ``derive_seed``, and every calibration seed the artifact lets us reconstruct is excluded.

Metrics (per sample, over latent elements): RMSE against the teacher's final latent, and PSNR on latents,
``20 log10(peak_to_peak / rmse)`` with ``peak_to_peak`` the range of all teacher final latents of the set.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from olss_dist.core.calibration import Calibration
from olss_dist.core.onpolicy import DEFAULT_RIDGE, fit_on_policy_targets
from olss_dist.core.plan import Plan
from olss_dist.core.path_search import check_num_steps, even_nodes
from olss_dist.method.rollouts import batch_slices, error_summary, per_sample_mse, select
from olss_dist.scheduler import OLSSScheduler
from olss_dist.core.teacher import Denoiser, record_states, trailing_timesteps

BUILTIN_SOLVERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
}
"""Built-in diffusers solvers compared, with the settings that name them (everything else from the config)."""

BUILTIN_SPACINGS: dict[str, dict[str, Any]] = {
    "config": {},
    "trailing": {"timestep_spacing": "trailing", "set_alpha_to_one": True},
}
"""Overrides of the model's scheduler config per variant; keys a solver does not take are left out."""

EVALUATION_SEED_DOMAIN = "olss-dist/evaluate"
SEED_MODULUS = 2**32
GRID_SAMPLES = 8


# ----------------------------------------------------------------------------------------------- samplers


@dataclass(frozen=True)
class Sampler:
    """One sampler of the comparison.

    Attributes:
        name: solver family, e.g. ``"olss"``, ``"olss-paper"``, ``"ddim"``.
        variant: how it is configured, e.g. ``"shipped"``, ``"uniform"``, ``"config"``, ``"trailing"``.
        new_scheduler: returns a fresh diffusers scheduler (``set_timesteps`` / ``step`` / ``timesteps``).
    """

    name: str
    variant: str
    new_scheduler: Callable[[], Any]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.variant})"


def builtin_scheduler(name: str, model_scheduler_config: dict[str, Any], spacing: str = "config"):
    """Built-in solver ``name`` from the model's scheduler config, as ``Class.from_config`` gives it to users.

    Args:
        name: a key of ``BUILTIN_SOLVERS``.
        model_scheduler_config: the model's own diffusers scheduler config.
        spacing: a key of ``BUILTIN_SPACINGS``: ``"config"`` (the model's setting) or ``"trailing"``.
    """
    if name not in BUILTIN_SOLVERS:
        raise ValueError(f"unknown built-in solver {name!r}; choose from {sorted(BUILTIN_SOLVERS)}")
    if spacing not in BUILTIN_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose from {sorted(BUILTIN_SPACINGS)}")
    scheduler_class, settings = BUILTIN_SOLVERS[name]
    accepted = inspect.signature(scheduler_class.__init__).parameters
    overrides = {k: v for k, v in BUILTIN_SPACINGS[spacing].items() if k in accepted}
    return scheduler_class.from_config(dict(model_scheduler_config), **settings, **overrides, prediction_type="epsilon")


def builtin_samplers(
    model_scheduler_config: dict[str, Any],
    names: Sequence[str] = tuple(BUILTIN_SOLVERS),
    spacings: Sequence[str] = tuple(BUILTIN_SPACINGS),
) -> list[Sampler]:
    """Every built-in solver in every spacing variant, solver-major."""
    return [
        Sampler(name, spacing, lambda name=name, spacing=spacing: builtin_scheduler(name, model_scheduler_config, spacing))
        for name in names
        for spacing in spacings
    ]


def olss_sampler(name: str, variant: str, plans: Sequence[Plan], num_train_timesteps: int) -> Sampler:
    """An ``OLSSScheduler`` serving ``plans`` (one per step count)."""
    config = OLSSScheduler.from_plans(plans, num_train_timesteps=num_train_timesteps).config
    return Sampler(name, variant, lambda: OLSSScheduler.from_config(config))


# ----------------------------------------------------------------------------------------------- samples


@dataclass
class EvaluationSet:
    """Held-out samples: prompt, seed and initial noise of each, and the model's conditioning.

    Attributes:
        prompts: ``(B,)`` prompts; ``negative_prompts`` the same length (``""``: none).
        seeds: ``(B,)`` seeds of the initial noise.
        x_T: ``(B, *latent_shape)`` initial noise.
        cond: conditioning indexable along B.
    """

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    x_T: torch.Tensor
    cond: Any

    def __len__(self) -> int:
        return len(self.seeds)


def evaluation_seeds(num_samples: int, seed_offset: int = 0, exclude: Sequence[int] = ()) -> list[int]:
    """``num_samples`` seeds in ``[0, 2**32)`` from the evaluation's own hash domain.

    Seed ``j`` hashes ``(EVALUATION_SEED_DOMAIN, seed_offset, j)``; calibration seeds hash a different
    string (``olss_dist.prompts.derive_seed``). Seeds in ``exclude`` (or repeated) are skipped, so the
    result never meets a known calibration seed. Different ``seed_offset`` values give independent sets.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    excluded, seeds, index = set(int(s) for s in exclude), [], 0
    while len(seeds) < num_samples:
        digest = hashlib.sha256(f"{EVALUATION_SEED_DOMAIN}\x00{seed_offset}\x00{index}".encode()).digest()
        seed = int.from_bytes(digest[:8], "big") % SEED_MODULUS
        if seed not in excluded:
            seeds.append(seed)
            excluded.add(seed)
        index += 1
    return seeds


def evaluation_set(
    model,
    num_samples: int,
    prompts: Sequence[str] | None = None,
    negative_prompts: Sequence[str] | None = None,
    seed_offset: int = 0,
    exclude_seeds: Sequence[int] = (),
) -> EvaluationSet:
    """``num_samples`` held-out samples: prompts cycled from ``prompts`` (default: the model's), fresh seeds.

    Args:
        model: a ``DiffusionModel`` (``encode_prompts``, ``initial_noise``, ``default_prompts``).
        negative_prompts: one per prompt in ``prompts`` (cycled with them); ``None``: no negative prompts.
    """
    prompts = list(prompts) if prompts is not None else model.default_prompts()
    if not prompts:
        raise ValueError("no evaluation prompts")
    negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    seeds = evaluation_seeds(num_samples, seed_offset, exclude_seeds)
    chosen = [prompts[i % len(prompts)] for i in range(num_samples)]
    chosen_negatives = [negatives[i % len(prompts)] for i in range(num_samples)]
    cond = model.encode_prompts(chosen, chosen_negatives if any(chosen_negatives) else None)
    return EvaluationSet(chosen, chosen_negatives, seeds, model.initial_noise(seeds), cond)


# ----------------------------------------------------------------------------------------------- running


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

    Returns:
        ``(B, len(keep), *shape)`` in the dtype of ``x_T``: the N-step DDIM teacher's states at ``keep``.
    """
    return torch.cat([
        record_states(denoiser, x_T[rows], select(cond, rows), timesteps, alphas_cumprod, keep)
        for rows in batch_slices(len(x_T), batch_size)
    ])


def model_timestep(t: torch.Tensor | int | float) -> int:
    """A scheduler timestep as the integer train timestep the denoiser protocol takes."""
    value = float(t)
    if not value.is_integer():
        raise ValueError(f"timestep {value} is not an integer train timestep")
    return int(value)


def run_sampler(scheduler, denoiser: Denoiser, x_T: torch.Tensor, cond: Any, num_steps: int) -> tuple[torch.Tensor, int]:
    """The generic diffusers sampling loop; returns the final latent ``(B, *shape)`` and model calls per sample."""
    scheduler.set_timesteps(num_steps)
    x = x_T * scheduler.init_noise_sigma
    calls = 0
    for t in scheduler.timesteps:
        output = denoiser(scheduler.scale_model_input(x, t), model_timestep(t), cond)
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


# ----------------------------------------------------------------------------------------------- results


@dataclass
class SamplerResult:
    """One sampler at one step count.

    Attributes:
        name, variant: the sampler (see ``Sampler``).
        num_steps: the step count asked for (``set_timesteps``).
        model_calls: model calls per sample (PNDM's Runge-Kutta warm-up makes more than ``num_steps``).
        metrics: ``sample_metrics``; empty when the sampler could not run.
        note: why it could not run, or a remark (``"diverged"``); ``""`` otherwise.
        first_timestep: the first timestep the sampler used (``None`` when it could not run).
        per_sample_rmse: ``(B,)`` RMSE of each sample, in the evaluation set's order (empty when it could not run).
    """

    name: str
    variant: str
    num_steps: int
    model_calls: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""
    first_timestep: int | None = None
    per_sample_rmse: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.variant})"

    @property
    def rmse(self) -> float:
        return self.metrics.get("rmse", float("nan"))


@dataclass
class Evaluation:
    """Results of every sampler at every step count, and what they were measured on.

    Attributes:
        results: one per sampler and step count, samplers in the order given.
        info: JSON-able description (model, artifact, teacher, samples, seeds, peak-to-peak range...).
        images: ``{row label: (n, H, W, 3) uint8}`` per step count for the sample grid (image models only).
    """

    results: list[SamplerResult]
    info: dict[str, Any]
    images: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return sorted({r.num_steps for r in self.results})

    def result(self, label: str, num_steps: int) -> SamplerResult:
        for r in self.results:
            if r.label == label and r.num_steps == num_steps:
                return r
        raise KeyError(f"no result for {label} at {num_steps} steps")

    def labels(self) -> list[str]:
        return list(dict.fromkeys(r.label for r in self.results))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; non-finite numbers become ``null``."""
        return {
            "info": self.info,
            "results": [
                {"sampler": r.name, "variant": r.variant, "num_steps": r.num_steps, "model_calls": r.model_calls,
                 "first_timestep": r.first_timestep, "note": r.note,
                 **{k: finite_or_none(v) for k, v in r.metrics.items()},
                 "per_sample_rmse": [finite_or_none(v) for v in r.per_sample_rmse]}
                for r in self.results
            ],
        }


def finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def sample_set(sampler: Sampler, denoiser: Denoiser, samples: EvaluationSet, num_steps: int,
               batch_size: int | None = None) -> tuple[torch.Tensor, int, int]:
    """Final latents ``(B, *shape)`` of ``sampler`` over the whole set, model calls per sample, first timestep."""
    finals = []
    for rows in batch_slices(len(samples), batch_size):
        scheduler = sampler.new_scheduler()
        final, calls = run_sampler(scheduler, denoiser, samples.x_T[rows], select(samples.cond, rows), num_steps)
        finals.append(final)
    return torch.cat(finals), calls, model_timestep(scheduler.timesteps[0])


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


# ----------------------------------------------------------------------------------------------- OLSS variants


@dataclass
class CalibratedRun:
    """A published calibration run, as the evaluation reads it.

    Attributes:
        uri: where it was resolved from.
        directory: its verified local copy.
        manifest: its manifest (model id and digest, config, teacher steps).
        scheduler_config: the shipped ``OLSSScheduler`` config (``scheduler_config.json``).
        plans: ``{K: Plan}`` from ``plans.json`` (nodes, fit, candidates).
        calibration: the teacher statistics (``calibration.safetensors``), ``None`` when the run has none.
    """

    uri: str
    directory: Path
    manifest: dict[str, Any]
    scheduler_config: dict[str, Any]
    plans: dict[int, Plan]
    calibration: Calibration | None

    @property
    def planned_steps(self) -> list[int]:
        return sorted(self.plans)


def load_calibrated_run(uri: str, storage_options: dict[str, Any] | None = None) -> CalibratedRun:
    """Fetch and verify the run behind ``uri`` (run, model or ``latest.json`` URI, or a local run folder).

    Raises:
        ArtifactError: no complete run there, or a file that does not match its manifest.
        ValueError: the run lacks ``scheduler_config.json`` or ``plans.json``, or they disagree.
    """
    from olss_dist.artifacts import fetch_run

    directory = fetch_run(uri, storage_options)
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in ("scheduler_config.json", "plans.json"):
        if not (directory / name).is_file():
            raise ValueError(f"run {uri} has no {name}; it holds {sorted(manifest['files'])}")
    scheduler_config = json.loads((directory / "scheduler_config.json").read_text())
    if scheduler_config.get("_class_name") != OLSSScheduler.__name__:
        raise ValueError(f"run {uri}: scheduler_config.json is not an OLSSScheduler config")
    plans = {}
    for entry in json.loads((directory / "plans.json").read_text()):
        plan = Plan.from_dict(entry)
        plans[plan.num_steps] = plan
    shipped = {int(p["num_steps"]): p["timesteps"] for p in scheduler_config.get("plans", [])}
    for k, plan in plans.items():
        if shipped.get(k) != plan.timesteps.tolist():
            raise ValueError(f"run {uri}: plans.json and scheduler_config.json disagree on the {k}-step timesteps")
    calibration_path = directory / "calibration.safetensors"
    calibration = Calibration.load(calibration_path) if calibration_path.is_file() else None
    return CalibratedRun(uri, directory, manifest, scheduler_config, plans, calibration)


def shipped_sampler(run: CalibratedRun) -> Sampler:
    """The run's ``scheduler_config.json`` loaded as users load it (epsilon outputs, as adapters return)."""
    return Sampler("olss", "shipped", lambda: OLSSScheduler.from_config(run.scheduler_config, prediction_type="epsilon"))


def paper_plans(calibration: Calibration, nodes_by_steps: dict[int, Sequence[int]], spacing: str) -> list[Plan]:
    """The paper's teacher-forced fits (``Calibration.fit``) on the given nodes, one plan per step count."""
    return [calibration.plan_for_nodes(nodes, spacing) for nodes in nodes_by_steps.values()]


def fit_uniform_on_policy(
    model,
    fit_samples: EvaluationSet,
    teacher_timesteps: np.ndarray,
    steps: Sequence[int],
    batch_size: int | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> list[Plan]:
    """On-policy fits on evenly spaced teacher nodes, from fresh fit samples (one teacher run for all K).

    Args:
        model: a ``DiffusionModel``.
        fit_samples: samples to fit on (disjoint from the evaluation set).
        teacher_timesteps: ``(N,)`` the teacher the nodes index into.
        steps: step counts K.

    Returns:
        one Plan per K (``fit="on_policy"``, ``spacing="uniform"``).
    """
    n = len(teacher_timesteps)
    nodes_by_steps = {k: even_nodes(n, k) for k in steps}
    needed = sorted({node for nodes in nodes_by_steps.values() for node in nodes[1:]} | {n})
    states = teacher_states(model, fit_samples.x_T, fit_samples.cond, teacher_timesteps, model.alphas_cumprod, needed, batch_size)
    plans = []
    for k, nodes in nodes_by_steps.items():
        targets = [states[:, needed.index(target)] for target in nodes[1:] + [n]]
        coefficients, step_errors = fit_on_policy_targets(
            teacher_timesteps[nodes], model, fit_samples.x_T, targets, fit_samples.cond, ridge
        )
        plans.append(Plan(nodes, teacher_timesteps[nodes], coefficients, step_errors, np.full(k, np.nan),
                          fit="on_policy", spacing="uniform", num_teacher_steps=n))
    return plans


def calibration_seeds(run: CalibratedRun, model, storage_options: dict[str, Any] | None = None) -> list[int] | None:
    """The seeds the run was calibrated on (fit and validation), or ``None`` when they cannot be rebuilt.

    The job derives them from its prompt source and base seed (``olss_dist.prompts.read_prompts``).
    """
    from olss_dist.prompts import read_prompts

    config = run.manifest.get("config", {})
    if "seed" not in config:
        return None
    try:
        records = read_prompts(config.get("prompts"), default_prompts=model.default_prompts(),
                               base_seed=int(config["seed"]), storage_options=storage_options)
    except (ValueError, NotImplementedError, OSError):
        return None
    return [r.seed for r in records]


def run_evaluation(
    model_spec: str,
    artifact: str,
    steps: Sequence[int] | None = None,
    num_samples: int = 32,
    prompts: str | None = None,
    seed_offset: int = 0,
    teacher_steps: int | None = None,
    uniform_fit_samples: int = 0,
    builtins: Sequence[str] = tuple(BUILTIN_SOLVERS),
    batch_size: int | None = None,
    device: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Evaluate a published run on held-out samples against the built-in solvers (what ``olss-dist evaluate`` runs).

    Args:
        model_spec: ``olss_dist.models.load_model`` spec; must be the model the run was calibrated for.
        artifact: run URI, model URI (its latest run), ``latest.json`` URI or local run folder.
        steps: step counts K (default: every step count the run planned); each must be planned.
        num_samples: held-out samples.
        prompts: prompt file (text or Parquet, path or URI); default: the model's prompts, cycled.
        seed_offset: selects an independent set of evaluation seeds.
        teacher_steps: N of the reference teacher (default: the run's teacher).
        uniform_fit_samples: fresh samples for the on-policy fit on evenly spaced nodes (0: skip that sampler).
        builtins: built-in solvers to compare (keys of ``BUILTIN_SOLVERS``).
        batch_size: samples per model call (None: all at once).
        device: where the model runs (default: the adapter's choice).
        storage_options: fsspec options for the artifact and prompt locations.
        progress: called with a line per stage.

    Raises:
        ArtifactError: no complete run at ``artifact``.
        ValueError: a step count the run did not plan, a model other than the run's, bad sizes or prompts.
    """
    from olss_dist.models import load_model
    from olss_dist.prompts import read_prompts

    progress = progress or (lambda message: None)
    if num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {num_samples}")
    if uniform_fit_samples < 0:
        raise ValueError(f"--uniform-fit-samples must be at least 0, got {uniform_fit_samples}")
    unknown = sorted(set(builtins) - set(BUILTIN_SOLVERS))
    if unknown:
        raise ValueError(f"unknown built-in solvers {unknown}; choose from {sorted(BUILTIN_SOLVERS)}")
    run = load_calibrated_run(artifact, storage_options)
    steps = list(steps) if steps else run.planned_steps
    unplanned = [k for k in steps if k not in run.plans]
    if unplanned:
        raise ValueError(f"the run has no plan for {unplanned} steps; it planned {run.planned_steps} (see --steps)")
    config = run.manifest.get("config", {})
    model = load_model(model_spec, guidance_scale=float(config.get("guidance_scale", 7.5)), device=device)
    if model.digest != run.manifest["model"]["digest"]:
        raise ValueError(
            f"the run was calibrated for {run.manifest['model']['id']} (digest {run.manifest['model']['digest'][:12]}), "
            f"but --model {model_spec} is {model.model_id} (digest {model.digest[:12]})"
        )
    fit_timesteps = run.calibration.timesteps if run.calibration is not None else trailing_timesteps(
        int(run.manifest["teacher_steps"]), model.num_train_timesteps)
    reference_timesteps = fit_timesteps if teacher_steps is None else trailing_timesteps(teacher_steps, model.num_train_timesteps)
    for k in steps:
        check_num_steps(len(fit_timesteps), k)

    records = read_prompts(prompts, storage_options=storage_options) if prompts else None
    known_seeds = calibration_seeds(run, model, storage_options)
    samples = evaluation_set(
        model, num_samples, [r.prompt for r in records] if records else None,
        [r.negative_prompt for r in records] if records else None, seed_offset, known_seeds or (),
    )
    progress(f"teacher: {len(reference_timesteps)} DDIM steps on {num_samples} held-out samples")
    teacher_final = teacher_states(model, samples.x_T, samples.cond, reference_timesteps, model.alphas_cumprod,
                                   [len(reference_timesteps)], batch_size)[:, 0]

    samplers = [shipped_sampler(run)]
    if run.calibration is not None:
        n = run.calibration.num_teacher_steps
        samplers.append(olss_sampler("olss-paper", "same nodes", paper_plans(
            run.calibration, {k: run.plans[k].nodes for k in steps}, "shipped nodes"), model.num_train_timesteps))
        samplers.append(olss_sampler("olss-paper", "uniform", paper_plans(
            run.calibration, {k: even_nodes(n, k) for k in steps}, "uniform"), model.num_train_timesteps))
    if uniform_fit_samples:
        fit_samples = evaluation_set(model, uniform_fit_samples, samples.prompts, samples.negative_prompts,
                                     seed_offset, [*(known_seeds or ()), *samples.seeds])
        progress(f"on-policy fit on uniform nodes: {uniform_fit_samples} fresh samples")
        samplers.append(olss_sampler("olss-onpolicy", "uniform", fit_uniform_on_policy(
            model, fit_samples, fit_timesteps, steps, batch_size), model.num_train_timesteps))
    samplers += builtin_samplers(model.scheduler_config, builtins)

    grid = grid_indices(num_samples, GRID_SAMPLES)
    results, kept = evaluate(model, samplers, steps, samples, teacher_final, batch_size, grid, progress)
    info = {
        "model": {"spec": model_spec, "id": model.model_id, "digest": model.digest, "guidance_scale": model.guidance_scale},
        "artifact": {"uri": run.uri, "run_id": run.manifest.get("run_id"), "shipped": {
            k: {"fit": p.fit, "spacing": p.spacing, "nodes": p.nodes} for k, p in run.plans.items() if k in steps}},
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


# ----------------------------------------------------------------------------------------------- reporting

SHIPPED_LABEL = "olss (shipped)"
DETAIL_HEADER = ("sampler", "calls", "first t", "RMSE", "× shipped", "median", "p90", "worst", "PSNR dB (mean ± std)")


def format_number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return "inf" if math.isinf(value) else f"{value:.3g}"


def detail_rows(evaluation: Evaluation, num_steps: int, psnr_spread: bool = True) -> list[list[str]]:
    """One row per sampler at ``num_steps`` steps (columns ``DETAIL_HEADER``); PSNR as mean ± std, or
    the mean alone without ``psnr_spread``."""
    shipped = next((r for r in evaluation.results if r.label == SHIPPED_LABEL and r.num_steps == num_steps), None)
    rows = []
    for r in (r for r in evaluation.results if r.num_steps == num_steps):
        if not r.metrics:
            rows.append([r.label, "-", "-", r.note, "-", "-", "-", "-", "-"])
            continue
        ratio = r.rmse / shipped.rmse if shipped is not None and shipped.metrics and shipped.rmse > 0 else float("nan")
        psnr = "-"
        if math.isfinite(r.metrics["psnr_mean"]):
            psnr = f"{r.metrics['psnr_mean']:.1f}" + (f" ± {r.metrics['psnr_std']:.1f}" if psnr_spread else "")
        rows.append([
            r.label + (f" [{r.note}]" if r.note else ""), str(r.model_calls), str(r.first_timestep),
            format_number(r.rmse), format_number(ratio), format_number(r.metrics["median"]),
            format_number(r.metrics["p90"]), format_number(r.metrics["worst"]), psnr,
        ])
    return rows


def summary_rows(evaluation: Evaluation) -> tuple[list[str], list[list[str]]]:
    """Header and rows of pooled RMSE per sampler (rows) and step count (columns); calls noted when not K."""
    header = ["sampler", *(f"{k} steps" for k in evaluation.steps)]
    rows = []
    for label in evaluation.labels():
        cells = [label]
        for k in evaluation.steps:
            r = evaluation.result(label, k)
            cell = format_number(r.rmse) if r.metrics else "cannot run"
            cells.append(cell + (f" ({r.model_calls} calls)" if r.model_calls not in (None, k) else ""))
        rows.append(cells)
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(evaluation: Evaluation) -> str:
    """The evaluation as a markdown report: setup, pooled RMSE summary, one detail table per step count."""
    info = evaluation.info
    lines = [
        f"# Evaluation: {info['model']['id']}",
        "",
        f"- artifact: `{info['artifact']['uri']}`",
        f"- reference: {info['teacher_steps']}-step DDIM teacher; {info['num_samples']} held-out samples "
        f"(seed offset {info['seed_offset']}, prompts: {info['prompts']})",
        f"- metric: {info['metric']} ({format_number(info['teacher_peak_to_peak'])}); RMSE pools all samples, "
        "median / p90 / worst are per-sample RMSE",
        "",
        "## RMSE of the final latent (pooled over samples)",
        "",
        markdown_table(*summary_rows(evaluation)),
    ]
    for k in evaluation.steps:
        lines += ["", f"## {k} steps", "", markdown_table(DETAIL_HEADER, detail_rows(evaluation, k))]
    notes = sorted({f"{r.label} at {r.num_steps} steps: {r.note}" for r in evaluation.results if r.note})
    if notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


TERMINAL_DETAIL_HEADER = ("sampler", "calls", "t0", "RMSE", "×ship", "median", "p90", "worst", "PSNR")


def rich_tables(evaluation: Evaluation) -> list:
    """``rich.table.Table`` objects: the summary and one detail table per step count, laid out to stay
    readable in an 80-column terminal: columns separated by single spaces, numbers never cut (a long
    sampler name wraps when numbers need the room)."""
    from rich import box
    from rich.table import Table

    def table(header: Sequence[str], title: str) -> Table:
        compact = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0))
        compact.add_column(header[0])  # the only column that may wrap, so numbers are never cut
        for column in header[1:]:
            compact.add_column(column, justify="right", no_wrap=True)
        return compact

    header, rows = summary_rows(evaluation)
    tables = [table(header, "RMSE of the final latent vs the teacher (pooled)")]
    for row in rows:
        tables[0].add_row(*row)
    for k in evaluation.steps:
        tables.append(table(TERMINAL_DETAIL_HEADER, f"{k} steps (t0: first timestep; ×ship: RMSE over the shipped plan's; PSNR: mean, dB)"))
        for row in detail_rows(evaluation, k, psnr_spread=False):
            tables[-1].add_row(*row)
    return tables


SOLVER_COLORS = {
    "olss": "black", "olss-paper": "tab:gray", "olss-onpolicy": "tab:purple", "ddim": "tab:blue", "pndm": "tab:orange",
    "dpmsolver++": "tab:green", "unipc": "tab:red", "euler": "tab:brown", "deis": "tab:pink",
}
VARIANT_STYLES = {"shipped": "-", "trailing": "-", "config": "--", "same nodes": ":", "uniform": "-."}


def plot_errors(evaluation: Evaluation, path: str | Path) -> Path:
    """PNG of pooled and median per-sample RMSE against model calls per sample (log-log), a line per sampler.

    The y range ends at twice the worst built-in error; samplers above it are labelled "off scale".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {}
    for label in evaluation.labels():
        points = sorted((r.model_calls, r.rmse, r.metrics["median"]) for r in evaluation.results
                        if r.label == label and r.metrics and math.isfinite(r.rmse))
        if points:
            lines[label] = (next(r for r in evaluation.results if r.label == label), points)
    builtin_errors = [p[1] for first, points in lines.values() if first.name in BUILTIN_SOLVERS for p in points]
    top = 2.0 * max(builtin_errors) if builtin_errors else None
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharex=True)
    for label, (first, points) in lines.items():
        off_scale = top is not None and max(p[1] for p in points) > top
        style = dict(color=SOLVER_COLORS.get(first.name), linestyle=VARIANT_STYLES.get(first.variant, "-"),
                     linewidth=3 if label == SHIPPED_LABEL else 1.4, marker="o", markersize=4,
                     label=label + (" (off scale)" if off_scale else ""))
        calls = [p[0] for p in points]
        axes[0].plot(calls, [p[1] for p in points], **style)
        axes[1].plot(calls, [p[2] for p in points], **style)
    ticks = list(evaluation.steps)
    for calls in sorted({r.model_calls for r in evaluation.results if r.model_calls}):
        if all(abs(math.log(calls / tick)) > 0.15 for tick in ticks):  # unreadable when closer
            ticks.append(calls)
    for axis, title in zip(axes, ("pooled RMSE", "median per-sample RMSE")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        if top is not None:
            axis.set_ylim(top=top)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("model calls per sample (= steps, except PNDM)")
        axis.set_ylabel(f"{title} vs teacher")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle(f"{evaluation.info['model']['id']}: {evaluation.info['num_samples']} held-out samples, "
                    f"{evaluation.info['teacher_steps']}-step teacher")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_grid(rows: dict[str, np.ndarray], title: str, path: str | Path) -> Path:
    """PNG grid of decoded samples: one row per sampler (``(n, H, W, 3)`` uint8), samples across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(images) for images in rows.values())
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns + 2.2, 1.3 * len(rows)), squeeze=False)
    for axis_row, (label, images) in zip(axes, rows.items()):
        for axis, image in zip(axis_row, images):
            axis.imshow(image, interpolation="nearest")
        for axis in axis_row:
            axis.set_xticks([])
            axis.set_yticks([])
        axis_row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / len(rows)))
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_outputs(evaluation: Evaluation, directory: str | Path) -> list[Path]:
    """``evaluation.json``, ``evaluation.md``, ``errors.png`` and ``grid_<K>steps.png`` (image models) in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = directory / "evaluation.json", directory / "evaluation.md"
    json_path.write_text(json.dumps(evaluation.to_dict(), indent=1))
    markdown_path.write_text(to_markdown(evaluation))
    paths = [json_path, markdown_path, plot_errors(evaluation, directory / "errors.png")]
    for k, rows in evaluation.images.items():
        paths.append(plot_grid(rows, f"{k} steps", directory / f"grid_{k}steps.png"))
    return paths


def parse_step_counts(text: str | None) -> list[int] | None:
    """``"5,10,20"`` as ``[5, 10, 20]``; ``None`` or blank stays ``None`` (every planned step count)."""
    if text is None or not text.strip():
        return None
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--steps expects comma-separated integers like 5,10,20, got {text!r}") from None
    if len(set(steps)) != len(steps) or any(k < 1 for k in steps):
        raise ValueError(f"--steps must be distinct positive integers, got {text!r}")
    return steps


def evaluate_and_report(output: str | Path, console=None, **options: Any) -> Evaluation:
    """``run_evaluation(**options)``, then the tables on ``console`` and every output file in ``output``."""
    from rich.console import Console

    console = console or Console()
    progress_console = Console(stderr=True)
    evaluation = run_evaluation(**options, progress=lambda line: progress_console.print(line, highlight=False))
    for table in rich_tables(evaluation):
        console.print(table)
    for path in write_outputs(evaluation, output):
        console.print(f"wrote {path}", highlight=False)
    return evaluation
