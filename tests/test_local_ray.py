"""``distributed.cluster.connect`` without an address starts a private local Ray, even while another local Ray
runs on this machine (a ``ray start`` head, a test's simulated cluster): a plain ``ray.init()`` would find the
newest local cluster and join it (with ``num_cpus`` given, Ray refuses that with a traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_flow_pipelines_e2e import REPO, job_env

OTHER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
print(cluster.address, flush=True)  # the newest local cluster now (/tmp/ray/ray_current_cluster), as after `ray start`
sys.stdin.read()
cluster.shutdown()
"""

OURS = """
import ray
from olss_dist.distributed.cluster import connect
joined = connect(num_cpus=3)
print(joined, int(ray.cluster_resources()["CPU"]), ray.get_runtime_context().gcs_address)
"""


@pytest.mark.slow  # two local Rays start (~10 s each on the loaded test machine)
def test_a_local_ray_is_private_while_another_local_ray_runs():
    other = subprocess.Popen([sys.executable, "-c", OTHER], cwd=REPO, env=job_env(), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        other_address = other.stdout.readline().strip()
        assert other_address, "the other local Ray started"
        ours = subprocess.run([sys.executable, "-c", OURS], cwd=REPO, env=job_env(), capture_output=True, text=True,
                              timeout=180)  # fmt: skip
        assert ours.returncode == 0, ours.stderr[-2000:]
        joined, cpus, address = ours.stdout.split()
        assert (joined, cpus) == ("False", "3") and address != other_address
    finally:
        other.stdin.close()
        other.wait(timeout=60)
