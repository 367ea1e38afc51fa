"""Connecting to Ray and asking it what hardware the job can use.

Under ``ray job submit`` (or with ``RAY_ADDRESS`` set) ``ray.init()`` joins the running cluster; with
neither it starts a private local Ray (even where another Ray runs on this machine), so the same script is
both the cluster job and the local run.
With token authentication (``RAY_AUTH_MODE=token``, the default for local clusters from Ray 2.59)
Ray finds the token itself: ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token``. Jobs submitted to a token cluster inherit the head's settings.

A job reserves everything it needs up front (``reserve``): one placement group holding a bundle per
actor, so two jobs on one cluster never split its CPUs between them and starve each other. The job's
path searches run inside its own actors (``parallel_search.ParallelPlanner``), so it needs nothing
outside its reservation. A job the cluster cannot hold now waits, saying so, until another job's
reservation is released (or ``timeout_s`` passes: ``ReservationTimeout``, one line).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

LOCAL_CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Join a Ray cluster, or start a local one; returns True when a running cluster was joined.

    Args:
        address: cluster address (``"auto"``, ``"host:port"``, ``"ray://..."``); ``None`` uses
            ``RAY_ADDRESS`` when set (always the case under ``ray job submit``).
        num_cpus: logical CPUs of a local Ray (ignored when joining a cluster).
        num_gpus: logical GPUs of a local Ray (ignored when joining a cluster).
    """
    if ray.is_initialized():
        return True
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    for name, value in LOCAL_CLUSTER_ENV.items():
        os.environ.setdefault(name, value)
    # "local": a private Ray even where another one runs on this machine (plain ``ray.init()`` would join the
    # newest local cluster, e.g. another local job's, and refuse num_cpus there)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=True)
    return False


def cluster_gpus() -> int:
    """Whole GPUs the cluster has now (logical GPUs included)."""
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    """Logical CPUs the cluster has now."""
    return int(ray.cluster_resources().get("CPU", 0))


def wait_for_gpus(count: int, timeout_s: float, poll_s: float = 5.0) -> int:
    """Ask the autoscaler for ``count`` GPUs and wait up to ``timeout_s`` seconds until they have joined.

    Returns:
        the GPUs the cluster has when the wait ends (possibly fewer than ``count``, possibly 0).
    """
    if cluster_gpus() >= count or timeout_s <= 0:
        return cluster_gpus()
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * count)
    deadline = time.monotonic() + timeout_s
    while cluster_gpus() < count and time.monotonic() < deadline:
        time.sleep(poll_s)
    return cluster_gpus()


class ReservationTimeout(RuntimeError):
    """The cluster could not hold the job's reservation within the time the job was given."""


WAIT_NOTICE_S = 2.0
"""A reservation not granted within this many seconds is reported as waiting."""
WAIT_REPEAT_S = 300.0
"""While a job waits for its reservation, it says so again this often."""


def describe_bundles(bundles: Sequence[dict[str, float]]) -> str:
    """``"2 x {CPU: 1}"``-style text of a reservation's bundles, for messages."""
    counts: dict[tuple, int] = {}
    for bundle in bundles:
        key = tuple(sorted(bundle.items()))
        counts[key] = counts.get(key, 0) + 1
    parts = []
    for key, count in counts.items():
        parts.append(f"{count} x {{" + ", ".join(f"{name}: {value:g}" for name, value in key) + "}")
    return " + ".join(parts)


def resources_text(resources: dict[str, float]) -> str:
    """``"CPU 2, GPU 0"`` of a Ray resources mapping (CPUs and GPUs only)."""
    return ", ".join(f"{name} {resources.get(name, 0):g}" for name in ("CPU", "GPU"))


@dataclass
class Reservation:
    """A job's placement group: one bundle per actor, granted as a whole.

    Attributes:
        group: the Ray placement group.
        bundles: its bundles (bundle ``i`` holds actor ``i``).
        waited_s: seconds the job waited for the cluster to grant it.
        granted_unix: when it was granted (``time.time()``).
    """

    group: PlacementGroup
    bundles: list[dict[str, float]]
    waited_s: float = 0.0
    granted_unix: float = 0.0

    def strategy(self, bundle_index: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling strategy of the actor held by bundle ``bundle_index``."""
        return PlacementGroupSchedulingStrategy(
            placement_group=self.group,
            placement_group_bundle_index=bundle_index,
            placement_group_capture_child_tasks=True,
        )

    def release(self) -> None:
        """Give the bundles back to the cluster (also done by Ray when the job's driver exits)."""
        try:
            remove_placement_group(self.group)
        except Exception:  # already removed, or Ray is shutting down: nothing is held either way
            pass


def reserve(
    bundles: Sequence[dict[str, float]],
    timeout_s: float | None = None,
    log: Callable[[str], None] = print,
    name: str = "",
) -> Reservation:
    """Reserve ``bundles`` as one placement group, waiting while the cluster cannot hold them.

    Args:
        bundles: Ray resources of each actor, e.g. ``[{"CPU": 1}] * 2`` or ``[{"CPU": 1, "GPU": 1}] * 8``.
        timeout_s: seconds to wait for the cluster; ``None`` waits until it can hold the job.
        log: where the waiting message goes (one line when the wait starts, then every ``WAIT_REPEAT_S``).
        name: placement group name (shown by ``ray list placement-groups``).

    Raises:
        ReservationTimeout: not granted within ``timeout_s`` (the placement group is removed again).
    """
    bundles = [dict(bundle) for bundle in bundles]
    group = placement_group(bundles, strategy="PACK", name=name)
    started = time.monotonic()
    ready = group.ready()
    first = WAIT_NOTICE_S if timeout_s is None else min(WAIT_NOTICE_S, timeout_s)
    granted, _ = ray.wait([ready], timeout=first)
    if not granted:
        limit = "" if timeout_s is None else f" (at most {timeout_s:g}s, --reserve-timeout)"
        log(
            f"waiting for the cluster to hold this job: {describe_bundles(bundles)}; the cluster has "
            f"{resources_text(ray.cluster_resources())}, free now {resources_text(ray.available_resources())}; "
            f"other jobs hold the rest{limit}"
        )
    while not granted:
        waited = time.monotonic() - started
        if timeout_s is not None and waited >= timeout_s:
            remove_placement_group(group)
            raise ReservationTimeout(
                f"the cluster could not hold this job ({describe_bundles(bundles)}) within {timeout_s:g}s: it has "
                f"{resources_text(ray.cluster_resources())}, free {resources_text(ray.available_resources())}; "
                "other jobs hold the rest (wait longer with --reserve-timeout, or ask for fewer --num-workers)"
            )
        step = WAIT_REPEAT_S if timeout_s is None else min(WAIT_REPEAT_S, timeout_s - waited)
        granted, _ = ray.wait([ready], timeout=max(step, 0.01))
        if not granted and (timeout_s is None or time.monotonic() - started < timeout_s):
            log(f"still waiting for the cluster to hold this job ({time.monotonic() - started:.0f}s)")
    waited = time.monotonic() - started
    if waited > first:
        log(f"the cluster holds this job after waiting {waited:.0f}s")
    return Reservation(group, bundles, waited, time.time())
