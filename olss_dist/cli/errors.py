"""How ``olss-dist`` commands report bad input: one ``error:`` line on stderr, exit status 1.

Library errors name arguments (``SpecError.argument``); here they become the flags a user typed.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Callable, NoReturn, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from olss_dist.artifacts import ArtifactError
from olss_dist.spec import SpecError, flag_name

error_console = Console(stderr=True)

StorageOptionsFlag = Annotated[
    Optional[str],
    typer.Option(
        "--storage-options",
        help='fsspec storage options as a JSON object, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'. '
        "Without it, credentials and endpoint come from the environment (AWS_ENDPOINT_URL, AWS_PROFILE...). "
        'A value "env:NAME" or "file:PATH" is read from that variable or file where the store is opened; '
        "refit passes the options to the jobs it submits and refuses literal secrets there (docs/refit.md).",
    ),
]

Command = TypeVar("Command", bound=Callable[..., Any])


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """The ``--storage-options`` JSON object as a dict (None when the flag is absent); ValueError otherwise."""
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--storage-options is not valid JSON: {error}") from error
    if not isinstance(options, dict):
        raise ValueError(f"--storage-options must be a JSON object, got {type(options).__name__}")
    return options


# Flags whose name is not ``flag_name`` of the argument they set.
FLAGS = {"wait_for_gpus_s": "--wait-for-gpus", "reserve_timeout_s": "--reserve-timeout"}


def error_text(error: BaseException) -> str:
    """An error as its user reads it: a ``SpecError`` names the flag of its argument (``--teacher-steps: ...``)."""
    if isinstance(error, SpecError):
        return f"{FLAGS.get(error.argument, flag_name(error.argument))}: {error.detail}"
    return str(error)


def exit_with_error(error: BaseException) -> NoReturn:
    """Print ``error`` as one ``error:`` line on stderr and exit with status 1."""
    error_console.print(f"[bold red]error:[/] {escape(error_text(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1) from error


def reports_errors(command: Command) -> Command:
    """Run ``command``; print a ValueError or ArtifactError as one ``error:`` line and exit with status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValueError, ArtifactError) as error:
            exit_with_error(error)

    return wrapper  # type: ignore[return-value]
