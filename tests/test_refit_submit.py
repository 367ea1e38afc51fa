"""Refits through the Ray Jobs API: ``jobs/refit.py`` processes submitting with ``JobSubmissionClient`` to a
token-authenticated Ray head (tests/ray_head.sh, or the head CI started).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_job_submit import REPO, RayHead, ray_head  # noqa: F401 (ray_head: the module-scoped head fixture)
from test_refit import PROMPTS, tiny_model  # noqa: F401 (tiny_model: the module-scoped tiny SD folder)

from olss_dist.artifacts import read_manifest

REFIT_TIMEOUT_S = 300


def refit_command(registry: Path, store: Path, prompts: Path, head: RayHead, *options: str) -> list[str]:
    return [
        sys.executable, "jobs/refit.py", str(registry), "--output", str(store), "--address", head.address,
        "--prompts", str(prompts), "--steps", "2,4", "--teacher-steps", "20", "--validation-fraction", "0.25",
        "--shard-size", "2", "--num-workers", "1", "--json", *options,
    ]  # fmt: skip


def outcome_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    [outcome] = json.loads(result.stdout)
    return outcome


@pytest.mark.slow
def test_racing_refits_submit_one_job_which_a_waiting_refit_sees_succeed(ray_head, tiny_model, tmp_path):
    registry, store, prompts = tmp_path / "models", tmp_path / "store", tmp_path / "prompts.txt"
    shutil.copytree(tiny_model, registry / "model-a")
    prompts.write_text("\n".join(PROMPTS) + "\n")
    command = refit_command(registry, store, prompts, ray_head)
    racing = [subprocess.Popen(command, cwd=REPO, env=ray_head.client_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    raced = [outcome_of(subprocess.CompletedProcess(p.args, p.wait(REFIT_TIMEOUT_S), *p.communicate())) for p in racing]
    assert sorted(o["status"] for o in raced) == ["running", "submitted"], raced
    submission_id = raced[0]["submission_id"]
    assert submission_id == raced[1]["submission_id"] == (
        f"olss-refit-{raced[0]['model_digest'][:12]}-{raced[0]['config_digest'][:12]}-1"
    )

    waited = outcome_of(subprocess.run([*command, "--wait"], cwd=REPO, env=ray_head.client_env(),
                                       capture_output=True, text=True, timeout=REFIT_TIMEOUT_S))  # fmt: skip
    assert waited["status"] == "succeeded", waited
    manifest = read_manifest(waited["run_uri"])
    assert (manifest["model"]["digest"], manifest["config_digest"]) == (waited["model_digest"], waited["config_digest"])

    again = outcome_of(subprocess.run(command, cwd=REPO, env=ray_head.client_env(), capture_output=True, text=True,
                                      timeout=REFIT_TIMEOUT_S))  # fmt: skip
    assert (again["status"], again["run_uri"]) == ("skipped", waited["run_uri"])
    jobs = [job for job in ray_head.api("/api/jobs/") if (job.get("submission_id") or "").startswith("olss-refit-")]
    assert [job["submission_id"] for job in jobs if job["submission_id"].startswith(submission_id[:-2])] == [submission_id]
