"""Flow-matching models through the calibration: float model timesteps, the flow built-ins in OLSS form,
``calibrate(..., scheduler_config=...)``, and the Ray method equal to the in-process one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from olss_dist import Calibration, calibrate
from olss_dist.core.builtin import FLOW_LINEAR_BUILTINS, LINEAR_BUILTINS, builtin_scheduler, process_builtins
from olss_dist.core.onpolicy import rollout
from olss_dist.core.teacher import check_model_timesteps, model_timestep, trailing_timesteps
from olss_dist.models.analytic import GaussianMixtureFlowModel

TEACHER_STEPS = 60


def flow_model(guidance_scale: float = 4.0, mu: float | None = None) -> GaussianMixtureFlowModel:
    return GaussianMixtureFlowModel(guidance_scale=guidance_scale, mu=mu)


def samples(model, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, *model.latent_shape, generator=generator, dtype=torch.float64), torch.arange(count) % 10


def test_model_timestep_is_an_int_for_integer_timesteps_and_a_float_for_flow_ones():
    assert type(model_timestep(np.int64(999))) is int and type(model_timestep(torch.tensor(999))) is int
    assert type(model_timestep(np.float64(1000.0))) is float and model_timestep(torch.tensor(937.5)) == 937.5
    assert check_model_timesteps(np.array([1000.0, 937.7, 0.5])).dtype == np.float64
    assert check_model_timesteps([999, 500, 0]).dtype == np.int64
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_model_timesteps(np.array([1000.0, 1000.0]))
    with pytest.raises(ValueError, match=r"lie in \[0, 1000\]"):
        check_model_timesteps(np.array([1000.5, 3.0]), 1000)


@pytest.mark.parametrize("mu", [None, 0.8])
@pytest.mark.parametrize("name,scheduler_class", [
    ("flow-euler", FlowMatchEulerDiscreteScheduler),
    ("flow-dpmsolver++", DPMSolverMultistepScheduler),
    ("flow-unipc", UniPCMultistepScheduler),
])
def test_flow_builtin_in_olss_form_reproduces_the_diffusers_scheduler(name, scheduler_class, mu):
    model = flow_model(mu=mu)
    x_T, cond = samples(model, 6, 0)
    scheduler = builtin_scheduler(name, model.scheduler_config)
    assert isinstance(scheduler, scheduler_class)
    if name != "flow-euler":
        assert scheduler.config.use_flow_sigmas and scheduler.config.prediction_type == "flow_prediction"
        assert scheduler.config.flow_shift == 3.0
    scheduler.set_timesteps(7, **({} if mu is None else {"mu": mu}))
    x = x_T.float()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, model_timestep(t), cond), t, x).prev_sample
    plan = process_builtins(model.noise_process).plan(name, 7, model.noise_process.teacher_schedule(1000).stored_timesteps())
    assert plan.fit == f"builtin:{name}" and plan.timesteps.dtype == np.float64
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.double().numpy())
    assert plan.nodes[0] == 0 and all(b > a for a, b in zip(plan.nodes, plan.nodes[1:]))
    torch.testing.assert_close(rollout(plan.coefficients, model, x_T, cond, plan.timesteps), x.double(), rtol=1e-4, atol=1e-4)


def test_calibrate_with_a_vp_scheduler_config_equals_the_timesteps_form():
    from olss_dist.models.analytic import GaussianMixtureModel

    model = GaussianMixtureModel(guidance_scale=3.0)
    noise, cond = samples(model, 12, 4)
    validation, validation_cond = samples(model, 8, 5)
    common = dict(steps=(4,), validation_noise=validation, validation_cond=validation_cond, ridges=(1e-6,))
    by_config = calibrate(model, noise, cond, scheduler_config=model.scheduler_config, num_teacher_steps=50, **common)
    by_timesteps = calibrate(model, noise, cond, trailing_timesteps(50), model.alphas_cumprod, **common)
    assert by_config[4].nodes == by_timesteps[4].nodes and by_config[4].timesteps.dtype == np.int64
    np.testing.assert_array_equal(by_config[4].coefficients, by_timesteps[4].coefficients)
    assert by_config[4].candidates == by_timesteps[4].candidates


def test_calibrate_a_dynamically_shifted_flow_model_at_its_mu():
    model = flow_model(mu=0.8)
    noise, cond = samples(model, 8, 6)
    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    plans = calibrate(model, noise, cond, scheduler_config=config, mu=0.8, steps=(4,), validation_noise=noise,
                      validation_cond=cond, num_teacher_steps=40, ridges=(1e-6,))
    teacher = model.noise_process.teacher_schedule(40).stored_timesteps()
    names = [c["name"] for c in plans[4].candidates]
    assert {f"builtin/{name}" for name in FLOW_LINEAR_BUILTINS} <= set(names)
    if not plans[4].fit.startswith("builtin:"):
        np.testing.assert_array_equal(plans[4].timesteps, teacher[plans[4].nodes])
    with pytest.raises(ValueError, match="mu"):
        calibrate(model, noise, cond, scheduler_config=config, steps=(4,), validation_noise=noise, validation_cond=cond)


def test_process_builtins_name_the_family():
    assert process_builtins(flow_model().noise_process).names == FLOW_LINEAR_BUILTINS
    from olss_dist.models.analytic import GaussianMixtureModel

    vp = process_builtins(GaussianMixtureModel().noise_process)
    assert vp.names == LINEAR_BUILTINS and vp.spacing == "trailing"


@pytest.fixture(scope="module")
def flow_run():
    model = flow_model()
    noise, cond = samples(model, 24, 1)
    validation, validation_cond = samples(model, 24, 2)
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    plans = calibrate(model, noise, cond, scheduler_config=config, steps=(5, 10), validation_noise=validation,
                      validation_cond=validation_cond, num_teacher_steps=TEACHER_STEPS)
    return model, config, plans


def test_calibrate_a_flow_model_from_its_scheduler_config(flow_run):
    model, _, plans = flow_run
    teacher = model.noise_process.teacher_schedule(TEACHER_STEPS).stored_timesteps()
    for k, plan in plans.items():
        assert plan.num_steps == k and plan.num_teacher_steps == TEACHER_STEPS
        assert plan.timesteps.dtype == np.float64 and plan.timesteps[0] == 1000.0
        errors = {c["name"]: c["rmse"] for c in plan.candidates}
        assert {f"builtin/{name}" for name in FLOW_LINEAR_BUILTINS} <= set(errors)
        assert min(errors.values()) <= min(errors[f"builtin/{name}"] for name in FLOW_LINEAR_BUILTINS)
        if not plan.fit.startswith("builtin:"):
            np.testing.assert_array_equal(plan.timesteps, teacher[plan.nodes])
        assert np.isfinite(plan.coefficients).all()


def test_flow_calibration_round_trips_and_old_vp_files_still_load(flow_run, tmp_path):
    model, _, _ = flow_run
    schedule = model.noise_process.teacher_schedule(8)
    states = torch.randn(3, 9, 4)
    calibration = Calibration.from_trajectories(states, torch.randn(3, 8, 4), schedule.stored_timesteps())
    again = Calibration.from_bytes(calibration.to_bytes())
    assert again.timesteps.dtype == np.float64
    np.testing.assert_array_equal(again.timesteps, schedule.stored_timesteps())
    vp = Calibration.from_trajectories(states, torch.randn(3, 8, 4), trailing_timesteps(8))
    assert Calibration.from_bytes(vp.to_bytes()).timesteps.dtype == np.int64


def test_calibrate_refuses_mixed_or_missing_teacher_arguments():
    model = flow_model()
    noise, cond = samples(model, 4, 3)
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    common = dict(validation_noise=noise, validation_cond=cond)
    with pytest.raises(ValueError, match="scheduler_config: give it alone"):
        calibrate(model, noise, cond, trailing_timesteps(10), np.linspace(0.99, 0.01, 1000), scheduler_config=config, **common)
    with pytest.raises(ValueError, match="needs scheduler_config, or timesteps"):
        calibrate(model, noise, cond, **common)
    with pytest.raises(ValueError, match="mu"):
        calibrate(model, noise, cond, scheduler_config=config, mu=0.5, **common)


# ------------------------------------------------------------------------------------------ on Ray

RAY_TEACHER_STEPS = 30
RAY_SHARD_SIZE = 3


def test_flow_job_plans_equal_in_process_calibrate_and_publish_the_flow_process(local_ray, tmp_path):
    import json
    import os

    from olss_dist.distributed.job import run_job
    from olss_dist.models import load_model
    from olss_dist.prompts import read_prompts, screen_records, split_validation
    from olss_dist.spec import CalibrationSpec, ExecutionConfig

    prompts_path = tmp_path / "prompts.txt"
    prompts_path.write_text("\n".join(f"a sample of class {i % 10}, style {i}" for i in range(16)))
    spec = CalibrationSpec(model="analytic-flow", prompts=str(prompts_path), steps=(3, 5), teacher_steps=RAY_TEACHER_STEPS,
                           guidance_scale=4.0, validation_fraction=0.25, img2img_strengths=())  # as the reference
    execution = ExecutionConfig(output=str(tmp_path / "registry"), shard_size=RAY_SHARD_SIZE, keep_states="memory")
    result = run_job(spec, execution, quiet=True)

    model = load_model("analytic-flow", guidance_scale=4.0)
    fit, validation = split_validation(read_prompts(str(prompts_path)), 0.25)
    expected = calibrate(
        model, model.initial_noise([r.seed for r in fit]), model.encode_prompts([r.prompt for r in fit]),
        scheduler_config=model.scheduler_config, steps=(3, 5),
        validation_noise=model.initial_noise([r.seed for r in validation]),
        validation_cond=model.encode_prompts([r.prompt for r in validation]),
        batch_size=RAY_SHARD_SIZE, num_teacher_steps=RAY_TEACHER_STEPS,
        screen_noise=model.initial_noise([r.seed for r in screen_records(fit, CalibrationSpec().screen_count(len(fit), model.screen_multiple))]),
        screen_cond=model.encode_prompts([r.prompt for r in screen_records(fit, CalibrationSpec().screen_count(len(fit), model.screen_multiple))]),
    )
    for plan in result.plans:
        reference = expected[plan.num_steps]
        assert plan.nodes == reference.nodes and (plan.fit, plan.spacing) == (reference.fit, reference.spacing)
        np.testing.assert_array_equal(plan.timesteps, reference.timesteps)
        np.testing.assert_allclose(plan.coefficients, reference.coefficients, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose([c["rmse"] for c in plan.candidates], [c["rmse"] for c in reference.candidates], rtol=1e-6)
    assert result.calibration.timesteps.dtype == np.float64
    manifest = json.loads(open(os.path.join(result.uri, "manifest.json")).read())
    assert manifest["noise_process"] == {"kind": "flow", "mu": None}
    published = json.loads(open(os.path.join(result.uri, "scheduler_config.json")).read())
    assert published["prediction_type"] == "flow_prediction" and published["shift"] == 3.0
    assert not published["use_dynamic_shifting"] and published["mu"] is None
    from olss_dist.scheduler import OLSSScheduler

    scheduler = OLSSScheduler.from_pretrained(result.uri)
    assert scheduler.available_steps == [3, 5]
    scheduler.set_timesteps(5)
    np.testing.assert_allclose(scheduler.timesteps.double().numpy(), result.plans[1].timesteps, rtol=1e-6)

    from olss_dist.apps.evaluate import run_evaluation

    evaluation = run_evaluation("analytic-flow", result.uri, num_samples=8, seed_offset=7)
    rows = {(r.name, r.variant, r.num_steps): r for r in evaluation.results}
    assert {name for name, _, _ in rows} == {"olss", "olss-paper", *FLOW_LINEAR_BUILTINS}
    assert all(variant in ("shipped", "same nodes", "uniform", "config") for _, variant, _ in rows)
    assert evaluation.info["teacher_steps"] == RAY_TEACHER_STEPS
    for k in (3, 5):
        shipped = rows[("olss", "shipped", k)]
        assert shipped.model_calls == k and np.isfinite(shipped.metrics["rmse"]), shipped.note
        assert all(np.isfinite(rows[(name, "config", k)].metrics["rmse"]) for name in FLOW_LINEAR_BUILTINS)


def test_a_calibration_file_in_the_format_written_before_flow_support_loads_as_vp():
    from safetensors.numpy import save

    n = 6
    r = np.triu(np.random.default_rng(0).standard_normal((2 * n + 1, 2 * n + 1))) + 5 * np.eye(2 * n + 1)
    old = save({"r_factor": r, "timesteps": trailing_timesteps(n)},
               metadata={"format": "olss_dist.core.calibration", "format_version": "1", "num_samples": "3", "num_rows": "12"})
    calibration = Calibration.from_bytes(old)
    assert calibration.timesteps.dtype == np.int64 and calibration.timesteps.tolist() == trailing_timesteps(n).tolist()
    plan = calibration.plan(3)
    assert plan.timesteps.dtype == np.int64 and plan.timesteps.tolist() == trailing_timesteps(n)[plan.nodes].tolist()
