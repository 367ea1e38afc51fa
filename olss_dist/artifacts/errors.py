"""One error type for everything that can go wrong between a run and its storage, with messages that say why."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class ArtifactError(RuntimeError):
    """A run cannot be published or read: storage unreachable, bucket missing, credentials absent or rejected,
    a run tampered with, incomplete, or not there."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (create-only) or changed since it was read (compare-and-swap)."""


# Matched by class name so that reading a local run never imports botocore, aiohttp or google-auth.
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "DefaultCredentialsError"}
_CONNECTION_ERRORS = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "HTTPClientError",
    "ClientConnectorError",
    "ServerTimeoutError",
    "FSTimeoutError",
    "ConnectionError",
    "TimeoutError",
}


def _class_names(error: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(error).__mro__}


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


ENDPOINT_SETTINGS = {
    "s3": "AWS_ENDPOINT_URL or storage_options['endpoint_url']",
    "gs": "STORAGE_EMULATOR_HOST or storage_options['endpoint_url']",
    "gcs": "STORAGE_EMULATOR_HOST or storage_options['endpoint_url']",
}
"""Where each scheme's endpoint is set (s3fs, gcsfs), for the one line of an unreachable endpoint."""


_STORE_PACKAGES = ("/s3fs/", "/gcsfs/", "/aiobotocore/", "/botocore/", "/fsspec/")


def _raised_in_store(error: BaseException) -> bool:
    """Whether ``error`` was raised inside a store's client library (not in our code calling it)."""
    traceback, last = error.__traceback__, ""
    while traceback is not None:
        last = traceback.tb_frame.f_code.co_filename.replace("\\", "/")
        traceback = traceback.tb_next
    return any(package in last for package in _STORE_PACKAGES)


def describe_storage_error(error: BaseException, uri: str = "") -> str | None:
    """A one-line reason for a storage failure, or None when ``error`` is not a storage failure (a bug); ``uri``
    names the store, so an unreachable endpoint's line names that store's own endpoint settings."""
    for cause in _causes(error):
        names = _class_names(cause)
        if names & _CREDENTIAL_ERRORS:
            return (
                f"no storage credentials found ({cause}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
                "AWS_PROFILE, or pass storage_options={'key': ..., 'secret': ...}"
            )
        if names & _CONNECTION_ERRORS:
            return (
                f"cannot reach the storage endpoint ({cause}); check "
                f"{ENDPOINT_SETTINGS.get(uri.partition('://')[0].lower(), ENDPOINT_SETTINGS['s3'])} and the network"
            )
        if isinstance(cause, TypeError) and "keyword argument" in str(cause) and _raised_in_store(cause):
            return f"the store does not take a storage option given ({cause}); check storage_options"
    if isinstance(error, PermissionError):
        return f"access denied: credentials rejected or not allowed ({error})"
    if isinstance(error, FileNotFoundError):
        return f"the bucket does not exist ({error})" if "bucket" in str(error).lower() else f"not found ({error})"
    if isinstance(error, OSError):
        return f"storage error: {error}"
    return None


@contextmanager
def storage_errors(action: str, uri: str) -> Iterator[None]:
    """Turn a storage failure inside the block into one ``ArtifactError`` naming ``action`` and ``uri``."""
    try:
        yield
    except (ArtifactError, PreconditionFailed):
        raise
    except Exception as error:
        reason = describe_storage_error(error, uri)
        if reason is None:
            raise
        raise ArtifactError(f"{action} {uri}: {reason}") from error
