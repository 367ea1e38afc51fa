"""Storage options that name where a secret is instead of holding it: ``env:NAME`` and ``file:PATH`` values.

A submitted Ray job's entrypoint and metadata are readable by anyone who can list the cluster's jobs, so
``refit`` passes its ``--storage-options`` to the jobs it submits only as references, resolved where the
store is opened (the job's driver, each worker):

* ``"env:NAME"``: the value of environment variable ``NAME`` in that process (a Kubernetes Secret as an
  env var, the cluster's instance environment...);
* ``"file:PATH"``: the content of the file at ``PATH`` on that machine, without its trailing newline (a
  Secret mounted as a file).

Any other value is used as written. ``check_submittable`` refuses literal values under secret-looking keys
(``key``, ``secret``, ``token``, ``password``, at any depth: ``client_kwargs.aws_secret_access_key`` too)
so that one never reaches job metadata.
"""

from __future__ import annotations

import os
import re
from typing import Any

ENV_PREFIX = "env:"
FILE_PREFIX = "file:"
SECRET_KEY = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)
# Key names that match SECRET_KEY but name no secret (fsspec/s3fs/gcsfs options).
NOT_SECRET = {"sse_kms_key_id", "key_prefix", "requester_pays"}


class StorageOptionError(ValueError):
    """A storage option reference that cannot be resolved here, or a literal secret bound for job metadata."""


def is_reference(value: Any) -> bool:
    """Whether ``value`` is an ``env:NAME`` or ``file:PATH`` reference."""
    return isinstance(value, str) and (value.startswith(ENV_PREFIX) or value.startswith(FILE_PREFIX))


def resolve_storage_options(options: dict[str, Any] | None, *, where: str = "storage option") -> dict[str, Any]:
    """``options`` with every ``env:``/``file:`` value (at any depth) replaced by what it names in this process.

    Args:
        options: fsspec storage options; None is an empty dict.
        where: how messages name the options (``"--storage-options"``).

    Returns:
        A new dict; ``options`` is not changed. Options without references come back equal.

    Raises:
        StorageOptionError: a named variable is unset or empty, or a named file cannot be read.
    """
    return _resolve(dict(options or {}), where)


def _resolve(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        return {name: _resolve(item, f"{path}.{name}") for name, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if not is_reference(value):
        return value
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):]
        resolved = os.environ.get(name)
        if not resolved:
            raise StorageOptionError(f"{path} names environment variable {name}, which is not set on this machine")
        return resolved
    file = value[len(FILE_PREFIX):]
    try:
        with open(os.path.expanduser(file), encoding="utf-8") as handle:
            return handle.read().rstrip("\r\n")
    except OSError as error:
        raise StorageOptionError(f"{path} names file {file}, which cannot be read on this machine ({error})") from None


def literal_secrets(options: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """Dotted names of the options (at any depth) under a secret-looking key whose value is not a reference."""
    found = []
    for name, value in (options or {}).items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            found += literal_secrets(value, f"{dotted}.")
        elif SECRET_KEY.search(str(name)) and str(name).lower() not in NOT_SECRET and not _harmless(value):
            found.append(dotted)
    return found


def _harmless(value: Any) -> bool:
    """References, and values that carry no secret (None, booleans, gcsfs's named token methods)."""
    return is_reference(value) or value is None or isinstance(value, bool) or value in {"anon", "google_default", "cloud"}


def check_submittable(options: dict[str, Any] | None) -> None:
    """Refuse storage options that would put a secret into a submitted job's entrypoint or metadata.

    Raises:
        StorageOptionError: one line naming the literal options and the alternative.
    """
    secrets = literal_secrets(options)
    if secrets:
        example = secrets[0].rsplit(".", 1)[-1]
        raise StorageOptionError(
            f"{', '.join(secrets)} would be written into the submitted Ray jobs' entrypoints, which the "
            f'cluster shows to anyone who lists jobs; name where the cluster has it instead: "{example}": '
            f'"env:VARIABLE" (an environment variable on every node) or "file:/path/on/the/nodes"'
        )
