"""GPU figures: the calibration shard path (fp16 UNet teacher, recording, on-device float64 QR) against a bare UNet
loop, the QR's time and the peak GPU memory per shard size, and the wall time of 1024 prompts x 1000 steps on 8 GPUs.

For a random-weight SD 1.5-size UNet (860 M parameters, 4x64x64 latents, 768-wide text) and an SDXL-size one
(2.6 G, 4x128x128, 2048-wide text with pooled embeddings and size ids), in fp16 on CUDA:

1. ``bare`` vs ``calibrate`` at the same batch and N (``--teacher-steps``): ``bare`` is N guided calls of the
   project's adapter (``StableDiffusionModel`` / ``StableDiffusionXLModel``: one UNet call on ``[x; x]``, CFG)
   with the teacher's update, nothing kept; ``calibrate`` is what a worker's ``compute_shard`` runs:
   ``core.teacher.schedule_trajectories`` (every state and output recorded on the GPU, each output checked
   finite) then ``Calibration.from_trajectories`` (``core.tsqr``: float64 QR on the GPU). Ratio bare / calibrate,
   target >= 0.95. The bare loop's final latents must equal the teacher's (``check``).
2. The QR alone at N = 1000 (2001 columns) on trajectories of each shard size, and the peak GPU memory of a
   shard: measured at ``--teacher-steps`` and, for the QR, at N = 1000 with the trajectories resident.
3. Extrapolated wall time of the teacher pass for 1024 prompts x 1000 guided steps on 8 such GPUs: per GPU
   ceil(128 / B) shards of (teacher step time x 1000 + QR time at N = 1000); without planning and on-policy
   rounds, which come after (docs/distributed.md).

Text encoders are replaced by random embeddings (the adapters' ``text_embeddings`` / ``encode_texts``), so
nothing is downloaded; the rest of each adapter is the real one. Needs torch, diffusers, numpy, scipy and
safetensors (no Ray, no transformers, no network). On a GPU machine with torch (and transformers) but no
diffusers, install diffusers from a carried wheel directory first:

    pip install --no-deps wheels/diffusers-*.whl      # its own dependencies come with torch / transformers
    PYTHONPATH=. python benchmarks/bench_gpu.py --json gpu.json        # sized for < 5 min on one H100 (untimed)
    PYTHONPATH=. python benchmarks/bench_gpu.py --dry-run             # tiny UNets on the CPU (tests do this)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from olss_dist.core.calibration import Calibration
from olss_dist.core.tsqr import trajectory_r_factor
from olss_dist.core.teacher import schedule_trajectories
from olss_dist.models.sdxl import StableDiffusionXLModel
from olss_dist.models.stable_diffusion import StableDiffusionModel

TARGET_PROMPTS, TARGET_STEPS, TARGET_GPUS = 1024, 1000, 8
SCHEDULER = {  # SD 1.5's and SDXL base's noise schedule (scaled linear betas, epsilon)
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1, "set_alpha_to_one": False,
}  # fmt: skip


@dataclass(frozen=True)
class UNetSize:
    """One benchmarked UNet: its diffusers config, text width, pooled width (SDXL) and pixel resolution."""

    name: str
    config: dict[str, Any]
    text_width: int
    pooled_width: int | None  # SDXL's pooled CLIP-G width; None for SD 1.5
    resolution: int
    batch: int  # prompts per shard of the throughput comparison
    shard_sizes: tuple[int, ...]  # shard sizes of the QR and memory rows


SD15 = UNetSize("SD 1.5 UNet", dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8), 768, None, 512, 8, (4, 8, 16))  # fmt: skip
SDXL = UNetSize("SDXL UNet", dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    2048, 1280, 1024, 4, (2, 4, 8))  # fmt: skip
TINY_SD = UNetSize("tiny SD UNet (dry run)", dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8), 16, None, 64, 2, (1, 2))  # fmt: skip
TINY_SDXL = UNetSize("tiny SDXL UNet (dry run)", dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1), attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 16), 32, 16, 64, 2, (1, 2))  # fmt: skip


def random_embeddings(texts: list[str], width: int, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(len(texts), length, width)`` standard normal embeddings, the same for the same text."""
    rows = [torch.randn(length, width, generator=torch.Generator().manual_seed(zlib.crc32(text.encode()))) for text in texts]
    return torch.stack(rows).to(device, dtype)


class RandomTextSD(StableDiffusionModel):
    """The SD adapter with random text embeddings in place of its CLIP encoder (77 tokens)."""

    def text_embeddings(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        return random_embeddings(texts, self.unet.config.cross_attention_dim, 77, self.device, self.dtype)


class RandomTextSDXL(StableDiffusionXLModel):
    """The SDXL adapter with random prompt and pooled embeddings in place of its two CLIP encoders."""

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.unet.config.cross_attention_dim
        pooled_width = self.pipeline.text_encoder_2.config.projection_dim
        both = random_embeddings(texts, width + pooled_width, 77, self.device, self.dtype)
        return both[..., :width], both[:, 0, width:]


def size_ids(original, crops, target, dtype, text_encoder_projection_dim=None) -> torch.Tensor:
    """``StableDiffusionXLPipeline._get_add_time_ids``: the six size / crop ids of one sample, ``(1, 6)``."""
    return torch.tensor([list(original) + list(crops) + list(target)], dtype=dtype)


def build_model(size: UNetSize, device: torch.device, dtype: torch.dtype, guidance_scale: float, folder: Path):
    """The project's adapter around a random-weight UNet of ``size``, created on ``device`` in ``dtype``."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    torch.manual_seed(0)
    with torch.device(device):  # parameters initialised where they run: seconds, not minutes, for 2.6 G of them
        unet = UNet2DConditionModel(**size.config)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(fp16) warns that no module asks to stay in fp32 (none does)
    try:
        unet = unet.to(dtype).eval().requires_grad_(False)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    identity = dict(model_id=f"random {size.name}", digest="random", guidance_scale=guidance_scale)
    if size.pooled_width is None:
        return RandomTextSD(folder, unet, None, None, SCHEDULER, **identity)
    pipeline = SimpleNamespace(  # what the SDXL adapter reads from its pipeline besides the text encoders
        unet=unet, text_encoder=None, tokenizer=None, config={"force_zeros_for_empty_prompt": True},
        text_encoder_2=SimpleNamespace(config=SimpleNamespace(projection_dim=size.pooled_width)),
        _get_add_time_ids=size_ids,
    )
    return RandomTextSDXL(folder, pipeline, SCHEDULER, size.resolution, **identity)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function: Callable[[], Any]) -> tuple[Any, float, int]:
    """``(result, seconds, peak bytes allocated on the GPU during the call; 0 on the CPU)``."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    seconds = time.perf_counter() - start
    return result, seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def shard_inputs(model, batch: int) -> tuple[torch.Tensor, Any]:
    """What ``CalibrationWorker.inputs`` gives for a shard of ``batch`` prompts: noise on the device, conditioning."""
    prompts = [f"a photograph of object {i}, studio light" for i in range(batch)]
    return model.initial_noise(range(batch)).to(model.device), model.encode_prompts(prompts)


def bare_loop(model, x_T: torch.Tensor, cond: Any, schedule) -> torch.Tensor:
    """N guided adapter calls with the teacher's update; nothing recorded or checked. The final latents."""
    x = x_T
    with torch.inference_mode():
        for n in range(schedule.num_steps):
            output = model(x, schedule.model_timestep(n), cond)
            x = float(schedule.state_coefficients[n]) * x + float(schedule.output_coefficients[n]) * output.to(x.dtype)
    return x


def calibrate_shard(model, x_T: torch.Tensor, cond: Any, schedule) -> tuple[Calibration, torch.Tensor]:
    """``CalibrationWorker.compute_shard`` without Ray: record the teacher, reduce to R on the device."""
    with torch.inference_mode():
        states, outputs = schedule_trajectories(model, x_T, cond, schedule)
    return Calibration.from_trajectories(states, outputs, schedule.stored_timesteps()), states[:, -1]


def qr_at(steps: int, batch: int, latent_shape: tuple[int, ...], device: torch.device) -> tuple[float, int]:
    """``(seconds, peak bytes)`` of ``trajectory_r_factor`` on float32 trajectories of ``batch`` samples at N = ``steps``
    (the shape and dtype ``schedule_trajectories`` records; values random), the trajectories resident."""
    generator = torch.Generator(device).manual_seed(0)
    states = torch.randn((batch, steps + 1, *latent_shape), device=device, generator=generator)
    outputs = torch.randn((batch, steps, *latent_shape), device=device, generator=generator)
    trajectory_r_factor(states[:1, :2], outputs[:1, :1])  # cuSOLVER / LAPACK initialised outside the timing
    _, seconds, peak = timed(device, lambda: trajectory_r_factor(states, outputs))
    del states, outputs
    return seconds, peak


def best_of(repeats: int, device: torch.device, function: Callable[[], Any]) -> tuple[Any, float, int]:
    """One warm-up call, then the fastest of ``repeats`` (result, seconds, peak bytes of that call)."""
    function()
    runs = [timed(device, function) for _ in range(repeats)]
    return min(runs, key=lambda run: run[1])


def bench_size(size: UNetSize, device: torch.device, dtype: torch.dtype, args, scratch: Path) -> dict[str, Any]:
    model = build_model(size, device, dtype, args.guidance_scale, scratch)
    schedule = model.noise_process.teacher_schedule(args.teacher_steps)
    elements = math.prod(model.latent_shape)
    x_T, cond = shard_inputs(model, size.batch)
    final_bare, bare_s, bare_peak = best_of(args.repeats, device, lambda: bare_loop(model, x_T, cond, schedule))
    (calibration, final_teacher), calibrate_s, calibrate_peak = best_of(
        args.repeats, device, lambda: calibrate_shard(model, x_T, cond, schedule)
    )
    qr_bench_s, _ = qr_at(args.teacher_steps, size.batch, model.latent_shape, device)
    row: dict[str, Any] = {
        "model": size.name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.unet.parameters()), "latent_shape": list(model.latent_shape),
        "batch": size.batch, "teacher_steps": args.teacher_steps,
        "bare_samples_per_s": size.batch / bare_s, "calibrate_samples_per_s": size.batch / calibrate_s,
        "ratio": bare_s / calibrate_s, "bare_peak_bytes": bare_peak, "calibrate_peak_bytes": calibrate_peak,
        "qr_seconds_at_bench_steps": qr_bench_s,
        "r_shape": list(calibration.r_factor.shape),
        "check_final_latents_max_abs_diff": float((final_bare.float() - final_teacher.float()).abs().max()),
    }  # fmt: skip
    # Per shard size: QR time and peak memory at the target N (2N+1 columns), trajectories resident.
    trajectory_bytes = lambda batch, steps: batch * (2 * steps + 1) * elements * 4  # noqa: E731 (float32 states/outputs)
    row["shards"] = []
    for batch in size.shard_sizes:
        qr_s, qr_peak = qr_at(args.target_steps, batch, model.latent_shape, device)
        resident = calibrate_peak - trajectory_bytes(size.batch, args.teacher_steps)  # weights and activations
        teacher_peak = resident + trajectory_bytes(batch, args.target_steps)
        row["shards"].append({
            "batch": batch, "qr_seconds": qr_s, "qr_peak_bytes": qr_peak,
            "trajectory_bytes": trajectory_bytes(batch, args.target_steps),
            "estimated_shard_peak_bytes": max(qr_peak, teacher_peak) if device.type == "cuda" else 0,
        })  # fmt: skip
    row["extrapolation"] = extrapolate(row, bare_s, calibrate_s, qr_bench_s, args)
    del model, x_T, cond
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def extrapolate(row: dict[str, Any], bare_s: float, calibrate_s: float, qr_bench_s: float, args) -> dict[str, Any]:
    """Teacher pass of ``TARGET_PROMPTS`` x ``target_steps`` on ``TARGET_GPUS`` GPUs from the measured shard."""
    batch = row["batch"]
    step_s = max(calibrate_s - qr_bench_s, 0.0) / args.teacher_steps  # teacher + recording, per step of a shard
    qr_s = next((s["qr_seconds"] for s in row["shards"] if s["batch"] == batch), None)
    if qr_s is None:
        qr_s = row["shards"][-1]["qr_seconds"] * batch / row["shards"][-1]["batch"]  # QR time grows with the rows
    shards_per_gpu = math.ceil(TARGET_PROMPTS / TARGET_GPUS / batch)
    shard_s = step_s * args.target_steps + qr_s
    bare_shard_s = bare_s / args.teacher_steps * args.target_steps
    return {
        "prompts": TARGET_PROMPTS, "steps": args.target_steps, "gpus": TARGET_GPUS, "shard_batch": batch,
        "shards_per_gpu": shards_per_gpu, "shard_seconds": shard_s, "wall_seconds": shards_per_gpu * shard_s,
        "bare_wall_seconds": shards_per_gpu * bare_shard_s, "ratio_at_target_steps": bare_shard_s / shard_s,
    }  # fmt: skip


def report(rows: list[dict[str, Any]]) -> str:
    gib = 2**30
    lines = []
    for row in rows:
        e = row["extrapolation"]
        lines.append(
            f"{row['model']} ({row['parameters'] / 1e6:.0f} M, {row['dtype']}, {row['device']}), batch {row['batch']}, "
            f"N={row['teacher_steps']}: bare {row['bare_samples_per_s']:.3f} samples/s, calibrate "
            f"{row['calibrate_samples_per_s']:.3f} samples/s, ratio {row['ratio']:.3f} (target >= 0.95); peak "
            f"{row['calibrate_peak_bytes'] / gib:.2f} GiB (bare {row['bare_peak_bytes'] / gib:.2f}); final latents "
            f"differ by {row['check_final_latents_max_abs_diff']:.1e}"
        )
        for shard in row["shards"]:
            lines.append(
                f"    shard of {shard['batch']:>2}: QR at N={e['steps']} {shard['qr_seconds']:.3f} s, peak "
                f"{shard['qr_peak_bytes'] / gib:.2f} GiB (trajectories {shard['trajectory_bytes'] / gib:.2f} GiB), "
                f"shard peak at N={e['steps']} ~{shard['estimated_shard_peak_bytes'] / gib:.2f} GiB"
            )
        lines.append(
            f"    {e['prompts']} prompts x {e['steps']} steps on {e['gpus']} GPUs: {e['shards_per_gpu']} shards of "
            f"{e['shard_batch']} per GPU, {e['shard_seconds']:.1f} s each -> {e['wall_seconds'] / 60:.1f} min "
            f"(bare loop {e['bare_wall_seconds'] / 60:.1f} min, ratio {e['ratio_at_target_steps']:.3f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny UNets in fp32 on the CPU, N=4 (seconds)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="N of the measured shards (default 50; dry run 4)")
    parser.add_argument("--target-steps", type=int, default=None, help="N of the QR rows and the extrapolation (default 1000)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up; the fastest counts")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, dtype, sizes = torch.device("cpu"), torch.float32, {"sd15": TINY_SD, "sdxl": TINY_SDXL}
        args.teacher_steps = args.teacher_steps or 4
        args.target_steps = args.target_steps or 10
        args.repeats = 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or pass --dry-run for the tiny CPU version")
        device, dtype, sizes = torch.device("cuda"), torch.float16, {"sd15": SD15, "sdxl": SDXL}
        args.teacher_steps = args.teacher_steps or 50
        args.target_steps = args.target_steps or TARGET_STEPS
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(names) - set(sizes))
    if unknown or not names:
        parser.error(f"--models takes sd15 and/or sdxl, got {args.models!r}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_gpu on {where}: N={args.teacher_steps} measured, N={args.target_steps} for the QR and extrapolation",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="olss-bench-gpu-") as scratch:
        for name in names:
            rows.append(bench_size(sizes[name], device, dtype, args, Path(scratch)))
            rows[-1]["device_name"] = where
            print(report(rows[-1:]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
