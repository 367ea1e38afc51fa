"""The calibration worker: one Ray actor per GPU (or per CPU slot) holding a loaded model.

The actor loads the model once, runs the full N-step teacher for each shard it is given, reduces
the shard's trajectories to their float64 R factor on its own device, and keeps the teacher states
(host memory or local disk) for the on-policy rounds. Trajectories never leave the actor; only R
factors (``(2N+1, 2N+1)`` float64) and small per-round statistics go back to the driver.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from olss_dist.calibration import Calibration
from olss_dist.distributed.state_store import TeacherStateStore
from olss_dist.prompts import Shard
from olss_dist.teacher import record_trajectories, trailing_timesteps


@dataclass(frozen=True)
class ModelSpec:
    """What every worker loads: the model, its guidance scale, and where it runs.

    Attributes:
        spec: model spec for ``olss_dist.models.load_model`` (``"analytic"``, a folder, a hub id, a URI).
        guidance_scale: classifier-free guidance scale.
        device: ``"cuda"`` (fp16 UNet on the actor's GPU) or ``"cpu"``.
    """

    spec: str
    guidance_scale: float
    device: str

    def load(self):
        try:
            from olss_dist.models import load_model
        except ImportError:  # TEMPORARY until the model adapters land: the analytic model only
            from olss_dist.models.analytic import GaussianMixtureModel

            if self.spec != "analytic":
                raise FileNotFoundError(f"model {self.spec!r} not found")
            return GaussianMixtureModel(guidance_scale=self.guidance_scale)
        return load_model(self.spec, guidance_scale=self.guidance_scale, device=self.device)


@dataclass
class ShardResult:
    """A finished shard as it travels to the driver.

    Attributes:
        shard_id: the shard's id.
        shard_digest: ``Shard.digest()`` of the records computed (guards checkpoints).
        statistics: the shard's ``Calibration`` (R factor ``(2N+1, 2N+1)`` float64 and counts) as
            safetensors bytes, the form it is checkpointed in.
        seconds: wall time of the teacher run and the reduction.
        worker: ``host:pid`` of the actor that computed it.
    """

    shard_id: int
    shard_digest: str
    statistics: bytes
    seconds: float
    worker: str

    def calibration(self) -> Calibration:
        return Calibration.from_bytes(self.statistics)


class CalibrationWorker:
    """Ray actor body (wrapped with ``ray.remote`` by the pool): a loaded model and its shards' states.

    Args:
        model_spec: what to load.
        num_teacher_steps: N, the teacher's step count.
        keep_states: where to keep teacher states for the on-policy rounds: ``"memory"`` (host RAM),
            ``"disk"`` (``state_dir`` on the node's local disk) or ``"none"`` (teacher-forced only).
        run_key: names the run's state directory on the node (the job's config digest).
        state_dir: root for ``"disk"``; ``None`` uses the system temp dir.
    """

    def __init__(
        self,
        model_spec: ModelSpec,
        num_teacher_steps: int,
        keep_states: str = "none",
        run_key: str = "run",
        state_dir: str | None = None,
    ):
        self.model = model_spec.load()
        self.timesteps = trailing_timesteps(num_teacher_steps, self.model.num_train_timesteps)
        self.states = TeacherStateStore(keep_states, run_key, state_dir)

    def describe(self) -> dict[str, Any]:
        """Identity of the loaded model and of this worker: for the report, digests and placement checks."""
        context = ray.get_runtime_context()
        return {
            "model_id": self.model.model_id,
            "model_digest": self.model.digest,
            "latent_shape": list(self.model.latent_shape),
            "num_train_timesteps": self.model.num_train_timesteps,
            "default_prompts": default_prompts(self.model),
            "device": str(self.model.device),
            "worker": worker_name(),
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])],
        }

    def pid(self) -> int:
        return os.getpid()

    def compute_shard(self, shard: Shard) -> ShardResult:
        """Run the teacher on the shard's samples and reduce them to their R factor on this device."""
        start = time.perf_counter()
        states, noise_preds = self.record(shard)
        calibration = Calibration.from_trajectories(states, noise_preds, self.timesteps)
        self.states.keep(shard.shard_id, states)
        seconds = time.perf_counter() - start
        return ShardResult(shard.shard_id, shard.digest(), calibration.to_bytes(), seconds, worker_name())

    def record(self, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher trajectories of the shard: states ``(B, N+1, *shape)`` and outputs ``(B, N, *shape)``."""
        cond = self.model.encode_prompts(shard.prompts, shard.negative_prompts)
        x_T = self.model.initial_noise(shard.seeds).to(self.model.device)
        with torch.inference_mode():
            return record_trajectories(self.model, x_T, cond, self.timesteps, self.model.alphas_cumprod)


def default_prompts(model) -> list[str] | None:
    """The model's built-in prompts, or None when it has none."""
    try:
        return list(model.default_prompts())
    except NotImplementedError:
        return None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
