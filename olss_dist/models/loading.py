"""``load_model(spec)``: one entry point from a model spec to a ``DiffusionModel``.

Specs, tried in this order:

* ``"embedded"``: the committed digits model (``olss_dist/models/embedded``);
* ``"analytic"``: ``GaussianMixtureModel()``, exact and network-free;
* ``"analytic-flow"``: ``GaussianMixtureFlowModel()``, its rectified-flow twin (exact velocity);
* ``scheme://...`` (``s3://``, ``gs://``, ``memory://``, ...): a diffusers folder on fsspec storage,
  copied to a local cache first (``$OLSS_MODEL_CACHE_DIR``, else ``~/.cache/olss_dist/models``);
* an existing local folder (``file://`` URIs are local folders, used in place);
* a Hugging Face hub id (``org/name``), downloaded with ``huggingface_hub`` (safetensors and configs
  only; ``HF_HUB_OFFLINE=1`` uses the local hub cache only, bounded timeouts otherwise).

Every failure is one ``ModelLoadError`` naming the spec and what was tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from olss_dist.models.base import DiffusionModel

# What a Stable Diffusion folder needs, as hub allow-patterns and as remote-copy prefixes.
HUB_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
REMOTE_PREFIXES = ("model_index.json", "scheduler/", "tokenizer/", "text_encoder/", "unet/", "vae/")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name: never absolute, dot- or home-relative
HUB_ETAG_TIMEOUT_S = 10
COPY_CHUNK_BYTES = 8 << 20


class ModelLoadError(ValueError):
    """A model spec could not be turned into a model; the message names the spec and what was tried."""


def load_model(
    spec: str = "embedded",
    *,
    guidance_scale: float = 7.5,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    storage_options: dict[str, Any] | None = None,
) -> DiffusionModel:
    """The ``DiffusionModel`` behind ``spec`` (see the module docstring for the accepted specs).

    Args:
        spec: ``"embedded"``, ``"analytic"``, ``"analytic-flow"``, an fsspec URI, a local diffusers folder or a hub id.
        guidance_scale: classifier-free guidance scale of the returned denoiser.
        device: where the UNet runs; default CUDA when available, else CPU.
        torch_dtype: UNet / text-encoder dtype; default fp16 on CUDA, fp32 on CPU.
        storage_options: fsspec options for URI specs (credentials, ``endpoint_url``...).

    Raises:
        ModelLoadError: the spec names nothing loadable; the message says what was tried.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"model spec must be a non-empty string, got {spec!r}")
    if spec == "analytic":
        from olss_dist.models.analytic import GaussianMixtureModel

        return GaussianMixtureModel(guidance_scale=guidance_scale)
    if spec == "analytic-flow":
        from olss_dist.models.analytic import GaussianMixtureFlowModel

        return GaussianMixtureFlowModel(guidance_scale=guidance_scale)
    options = dict(guidance_scale=guidance_scale, device=device, torch_dtype=torch_dtype)
    from olss_dist.models.stable_diffusion import StableDiffusionModel

    if spec == "embedded":
        from olss_dist.models import embedded

        return StableDiffusionModel.from_folder(
            embedded.EMBEDDED_MODEL_PATH, model_id="embedded", prompts=embedded.default_prompts(), **options
        )
    return StableDiffusionModel.from_folder(local_folder(spec, storage_options), model_id=spec, **options)


def local_folder(spec: str, storage_options: dict[str, Any] | None = None) -> Path:
    """A local diffusers folder for ``spec``: the folder itself, a cached copy of a URI, or a hub snapshot."""
    if "://" in spec and not spec.startswith("file://"):
        return fetch_remote_folder(spec, storage_options)
    path = Path(spec.removeprefix("file://")).expanduser()
    if path.is_dir():
        return path
    if not HUB_ID.match(spec):
        raise ModelLoadError(
            f"model {spec!r}: no folder {path.resolve()} (and not a hub id of the form org/name, "
            "nor 'embedded', 'analytic' or an fsspec URI)"
        )
    return download_from_hub(spec)


def download_from_hub(repo_id: str) -> Path:
    """The local hub snapshot of ``repo_id`` holding ``HUB_FILES`` (downloaded unless ``HF_HUB_OFFLINE``)."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        snapshot = snapshot_download(
            repo_id, allow_patterns=list(HUB_FILES), local_files_only=offline, etag_timeout=HUB_ETAG_TIMEOUT_S
        )
    except (OSError, ValueError) as error:  # hub, HTTP, offline-cache and repo-id errors all derive from these
        where = "the local hub cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub and its local cache"
        raise ModelLoadError(
            f"model {repo_id!r}: no local folder of that name, and {where} has no snapshot of it "
            f"({type(error).__name__}: {error})"
        ) from error
    return Path(snapshot)


def model_cache_dir() -> Path:
    """``$OLSS_MODEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/olss_dist/models``, else ``~/.cache/olss_dist/models``."""
    if os.environ.get("OLSS_MODEL_CACHE_DIR"):
        return Path(os.environ["OLSS_MODEL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "olss_dist" / "models"


def fetch_remote_folder(uri: str, storage_options: dict[str, Any] | None = None) -> Path:
    """A local copy of the diffusers folder at ``uri`` (only the files in ``REMOTE_PREFIXES``).

    The copy lives at ``<model_cache_dir>/<sha256(uri)[:16]>/<sha256(listing)[:16]>``, where the listing
    holds each file's path, size and version stamp (ETag / mtime), so a changed remote folder gets a
    fresh copy and an unchanged one is not downloaded again. Copies land in a temporary sibling and are
    renamed into place, so concurrent loaders on one node never see half a folder.
    """
    from olss_dist.artifacts.errors import ArtifactError, storage_errors
    from olss_dist.artifacts.stores import open_store

    try:
        store = open_store(uri, storage_options)
        with storage_errors("cannot list model folder", uri):
            listing = remote_listing(store)
    except (ArtifactError, ValueError) as error:
        raise ModelLoadError(f"model {uri!r}: {error}") from error
    if "model_index.json" not in listing:
        raise ModelLoadError(f"model {uri!r}: no model_index.json there; expected a diffusers Stable Diffusion folder")
    stamp = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]
    final = model_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16] / stamp
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".partial-{stamp}-{secrets.token_hex(4)}"
    try:
        with storage_errors("cannot download model folder", uri):
            for relative in listing:
                copy_remote_file(store, relative, partial / relative)
        os.rename(partial, final)
    except ArtifactError as error:
        raise ModelLoadError(f"model {uri!r}: {error}") from error
    except OSError as error:
        if not final.is_dir():  # another loader on this node finished the same copy first otherwise
            raise ModelLoadError(f"model {uri!r}: cannot place the copy at {final}: {error}") from error
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def remote_listing(store) -> dict[str, list]:
    """``{relative path: [size, version stamp]}`` of the files under ``store``'s root in ``REMOTE_PREFIXES``."""
    base = store.path().rstrip("/") + "/"
    try:
        found = store.fs.find(store.path(), detail=True)
    except FileNotFoundError:
        return {}
    listing = {}
    for name, info in found.items():
        relative = name[len(base) :] if name.startswith(base) else None
        if relative and relative.startswith(REMOTE_PREFIXES) and info.get("type", "file") == "file":
            version = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified") if k in info), "")
            listing[relative] = [int(info.get("size") or 0), version]
    return listing


def copy_remote_file(store, relative: str, destination: Path) -> None:
    """Stream one file under ``store``'s root to ``destination`` in 8 MiB chunks."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with store.open(relative) as source, open(destination, "wb") as target:
        while chunk := source.read(COPY_CHUNK_BYTES):
            target.write(chunk)
