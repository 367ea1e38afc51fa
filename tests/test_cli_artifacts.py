"""``olss-dist show / pull / list`` against the moto S3 server, the GCS emulator and local registries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from artifact_data import CONFIG, run_files
from conftest import free_port
from olss_dist.artifacts import publish_run
from olss_dist.cli import app

runner = CliRunner()
MODEL = {"model_id": "org/tiny-sd", "model_digest": "weights0001"}


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "250"})


def test_show_prints_manifest_plans_step_errors_and_report(s3_root):
    published = publish_run(s3_root, **MODEL, config=CONFIG, files=run_files(0))
    result = invoke("show", f"{s3_root}/org--tiny-sd")
    assert result.exit_code == 0, result.output
    plans = json.loads(run_files(0)["plans.json"])
    for text in (published.run_id, "org/tiny-sd", "weights0001", "calibration.safetensors", "teacher steps",
                 "step errors", "held_out_mse.4", f"{plans[0]['step_errors'][0]:.4g}", "minimax"):
        assert text in result.output, text


def test_show_fits_a_20_step_plan_and_its_candidates_in_80_columns(tmp_path):
    rng = np.random.default_rng(3)
    candidates = [
        {"name": name, "ridge": ridge, "rmse": rmse, "error": rmse, "median": rmse / 2, "p90": rmse * 1.5,
         "worst": rmse * 3, "max_abs_coefficient": 14.5}
        for name, ridge, rmse in [("builtin/deis", None, 0.0271), ("on_policy/minimax/ridge=1e-06", 1e-06, 0.00303),
                                  ("teacher_forced/minimax", None, 0.0479)]
    ]
    plan = {"num_steps": 20, "nodes": list(range(0, 1000, 50)), "timesteps": list(range(999, 0, -50)),
            "coefficients": rng.standard_normal((20, 21)).tolist(), "step_errors": (rng.random(20) * 1e-5).tolist(),
            "fit": "on_policy", "spacing": "minimax", "candidates": candidates}
    files = {**run_files(0), "plans.json": json.dumps([plan]).encode()}
    published = publish_run(str(tmp_path), **MODEL, config=CONFIG, files=files)
    result = runner.invoke(app, ["show", published.uri], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    start = next(i for i, line in enumerate(lines) if line.startswith("step errors"))
    step_rows = [line for line in lines[start:start + 26] if line.strip("│ ").split(" ")[0].isdigit()]
    assert f"{plan['step_errors'][19]:.4g}" in step_rows[19] and "…" not in "".join(step_rows)
    ranked = [line.split()[0] for line in lines if line.split() and line.split()[0].startswith(("builtin/", "on_policy/", "teacher_forced/"))]
    assert ranked == ["on_policy/minimax", "builtin/deis", "teacher_forced/minimax"]
    assert "on_policy/minimax *" in result.output and "0.00303" in result.output


def test_show_refuses_a_tampered_report(bucket_root, bucket_fs):
    published = publish_run(bucket_root, **MODEL, config=CONFIG, files=run_files(0))
    bucket_fs.pipe_file(f"{published.uri}/report.json", b'{"held_out_mse": 0}')
    result = invoke("show", published.uri)
    assert result.exit_code == 1
    assert "report.json" in result.output and "tampered" in result.output


def test_pull_downloads_a_verified_copy(bucket_root, tmp_path):
    publish_run(bucket_root, **MODEL, config=CONFIG, files=run_files(4))
    result = invoke("pull", f"{bucket_root}/org--tiny-sd/latest.json", str(tmp_path / "copy"))
    assert result.exit_code == 0, result.output
    for name, data in run_files(4).items():
        assert (tmp_path / "copy" / name).read_bytes() == data
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text())["model"]["id"] == "org/tiny-sd"


def test_list_marks_the_latest_run(bucket_root):
    first = publish_run(bucket_root, **MODEL, config=CONFIG, files=run_files(1))
    second = publish_run(bucket_root, **MODEL, config=CONFIG, files=run_files(2))
    result = invoke("list", bucket_root)
    assert result.exit_code == 0, result.output
    lines = {line for line in result.output.splitlines() if "weights0001" in line}
    assert any(first.run_id in line and "latest" not in line for line in lines)
    assert any(second.run_id in line and "latest" in line for line in lines)


def test_list_of_an_empty_root(tmp_path):
    tmp_path.joinpath("reg").mkdir()
    result = invoke("list", str(tmp_path / "reg"))
    assert result.exit_code == 0 and "no runs under" in result.output


def test_storage_options_flag_reaches_the_store(s3_bucket, moto_endpoint, monkeypatch, tmp_path):
    root = f"s3://{s3_bucket}/registry"
    publish_run(root, **MODEL, config=CONFIG, files=run_files(0))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert invoke("list", root).exit_code == 1
    options = json.dumps({"endpoint_url": moto_endpoint})
    result = invoke("list", root, "--storage-options", options)
    assert result.exit_code == 0, result.output
    assert "weights0001" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "{root}/nothing"], "no run at"),
        (["pull", "{root}/nothing", "{tmp}/x"], "no run at"),
        (["list", "{root}", "--storage-options", "{{not json"], "--storage-options is not valid JSON"),
        (["list", "{root}", "--storage-options", "[1]"], "must be a JSON object"),
        (["list", "s3://olss-no-such-bucket/x"], "bucket 'olss-no-such-bucket' does not exist"),
        (["list", "{root}", "--storage-options", '{{"bogus_option": 1}}'],
         "the store does not take a storage option given"),
    ],
)
def test_errors_are_one_line_and_exit_1(s3_root, tmp_path, args, message):
    publish_run(s3_root, **MODEL, config=CONFIG, files=run_files(0))
    result = invoke(*(arg.format(root=s3_root, tmp=tmp_path) for arg in args))
    assert result.exit_code == 1
    assert result.output.startswith("error:") and message in result.output
    assert "Traceback" not in result.output


def test_a_missing_gcs_bucket_is_one_line_and_exit_1(gcs_bucket):
    result = invoke("list", f"gs://{gcs_bucket}-missing/x")
    assert result.exit_code == 1
    assert result.output.startswith("error:") and f"bucket '{gcs_bucket}-missing' does not exist" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
