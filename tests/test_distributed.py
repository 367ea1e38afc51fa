"""The Ray edge on a local Ray: actors, streaming merge, fault tolerance, parallel planner, checkpoints."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import ray

from olss_dist.core.builtin import builtin_plan
from olss_dist.core.calibration import Calibration
from olss_dist.distributed.checkpoints import ShardCheckpoints
from olss_dist.distributed.failure import FailurePolicy, LossCounts, StateLostError, WorkerError, WorkerHealth
from olss_dist.distributed.job import scheduler_config_bytes
from olss_dist.distributed.merge import MergeTree
from olss_dist.distributed.parallel_search import ParallelPlanner, speculative_midpoints
from olss_dist.distributed.pool import WorkerPool, WorkerResources, WorkersLostError, run_shards
from olss_dist.distributed.worker import CalibrationWorker, ModelSpec
from olss_dist.method.run import builtin_config
from olss_dist.models.analytic import GaussianMixtureModel
from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.core.path_search import search_path
from olss_dist.prompts import make_shards, records_from_prompts
from olss_dist.scheduler import OLSSScheduler
from olss_dist.core.teacher import record_trajectories, trailing_timesteps

TEACHER_STEPS = 40
SPEC = ModelSpec("analytic", guidance_scale=3.0, device="cpu")


def analytic_shards(num_prompts: int = 12, shard_size: int = 3):
    records = records_from_prompts([f"a sample of class {i % 10}" for i in range(num_prompts)])
    return make_shards(records, shard_size)


def in_process_shard_calibration(shard) -> Calibration:
    """One shard's statistics computed in this process, exactly as a worker does."""
    model = GaussianMixtureModel(guidance_scale=SPEC.guidance_scale)
    timesteps = trailing_timesteps(TEACHER_STEPS)
    states, noise_preds = record_trajectories(
        model, model.initial_noise(shard.seeds), model.encode_prompts(shard.prompts), timesteps, model.alphas_cumprod
    )
    return Calibration.from_trajectories(states, noise_preds, timesteps)


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------------------- no Ray needed


def test_merge_tree_result_does_not_depend_on_arrival_order():
    shards = analytic_shards(num_prompts=15, shard_size=3)
    calibrations = [in_process_shard_calibration(s) for s in shards]
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 4, 1, 0, 2]):
        tree = MergeTree(len(shards))
        for shard_id in order:
            assert not tree.complete
            tree.add(shard_id, calibrations[shard_id])
        results.append(tree.result())
        assert tree.num_merges == len(shards) - 1
    for other in results[1:]:
        np.testing.assert_array_equal(other.r_factor, results[0].r_factor)
    reference = Calibration.merge(calibrations)
    gram, reference_gram = results[0].r_factor.T @ results[0].r_factor, reference.r_factor.T @ reference.r_factor
    assert relative_difference(gram, reference_gram) < 1e-12
    assert results[0].num_samples == 15 and results[0].num_rows == reference.num_rows


def test_merge_tree_refuses_a_shard_twice_and_reports_missing_ones():
    calibration = in_process_shard_calibration(analytic_shards()[0])
    tree = MergeTree(3)
    tree.add(1, calibration)
    with pytest.raises(ValueError, match="already merged"):
        tree.add(1, calibration)
    with pytest.raises(ValueError, match="outside"):
        tree.add(3, calibration)
    with pytest.raises(RuntimeError, match=r"shards \[0, 2\]"):
        tree.result()


def test_failure_policy_decides_what_is_lost_who_comes_back_and_when_to_give_up():
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    policy = FailurePolicy(max_restarts=1, max_attempts=3, restart_timeout_s=10.0, poll_s=0.5)
    assert policy.is_lost(ActorDiedError()) and policy.is_lost(ActorUnavailableError("restarting", None))
    assert policy.is_lost(StateLostError("restarted in between"))
    assert not policy.is_lost(WorkerError("ValueError: bad input")) and not policy.is_lost(ValueError())
    assert policy.keeps_waiting(9.5) and not policy.keeps_waiting(10.0)

    health = WorkerHealth(policy, 2)
    assert health.record_loss(0), "first loss: Ray restarts the actor (max_restarts=1)"
    assert not health.record_loss(0), "second loss: past its restarts, dead for good"
    assert health.live() == [1] and not health.is_live(0)
    health.mark_dead(1, "Ray reports it dead")
    with pytest.raises(WorkersLostError, match="every worker died; no actor is left to compute shards"):
        health.require_live("compute shards")
    assert not WorkerHealth(FailurePolicy(max_restarts=0), 1).record_loss(0), "no restarts: the first loss is final"

    losses = LossCounts(policy)
    losses.lost(("train", 4), "train shard 4")
    losses.lost(("train", 4), "train shard 4")
    losses.lost(("train", 5), "train shard 5")
    with pytest.raises(WorkersLostError, match="train shard 4 lost its worker 3 times"):
        losses.lost(("train", 4), "train shard 4")


def test_failure_policy_and_pool_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match="max_restarts must be an integer of at least 0, got -1"):
        FailurePolicy(max_restarts=-1)
    with pytest.raises(ValueError, match="max_attempts"):
        FailurePolicy(max_attempts=0)
    with pytest.raises(ValueError, match="restart_timeout_s"):
        FailurePolicy(restart_timeout_s=float("nan"))
    with pytest.raises(ValueError, match="^num_workers: must be at least 1, got 0$"):
        WorkerPool(SPEC, 0, TEACHER_STEPS)
    with pytest.raises(ValueError, match=r"failure.max_restarts \(2\) must equal resources.max_restarts \(0\)"):
        WorkerPool(SPEC, 1, TEACHER_STEPS, WorkerResources(max_restarts=0), failure=FailurePolicy(max_restarts=2))


def test_speculative_midpoints_cover_the_next_bisection_levels():
    probes = speculative_midpoints(0.0, 8.0, 2)
    assert probes == [4.0, 2.0, 6.0]
    assert speculative_midpoints(1.0, 1.0, 3) == []


def test_checkpoints_round_trip_and_reject_stale_or_corrupt(tmp_path):
    shards = analytic_shards()
    calibration = in_process_shard_calibration(shards[0])
    checkpoints = ShardCheckpoints(str(tmp_path / "staging"), "a" * 64)
    checkpoints.save(shards[0], calibration)
    restored = checkpoints.load_finished(shards)
    assert list(restored) == [0]
    np.testing.assert_array_equal(restored[0].r_factor, calibration.r_factor)
    assert ShardCheckpoints(str(tmp_path / "staging"), "b" * 64).load(shards[0]) is None, "other statistics config"
    other_records = make_shards(records_from_prompts(["different prompt"] * 3), 3)[0]
    assert checkpoints.load(other_records) is None, "same shard id, different records"
    data_path = tmp_path / "staging" / "shard-000000.safetensors"
    data_path.write_bytes(data_path.read_bytes()[:-8] + b"\0" * 8)
    assert checkpoints.load(shards[0]) is None, "bytes no longer match the recorded sha256"
    checkpoints.remove_all()
    assert not any((tmp_path / "staging").glob("shard-*"))


# ------------------------------------------------------------------------------------------ local Ray


class SlowCalibrationWorker(CalibrationWorker):
    """A worker whose shards take at least ``delay_s``: time to kill it in the middle of one."""

    delay_s = 1.0

    def compute_shard(self, shard):
        time.sleep(self.delay_s)
        return super().compute_shard(shard)


def merged_run(pool, shards):
    tree = MergeTree(len(shards))
    run_shards(pool, shards, lambda worker, shard, result: tree.add(shard.shard_id, result.calibration()))
    return tree.result()


def in_process_reference(shards) -> Calibration:
    tree = MergeTree(len(shards))
    for shard in shards:
        tree.add(shard.shard_id, in_process_shard_calibration(shard))
    return tree.result()


@pytest.fixture(scope="module")
def clean_run(local_ray) -> Calibration:
    """Merged statistics of ``analytic_shards()`` from a run where nothing fails."""
    pool = WorkerPool(SPEC, 2, TEACHER_STEPS)
    try:
        return merged_run(pool, analytic_shards())
    finally:
        pool.shutdown()


def test_pool_statistics_equal_in_process_statistics(clean_run):
    reference = in_process_reference(analytic_shards())
    assert clean_run.num_samples == 12 and clean_run.num_rows == reference.num_rows
    # Workers run single-threaded, this process does not: R agrees to rounding in its rank-deficient
    # rows only, R^T R (= A^T A) agrees tightly.
    gram, reference_gram = clean_run.r_factor.T @ clean_run.r_factor, reference.r_factor.T @ reference.r_factor
    assert relative_difference(gram, reference_gram) <= 1e-10


def kill_after(delay_s: float, pid: int) -> threading.Thread:
    def kill():
        time.sleep(delay_s)
        os.kill(pid, 9)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_worker_killed_mid_shard_is_restarted_and_its_shard_recomputed(clean_run):
    shards = analytic_shards(num_prompts=12, shard_size=3)
    pool = WorkerPool(SPEC, 2, TEACHER_STEPS, worker_class=SlowCalibrationWorker)
    try:
        victim = pool.describe()[0]["pid"]
        killer = kill_after(0.5 * SlowCalibrationWorker.delay_s, victim)
        computed = []
        tree = MergeTree(len(shards))

        def on_result(worker, shard, result):
            computed.append((shard.shard_id, result.worker))
            tree.add(shard.shard_id, result.calibration())

        run_shards(pool, shards, on_result)
        killer.join()
        pids_after = {d["pid"] for d in pool.describe()}
    finally:
        pool.shutdown()
    assert victim not in pids_after, "the killed actor was restarted in a new process"
    assert sorted(shard_id for shard_id, _ in computed) == [0, 1, 2, 3], "every shard merged exactly once"
    assert all(not worker.endswith(f":{victim}") for _, worker in computed), "nothing came from the killed process"
    assert relative_difference(tree.result().r_factor, clean_run.r_factor) <= 1e-12


def test_worker_dead_for_good_leaves_its_shards_to_the_live_ones(clean_run):
    shards = analytic_shards(num_prompts=12, shard_size=3)
    no_restarts = WorkerResources(num_gpus=0, num_cpus=1, max_restarts=0)
    pool = WorkerPool(SPEC, 2, TEACHER_STEPS, no_restarts, worker_class=SlowCalibrationWorker)
    try:
        victim = pool.describe()[1]["pid"]
        killer = kill_after(0.5 * SlowCalibrationWorker.delay_s, victim)
        merged = merged_run(pool, shards)
        killer.join()
    finally:
        pool.shutdown()
    assert relative_difference(merged.r_factor, clean_run.r_factor) <= 1e-12


def test_all_workers_dead_is_one_clear_error(local_ray):
    shards = analytic_shards(num_prompts=6, shard_size=3)
    no_restarts = WorkerResources(num_gpus=0, num_cpus=1, max_restarts=0)
    pool = WorkerPool(SPEC, 1, TEACHER_STEPS, no_restarts, worker_class=SlowCalibrationWorker)
    try:
        killer = kill_after(0.5 * SlowCalibrationWorker.delay_s, pool.describe()[0]["pid"])
        with pytest.raises(WorkersLostError, match="every worker died"):
            merged_run(pool, shards)
        killer.join()
    finally:
        pool.shutdown()


@pytest.mark.parametrize("on", ["tasks", "actors"])
def test_parallel_planner_equals_in_process_planner_exactly(clean_run, on):
    calibration = clean_run
    # "actors": the job's way, the evaluations on the pool's own actors (each keeps one memoised search)
    pool = WorkerPool(SPEC, 2, TEACHER_STEPS) if on == "actors" else None
    try:
        planner = ParallelPlanner(calibration, parallelism=3, pool=pool)
        for num_steps in (1, 3, 8):
            nodes, errors = planner.search_path(num_steps)
            expected_nodes, expected_errors = search_path(calibration.r_factor, calibration.num_rows, num_steps)
            assert nodes == expected_nodes
            np.testing.assert_array_equal(errors, expected_errors)
        plans = planner.plans([4, 6])
        for plan in plans:
            expected = calibration.plan(plan.num_steps)
            assert plan.nodes == expected.nodes and plan.spacing == expected.spacing
            np.testing.assert_array_equal(plan.coefficients, expected.coefficients)
        if pool is not None:  # both actors evaluated (each holds its memoised search) and let go of R after
            searching = lambda actor: ray.get(actor.__ray_call__.remote(lambda self: self._path_search is not None))
            assert [searching(actor) for actor in pool.actors] == [True, True]
            planner.release()
            assert [searching(actor) for actor in pool.actors] == [False, False]
    finally:
        if pool is not None:
            pool.shutdown()


def test_published_scheduler_config_carries_the_model_noise_schedule_and_prediction_type():
    alphas_cumprod = alphas_cumprod_from_config({"beta_schedule": "squaredcos_cap_v2"})
    plans = [builtin_plan("ddim", 5, builtin_config(alphas_cumprod), trailing_timesteps(1000))]
    config = scheduler_config_bytes(plans, alphas_cumprod, "v_prediction")
    scheduler = OLSSScheduler.from_config(json.loads(config))
    assert scheduler.config.prediction_type == "v_prediction"
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-12, atol=1e-15)
