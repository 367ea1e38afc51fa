"""LoRA fine-tunes: a base model plus diffusers LoRA weights, fused before the teacher runs.

``--model BASE --lora PATH_OR_URI`` names the fine-tune. The LoRA is one safetensors file (never pickle):

* a local ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors`` (what
  ``save_lora_weights`` writes) or exactly one ``.safetensors`` file; ``file://`` URIs are local paths;
* an fsspec URI (``s3://``, ``gs://``, ``memory://``...) of such a file or folder, copied once to
  ``<model cache>/lora/<sha256(uri)[:16]>/<sha256(size, version)[:16]>/`` (a changed remote file gets a new copy).

``apply_lora`` loads it with diffusers' own LoRA loading (``pipe.load_lora_weights``, which peft backs), fuses
it into the weights (``fuse_lora``) and drops the adapter layers (``unload_lora_weights``), so the teacher, the
on-policy rounds and evaluation all run the fused network at the base model's speed. Before loading, every
LoRA factor is checked against the base weight it adapts (``check_fits``): a LoRA for another base is one
``LoraError`` (``lora: ...``), never diffusers' silent no-op or a half-loaded adapter. The job runs
the same check on the driver from safetensors headers (``check_local_lora``), before Ray starts.

The fused model's digest covers base and LoRA (``digest.lora_digest``), and its id names both
(``lora_model_id``), so two LoRAs of one base are two artifacts and an unchanged LoRA is a refit skip.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping

from olss_dist.models.common import ModelLoadError, read_json
from olss_dist.models.digest import lora_digest
from olss_dist.spec import SpecError

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# Components a diffusers LoRA file addresses (key prefixes) and the weight files their shapes are read from.
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
# "<component>.<module path>.<factor>.weight" in diffusers' (lora.down/up), peft's (lora_A/B) and the
# converted kohya (lora_down/up) layouts; DoRA magnitudes and alphas carry no matrix to check.
FACTOR_KEY = re.compile(
    r"^(?P<component>[a-z_0-9]+)\.(?P<module>.+)\.(?P<factor>lora\.down|lora\.up|lora_A|lora_B|lora_down|lora_up)"
    r"(?:\.[\w-]+)?\.weight$"
)
DOWN_FACTORS = ("lora.down", "lora_A", "lora_down")
BUILTIN_LORA_BASES = ("embedded", "embedded-flow")


class LoraError(SpecError, ModelLoadError):
    """A LoRA that cannot be read or does not fit its base: ``str(error)`` is ``"lora: ..."``, and the command
    line names the flag (``--lora: ...``), as for any ``SpecError`` of the ``lora`` argument."""

    def __init__(self, message: str) -> None:
        super().__init__("lora", message)


def lora_model_id(model: str, lora: str | None) -> str:
    """The id a calibration of ``model`` with ``lora`` is published under: ``model`` alone without a LoRA,
    else ``"<model>+lora:<lora>"`` (so each LoRA of one base has its own ``latest.json``)."""
    return model if not lora else f"{model}+lora:{lora}"


# ----------------------------------------------------------------------------------------------- locating


def resolve_lora(lora: str, storage_options: dict[str, Any] | None = None) -> Path:
    """The local safetensors file of the LoRA ``lora`` names (see the module docstring).

    Raises:
        LoraError: (a ``ModelLoadError``) nothing there, not safetensors, or an unreadable remote location.
    """
    if not isinstance(lora, str) or not lora.strip():
        raise LoraError(f"must be a non-empty path or URI, got {lora!r}")
    local = local_lora_path(lora)
    return local_lora_file(local, lora) if local is not None else fetch_remote_lora(lora, storage_options)


def local_lora_path(lora: str) -> Path | None:
    """The local path ``lora`` names (a plain path or ``file://``), or ``None`` for a remote URI."""
    if "://" in lora and not lora.startswith("file://"):
        return None
    return Path(lora.removeprefix("file://")).expanduser()


def local_lora_file(path: Path, lora: str) -> Path:
    """``path`` itself when it is a ``.safetensors`` file, or the LoRA weights file of the folder ``path``."""
    if path.is_dir():
        if (path / LORA_WEIGHTS_NAME).is_file():
            return path / LORA_WEIGHTS_NAME
        candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
        if len(candidates) == 1:
            return candidates[0]
        raise LoraError(
            f"{lora!r} is a folder without {LORA_WEIGHTS_NAME}"
            + (f" and with {len(candidates)} .safetensors files; name one" if candidates else " or any .safetensors file")
        )
    if not path.is_file():
        raise LoraError(f"no file or folder {path.resolve()}")
    if path.suffix != ".safetensors":
        raise LoraError(f"{lora!r} is not a .safetensors file (pickled LoRA weights are never loaded)")
    return path


def fetch_remote_lora(uri: str, storage_options: dict[str, Any] | None = None) -> Path:
    """A local copy of the LoRA file at ``uri`` (a ``.safetensors`` object, or a folder of one), cached by
    ``uri`` and the object's size and version stamp; copies are renamed into place (no half files)."""
    from olss_dist.artifacts.errors import ArtifactError, storage_errors
    from olss_dist.artifacts.stores import open_store, parent_uri
    from olss_dist.models.loading import copy_remote_file, model_cache_dir, remote_listing

    is_file = uri.rstrip("/").endswith(".safetensors")
    folder = parent_uri(uri) if is_file else uri
    try:
        store = open_store(folder, storage_options)
        with storage_errors("cannot list the LoRA location", uri):
            listing = {k: v for k, v in remote_listing(store, ("",)).items() if "/" not in k and k.endswith(".safetensors")}
    except (ArtifactError, ValueError) as error:
        raise LoraError(f"{uri!r}: {error}") from error
    name = uri.rstrip("/").rsplit("/", 1)[-1] if is_file else LORA_WEIGHTS_NAME
    if name not in listing and not is_file and len(listing) == 1:
        name = next(iter(listing))
    if name not in listing:
        raise LoraError(f"{uri!r}: no {name} there (a LoRA is one .safetensors file or a folder of one)")
    stamp = hashlib.sha256(json.dumps(listing[name]).encode()).hexdigest()[:16]
    final = model_cache_dir() / "lora" / hashlib.sha256(uri.encode()).hexdigest()[:16] / stamp
    if not (final / name).is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.parent / f".partial-{stamp}-{secrets.token_hex(4)}"
        try:
            with storage_errors("cannot download the LoRA", uri):
                copy_remote_file(store, name, partial / name)
            os.rename(partial, final)
        except ArtifactError as error:
            raise LoraError(f"{uri!r}: {error}") from error
        except OSError as error:
            if not (final / name).is_file():  # another loader on this node placed the same copy first otherwise
                raise LoraError(f"{uri!r}: cannot place the copy at {final}: {error}") from error
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return final / name


# ----------------------------------------------------------------------------------------------- fitting


def lora_factors(state_dict: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, tuple[int, ...]]]:
    """``{(component, module path): {"down": shape, "up": shape}}`` of a LoRA state dict (diffusers' converted form)."""
    factors: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    for key, tensor in state_dict.items():
        match = FACTOR_KEY.match(key)
        if match:
            side = "down" if match["factor"] in DOWN_FACTORS else "up"
            factors.setdefault((match["component"], match["module"]), {})[side] = tuple(tensor.shape)
    return factors


def check_fits(
    state_dict: Mapping[str, Any], base_shapes: Mapping[str, Mapping[str, tuple[int, ...]]], lora: str, base: str
) -> None:
    """``LoraError`` (one ``lora: ...`` line) unless every factor of ``state_dict`` adapts a weight of the base.

    Args:
        state_dict: the LoRA as ``lora_state_dict`` returns it (keys ``<component>.<module>.lora.down.weight``...).
        base_shapes: ``{component: {parameter name: shape}}`` of the base model's networks.
        lora, base: the names the message gives the LoRA and the base model.
    """
    factors = lora_factors(state_dict)
    if not factors:
        raise LoraError(f"{lora} holds no LoRA factors (keys like unet.<module>.lora.down.weight)")
    for (component, module), sides in sorted(factors.items()):
        weight = base_shapes.get(component, {}).get(f"{module}.weight")
        if weight is None:
            where = f"no {component}" if component not in base_shapes else f"no module {component}.{module}"
            raise LoraError(f"{lora} does not fit {base}: the base has {where}")
        down, up = sides.get("down"), sides.get("up")
        if down is None or up is None or len(down) != len(weight) or down[1] != weight[1] or up[0] != weight[0]:
            raise LoraError(
                f"{lora} does not fit {base}: {component}.{module} is {tuple(weight)} in the base, "
                f"the LoRA's factors are {down} (down) and {up} (up)"
            )


def read_lora(file: Path, lora: str) -> dict[str, Any]:
    """The LoRA's state dict, converted by diffusers (kohya and peft layouts become diffusers' keys)."""
    from diffusers import StableDiffusionPipeline

    try:
        state_dict = StableDiffusionPipeline.lora_state_dict(str(file))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise LoraError(f"{lora}: cannot read LoRA weights from {file} ({type(error).__name__}: {error})") from None
    return state_dict[0] if isinstance(state_dict, tuple) else state_dict


def header_shapes(folder: Path) -> dict[str, dict[str, tuple[int, ...]]] | None:
    """``{component: {parameter: shape}}`` of a local diffusers folder, read from safetensors headers only;
    ``None`` when a component's weights are not there in that form (the loader then says what is wrong)."""
    from safetensors import safe_open

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in LORA_COMPONENTS:
        if not (folder / component).is_dir():
            continue
        files = component_weight_files(folder / component)
        if not files or not all(file.is_file() for file in files):
            return None
        shapes[component] = {}
        for file in files:
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    shapes[component][key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def component_weight_files(directory: Path) -> list[Path]:
    """A component's fp32 safetensors weight files, whole or sharded (its ``.index.json``'s shards)."""
    for name in WEIGHT_NAMES:
        if (directory / f"{name}.safetensors").is_file():
            return [directory / f"{name}.safetensors"]
        if (directory / f"{name}.safetensors.index.json").is_file():
            shards = sorted(set(read_json(directory / f"{name}.safetensors.index.json")["weight_map"].values()))
            return [directory / shard for shard in shards]
    return []


def module_shapes(model: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{component: {parameter: shape}}`` of a loaded adapter's networks (those of ``LORA_COMPONENTS`` it has)."""
    return {
        name: {key: tuple(p.shape) for key, p in getattr(model, name).named_parameters()}
        for name in LORA_COMPONENTS
        if getattr(model, name, None) is not None
    }


def check_local_lora(model: str, lora: str | None) -> None:
    """Refuse, before any worker starts, a LoRA that cannot load or does not fit its base, when both are local.

    ``model`` is the base's spec; the built-in image models are local folders. Remote LoRAs and bases are
    checked where they load (``apply_lora``).

    Raises:
        LoraError: one ``lora: ...`` line (a ``ModelLoadError`` and a ``SpecError``).
    """
    if not lora:
        return
    if model in ("analytic", "analytic-flow"):
        raise LoraError(f"the {model} model has no network weights to adapt; use an image model")
    from olss_dist.models.loading import local_path

    local = local_lora_path(lora)
    if local is None:
        return
    file = local_lora_file(local, lora)  # missing or pickled: refused whatever the base
    folder = builtin_folder(model) if model in BUILTIN_LORA_BASES else local_path(model)
    shapes = header_shapes(folder) if folder is not None and (folder / "model_index.json").is_file() else None
    if shapes is not None:
        check_fits(read_lora(file, lora), shapes, lora, model)


def builtin_folder(model: str) -> Path | None:
    """The folder of the built-in image model ``model`` names (``None`` for any other spec, or when it is
    not part of this installation)."""
    if model not in BUILTIN_LORA_BASES:
        return None
    if model == "embedded":
        from olss_dist.models.embedded import EMBEDDED_MODEL_PATH

        return Path(EMBEDDED_MODEL_PATH)
    try:
        from olss_dist.models.embedded_flow import EMBEDDED_FLOW_MODEL_PATH
    except ImportError:
        return None
    return Path(EMBEDDED_FLOW_MODEL_PATH)


# ----------------------------------------------------------------------------------------------- fusing


def apply_lora(model: Any, lora: str, storage_options: dict[str, Any] | None = None) -> Any:
    """Fuse the LoRA ``lora`` into the loaded image model ``model`` (in place) and return it.

    After this ``model.digest`` is ``lora_digest(base digest, LoRA file)`` and ``model.model_id`` is
    ``lora_model_id(base id, lora)``.

    Raises:
        LoraError: (a ``ModelLoadError``) the LoRA cannot be read, does not fit, or the model takes no LoRA.
    """
    if not hasattr(model, "folder"):
        raise LoraError(f"the {model.model_id} model has no network weights to adapt; use an image model")
    file = resolve_lora(lora, storage_options)
    state_dict = read_lora(file, lora)
    check_fits(state_dict, module_shapes(model), lora, model.model_id)
    from diffusers.utils import logging as diffusers_logging

    pipeline = lora_pipeline(model, lora)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not "no LoRA keys for the text encoder" for a UNet-only LoRA
    try:
        pipeline.load_lora_weights(state_dict)
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    except (ValueError, RuntimeError, KeyError) as error:
        raise LoraError(f"{lora} does not load into {model.model_id} ({type(error).__name__}: {error})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    for name in LORA_COMPONENTS:
        network = getattr(model, name, None)
        if network is not None:
            network.eval().requires_grad_(False)
    model.digest = lora_digest(model.digest, file)
    model.model_id = lora_model_id(model.model_id, lora)
    return model


def lora_pipeline(model: Any, lora: str) -> Any:
    """A diffusers pipeline over ``model``'s own networks (no copies) that ``load_lora_weights`` can fill.

    Flow adapters hold their pipeline; UNet adapters get one of the class ``model_index.json`` names, built
    from the networks they hold (the VAE is not needed: LoRAs adapt the denoiser and text encoders).
    """
    if getattr(model, "pipeline", None) is not None:
        return model.pipeline
    import diffusers

    name = str(read_json(Path(model.folder) / "model_index.json").get("_class_name") or "StableDiffusionPipeline")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "load_lora_weights"):
        raise LoraError(f"{name} pipelines take no diffusers LoRA")
    extras = {"safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}
    scheduler = diffusers.DDIMScheduler.from_config(model.scheduler_config)
    parameters = inspect.signature(cls.__init__).parameters
    components = {
        key: (scheduler if key == "scheduler" else getattr(model, key, None) if key not in extras else extras[key])
        for key in parameters if key != "self" and parameters[key].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    }
    try:
        return cls(**components)
    except (TypeError, ValueError, AttributeError) as error:
        raise LoraError(f"cannot hold {model.model_id}'s networks in a {name} ({error})") from None


def load_with_lora(spec: str, lora: str, *, storage_options: dict[str, Any] | None = None, **options: Any) -> Any:
    """``load_model(spec, **options)`` with the LoRA ``lora`` fused in (``apply_lora``); what
    ``load_model(spec, lora=...)`` returns. Analytic models are refused before anything loads."""
    from olss_dist.models.loading import load_model

    if spec in ("analytic", "analytic-flow"):
        raise LoraError(f"the {spec} model has no network weights to adapt; use an image model")
    resolve_lora(lora, storage_options)  # a missing LoRA fails before the base model loads
    return apply_lora(load_model(spec, storage_options=storage_options, **options), lora, storage_options)
