"""The robust choice of the shipped plan (``olss_dist.method.choice``) and where it shows: plans, ``show``, ``evaluate``."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from olss_dist.artifacts import publish_run
from olss_dist.cli import app
from olss_dist.core.onpolicy import solve_step
from olss_dist.core.teacher import trailing_timesteps
from olss_dist.core.tsqr import r_factor
from olss_dist.method.choice import ChoiceRules, choose, ratio_interval, tail_seen_rate
from olss_dist.method.run import calibrate
from olss_dist.models.analytic import GaussianMixtureModel
from olss_dist.scheduler import OLSSScheduler

TEACHER_STEPS = 40
NAMES = ["on_policy/minimax/ridge=1e-06", "builtin/ddim", "builtin/deis"]


def steady(level: float, count: int = 64, seed: int = 0) -> np.ndarray:
    """Per-sample MSE around ``level`` with a light spread."""
    return level * np.random.default_rng(seed).uniform(0.8, 1.2, count)


# ----------------------------------------------------------------------------------------------- the rules


def test_a_candidate_whose_tail_blows_up_loses_to_the_builtin_though_its_rmse_is_lower():
    fitted = np.full(64, 1e-5)
    fitted[17] = 0.5  # one sample switched mode: pooled RMSE 0.088 against the built-in's 0.1
    errors = [fitted, steady(0.012, seed=1), steady(0.01, seed=2)]
    assert np.sqrt(fitted.mean()) < np.sqrt(errors[2].mean())
    plain = choose(NAMES, errors, [False, True, True], [3.0, 14.0, 14.0], 64, ChoiceRules(criterion="rmse"))
    robust = choose(NAMES, errors, [False, True, True], [3.0, 14.0, 14.0], 64)
    assert plain.index == 0
    assert robust.index == 2 and robust.record["shipped"] == "builtin/deis" and robust.record["fallback"]
    assert robust.record["best_builtin"] == "builtin/deis" and robust.record["best_fitted"] == NAMES[0]
    low, high = robust.record["ratio_interval"]
    assert low < robust.record["ratio"] < 1.0 < high  # a likely win on this sample, not a significant one


def test_a_steady_win_ships_with_its_interval_below_one():
    errors = [steady(1e-4), steady(0.012, seed=1), steady(0.01, seed=2)]
    choice = choose(NAMES, errors, [False, True, True], [5.0, 14.0, 14.0], 64)
    assert choice.index == 0 and not choice.record["fallback"]
    assert choice.record["reason"].startswith("significant win")
    ratio, (low, high) = ratio_interval(errors[0], errors[2])
    assert choice.record["ratio"] == pytest.approx(ratio) and choice.record["ratio_interval"] == [low, high]
    assert low < ratio < high < 1.0 and ratio == pytest.approx(np.sqrt(errors[0].mean() / errors[2].mean()))
    assert choice.record["tail_seen_rate"] == pytest.approx(tail_seen_rate(64)) and 0.03 < tail_seen_rate(64) < 0.04


def test_coefficients_outside_the_trust_region_are_not_shipped():
    errors = [steady(1e-6), steady(1e-4, seed=3), steady(0.01, seed=2)]
    names = ["on_policy/uniform/ridge=1e-06", "on_policy/minimax/ridge=1e-05", "builtin/deis"]
    choice = choose(names, errors, [False, False, True], [4000.0, 12.0, 14.0], 64)
    assert choice.index == 1 and "trust region" in choice.record["ineligible"][names[0]]
    assert choice.record["coefficient_limit"] == pytest.approx(140.0)
    alone = choose(names[::2], errors[::2], [False, True], [4000.0, 14.0], 64)
    assert alone.index == 1 and alone.record["fallback"] and "trust region" in alone.record["reason"]


def test_thin_evidence_ships_the_builtin_and_says_why():
    errors = [steady(1e-4, 6), steady(0.012, 6, seed=1), steady(0.01, 6, seed=2)]
    choice = choose(NAMES, errors, [False, True, True], [5.0, 14.0, 14.0], 64)
    assert choice.index == 2 and choice.record["fallback"] and choice.record["reason"].startswith("thin evidence")
    few_fit = choose(NAMES, [steady(1e-4), steady(0.012, seed=1), steady(0.01, seed=2)], [False, True, True],
                     [5.0, 14.0, 14.0], 3)
    assert few_fit.index == 2 and "3 fit" in few_fit.record["reason"]


def test_the_choice_is_deterministic_and_checks_its_input():
    errors = [steady(0.009), steady(0.01, seed=2)]
    first = choose(NAMES[::2], errors, [False, True], [5.0, 14.0], 64)
    assert first.record == choose(NAMES[::2], errors, [False, True], [5.0, 14.0], 64).record
    with pytest.raises(ValueError, match="one errors array"):
        choose(NAMES, errors, [False, True], [5.0, 14.0], 64)
    with pytest.raises(ValueError, match="confidence"):
        ChoiceRules(confidence=1.5)


def test_a_large_ridge_towards_a_prior_returns_the_prior():
    rows = torch.randn(200, 4, dtype=torch.float64)
    r = r_factor(rows)
    prior = np.array([0.3, -1.2, 2.0])
    free, _ = solve_step(r, 200, 0.0)
    pulled, _ = solve_step(r, 200, 1e8, prior)
    np.testing.assert_allclose(pulled, prior, rtol=1e-6)
    np.testing.assert_allclose(solve_step(r, 200, 1e-3, np.zeros(3))[0], solve_step(r, 200, 1e-3)[0], rtol=1e-12)
    assert not np.allclose(free, prior)
    with pytest.raises(ValueError, match="prior"):
        solve_step(r, 200, 1e-3, np.zeros(2))


# ----------------------------------------------------------------------------------------------- in the method


def mixture_samples(model, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, *model.latent_shape, generator=generator, dtype=torch.float64)
    return noise, torch.randint(0, model.num_classes, (count,), generator=generator)


@pytest.fixture(scope="module")
def calibrated():
    """The analytic mixture calibrated at N=40 twice: on 3 fit samples (thin) and on 32 (enough; 4 steps get
    a node search)."""
    model = GaussianMixtureModel()
    validation = mixture_samples(model, 16, 2)
    common = dict(timesteps=trailing_timesteps(TEACHER_STEPS), alphas_cumprod=model.alphas_cumprod, steps=(4, 8),
                  validation_noise=validation[0], validation_cond=validation[1])
    thin = calibrate(model, *mixture_samples(model, 3, 1), **common)
    enough = calibrate(model, *mixture_samples(model, 32, 1), **common)
    return model, thin, enough


def test_the_method_records_its_choice_and_falls_back_on_thin_evidence(calibrated):
    _, thin, enough = calibrated
    for k in (4, 8):
        assert thin[k].fit.startswith("builtin:") and thin[k].choice["fallback"]
        assert thin[k].choice["reason"].startswith("thin evidence") and thin[k].choice["train_samples"] == 3
        assert thin[k].choice["shipped"] == "builtin/" + thin[k].fit.partition(":")[2]
        names = [c["name"] for c in enough[k].candidates]
        assert any(name.startswith("trust_region/") for name in names)
        choice = enough[k].choice
        assert choice["shipped"] in names and choice["validation_samples"] == 16
        shipped = next(c for c in enough[k].candidates if c["name"] == choice["shipped"])
        assert shipped["max_abs_coefficient"] <= choice["coefficient_limit"]
        assert enough[k].to_dict()["choice"] == choice


def publish(plans, root: Path, model) -> str:
    """Publish ``plans`` as the job lays a run out (scheduler config, plans.json, a report with the choices)."""
    with tempfile.TemporaryDirectory() as directory:
        OLSSScheduler.from_plans(list(plans.values())).save_pretrained(directory)
        scheduler_files = {path.name: path.read_bytes() for path in Path(directory).iterdir()}
    report = {"plans": [{key: value for key, value in p.to_dict().items() if key != "coefficients"} for p in plans.values()],
              "calibrated_conditions": {"guidance_scales": [model.guidance_scale], "resolutions": None, "negative_prompts": []}}
    published = publish_run(
        str(root), model_id=model.model_id, model_digest=model.digest,
        config={"model": "analytic", "guidance_scale": model.guidance_scale},
        files={**scheduler_files, "plans.json": json.dumps([p.to_dict() for p in plans.values()]).encode(),
               "report.json": json.dumps(report).encode()},
        extra_manifest={"teacher_steps": TEACHER_STEPS, "planned_step_counts": sorted(plans),
                        "calibrated_conditions": report["calibrated_conditions"]},
    )
    return published.uri


def test_show_prints_the_choice_with_its_interval(calibrated, tmp_path):
    model, thin, enough = calibrated
    runner = CliRunner()
    result = runner.invoke(app, ["show", publish(thin, tmp_path / "thin", model)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "(fallback)" in result.output and "thin evidence" in result.output
    result = runner.invoke(app, ["show", publish(enough, tmp_path / "enough", model)], terminal_width=200)
    assert result.exit_code == 0, result.output
    low, high = enough[8].choice["ratio_interval"]
    assert f"[{low:.3g}, {high:.3g}]" in result.output and "90% bootstrap" in result.output
    screen = enough[8].choice["tail_screen"]  # the screen's size and its teacher adjudication, per step count
    assert f"tail screen: {screen['samples']} fresh samples" in result.output
    assert f"the teacher on {screen['teacher_samples']} of them (the reference wrong on {screen['reference_beyond_bound']})" \
        in result.output


def test_evaluate_reports_the_held_out_interval_under_new_conditions(calibrated, tmp_path, monkeypatch):
    model, _, enough = calibrated
    monkeypatch.setenv("OLSS_CACHE_DIR", str(tmp_path / "cache"))
    uri = publish(enough, tmp_path / "runs", model)
    output = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "evaluate", "--model", "analytic", "--artifact", uri, "--num-samples", "12", "--steps", "8",
        "--guidance-scales", "3,7.5", "--negative-prompt", "a sample of class one", "--output", str(output),
    ], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert (output / "conditions.md").is_file() and "shipped / best built-in" in result.output
    document = json.loads((output / "guidance_3_negative" / "evaluation.json").read_text())
    assert document["info"]["conditions"] == {"guidance_scale": 3.0, "resolution": None, "negative_prompt": "a sample of class one"}
    assert document["info"]["calibrated_conditions"]["guidance_scales"] == [7.5]
    [confidence] = document["confidence"]
    shipped = next(r for r in document["results"] if r["sampler"] == "olss" and r["num_steps"] == 8)
    best = next(r for r in document["results"] if f"{r['sampler']} ({r['variant']})" == confidence["best_builtin"])
    ratio, (low, high) = ratio_interval(np.square(shipped["per_sample_rmse"]), np.square(best["per_sample_rmse"]))
    assert confidence["ratio"] == pytest.approx(ratio) and confidence["ratio_interval"] == pytest.approx([low, high])
    assert confidence["calibration"]["shipped"] == enough[8].choice["shipped"]
    markdown = (output / "guidance_3_negative" / "evaluation.md").read_text()
    assert "Confidence of the win" in markdown and "guidance 3" in markdown and "calibrated under guidance 7.5" in markdown
    teacher_3 = json.loads((output / "guidance_3_negative" / "evaluation.json").read_text())["info"]["teacher_peak_to_peak"]
    teacher_75 = json.loads((output / "guidance_7p5_negative" / "evaluation.json").read_text())["info"]["teacher_peak_to_peak"]
    assert teacher_3 != teacher_75  # the teacher is rebuilt under each condition


@pytest.mark.parametrize("flag, value, message", [
    ("--guidance-scales", "3,abc", "--guidance-scales: expected comma-separated numbers"),
    ("--guidance-scales", "3,3", "--guidance-scales: has repeated"),
    ("--resolutions", "64,0", "--resolutions: must be positive"),
])
def test_evaluate_refuses_bad_condition_flags_in_one_line(flag, value, message, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--model", "analytic", "--artifact", str(tmp_path), flag, value,
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- the 5-step frontier


def test_node_search_lowers_the_train_error_and_keeps_valid_nodes():
    from olss_dist.core.path_search import even_nodes
    from olss_dist.method.node_search import refine_coefficients, search_nodes
    from olss_dist.method.rollouts import InProcessBackend

    model = GaussianMixtureModel()
    noise, cond = mixture_samples(model, 16, 1)
    backend = InProcessBackend(model, noise, cond)
    schedule = model.noise_process.teacher_schedule(TEACHER_STEPS)
    backend.record_train_states(schedule, range(TEACHER_STEPS + 1))
    timesteps = schedule.stored_timesteps()
    found = search_nodes(backend, even_nodes(TEACHER_STEPS, 4), timesteps, 1e-6, max_evaluations=20)
    assert found.train_rmse < found.start_rmse and found.evaluations <= 20
    assert found.nodes[0] == 0 and all(a < b for a, b in zip(found.nodes, found.nodes[1:])) and found.nodes[-1] < TEACHER_STEPS
    assert [rmse for _, rmse in found.history] == sorted((rmse for _, rmse in found.history), reverse=True)
    refined, history = refine_coefficients(found.coefficients, model, noise, cond, timesteps[found.nodes],
                                           backend.train_states[TEACHER_STEPS], iterations=1)
    assert history[0] == pytest.approx(found.train_rmse, rel=1e-6) and history[-1] <= history[0]
    assert refined.shape == found.coefficients.shape and not refined[np.triu_indices(4, k=2, m=5)].any()


def test_calibrate_offers_the_searched_nodes_as_a_candidate(calibrated):
    _, thin, enough = calibrated
    assert not any(c["spacing"] == "searched" for c in thin[4].candidates)  # 3 fit samples: no search
    names = [c["name"] for c in enough[4].candidates]
    searched = [c for c in enough[4].candidates if c["spacing"] == "searched"]
    assert len(searched) == 1 and searched[0]["name"].startswith("on_policy/searched/")
    assert not any(c["spacing"] == "searched" for c in enough[8].candidates)  # 8 steps are not searched
    assert len(names) == len(set(names))


def test_a_job_with_too_few_prompts_says_so_before_its_teacher():
    from olss_dist.distributed.job import thin_evidence_warning

    rules = ChoiceRules()
    assert thin_evidence_warning(rules.min_train_samples, rules.min_validation_samples, rules) is None
    line = thin_evidence_warning(8, 2, rules)
    assert line.startswith("warning: 8 fit and 2 held-out prompts are too few") and "--validation-fraction" in line
    assert thin_evidence_warning(3, 100, rules) is not None and "\n" not in line
