"""The calibration worker: one Ray actor per GPU (or per CPU slot) holding a loaded model.

The actor loads the model once, runs the full N-step teacher for each shard it is given, reduces
the shard's trajectories to their float64 R factor on its own device, and keeps the teacher states
(host memory or node-local disk) for the on-policy rounds, which it then runs for its shards:
one model call per sample per round, one small R factor per shard back to the driver. Trajectories
never leave the actor; only R factors, per-sample errors and the driver's broadcast weights travel.
A call about states or a rollout the actor no longer has (Ray restarted it) raises ``StateLostError``,
which ``failure.FailurePolicy`` counts as a lost worker.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import ray
import torch

from olss_dist.core.calibration import Calibration
from olss_dist.core.onpolicy import apply_step, step_statistics
from olss_dist.core.teacher import schedule_states, schedule_trajectories
from olss_dist.distributed.failure import StateLostError
from olss_dist.distributed.parallel_search import PathSearchMethods
from olss_dist.distributed.state_store import TeacherStateStore
from olss_dist.method.rollouts import SCREEN, TRAIN, Rollout, per_sample_mse
from olss_dist.prompts import Shard


@dataclass(frozen=True)
class ModelSpec:
    """What every worker loads: the model, its guidance scale, and where it runs.

    Attributes:
        spec: model spec for ``olss_dist.models.load_model`` (``"analytic"``, ``"embedded"``, a folder, a hub id, a URI).
        guidance_scale: classifier-free guidance scale.
        device: ``"cuda"`` (fp16 UNet on the actor's GPU) or ``"cpu"``.
        resolution: ``(height, width)`` pixels an SD3 / Flux model calibrates at (``CalibrationSpec.resolution``);
            None: the model's own. It fixes the latent shape and, with dynamic shifting, the teacher's ``mu``,
            so every worker's teacher is the same.
        lora: a diffusers LoRA (``CalibrationSpec.lora``) each worker fuses into the model after loading it.
    """

    spec: str
    guidance_scale: float
    device: str
    resolution: tuple[int, int] | None = None
    lora: str | None = None

    def load(self):
        from olss_dist.models import load_model

        options = {} if self.resolution is None else {"resolution": tuple(self.resolution)}
        if self.lora is not None:
            options["lora"] = self.lora
        return load_model(self.spec, guidance_scale=self.guidance_scale, device=self.device, **options)


@dataclass
class ShardResult:
    """A finished teacher run of a shard, as it travels to the driver.

    Attributes:
        shard_id: the shard's id within its split.
        statistics: the shard's ``Calibration`` (R factor ``(2N+1, 2N+1)`` float64 and counts) as
            safetensors bytes, the form it is checkpointed in; empty for validation shards.
        seconds: wall time of the teacher run and the reduction.
        worker: ``host:pid`` of the actor that computed it.
        teacher_runs: teacher runs it took (0 when the states were read back from the node's disk).
    """

    shard_id: int
    statistics: bytes
    seconds: float
    worker: str
    teacher_runs: int = 1

    def calibration(self) -> Calibration:
        return Calibration.from_bytes(self.statistics)


def teacher_key(model, model_spec: ModelSpec, num_teacher_steps: int) -> str:
    """Digest of everything besides the samples that fixes a teacher trajectory: model, guidance, N, device."""
    identity = f"{model.digest}|{model_spec.guidance_scale!r}|{num_teacher_steps}|{model.device}|{model_spec.device}"
    if model_spec.resolution is not None or model.mu is not None:  # VP keys stay as they were
        identity += f"|{model_spec.resolution!r}|{model.mu!r}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def state_key(split: str, shard: Shard) -> str:
    """Store key of a shard's states: its split and content digest."""
    return f"{split}-{shard.digest()[:32]}"


class CalibrationWorker(PathSearchMethods):
    """Ray actor body (wrapped with ``ray.remote`` by the pool): a loaded model and its shards' states,
    and the path search's evaluations between the teacher pass and the rounds (``PathSearchMethods``).

    Args:
        model_spec: what to load.
        num_teacher_steps: N, the teacher's step count.
        keep_states: where teacher states wait for the on-policy rounds: ``"memory"`` or ``"disk"``.
        state_dir: root of the node-local state directory; ``None`` uses the node's temp dir.
    """

    def __init__(
        self,
        model_spec: ModelSpec,
        num_teacher_steps: int,
        keep_states: str = "memory",
        state_dir: str | None = None,
    ):
        self.model = model_spec.load()
        # The model's own noise process names the teacher: trailing DDIM (VP) or its flow-matching Euler
        # schedule (at the model's mu, fixed by its spec and calibration resolution).
        self.schedule = self.model.noise_process.teacher_schedule(num_teacher_steps)
        self.timesteps = self.schedule.stored_timesteps()
        self.final_node = num_teacher_steps
        self.states = TeacherStateStore(keep_states, teacher_key(self.model, model_spec, num_teacher_steps), state_dir)
        self.rollouts: dict[int, dict[int, Rollout]] = {}
        self.screen_teacher: dict[tuple[int, int], torch.Tensor] = {}  # (screen shard, sample) -> teacher's final state

    def describe(self) -> dict[str, Any]:
        """Identity of the loaded model and of this worker: for the report, digests and placement checks."""
        context = ray.get_runtime_context()
        alphas_cumprod = self.model.alphas_cumprod
        return {
            "model_id": self.model.model_id,
            "model_digest": self.model.digest,
            "latent_shape": list(self.model.latent_shape),
            "resolution": None if self.model.resolution is None else list(self.model.resolution),
            "alphas_cumprod": None if alphas_cumprod is None else np.asarray(alphas_cumprod, dtype=np.float64).tolist(),
            "prediction_type": self.model.prediction_type,
            "noise_process": self.model.noise_process.kind,
            "scheduler_config": {
                k: v for k, v in dict(self.model.scheduler_config).items() if not k.startswith("_") or k == "_class_name"
            },
            "mu": self.model.mu,
            "teacher_timesteps": self.timesteps.tolist(),
            "default_prompts": default_prompts(self.model),
            "screen_multiple": int(self.model.screen_multiple),
            "device": str(self.model.device),
            "worker": worker_name(),
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])],
        }

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------------------------ teacher pass

    def compute_shard(self, shard: Shard) -> ShardResult:
        """Run the teacher on a train shard, reduce it to its R factor on this device, keep every state."""
        start = time.perf_counter()
        states, noise_preds = self.record(shard)
        calibration = Calibration.from_trajectories(states, noise_preds, self.timesteps)
        self.states.keep(state_key(TRAIN, shard), states, range(states.shape[1]))
        return ShardResult(shard.shard_id, calibration.to_bytes(), time.perf_counter() - start, worker_name())

    def record_final_states(self, split: str, shard: Shard) -> ShardResult:
        """Keep the teacher's states of a shard (validation: the final state is the target, a state at a node is
        where a start plan's rollout starts), reading them back when kept already; ``prepare_states`` then
        keeps only the final state and the start nodes."""
        start = time.perf_counter()
        runs = self.ensure_states(split, shard, range(self.final_node + 1))
        return ShardResult(shard.shard_id, b"", time.perf_counter() - start, worker_name(), runs)

    def prepare_states(
        self, shards: Sequence[tuple[str, Shard]], nodes: Sequence[int], validation_nodes: Sequence[int] = ()
    ) -> int:
        """Make sure each (split, shard) has its states at ``nodes`` (train) or at ``validation_nodes`` (other
        splits: where start plans start), and its final state, rerunning the teacher where they are
        missing; then drop every other node.

        Returns:
            the number of teacher reruns.
        """
        runs = 0
        for split, shard in shards:
            if split == SCREEN:  # fresh samples of the tail screen: no teacher states
                continue
            needed = sorted(set(nodes if split == TRAIN else validation_nodes) | {self.final_node})
            runs += self.ensure_states(split, shard, needed)
            self.states.restrict(state_key(split, shard), needed)
        return runs

    def ensure_states(self, split: str, shard: Shard, nodes: Sequence[int]) -> int:
        """Keep the shard's states at ``nodes``, running the teacher only if they are not kept yet (returns 0 or 1)."""
        key = state_key(split, shard)
        if self.states.has(key, nodes):
            return 0
        nodes = list(nodes)
        states, _ = self.record(shard)
        self.states.keep(key, states[:, nodes], nodes)
        return 1

    def record(self, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher trajectories of the shard: states ``(B, N+1, *shape)`` and outputs ``(B, N, *shape)``."""
        x_T, cond = self.inputs(shard)
        with torch.inference_mode():
            return schedule_trajectories(self.model, x_T, cond, self.schedule)

    def inputs(self, shard: Shard) -> tuple[torch.Tensor, Any]:
        """Initial noise ``(B, *shape)`` on this device and the prompts' conditioning."""
        cond = self.model.encode_prompts(shard.prompts, shard.negative_prompts)
        return self.model.initial_noise(shard.seeds).to(self.model.device), cond

    # ------------------------------------------------------------------------------- on-policy rounds

    def start_rollout(
        self, handle: int, shards: Sequence[Shard], timestep: int | float, start_node: int = 0, split: str = TRAIN
    ) -> None:
        """Begin rollout ``handle`` on ``shards``: the model's output at each ``x_T``, or at the teacher's kept
        state of ``split`` at node ``start_node`` when it is not 0 (a start plan's rollout)."""
        batches = self.rollouts.setdefault(handle, {})
        with torch.inference_mode():
            for shard in shards:
                x_T, cond = self.inputs(shard)
                if start_node:
                    x_T = self._teacher_state(split, shard, start_node).to(x_T.device, x_T.dtype)
                batch = Rollout(x_T, cond)
                batch.outputs.append(self.model(x_T, timestep, cond))
                batches[shard.shard_id] = batch

    def rollout_statistics(self, handle: int, shards: Sequence[Shard], target_node: int) -> dict[int, torch.Tensor]:
        """``{shard_id: (i+3, i+3) R factor}`` of rows ``[x_T, ê_0..ê_i, s_target]`` of each train shard."""
        factors = {}
        for shard in shards:
            batch = self._batch(handle, shard)
            target = self._teacher_state(TRAIN, shard, target_node).to(batch.x_T.device)
            factors[shard.shard_id] = step_statistics(batch.x_T, batch.outputs, target).cpu()
        return factors

    def advance_rollout(
        self, handle: int, shards: Sequence[Shard], weights: np.ndarray, next_timestep: int | float | None
    ) -> None:
        """``x̂ = weights · [x_T, ê_0..ê_i]`` for each shard, then the model at ``next_timestep`` (if any)."""
        batches = [self._batch(handle, shard) for shard in shards]
        with torch.inference_mode():
            for batch in batches:
                batch.state = apply_step(weights, batch.x_T, batch.outputs)
                if next_timestep is not None:
                    batch.outputs.append(self.model(batch.state, next_timestep, batch.cond))

    def advance_rollout_steps(
        self, handle: int, shards: Sequence[Shard], steps: Sequence[tuple[np.ndarray, int | float | None]]
    ) -> None:
        """``advance_rollout`` for each ``(weights, next_timestep)`` in order (a fixed sampler's steps, one call)."""
        for weights, next_timestep in steps:
            self.advance_rollout(handle, shards, weights, next_timestep)

    def rollout_final_errors(self, handle: int, split: str, shards: Sequence[Shard]) -> dict[int, np.ndarray]:
        """``{shard_id: (B,)}`` mean squared error per element of each sample's last state vs the teacher's."""
        errors = {}
        for shard in shards:
            batch = self._batch(handle, shard)
            reference = self._teacher_state(split, shard, self.final_node)
            errors[shard.shard_id] = per_sample_mse(batch.state, reference)
        return errors

    def rollout_final_differences(self, handle: int, reference: int, shards: Sequence[Shard]) -> dict[int, np.ndarray]:
        """``{shard_id: (B,)}`` mean squared difference per element between the last states of two rollouts."""
        return {
            shard.shard_id: per_sample_mse(self._batch(handle, shard).state, self._batch(reference, shard).state)
            for shard in shards
        }

    def rollout_teacher_differences(
        self, handle: int, shards: Sequence[Shard], asked: dict[int, Sequence[int]]
    ) -> dict[int, np.ndarray]:
        """``{shard_id: (n,)}`` mean squared difference per element between screen rollout ``handle``'s last states at
        the samples ``asked[shard_id]`` (positions in the shard) and the teacher's final states there: the teacher
        runs on a sample the first time it is asked for, and is kept (``RolloutBackend.teacher_differences``)."""
        differences = {}
        for shard in shards:
            local = [int(i) for i in asked.get(shard.shard_id, ())]
            batch = self._batch(handle, shard)
            missing = [i for i in dict.fromkeys(local) if (shard.shard_id, i) not in self.screen_teacher]
            if missing:
                x_T, cond = self.inputs(Shard(shard.shard_id, tuple(shard.records[i] for i in missing)))
                with torch.inference_mode():
                    finals = schedule_states(self.model, x_T, cond, self.schedule, [self.final_node])[:, 0]
                self.screen_teacher.update({(shard.shard_id, i): final for i, final in zip(missing, finals)})
            reference = torch.stack([self.screen_teacher[(shard.shard_id, i)] for i in local])
            differences[shard.shard_id] = per_sample_mse(batch.state[local], reference.to(batch.state.device))
        return differences

    def close_rollout(self, handle: int) -> None:
        self.rollouts.pop(handle, None)

    def clear_states(self) -> None:
        """Drop every kept teacher state of this run on this node (after the run is published)."""
        self.rollouts.clear()
        self.screen_teacher.clear()
        self.states.clear()

    def replay_rollout(
        self, handle: int, shards: Sequence[Shard], timestep: int | float,
        advances: Sequence[tuple[np.ndarray, int | float | None]], start_node: int = 0, split: str = TRAIN,
    ) -> None:
        """Rebuild rollout ``handle`` on ``shards`` from its start and the advances made so far."""
        self.start_rollout(handle, shards, timestep, start_node, split)
        for weights, next_timestep in advances:
            self.advance_rollout(handle, shards, weights, next_timestep)

    def _teacher_state(self, split: str, shard: Shard, node: int) -> torch.Tensor:
        try:
            return self.states.read(state_key(split, shard), node)
        except KeyError:
            raise StateLostError(
                f"teacher state of {split} shard {shard.shard_id} at node {node} is not on this worker"
            ) from None

    def _batch(self, handle: int, shard: Shard) -> Rollout:
        batch = self.rollouts.get(handle, {}).get(shard.shard_id)
        if batch is None:
            raise StateLostError(f"rollout {handle} of shard {shard.shard_id} is not on this worker")
        return batch


def default_prompts(model) -> list[str] | None:
    """The model's built-in prompts, or None when it has none."""
    try:
        return list(model.default_prompts())
    except NotImplementedError:
        return None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
