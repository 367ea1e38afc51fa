"""Evaluation against built-in solvers: the sampling loop, held-out seeds, a whole run on a published artifact, the CLI."""

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from core_data import small_model, trajectories
from tiny_sd import tiny_pipeline
from olss_dist import Calibration, trailing_timesteps
from olss_dist.artifacts import publish_run
from olss_dist.core.builtin import LINEAR_BUILTINS, builtin_plan, builtin_scheduler
from olss_dist.cli import app
from olss_dist.apps.evaluate import (
    EvaluationSet,
    evaluation_seeds,
    fit_uniform_on_policy,
    load_calibrated_run,
    olss_sampler,
    rich_tables,
    run_evaluation,
    run_sampler,
    teacher_states,
    to_markdown,
    write_outputs,
)
from olss_dist.method.run import builtin_config, run_method
from olss_dist.models import load_model
from olss_dist.models.analytic import GaussianMixtureModel
from olss_dist.core.onpolicy import fit_on_policy, rollout
from olss_dist.core.path_search import even_nodes
from olss_dist.prompts import read_prompts, split_validation
from olss_dist.method.rollouts import InProcessBackend
from olss_dist.scheduler import OLSSScheduler

TEACHER_STEPS = 40
PLANNED = (4, 8)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_teacher_states_equal_recorded_trajectories():
    states, _, timesteps = trajectories()
    model, cond = small_model(), torch.arange(24) % 4
    kept = teacher_states(model, states[:, 0], cond, timesteps, model.alphas_cumprod, [0, 7, 40], batch_size=5)
    torch.testing.assert_close(kept, states[:, [0, 7, 40]], rtol=1e-12, atol=1e-12)


def test_generic_loop_reproduces_olss_rollout_and_builtin_in_olss_form():
    states, _, timesteps = trajectories()
    model, cond, x_T = small_model(), torch.arange(24) % 4, states[:, 0]
    calibration = Calibration.from_trajectories(*trajectories()[:2], timesteps)
    plan = calibration.plan(5)
    scheduler = olss_sampler("olss", "test", [plan], 1000).new_scheduler()
    final, calls = run_sampler(scheduler, model, x_T, cond, 5)
    torch.testing.assert_close(final, rollout(plan.coefficients, model, x_T, cond, plan.timesteps), rtol=1e-5, atol=1e-5)
    assert calls == 5
    ddim = builtin_plan("ddim", 8, builtin_config(model.alphas_cumprod), trailing_timesteps(1000))
    config = {**model.scheduler_config, "beta_schedule": "scaled_linear"}
    final, calls = run_sampler(builtin_scheduler("ddim", config, "trailing"), model, x_T, cond, 8)
    torch.testing.assert_close(final, rollout(ddim.coefficients, model, x_T, cond, ddim.timesteps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LINEAR_BUILTINS)
def test_evaluated_trailing_builtin_is_the_method_candidate(name):
    """One registry: the evaluation's ``<name> (trailing)`` sampler is the method's ``builtin/<name>`` plan."""
    model, x_T = small_model(), trajectories()[0][:, 0]
    cond = torch.arange(len(x_T)) % 4
    plan = builtin_plan(name, 6, builtin_config(model.alphas_cumprod), trailing_timesteps(1000))
    final, calls = run_sampler(builtin_scheduler(name, model.scheduler_config, "trailing"), model, x_T, cond, 6)
    assert calls == 6
    torch.testing.assert_close(final, rollout(plan.coefficients, model, x_T, cond, plan.timesteps), rtol=1e-5, atol=1e-6)


def test_builtins_without_an_olss_form_are_refused():
    config = GaussianMixtureModel().scheduler_config
    for name in ("pndm", "euler"):
        assert name not in LINEAR_BUILTINS
        builtin_scheduler(name, config, "trailing")  # evaluated as users run it
        with pytest.raises(ValueError, match="have no OLSS form"):
            builtin_plan(name, 5, config, trailing_timesteps(1000))


class CountingModel:
    """A model that records the batch size of every call."""

    def __init__(self, model):
        self.model, self.alphas_cumprod, self.batches = model, model.alphas_cumprod, []

    def __call__(self, x, t, cond):
        self.batches.append(len(x))
        return self.model(x, t, cond)


def test_uniform_on_policy_fit_is_the_method_fit_in_batches():
    states, _, timesteps = trajectories()
    model, cond = CountingModel(small_model()), torch.arange(24) % 4
    fit_samples = EvaluationSet([""] * 24, [""] * 24, list(range(24)), states[:, 0], cond)
    plans = fit_uniform_on_policy(model, fit_samples, timesteps, [4, 8], batch_size=5)
    assert max(model.batches) == 5
    whole = fit_uniform_on_policy(small_model(), fit_samples, timesteps, [4, 8])
    for plan, unbatched in zip(plans, whole):
        reference = fit_on_policy(even_nodes(40, len(plan.nodes)), small_model(), states, cond, timesteps=timesteps)
        assert plan.nodes == reference.nodes and (plan.fit, plan.spacing) == ("on_policy", "uniform")
        np.testing.assert_allclose(unbatched.coefficients, reference.coefficients, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(plan.coefficients, reference.coefficients, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(plan.step_errors, reference.step_errors, rtol=1e-6)


def test_builtin_variants_follow_the_model_config_or_trailing_spacing():
    config = GaussianMixtureModel().scheduler_config
    leading = builtin_scheduler("ddim", config, "config")
    leading.set_timesteps(5)
    assert leading.timesteps.tolist() == [801, 601, 401, 201, 1] and not leading.config.set_alpha_to_one
    trailing = builtin_scheduler("ddim", config, "trailing")
    trailing.set_timesteps(5)
    assert trailing.timesteps.tolist() == [999, 799, 599, 399, 199] and trailing.config.set_alpha_to_one
    euler = builtin_scheduler("euler", config, "trailing")
    euler.set_timesteps(5)
    assert euler.timesteps.tolist() == [999, 799, 599, 399, 199] and euler.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="unknown built-in solver"):
        builtin_scheduler("heun", config)


def test_evaluation_seeds_are_deterministic_disjoint_and_skip_excluded():
    seeds = evaluation_seeds(16)
    assert seeds == evaluation_seeds(16) and len(set(seeds)) == 16
    assert all(0 <= s < 2**32 for s in seeds)
    assert not set(seeds) & set(evaluation_seeds(16, seed_offset=1))
    skipping = evaluation_seeds(16, exclude=seeds[:3])
    assert not set(skipping) & set(seeds[:3]) and skipping[:13] == seeds[3:]


# ----------------------------------------------------------------------------------------------- a published run


def publish_calibrated_run(model, spec: str, root: Path, prompt_file: Path, num_prompts: int, teacher_steps: int,
                           planned: tuple[int, ...]) -> str:
    """Calibrate ``model`` in process on a prompt file, as the job does, and publish the run under ``root``."""
    prompt_file.write_text("\n".join(f"a sample of class {c % 10}" for c in range(num_prompts)))
    fit, validation = split_validation(read_prompts(str(prompt_file)), 0.25)
    encode = lambda records: (model.initial_noise([r.seed for r in records]), model.encode_prompts([r.prompt for r in records]))
    backend = InProcessBackend(model, *encode(fit), *encode(validation))
    plans, calibration = run_method(backend, model.noise_process, teacher_steps, planned)
    with tempfile.TemporaryDirectory() as directory:
        OLSSScheduler.from_plans(list(plans.values())).save_pretrained(directory)
        scheduler_files = {name: (Path(directory) / name).read_bytes() for name in ("scheduler_config.json", "olss_plans.json")}
    config = {"model": spec, "prompts": str(prompt_file), "seed": 0, "guidance_scale": model.guidance_scale}
    published = publish_run(
        str(root), model_id=model.model_id, model_digest=model.digest, config=config,
        files={
            **scheduler_files,
            "calibration.safetensors": calibration.to_bytes(),
            "plans.json": json.dumps([p.to_dict() for p in plans.values()]).encode(),
        },
        extra_manifest={"teacher_steps": teacher_steps, "planned_step_counts": list(planned)},
    )
    return published.uri


@pytest.fixture(scope="module")
def run_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return publish_calibrated_run(GaussianMixtureModel(), "analytic", root / "runs", root / "prompts.txt", 40, TEACHER_STEPS, PLANNED)


@pytest.fixture(scope="module")
def evaluation(run_uri, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("OLSS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return run_evaluation("analytic", run_uri, num_samples=12, uniform_fit_samples=12)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_evaluation_compares_every_sampler_at_every_planned_step_count(evaluation, run_uri):
    labels = evaluation.labels()
    assert labels[:4] == ["olss (shipped)", "olss-paper (same nodes)", "olss-paper (uniform)", "olss-onpolicy (uniform)"]
    for solver in ("ddim", "pndm", "dpmsolver++", "unipc", "euler", "deis"):
        assert f"{solver} (config)" in labels and f"{solver} (trailing)" in labels
    assert evaluation.steps == list(PLANNED)
    assert evaluation.result("ddim (config)", 4).first_timestep == 751  # leading spacing, steps_offset 1
    assert evaluation.result("ddim (trailing)", 4).first_timestep == 999
    assert evaluation.result("pndm (config)", 4).model_calls > 4
    for k in PLANNED:
        shipped = evaluation.result("olss (shipped)", k)
        assert shipped.model_calls == k
        for variant in ("config", "trailing"):
            assert shipped.rmse < evaluation.result(f"ddim ({variant})", k).rmse
    run = load_calibrated_run(run_uri)
    calibration_seeds = {r.seed for r in read_prompts(run.manifest["config"]["prompts"])}
    assert evaluation.info["calibration_seeds_excluded"]
    assert not set(evaluation.info["seeds"]) & calibration_seeds


def test_metrics_are_consistent(evaluation):
    for r in evaluation.results:
        if r.metrics:
            assert len(r.per_sample_rmse) == 12
            assert r.rmse == pytest.approx(np.sqrt(np.mean(np.square(r.per_sample_rmse))))
            assert r.metrics["median"] == pytest.approx(np.median(r.per_sample_rmse))
            assert r.metrics["median"] <= r.metrics["p90"] <= r.metrics["worst"] + 1e-12
            assert r.metrics["rmse"] <= r.metrics["worst"] + 1e-12
            assert np.isfinite(r.metrics["psnr_mean"])


def test_outputs_hold_the_table_json_and_plot(evaluation, tmp_path):
    paths = {p.name: p for p in write_outputs(evaluation, tmp_path)}
    assert set(paths) == {"evaluation.json", "evaluation.md", "errors.png"}  # the analytic model has no images
    document = json.loads(paths["evaluation.json"].read_text())
    rows = {(r["sampler"], r["variant"], r["num_steps"]): r for r in document["results"]}
    assert rows[("ddim", "config", 8)]["rmse"] == pytest.approx(evaluation.result("ddim (config)", 8).rmse)
    assert {"rmse", "median", "p90", "worst", "psnr_mean", "psnr_std", "model_calls"} <= set(rows[("olss", "shipped", 4)])
    markdown = paths["evaluation.md"].read_text()
    assert markdown == to_markdown(evaluation)
    assert "| ddim (config) |" in markdown and "## 8 steps" in markdown
    assert paths["errors.png"].read_bytes()[:8] == PNG_MAGIC


def test_terminal_tables_fit_80_columns_without_cutting_a_number(evaluation):
    console = Console(width=80, file=io.StringIO(), color_system=None)
    for table in rich_tables(evaluation):
        console.print(table)
    lines = console.file.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80, lines
    assert not [line for line in lines if "…" in line]
    shipped = evaluation.result("olss (shipped)", 8)
    row = next(line for line in lines if line.startswith(" olss (shipped)") and f" {shipped.model_calls} " in line)
    assert f"{shipped.rmse:.3g}" in row and f"{shipped.metrics['psnr_mean']:.1f}" in row


# ----------------------------------------------------------------------------------------------- command line


def test_cli_writes_outputs(run_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("OLSS_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, [
        "evaluate", "--model", "analytic", "--artifact", run_uri, "--steps", "4", "--num-samples", "4",
        "--output", str(tmp_path / "out"),
    ])
    assert result.exit_code == 0, result.output
    assert "olss (shipped)" in result.output
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["info"]["num_samples"] == 4


@pytest.mark.parametrize("arguments,message", [
    (["--artifact", "{root}/nothing-here"], "not found"),
    (["--steps", "5"], "no plan for [5] steps; it planned [4, 8]"),
    (["--steps", "4,x"], "--steps: expected comma-separated positive integers"),
    (["--num-samples", "0"], "--num-samples: must be at least 1"),
    (["--model", "nonexistent-model-folder"], "nonexistent-model-folder"),
])
def test_cli_errors_are_one_line_and_exit_1(run_uri, tmp_path, monkeypatch, arguments, message):
    monkeypatch.setenv("OLSS_CACHE_DIR", str(tmp_path / "cache"))
    defaults = {"--model": "analytic", "--artifact": run_uri}
    given = dict(zip(arguments[::2], (a.format(root=tmp_path) for a in arguments[1::2])))
    options = [item for pair in {**defaults, **given}.items() for item in pair]
    result = CliRunner().invoke(app, ["evaluate", *options, "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_a_run_of_another_model_is_refused(run_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("OLSS_CACHE_DIR", str(tmp_path / "cache"))
    run = load_calibrated_run(run_uri)
    other = publish_run(
        str(tmp_path / "runs"), model_id="another-model", model_digest="0" * 64, config=run.manifest["config"],
        files={name: run.directory / name for name in run.manifest["files"]},
        extra_manifest={"teacher_steps": TEACHER_STEPS, "planned_step_counts": list(PLANNED)},
    )
    with pytest.raises(ValueError, match="the run was calibrated for another-model"):
        run_evaluation("analytic", other.uri, num_samples=2)


def test_image_model_evaluation_writes_sample_grids(tmp_path, monkeypatch):
    monkeypatch.setenv("OLSS_CACHE_DIR", str(tmp_path / "cache"))
    tiny_pipeline(tmp_path)
    spec = str(tmp_path / "model")
    model = load_model(spec, guidance_scale=3.0, device="cpu")
    uri = publish_calibrated_run(model, spec, tmp_path / "runs", tmp_path / "prompts.txt", 8, 10, (2,))
    evaluation = run_evaluation(spec, uri, num_samples=2, builtins=("ddim",))
    grid = evaluation.images[2]
    assert list(grid)[:2] == ["teacher (10 steps)", "olss (shipped)"]
    assert all(images.dtype == np.uint8 and images.shape[0] == 2 and images.shape[-1] == 3 for images in grid.values())
    paths = {p.name for p in write_outputs(evaluation, tmp_path / "out")}
    assert "grid_2steps.png" in paths
    assert (tmp_path / "out" / "grid_2steps.png").read_bytes()[:8] == PNG_MAGIC
