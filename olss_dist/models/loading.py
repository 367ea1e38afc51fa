"""``load_model(spec)``: one entry point from a model spec to a ``DiffusionModel``.

Specs, tried in this order:

* ``"embedded"``: the committed digits model (``olss_dist/models/embedded``);
* ``"embedded-flow"``: the committed flow-matching digits model (``olss_dist/models/embedded_flow``, SD3 layout);
* ``"analytic"``: ``GaussianMixtureModel()``, exact and network-free;
* ``"analytic-flow"``: ``GaussianMixtureFlowModel()``, its rectified-flow twin (exact velocity);
* ``scheme://...`` (``s3://``, ``gs://``, ``memory://``, ...): a diffusers folder on fsspec storage,
  copied to a local cache first (``$OLSS_MODEL_CACHE_DIR``, else ``~/.cache/olss_dist/models``);
* an existing local folder (``file://`` URIs are local folders, used in place);
* a Hugging Face hub id (``org/name``), downloaded with ``huggingface_hub`` (safetensors and configs
  only; ``HF_HUB_OFFLINE=1`` uses the local hub cache only, bounded timeouts otherwise).

A folder's adapter follows the pipeline class its ``model_index.json`` names (``PIPELINES``):
``StableDiffusionPipeline`` (SD 1.x/2.x), ``StableDiffusionXLPipeline`` (SDXL base), ``StableDiffusion3Pipeline``
(SD3/3.5), ``FluxPipeline`` (Flux); the SDXL refiner and every other class are refused. Hub downloads and remote
copies take that family's files only.

Every failure is one ``ModelLoadError`` naming the spec and what was tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from olss_dist.models.base import DiffusionModel
from olss_dist.spec import CalibrationSpec
from olss_dist.models.common import ModelLoadError, read_json, vae_scale_factor
from olss_dist.models.flux import flux_resolution
from olss_dist.models.sd3 import sd3_resolution
from olss_dist.models.sdxl import sdxl_resolution
from olss_dist.models.stable_diffusion import StableDiffusionModel, check_scheduler_config, sd_resolution

# What a Stable Diffusion (1.x/2.x) folder needs, as hub allow-patterns and as remote-copy prefixes.
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



def weight_files(component: str, weights: str) -> tuple[str, ...]:
    """Hub allow-patterns of one component's config and fp32 safetensors, whole or sharded (fp16 variants left out)."""
    return (
        f"{component}/config.json",
        f"{component}/{weights}.safetensors",
        f"{component}/{weights}-*-of-*.safetensors",
        f"{component}/{weights}.safetensors.index.json",
    )


def family_hub_files(
    text_encoders: tuple[str, ...], tokenizers: tuple[str, ...], denoiser: str = "transformer"
) -> tuple[str, ...]:
    """Hub allow-patterns of a folder with these text encoders and tokenizers, its ``denoiser`` and VAE."""
    files = ["model_index.json", "scheduler/scheduler_config.json"] + [f"{name}/*" for name in tokenizers]
    for name in text_encoders:
        files += weight_files(name, "model")
    for name in (denoiser, "vae"):
        files += weight_files(name, "diffusion_pytorch_model")
    return tuple(files)


@dataclass(frozen=True)
class PipelineFamily:
    """One supported diffusers pipeline class: what it is and which of its files sampling and decoding need."""

    description: str
    hub_files: tuple[str, ...]
    remote_prefixes: tuple[str, ...]


SD3_TEXT = (("text_encoder", "text_encoder_2", "text_encoder_3"), ("tokenizer", "tokenizer_2", "tokenizer_3"))
FLUX_TEXT = (("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"))
SDXL_TEXT = FLUX_TEXT  # CLIP-L and CLIP-G with their tokenizers
PIPELINES = {
    "StableDiffusionPipeline": PipelineFamily("Stable Diffusion 1.x/2.x", HUB_FILES, REMOTE_PREFIXES),
    "StableDiffusionXLPipeline": PipelineFamily(
        "Stable Diffusion XL", family_hub_files(*SDXL_TEXT, denoiser="unet"),
        ("model_index.json", "scheduler/", "unet/", "vae/") + tuple(f"{n}/" for n in sum(SDXL_TEXT, ())),
    ),
    "StableDiffusion3Pipeline": PipelineFamily(
        "Stable Diffusion 3/3.5", family_hub_files(*SD3_TEXT),
        ("model_index.json", "scheduler/", "transformer/", "vae/") + tuple(f"{n}/" for n in sum(SD3_TEXT, ())),
    ),
    "FluxPipeline": PipelineFamily(
        "Flux", family_hub_files(*FLUX_TEXT),
        ("model_index.json", "scheduler/", "transformer/", "vae/") + tuple(f"{n}/" for n in sum(FLUX_TEXT, ())),
    ),
}
ALL_REMOTE_PREFIXES = tuple(dict.fromkeys(p for family in PIPELINES.values() for p in family.remote_prefixes))
SUPPORTED = ", ".join(f"{name} ({family.description})" for name, family in PIPELINES.items())


def pipeline_class(index: dict[str, Any], where: str) -> str:
    """The supported pipeline class (a key of ``PIPELINES``) that ``model_index.json`` (``index``) names.

    A folder naming no class is tried as Stable Diffusion 1.x/2.x, as before there were other families.

    Raises:
        ModelLoadError: an SDXL refiner, a one-encoder class naming a second text encoder, or any other class;
            the message names it and the supported ones.
    """
    from olss_dist.models.sdxl import is_refiner, refiner_error

    name = str(index.get("_class_name", ""))
    if "XL" in name and is_refiner(index):
        raise refiner_error(where)
    if name in PIPELINES and (name != "StableDiffusionPipeline" or "text_encoder_2" not in index):
        return name
    if "text_encoder_2" in index and name in ("", "StableDiffusionPipeline"):
        raise ModelLoadError(
            f"{where} names {name or 'no pipeline class'} but has a second text encoder; "
            "an SDXL folder's model_index.json names StableDiffusionXLPipeline"
        )
    if not name:
        return "StableDiffusionPipeline"
    raise ModelLoadError(f"{where}: pipeline class {name!r} is not supported; supported: {SUPPORTED}")


BUILTIN_MODELS = ("embedded", "embedded-flow", "analytic", "analytic-flow")
"""The specs ``load_model`` serves from this package, not from a folder, hub id or URI."""


def check_local_model(spec: str, resolution: Any = None) -> None:
    """Refuse, before any worker starts, a local diffusers folder no adapter serves or a ``resolution`` it cannot take.

    Only what the driver can see for free is checked (``model_index.json``, the VP scheduler config and, for the
    resolution, the adapter's own rule, ``check_resolution``); hub ids, URIs and built-in specs where they load.

    Raises:
        ModelLoadError: one line: the pipeline class and the supported ones, the config's fault, or the resolution.
    """
    folder = None if spec in BUILTIN_MODELS else local_path(spec)
    if folder is not None and (folder / "model_index.json").is_file():
        name = pipeline_class(read_json(folder / "model_index.json"), str(folder))
        check_scheduler_config(folder, name)
        if resolution is not None:
            check_resolution(folder, name, resolution)


def check_resolution(folder: Path, pipeline: str, resolution: Any) -> None:
    """``resolution`` by ``pipeline``'s adapter rule (``sd_resolution``, ``sdxl_resolution``, ``sd3_resolution``,
    ``flux_resolution``), the VAE scale and SD3's patch from the folder's configs."""
    scale = vae_scale_factor(folder)
    if pipeline == "StableDiffusion3Pipeline":
        config = folder / "transformer" / "config.json"
        patch = int(read_json(config).get("patch_size", 2)) if config.is_file() else 2
        sd3_resolution(folder, resolution, scale, patch)
    elif pipeline == "FluxPipeline":
        flux_resolution(folder, resolution, scale)
    elif pipeline == "StableDiffusionXLPipeline":
        sdxl_resolution(folder, resolution, scale)
    else:
        sd_resolution(folder, resolution, scale)


def load_model(
    spec: str = "embedded",
    *,
    guidance_scale: float = CalibrationSpec.guidance_scale,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    storage_options: dict[str, Any] | None = None,
    resolution: int | tuple[int, int] | None = None,
    lora: str | None = None,
) -> DiffusionModel:
    """The ``DiffusionModel`` behind ``spec`` (see the module docstring for the accepted specs).

    Args:
        spec: ``"embedded"``, ``"embedded-flow"``, ``"analytic"``, ``"analytic-flow"``, an fsspec URI, a local
            diffusers folder or a hub id.
        guidance_scale: classifier-free guidance scale of the returned denoiser (Flux: the distilled
            guidance fed to its guidance embedding).
        device: where the network runs; default CUDA when available, else CPU.
        torch_dtype: network dtype; default fp16 on CUDA (bf16 for Flux), fp32 on CPU.
        storage_options: fsspec options for URI specs (credentials, ``endpoint_url``...).
        resolution: pixels (an int, or ``(height, width)``) an image model (SD 1.x/2.x, SDXL, SD3, Flux) calibrates
            at; default the model's own. The analytic models take none.
        lora: a diffusers LoRA (safetensors file or folder, path or URI) fused into the model after it loads
            (``olss_dist.models.lora``); its digest then covers base and LoRA.

    Raises:
        ModelLoadError: the spec names nothing loadable, or the resolution is one the model cannot take;
            the message says what was tried.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"model spec must be a non-empty string, got {spec!r}")
    if lora is not None:
        from olss_dist.models.lora import load_with_lora

        options = dict(guidance_scale=guidance_scale, device=device, torch_dtype=torch_dtype, resolution=resolution)
        return load_with_lora(spec, lora, storage_options=storage_options, **options)
    if spec in ("analytic", "analytic-flow"):
        if resolution is not None:
            raise ModelLoadError(f"resolution: the {spec} model has no image resolution, got {resolution!r}")
        from olss_dist.models.analytic import GaussianMixtureFlowModel, GaussianMixtureModel

        analytic = GaussianMixtureModel if spec == "analytic" else GaussianMixtureFlowModel
        return analytic(guidance_scale=guidance_scale)
    options = dict(guidance_scale=guidance_scale, device=device, torch_dtype=torch_dtype)
    if spec == "embedded":
        from olss_dist.models import embedded

        return load_folder(
            embedded.EMBEDDED_MODEL_PATH, "embedded", resolution, prompts=embedded.default_prompts(), **options
        )
    if spec == "embedded-flow":
        folder, prompts = embedded_flow_folder()
        return load_folder(folder, "embedded-flow", resolution, prompts=prompts, **options)
    return load_folder(local_folder(spec, storage_options), spec, resolution, **options)


def embedded_flow_folder() -> tuple[Path, list[str]]:
    """``(folder, default prompts)`` of the committed flow-matching digits model; ``ModelLoadError`` if not built."""
    try:
        from olss_dist.models import embedded_flow
    except ImportError as error:
        raise ModelLoadError(f"model 'embedded-flow': not part of this installation ({error})") from error
    folder = Path(embedded_flow.EMBEDDED_FLOW_MODEL_PATH)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"model 'embedded-flow': no trained model in {folder} (python jobs/train_embedded_flow_model.py writes it)"
        )
    return folder, embedded_flow.default_prompts()


def load_folder(
    folder: str | Path, model_id: str, resolution: int | tuple[int, int] | None = None, **options: Any
) -> DiffusionModel:
    """The adapter of the pipeline class ``folder/model_index.json`` names, loaded from ``folder``.

    ``options``: ``guidance_scale``, ``device``, ``torch_dtype``, ``prompts`` of the adapters' ``from_folder``.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    name = pipeline_class(read_json(folder / "model_index.json"), str(folder))
    if name == "StableDiffusion3Pipeline":
        from olss_dist.models.sd3 import StableDiffusion3Model

        return StableDiffusion3Model.from_folder(folder, model_id=model_id, resolution=resolution, **options)
    if name == "StableDiffusionXLPipeline":
        from olss_dist.models.sdxl import StableDiffusionXLModel

        return StableDiffusionXLModel.from_folder(folder, model_id=model_id, resolution=resolution, **options)
    if name == "FluxPipeline":
        from olss_dist.models.flux import FluxModel

        return FluxModel.from_folder(folder, model_id=model_id, resolution=resolution, **options)
    return StableDiffusionModel.from_folder(folder, model_id=model_id, resolution=resolution, **options)


def local_path(spec: str) -> Path | None:
    """The local path a model spec names (a plain path or ``file://``), or ``None`` for a remote URI."""
    if "://" in spec and not spec.startswith("file://"):
        return None
    return Path(spec.removeprefix("file://")).expanduser()


def local_folder(spec: str, storage_options: dict[str, Any] | None = None) -> Path:
    """A local diffusers folder for ``spec``: the folder itself, a cached copy of a URI, or a hub snapshot."""
    path = local_path(spec)
    if path is None:
        return fetch_remote_folder(spec, storage_options)
    if path.is_dir():
        return path
    if not HUB_ID.match(spec):
        raise ModelLoadError(
            f"model {spec!r}: no folder {path.resolve()} (and not a hub id of the form org/name, "
            "nor 'embedded', 'analytic' or an fsspec URI)"
        )
    return download_from_hub(spec)


def download_from_hub(repo_id: str) -> Path:
    """The local hub snapshot of ``repo_id`` holding its family's ``hub_files`` (downloaded unless ``HF_HUB_OFFLINE``).

    ``model_index.json`` comes first: the pipeline class it names says which files to fetch.
    """
    index = hub_snapshot(repo_id, ("model_index.json",)) / "model_index.json"
    family = PIPELINES[pipeline_class(read_json(index), f"model {repo_id!r}")]
    return hub_snapshot(repo_id, family.hub_files)


def hub_snapshot(repo_id: str, allow_patterns: tuple[str, ...]) -> Path:
    """``snapshot_download(repo_id, allow_patterns)``, offline with ``HF_HUB_OFFLINE``; one ``ModelLoadError`` on failure."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        snapshot = snapshot_download(
            repo_id, allow_patterns=list(allow_patterns), local_files_only=offline, etag_timeout=HUB_ETAG_TIMEOUT_S
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
    """A local copy of the diffusers folder at ``uri`` (only its family's ``remote_prefixes``).

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
            listing = remote_listing(store, ALL_REMOTE_PREFIXES)
        if "model_index.json" not in listing:
            raise ModelLoadError(f"model {uri!r}: no model_index.json there; expected a diffusers model folder ({SUPPORTED})")
        with storage_errors("cannot read model_index.json of", uri), store.open("model_index.json") as handle:
            index = json.loads(handle.read())
    except ModelLoadError:
        raise
    except (ArtifactError, ValueError) as error:
        raise ModelLoadError(f"model {uri!r}: {error}") from error
    prefixes = PIPELINES[pipeline_class(index, f"model {uri!r}")].remote_prefixes
    listing = {relative: entry for relative, entry in listing.items() if relative.startswith(prefixes)}
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


def remote_listing(store, prefixes: tuple[str, ...] = REMOTE_PREFIXES) -> dict[str, list]:
    """``{relative path: [size, version stamp]}`` of the files under ``store``'s root that start with ``prefixes``."""
    base = store.path().rstrip("/") + "/"
    try:
        found = store.fs.find(store.path(), detail=True)
    except FileNotFoundError:
        return {}
    listing = {}
    for name, info in found.items():
        relative = name[len(base) :] if name.startswith(base) else None
        if relative and relative.startswith(prefixes) and info.get("type", "file") == "file":
            version = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified") if k in info), "")
            listing[relative] = [int(info.get("size") or 0), version]
    return listing


def copy_remote_file(store, relative: str, destination: Path) -> None:
    """Stream one file under ``store``'s root to ``destination`` in 8 MiB chunks."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with store.open(relative) as source, open(destination, "wb") as target:
        while chunk := source.read(COPY_CHUNK_BYTES):
            target.write(chunk)
