"""Every storage failure gives one clear ArtifactError, fast, with nothing half published; bad input a ValueError."""

from __future__ import annotations

import socket
import time

import pytest

from artifact_data import CONFIG, run_files
from conftest import free_port
from olss_dist.artifacts import ArtifactError, fetch_run, list_models, publish_run

MODEL = {"model_id": "org/tiny-sd", "model_digest": "weights0001"}
# Default bounds: S3_ATTEMPTS (2) attempts of at most connect 5 s / read 8 s each, plus backoff.
DEFAULT_BOUND_S = 20


def publish(root: str, **kwargs):
    return publish_run(root, **MODEL, config=CONFIG, files=run_files(0), **kwargs)


@pytest.fixture
def silent_endpoint():
    """``http://127.0.0.1:PORT`` of a socket that accepts connections into its backlog and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def assert_fails_fast(action, match: str, bound_s: float = DEFAULT_BOUND_S) -> float:
    start = time.monotonic()
    with pytest.raises(ArtifactError, match=match):
        action()
    elapsed = time.monotonic() - start
    assert elapsed < bound_s, f"took {elapsed:.1f} s"
    return elapsed


def test_closed_port_is_one_clear_error(s3_bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    root = f"s3://{s3_bucket}/registry"
    assert_fails_fast(lambda: publish(root), "cannot publish to .*cannot reach the storage endpoint .*; check AWS_ENDPOINT_URL")
    assert_fails_fast(lambda: fetch_run(f"{root}/org--tiny-sd", cache_dir=tmp_path), "cannot read .*cannot reach")
    assert_fails_fast(lambda: list_models(root), "cannot list runs .*cannot reach")


def test_silent_endpoint_times_out_within_bounds(s3_bucket, monkeypatch, silent_endpoint):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    quick = {"config_kwargs": {"connect_timeout": 1, "read_timeout": 1}}
    elapsed = assert_fails_fast(
        lambda: publish(f"s3://{s3_bucket}/registry", storage_options=quick), "cannot reach the storage endpoint", 6
    )
    assert elapsed >= 1.0  # it did wait for the timeout: the error is the timeout, not a refusal


@pytest.mark.slow
def test_silent_endpoint_with_default_timeouts_does_not_hang(s3_bucket, monkeypatch, silent_endpoint, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    assert_fails_fast(lambda: fetch_run(f"s3://{s3_bucket}/registry/m", cache_dir=tmp_path), "cannot reach")


def test_missing_bucket_is_named(s3_bucket, tmp_path):
    root = "s3://olss-no-such-bucket/registry"
    assert_fails_fast(lambda: publish(root), "cannot publish to .*bucket 'olss-no-such-bucket' does not exist")
    assert_fails_fast(lambda: fetch_run(f"{root}/org--tiny-sd", cache_dir=tmp_path), "bucket .* does not exist")
    assert_fails_fast(lambda: list_models(root), "bucket .* does not exist")


def test_missing_credentials_are_named(s3_bucket, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    root = f"s3://{s3_bucket}/registry"
    assert_fails_fast(lambda: publish(root), "no storage credentials found")
    assert_fails_fast(lambda: fetch_run(root, cache_dir=tmp_path), "no storage credentials found")


def test_explicit_storage_options_override_the_environment(s3_bucket, moto_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    options = {"endpoint_url": moto_endpoint, "key": "olss-test", "secret": "olss-test-secret"}
    published = publish(f"s3://{s3_bucket}/registry", storage_options=options)
    assert fetch_run(published.uri, storage_options=options, cache_dir=tmp_path).is_dir()


def test_no_run_at_an_empty_location(tmp_path):
    with pytest.raises(ArtifactError, match="no run at .*neither manifest.json"):
        fetch_run(str(tmp_path), cache_dir=tmp_path / "cache")
    with pytest.raises(ArtifactError, match="does not exist"):
        fetch_run(str(tmp_path / "absent"), cache_dir=tmp_path / "cache")


def test_publishing_needs_atomic_writes(tmp_path):
    with pytest.raises(ArtifactError, match="no create-only or conditional writes"):
        publish(f"http://127.0.0.1:{free_port()}/registry")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda f, c, e: f.update({"model.pkl": b"x"}), "only JSON and safetensors"),
        (lambda f, c, e: f.update({"../escape.json": b"{}"}), "relative path"),
        (lambda f, c, e: f.update({"manifest.json": b"{}"}), "written by publish_run"),
        (lambda f, c, e: f.update({"plans.json": b"{not json"}), "plans.json' is not valid JSON"),
        (lambda f, c, e: f.update({"calibration.safetensors": b"\xff" * 16}), "is not safetensors"),
        (lambda f, c, e: c.pop("teacher_steps"), "teacher_steps .* is required"),
        (lambda f, c, e: c.update(planned_step_counts=[0]), "planned_step_counts .* is required"),
        (lambda f, c, e: c.update(bad=float("nan")), "not JSON-serialisable"),
        (lambda f, c, e: e.update(files={}), "may not set"),
    ],
)
def test_bad_input_is_a_value_error_and_writes_nothing(tmp_path, change, match):
    files, config, extra = run_files(0), dict(CONFIG), {}
    change(files, config, extra)
    with pytest.raises(ValueError, match=match):
        publish_run(str(tmp_path / "reg"), **MODEL, config=config, files=files, extra_manifest=extra)
    assert not (tmp_path / "reg").exists()


@pytest.mark.parametrize("model", [{"model_id": "", "model_digest": "d"}, {"model_id": "m", "model_digest": "sha256:ab"}])
def test_bad_model_identity_is_a_value_error(tmp_path, model):
    with pytest.raises(ValueError, match="model_id|model_digest"):
        publish_run(str(tmp_path), **model, config=CONFIG, files=run_files(0))
