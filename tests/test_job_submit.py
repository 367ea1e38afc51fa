"""The calibration job for real: `ray job submit` to a token-authenticated Ray head, resume after the
job is killed, and one clear error line for bad input.

The head is the one CI started (``OLSS_TEST_RAY_ADDRESS``, ``OLSS_TEST_RAY_GCS_ADDRESS``,
``OLSS_TEST_RAY_AUTH_TOKEN_PATH``, see tests/ray_head.sh) or one the test session starts once and stops
(``ray_head`` in tests/conftest.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import RayHead

from olss_dist.core.calibration import Calibration
from olss_dist.scheduler import OLSSScheduler

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300
TERMINAL_STATUSES = {"SUCCEEDED", "FAILED", "STOPPED"}


def wait_for_job(head: RayHead, submission_id: str) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        info = head.api(f"/api/jobs/{submission_id}")
        if info["status"] in TERMINAL_STATUSES:
            return info
        time.sleep(1)
    raise AssertionError(f"job {submission_id} did not finish in {JOB_TIMEOUT_S} s")


def published_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("manifest.json"))


SMALL_SCREEN = ("--screen-samples", "16")
"""For analytic jobs whose tail screen is not under test: the model's default, 64 screen samples per fit prompt,
is hundreds of shards of the job's 2-3 samples (14 s of a 38 s job); tests/test_screen.py and the job-equals
tests cover the screen."""


def calibrate_command(output: Path, *options: str) -> list[str]:
    """The job on the analytic model, 10% of the default prompts held out (fast and fixed sizes)."""
    return [sys.executable, "jobs/calibrate.py", "--output", str(output), "--model", "analytic",
            "--validation-fraction", "0.1", *options]


def test_head_refuses_requests_without_the_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as refused:
        ray_head.api("/api/jobs/", token=None)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        ray_head.api("/api/jobs/", token="not-the-token")


def test_ray_job_submit_runs_the_job_and_publishes_a_loadable_scheduler(ray_head, tmp_path):
    submission_id = f"olss-test-{uuid.uuid4().hex[:8]}"
    output = tmp_path / "registry"
    entrypoint = " ".join(
        calibrate_command(output, "--teacher-steps", "40", "--steps", "3,5", "--shard-size", "3", "--guidance-scale", "3",
                          "--img2img-strengths", "none", *SMALL_SCREEN)
    ).replace(sys.executable, "python")
    submit = subprocess.run(
        ["ray", "job", "submit", "--address", ray_head.address, "--submission-id", submission_id,
         "--working-dir", str(REPO), "--no-wait", "--", *entrypoint.split()],
        cwd=REPO, env=ray_head.client_env(), capture_output=True, text=True, timeout=120,
    )
    assert submit.returncode == 0, submit.stderr[-2000:]
    info = wait_for_job(ray_head, submission_id)
    logs = ray_head.api(f"/api/jobs/{submission_id}/logs")["logs"]
    assert info["status"] == "SUCCEEDED", logs[-3000:]

    [run] = published_runs(output)
    assert logs.strip().splitlines()[-1] == str(run), "the job prints the run's URI last"
    assert "shard 0 done" in logs and "samples/s" in logs and "ETA" in logs
    scheduler = OLSSScheduler.from_pretrained(str(run))
    assert scheduler.available_steps == [3, 5]
    report = json.loads((run / "report.json").read_text())
    assert [p["num_steps"] for p in report["plans"]] == [3, 5]
    assert all(len(p["step_errors"]) == p["num_steps"] for p in report["plans"])
    assert report["statistics"]["num_samples"] == 9 and report["model"]["id"].startswith("analytic")
    assert Calibration.load(run / "calibration.safetensors").num_teacher_steps == 40


def run_calibrate(head: RayHead, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*args, "--address", head.gcs_address], cwd=REPO, env=head.client_env(),
                          capture_output=True, text=True, timeout=timeout)


def shard_marks(root: Path) -> list[Path]:
    return sorted(root.rglob("_staging/*/shard-*.json"))


@pytest.mark.slow
def test_killed_job_resumes_from_its_checkpoints_and_recomputes_no_finished_shard(ray_head, tmp_path):
    # N=1000 makes each shard take about a second, long enough to kill the job between shards.
    options = ["--teacher-steps", "1000", "--steps", "4", "--shard-size", "2", "--guidance-scale", "3",
               "--validation-fraction", "0.2", "--keep-states", "disk", "--keep-checkpoints", "--img2img-strengths", "none",
               *SMALL_SCREEN]
    resumed_root = tmp_path / "resumed"
    job = subprocess.Popen([*calibrate_command(resumed_root, *options), "--address", ray_head.gcs_address],
                           cwd=REPO, env=ray_head.client_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(shard_marks(resumed_root)) < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    finished_before = {p.name for p in shard_marks(resumed_root)}
    assert len(finished_before) >= 2 and not published_runs(resumed_root), "killed after some shards, before publishing"

    resumed = run_calibrate(ray_head, *calibrate_command(resumed_root, *options))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((published_runs(resumed_root)[0] / "report.json").read_text())
    statistics = report["statistics"]
    assert statistics["restored_shards"] == len(finished_before)
    assert statistics["computed_shards"] == statistics["num_shards"] - len(finished_before)
    assert statistics["teacher_reruns"] == 0, "the finished shards' teacher states were read back from the node's disk"
    assert f"resumed {len(finished_before)}/" in resumed.stdout

    clean_root = tmp_path / "clean"
    clean = run_calibrate(ray_head, *calibrate_command(clean_root, *options))
    assert clean.returncode == 0, clean.stderr[-3000:]
    # the analytic model's 10 default prompts, 2 held out: said before the teacher runs
    assert "warning: 8 fit and 2 held-out prompts are too few for a fitted plan to ship" in clean.stderr
    r_resumed = Calibration.load(published_runs(resumed_root)[0] / "calibration.safetensors").r_factor
    r_clean = Calibration.load(published_runs(clean_root)[0] / "calibration.safetensors").r_factor
    assert np.abs(r_resumed - r_clean).max() <= 1e-12 * np.abs(r_clean).max()
    plans_resumed = json.loads((published_runs(resumed_root)[0] / "plans.json").read_text())
    plans_clean = json.loads((published_runs(clean_root)[0] / "plans.json").read_text())
    assert [p["nodes"] for p in plans_resumed] == [p["nodes"] for p in plans_clean]


def assert_one_error_line(result: subprocess.CompletedProcess, fragment: str, output: Path) -> None:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0], "the error line comes last"
    assert not published_runs(output) if output.is_dir() else True


@pytest.mark.parametrize(
    "make_options, fragment",
    [
        (lambda tmp: ["--prompts", str(_write(tmp / "empty.txt", "\n"))], "no prompts"),
        (lambda tmp: ["--prompts", str(tmp / "missing.parquet")], "cannot read prompts"),
        (lambda tmp: ["--teacher-steps", "50", "--steps", "5,60"], "--steps: 60 must be between 1 and teacher_steps (50)"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path, make_options, fragment):
    output = tmp_path / "registry"
    result = subprocess.run(calibrate_command(output, *make_options(tmp_path)), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert_one_error_line(result, fragment, output)


def test_unwritable_output_fails_before_any_work(tmp_path):
    blocker = _write(tmp_path / "a-file", "not a directory")
    output = blocker / "registry"
    result = subprocess.run(calibrate_command(output), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_one_error_line(result, "not writable", tmp_path)


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--model", "/nonexistent/model-folder"], "/nonexistent/model-folder"),
        (["--device", "cuda"], "no GPU"),
    ],
)
def test_bad_input_on_the_cluster_is_one_error_line(ray_head, tmp_path, options, fragment):
    output = tmp_path / "registry"
    result = run_calibrate(ray_head, *calibrate_command(output, "--teacher-steps", "20", *options), timeout=180)
    assert_one_error_line(result, fragment, output)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
