"""One calibration spec: every entry point takes its defaults from ``CalibrationSpec`` / ``ExecutionConfig``,
every field is validated there with an error naming it, the command-line form round-trips through the
job's parser, and a bad value fails at once with one error line (before Ray or torch is imported)."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from olss_dist import cli
from olss_dist.spec import CalibrationSpec, ExecutionConfig, SpecError, defaults_of, flag_name, parse_steps, parse_strengths

REPO = Path(__file__).resolve().parents[1]
SPEC_FIELDS = {f.name for f in dataclasses.fields(CalibrationSpec)}
EXECUTION_FIELDS = {f.name for f in dataclasses.fields(ExecutionConfig)}
# Options whose parameter is not named after the field it sets.
OPTION_FIELDS = {"wait_for_gpus": "wait_for_gpus_s", "reserve_timeout": "reserve_timeout_s"}


def calibrate_job_module():
    """``jobs/calibrate.py`` as a module (it is a script, not a package member)."""
    specification = importlib.util.spec_from_file_location("calibrate_job", REPO / "jobs" / "calibrate.py")
    module = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(module)
    return module


def command_parameters(app: typer.Typer, name: str | None = None) -> dict[str, object]:
    """The click parameters of a typer command (``name`` of a multi-command app), by parameter name."""
    command = typer.main.get_command(app)
    if name is not None:
        command = command.commands[name]
    return {parameter.name: parameter for parameter in command.params}


def field_default(name: str):
    """The default of the spec or execution field an option named ``name`` sets."""
    name = OPTION_FIELDS.get(name, name)
    defaults = {**defaults_of(CalibrationSpec), **defaults_of(ExecutionConfig)}
    return defaults[name]


def as_field_value(name: str, default):
    """A command-line default as the field value it stands for (step and strength lists are given as text)."""
    if name == "img2img_strengths":
        return parse_strengths(default)
    return parse_steps(default) if name == "steps" else default


# ------------------------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("source", ["olss-dist calibrate", "jobs/calibrate.py"])
def test_calibrate_command_defaults_are_the_spec_fields(source):
    parameters = (
        command_parameters(cli.app, "calibrate") if source == "olss-dist calibrate" else command_parameters(calibrate_job_module().app)
    )
    options = {name for name in parameters if name not in ("quiet", "storage_options")}
    assert {OPTION_FIELDS.get(name, name) for name in options} == (SPEC_FIELDS | EXECUTION_FIELDS) - {"storage_options"}
    for name in options:
        assert as_field_value(name, parameters[name].default) == field_default(name), name
    assert parameters["storage_options"].default is None and parameters["quiet"].default is False


def test_calibrate_without_arguments_runs_the_default_spec_and_execution():
    assert cli.parse_calibrate_arguments([]) == (CalibrationSpec(), ExecutionConfig(), False)


def test_jobs_calibrate_runs_the_cli_command():
    callback = typer.main.get_command(calibrate_job_module().app).callback
    assert inspect.unwrap(callback) is inspect.unwrap(cli.calibrate)


def test_run_job_takes_a_spec_and_an_execution_config_and_copies_no_default():
    from olss_dist.distributed.job import run_job

    signature = inspect.signature(run_job)
    assert list(signature.parameters) == ["spec", "execution", "quiet"]
    assert signature.parameters["spec"].default is inspect.Parameter.empty
    assert signature.parameters["execution"].default is inspect.Parameter.empty
    assert signature.parameters["quiet"].kind is inspect.Parameter.KEYWORD_ONLY


def test_refit_calibration_defaults_are_the_spec_fields():
    """Every option of ``olss-dist refit`` that sets a spec or execution field defaults to that field's
    default (or to None: "the spec's")."""
    parameters = command_parameters(cli.app, "refit")
    shared = {name for name in parameters if OPTION_FIELDS.get(name, name) in SPEC_FIELDS | EXECUTION_FIELDS}
    assert {"steps", "teacher_steps", "guidance_scale", "validation_fraction", "seed", "shard_size", "device"} <= shared
    for name in shared - {"output", "address", "storage_options"}:  # required, or meaning something else in refit
        default = parameters[name].default
        assert default is None or as_field_value(name, default) == field_default(name), name


# ----------------------------------------------------------------------------------------- validation

BAD_SPECS = [
    ("model", ""),
    ("model", None),
    ("prompts", " "),
    ("steps", "5,x"),
    ("steps", "5,5"),
    ("steps", "0,5"),
    ("steps", ""),
    ("steps", ()),
    ("steps", (5, True)),
    ("steps", (5, 2000)),  # more than teacher_steps
    ("teacher_steps", 0),
    ("teacher_steps", 10.0),
    ("guidance_scale", math.nan),
    ("guidance_scale", math.inf),
    ("guidance_scale", "7.5"),
    ("validation_fraction", 0.0),
    ("validation_fraction", 1.0),
    ("validation_fraction", math.nan),
    ("seed", -1),
    ("seed", True),
]

BAD_EXECUTIONS = [
    ("output", ""),
    ("device", "tpu"),
    ("device", "CUDA"),
    ("num_workers", 0),
    ("shard_size", 0),
    ("wait_for_gpus_s", -1.0),
    ("wait_for_gpus_s", math.inf),
    ("keep_states", "ram"),
    ("local_cpus", 0),
    ("max_restarts", -1),
    ("storage_options", "{}"),
]


@pytest.mark.parametrize("field, value", BAD_SPECS)
def test_bad_spec_values_are_refused_naming_the_field(field, value):
    with pytest.raises(SpecError) as refused:
        CalibrationSpec(**{field: value})
    assert refused.value.argument == field and str(refused.value).startswith(f"{field}: ")


@pytest.mark.parametrize("field, value", BAD_EXECUTIONS)
def test_bad_execution_values_are_refused_naming_the_field(field, value):
    with pytest.raises(SpecError) as refused:
        ExecutionConfig(**{field: value})
    assert refused.value.argument == field and str(refused.value).startswith(f"{field}: ")


def test_steps_beyond_teacher_steps_name_steps():
    with pytest.raises(SpecError, match="^steps: 60 must be between 1 and teacher_steps") as refused:
        CalibrationSpec(steps=(5, 60), teacher_steps=50)
    assert refused.value.argument == "steps"


# ----------------------------------------------------------------------------------- command-line form


@pytest.mark.parametrize(
    "spec, execution",
    [
        (CalibrationSpec(), ExecutionConfig()),
        (
            CalibrationSpec("analytic", "s3://bucket/prompts.parquet", (3, 7, 1), 50, 0.1 + 0.2, 1 / 3, 7),
            ExecutionConfig(output="s3://bucket/registry", device="cpu", num_workers=2, shard_size=3),
        ),
    ],
)
def test_command_line_form_round_trips_through_the_job_parser(spec, execution):
    arguments = [*spec.to_arguments(), *execution.to_arguments(), "--quiet"]
    assert cli.parse_calibrate_arguments(arguments) == (spec, execution, True)
    job_command = typer.main.get_command(calibrate_job_module().app)
    with job_command.make_context("calibrate.py", arguments) as context:
        assert cli.calibration_config(**context.params) == (spec, execution, True)


def test_cli_names_flags_not_arguments():
    assert flag_name("teacher_steps") == "--teacher-steps"
    assert cli.error_text(SpecError("teacher_steps", "must be at least 1, got 0")) == "--teacher-steps: must be at least 1, got 0"
    assert cli.error_text(SpecError("wait_for_gpus_s", "must not be negative")) == "--wait-for-gpus: must not be negative"
    assert cli.error_text(ValueError("no prompts")) == "no prompts"


@pytest.mark.parametrize(
    "arguments, line",
    [
        (["--guidance-scale", "nan"], "error: --guidance-scale: must be a finite number, got nan"),
        (["--steps", "5,5"], "error: --steps: has repeated step counts: [5, 5]"),
        (["--teacher-steps", "0"], "error: --teacher-steps: must be at least 1, got 0"),
        (["--device", "tpu"], "error: --device: must be one of auto, cuda, cpu, got 'tpu'"),
        (["--storage-options", "[1]"], "error: --storage-options must be a JSON object, got list"),
    ],
)
def test_olss_dist_calibrate_bad_value_is_one_error_line(tmp_path, arguments, line):
    output = tmp_path / "registry"
    result = CliRunner().invoke(cli.app, ["calibrate", "--output", str(output), *arguments])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [line]
    assert not output.exists()


def test_evaluate_steps_use_the_one_step_parser(tmp_path):
    result = CliRunner().invoke(cli.app, ["evaluate", "--model", "analytic", "--artifact", str(tmp_path), "--steps", "4,x"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --steps: expected comma-separated positive integers like 5,10,20, got '4,x'"


def test_job_script_refuses_a_bad_value_before_importing_ray_or_torch(tmp_path):
    """``python jobs/calibrate.py --guidance-scale nan``: exit 1 with one error line, nothing written. Ray
    and torch are made unimportable, so a command that started workers would fail differently."""
    blocked = tmp_path / "blocked"
    for package in ("ray", "torch"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(f"raise ImportError('{package} imported before the options were checked')\n")
    output = tmp_path / "registry"
    result = subprocess.run(
        [sys.executable, "jobs/calibrate.py", "--guidance-scale", "nan", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=_environment(first_on_path=blocked),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["error: --guidance-scale: must be a finite number, got nan"]
    assert result.stdout == "" and not output.exists()


def _environment(first_on_path: Path) -> dict[str, str]:
    """This process's environment with ``first_on_path`` ahead of everything on the module search path."""
    path = os.pathsep.join(part for part in (str(first_on_path), os.environ.get("PYTHONPATH")) if part)
    return {**os.environ, "PYTHONPATH": path}


def test_resolution_is_part_of_the_identity_only_when_stated():
    from olss_dist.spec import parse_resolution

    plain = CalibrationSpec()
    assert "resolution" not in plain.identity(None)  # runs published before the field keep their digest
    square, tall = CalibrationSpec(resolution="1024"), CalibrationSpec(resolution="768x1344")
    assert square.resolution == (1024, 1024) and tall.resolution == (768, 1344)
    assert tall.identity(None)["resolution"] == [768, 1344]
    assert len({plain.digest(None), square.digest(None), tall.digest(None)}) == 3
    assert parse_resolution(512) == (512, 512) and parse_resolution([64, 32]) == (64, 32)
    for bad in ("0", "12x", "axb", "1x2x3", -4, (0, 8), 3.5):
        with pytest.raises(SpecError, match="^resolution: "):
            CalibrationSpec(resolution=bad)
    assert "--resolution" in tall.to_arguments() and "--resolution" not in plain.to_arguments()
