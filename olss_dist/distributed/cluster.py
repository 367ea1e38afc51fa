"""Connecting to Ray and asking it what hardware the job can use.

Under ``ray job submit`` (or with ``RAY_ADDRESS`` set) ``ray.init()`` joins the running cluster; with
neither it starts a private local Ray, so the same script is both the cluster job and the local run.
With token authentication (``RAY_AUTH_MODE=token``, the default for local clusters from Ray 2.59)
Ray finds the token itself: ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token``. Jobs submitted to a token cluster inherit the head's settings.
"""

from __future__ import annotations

import os
import time

import ray

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
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=True)
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
