"""What the diffusers adapters share: devices and dtypes, config reading, folder loading, prompts, text
conditioning, decoding."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

GENERIC_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk",
    "a bowl of ramen on a wooden table, studio lighting",
    "a red fox in a snowy forest, telephoto",
    "an isometric illustration of a small city block",
    "a portrait of an old fisherman, oil painting",
    "a futuristic car parked in a neon-lit alley",
    "a field of sunflowers under a stormy sky",
    "a cozy reading nook with a cat asleep on a blanket",
    "a mountain lake reflecting snowy peaks at sunrise",
    "a steampunk airship above the clouds",
    "macro photograph of a dew drop on a leaf",
    "a medieval castle on a cliff, dramatic lighting",
    "a plate of colorful macarons, pastel background",
    "an underwater coral reef with tropical fish",
    "a pencil sketch of a sleeping dog",
    "a busy street market in the rain at night",
    "a minimalist poster of a mountain and the sun",
    "a golden retriever puppy playing in autumn leaves",
    "a robot painting a canvas in an art studio",
    "a desert canyon at golden hour, wide angle",
    "a vase of tulips on a windowsill, morning light",
    "an ancient library with towering bookshelves",
    "a hot air balloon over green rolling hills",
)


class ModelLoadError(ValueError):
    """A model spec could not be turned into a model; the message names the spec and what was tried."""


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 UNet and text encoder on CUDA, fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a clear ``ModelLoadError`` when it is missing or malformed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error


def read_model_index(folder: Path) -> dict[str, Any]:
    """The folder's ``model_index.json``; ``ModelLoadError`` when the folder does not exist or the file is unreadable."""
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    return read_json(folder / "model_index.json")


@dataclass(frozen=True)
class FolderLoad:
    """A checked local diffusers folder with what every adapter loads it with (see ``open_folder``).

    Attributes:
        folder: the folder, ``~`` expanded.
        index: its ``model_index.json``.
        device: where the modules go.
        dtype: the weights' dtype.
        scheduler_config: its ``scheduler/scheduler_config.json``, as saved (no diffusers defaults filled in).
    """

    folder: Path
    index: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    scheduler_config: dict[str, Any]

    def diffusers_module(self, module_class: Any, subfolder: str) -> Any:
        """``module_class.from_pretrained`` (a diffusers model) of ``subfolder`` in ``dtype``, safetensors only."""
        return module_class.from_pretrained(self.folder, subfolder=subfolder, torch_dtype=self.dtype, use_safetensors=True)

    def transformers_module(self, module_class: Any, subfolder: str) -> Any:
        """``module_class.from_pretrained`` (a transformers model) of ``subfolder`` in ``dtype``, safetensors only."""
        return module_class.from_pretrained(self.folder, subfolder=subfolder, dtype=self.dtype, use_safetensors=True)

    def frozen(self, module: Any) -> Any:
        """``module`` on ``device`` in eval mode without gradients."""
        return module.to(self.device).eval().requires_grad_(False)

    @contextmanager
    def load_errors(self) -> Iterator[None]:
        """Turns what ``from_pretrained`` raises on a broken folder (OSError, ValueError, KeyError) into a ModelLoadError."""
        try:
            yield
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot load the diffusers model in {self.folder}: {error}") from error


def open_folder(
    folder: str | Path,
    check: Callable[[Path, dict[str, Any]], None],
    device: str | torch.device | None,
    torch_dtype: torch.dtype | None,
    dtype_for: Callable[[torch.device], torch.dtype] = default_dtype,
) -> FolderLoad:
    """The first steps of every adapter's ``from_folder``: the folder checked, its device, dtype and scheduler config.

    Args:
        folder: a local diffusers folder (``~`` expanded).
        check: ``check(folder, index)`` raises ``ModelLoadError`` unless the folder is one the adapter loads.
        device: where to load; default ``default_device()``.
        torch_dtype: the weights' dtype; default ``dtype_for(device)``.
        dtype_for: the adapter's default dtype on a device.

    Raises:
        ModelLoadError: the folder is missing, fails ``check``, or its index or scheduler config is unreadable.
    """
    folder = Path(folder).expanduser()
    index = read_model_index(folder)
    check(folder, index)
    device = torch.device(device) if device is not None else default_device()
    dtype = torch_dtype or dtype_for(device)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    return FolderLoad(folder, index, device, dtype, scheduler_config)


def check_prompt_lists(prompts: Sequence[str], negative_prompts: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """``(prompts, negatives)`` as lists of equal length, negatives ``""`` by default; ValueError otherwise."""
    if isinstance(prompts, str) or isinstance(negative_prompts, str):
        raise ValueError("prompts and negative_prompts must be sequences of strings, not one string")
    prompts = list(prompts)
    negatives = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    return prompts, negatives


def vae_scale_factor(folder: Path) -> int:
    """``2 ** (len(block_out_channels) - 1)`` of ``vae/config.json``, as diffusers pipelines compute it; 8 without a VAE."""
    config = folder / "vae" / "config.json"
    if not config.is_file():
        return 8  # what StableDiffusion3Pipeline and FluxPipeline assume without a VAE
    return 2 ** (len(read_json(config)["block_out_channels"]) - 1)


def parse_resolution(resolution: Any, multiple: int, where: str) -> tuple[int, int]:
    """``(height, width)`` in pixels from an int (square) or a pair, each a positive multiple of ``multiple``.

    Raises:
        ModelLoadError: one line naming ``resolution``, what was given and what the model takes.
    """
    pair = (resolution, resolution) if isinstance(resolution, int) and not isinstance(resolution, bool) else resolution
    try:
        height, width = pair
        valid = all(isinstance(v, int) and not isinstance(v, bool) for v in (height, width))
    except (TypeError, ValueError):
        valid = False
    if not valid or height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ModelLoadError(
            f"resolution: {where} takes a positive multiple of {multiple} pixels (an int, or (height, width)), "
            f"got {resolution!r}"
        )
    return int(height), int(width)


@dataclass(frozen=True)
class TextConditioning:
    """Prompt embeddings of a batch of samples, indexable along the batch like a tensor.

    Attributes:
        embeddings: ``(B, 2, L, D)`` per-token embeddings (``[:, 0]`` negative, ``[:, 1]`` the prompt) for
            classifier-free-guided models, ``(B, L, D)`` for guidance-distilled ones.
        pooled: ``(B, 2, P)`` or ``(B, P)`` pooled embeddings, laid out as ``embeddings``.
    """

    embeddings: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, rows: Any) -> "TextConditioning":
        return TextConditioning(self.embeddings[rows], self.pooled[rows])

    def to(self, *args: Any, **kwargs: Any) -> "TextConditioning":
        """Both tensors moved / cast as ``torch.Tensor.to`` does."""
        return TextConditioning(self.embeddings.to(*args, **kwargs), self.pooled.to(*args, **kwargs))


def guided_pooled_output(
    network, x: torch.Tensor, t: Any, cond: TextConditioning, guidance_scale: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``y_u + s (y_c − y_u)`` in float32 on ``device`` from one ``network(sample, t, embeddings, pooled)`` call on
    ``[x; x]``; ``y_c`` alone for ``s ≤ 1`` (the SDXL and SD3 pipelines guide only when ``guidance_scale > 1``)."""
    sample = x.to(device, dtype)
    embeddings = cond.embeddings.to(device, dtype)
    pooled = cond.pooled.to(device, dtype)
    if guidance_scale <= 1.0:
        return network(sample, t, embeddings[:, 1], pooled[:, 1]).float()
    both = network(
        torch.cat([sample, sample]), t,
        torch.cat([embeddings[:, 0], embeddings[:, 1]]), torch.cat([pooled[:, 0], pooled[:, 1]]),
    ).float()
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def encode_distinct(texts: list[str], encode, batch_size: int = 64) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Each distinct string of ``texts`` through ``encode(chunk) -> tuple of (n, ...) tensors`` once, in chunks.

    Returns:
        ``(tensors, row)``: each of ``encode``'s outputs concatenated over the distinct strings, and the row
        of each string in them.
    """
    distinct = list(dict.fromkeys(texts))
    chunks = [encode(distinct[start : start + batch_size]) for start in range(0, len(distinct), batch_size)]
    tensors = [torch.cat(parts) for parts in zip(*chunks)]
    return tensors, {text: i for i, text in enumerate(distinct)}


def load_vae(folder: Path, device: torch.device):
    """The folder's ``AutoencoderKL`` in fp32 on ``device`` (safetensors only), in eval mode."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the VAE of {folder}: {error}") from error
    return vae.to(device).eval().requires_grad_(False)


def pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 of VAE output ``pixels (B, C, H, W)`` in [-1, 1] (clamped; one channel repeated)."""
    pixels = pixels.clamp(-1.0, 1.0)
    pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
    return ((pixels + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 images of ``latents (B, C, h, w)`` in the model's scaled latent space.

    ``z = latents / scaling_factor + shift_factor`` (no shift where the VAE has none, as SD 1.x/2.x), decoded
    in fp32 in chunks of ``batch_size``.
    """
    shift = vae.config.get("shift_factor", None) or 0.0
    images = []
    for start in range(0, len(latents), batch_size):
        z = latents[start : start + batch_size].to(vae.device, torch.float32) / vae.config.scaling_factor
        if shift:
            z = z + shift
        images.append(pixels_to_uint8(vae.decode(z).sample))
    return np.concatenate(images)


def index_has_component(index: dict[str, Any], name: str) -> bool:
    """True when ``model_index.json`` names a (non-null) component ``name``; ``[null, null]`` means "saved without"."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def check_components(
    folder: Path, index: dict[str, Any], required: Sequence[str], optional: Sequence[str], family: str
) -> None:
    """``ModelLoadError`` unless ``folder`` has each required component, and each optional one it names.

    An optional component (the T5 encoder of SD3) may be saved as null in ``model_index.json``; one that
    the index names but the folder lacks is an error, since the model would sample differently without it.
    """
    needed = list(required) + [name for name in optional if index_has_component(index, name)]
    missing = [name for name in needed if not (folder / name).is_dir()]
    if missing:
        raise ModelLoadError(f"{folder} is not a complete diffusers {family} folder: no {', '.join(n + '/' for n in missing)}")
