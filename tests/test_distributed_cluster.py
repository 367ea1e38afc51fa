"""A simulated multi-node GPU cluster (``ray.cluster_utils.Cluster``: a CPU head and two nodes with two
logical GPUs each): one actor per GPU, and the merged statistics and plans of a single process."""

from __future__ import annotations

import os
import sys
from collections import Counter

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from olss_dist.core.calibration import Calibration
from olss_dist.distributed.cluster import cluster_gpus
from olss_dist.distributed.merge import MergeTree
from olss_dist.distributed.parallel_search import ParallelPlanner
from olss_dist.distributed.pool import WorkerPool, WorkerResources, run_shards
from olss_dist.distributed.worker import ModelSpec
from olss_dist.models import load_model
from olss_dist.prompts import make_shards, records_from_prompts
from olss_dist.core.teacher import record_trajectories, trailing_timesteps

GPU_NODES = 2
GPUS_PER_NODE = 2
TEACHER_STEPS = 40
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def gpu_cluster():
    """Head (1 CPU, no GPU) plus two worker nodes (2 CPUs, 2 logical GPUs each), all on this machine."""
    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    for _ in range(GPU_NODES):
        cluster.add_node(num_cpus=2, num_gpus=GPUS_PER_NODE)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_one_actor_per_gpu_and_merged_statistics_of_a_single_process(gpu_cluster):
    assert cluster_gpus() == GPU_NODES * GPUS_PER_NODE
    shards = make_shards(records_from_prompts([f"a sample of class {i % 10}" for i in range(16)]), 2)
    # The model runs on the CPU; the logical GPU only places the actor, as a real GPU would.
    pool = WorkerPool(ModelSpec("analytic", GUIDANCE, "cpu"), GPU_NODES * GPUS_PER_NODE, TEACHER_STEPS,
                      WorkerResources(num_gpus=1, num_cpus=1, max_restarts=0))
    try:
        placements = pool.describe()
        tree = MergeTree(len(shards))
        done_by = Counter()

        def on_result(worker, shard, result):
            tree.add(shard.shard_id, result.calibration())
            done_by[worker] += 1

        run_shards(pool, shards, on_result)
        merged = tree.result()
        parallel_plans = ParallelPlanner(merged, parallelism=2).plans([3, 6])
    finally:
        pool.shutdown()

    per_node = Counter(p["node_id"] for p in placements)
    assert sorted(per_node.values()) == [GPUS_PER_NODE] * GPU_NODES, "two actors on each GPU node, none on the head"
    for node in per_node:
        gpus = [tuple(p["gpu_ids"]) for p in placements if p["node_id"] == node]
        assert all(len(g) == 1 for g in gpus) and len(set(gpus)) == GPUS_PER_NODE, "one distinct GPU per actor"
    assert len(done_by) > 1, "shards were spread over several actors"

    model = load_model("analytic", guidance_scale=GUIDANCE)
    records = [r for s in shards for r in s.records]
    timesteps = trailing_timesteps(TEACHER_STEPS)
    states, noise_preds = record_trajectories(
        model, model.initial_noise([r.seed for r in records]), model.encode_prompts([r.prompt for r in records]),
        timesteps, model.alphas_cumprod,
    )
    single = Calibration.from_trajectories(states, noise_preds, timesteps)
    assert (merged.num_samples, merged.num_rows) == (single.num_samples, single.num_rows)
    gram, single_gram = merged.r_factor.T @ merged.r_factor, single.r_factor.T @ single.r_factor
    assert np.abs(gram - single_gram).max() <= 1e-10 * np.abs(single_gram).max()
    for plan in parallel_plans:
        expected = single.plan(plan.num_steps)
        assert plan.nodes == expected.nodes
        np.testing.assert_allclose(plan.coefficients, expected.coefficients, rtol=1e-6, atol=1e-9)
