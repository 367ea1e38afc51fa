"""gs:// failures are bounded as S3's are: a closed port or a silent endpoint is one ArtifactError in seconds, not
gcsfs's own 6 attempts with up to 32 s of backoff each (and, silent, aiohttp's 5-minute default read timeout)."""

from __future__ import annotations

import pytest
from test_artifacts_errors import assert_fails_fast, silent_endpoint  # noqa: F401 (silent_endpoint: a fixture)

from conftest import free_port
from olss_dist.artifacts import list_models
from olss_dist.artifacts.stores import GCS_ATTEMPTS, open_store

gcsfs = pytest.importorskip("gcsfs", reason="gcsfs is not installed (pip install -e '.[test]')")


def test_gs_uses_the_json_api_filesystem_with_bounded_attempts(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    fs = open_store("gs://olss-bucket/registry").fs
    assert isinstance(fs, gcsfs.core.GCSFileSystem) and GCS_ATTEMPTS == 2
    assert "Extended" not in type(fs).__name__, "no per-bucket Storage Control gRPC lookup"
    assert fs.credentials.method == "anon", "an emulator authenticates nobody"


def test_closed_port_fails_fast(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
    # one line, naming gcsfs's endpoint settings (not s3fs's AWS_ENDPOINT_URL)
    assert_fails_fast(lambda: list_models("gs://olss-bucket/registry"),
                      "cannot reach the storage endpoint .*; check STORAGE_EMULATOR_HOST or storage_options", 12)


def test_silent_endpoint_gets_two_attempts_of_the_read_timeout(monkeypatch, silent_endpoint):  # noqa: F811
    import aiohttp

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", silent_endpoint)
    quick = {"requests_timeout": aiohttp.ClientTimeout(total=None, sock_connect=1, sock_read=1)}
    # Two 1-s reads and one backoff of 1-2 s; gcsfs's six attempts would take over 36 s.
    assert_fails_fast(lambda: list_models("gs://olss-bucket/registry", quick), "cannot reach the storage endpoint", 8)
