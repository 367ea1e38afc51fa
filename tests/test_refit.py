"""Scheduled refits: registry forms, identities, the refit record under races, and whole refits of two tiny
diffusers models calibrated inline on a local Ray (file:// and moto S3 stores).

The job-submission path (``JobSubmissionClient`` against a token-auth Ray head) is in test_refit_submit.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from artifact_data import run_files
from safetensors.torch import load_file, save_file
from tiny_sd import tiny_pipeline
from typer.testing import CliRunner

from olss_dist import cli
from olss_dist.apps.refit import (
    AttemptStatus,
    RefitOptions,
    RefitRecord,
    Refitter,
    Status,
    identify,
    job_arguments,
    new_attempt,
    parse_registry_document,
    refit,
    scan_registry,
    target_of,
    with_attempt,
)
from olss_dist.artifacts import publish_run, read_manifest
from olss_dist.artifacts.stores import open_store
from olss_dist.cli import app, parse_calibrate_arguments
from olss_dist.distributed.job import run_job
from olss_dist.models.digest import content_digest
from olss_dist.prompts import spec_digest
from olss_dist.spec import CalibrationSpec, ExecutionConfig

REPO = Path(__file__).resolve().parents[1]
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
PROMPTS = ["a red cat", "a blue dog", "a green bird", "a cat and a dog"]
# Small enough for seconds per calibration on two shared cores: N=20, K in {2, 4}, one held-out prompt, no
# img2img start plans (refits do not depend on them; tests/test_start_plans.py tests them).
FAST = CalibrationSpec(steps=(2, 4), teacher_steps=20, validation_fraction=0.25, img2img_strengths=())


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny diffusers SD folder (built once per module; tests copy it)."""
    folder = tmp_path_factory.mktemp("tiny_sd")
    tiny_pipeline(folder)
    return folder / "model"


def perturb_weights(model: Path, seed: int) -> None:
    """Add small noise to every UNet tensor: another fine-tune of the same architecture."""
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(model / UNET_WEIGHTS)
    save_file({name: t + 1e-3 * torch.randn(t.shape, generator=generator) for name, t in tensors.items()}, model / UNET_WEIGHTS)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def registry(tmp_path, tiny_model) -> Path:
    """``models/model-a`` and ``models/model-b`` (weights perturbed from a's), plus a stray hidden folder."""
    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "model-a")
    shutil.copytree(tiny_model, models / "model-b")
    perturb_weights(models / "model-b", seed=1)
    (models / ".cache").mkdir()
    return models


@pytest.fixture
def settings(tmp_path) -> CalibrationSpec:
    """``FAST`` with a prompt file of ``PROMPTS``: the registry defaults of most tests."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return replace(FAST, prompts=str(prompts))


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch) -> Path:
    """Remote model folders are copied here, never into ~/.cache."""
    cache = tmp_path / "model-cache"
    monkeypatch.setenv("OLSS_MODEL_CACHE_DIR", str(cache))
    return cache


def inline_options(output: str, **changes) -> RefitOptions:
    return RefitOptions(ExecutionConfig(output=output, num_workers=1, shard_size=2), inline=True, **changes)


class CountingRunner:
    """``run_job`` that remembers which models it calibrated (a model call is a ``run_job`` call)."""

    def __init__(self):
        self.models: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, spec, execution, *, quiet=False):
        with self.lock:
            self.models.append(Path(spec.model).name)
        return run_job(spec, execution, quiet=quiet)


def by_model(outcomes) -> dict:
    return {Path(o.model).name: o for o in outcomes}


def complete_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("manifest.json"))


# ------------------------------------------------------------------------------------------- registry


def test_directory_registry_lists_model_folders_with_absolute_specs(registry, settings):
    models = scan_registry(str(registry), settings)
    assert [m.model for m in models] == [str(registry / "model-a"), str(registry / "model-b")]
    assert all(replace(m, model=settings.model) == settings for m in models)


def test_registry_file_defaults_overrides_and_relative_paths(tmp_path):
    (tmp_path / "prompts").mkdir()
    document = {
        "defaults": {"teacher_steps": 50, "steps": "4,8"},
        "models": [
            "./models/a",
            {"uri": "s3://bucket/models/b", "prompts": "./prompts/b.txt", "guidance_scale": 5, "steps": [2, 3]},
            {"uri": "org/name", "seed": 7},
        ],
    }
    (tmp_path / "models.yaml").write_text(json.dumps(document))  # JSON is YAML
    models = scan_registry(str(tmp_path / "models.yaml"), CalibrationSpec(validation_fraction=0.3))
    assert [m.model for m in models] == [str(tmp_path / "models" / "a"), "s3://bucket/models/b", "org/name"]
    assert models[0] == CalibrationSpec(str(tmp_path / "models" / "a"), steps=(4, 8), teacher_steps=50, validation_fraction=0.3)
    assert models[1] == CalibrationSpec("s3://bucket/models/b", str(tmp_path / "prompts" / "b.txt"), (2, 3), 50, 5.0, 0.3, 0)
    assert models[2].seed == 7 and models[2].steps == (4, 8)
    remote = parse_registry_document(["./x", "../y/z"], CalibrationSpec(), "s3://bucket/reg", "s3://bucket/reg/m.json")
    assert [m.model for m in remote] == ["s3://bucket/reg/x", "s3://bucket/y/z"]


@pytest.mark.parametrize(
    "document, fragment",
    [
        ([{"uri": "a", "guidance": 3}], "unknown settings ['guidance']"),
        ([{"uri": "a", "model": "b"}], "unknown settings ['model']"),
        ([{"uri": "a", "steps": [2.5]}], "model 1 (a): steps: expected a list of integers"),
        ([{"uri": "a", "teacher_steps": "50"}], "teacher_steps: must be an integer"),
        ([{"uri": "a", "teacher_steps": 10}], "steps: 20 must be between 1 and teacher_steps (10)"),
        ({"defaults": {"guidance_scale": float("nan")}, "models": ["a"]}, "defaults: guidance_scale: must be a finite number"),
        (["a", {"uri": "a"}], "listed more than once: ['a']"),
        ([{"prompts": "p.txt"}], "model 1: expected a URI string"),
        ({"models": ["a"], "other": 1}, "expected keys 'models'"),
        ([], "non-empty list"),
    ],
)
def test_malformed_registry_files_name_the_problem(document, fragment):
    with pytest.raises(ValueError, match="m.yaml") as error:
        parse_registry_document(document, CalibrationSpec(), "/r", "/r/m.yaml")
    assert fragment in str(error.value)


def test_empty_or_missing_registries_are_one_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model folders"):
        scan_registry(str(tmp_path / "empty"), CalibrationSpec())
    with pytest.raises(Exception, match="does not exist"):
        scan_registry(str(tmp_path / "missing"), CalibrationSpec())


def test_bucket_registry_digests_equal_local_digests(registry, s3_bucket, moto_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, key="olss-test", secret="olss-test-secret", skip_instance_cache=True)
    fs.put(str(registry / "model-a"), f"{s3_bucket}/models/model-a", recursive=True)
    [model] = scan_registry(f"s3://{s3_bucket}/models", FAST)
    assert model.model == f"s3://{s3_bucket}/models/model-a"
    target = identify(model)
    assert target.model_digest == content_digest(registry / "model-a")


# ------------------------------------------------------------------------------------------- identity


def test_identity_follows_what_changes_results(registry, settings):
    spec = replace(settings, model=str(registry / "model-a"))
    base = identify(spec)
    assert (base.model_digest, (base.config, base.config_digest)) == (content_digest(registry / "model-a"), spec_digest(spec))
    assert identify(replace(spec, seed=1)).config_digest != base.config_digest
    Path(settings.prompts).write_text("\n".join(PROMPTS[:3]) + "\n")
    assert identify(spec).config_digest != base.config_digest, "prompt file content"
    assert base.submission_id(2) == f"olss-refit-{base.model_digest[:12]}-{base.config_digest[:12]}-2"


def test_relative_prompt_files_are_made_absolute(registry, settings, monkeypatch):
    """A submitted job runs in another working directory: its spec names the prompt file absolutely."""
    monkeypatch.chdir(Path(settings.prompts).parent)
    target = identify(replace(settings, model=str(registry / "model-a"), prompts=Path(settings.prompts).name))
    assert target.spec.prompts == settings.prompts and target.config["prompts"] == settings.prompts


def test_submitted_arguments_parse_back_to_the_same_spec_and_identity(registry, settings, tmp_path):
    """The job's own command line, given the refit's arguments, builds the refit's spec and execution."""
    specification = importlib.util.spec_from_file_location("calibrate_job", REPO / "jobs" / "calibrate.py")
    calibrate_job = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(calibrate_job)
    [command] = calibrate_job.app.registered_commands
    assert command.callback is cli.calibrate, "jobs/calibrate.py is olss-dist calibrate"
    target = identify(replace(settings, model=str(registry / "model-a")))
    with pytest.raises(ValueError, match="secret would be written into the submitted Ray jobs"):
        job_arguments(target.spec, ExecutionConfig(output=str(tmp_path), storage_options={"secret": "never sent"}))
    references = {"secret": "env:OLSS_SECRET", "endpoint_url": "http://s3:9000"}  # resolved by the job itself
    execution = ExecutionConfig(output=str(tmp_path), num_workers=2, storage_options=references)
    arguments = job_arguments(target.spec, execution)
    spec, parsed_execution, quiet = parse_calibrate_arguments(arguments)
    assert (spec, parsed_execution, quiet) == (target.spec, execution, True)
    assert spec_digest(spec)[1] == target.config_digest


def test_refit_with_all_defaults_skips_a_model_a_default_job_calibrated(registry, tmp_path, monkeypatch):
    """``olss-dist refit`` with no calibration options looks for the run ``olss-dist calibrate --model M``
    (every option at its default) publishes: same model id, model digest and config digest."""
    for variable in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    store = tmp_path / "store"
    model = str(registry / "model-a")
    spec, execution, _ = parse_calibrate_arguments(["--model", model, "--output", str(store)])
    assert spec.prompts is None, "the default job uses the model's prompts"
    # What run_job publishes (distributed/job.py): the spec's identity; no prompt file, so no prompts digest.
    published = publish_run(
        execution.output, model_id=model, model_digest=content_digest(registry / "model-a"), config=spec.identity(None),
        files=run_files(), extra_manifest={"teacher_steps": spec.teacher_steps, "planned_step_counts": list(spec.steps)},
    )  # fmt: skip
    result = CliRunner().invoke(app, ["refit", str(registry), "--output", str(store), "--json", "--address", "http://127.0.0.1:9"])
    outcomes = {Path(o["model"]).name: o for o in json.loads(result.stdout)}
    assert (outcomes["model-a"]["status"], outcomes["model-a"]["run_uri"]) == ("skipped", published.uri), outcomes
    assert outcomes["model-a"]["config_digest"] == published.manifest["config_digest"]
    assert outcomes["model-b"]["status"] == "failed" and "could not submit" in outcomes["model-b"]["message"]


# ------------------------------------------------------------------------------------------- records


def fake_target(model: str = "model-x"):
    """The target of a model that is never loaded (its digest is made up): for record and decision tests."""
    return target_of(CalibrationSpec(model, steps=(2,), teacher_steps=20), "d" * 64)


@pytest.fixture(params=["file", "s3", "gs"])
def store_root(request, tmp_path) -> str:
    """A registry root on the local filesystem (file://), the moto S3 server or the GCS emulator."""
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    return request.getfixturevalue("s3_root" if request.param == "s3" else "gcs_root")


def test_racing_claims_start_one_attempt(store_root):
    """Six refits decide about the same (model, config) at once: one claims attempt 1, the others see it running."""
    release = threading.Event()
    calls = []

    def blocked_runner(spec, execution, *, quiet=False):
        calls.append(spec)
        release.wait(60)
        raise RuntimeError("the model fails to load")

    refitters = [Refitter(inline_options(store_root), run_inline=blocked_runner) for _ in range(6)]
    barrier = threading.Barrier(len(refitters))
    outcomes = [None] * len(refitters)

    def one_refit(i):
        barrier.wait()
        outcomes[i] = refitters[i].refit(fake_target())

    threads = [threading.Thread(target=one_refit, args=(i,)) for i in range(len(refitters))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while sum(o is not None for o in outcomes) < len(refitters) - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [o.status for o in outcomes if o is not None] == [Status.RUNNING] * (len(refitters) - 1)
    release.set()
    for thread in threads:
        thread.join(60)
    assert len(calls) == 1
    [failed] = [o for o in outcomes if o.status == Status.FAILED]
    assert failed.attempt == 1 and "the model fails to load" in failed.message
    document, _ = RefitRecord(refitters[0].store, fake_target()).read()
    assert [(a["attempt"], a["status"]) for a in document["attempts"]] == [(1, AttemptStatus.FAILED)]


def failing_runner(spec, execution, *, quiet=False):
    raise RuntimeError("boom")


def test_abandoned_inline_attempt_is_failed_after_its_lease_and_retried(store_root):
    """A refit that died mid-run leaves a claim whose heartbeat stops: after the lease, it counts as failed."""
    record = RefitRecord(Refitter(inline_options(store_root)).store, fake_target())
    document, token = record.read()
    assert record.replace(with_attempt(document, new_attempt(1, None), 3), token)
    outcome = Refitter(inline_options(store_root), run_inline=failing_runner).refit(fake_target())
    assert outcome.status == Status.RUNNING and "running inline on" in outcome.message, "within the lease"
    time.sleep(0.3)
    outcome = Refitter(inline_options(store_root, lease_s=0.2), run_inline=failing_runner).refit(fake_target())
    assert outcome.status == Status.FAILED and outcome.attempt == 2 and "boom" in outcome.message
    attempts = record.read()[0]["attempts"]
    assert [a["status"] for a in attempts] == [AttemptStatus.FAILED, AttemptStatus.FAILED]
    assert "abandoned: no heartbeat" in attempts[0]["message"]


def test_submissions_that_never_reach_a_cluster_do_not_use_up_attempts(registry, settings, tmp_path, monkeypatch):
    for variable in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # Ray lets these override the address passed
        monkeypatch.delenv(variable, raising=False)
    options = RefitOptions(ExecutionConfig(output=str(tmp_path / "store")), address="http://127.0.0.1:9", max_attempts=1)
    for expected_attempt in (1, 2):
        outcome = by_model(refit(str(registry), options, settings))["model-a"]
        assert outcome.status == Status.FAILED and outcome.attempt == expected_attempt
        assert "could not submit" in outcome.message and "unreachable" in outcome.message
        assert "127.0.0.1:9" in outcome.message
    target = identify(replace(settings, model=str(registry / "model-a")))
    attempts = RefitRecord(Refitter(options).store, target).read()[0]["attempts"]
    assert [a["status"] for a in attempts] == [AttemptStatus.UNSUBMITTED] * 2


# ------------------------------------------------------------------------------------------- CLI


def test_cli_dry_run_json_and_watch_cycles(registry, settings, tmp_path):
    arguments = ["refit", str(registry), "--output", str(tmp_path / "store"), "--prompts", settings.prompts,
                 "--steps", "2,4", "--teacher-steps", "20", "--validation-fraction", "0.25", "--dry-run", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    outcomes = json.loads(result.stdout)
    assert [(Path(o["model"]).name, o["status"]) for o in outcomes] == [("model-a", "would-run"), ("model-b", "would-run")]
    assert "would submit olss-refit-" in outcomes[0]["message"]
    assert not (tmp_path / "store").exists(), "a dry run writes nothing"
    watched = CliRunner().invoke(app, [*arguments, "--watch", "--interval", "0.05", "--cycles", "2"])
    assert watched.exit_code == 0 and len(watched.stdout.strip().splitlines()) == 2
    table = CliRunner().invoke(app, arguments[:-1])
    assert table.exit_code == 0 and table.stdout.count("would-run") == 2


def test_cli_exits_non_zero_when_a_model_fails_and_on_a_bad_registry(registry, tmp_path):
    (registry / "not-a-model").mkdir()
    (registry / "not-a-model" / "notes.txt").write_text("no diffusers folder here")
    result = CliRunner().invoke(app, ["refit", str(registry), "--output", str(tmp_path / "s"), "--dry-run", "--json"])
    assert result.exit_code == 1
    statuses = {Path(o["model"]).name: (o["status"], o["message"]) for o in json.loads(result.stdout)}
    assert statuses["model-a"][0] == "would-run" and statuses["not-a-model"][0] == "failed"
    assert "cannot identify the model" in statuses["not-a-model"][1]
    missing = CliRunner().invoke(app, ["refit", str(tmp_path / "nowhere"), "--output", str(tmp_path / "s")])
    assert missing.exit_code == 1 and "error:" in missing.output and "nowhere" in missing.output


# ------------------------------------------------------------------------------------------- whole refits


@pytest.mark.slow
def test_refit_calibrates_new_weights_once(local_ray, registry, settings, tmp_path):
    root = (tmp_path / "store").as_uri()
    runner = CountingRunner()

    first = by_model(refit(str(registry), inline_options(root), settings, run_inline=runner))
    assert {name: o.status for name, o in first.items()} == {"model-a": Status.SUCCEEDED, "model-b": Status.SUCCEEDED}
    assert sorted(runner.models) == ["model-a", "model-b"]
    for name, outcome in first.items():
        manifest = read_manifest(outcome.run_uri)
        assert manifest["model"]["digest"] == outcome.model_digest == content_digest(registry / name)
        assert manifest["config_digest"] == outcome.config_digest, "refit and job agree on the identity"
    assert first["model-a"].config_digest != first["model-b"].config_digest, "the model spec is part of the config"

    second = by_model(refit(str(registry), inline_options(root), settings, run_inline=runner))
    assert {name: (o.status, o.run_uri) for name, o in second.items()} == {
        name: (Status.SKIPPED, o.run_uri) for name, o in first.items()
    }
    assert len(runner.models) == 2, "no model calls when nothing changed"

    flip_last_byte(registry / "model-b" / UNET_WEIGHTS)
    third = by_model(refit(str(registry), inline_options(root), settings, run_inline=runner))
    assert third["model-a"].status == Status.SKIPPED
    assert third["model-b"].status == Status.SUCCEEDED and third["model-b"].model_digest != first["model-b"].model_digest
    assert runner.models[2:] == ["model-b"]
    assert len(complete_runs(tmp_path / "store")) == 3


@pytest.mark.slow
def test_a_model_that_fails_to_load_fails_alone_and_is_retried_up_to_the_limit(local_ray, registry, settings, s3_root):
    broken = registry / "model-b" / UNET_WEIGHTS
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    runner = CountingRunner()
    options = inline_options(s3_root, max_attempts=2)

    first = by_model(refit(str(registry), options, settings, run_inline=runner))
    assert first["model-a"].status == Status.SUCCEEDED and first["model-a"].run_uri.startswith(s3_root)
    assert first["model-b"].status == Status.FAILED and first["model-b"].attempt == 1
    assert "model-b" in first["model-b"].message and "load" in first["model-b"].message

    second = by_model(refit(str(registry), options, settings, run_inline=runner))
    assert second["model-a"].status == Status.SKIPPED
    assert second["model-b"].status == Status.FAILED and second["model-b"].attempt == 2

    third = by_model(refit(str(registry), options, settings, run_inline=runner))
    assert third["model-b"].status == Status.FAILED and "gave up after 2 failed attempts" in third["model-b"].message
    assert runner.models == ["model-a", "model-b", "model-b"], "no third attempt"
    raised = by_model(refit(str(registry), inline_options(s3_root, max_attempts=3), settings, dry_run=True))
    assert raised["model-b"].status == Status.WOULD_RUN and "attempt 3" in raised["model-b"].message


@pytest.mark.slow
def test_two_refits_racing_make_one_run_per_model(local_ray, registry, settings, s3_root):
    runner = CountingRunner()
    barrier = threading.Barrier(2)
    results = [None, None]

    def one_refit(i):
        barrier.wait()
        results[i] = by_model(refit(str(registry), inline_options(s3_root), settings, run_inline=runner))

    threads = [threading.Thread(target=one_refit, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert sorted(runner.models) == ["model-a", "model-b"], "each model calibrated once"
    for name in ("model-a", "model-b"):
        statuses = sorted(results[i][name].status for i in range(2))
        assert statuses in ([Status.RUNNING, Status.SUCCEEDED], [Status.SKIPPED, Status.SUCCEEDED]), (name, statuses)
    store = open_store(s3_root)
    manifests = [path for path in store.fs.find(store.path()) if path.endswith("/manifest.json")]
    assert len(manifests) == 2
