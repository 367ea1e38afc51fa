"""Content digest of a diffusers model folder (and of a base fused with a LoRA): the identity a calibration is valid for."""

from __future__ import annotations

import hashlib
from pathlib import Path

# Components whose files change what the guided denoiser returns. The VAE only decodes images and
# the safety checker / feature extractor only filter them, so retraining those needs no refit. SD3 and Flux
# folders denoise with a transformer/ and up to three text encoders and tokenizers.
SAMPLING_COMPONENTS = (
    "unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
    "scheduler",
)
SAMPLING_ROOT_FILES = ("model_index.json",)
CHUNK_BYTES = 1 << 20


def sampling_files(folder: str | Path) -> list[str]:
    """Sorted POSIX paths, relative to ``folder``, of the files that affect sampling.

    Raises:
        FileNotFoundError: ``folder`` holds none of them.
    """
    root = Path(folder)
    files = [name for name in SAMPLING_ROOT_FILES if (root / name).is_file()]
    for component in SAMPLING_COMPONENTS:
        directory = root / component
        if directory.is_dir():
            files += [p.relative_to(root).as_posix() for p in directory.rglob("*") if p.is_file()]
    if not files:
        raise FileNotFoundError(f"{root} holds none of {SAMPLING_ROOT_FILES + SAMPLING_COMPONENTS}")
    return sorted(files)


def content_digest(folder: str | Path) -> str:
    """sha256 hex digest over the relative paths and bytes of ``sampling_files(folder)``, streamed.

    Each file contributes its path, its size and its bytes (length-prefixed, so no two different
    folders hash the same stream). Files are read in 1 MiB chunks, so multi-GB UNets never sit in memory.
    """
    root = Path(folder)
    digest = hashlib.sha256()
    for relative in sampling_files(root):
        path = root / relative
        name = relative.encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name + path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


LORA_DIGEST_PREFIX = b"olss_dist.lora.v1\0"


def lora_digest(base_digest: str, lora_file: str | Path) -> str:
    """sha256 hex digest of a base model fused with a LoRA: the base's digest and the LoRA file's size and bytes.

    A different LoRA of the same base, the same LoRA over another base, or any changed byte of either is
    another digest; the LoRA file's name and location are not part of it (a copy in a cache is the same LoRA).
    """
    path = Path(lora_file)
    digest = hashlib.sha256(LORA_DIGEST_PREFIX)
    base = base_digest.encode("utf-8")
    digest.update(len(base).to_bytes(8, "little") + base + path.stat().st_size.to_bytes(8, "little"))
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
