"""What the job does when a Ray worker is lost: one policy for shard work, state keeping and rollouts.

A worker is *lost* when a call to it fails with one of ``WORKER_LOST_ERRORS``: its process died (killed,
out of memory, its node gone), or it answers but no longer holds what the call needs (``StateLostError``:
Ray restarted it in between). Any other exception raised by worker code is a ``WorkerError``: the
computation itself failed, and redoing it on another worker would not help, so it ends the job.

After a loss, every caller (the teacher pass in ``pool.run_shards``, the shard owners of
``owners.ShardOwners`` that keep teacher states and run the rollout calls) applies the same rules:

1. The loss counts against the worker. Ray restarts an actor ``max_restarts`` times
   (``WorkerResources.max_restarts``, the same number), so a worker is expected back while its losses
   are at most ``max_restarts``, and is pinged until it answers. A worker past its restarts, one that
   Ray reports dead, or one that keeps answering "unavailable" for ``restart_timeout_s`` is dead for
   good: it gets no more work, and the shards it owned go to the live workers.
2. The lost work is redone: on the restarted worker or another one. A piece of work (a shard) that
   loses its worker ``max_attempts`` times, or a pool without a live worker, ends the job with one
   ``WorkersLostError``.

``FailurePolicy`` holds the numbers and makes the decisions; ``WorkerHealth`` applies them to the
workers of one pool over its whole life (so Ray's restart count and ours agree); ``LossCounts``
counts the losses of each piece of work. None of them calls Ray; pinging is ``WorkerPool.await_restart``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Hashable

from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    WorkerCrashedError,
)

logger = logging.getLogger(__name__)


class StateLostError(RuntimeError):
    """A worker was asked about states or rollouts it no longer has (it was restarted in between)."""


class WorkerError(RuntimeError):
    """A worker raised while computing (a bad model, bad input): redoing it elsewhere would not help."""


class WorkersLostError(RuntimeError):
    """Every worker died, or a piece of work kept losing its worker."""


class DeviceMemoryError(WorkerError):
    """The model, or the model with one shard's batch, does not fit in the worker's device memory."""


OUT_OF_MEMORY_MARKS = ("CUDA out of memory", "OutOfMemoryError")


def is_out_of_memory(error: BaseException | str) -> bool:
    """Whether a worker's exception (or its text) is the device running out of memory (``torch.OutOfMemoryError``,
    CUDA's "out of memory"), which redoing elsewhere with the same batch would not fix."""
    if isinstance(error, BaseException):
        if type(error).__name__ == "OutOfMemoryError" or any(c.__name__ == "OutOfMemoryError" for c in type(error).__mro__):
            return True
        error = str(error)
    return any(mark in error for mark in OUT_OF_MEMORY_MARKS)


def out_of_memory_error(detail: str, loading: bool = False) -> DeviceMemoryError:
    """The one line for a device out of memory: what ran out, and what to change."""
    first = next((line.strip() for line in detail.splitlines() if line.strip()), "out of memory")
    if loading:
        return DeviceMemoryError(
            f"the model does not fit on the worker's device (out of memory while loading it: {first}); "
            "use a device with more memory"
        )
    return DeviceMemoryError(
        f"the model does not fit on the worker's device with this batch (out of memory: {first}); "
        "use a smaller --shard-size (samples per batch on one worker) or a device with more memory"
    )


WORKER_LOST_ERRORS = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, StateLostError)
"""Failures of the worker rather than of the computation (including a restart that lost its state):
the work is redone. ``RayActorError`` covers ``ActorUnavailableError`` (still restarting) and
``ActorDiedError`` (gone)."""


@dataclass(frozen=True)
class FailurePolicy:
    """How worker loss is handled: how often a worker comes back, how long it is waited for, when to give up.

    Attributes:
        max_restarts: losses a worker survives, the ``max_restarts`` Ray is given for each actor; the
            next loss leaves it dead for good.
        max_attempts: times one piece of work (a shard's teacher run, a shard's part of a call) may
            lose its worker; the last loss ends the job.
        restart_timeout_s: seconds a worker expected back may keep answering "unavailable" before it
            counts as dead. A ping Ray holds while it re-creates the actor (reloading its model) is
            not cut short: that takes as long as loading the model does.
        poll_s: seconds between pings while a worker answers "unavailable".
    """

    max_restarts: int = 2
    max_attempts: int = 3
    restart_timeout_s: float = 60.0
    poll_s: float = 0.2

    def __post_init__(self) -> None:
        for name, minimum in (("max_restarts", 0), ("max_attempts", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
        for name in ("restart_timeout_s", "poll_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be a number of seconds, at least 0, got {value!r}")

    @staticmethod
    def is_lost(error: BaseException) -> bool:
        """Whether ``error`` means the worker was lost (redo the work) rather than that the work failed."""
        return isinstance(error, WORKER_LOST_ERRORS)

    def comes_back(self, losses: int) -> bool:
        """Whether Ray restarts a worker that has now been lost ``losses`` times."""
        return losses <= self.max_restarts

    def keeps_waiting(self, waited_s: float) -> bool:
        """Whether a worker that has answered "unavailable" for ``waited_s`` seconds is still waited for."""
        return waited_s < self.restart_timeout_s

    def gives_up(self, losses: int) -> bool:
        """Whether a piece of work that has lost its worker ``losses`` times ends the job."""
        return losses >= self.max_attempts


class WorkerHealth:
    """Losses and deaths of one pool's workers, ``0 ... num_workers - 1``, under one policy.

    Args:
        policy: the rules.
        num_workers: workers in the pool.
    """

    def __init__(self, policy: FailurePolicy, num_workers: int):
        self.policy = policy
        self.losses = [0] * num_workers
        self.dead: set[int] = set()

    def record_loss(self, worker: int) -> bool:
        """Count a loss of ``worker``; True when Ray brings it back, False when it is now dead for good."""
        self.losses[worker] += 1
        if self.policy.comes_back(self.losses[worker]):
            return True
        self.mark_dead(worker, f"lost {self.losses[worker]} times, {self.policy.max_restarts} restarts allowed")
        return False

    def mark_dead(self, worker: int, reason: str) -> None:
        """Take ``worker`` out of service for good."""
        if worker not in self.dead:
            logger.warning("worker %d is dead for good (%s); its work goes to the live workers", worker, reason)
        self.dead.add(worker)

    def is_live(self, worker: int) -> bool:
        return worker not in self.dead

    def live(self) -> list[int]:
        """The workers still in service, in index order."""
        return [w for w in range(len(self.losses)) if w not in self.dead]

    def require_live(self, purpose: str) -> list[int]:
        """``live()``, or WorkersLostError when no worker is left for ``purpose``."""
        live = self.live()
        if not live:
            raise WorkersLostError(f"every worker died; no actor is left to {purpose}")
        return live


class LossCounts:
    """How often each piece of work lost its worker, against ``policy.max_attempts``.

    Args:
        policy: the rules.
    """

    def __init__(self, policy: FailurePolicy):
        self.policy = policy
        self.counts: Counter[Hashable] = Counter()

    def lost(self, key: Hashable, label: str) -> None:
        """Count one loss of work ``key`` (``label`` names it, e.g. ``"shard 3"``); WorkersLostError at ``max_attempts``."""
        self.counts[key] += 1
        if self.policy.gives_up(self.counts[key]):
            raise WorkersLostError(f"{label} lost its worker {self.counts[key]} times")
