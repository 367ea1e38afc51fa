"""Refits through the Ray Jobs API.

- ``RayJobs`` (olss_dist.distributed.submission) against a small stand-in of the Jobs API's HTTP interface
  (the endpoints and answers of Ray 2.x's dashboard: version, packages, jobs), so that every kind of
  ``SubmissionError`` is exercised in well under a second;
- ``jobs/refit.py`` processes submitting with ``JobSubmissionClient`` to a real token-authenticated Ray
  head (tests/ray_head.sh, or the head CI started): slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray
from test_job_submit import REPO, RayHead
from test_refit import PROMPTS, fake_target, tiny_model  # noqa: F401 (tiny_model: the module-scoped tiny SD folder)

from olss_dist.apps.refit import AttemptStatus, RefitOptions, RefitRecord, Refitter, Status
from olss_dist.artifacts import read_manifest
from olss_dist.distributed.submission import RayJobs, SubmissionError, SubmissionKind
from olss_dist.spec import ExecutionConfig

REFIT_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------- Jobs API stand-in


@dataclass
class JobsApi:
    """What the stand-in answers. ``jobs``: submission id -> status; ``submit_status``: the HTTP status of
    POST /api/jobs/ for a new id (200 creates the job); ``auth_status``: 401/403 for every request, or None;
    ``requests``: the bodies of the POSTs received."""

    jobs: dict[str, str] = field(default_factory=dict)
    submit_status: int = 200
    auth_status: int | None = None
    submitted: list[str] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)  # every POST /api/jobs/ body, as sent


def jobs_api_handler(api: JobsApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def answer(self, status: int, body: object = "") -> None:
            data = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def refused_credentials(self) -> bool:
            if api.auth_status is not None:
                self.answer(api.auth_status, "Unauthorized: missing or invalid token")
            return api.auth_status is not None

        def do_GET(self) -> None:
            if self.refused_credentials():
                return
            if self.path == "/api/version":
                return self.answer(200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "", "session_name": "t"})
            if self.path.startswith("/api/packages/"):
                return self.answer(404, "Package does not exist")  # so the client uploads it
            submission_id = self.path.removeprefix("/api/jobs/")
            if submission_id in api.jobs:
                return self.answer(200, {"type": "SUBMISSION", "submission_id": submission_id, "job_id": None,
                                         "status": api.jobs[submission_id], "entrypoint": "python jobs/calibrate.py",
                                         "message": "", "error_type": None})  # fmt: skip
            self.answer(404, f"Job {submission_id} does not exist")

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            if not self.refused_credentials():
                self.answer(200)

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            api.requests.append(request)
            if self.refused_credentials():
                return
            submission_id = request["submission_id"]
            if submission_id in api.jobs:  # what Ray's head answers: the agent's ValueError, re-raised as a 500
                return self.answer(500, f"Traceback ...\nValueError: Job with submission_id {submission_id} already exists.")
            if api.submit_status != 200:
                return self.answer(api.submit_status, "Traceback ...\nTypeError: bad runtime_env")
            api.jobs[submission_id] = "PENDING"
            api.submitted.append(submission_id)
            self.answer(200, {"job_id": submission_id, "submission_id": submission_id})

    return Handler


@pytest.fixture
def jobs_api(monkeypatch):
    """``(JobsApi, "http://127.0.0.1:PORT")``: a stand-in Jobs API server for this test."""
    for variable in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"):  # Ray prefers these to the address passed
        monkeypatch.delenv(variable, raising=False)
    api = JobsApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), jobs_api_handler(api))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_submission_outcomes_are_typed_from_statuses_not_messages(jobs_api, tmp_path):
    api, address = jobs_api
    jobs = RayJobs(address)
    assert jobs.info("olss-refit-x-1") is None, "HTTP 404: no such job"
    jobs.submit("olss-refit-x-1", "python jobs/calibrate.py", str(tmp_path))
    state = jobs.info("olss-refit-x-1")
    assert (state.status, state.active, state.succeeded) == ("PENDING", True, False)

    with pytest.raises(SubmissionError) as duplicate:
        jobs.submit("olss-refit-x-1", "python jobs/calibrate.py", str(tmp_path))
    assert duplicate.value.kind == SubmissionKind.DUPLICATE and api.submitted == ["olss-refit-x-1"]

    api.submit_status = 400
    with pytest.raises(SubmissionError) as refused:
        jobs.submit("olss-refit-x-2", "python jobs/calibrate.py", str(tmp_path))
    assert (refused.value.kind, refused.value.status_code) == (SubmissionKind.REFUSED, 400)
    assert "TypeError: bad runtime_env" in refused.value.detail, "the server's own last line"

    api.jobs["olss-refit-x-1"] = "SUCCEEDED"
    assert jobs.wait_any(["olss-refit-x-1"], poll_s=0.01) == ["olss-refit-x-1"]
    assert jobs.info("olss-refit-x-1").succeeded


def test_unreachable_and_unauthorised_clusters_are_typed(jobs_api, tmp_path):
    api, address = jobs_api
    with pytest.raises(SubmissionError) as unreachable:
        RayJobs("http://127.0.0.1:9").submit("olss-refit-y-1", "true", str(tmp_path))
    assert unreachable.value.kind == SubmissionKind.UNREACHABLE and "127.0.0.1:9" in unreachable.value.detail
    api.auth_status = 401
    with pytest.raises(SubmissionError) as unauthorised:
        RayJobs(address).info("olss-refit-y-1")
    assert unauthorised.value.kind == SubmissionKind.REFUSED and "Authentication required" in unauthorised.value.detail


def test_refit_reports_a_duplicate_as_running_and_a_refusal_as_unsubmitted(jobs_api, tmp_path):
    api, address = jobs_api
    options = RefitOptions(ExecutionConfig(output=str(tmp_path / "store")), address=address, max_attempts=1)
    target = fake_target()
    api.jobs[target.submission_id(1)] = "RUNNING"  # on the cluster, though no record says so (a lost record)
    outcome = Refitter(options).refit(target)
    assert (outcome.status, outcome.attempt) == (Status.RUNNING, 1) and "already exists" in outcome.message
    assert api.submitted == [], "nothing submitted twice"

    api.jobs.clear()
    api.submit_status = 400
    refitter = Refitter(options)
    other = fake_target("model-y")
    outcome = refitter.refit(other)
    assert outcome.status == Status.FAILED and "refused" in outcome.message and "HTTP 400" in outcome.message
    [attempt] = RefitRecord(refitter.store, other).read()[0]["attempts"]
    assert attempt["status"] == AttemptStatus.UNSUBMITTED, "a refusal does not use up an attempt"


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

    # The real head's answers map to the same kinds as the stand-in's (a client process: token auth from its env).
    probe = subprocess.run([sys.executable, "-c", SUBMISSION_PROBE, ray_head.address, submission_id, str(tmp_path)],
                           cwd=REPO, env=ray_head.client_env(), capture_output=True, text=True, timeout=REFIT_TIMEOUT_S,
                           check=False)  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert json.loads(probe.stdout) == {"duplicate": "duplicate", "unknown": None, "succeeded": True}


SUBMISSION_PROBE = """
import json, sys
from olss_dist.distributed.submission import RayJobs, SubmissionError
address, submission_id, working_dir = sys.argv[1:]
jobs = RayJobs(address)
try:
    jobs.submit(submission_id, "true", working_dir)
    kind = "submitted"
except SubmissionError as error:
    kind = error.kind
print(json.dumps({"duplicate": kind, "unknown": jobs.info("olss-refit-unknown-1"), "succeeded": jobs.info(submission_id).succeeded}))
"""
