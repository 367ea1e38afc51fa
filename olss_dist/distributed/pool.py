"""A pool of calibration actors and the loop that feeds them shards and streams results back.

Each actor holds one GPU (``num_gpus=1``, so Ray places one per GPU) or one CPU slot. Shards are
handed out one at a time per actor; ``ray.wait`` returns finished shards as they complete, and the
caller's ``on_result`` merges and checkpoints each one immediately. A worker that dies (its process
killed, its node lost) fails its in-flight shard; the shard goes back to the front of the queue and
is computed again on a live or restarted actor. A shard is reported once: tasks are never retried by
Ray itself (``max_task_retries=0``), only by this loop, after a failure.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import ActorUnavailableError, NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from olss_dist.distributed.worker import CalibrationWorker, ModelSpec, ShardResult, StateLostError
from olss_dist.prompts import Shard

logger = logging.getLogger(__name__)

RESTART_POLL_S = 0.2
"""Pause between pings to a worker Ray is still restarting."""

WORKER_LOST_ERRORS = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, StateLostError)
"""Failures of the worker rather than of the computation (including a restart that lost its state):
the work is redone."""


class WorkerError(RuntimeError):
    """A worker raised while computing (a bad model, bad input): redoing it elsewhere would not help."""


class WorkersLostError(RuntimeError):
    """Every worker died, or a shard kept losing its worker."""


@dataclass(frozen=True)
class WorkerResources:
    """Ray resources of one actor.

    Attributes:
        num_gpus: 1 for a GPU worker (one actor per GPU), 0 for a CPU worker.
        num_cpus: CPU slots reserved per actor.
        max_restarts: times Ray restarts a dead actor (reloading its model) before it is dropped.
    """

    num_gpus: float = 0
    num_cpus: float = 1
    max_restarts: int = 2


class WorkerPool:
    """``num_workers`` actors, each with the model loaded once.

    Args:
        model_spec: what every actor loads.
        num_workers: number of actors.
        num_teacher_steps: N.
        resources: per-actor Ray resources.
        keep_states: ``"memory"`` or ``"disk"`` (see ``TeacherStateStore``).
        state_dir: root of the node-local state directory; ``None`` uses each node's temp dir.
        worker_class: the actor body, ``CalibrationWorker`` or a subclass.
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
    ):
        if num_workers < 1:
            raise ValueError(f"need at least one worker, got {num_workers}")
        actor_class = ray.remote(worker_class).options(
            num_gpus=resources.num_gpus,
            num_cpus=resources.num_cpus,
            max_restarts=resources.max_restarts,
            max_task_retries=0,
        )
        self.max_restarts = resources.max_restarts
        self.actors = [
            actor_class.remote(model_spec, num_teacher_steps, keep_states, state_dir)
            for _ in range(num_workers)
        ]

    def describe(self) -> list[dict[str, Any]]:
        """Each actor's model identity and placement; raises WorkerError if a model failed to load."""
        return get_or_raise([actor.describe.remote() for actor in self.actors])

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
    max_attempts: int = 3,
) -> None:
    """Run ``call`` for every shard on the pool, one shard per actor at a time, with results streamed.

    A worker that loses its shard is pinged until Ray has restarted it, then gets work again; its shard
    goes back to the front of the queue for the first idle worker. Once a worker has died more often
    than ``pool.max_restarts`` it is dropped.

    Args:
        pool: the actors.
        shards: the shards to run (checkpointed ones already removed).
        on_result: ``on_result(worker_index, shard, result)`` on the driver, once per shard, in completion order.
        call: submits one shard to one actor (default: ``compute_shard``).
        max_attempts: times one shard may lose its worker before the run gives up.

    Raises:
        WorkerError: a worker raised an exception while computing (not retried).
        WorkersLostError: all actors are gone, or a shard lost its worker ``max_attempts`` times.
    """
    queue = deque(shards)
    attempts = {shard.shard_id: 0 for shard in shards}
    deaths = [0] * len(pool.actors)
    idle = set(range(len(pool.actors)))
    in_flight: dict[ray.ObjectRef, tuple[int, Shard | None]] = {}  # None: a ping to a restarting worker

    def dispatch() -> None:
        for worker in sorted(idle):
            if not queue:
                return
            shard = queue.popleft()
            attempts[shard.shard_id] += 1
            in_flight[call(pool.actors[worker], shard)] = (worker, shard)
            idle.discard(worker)

    def ping(worker: int) -> None:
        in_flight[pool.actors[worker].pid.remote()] = (worker, None)

    dispatch()
    while in_flight:
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        worker, shard = in_flight.pop(ref)
        try:
            result = get_or_raise(ref)
        except WORKER_LOST_ERRORS as error:
            if shard is not None:
                deaths[worker] += 1
                logger.warning("worker %d lost shard %d (%s); recomputing it", worker, shard.shard_id, type(error).__name__)
                if attempts[shard.shard_id] >= max_attempts:
                    raise WorkersLostError(f"shard {shard.shard_id} lost its worker {max_attempts} times") from error
                queue.appendleft(shard)
            if deaths[worker] <= pool.max_restarts and isinstance(error, ActorUnavailableError):
                time.sleep(RESTART_POLL_S)
                ping(worker)
            elif deaths[worker] <= pool.max_restarts and shard is not None:
                ping(worker)
            elif not idle and not in_flight:
                raise WorkersLostError("every worker died; no actor is left to compute shards") from error
        else:
            if shard is not None:
                on_result(worker, shard, result)
            idle.add(worker)
        dispatch()


def get_or_raise(refs):
    """``ray.get`` that turns an exception raised by worker code into one WorkerError line.

    Covers exceptions in a method (``RayTaskError``) and in the actor's constructor (a model that
    fails to load); the death of the worker itself is passed through for the caller to handle.
    """
    try:
        return ray.get(refs)
    except RayTaskError as error:
        cause = error.cause if error.cause is not None else error
        if isinstance(cause, StateLostError):
            raise cause from error
        raise WorkerError(f"{type(cause).__name__}: {cause}") from error
    except RayActorError as error:
        if not error.actor_init_failed:
            raise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise WorkerError(f"worker failed to start: {lines[-1]}") from error
