"""OLSSScheduler (VP): the incremental step replays the plans, fallbacks and start plans are the built-ins they name,
config and plans files round trip, and diffusers' scheduler contract (add_noise, velocity, begin index, dtypes).

Pipelines on the embedded model: tests/test_scheduler_pipelines.py; flow models: tests/test_scheduler_flow.py.
"""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from core_data import small_model, trajectories
from olss_dist import Calibration, OLSSScheduler

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
DIGITS = torch.tensor([0, 1, 2, 3])


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def plans():
    states, noise_preds, timesteps = trajectories()
    calibration = Calibration.from_trajectories(states, noise_preds, timesteps)
    return [calibration.plan(k) for k in (3, 5, 8)]


def basis_rows(scheduler, calls) -> list[list[float]]:
    """The OLSS rows of a linear diffusers scheduler stepped at ``calls``: start sample e_0, output j = e_{j+1}."""
    basis = torch.eye(len(calls) + 1, dtype=torch.float64)[:, None, :]
    sample, rows = basis[0], []
    for i, t in enumerate(calls):
        sample = scheduler.step(basis[i + 1], t, sample).prev_sample
        rows.append(sample[0].tolist())
    return rows


def ddim(**config) -> DDIMScheduler:
    return DDIMScheduler(**{**SD_SCHEDULE, **config}, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)


def ddim_entry(steps: int, start: int = 0, **config) -> dict:
    """DDIM (trailing, to the clean sample) for ``steps`` in OLSS form, from step ``start`` on (a start plan)."""
    scheduler = ddim(**config)
    scheduler.set_timesteps(steps)
    entry = {"num_steps": steps, "timesteps": scheduler.timesteps[start:].tolist(),
             "coefficients": basis_rows(scheduler, list(scheduler.timesteps[start:]))}
    return {**entry, "start_step": start} if start else entry


def loop(scheduler, x, steps: int, model=None, begin: int | None = None, edit=None):
    """A diffusers sampling loop (set_timesteps, optional begin index, step), with ``edit(i, x)`` after step i."""
    model = model or small_model()
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if begin is not None:
        timesteps = timesteps[begin:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
    for i, t in enumerate(timesteps):
        output = model(x.double(), int(t), DIGITS[: len(x)]).to(x.dtype)  # the model in float64: the scheduler's dtypes are tested
        x = scheduler.step(output, t, x).prev_sample
        if edit is not None:
            x = edit(i, x)
    return x


def test_float64_replay_equals_the_coefficient_formula(plans):
    model, plan = small_model(), plans[1]
    scheduler = OLSSScheduler.from_plans(plans)
    assert scheduler.step_index is None and scheduler.begin_index is None
    x_T = torch.randn(4, *model.latent_shape, dtype=torch.float64)
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == plan.timesteps.tolist() and scheduler.step_index is None
    x, outputs = x_T, []
    for i, t in enumerate(scheduler.timesteps):
        outputs.append(model(x, int(t), DIGITS))
        expected = plan.coefficients[i, 0] * x_T + sum(plan.coefficients[i, j + 1] * outputs[j] for j in range(i + 1))
        x = scheduler.step(outputs[-1], t, x).prev_sample
        assert scheduler.step_index == i + 1 and x.dtype == torch.float64
        torch.testing.assert_close(x, expected, rtol=1e-13, atol=1e-13)  # rounding only: the step is float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_samples_step_in_float32(plans, dtype):
    x_T = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    reference = loop(OLSSScheduler.from_plans(plans), x_T, 5)
    low = loop(OLSSScheduler.from_plans(plans), x_T.to(dtype), 5)
    assert low.dtype == dtype
    tolerance = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(low.double(), reference, rtol=tolerance, atol=tolerance)


def test_set_timesteps_resets_the_run(plans):
    scheduler = OLSSScheduler.from_plans(plans)
    x_T = torch.randn(2, 2, 2, 2)
    torch.testing.assert_close(loop(scheduler, x_T, 3), loop(scheduler, x_T, 3))


def test_plans_live_in_their_own_file_and_round_trip(plans, tmp_path, caplog):
    scheduler = OLSSScheduler.from_plans(plans, fallback_solver="unipc")
    assert "plans" not in scheduler.config
    scheduler.save_pretrained(tmp_path)
    config_text = (tmp_path / "scheduler_config.json").read_text()
    assert "plans" not in json.loads(config_text) and len(config_text) < 1500
    assert [p["num_steps"] for p in json.loads((tmp_path / "olss_plans.json").read_text())["plans"]] == [3, 5, 8]
    loaded = OLSSScheduler.from_pretrained(tmp_path)
    assert loaded.available_steps == [3, 5, 8]
    assert {**loaded.config, "_use_default_values": None} == {**scheduler.config, "_use_default_values": None}
    for k in (3, 5, 8):
        scheduler.set_timesteps(k)
        loaded.set_timesteps(k)
        assert torch.equal(loaded.timesteps, scheduler.timesteps) and torch.equal(loaded.coefficients, scheduler.coefficients)
    # Swapping to another scheduler takes the schedule and says nothing long about the plans.
    with caplog.at_level(logging.WARNING, logger="diffusers"):
        other = DDIMScheduler.from_config(scheduler.config)
    assert sum(len(record.getMessage()) for record in caplog.records) < 600
    torch.testing.assert_close(other.alphas_cumprod.double(), scheduler.alphas_cumprod, rtol=1e-5, atol=0)


def test_configs_that_hold_their_plans_still_load(plans, tmp_path):
    """Runs published before olss_plans.json: the plans are a key of scheduler_config.json."""
    scheduler = OLSSScheduler.from_plans(plans)
    old = {**json.loads(scheduler.to_json_string()), "plans": scheduler.plans}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(old))
    for loaded in (OLSSScheduler.from_config(old), OLSSScheduler.from_pretrained(tmp_path)):
        assert loaded.available_steps == [3, 5, 8] and "plans" not in loaded.config
        loaded.set_timesteps(5)
        scheduler.set_timesteps(5)
        assert torch.equal(loaded.coefficients, scheduler.coefficients)


def test_a_bad_plans_file_is_one_clear_error(plans, tmp_path):
    OLSSScheduler.from_plans(plans).save_pretrained(tmp_path)
    (tmp_path / "olss_plans.json").write_text('{"plans": []}')
    with pytest.raises(ValueError, match="olss_plans.json: not an OLSSScheduler plans file"):
        OLSSScheduler.from_pretrained(tmp_path)


def test_another_schedulers_config_gives_the_process_and_a_warning_naming_from_pretrained():
    with pytest.warns(UserWarning, match=r"no plans .*from_pretrained"):
        scheduler = OLSSScheduler.from_config(ddim(prediction_type="v_prediction").config)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.plans == []
    with pytest.warns(UserWarning, match="no plan for 50 steps"):
        scheduler.set_timesteps(50)  # the pipeline default: served, never an exception
    assert len(scheduler.timesteps) == 50


def test_zero_terminal_snr_is_honoured_and_an_epsilon_model_refused():
    config = ddim(rescale_betas_zero_snr=True, prediction_type="v_prediction").config
    with pytest.warns(UserWarning):
        scheduler = OLSSScheduler.from_config(config)
    assert scheduler.config.rescale_betas_zero_snr and scheduler.alphas_cumprod[-1].item() == 0.0
    assert scheduler.output_type == "v_prediction"
    with pytest.raises(ValueError, match="zero terminal SNR"):
        OLSSScheduler(rescale_betas_zero_snr=True, prediction_type="epsilon")


def test_zero_snr_v_model_with_the_ddim_fallback_equals_diffusers_ddim():
    """The rows combine v itself (contract C1): finite at alpha 0, and DDIM's own loop."""
    model = small_model()
    v_model = lambda x, t, c: model(x, t, c)  # any output field: the rows are linear in it
    config = ddim(rescale_betas_zero_snr=True, prediction_type="v_prediction").config
    with pytest.warns(UserWarning):
        olss = OLSSScheduler.from_config(config, fallback_solver="ddim")
    x_T = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="no plan for 6 steps"):
        ours = loop(olss, x_T, 6, v_model)
    reference = loop(ddim(rescale_betas_zero_snr=True, prediction_type="v_prediction"), x_T, 6, v_model)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 7, 50, 100])
def test_step_counts_without_a_plan_are_dpm_solver_pp(plans, steps):
    x_T = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match=rf"no plan for {steps} steps \(planned: \[3, 5, 8\]\); serving dpmsolver\+\+"):
        ours = loop(OLSSScheduler.from_plans(plans), x_T, steps)
    reference = loop(DPMSolverMultistepScheduler(**SD_SCHEDULE, timestep_spacing="trailing"), x_T, steps)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_a_start_plan_of_a_builtin_reproduces_it_and_a_missing_start_falls_back():
    """img2img: set_timesteps(K), set_begin_index(s), the loop from the noised sample at timesteps[s]."""
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    olss = OLSSScheduler(plans=[ddim_entry(10), ddim_entry(10, 4)], **SD_SCHEDULE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a planned start: no warning
        ours = loop(olss, x, 10, begin=4)
    assert olss.step_index == 10 and olss.begin_index == 4
    torch.testing.assert_close(ours, loop(ddim(), x, 10, begin=4), rtol=1e-6, atol=1e-6)
    # No start plan for s=7: DPM-Solver++ 2M on the plan's last 3 timesteps, as diffusers runs custom timesteps.
    with pytest.warns(UserWarning, match=r"no start plan for 10 steps from step 7 .*dpmsolver\+\+"):
        ours = loop(olss, x, 10, begin=7)
    dpm = DPMSolverMultistepScheduler(**SD_SCHEDULE)
    dpm.set_timesteps(timesteps=olss.timesteps[7:].tolist())
    expected = x
    for t in dpm.timesteps:
        expected = dpm.step(small_model()(expected, int(t), DIGITS), t, expected).prev_sample
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_a_pipeline_that_starts_mid_way_without_set_begin_index_is_served():
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    olss = OLSSScheduler(plans=[ddim_entry(10), ddim_entry(10, 6)], **SD_SCHEDULE)
    olss.set_timesteps(10)
    ours = x
    for t in olss.timesteps[6:]:
        ours = olss.step(small_model()(ours, int(t), DIGITS[:2]), t, ours).prev_sample
    assert olss.begin_index == 6
    torch.testing.assert_close(ours, loop(ddim(), x, 10, begin=6), rtol=1e-6, atol=1e-6)


def test_start_plans_must_continue_a_plan():
    with pytest.raises(ValueError, match="has no start-0 plan for 10 steps"):
        OLSSScheduler(plans=[ddim_entry(10, 4)], **SD_SCHEDULE)
    shifted = {**ddim_entry(10, 4), "timesteps": [t - 1 for t in ddim_entry(10, 4)["timesteps"]]}
    with pytest.raises(ValueError, match="not those of the 10-step plan from step 4"):
        OLSSScheduler(plans=[ddim_entry(10), shifted], **SD_SCHEDULE)
    with pytest.raises(ValueError, match=r"distinct \(num_steps, start_step\)"):
        OLSSScheduler(plans=[ddim_entry(10), ddim_entry(10)], **SD_SCHEDULE)


def test_an_edit_of_the_latents_carries_forward_as_with_ddim():
    """A callback that edits the sample between steps: with DDIM in OLSS form, the result is DDIM's."""
    x_T = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    edit = lambda i, x: x + 0.5 if i == 6 else x  # noqa: E731
    olss = OLSSScheduler(plans=[ddim_entry(10)], **SD_SCHEDULE)
    plain, edited = loop(olss, x_T, 10), loop(olss, x_T, 10, edit=edit)
    torch.testing.assert_close(edited, loop(ddim(), x_T, 10, edit=edit), rtol=1e-6, atol=1e-6)
    assert (edited - plain).abs().mean() > 0.02  # the edit is not dropped


def test_a_timestep_off_the_schedule_starts_a_new_run_with_a_warning(plans):
    scheduler = OLSSScheduler.from_plans(plans)
    scheduler.set_timesteps(3)
    sample = torch.randn(1, 2, 2, 2)
    with pytest.warns(UserWarning, match=r"timestep 1 is not the 3-step schedule's next one \(999\); starting a new run at step 2"):
        output = scheduler.step(torch.zeros_like(sample), 1, sample)
    assert output.prev_sample.shape == sample.shape and scheduler.step_index == 3


def test_custom_timesteps_and_sigmas_are_refused(plans):
    scheduler = OLSSScheduler.from_plans(plans)
    with pytest.raises(ValueError, match="custom timesteps or sigmas are not supported"):
        scheduler.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        scheduler.set_timesteps(0)


def test_v_prediction_output_is_converted_to_epsilon(plans):
    epsilon_scheduler = OLSSScheduler.from_plans(plans)
    v_scheduler = OLSSScheduler.from_plans(plans, prediction_type="v_prediction")
    epsilon_scheduler.set_timesteps(3)
    v_scheduler.set_timesteps(3)
    t = int(epsilon_scheduler.timesteps[0])
    alpha = float(epsilon_scheduler.alphas_cumprod[t])
    x, x0 = torch.randn(2, 8), torch.randn(2, 8)
    eps = (x - alpha**0.5 * x0) / (1 - alpha) ** 0.5
    v = alpha**0.5 * eps - (1 - alpha) ** 0.5 * x0
    torch.testing.assert_close(v_scheduler.step(v, t, x).prev_sample, epsilon_scheduler.step(eps, t, x).prev_sample, rtol=1e-4, atol=1e-5)


def devices() -> list[str]:
    found = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return found + (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])


@pytest.mark.parametrize("device", devices())
def test_add_noise_and_velocity_follow_ddpm_on_every_device(device):
    with pytest.warns(UserWarning):
        olss = OLSSScheduler(**SD_SCHEDULE)
    ddpm = DDPMScheduler(**SD_SCHEDULE)
    x0 = torch.rand(3, 4, 8, 8, device=device)
    noise = torch.randn_like(x0)
    for timesteps in (torch.tensor([999, 500, 3], device=device), torch.tensor(250, device=device), 250):
        noised = olss.add_noise(x0, noise, timesteps)
        assert noised.device.type == device and noised.dtype == x0.dtype
        expected = ddpm.add_noise(x0.cpu(), noise.cpu(), torch.as_tensor(timesteps).cpu().reshape(-1))
        torch.testing.assert_close(noised.cpu(), expected, rtol=1e-5, atol=1e-5)
        velocity = olss.get_velocity(x0, noise, timesteps)
        torch.testing.assert_close(velocity.cpu(), ddpm.get_velocity(x0.cpu(), noise.cpu(), torch.as_tensor(timesteps).cpu().reshape(-1)),
                                   rtol=1e-5, atol=1e-5)
    half = olss.add_noise(x0.half(), noise.half(), 10)
    assert half.dtype == torch.float16


def test_schedule_attributes_and_the_public_api():
    betas = np.linspace(1e-4, 0.05, 200)
    with pytest.warns(UserWarning):
        scheduler = OLSSScheduler(num_train_timesteps=200, trained_betas=betas.tolist())
    torch.testing.assert_close(scheduler.betas, torch.from_numpy(betas), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(scheduler.alphas_cumprod, torch.from_numpy(np.cumprod(1 - betas)))
    torch.testing.assert_close(scheduler.alphas, 1 - scheduler.betas)
    assert float(scheduler.final_alpha_cumprod) == 1.0 and scheduler.init_noise_sigma == 1.0 and scheduler.order == 1
    assert len(scheduler) == 200
    sample = torch.randn(2, 3)
    assert scheduler.scale_model_input(sample, 10) is sample
    assert {cls.__name__ for cls in scheduler.compatibles} >= {"DDIMScheduler", "DPMSolverMultistepScheduler"}
    for cls in scheduler.compatibles:
        torch.testing.assert_close(cls.from_config(scheduler.config).alphas_cumprod.double(), scheduler.alphas_cumprod, rtol=1e-5, atol=0)


def test_trained_betas_round_trip(tmp_path):
    with pytest.warns(UserWarning):
        OLSSScheduler(num_train_timesteps=2, trained_betas=[0.1, 0.3], plans=[]).save_pretrained(tmp_path)
    with pytest.warns(UserWarning):
        loaded = OLSSScheduler.from_pretrained(tmp_path)
    assert loaded.betas.tolist() == pytest.approx([0.1, 0.3])


def test_step_shape_return_tuple_and_reloaded_scheduler_agree(plans, tmp_path):
    """The behaviour of diffusers' common tests: save_config / from_pretrained, step shapes, tuple outputs."""
    scheduler = OLSSScheduler.from_plans(plans)
    scheduler.save_config(tmp_path)
    reloaded = OLSSScheduler.from_pretrained(tmp_path)
    sample = torch.rand(4, 3, 8, 8)
    residual = 0.1 * sample
    for s in (scheduler, reloaded):
        s.set_timesteps(8)
    t = scheduler.timesteps[0]
    out = scheduler.step(residual, t, sample)
    assert out.prev_sample.shape == sample.shape == out.pred_original_sample.shape
    prev, original = reloaded.step(residual, t, sample, return_dict=False)
    torch.testing.assert_close(prev, out.prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(original, out.pred_original_sample, rtol=0, atol=0)


def test_full_loop_with_and_without_initial_noise():
    """From pure noise (x_T * init_noise_sigma) and from a noised sample (add_noise at the start timestep)."""
    olss = OLSSScheduler(plans=[ddim_entry(10), ddim_entry(10, 5)], **SD_SCHEDULE)
    x0, noise = torch.randn(4, 2, 2, 2, dtype=torch.float64), torch.randn(4, 2, 2, 2, dtype=torch.float64)
    from_noise = loop(olss, noise * olss.init_noise_sigma, 10)
    olss.set_timesteps(10)
    noised = olss.add_noise(x0, noise, olss.timesteps[5:6])
    from_image = loop(olss, noised, 10, begin=5)
    reference = ddim()
    reference.set_timesteps(10)
    torch.testing.assert_close(from_noise, loop(reference, noise, 10), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_image, loop(ddim(), reference.add_noise(x0, noise, reference.timesteps[5:6]), 10, begin=5),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["plans file", "plans in the config (runs published before the plans file)"])
def test_published_runs_of_both_layouts_load_by_uri(plans, tmp_path, run_cache, layout):
    from olss_dist.apps.evaluate.published import load_calibrated_run
    from olss_dist.artifacts import publish_run
    from olss_dist.artifacts.layout import SCHEDULER_PLANS_FILE

    assert SCHEDULER_PLANS_FILE == OLSSScheduler.plans_file_name
    scheduler = OLSSScheduler.from_plans(plans)
    files = scheduler.scheduler_files()
    if layout != "plans file":
        config = json.loads(files.pop(SCHEDULER_PLANS_FILE) and files["scheduler_config.json"])
        files["scheduler_config.json"] = json.dumps({**config, "plans": scheduler.plans}).encode()
    files["plans.json"] = json.dumps([p.to_dict() for p in plans]).encode()
    root = tmp_path / "registry"
    run = publish_run(str(root), model_id="tiny/sd", model_digest="w", files=files,
                      config={"teacher_steps": 40, "planned_step_counts": [3, 5, 8]})
    for location in (run.uri, str(root / "tiny--sd"), str(root / "tiny--sd" / "latest.json")):
        loaded = OLSSScheduler.from_pretrained(location)
        assert loaded.available_steps == [3, 5, 8]
        loaded.set_timesteps(8)
        scheduler.set_timesteps(8)
        assert torch.equal(loaded.coefficients, scheduler.coefficients)
    shipped = load_calibrated_run(run.uri)  # what evaluate reads: the config with its plans
    assert [p["num_steps"] for p in shipped.scheduler_config["plans"]] == [3, 5, 8] and shipped.planned_steps == [3, 5, 8]


def test_config_survives_compatible_schedulers_and_a_save_load_round_trip(tmp_path):
    """diffusers' contract: a compatible scheduler built from the config hands the same config back; save and
    load keep it; no **kwargs without deprecated ones; unknown attributes are AttributeErrors."""
    config = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
    with pytest.warns(UserWarning):
        scheduler = OLSSScheduler(**config, fallback_solver="unipc")
    for compatible in scheduler.compatibles:
        with pytest.warns(UserWarning, match="no plans"):
            back = OLSSScheduler.from_config(compatible.from_config(scheduler.config).config)
        assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config)
        assert not set(back.config) - set(scheduler.config) & set(OLSSScheduler._get_init_keys(OLSSScheduler))
    scheduler.save_pretrained(tmp_path)
    with pytest.warns(UserWarning):
        loaded = OLSSScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in scheduler.config.items() if k != "_use_default_values"} == loaded.config
    assert "kwargs" not in OLSSScheduler._get_init_keys(OLSSScheduler) and not OLSSScheduler._deprecated_kwargs
    with pytest.raises(AttributeError, match="^'OLSSScheduler' object has no attribute 'does_not_exist'$"):
        scheduler.does_not_exist


def test_a_hub_repo_gives_both_files(plans, tmp_path, monkeypatch):
    """A hub id (here a snapshot in the local hub cache, as huggingface_hub lays it out): the plans file is
    fetched beside the config, from the same subfolder and revision."""
    import huggingface_hub

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--tiny-org--olss"
    OLSSScheduler.from_plans(plans).save_pretrained(repo / "snapshots" / revision / "scheduler")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = OLSSScheduler.from_pretrained("tiny-org/olss", subfolder="scheduler", local_files_only=True)
    assert loaded.available_steps == [3, 5, 8]
    # A repo saved before the plans file: no olss_plans.json there, the plans in the config.
    folder = repo / "snapshots" / revision / "scheduler"
    config = json.loads((folder / "scheduler_config.json").read_text())
    (folder / "scheduler_config.json").write_text(json.dumps({**config, "plans": loaded.plans}))
    (folder / "olss_plans.json").unlink()
    old = OLSSScheduler.from_pretrained("tiny-org/olss", subfolder="scheduler", local_files_only=True)
    assert old.available_steps == [3, 5, 8]
    (folder / "scheduler_config.json").write_text(json.dumps(config))  # neither: the fallback, with a warning
    with pytest.warns(UserWarning, match="no plans"):
        assert OLSSScheduler.from_pretrained("tiny-org/olss", subfolder="scheduler", local_files_only=True).plans == []
