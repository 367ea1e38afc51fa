"""The method on Ray: the job's plans equal ``olss_dist.calibrate`` in one process, and a worker lost
during the on-policy rounds changes nothing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from olss_dist.distributed.backend import RayRolloutBackend
from olss_dist.distributed.checkpoints import ShardCheckpoints
from olss_dist.distributed.job import run_job
from olss_dist.distributed.pool import WorkerPool, WorkerResources
from olss_dist.distributed.progress import ShardProgress
from olss_dist.distributed.worker import ModelSpec
from olss_dist.method.run import calibrate, run_method
from olss_dist.models import load_model
from olss_dist.prompts import make_shards, read_prompts, records_from_prompts, screen_records, split_validation
from olss_dist.method.rollouts import TRAIN
from olss_dist.scheduler import OLSSScheduler
from olss_dist.spec import CalibrationSpec, ExecutionConfig
from olss_dist.core.teacher import trailing_timesteps

GUIDANCE = 3.0
TEACHER_STEPS = 40
SHARD_SIZE = 3


def in_process_plans(fit, validation, steps, **method_options):
    """``olss_dist.calibrate`` in this process on the same samples (the tail screen's too), batched like the job's shards."""
    model = load_model("analytic", guidance_scale=GUIDANCE)
    prompts = [r.prompt for r in fit]
    screen = screen_records(fit, CalibrationSpec().screen_count(len(fit), model.screen_multiple))
    method_options.setdefault("screen_noise", model.initial_noise([r.seed for r in screen]))
    method_options.setdefault("screen_cond", model.encode_prompts([r.prompt for r in screen]))
    return calibrate(
        model,
        model.initial_noise([r.seed for r in fit]),
        model.encode_prompts(prompts),
        trailing_timesteps(TEACHER_STEPS),
        model.alphas_cumprod,
        steps=steps,
        validation_noise=model.initial_noise([r.seed for r in validation]),
        validation_cond=model.encode_prompts([r.prompt for r in validation]),
        batch_size=SHARD_SIZE,
        **method_options,
    )


def assert_same_plan(plan, expected, rtol=1e-6):
    assert plan.nodes == expected.nodes
    assert (plan.fit, plan.spacing) == (expected.fit, expected.spacing)
    np.testing.assert_allclose(plan.coefficients, expected.coefficients, rtol=rtol, atol=rtol * 1e-3)
    assert [c["name"] for c in plan.candidates] == [c["name"] for c in expected.candidates]
    np.testing.assert_allclose([c["rmse"] for c in plan.candidates], [c["rmse"] for c in expected.candidates], rtol=rtol)


def test_job_plans_equal_in_process_calibrate(local_ray, tmp_path):
    prompts_path = tmp_path / "prompts.txt"
    prompts_path.write_text("\n".join(f"a photo of digit {i % 10}, style {i}" for i in range(16)))
    spec = CalibrationSpec(
        model="analytic",
        prompts=str(prompts_path),
        steps=(3, 5),
        teacher_steps=TEACHER_STEPS,
        guidance_scale=GUIDANCE,
        validation_fraction=0.25,
        img2img_strengths=(),  # as the in-process reference (start plans on Ray: tests/test_start_plans.py)
    )
    execution = ExecutionConfig(output=str(tmp_path / "registry"), shard_size=SHARD_SIZE, keep_states="memory")
    result = run_job(spec, execution, quiet=True)

    fit, validation = split_validation(read_prompts(str(prompts_path)), 0.25)
    expected = in_process_plans(fit, validation, (3, 5))
    for plan in result.plans:
        assert_same_plan(plan, expected[plan.num_steps])
    run_dir = result.uri
    report = json.loads(open(os.path.join(run_dir, "report.json")).read())
    assert [p["num_steps"] for p in report["plans"]] == [3, 5]
    for entry, plan in zip(report["plans"], result.plans):  # why each plan ships (method.choice), as the plan says
        assert entry["choice"] == plan.choice and entry["choice"]["shipped"] in [c["name"] for c in entry["candidates"]]
        assert entry["choice"]["validation_samples"] == 4 and entry["choice"]["reason"]
    assert report["calibrated_conditions"] == {"guidance_scales": [GUIDANCE], "resolutions": None, "negative_prompts": []}
    scheduler_plans = json.loads(open(os.path.join(run_dir, "olss_plans.json")).read())  # the scheduler's own copy
    assert scheduler_plans["calibrated_conditions"]["guidance_scales"] == [GUIDANCE]
    assert scheduler_plans["calibrated_conditions"]["latent_shapes"]
    for entry in report["plans"]:  # the tail screen ran on the job's fresh samples: the analytic model's 64 per fit prompt
        assert entry["choice"]["tail_screen"]["samples"] == 64 * len(fit) == 768
    statistics = report["statistics"]
    # 4 held-out prompts over 4 workers: one validation shard each, so every worker runs a held-out teacher
    assert statistics["computed_shards"] == 4 and statistics["validation_teacher_runs"] == 4
    assert statistics["teacher_reruns"] == 0 and statistics["worker_recoveries"] == 0
    assert len({w["worker"] for w in report["workers"]}) == 4, "one actor per CPU (the path search runs on them too)"
    assert OLSSScheduler.from_pretrained(run_dir).available_steps == [3, 5]


# ------------------------------------------------------------------------------ losses during rounds

STEPS = (4,)
FAST_METHOD = dict(builtins=(), ridges=(0.0,))


def small_split():
    records = records_from_prompts([f"a sample of class {i % 10}" for i in range(15)])
    return split_validation(records, 0.2)


class KillingBackend(RayRolloutBackend):
    """Kills the process of the worker owning train shard 0 right before the ``kill_at``-th call of ``killed_in``
    (here ``advance``: an on-policy fit's step)."""

    kill_at = 3
    killed_in = "advance"  # the call that is counted

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.advances = 0
        self.killed_pid = None

    def _count(self, call):
        if call != self.killed_in:
            return
        self.advances += 1
        if self.advances == self.kill_at:
            import ray

            owner = self.pool.actors[self.owners[(TRAIN, 0)]]
            self.killed_pid = ray.get(owner.pid.remote())
            os.kill(self.killed_pid, 9)

    def advance(self, handle, weights, next_timestep):
        self._count("advance")
        super().advance(handle, weights, next_timestep)

    def advance_steps(self, handle, steps):
        self._count("advance_steps")
        super().advance_steps(handle, steps)


class KillingInStepsBackend(KillingBackend):
    """Kills the same worker right before the ``kill_at``-th ``advance_steps`` (a validation or screen rollout's
    steps in one call): its open rollouts, those of other splits included, are replayed from their histories."""

    killed_in = "advance_steps"


def method_on_ray(tmp_path, keep_states, backend_class=RayRolloutBackend, resources=WorkerResources()):
    fit, validation = small_split()
    pool = WorkerPool(ModelSpec("analytic", GUIDANCE, "cpu"), 2, TEACHER_STEPS, resources, keep_states=keep_states,
                      state_dir=str(tmp_path / "states"))
    try:
        backend = backend_class(
            pool, make_shards(fit, SHARD_SIZE), make_shards(validation, SHARD_SIZE),
            ShardCheckpoints(str(tmp_path / "staging"), "0" * 64), ShardProgress(4, len(fit), quiet=True),
            planned_steps=STEPS, planner_parallelism=2,
        )
        model = load_model("analytic", guidance_scale=GUIDANCE)
        plans, _ = run_method(backend, model.noise_process, TEACHER_STEPS, STEPS, **FAST_METHOD)
        backend.clear_states()
        return plans, backend
    finally:
        pool.shutdown()


@pytest.fixture(scope="module")
def clean_plans(local_ray, tmp_path_factory):
    return method_on_ray(tmp_path_factory.mktemp("clean"), "memory")[0]


@pytest.mark.parametrize("keep_states, reruns, killing", [("memory", "recomputed", KillingBackend),
                                                           ("disk", "read back", KillingBackend),
                                                           ("memory", "recomputed", KillingInStepsBackend)],
                         ids=["memory-recomputed", "disk-read back", "memory-in advance_steps"])
def test_worker_lost_during_rounds_is_recovered_and_plans_equal_a_clean_run(clean_plans, tmp_path, keep_states, reruns,
                                                                            killing):
    plans, backend = method_on_ray(tmp_path, keep_states, killing)
    assert backend.killed_pid is not None and backend.summary.recoveries >= 1
    if reruns == "read back":
        assert backend.summary.teacher_runs == 0, "the restarted worker read its states back from the node's disk"
    else:
        assert backend.summary.teacher_runs >= 1, "the restarted worker reran the teacher for its shards"
    for k in STEPS:
        assert plans[k].nodes == clean_plans[k].nodes
        np.testing.assert_allclose(plans[k].coefficients, clean_plans[k].coefficients, rtol=1e-12, atol=0)
        assert [c["rmse"] for c in plans[k].candidates] == pytest.approx([c["rmse"] for c in clean_plans[k].candidates], rel=1e-12)
    assert not any((tmp_path / "states").rglob("*.npy")), "states are cleared after the run"


def test_worker_dead_for_good_during_rounds_leaves_its_shards_to_the_live_one(clean_plans, tmp_path):
    no_restarts = WorkerResources(num_gpus=0, num_cpus=1, max_restarts=0)
    plans, backend = method_on_ray(tmp_path, "memory", KillingBackend, no_restarts)
    killed = backend.pool.health.dead
    assert backend.killed_pid is not None and len(killed) == 1 and backend.summary.recoveries == 1
    assert all(backend.owners[key] not in killed for key in backend.owners.owner), "every shard has a live owner"
    assert backend.summary.teacher_runs >= 1, "the live worker reran the teacher for the shards it took over"
    for k in STEPS:
        assert plans[k].nodes == clean_plans[k].nodes
        np.testing.assert_allclose(plans[k].coefficients, clean_plans[k].coefficients, rtol=1e-12, atol=0)


def test_the_screen_teacher_runs_where_the_samples_are_and_equals_in_process(local_ray, tmp_path):
    """``teacher_differences`` on Ray: each asked screen sample's owner runs the teacher on it alone (any order,
    repeats, across shards and workers) and the values equal the in-process backend's on the same samples."""
    from olss_dist.core.builtin import process_builtins
    from olss_dist.method.rollouts import SCREEN, InProcessBackend
    from olss_dist.method.screen import run_to_end

    fit, validation = small_split()
    screen = screen_records(fit, 10)
    model = load_model("analytic", guidance_scale=GUIDANCE)
    pool = WorkerPool(ModelSpec("analytic", GUIDANCE, "cpu"), 2, TEACHER_STEPS, WorkerResources(), keep_states="memory")
    try:
        backend = RayRolloutBackend(
            pool, make_shards(fit, SHARD_SIZE), make_shards(validation, SHARD_SIZE),
            ShardCheckpoints(str(tmp_path / "staging"), "0" * 64), ShardProgress(4, len(fit), quiet=True),
            planned_steps=(), planner_parallelism=2, screen_shards=make_shards(screen, SHARD_SIZE),
        )
        schedule = model.noise_process.teacher_schedule(TEACHER_STEPS)
        backend.record_teacher(schedule)
        backend.keep_train_states([0])  # as run_method does: every shard, the screen's too, gets its owner
        plan = process_builtins(model.noise_process).plan("ddim", 4, schedule.stored_timesteps())
        handle = run_to_end(backend, SCREEN, plan.coefficients, plan.timesteps)
        asked = [9, 0, 4, 9, 3]  # shards of 3: the last, the first twice over, a middle one
        on_ray = backend.teacher_differences(handle, asked)
        np.testing.assert_array_equal(backend.teacher_differences(handle, asked), on_ray)  # kept, not run again
        with pytest.raises(ValueError, match="not in the screen split"):
            backend.teacher_differences(handle, [10])
        backend.close(handle)
    finally:
        pool.shutdown()
    local = InProcessBackend(model, model.initial_noise([r.seed for r in fit]), model.encode_prompts([r.prompt for r in fit]),
                             screen_noise=model.initial_noise([r.seed for r in screen]),
                             screen_cond=model.encode_prompts([r.prompt for r in screen]), batch_size=2)
    local.record_teacher(schedule)
    handle = run_to_end(local, SCREEN, plan.coefficients, plan.timesteps)
    np.testing.assert_allclose(on_ray, local.teacher_differences(handle, asked), rtol=1e-9)
    assert on_ray[0] == on_ray[3] and on_ray.max() > 0
