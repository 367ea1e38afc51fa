"""A refit's model registry: a directory or bucket prefix of diffusers folders, or a YAML/JSON model list.

Each model of a registry becomes one ``CalibrationSpec`` whose ``model`` is the model's location; its
other fields are the registry's defaults with the entry's own settings (any spec field but ``model``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from olss_dist.artifacts.errors import storage_errors
from olss_dist.artifacts.stores import open_store, parent_uri
from olss_dist.spec import CalibrationSpec

REGISTRY_FILE_SUFFIXES = (".yaml", ".yml", ".json")
# What an entry may set: the spec's fields, except the model, which is the entry's uri.
REGISTRY_KEYS = tuple(f.name for f in fields(CalibrationSpec) if f.name != "model")


def is_registry_file(uri: str) -> bool:
    """True when ``uri`` names a YAML/JSON model list rather than a directory of model folders."""
    return uri.rstrip("/").lower().endswith(REGISTRY_FILE_SUFFIXES)


def local_or_uri(location: str) -> str:
    """A local path made absolute (jobs run in another working directory); URIs unchanged."""
    return location if "://" in location else str(Path(location).expanduser().resolve())


def scan_registry(
    registry: str, defaults: CalibrationSpec, storage_options: dict[str, Any] | None = None
) -> list[CalibrationSpec]:
    """The models of a registry, one spec each: a directory or bucket prefix (every subfolder not starting
    with ``.`` or ``_``, with ``defaults``), or a YAML/JSON file (see ``parse_registry_document``).
    ``defaults.model`` is not used.

    Raises:
        ValueError: a malformed registry file, or a directory with no subfolder.
        ArtifactError: the registry cannot be read.
    """
    registry = local_or_uri(registry)
    if is_registry_file(registry):
        return read_registry_file(registry, defaults, storage_options)
    store = open_store(registry, storage_options)
    with storage_errors("cannot list the model registry", registry):
        store.check_root(create=False)
        names = [e.name for e in store.list_entries("") if e.is_dir and not e.name.startswith((".", "_"))]
    if not names:
        raise ValueError(f"model registry {registry} has no model folders")
    return [replace(defaults, model=store.uri(name)) for name in names]


def read_registry_file(
    uri: str, defaults: CalibrationSpec, storage_options: dict[str, Any] | None = None
) -> list[CalibrationSpec]:
    """The models listed in a YAML or JSON registry file (local path or URI)."""
    import yaml

    store = open_store(parent_uri(uri), storage_options)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    with storage_errors("cannot read the model registry", uri):
        data = store.read(name)
    is_json = uri.lower().endswith(".json")
    try:
        document = json.loads(data) if is_json else yaml.safe_load(data)
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(f"model registry {uri} is not valid {'JSON' if is_json else 'YAML'}: {error}") from None
    return parse_registry_document(document, defaults, parent_uri(uri), uri)


def parse_registry_document(document: Any, defaults: CalibrationSpec, base: str, where: str) -> list[CalibrationSpec]:
    """Models from a registry document.

    Accepted forms: a list of entries, or ``{"defaults": {settings}, "models": [entries]}``. An entry is a
    model URI string or ``{"uri": ..., <settings>}`` with settings from ``REGISTRY_KEYS`` (``lora``: a LoRA
    fused into the model, so one base with two LoRAs is two entries). ``uri``, ``prompts`` and ``lora``
    starting with ``./`` or ``../`` are relative to the registry file's folder ``base``.

    Raises:
        ValueError: naming the entry (``where``, the entry's number and URI) and the setting.
    """
    if isinstance(document, dict):
        unknown = sorted(set(document) - {"defaults", "models"})
        if unknown or "models" not in document:
            raise ValueError(f"{where}: expected keys 'models' and optionally 'defaults', got {sorted(document)}")
        shared = document.get("defaults") or {}
        if not isinstance(shared, dict):
            raise ValueError(f"{where}: 'defaults' must be a mapping of settings")
        defaults = with_settings(defaults, _with_relative_prompts(shared, base), f"{where} defaults")
        document = document["models"]
    if not isinstance(document, list) or not document:
        raise ValueError(f"{where}: expected a non-empty list of models")
    models = [_registry_entry(entry, defaults, base, f"{where} model {i + 1}") for i, entry in enumerate(document)]
    uris = [model.model if model.lora is None else f"{model.model} with lora {model.lora}" for model in models]
    repeated = sorted({uri for uri in uris if uris.count(uri) > 1})
    if repeated:
        raise ValueError(f"{where}: models listed more than once: {repeated}")
    return models


def with_settings(base: CalibrationSpec, settings: Mapping[str, Any], where: str) -> CalibrationSpec:
    """``base`` with a registry entry's ``settings`` (``REGISTRY_KEYS``), checked as the spec checks them.

    Raises:
        ValueError: ``"<where>: <argument>: <what was expected>"`` for an unknown key or a bad value.
    """
    unknown = sorted(set(settings) - set(REGISTRY_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}; allowed: {', '.join(REGISTRY_KEYS)}")
    try:
        return CalibrationSpec.from_mapping(settings, base=base, where=where)
    except ValueError as error:  # SpecError: the argument and what it expected
        raise ValueError(f"{where}: {error}") from None


def _registry_entry(entry: Any, defaults: CalibrationSpec, base: str, where: str) -> CalibrationSpec:
    if isinstance(entry, str):
        entry = {"uri": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("uri"), str) or not entry["uri"].strip():
        raise ValueError(f"{where}: expected a URI string or a mapping with a 'uri', got {entry!r}")
    settings = {key: value for key, value in entry.items() if key != "uri"}
    uri = _relative_to(base, entry["uri"].strip())
    return with_settings(replace(defaults, model=uri), _with_relative_prompts(settings, base), f"{where} ({uri})")


def _with_relative_prompts(settings: dict[str, Any], base: str) -> dict[str, Any]:
    """``settings`` with its ``prompts`` and ``lora`` locations resolved against ``base`` (``_relative_to``)."""
    return {key: _relative_to(base, value) if key in ("prompts", "lora") and isinstance(value, str) else value
            for key, value in settings.items()}


def _relative_to(base: str, location: str) -> str:
    """``./x`` and ``../x`` resolved against the registry file's folder; anything else unchanged."""
    if not location.startswith(("./", "../")):
        return location
    if "://" in base:
        parts = base.rstrip("/").split("/")
        for part in location.split("/"):
            if part == "..":
                parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        return "/".join(parts)
    return str((Path(base) / location).resolve())
