"""fsspec storage under one root URI, with the two atomic writes a registry of runs needs.

* ``write_new``: create-only. The object appears whole or not at all, and an existing one is never replaced
  (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, local ``link(2)`` of a finished temporary file).
* ``replace_if``: compare-and-swap against the token ``read_versioned`` returned (S3 ETag with ``If-Match``,
  GCS generation with ``ifGenerationMatch``, local content digest checked under an ``flock``).

Keys are ``/``-separated paths relative to the root. Store methods raise the storage library's errors
(``FileNotFoundError``, ``PermissionError``, botocore errors...) and ``PreconditionFailed``; callers wrap them
with ``storage_errors`` to get one ``ArtifactError``.

Why this module is long: the stores' two atomic writes (local, S3, GCS, memory) sit side by side, so
their semantics can be read against each other in one place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from olss_dist.artifacts.errors import ArtifactError, PreconditionFailed
from olss_dist.artifacts.options import resolve_storage_options

# Per-request bounds: a dead endpoint fails in about S3_ATTEMPTS * (connect or read timeout) seconds.
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 8
S3_ATTEMPTS = 2
GCS_ATTEMPTS = 2  # gcsfs retries with backoff 1-2 s between its attempts
READ_BLOCK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Entry:
    """One child of a listed directory: ``name`` is the last path component."""

    name: str
    is_dir: bool


def join_key(*parts: str) -> str:
    """``/``-join non-empty key parts."""
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


def parent_uri(uri: str) -> str:
    """The URI of the directory holding ``uri`` (``"."`` for a bare relative name)."""
    head, sep, _ = uri.rstrip("/").rpartition("/")
    if not sep:
        return "."
    return head + "/" if head == "" or head.endswith(":/") or head.endswith("://") else head


def _without_trailing_slash(uri: str) -> str:
    stripped = uri.rstrip("/")
    return uri if not stripped or stripped.endswith(":") else stripped


class Store:
    """Reads and writes under ``root_uri`` through one fsspec filesystem.

    Args:
        fs: the filesystem.
        root_path: ``root_uri`` as ``fs`` spells it (no protocol).
        root_uri: the root as the user wrote it; URIs handed back are built on it.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root_path: str, root_uri: str):
        self.fs = fs
        self.root_path = _without_trailing_slash(root_path)
        self.root_uri = _without_trailing_slash(root_uri)

    def path(self, key: str = "") -> str:
        """``key`` as the filesystem spells it."""
        return self._below(self.root_path, key)

    def uri(self, key: str = "") -> str:
        """``key`` as a URI built on the root the user gave."""
        return self._below(self.root_uri, key)

    @staticmethod
    def _below(root: str, key: str) -> str:
        key = join_key(key)
        if not key:
            return root
        return root + key if root.endswith("/") else f"{root}/{key}"

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def read_optional(self, key: str) -> bytes | None:
        try:
            return self.read(key)
        except FileNotFoundError:
            return None

    def open(self, key: str) -> BinaryIO:
        return self.fs.open(self.path(key), "rb", block_size=READ_BLOCK_BYTES)

    def list_entries(self, key: str = "") -> list[Entry]:
        """Children of ``key``, sorted by name; empty when ``key`` does not exist."""
        try:
            listing = self.fs.ls(self.path(key), detail=True)
        except FileNotFoundError:
            return []
        base = self.path(key).rstrip("/")
        entries = []
        for info in listing:
            name = info["name"].rstrip("/")
            if name == base:
                continue
            entries.append(Entry(name.rsplit("/", 1)[-1], info["type"] == "directory"))
        return sorted(entries, key=lambda entry: entry.name)

    def file_sizes(self, key: str) -> dict[str, int]:
        """Every file below ``key`` as ``{relative key: size in bytes}``."""
        base = self.path(key).rstrip("/") + "/"
        try:
            found = self.fs.find(self.path(key), detail=True)
        except FileNotFoundError:
            return {}
        return {name[len(base):]: int(info["size"]) for name, info in found.items() if name.startswith(base)}

    def remove_tree(self, key: str) -> None:
        self.fs.rm(self.path(key), recursive=True)

    def check_root(self, create: bool) -> None:
        """FileNotFoundError when the root's container is missing (a bucket; a local directory unless ``create``).

        Called before publishing, so that nothing is written, and to tell a missing bucket from a missing run.
        A store without atomic writes refuses ``create``.
        """
        if create:
            raise self._no_atomic_writes()

    def write_new(self, key: str, data: bytes) -> None:
        raise self._no_atomic_writes()

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """``(content, token)`` for ``replace_if``; ``(None, None)`` when the object does not exist."""
        raise self._no_atomic_writes()

    def replace_if(self, key: str, data: bytes, token: str | None) -> None:
        """Write ``data`` only if the object still has ``token`` (``None``: only if it does not exist yet)."""
        raise self._no_atomic_writes()

    def _no_atomic_writes(self) -> ArtifactError:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return ArtifactError(
            f"cannot publish to {self.root_uri}: protocol {protocol!r} has no create-only or conditional writes "
            "in olss_dist; use s3://, gs://, file:// or a local path"
        )


class ContentTokens:
    """``read_versioned`` whose token is the content's sha256, for stores whose ``replace_if`` compares
    contents under a lock (local files, memory)."""

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        data = self.read_optional(key)
        return data, None if data is None else hashlib.sha256(data).hexdigest()


class LocalStore(ContentTokens, Store):
    """A local or mounted directory; atomic across processes of one machine (``link(2)``, ``flock``)."""

    def check_root(self, create: bool) -> None:
        if create:
            os.makedirs(self.root_path, exist_ok=True)
        elif not os.path.isdir(self.root_path):
            raise FileNotFoundError(f"directory {self.root_path} does not exist")

    def write_new(self, key: str, data: bytes) -> None:
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = self._write_temporary(path, data)
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise PreconditionFailed(f"{self.uri(key)} already exists") from None
        finally:
            os.unlink(temporary)

    def replace_if(self, key: str, data: bytes, token: str | None) -> None:
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.read_versioned(key)[1] != token:
                raise PreconditionFailed(f"{self.uri(key)} changed since it was read")
            os.replace(self._write_temporary(path, data), path)

    @staticmethod
    def _write_temporary(path: str, data: bytes) -> str:
        temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return temporary


def _s3_error_code(error: BaseException) -> tuple[str, int]:
    """``(error code, HTTP status)`` of the botocore ClientError behind an s3fs error, or ``("", 0)``."""
    current: BaseException | None = error
    while current is not None:
        response = getattr(current, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return str(response["Error"].get("Code", "")), int(status or 0)
        current = current.__cause__
    return "", 0


def _is_s3_precondition_failure(error: BaseException) -> bool:
    code, status = _s3_error_code(error)
    return code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in {409, 412}


async def _s3_get_with_etag(fs: Any, bucket: str, key: str) -> tuple[bytes, str]:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        return await body.read(), response["ETag"]
    finally:
        body.close()


class BucketStore(Store):
    """A store whose root lies in a bucket (S3, GCS)."""

    def _bucket_key(self, key: str) -> tuple[str, str]:
        bucket, object_key, _ = self.fs.split_path(self.path(key))
        return bucket, object_key


class S3Store(BucketStore):
    """S3 and S3-compatible stores through s3fs; conditional PUTs (``If-None-Match``/``If-Match``)."""

    def check_root(self, create: bool) -> None:
        bucket, _ = self._bucket_key("")
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise FileNotFoundError(f"bucket {bucket!r} does not exist") from None

    def write_new(self, key: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self.path(key), data, mode="create")
        except FileExistsError:
            raise PreconditionFailed(f"{self.uri(key)} already exists") from None
        except OSError as error:
            if _is_s3_precondition_failure(error):
                raise PreconditionFailed(f"{self.uri(key)} already exists") from None
            raise

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        bucket, object_key = self._bucket_key(key)
        try:
            return fsspec.asyn.sync(self.fs.loop, _s3_get_with_etag, self.fs, bucket, object_key)
        except FileNotFoundError:
            return None, None

    def replace_if(self, key: str, data: bytes, token: str | None) -> None:
        bucket, object_key = self._bucket_key(key)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            self.fs.call_s3(
                "put_object", Bucket=bucket, Key=object_key, Body=data, ContentType="application/json", **condition
            )
        except (FileExistsError, FileNotFoundError):
            # FileNotFoundError: If-Match on an object deleted since it was read.
            raise PreconditionFailed(f"{self.uri(key)} changed since it was read") from None
        except OSError as error:
            if _is_s3_precondition_failure(error):
                raise PreconditionFailed(f"{self.uri(key)} changed since it was read") from None
            raise
        finally:
            self.fs.invalidate_cache(self.path(key))


class GCSStore(BucketStore):
    """Google Cloud Storage through gcsfs's JSON-API filesystem; generation preconditions (``ifGenerationMatch``).

    Tested against fake-gcs-server on 127.0.0.1 (tests/conftest.py, ``.ci/run``).
    """

    def check_root(self, create: bool) -> None:
        bucket, _ = self._bucket_key("")
        try:
            self.fs.call("GET", "b/{}", bucket, json_out=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"bucket {bucket!r} does not exist") from None

    def write_new(self, key: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self.path(key), data, mode="create")  # a multipart upload with ifGenerationMatch=0
        except FileExistsError:  # gcsfs maps HTTP 412 to FileExistsError
            raise PreconditionFailed(f"{self.uri(key)} already exists") from None
        finally:
            self.fs.invalidate_cache(self.fs._parent(self.path(key)))

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        bucket, object_key = self._bucket_key(key)
        try:
            headers, data = self.fs.call("GET", "b/{}/o/{}", bucket, object_key, alt="media")
        except FileNotFoundError:
            return None, None
        return data, str(headers["x-goog-generation"])

    def replace_if(self, key: str, data: bytes, token: str | None) -> None:
        """A multipart upload (metadata, then content) carrying ``ifGenerationMatch``: the form in which GCS and
        its emulators both honour the precondition (fake-gcs-server ignores it on ``uploadType=media``)."""
        from gcsfs.core import quote

        bucket, object_key = self._bucket_key(key)
        boundary = f"olss-{secrets.token_hex(12)}"
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
                json.dumps({"name": object_key, "contentType": "application/json"}).encode(),
                f"\r\n--{boundary}\r\nContent-Type: application/json\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--".encode(),
            ]
        )
        try:
            self.fs.call(
                "POST",
                f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                uploadType="multipart",
                ifGenerationMatch="0" if token is None else token,
                data=body,
                headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
            )
        except (FileExistsError, FileNotFoundError):  # 412; 404 where the object vanished since it was read
            raise PreconditionFailed(f"{self.uri(key)} changed since it was read") from None
        finally:
            self.fs.invalidate_cache(self.fs._parent(self.path(key)))


_MEMORY_LOCK = threading.Lock()


class MemoryStore(ContentTokens, Store):
    """fsspec's in-process ``memory://`` filesystem; a process-wide lock makes its writes atomic."""

    def check_root(self, create: bool) -> None:
        """Nothing to check: memory directories are implicit."""

    def write_new(self, key: str, data: bytes) -> None:
        with _MEMORY_LOCK:
            if self.fs.exists(self.path(key)):
                raise PreconditionFailed(f"{self.uri(key)} already exists")
            self.fs.pipe_file(self.path(key), data)

    def replace_if(self, key: str, data: bytes, token: str | None) -> None:
        with _MEMORY_LOCK:
            if self.read_versioned(key)[1] != token:
                raise PreconditionFailed(f"{self.uri(key)} changed since it was read")
            self.fs.pipe_file(self.path(key), data)


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _default_options(protocol: str) -> dict[str, Any]:
    if protocol in {"s3", "s3a"}:
        return {
            "use_listings_cache": False,
            "config_kwargs": {
                "connect_timeout": S3_CONNECT_TIMEOUT_S,
                "read_timeout": S3_READ_TIMEOUT_S,
                "retries": {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"},
            },
        }
    if protocol in {"gs", "gcs"}:
        import aiohttp  # gcsfs's HTTP client

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=S3_CONNECT_TIMEOUT_S, sock_read=S3_READ_TIMEOUT_S)
        options: dict[str, Any] = {"use_listings_cache": False, "requests_timeout": timeout}
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            options["token"] = "anon"  # an emulator authenticates nobody (google-cloud-storage does the same)
        return options
    return {}


def _merge_options(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``; nested dicts (``config_kwargs``) merge one level deep."""
    merged = dict(defaults)
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = {**merged[name], **value}
        else:
            merged[name] = value
    return merged


_BOUNDED_GCS: type | None = None
_FILESYSTEMS: dict[str, fsspec.AbstractFileSystem] = {}
_FILESYSTEMS_LOCK = threading.Lock()
# fsspec caches filesystems by their arguments only; credentials and endpoints from these variables are
# read when a filesystem is made, so they are part of our cache key.
_ENVIRONMENT_PREFIXES = ("AWS_", "GOOGLE_", "GCE_", "FSSPEC_", "STORAGE_EMULATOR_HOST")


def _gcs_filesystem_class() -> type:
    """gcsfs's JSON-API filesystem, not the class ``gs://`` resolves to by default (gcsfs >= 2025.x: its
    experimental ``ExtendedGcsFileSystem``). That one first asks the Storage Control gRPC API for each bucket's
    layout, which an endpoint override (an emulator, a private endpoint) does not serve: 60 s of retries per
    bucket there. Every request this store makes is a JSON-API one; zonal (Rapid) buckets are not supported.
    Requests get ``GCS_ATTEMPTS`` attempts (gcsfs makes 6, with backoff up to 32 s: ~35 s on a closed port,
    30 minutes on a silent one with aiohttp's 5-minute default timeout) and the S3 connect / read timeouts.

    gcsfs logs a traceback (``logger.exception``) when it gives up retrying; without a handler, Python's
    last-resort handler would print it under our one error line, so its logger gets a ``NullHandler`` (records
    still reach the handlers an application configures)."""
    global _BOUNDED_GCS
    from gcsfs.core import GCSFileSystem
    from gcsfs.retry import retry_request

    logger = logging.getLogger("gcsfs")
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())
    request = getattr(GCSFileSystem._request, "__wrapped__", None)  # the request without gcsfs's 6 attempts
    if request is None:
        return GCSFileSystem
    if _BOUNDED_GCS is None:
        _BOUNDED_GCS = type("BoundedGCSFileSystem", (GCSFileSystem,), {
            "__doc__": f"gcsfs's GCSFileSystem making {GCS_ATTEMPTS} attempts per request instead of 6.",
            "_request": retry_request(retries=GCS_ATTEMPTS)(request),
        })  # fmt: skip
    return _BOUNDED_GCS


def _filesystem(protocol: str, options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    """One filesystem per protocol, options and storage environment, shared by threads."""
    environment = sorted((name, value) for name, value in os.environ.items() if name.startswith(_ENVIRONMENT_PREFIXES))
    key = fsspec.utils.tokenize(protocol, options, environment)
    with _FILESYSTEMS_LOCK:
        if key not in _FILESYSTEMS:
            if protocol in {"gs", "gcs"}:
                _FILESYSTEMS[key] = _gcs_filesystem_class()(skip_instance_cache=True, **options)
            else:
                _FILESYSTEMS[key] = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        return _FILESYSTEMS[key]


def open_store(uri: str, storage_options: dict[str, Any] | None = None) -> Store:
    """The store rooted at ``uri`` (a local path or a single-protocol fsspec URI, e.g. ``s3://bucket/prefix``).

    Credentials and endpoints come from the standard environment (``AWS_ENDPOINT_URL``, the AWS credential
    chain, ``GOOGLE_APPLICATION_CREDENTIALS``, ``STORAGE_EMULATOR_HOST``...) and from ``storage_options``, which
    win; their ``env:NAME`` and ``file:PATH`` values are resolved here, in this process
    (``olss_dist.artifacts.options``). S3 requests get
    bounded timeouts and ``S3_ATTEMPTS`` attempts so a dead endpoint fails in seconds, not minutes.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"storage URI must be a non-empty string, got {uri!r}")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise ValueError(f"storage_options must be a dict, got {type(storage_options).__name__}")
    if "::" in uri:
        raise ValueError(f"chained fsspec URIs are not supported for runs: {uri}")
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    try:
        filesystem_class = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:
        raise ArtifactError(f"cannot open {uri}: no usable fsspec backend for {protocol!r} ({error})") from error
    options = _merge_options(_default_options(protocol), filesystem_class._get_kwargs_from_urls(uri))
    options = _merge_options(options, resolve_storage_options(storage_options))
    try:
        fs = _filesystem(protocol, options)
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"cannot open {uri}: bad storage options {sorted(options)} ({error})") from error
    root_path = filesystem_class._strip_protocol(uri)
    protocols = _protocols(fs)
    if isinstance(fs, LocalFileSystem):
        return LocalStore(fs, root_path, uri)
    if protocols & {"s3", "s3a"}:
        fs.retries = 1  # botocore's standard retry mode retries (S3_ATTEMPTS); s3fs retrying too would multiply
        return S3Store(fs, root_path, uri)
    if protocols & {"gs", "gcs"}:
        return GCSStore(fs, root_path, uri)
    if "memory" in protocols:
        return MemoryStore(fs, root_path, uri)
    return Store(fs, root_path, uri)
