"""Bad input and faults of the calibration job, end to end through ``jobs/calibrate.py``: each is one
``error:`` line (the last on stderr), a non-zero exit and nothing published, or a recovery.

Faults inside Ray workers are injected with Ray's ``worker_process_setup_hook`` by a small driver that
starts its own local Ray and then runs the job's command line in it (``FAULT_DRIVER``): the workers run
the real job code, with one function replaced (the denoiser raising CUDA's out-of-memory error, an
actor killing its own process during the on-policy rounds, the driver killing itself while publishing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from test_job_submit import REPO, SMALL_SCREEN, assert_one_error_line, calibrate_command, published_runs

from typer.testing import CliRunner

from olss_dist.artifacts import list_models
from olss_dist.cli import app

# no img2img start plans: the faults here are in the teacher, the rounds and publishing, not in start plans
FAST = ["--teacher-steps", "20", "--steps", "2,4", "--shard-size", "2", "--guidance-scale", "3", "--img2img-strengths", "none",
        *SMALL_SCREEN]

FAULT_DRIVER = r'''
import json, os, signal, sys
import ray
fault, marker, arguments = sys.argv[1], sys.argv[2], sys.argv[3:]

def inject():
    """Runs in every Ray worker process before its actor is created."""
    import torch
    from olss_dist.distributed import worker
    from olss_dist.models.analytic import GaussianMixtureModel
    if fault == "cuda-oom":
        def out_of_memory(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 15.77 GiB total capacity)")
        GaussianMixtureModel.__call__ = out_of_memory
    if fault == "kill-worker-in-round":
        advance = worker.CalibrationWorker.advance_rollout
        def advance_once_then_die(self, *args, **kwargs):
            if not os.path.exists(marker):  # the first round of the first actor process only
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return advance(self, *args, **kwargs)
        worker.CalibrationWorker.advance_rollout = advance_once_then_die

if fault == "kill-driver-after-manifest":  # the driver dies after the run's manifest, before latest.json moves
    from olss_dist.artifacts import publish
    publish._advance_pointer = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"worker_process_setup_hook": inject})
from olss_dist.cli import app
app(["calibrate", *arguments], prog_name="olss-dist")
'''


def run_with_fault(fault: str, output: Path, *options: str, marker: Path | None = None) -> subprocess.CompletedProcess:
    arguments = calibrate_command(output, *FAST, *options)[2:]  # without "python jobs/calibrate.py"
    return subprocess.run([sys.executable, "-c", FAULT_DRIVER, fault, str(marker or output.parent / "marker"), *arguments],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip


def invoke_calibrate(output: Path | str, *options: str) -> subprocess.CompletedProcess:
    """``olss-dist calibrate`` in this process (for input checked before Ray starts), as a completed process."""
    arguments = ["calibrate", *calibrate_command(output, *FAST, *options)[2:]]
    result = CliRunner().invoke(app, arguments, prog_name="olss-dist", terminal_width=400)
    return subprocess.CompletedProcess(["olss-dist"], result.exit_code, result.stdout, result.stderr)


def run_calibrate_here(output: Path, *options: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(calibrate_command(output, *FAST, *options), cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


# ------------------------------------------------------------------------------------ prompt files


@pytest.mark.parametrize(
    "make_prompts, fragment",
    [
        (lambda tmp: pq.write_table(pa.table({"text": ["a cat"]}), tmp / "p.parquet"), "no 'prompt' column"),
        (lambda tmp: pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp / "p.parquet"), "no prompts"),
        (lambda tmp: (tmp / "p.parquet").write_bytes(b""), "not a readable Parquet"),
    ],
)
def test_bad_prompt_files_are_one_error_line_before_ray_starts(tmp_path, make_prompts, fragment):
    make_prompts(tmp_path)
    output = tmp_path / "registry"
    result = invoke_calibrate(output, "--prompts", str(tmp_path / "p.parquet"))
    assert_one_error_line(result, fragment, output)
    assert not ray.is_initialized(), "checked before Ray starts"


# ------------------------------------------------------------------------------------------ buckets


def test_a_missing_bucket_is_one_error_line_before_the_teacher_starts(s3_bucket, tmp_path):
    # s3_bucket points the AWS environment at the moto server; this bucket was never created there.
    output = f"s3://{s3_bucket}-missing/registry"
    result = invoke_calibrate(output)
    assert_one_error_line(result, "output is not writable", tmp_path)
    assert "does not exist" in result.stderr and not ray.is_initialized()


def test_an_unreachable_bucket_is_one_error_line_before_the_teacher_starts(tmp_path, monkeypatch):
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = json.dumps({"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}})
    result = invoke_calibrate("s3://olss-unreachable/registry", "--storage-options", options)
    assert_one_error_line(result, "cannot reach the storage endpoint", tmp_path)
    assert not ray.is_initialized(), "checked before Ray starts, so before any teacher"


# ------------------------------------------------------------------------------------ device memory


def test_out_of_memory_is_told_apart_from_other_worker_errors():
    import torch

    from olss_dist.distributed.failure import DeviceMemoryError, WorkerError, is_out_of_memory, out_of_memory_error

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))  # older torch
    assert not is_out_of_memory(ValueError("shape mismatch")) and not is_out_of_memory(RuntimeError("CUDA error: misaligned"))
    batch, loading = out_of_memory_error("CUDA out of memory.\nmore"), out_of_memory_error("CUDA out of memory.", loading=True)
    assert isinstance(batch, DeviceMemoryError) and isinstance(batch, WorkerError)
    assert "--shard-size" in str(batch) and "\n" not in str(batch)
    assert "while loading" in str(loading) and "--shard-size" not in str(loading)


@pytest.mark.slow
def test_a_model_that_does_not_fit_on_the_device_says_so_and_names_shard_size(tmp_path):
    output = tmp_path / "registry"
    result = run_with_fault("cuda-oom", output)
    assert_one_error_line(result, "does not fit on the worker's device", output)
    last = result.stderr.strip().splitlines()[-1]
    assert "CUDA out of memory" in last and "--shard-size" in last


# ------------------------------------------------------------------------------- lost worker, rounds


@pytest.mark.slow
@pytest.mark.parametrize("max_restarts, recovers", [(1, True), (0, False)])
def test_a_worker_killed_during_the_on_policy_rounds_is_recovered_or_fails_clearly(tmp_path, max_restarts, recovers):
    output, marker = tmp_path / "registry", tmp_path / "killed"
    result = run_with_fault("kill-worker-in-round", output, "--num-workers", "1", "--max-restarts", str(max_restarts),
                            "--keep-states", "disk", "--state-dir", str(tmp_path / "states"), marker=marker)  # fmt: skip
    assert marker.exists(), "the worker process was killed in a round"
    if recovers:
        assert result.returncode == 0, result.stderr[-3000:]
        [run] = published_runs(output)
        report = json.loads((run / "report.json").read_text())
        assert report["statistics"]["worker_recoveries"] >= 1
        assert result.stdout.strip().splitlines()[-1] == str(run)
    else:
        assert_one_error_line(result, "every worker died", output)


# ------------------------------------------------------------------------------ killed while publishing


@pytest.mark.slow
def test_a_driver_killed_while_publishing_leaves_a_run_that_the_rerun_publishes_once(tmp_path):
    output = tmp_path / "registry"
    killed = run_with_fault("kill-driver-after-manifest", output, "--keep-checkpoints")
    assert killed.returncode == -9, killed.stderr[-3000:]
    [orphan] = published_runs(output)  # complete (manifest written last), but latest.json does not name it
    assert not list(output.rglob("latest.json"))

    rerun = run_calibrate_here(output, "--num-workers", "1")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert published_runs(output) == [orphan], "no second run: the rerun adopted the complete one"
    assert rerun.stdout.strip().splitlines()[-1] == str(orphan)
    [model] = list_models(str(output))
    assert model.latest_run_id == orphan.name and [r.run_id for r in model.runs] == [orphan.name]
