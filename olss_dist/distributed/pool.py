"""A pool of calibration actors and the loop that feeds them shards and streams results back.

Each actor holds one GPU (``num_gpus=1``, so Ray places one per GPU) or one CPU slot; with a
``cluster.Reservation`` actor ``i`` lives in the job's placement group bundle ``i``. Shards are
handed out one at a time per actor; ``ray.wait`` returns finished shards as they complete, and the
caller's ``on_result`` merges and checkpoints each one immediately. A worker that dies (its process
killed, its node lost) fails its in-flight shard; the shard goes back to the front of the queue and
is computed again on a live or restarted actor. A shard is reported once: tasks are never retried by
Ray itself (``max_task_retries=0``), only by this loop, after a failure.

Worker loss follows the pool's ``failure.FailurePolicy`` (restarts, waiting, giving up), whose
``max_restarts`` is the one Ray gets for each actor; ``pool.health`` counts losses over the pool's
life, so the teacher pass and the later calls of ``owners.ShardOwners`` see the same dead workers.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from olss_dist.distributed.cluster import Reservation
from olss_dist.distributed.failure import (
    WORKER_LOST_ERRORS,
    DeviceMemoryError,
    FailurePolicy,
    LossCounts,
    StateLostError,
    WorkerError,
    WorkerHealth,
    WorkersLostError,
    is_out_of_memory,
    out_of_memory_error,
)
from olss_dist.distributed.worker import CalibrationWorker, ModelSpec, ShardResult
from olss_dist.prompts import Shard
from olss_dist.spec import SpecError

logger = logging.getLogger(__name__)

__all__ = [
    "WORKER_LOST_ERRORS",
    "DeviceMemoryError",
    "WorkerError",
    "WorkerPool",
    "WorkerResources",
    "WorkersLostError",
    "compute_shard",
    "get_or_raise",
    "run_shards",
]


@dataclass(frozen=True)
class WorkerResources:
    """Ray resources of one actor.

    Attributes:
        num_gpus: 1 for a GPU worker (one actor per GPU), 0 for a CPU worker.
        num_cpus: CPU slots reserved per actor.
        max_restarts: times Ray restarts a dead actor (reloading its model) before it is dropped; the
            pool's ``FailurePolicy.max_restarts``.
    """

    num_gpus: float = 0
    num_cpus: float = 1
    max_restarts: int = 2

    def bundle(self) -> dict[str, float]:
        """The placement group bundle that holds one such actor (``cluster.reserve``)."""
        bundle = {"CPU": float(self.num_cpus)}
        if self.num_gpus:
            bundle["GPU"] = float(self.num_gpus)
        return bundle


class WorkerPool:
    """``num_workers`` actors, each with the model loaded once, and their health under one failure policy.

    Args:
        model_spec: what every actor loads.
        num_workers: number of actors.
        num_teacher_steps: N.
        resources: per-actor Ray resources.
        keep_states: ``"memory"`` or ``"disk"`` (see ``TeacherStateStore``).
        state_dir: root of the node-local state directory; ``None`` uses each node's temp dir.
        worker_class: the actor body, ``CalibrationWorker`` or a subclass.
        failure: how worker loss is handled; ``None``: the default policy with ``resources.max_restarts``.
            Its ``max_restarts`` must be ``resources.max_restarts`` (Ray's count and the policy's are one).
        reservation: the job's placement group, bundle ``i`` holding actor ``i`` (at least ``num_workers``
            bundles of ``resources``); ``None``: actors take free resources anywhere on the cluster.
    """

    def __init__(
        self,
        model_spec: ModelSpec,
        num_workers: int,
        num_teacher_steps: int,
        resources: WorkerResources = WorkerResources(),
        keep_states: str = "memory",
        state_dir: str | None = None,
        worker_class: type[CalibrationWorker] = CalibrationWorker,
        failure: FailurePolicy | None = None,
        reservation: Reservation | None = None,
    ):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise SpecError("num_workers", f"must be at least 1, got {num_workers!r}")
        if reservation is not None and len(reservation.bundles) < num_workers:
            raise ValueError(f"the reservation holds {len(reservation.bundles)} bundles, not one per each of {num_workers} workers")
        policy = failure if failure is not None else FailurePolicy(max_restarts=resources.max_restarts)
        if policy.max_restarts != resources.max_restarts:
            raise ValueError(
                f"failure.max_restarts ({policy.max_restarts}) must equal resources.max_restarts "
                f"({resources.max_restarts}): Ray restarts the actors that often"
            )
        options = dict(
            num_gpus=resources.num_gpus,
            num_cpus=resources.num_cpus,
            max_restarts=resources.max_restarts,
            max_task_retries=0,
        )
        actor_class = ray.remote(worker_class)
        self.policy = policy
        self.health = WorkerHealth(policy, num_workers)
        self.reservation = reservation
        self.actors = [
            actor_class.options(
                **options, **({} if reservation is None else {"scheduling_strategy": reservation.strategy(i)})
            ).remote(model_spec, num_teacher_steps, keep_states, state_dir)
            for i in range(num_workers)
        ]

    def describe(self) -> list[dict[str, Any]]:
        """Each actor's model identity and placement; raises WorkerError if a model failed to load."""
        return get_or_raise([actor.describe.remote() for actor in self.actors])

    def ping(self, worker: int) -> ray.ObjectRef:
        """A call that answers as soon as the actor is up (after a restart: once its model is loaded)."""
        return self.actors[worker].pid.remote()

    def await_restart(self, worker: int) -> bool:
        """Count a loss of ``worker`` and wait for Ray to bring it back, as the policy says.

        Returns:
            True once the restarted worker answers; False when it is dead for good (past its restarts,
            reported dead by Ray, or "unavailable" for ``restart_timeout_s``), and marked so.
        """
        if not self.health.record_loss(worker):
            return False
        started = time.monotonic()
        while True:
            try:
                get_or_raise(self.ping(worker))
                return True
            except ActorUnavailableError:
                waited = time.monotonic() - started
                if not self.policy.keeps_waiting(waited):
                    self.health.mark_dead(worker, f"unavailable for {waited:.0f}s")
                    return False
                time.sleep(self.policy.poll_s)
            except WORKER_LOST_ERRORS as error:
                self.health.mark_dead(worker, type(error).__name__)
                return False

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def compute_shard(actor, shard: Shard) -> ray.ObjectRef:
    """The default shard call: teacher run and R factor of a train shard."""
    return actor.compute_shard.remote(shard)


def run_shards(
    pool: WorkerPool,
    shards: Sequence[Shard],
    on_result: Callable[[int, Shard, ShardResult], None],
    call: Callable[[Any, Shard], ray.ObjectRef] = compute_shard,
) -> None:
    """Run ``call`` for every shard on the pool's live workers, one shard per actor at a time, results streamed.

    A lost shard goes back to the front of the queue for the first idle worker. Its worker, while the
    pool's policy expects it back, is pinged (without holding up the other workers) until Ray has
    restarted it, then gets work again; otherwise it is dropped.

    Args:
        pool: the actors, their failure policy and health.
        shards: the shards to run (checkpointed ones already removed).
        on_result: ``on_result(worker_index, shard, result)`` on the driver, once per shard, in completion order.
        call: submits one shard to one actor (default: ``compute_shard``).

    Raises:
        WorkerError: a worker raised an exception while computing (not retried).
        WorkersLostError: all actors are gone, or a shard lost its worker ``policy.max_attempts`` times.
    """
    policy, health = pool.policy, pool.health
    queue = deque(shards)
    losses = LossCounts(policy)
    idle = set(health.live())
    unavailable_since: dict[int, float] = {}  # workers answering "unavailable" to pings, since when
    in_flight: dict[ray.ObjectRef, tuple[int, Shard | None]] = {}  # None: a ping to a restarting worker

    def dispatch() -> None:
        for worker in sorted(idle):
            if not queue:
                return
            shard = queue.popleft()
            in_flight[call(pool.actors[worker], shard)] = (worker, shard)
            idle.discard(worker)

    if queue and not idle:
        health.require_live("compute shards")
    dispatch()
    while in_flight:
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        worker, shard = in_flight.pop(ref)
        try:
            result = get_or_raise(ref)
        except WORKER_LOST_ERRORS as error:
            if shard is not None:
                logger.warning("worker %d lost shard %d (%s); recomputing it", worker, shard.shard_id, type(error).__name__)
                queue.appendleft(shard)
                losses.lost(shard.shard_id, f"shard {shard.shard_id}")
                if health.record_loss(worker):
                    in_flight[pool.ping(worker)] = (worker, None)
            elif isinstance(error, ActorUnavailableError):
                since = unavailable_since.setdefault(worker, time.monotonic())
                if policy.keeps_waiting(time.monotonic() - since):
                    time.sleep(policy.poll_s)
                    in_flight[pool.ping(worker)] = (worker, None)
                else:
                    health.mark_dead(worker, f"unavailable for {policy.restart_timeout_s:g}s")
            else:
                health.mark_dead(worker, type(error).__name__)
            if queue and not idle and not in_flight:
                raise WorkersLostError("every worker died; no actor is left to compute shards") from error
        else:
            unavailable_since.pop(worker, None)
            if shard is not None:
                on_result(worker, shard, result)
            idle.add(worker)
        dispatch()


def get_or_raise(refs):
    """``ray.get`` that turns an exception raised by worker code into one WorkerError line.

    Covers exceptions in a method (``RayTaskError``) and in the actor's constructor (a model that
    fails to load); the death of the worker itself is passed through for the caller to handle. A
    device out of memory is a ``DeviceMemoryError`` whose line says so and names ``--shard-size``.
    """
    try:
        return ray.get(refs)
    except RayTaskError as error:
        cause = error.cause if error.cause is not None else error
        if isinstance(cause, StateLostError):
            raise cause from error
        if is_out_of_memory(cause):
            raise out_of_memory_error(str(cause)) from error
        raise WorkerError(f"{type(cause).__name__}: {cause}") from error
    except RayActorError as error:
        if not error.actor_init_failed:
            raise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if is_out_of_memory(str(error)):
            raise out_of_memory_error(next((l for l in reversed(lines) if is_out_of_memory(l)), lines[-1]), loading=True) from error
        raise WorkerError(f"worker failed to start: {lines[-1]}") from error
