"""Several calibration jobs on one Ray cluster: each reserves its actors up front (one placement group)
and plans on them, so jobs that do not fit together run one after the other instead of starving.

The head is the token-authenticated one of tests/ray_head.sh (2 CPUs; CI's or the session's, ``ray_head`` in conftest).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_job_submit import (
    REPO,
    SMALL_SCREEN,
    RayHead,
    assert_one_error_line,
    calibrate_command,
    published_runs,
    run_calibrate,
    wait_for_job,
)
from test_refit import PROMPTS, perturb_weights, tiny_model  # noqa: F401 (tiny_model: the module-scoped tiny SD folder)
from test_refit_submit import REFIT_TIMEOUT_S, refit_command

WAITING = "waiting for the cluster to hold this job"


def submit(head: RayHead, output: Path, *options: str) -> str:
    """``ray job submit --no-wait`` of the analytic job; returns the submission id."""
    submission_id = f"olss-concurrent-{uuid.uuid4().hex[:8]}"
    entrypoint = ["python", *calibrate_command(output, *options)[1:]]
    submitted = subprocess.run(
        ["ray", "job", "submit", "--address", head.address, "--submission-id", submission_id,
         "--working-dir", str(REPO), "--no-wait", "--", *entrypoint],
        cwd=REPO, env=head.client_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    return submission_id


def job_logs(head: RayHead, submission_id: str) -> str:
    return head.api(f"/api/jobs/{submission_id}/logs")["logs"]


@pytest.mark.slow
def test_two_jobs_too_big_to_run_together_finish_one_after_the_other(ray_head, tmp_path):
    # Each job takes one CPU worker per CPU of the cluster (the default): together they need twice the head.
    options = ["--teacher-steps", "40", "--steps", "3,5", "--shard-size", "3", "--guidance-scale", "3",
               "--img2img-strengths", "none", *SMALL_SCREEN]
    outputs = [tmp_path / "first", tmp_path / "second"]
    ids = [submit(ray_head, output, *options) for output in outputs]

    infos = [wait_for_job(ray_head, i) for i in ids]
    logs = [job_logs(ray_head, i) for i in ids]
    assert [info["status"] for info in infos] == ["SUCCEEDED", "SUCCEEDED"], [log[-2000:] for log in logs]
    for output, log in zip(outputs, logs):
        [run] = published_runs(output)
        assert log.strip().splitlines()[-1] == str(run)
    # The two holds of the head did not overlap: the job granted later was granted after the other wrote its report,
    # which it did while holding the cluster. Whether the later one printed the waiting notice depends on when its
    # driver asked (under load one driver can start after the other's run, and neither waits).
    reports = [json.loads((published_runs(o)[0] / "report.json").read_text()) for o in outputs]
    assert all(len(r["workers"]) == len(reports[0]["workers"]) >= 2 for r in reports), "one worker per head CPU"
    assert all(r["reservation"]["bundles"] == reports[0]["reservation"]["bundles"] for r in reports)
    earlier, later = sorted(range(2), key=lambda i: reports[i]["reservation"]["granted_unix"])
    assert reports[later]["reservation"]["granted_unix"] >= reports[earlier]["reported_unix"], reports
    assert infos[earlier]["end_time"] <= infos[later]["end_time"]
    waits = [max(map(int, re.findall(r"the cluster holds this job after waiting (\d+)s", log)), default=0) for log in logs]
    assert waits[earlier] <= reports[earlier]["reservation"]["waited_s"] + 1 and waits[later] <= reports[later]["reservation"]["waited_s"] + 1


HOLDER = """
import sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1])
group = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
ray.get(group.ready())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_a_job_the_cluster_cannot_hold_in_time_is_one_error_line(ray_head, tmp_path):
    # Another driver holds every CPU of the head; a job that may wait 1 s gives up, publishing nothing.
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, ray_head.gcs_address], cwd=REPO, env=ray_head.client_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        output = tmp_path / "registry"
        result = run_calibrate(ray_head, *calibrate_command(output, "--teacher-steps", "20", "--reserve-timeout", "1"))
        assert_one_error_line(result, "could not hold this job (2 x {CPU: 1}) within 1s", output)
        assert "--reserve-timeout" in result.stderr.strip().splitlines()[-1]
        assert WAITING in result.stderr, "it said it was waiting before it gave up"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


@pytest.mark.slow
def test_refits_of_three_models_against_one_head_all_finish(ray_head, tiny_model, tmp_path):
    registry, prompts = tmp_path / "models", tmp_path / "prompts.txt"
    for index, name in enumerate(["model-a", "model-b", "model-c"]):
        shutil.copytree(tiny_model, registry / name)
        if index:
            perturb_weights(registry / name, seed=index)
    prompts.write_text("\n".join(PROMPTS) + "\n")
    # One refit of the registry submits three jobs at once (one per model, one worker each) to a 2-CPU head:
    # two run, the third waits for a reservation to be released; all three finish and publish.
    command = refit_command(registry, tmp_path / "store", prompts, ray_head, "--wait")
    result = subprocess.run(command, cwd=REPO, env=ray_head.client_env(), capture_output=True, text=True,
                            timeout=REFIT_TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout)
    assert sorted(o["status"] for o in outcomes) == ["succeeded"] * 3, outcomes
    runs = sorted(p.parent for p in (tmp_path / "store").rglob("manifest.json"))
    assert len(runs) == 3, "one run per model"
    assert sorted(o["run_uri"] for o in outcomes) == [str(run) for run in runs]
