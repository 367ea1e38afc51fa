"""Calibration throughput: the worker's shard path against a bare denoiser loop, and scaling with workers.

1. Overhead (one process, same model, same batch, same N): samples/s of
   - ``bare``: N model calls with the DDIM update, nothing recorded;
   - ``calibrate``: what a worker does per shard (``CalibrationWorker.compute_shard``): the teacher with
     every state and output recorded, the float64 R factor of the shard, the states kept for the
     on-policy rounds (``--keep-states``);
   and their ratio (target >= 0.95: recording and QR hidden behind the model). Models: the analytic
   mixture, and a randomly initialised diffusers UNet (``UNet2DConditionModel`` with a CLIP text
   encoder, batched CFG) of latent ``4 x --unet-size x --unet-size``, saved as a diffusers folder and
   loaded through ``load_model``; on CUDA when available (fp16), else CPU.
2. Scaling (local Ray, logical workers): samples/s of ``run_shards`` with 1, 2, 4 workers on the same
   shards, and the speed-up over one worker. On a machine with fewer cores than workers, the
   speed-up is bounded by the cores.

    python benchmarks/bench_throughput.py --teacher-steps 100 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import string
import tempfile
import time
from pathlib import Path

import torch

from olss_dist.distributed.worker import CalibrationWorker, ModelSpec
from olss_dist.prompts import make_shards, records_from_prompts
from olss_dist.core.teacher import ddim_coefficients, teacher_alphas


def random_sd_folder(folder: Path, latent_size: int) -> Path:
    """A Stable Diffusion folder with random weights (UNet 4 x size x size, 2-layer CLIP, char tokenizer)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    symbols = list(string.ascii_lowercase + string.digits)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    (folder / "vocab").mkdir(parents=True, exist_ok=True)
    (folder / "vocab" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "vocab" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab" / "vocab.json"), str(folder / "vocab" / "merges.txt"), model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, projection_dim=64,
    ))
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4, sample_size=latent_size * 2,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder / "model")
    return folder / "model"


def bare_loop_seconds(model, shard, timesteps) -> float:
    """Seconds of N guided model calls with the DDIM update, nothing kept."""
    cond = model.encode_prompts(shard.prompts, shard.negative_prompts)
    x = model.initial_noise(shard.seeds).to(model.device)
    alphas = teacher_alphas(timesteps, model.alphas_cumprod)
    synchronize(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        for n, t in enumerate(timesteps.tolist()):
            a, b = ddim_coefficients(alphas[n], alphas[n + 1])
            x = a * x + b * model(x, t, cond)
    synchronize(model.device)
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def overhead(spec: str, device: str, args) -> dict:
    """Bare loop vs worker shard path, best of ``--repeats``, after one warm-up of each."""
    worker = CalibrationWorker(ModelSpec(spec, 7.5, device), args.teacher_steps, keep_states=args.keep_states,
                               state_dir=tempfile.mkdtemp(prefix="olss-bench-states-"))
    shard = make_shards(records_from_prompts([f"a photo of digit {i}" for i in range(args.batch)]), args.batch)[0]
    bare_loop_seconds(worker.model, shard, worker.timesteps)
    worker.compute_shard(shard)
    bare = min(bare_loop_seconds(worker.model, shard, worker.timesteps) for _ in range(args.repeats))
    calibrate = min(timed(lambda: worker.compute_shard(shard), worker.model.device) for _ in range(args.repeats))
    worker.clear_states()
    return {
        "model": spec if spec == "analytic" else f"random UNet 4x{args.unet_size}x{args.unet_size}",
        "device": str(worker.model.device),
        "bare samples/s": args.batch / bare,
        "calibrate samples/s": args.batch / calibrate,
        "ratio": bare / calibrate,
    }


def timed(function, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def scaling(spec: str, worker_counts: list[int], args) -> list[dict]:
    """samples/s of the shard loop with each worker count on a local Ray (logical CPUs)."""
    import ray

    from olss_dist.distributed.cluster import connect
    from olss_dist.distributed.pool import WorkerPool, run_shards

    connect(num_cpus=max(worker_counts) + 1)
    shards = make_shards(records_from_prompts([f"a sample of class {i % 10}" for i in range(args.scaling_shards * args.batch)]), args.batch)
    rows = []
    try:
        for count in worker_counts:
            pool = WorkerPool(ModelSpec(spec, 7.5, "cpu"), count, args.teacher_steps, keep_states=args.keep_states)
            try:
                pool.describe()
                run_shards(pool, shards[:count], lambda worker, shard, result: None)  # warm-up: first calls
                start = time.perf_counter()
                run_shards(pool, shards, lambda worker, shard, result: None)
                seconds = time.perf_counter() - start
            finally:
                pool.shutdown()
            rows.append({"workers": count, "samples/s": len(shards) * args.batch / seconds})
    finally:
        ray.shutdown()
    for row in rows:
        row["speed-up"] = row["samples/s"] / rows[0]["samples/s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4, help="samples per shard (one model batch, CFG doubles it)")
    parser.add_argument("--unet-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads here (Ray CPU workers use 1)")
    parser.add_argument("--keep-states", default="memory", choices=["memory", "disk"])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--scaling-shards", type=int, default=8)
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"N={args.teacher_steps}, batch={args.batch}, device={device}, torch threads={torch.get_num_threads()}, "
          f"cores={os.cpu_count()}")

    with tempfile.TemporaryDirectory() as scratch:
        unet_folder = str(random_sd_folder(Path(scratch), args.unet_size))
        print("\n== overhead: calibrate (record + R + keep states) vs bare denoiser loop, same model and batch")
        for spec in ("analytic", unet_folder):
            row = overhead(spec, "cpu" if spec == "analytic" else device, args)
            print(f"{row['model']:>22} on {row['device']}: bare {row['bare samples/s']:.2f} samples/s, "
                  f"calibrate {row['calibrate samples/s']:.2f} samples/s, ratio {row['ratio']:.3f}")
        if not args.skip_scaling:
            print("\n== scaling: local Ray, logical CPU workers, same shards (analytic model)")
            for row in scaling("analytic", [int(w) for w in args.workers.split(",")], args):
                print(f"{row['workers']} workers: {row['samples/s']:.2f} samples/s, speed-up {row['speed-up']:.2f}")


if __name__ == "__main__":
    main()
