"""Storage options for submitted jobs: ``env:NAME`` / ``file:PATH`` references resolved where a store is opened,
literal secrets refused before a refit submits anything (olss_dist.artifacts.options)."""

from __future__ import annotations

import json
import shlex

import pytest
from test_refit import fake_target
from test_refit_submit import jobs_api  # noqa: F401 (the stand-in Jobs API fixture)
from typer.testing import CliRunner

from artifact_data import CONFIG, run_files
from olss_dist.apps.refit import RefitOptions, Refitter, Status
from olss_dist.artifacts import publish_run, read_manifest
from olss_dist.artifacts.options import StorageOptionError, literal_secrets, resolve_storage_options
from olss_dist.artifacts.stores import open_store
from olss_dist.cli import app, parse_calibrate_arguments
from olss_dist.spec import ExecutionConfig, SpecError

SECRET = "olss-test-secret"  # the moto server's dummy secret (tests/conftest.py)


def test_references_resolve_at_any_depth_and_other_values_stay(tmp_path, monkeypatch):
    monkeypatch.setenv("OLSS_TEST_KEY_ID", "from-the-environment")
    (tmp_path / "secret").write_text("from-a-file\n")
    options = {
        "key": "env:OLSS_TEST_KEY_ID",
        "client_kwargs": {"aws_secret_access_key": f"file:{tmp_path / 'secret'}", "region_name": "eu-west-1"},
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": False,
    }
    before = json.dumps(options)
    assert resolve_storage_options(options) == {
        "key": "from-the-environment",
        "client_kwargs": {"aws_secret_access_key": "from-a-file", "region_name": "eu-west-1"},
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": False,
    }
    assert json.dumps(options) == before, "the caller's options are not changed"
    assert resolve_storage_options(None) == {}


def test_unresolvable_references_are_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OLSS_TEST_UNSET", raising=False)
    with pytest.raises(StorageOptionError, match=r"storage option\.secret names environment variable OLSS_TEST_UNSET, "
                                                 r"which is not set on this machine$"):  # fmt: skip
        open_store("memory://olss-options", {"secret": "env:OLSS_TEST_UNSET"})
    with pytest.raises(StorageOptionError, match=r"names file .*missing, which cannot be read on this machine"):
        open_store("memory://olss-options", {"token": f"file:{tmp_path / 'missing'}"})


@pytest.mark.parametrize(
    "options",
    [
        {"secret": "abc123"},
        {"key": "AKIAEXAMPLE", "secret": "env:AWS_SECRET_ACCESS_KEY"},
        {"client_kwargs": {"aws_secret_access_key": "abc123"}},
        {"token": "/etc/gcs/credentials.json"},
        {"password": "hunter2"},
    ],
)
def test_literal_secrets_are_refused_for_submitted_jobs(options):
    with pytest.raises(SpecError) as refused:
        RefitOptions(ExecutionConfig(storage_options=options))
    message = str(refused.value)
    assert refused.value.argument == "storage_options" and "\n" not in message
    assert '"env:VARIABLE"' in message and '"file:/path/on/the/nodes"' in message
    assert all(name in message for name in literal_secrets(options))
    assert not any(value in message for value in ("abc123", "AKIAEXAMPLE", "hunter2", "credentials.json"))
    RefitOptions(ExecutionConfig(storage_options=options), inline=True)  # inline jobs never leave this process


def test_references_and_harmless_values_are_submittable():
    options = {"key": "env:K", "secret": "file:/var/run/secrets/s3/secret", "endpoint_url": "http://s3:9000",
               "anon": False, "token": "anon", "client_kwargs": {"region_name": "us-east-1"}}  # fmt: skip
    assert literal_secrets(options) == []
    RefitOptions(ExecutionConfig(storage_options=options))


def test_refit_cli_refuses_a_literal_secret_in_one_line(tmp_path):
    (tmp_path / "models").mkdir()
    arguments = ["refit", str(tmp_path / "models"), "--output", str(tmp_path / "store"),
                 "--storage-options", json.dumps({"endpoint_url": "http://s3:9000", "secret": "abc123"})]  # fmt: skip
    result = CliRunner().invoke(app, arguments, env={"COLUMNS": "400"})
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: --storage-options: secret would be written into the submitted Ray jobs")
    assert '"secret": "env:VARIABLE"' in line and "abc123" not in line
    assert not (tmp_path / "store").exists(), "nothing written"


def test_submitted_job_carries_references_only_and_resolves_them(
    jobs_api, s3_bucket, moto_endpoint, monkeypatch  # noqa: F811 (jobs_api: the imported fixture)
):
    api, address = jobs_api
    # The submitting machine and the "cluster" (this process again, below) have the credentials only under
    # names of their own; the standard AWS variables are gone, so nothing works unless the references resolve.
    monkeypatch.setenv("OLSS_TEST_S3_KEY_ID", "olss-test")
    monkeypatch.setenv("OLSS_TEST_S3_SECRET", SECRET)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    options = {"key": "env:OLSS_TEST_S3_KEY_ID", "secret": "env:OLSS_TEST_S3_SECRET", "endpoint_url": moto_endpoint}
    root = f"s3://{s3_bucket}/registry"
    refit_options = RefitOptions(ExecutionConfig(output=root, storage_options=options), address=address, max_attempts=1)

    outcome = Refitter(refit_options).refit(fake_target())  # its record is written through the references too
    assert outcome.status == Status.SUBMITTED, outcome.message
    [request] = api.requests
    assert SECRET not in json.dumps(request), "no secret in the entrypoint, metadata or runtime_env"
    entrypoint = shlex.split(request["entrypoint"])
    assert entrypoint[:2] == ["python", "jobs/calibrate.py"]

    # The job's side: jobs/calibrate.py parses the same arguments and opens its stores with the references.
    _, execution, quiet = parse_calibrate_arguments(entrypoint[2:])
    assert execution.storage_options == options and execution.output == root and quiet
    published = publish_run(execution.output, model_id="org/tiny-sd", model_digest="w1", config=CONFIG,
                            files=run_files(0), storage_options=execution.storage_options)  # fmt: skip
    assert read_manifest(published.uri, execution.storage_options)["model"]["digest"] == "w1"

    monkeypatch.delenv("OLSS_TEST_S3_SECRET")  # a node without the variable: one line naming it
    with pytest.raises(StorageOptionError, match="OLSS_TEST_S3_SECRET, which is not set on this machine"):
        read_manifest(published.uri, execution.storage_options)
