"""What a calibration is, and how it runs: ``CalibrationSpec`` and ``ExecutionConfig``.

Every entry point (``jobs/calibrate.py``, ``olss-dist calibrate``, ``olss-dist refit``, ``olss-dist
evaluate``, ``run_job``) builds from these two, so each default lives here once (in the dataclass
fields) and every value is checked here before any work starts. This module imports neither Ray nor
torch: refits compute a calibration's identity without loading either.

- ``CalibrationSpec``: what changes the published plans (model, prompts, steps, teacher, guidance,
  validation split, seed). Its ``identity`` and ``digest`` name a calibration in the registry.
- ``ExecutionConfig``: where and how it runs (output store, device, workers, shards, state keeping,
  restarts); nothing here changes a result.

Errors are ``SpecError`` (a ``ValueError``) naming the *argument* (``teacher_steps``), never a
command-line flag; ``olss_dist.cli`` maps arguments to flags (``flag_name``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

DEVICES = ("auto", "cuda", "cpu")
KEEP_STATES = ("disk", "memory")


class SpecError(ValueError):
    """A calibration or execution argument that cannot run.

    Attributes:
        argument: the field name (``"teacher_steps"``); ``str(error)`` starts with it.
    """

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.detail = message


def flag_name(argument: str) -> str:
    """The command-line flag of a spec field: ``teacher_steps`` -> ``--teacher-steps``."""
    return "--" + argument.replace("_", "-")


def parse_steps(value: Any, argument: str = "steps") -> tuple[int, ...]:
    """Step counts from ``"5,10,20"`` or ``[5, 10, 20]``: distinct positive integers, at least one.

    The one parser of step lists (job, CLI, refit registries, evaluate); ``SpecError`` naming
    ``argument`` otherwise.
    """
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if not all(part.lstrip("+").isdigit() for part in parts):
            raise SpecError(argument, f"expected comma-separated positive integers like 5,10,20, got {value!r}")
        steps = tuple(int(part) for part in parts)
    elif isinstance(value, (list, tuple)) and all(isinstance(k, int) and not isinstance(k, bool) for k in value):
        steps = tuple(value)
    else:
        raise SpecError(argument, f"expected a list of integers or a string like 5,10,20, got {value!r}")
    if not steps:
        raise SpecError(argument, "needs at least one step count")
    if any(k < 1 for k in steps):
        raise SpecError(argument, f"step counts must be positive, got {list(steps)}")
    if len(set(steps)) != len(steps):
        raise SpecError(argument, f"has repeated step counts: {list(steps)}")
    return steps


def parse_strengths(value: Any, argument: str = "img2img_strengths") -> tuple[float, ...]:
    """img2img strengths from ``"0.3,0.5,0.75"`` or a list of numbers: distinct, each in (0, 1]; ``""`` or
    ``"none"`` (or an empty list) for none. ``SpecError`` naming ``argument`` otherwise."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")] if value.strip().lower() not in ("", "none") else []
        try:
            strengths = tuple(float(part) for part in parts)
        except ValueError:
            raise SpecError(argument, f"expected comma-separated numbers like 0.3,0.5,0.75, got {value!r}") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        strengths = tuple(float(v) for v in value)
    else:
        raise SpecError(argument, f"expected a list of numbers or a string like 0.3,0.5,0.75, got {value!r}")
    if any(not (math.isfinite(v) and 0.0 < v <= 1.0) for v in strengths):
        raise SpecError(argument, f"strengths must be in (0, 1], got {list(strengths)}")
    if len(set(strengths)) != len(strengths):
        raise SpecError(argument, f"has repeated strengths: {list(strengths)}")
    return strengths


def format_strengths(strengths: Sequence[float]) -> str:
    """The command-line form of ``parse_strengths``' result: ``"0.3,0.5,0.75"``, ``"none"`` for none."""
    return ",".join(repr(float(v)) for v in strengths) or "none"


def parse_resolution(value: Any, argument: str = "resolution") -> tuple[int, int] | None:
    """``(height, width)`` pixels from ``"1024"``, ``"768x1344"``, an int or a pair; ``None`` stays ``None``
    (the model's own resolution). Positive integers only; whether the model takes it, its adapter says."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        if len(parts) not in (1, 2) or not all(part.isdigit() for part in parts):
            raise SpecError(argument, f"expected pixels like 1024 or 768x1344 (height x width), got {value!r}")
        value = tuple(int(part) for part in parts)
    elif isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or len(value) not in (1, 2):
        raise SpecError(argument, f"expected an int or a (height, width) pair, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise SpecError(argument, f"must be positive integers, got {value!r}")
    return (value[0], value[-1])


def _check_int(value: Any, argument: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(argument, f"must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(argument, f"must be at least {minimum}, got {value}")


def _check_finite(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(argument, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SpecError(argument, f"must be a finite number, got {value!r}")
    return float(value)


def _check_choice(value: Any, argument: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise SpecError(argument, f"must be one of {', '.join(choices)}, got {value!r}")


def _check_text(value: Any, argument: str, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise SpecError(argument, f"must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class CalibrationSpec:
    """What a calibration computes; two runs with equal specs (and equal model weights) publish the same plans.

    Attributes:
        model: model spec: ``"embedded"`` (the committed digits model), ``"analytic"`` (a Gaussian-mixture
            test model), a diffusers folder, a hub id or an fsspec URI.
        prompts: Parquet (column ``prompt``; optional ``negative_prompt``, ``seed``) or text file, path or URI;
            ``None`` uses the model's default prompts.
        steps: step counts K to plan, each between 1 and ``teacher_steps`` (default 5, 10, 20); the scheduler
            serves any other count with a built-in solver in OLSS form and a warning. A dense set (e.g.
            ``4,5,6,7,8,9,10,11,12,15,20,25,30,40,50``) costs K model calls per sample per candidate: 2.5x the default's
            candidate calls (benchmarks/bench_default_steps.py), so it is an option, not the default.
        teacher_steps: N, the teacher's step count.
        guidance_scale: classifier-free guidance scale (finite).
        validation_fraction: share of prompts held out of the fit to choose each plan, in (0, 1).
        seed: base seed of every derived per-prompt seed.
        resolution: ``(height, width)`` pixels the model is calibrated (and the plans served) at; ``None``:
            the model's own. Image-size-dependent models (SD3, Flux: the latent shape, Flux's shift) need it
            stated; the artifact records it.
        lora: a diffusers LoRA fused into ``model`` before the teacher (a ``.safetensors`` file or a folder of
            one, path or URI); ``None``: the model alone. Its bytes enter the model digest.
        img2img_strengths: img2img / inpainting strengths to calibrate start plans for (each starts the
            K-step plan at step ``K - int(K * strength)``, as diffusers' pipelines do); ``()``: none.
        screen_samples: fresh samples (fit prompts, new seeds) of the tail screen that a fitted plan must not
            lose to the best built-in on (``olss_dist.method.screen``); 0: none; ``None``: the model's multiple of
            the fit prompts (``screen_count``; ``DiffusionModel.screen_multiple``: 2 for networks, 128 for the
            default job's 64; 64 for the analytic mixtures). Each costs 100 model calls for the reference plus K
            per screened plan, not the teacher's N; 128 sees a 1.8 % tail with 90 % probability, 1024 one of
            0.22 %, 8192 one of 0.03 % (in-process ``calibrate``: at least 1024).
    """

    model: str = "embedded"
    prompts: str | None = None
    steps: tuple[int, ...] = (5, 10, 20)
    teacher_steps: int = 1000
    guidance_scale: float = 7.5
    validation_fraction: float = 0.2
    seed: int = 0
    resolution: tuple[int, int] | None = None
    lora: str | None = None
    img2img_strengths: tuple[float, ...] = (0.3, 0.5, 0.75)
    screen_samples: int | None = None

    def __post_init__(self) -> None:
        _check_text(self.model, "model", optional=False)
        object.__setattr__(self, "resolution", parse_resolution(self.resolution))
        _check_text(self.prompts, "prompts", optional=True)
        object.__setattr__(self, "steps", parse_steps(self.steps))
        _check_int(self.teacher_steps, "teacher_steps", 1)
        for k in self.steps:
            if k > self.teacher_steps:
                raise SpecError("steps", f"{k} must be between 1 and teacher_steps ({self.teacher_steps})")
        object.__setattr__(self, "guidance_scale", _check_finite(self.guidance_scale, "guidance_scale"))
        fraction = _check_finite(self.validation_fraction, "validation_fraction")
        if not 0.0 < fraction < 1.0:
            raise SpecError("validation_fraction", f"must be in (0, 1): held-out prompts choose the plan, got {fraction}")
        object.__setattr__(self, "validation_fraction", fraction)
        _check_int(self.seed, "seed", 0)
        _check_text(self.lora, "lora", optional=True)
        object.__setattr__(self, "img2img_strengths", parse_strengths(self.img2img_strengths))
        if self.screen_samples is not None:
            _check_int(self.screen_samples, "screen_samples", 0)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "CalibrationSpec | None" = None, where: str = "") -> "CalibrationSpec":
        """``base`` (default: the defaults) with ``values`` (e.g. a refit registry entry); unknown keys are refused."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SpecError(unknown[0], f"{where + ': ' if where else ''}unknown setting; allowed: {', '.join(sorted(names))}")
        values = dict(values)
        if "steps" in values:
            values["steps"] = parse_steps(values["steps"])
        if "resolution" in values:
            values["resolution"] = parse_resolution(values["resolution"])
        if "img2img_strengths" in values:
            values["img2img_strengths"] = parse_strengths(values["img2img_strengths"])
        return replace(base or cls(), **values)

    def identity(self, prompts_digest: str | None) -> dict[str, Any]:
        """The run's config in the registry: what its plans mean, not how they were computed.

        ``prompts_digest`` is the digest of the prompt file's records (``None`` with the model's
        default prompts, which the model digest identifies, so no model has to be loaded to know it).
        ``resolution`` is a key only when stated, so a run at the model's own resolution keeps the
        identity it had before the field existed; so is ``lora``, and ``img2img_strengths`` and
        ``screen_samples`` only when stated.
        """
        identity = {
            "model": self.model,
            "prompts": self.prompts,
            "prompts_digest": prompts_digest,
            "steps": list(self.steps),
            "teacher_steps": self.teacher_steps,
            "guidance_scale": self.guidance_scale,
            "validation_fraction": self.validation_fraction,
            "seed": self.seed,
        }
        if self.resolution is not None:
            identity["resolution"] = list(self.resolution)
        if self.lora is not None:
            identity["lora"] = self.lora
        if self.img2img_strengths != CalibrationSpec.img2img_strengths:
            identity["img2img_strengths"] = list(self.img2img_strengths)
        if self.screen_samples is not None:
            identity["screen_samples"] = self.screen_samples
        return identity

    def screen_count(self, num_fit: int, multiple: int) -> int:
        """The tail screen's samples of a job with ``num_fit`` fit prompts: ``screen_samples``, or the model's
        ``multiple`` (``DiffusionModel.screen_multiple``) of ``num_fit``."""
        return int(multiple) * int(num_fit) if self.screen_samples is None else self.screen_samples

    def digest(self, prompts_digest: str | None) -> str:
        """sha256 of ``identity(prompts_digest)``: with the model digest, the name of a calibration."""
        from olss_dist.artifacts.layout import (
            config_digest,  # the registry's one hashing rule
        )

        return config_digest(self.identity(prompts_digest))

    def to_arguments(self) -> list[str]:
        """The command-line form: ``jobs/calibrate.py`` / ``olss-dist calibrate`` arguments that rebuild this spec."""
        arguments = [
            "--model", self.model,
            "--steps", ",".join(map(str, self.steps)),
            "--teacher-steps", str(self.teacher_steps),
            "--guidance-scale", repr(self.guidance_scale),
            "--validation-fraction", repr(self.validation_fraction),
            "--seed", str(self.seed),
        ]  # fmt: skip
        if self.prompts:
            arguments += ["--prompts", self.prompts]
        if self.resolution is not None:
            arguments += ["--resolution", f"{self.resolution[0]}x{self.resolution[1]}"]
        if self.lora is not None:
            arguments += ["--lora", self.lora]
        if self.img2img_strengths != CalibrationSpec.img2img_strengths:
            arguments += ["--img2img-strengths", format_strengths(self.img2img_strengths)]
        if self.screen_samples is not None:
            arguments += ["--screen-samples", str(self.screen_samples)]
        return arguments


@dataclass(frozen=True)
class ExecutionConfig:
    """How and where a calibration runs; nothing here changes its plans.

    Attributes:
        output: registry root (local path or fsspec URI) the run is published under.
        device: ``"cuda"`` (GPU actors, fails without GPUs), ``"cpu"`` or ``"auto"`` (GPUs when the cluster has any).
        num_workers: actors; ``None``: one per GPU, or one per CPU of the cluster for CPU workers (every
            core works during the teacher; the path search runs on the same actors afterwards).
        shard_size: samples per shard (one batch on one worker).
        wait_for_gpus_s: with ``device="cuda"``, seconds to wait for an autoscaler to add GPU nodes.
        keep_states: where workers keep teacher states for the on-policy rounds: ``"disk"`` (node-local
            files, survive worker restarts and job reruns on the node) or ``"memory"``.
        state_dir: node-local directory for ``"disk"`` states (``None``: the node's temp dir).
        address: Ray address; ``None`` uses ``RAY_ADDRESS`` or starts a local Ray.
        local_cpus: logical CPUs of a local Ray (``None``: the machine's).
        max_restarts: restarts of each actor after its process dies.
        keep_checkpoints: keep shard checkpoints after publishing (default: remove them).
        storage_options: fsspec options for the output and prompt locations (never sent to submitted jobs).
        reserve_timeout_s: seconds to wait for the cluster to hold the job's actors (its placement group)
            while other jobs hold them; ``None``: wait until it can.
    """

    output: str = "olss-registry"
    device: str = "auto"
    num_workers: int | None = None
    shard_size: int = 16
    wait_for_gpus_s: float = 0.0
    keep_states: str = "disk"
    state_dir: str | None = None
    address: str | None = None
    local_cpus: int | None = None
    max_restarts: int = 2
    keep_checkpoints: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    reserve_timeout_s: float | None = None

    def __post_init__(self) -> None:
        _check_text(self.output, "output", optional=False)
        _check_choice(self.device, "device", DEVICES)
        if self.num_workers is not None:
            _check_int(self.num_workers, "num_workers", 1)
        _check_int(self.shard_size, "shard_size", 1)
        wait = _check_finite(self.wait_for_gpus_s, "wait_for_gpus_s")
        if wait < 0:
            raise SpecError("wait_for_gpus_s", f"must not be negative, got {wait}")
        _check_choice(self.keep_states, "keep_states", KEEP_STATES)
        if self.local_cpus is not None:
            _check_int(self.local_cpus, "local_cpus", 1)
        _check_int(self.max_restarts, "max_restarts", 0)
        if not isinstance(self.storage_options, dict):
            raise SpecError("storage_options", f"must be a mapping, got {type(self.storage_options).__name__}")
        if self.reserve_timeout_s is not None and not _check_finite(self.reserve_timeout_s, "reserve_timeout_s") >= 0:
            raise SpecError("reserve_timeout_s", f"must not be negative, got {self.reserve_timeout_s}")

    def to_arguments(self) -> list[str]:
        """Command-line form of the fields a submitted job takes (never ``storage_options``: no secrets in job metadata)."""
        arguments = ["--output", self.output, "--device", self.device, "--shard-size", str(self.shard_size)]
        if self.num_workers is not None:
            arguments += ["--num-workers", str(self.num_workers)]
        return arguments


def defaults_of(cls: type) -> dict[str, Any]:
    """Field defaults of a spec dataclass (for help texts and the defaults test)."""
    return {name: value for name, value in asdict(cls()).items()}
