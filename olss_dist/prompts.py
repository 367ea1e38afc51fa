"""Calibration prompts: reading them, giving each a deterministic seed, holding some out, sharding.

Prompts come from a Parquet file (column ``prompt``; optional ``negative_prompt`` and ``seed``), read
with pyarrow, or from a text file with one prompt per line, at a local path or any fsspec URI. Every
prompt gets a seed that depends only on its position, its text and the run's base seed, so any shard
can be recomputed bit for bit on any worker. The held-out (validation) part is chosen by hashing,
not by position, and is the same on every rerun.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from olss_dist.artifacts.errors import ArtifactError, storage_errors
from olss_dist.artifacts.layout import config_digest
from olss_dist.artifacts.stores import open_store, parent_uri
from olss_dist.spec import CalibrationSpec

PARQUET_SUFFIXES = (".parquet", ".pq")
SEED_MODULUS = 2**32


@dataclass(frozen=True)
class PromptRecord:
    """One calibration sample.

    Attributes:
        index: position of the prompt in the source (0-based), its identity in shards and checkpoints.
        prompt: the text prompt.
        negative_prompt: classifier-free guidance negative prompt; ``""`` means none.
        seed: seed of the sample's initial noise, in ``[0, 2**32)``.
    """

    index: int
    prompt: str
    negative_prompt: str
    seed: int


@dataclass(frozen=True)
class Shard:
    """A unit of work: consecutive fit records, computed and checkpointed together.

    Attributes:
        shard_id: position of the shard in the run (0-based).
        records: the samples of the shard, in order.
    """

    shard_id: int
    records: tuple[PromptRecord, ...]

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    @property
    def negative_prompts(self) -> list[str]:
        return [r.negative_prompt for r in self.records]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.records]

    def digest(self) -> str:
        """sha256 of the shard's content (indices, prompts, negative prompts, seeds)."""
        return _sha256_hex(repr([(r.index, r.prompt, r.negative_prompt, r.seed) for r in self.records]))


def derive_seed(index: int, prompt: str, base_seed: int) -> int:
    """Deterministic seed in ``[0, 2**32)`` for the prompt at ``index``: a hash, stable across runs and hosts."""
    digest = hashlib.sha256(f"{base_seed}\x00{index}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def records_from_prompts(
    prompts: Sequence[str],
    *,
    negative_prompts: Sequence[str | None] | None = None,
    seeds: Sequence[int | None] | None = None,
    base_seed: int = 0,
) -> list[PromptRecord]:
    """Numbered records; a missing seed (``None``) is derived with :func:`derive_seed`.

    Raises:
        ValueError: on no prompts, an empty prompt, mismatched lengths or a seed outside ``[0, 2**32)``.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts: the prompt source is empty")
    negative_prompts = [None] * len(prompts) if negative_prompts is None else list(negative_prompts)
    seeds = [None] * len(prompts) if seeds is None else list(seeds)
    if not len(negative_prompts) == len(seeds) == len(prompts):
        raise ValueError(
            f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts and {len(seeds)} seeds"
        )
    records = []
    for index, (prompt, negative, seed) in enumerate(zip(prompts, negative_prompts, seeds)):
        if prompt is None or not str(prompt).strip():
            raise ValueError(f"prompt {index} is empty")
        if seed is not None and not 0 <= int(seed) < SEED_MODULUS:
            raise ValueError(f"seed {seed} of prompt {index} is outside [0, 2**32)")
        records.append(
            PromptRecord(
                index=index,
                prompt=str(prompt),
                negative_prompt="" if negative is None else str(negative),
                seed=derive_seed(index, str(prompt), base_seed) if seed is None else int(seed),
            )
        )
    return records


def read_prompts(
    source: str | None,
    *,
    default_prompts: Sequence[str] | None = None,
    base_seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> list[PromptRecord]:
    """Prompt records from a Parquet or text file (local path or fsspec URI), or the default list.

    Args:
        source: ``*.parquet``/``*.pq`` (columns ``prompt``, optional ``negative_prompt``, ``seed``) or
            a text file with one prompt per line (blank lines skipped); ``None`` uses ``default_prompts``.
        default_prompts: the prompts used when ``source`` is ``None`` (usually the model's own).
        base_seed: mixed into every derived seed; explicit seeds in a Parquet file are kept as given.
        storage_options: passed to fsspec (credentials, endpoint) for remote URIs.

    Raises:
        ValueError: no prompts, an unreadable or missing file, or a Parquet file without ``prompt``.
    """
    if source is None:
        if not default_prompts:
            raise ValueError("no prompts: pass a prompt file, the model has no default prompts")
        return records_from_prompts(list(default_prompts), base_seed=base_seed)
    data = _read_bytes(source, storage_options or {})
    if source.lower().endswith(PARQUET_SUFFIXES):
        return _records_from_parquet(data, source, base_seed)
    lines = [line.strip() for line in data.decode("utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"no prompts: {source} has no non-blank lines")
    return records_from_prompts(prompts, base_seed=base_seed)


def _read_bytes(uri: str, storage_options: dict[str, Any]) -> bytes:
    """The file's bytes through the artifact store layer (its timeouts and retries, its error mapping)."""
    name = uri.rstrip("/").rpartition("/")[2]
    try:
        with storage_errors("cannot read prompts from", uri):
            return open_store(parent_uri(uri), storage_options).read(name)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise ValueError(f"cannot read prompts from {uri}: {error}") from error
    except ArtifactError as error:
        raise ValueError(str(error)) from error


def prompts_digest(records: Sequence[PromptRecord]) -> str:
    """sha256 of the records' indices, prompts, negative prompts and seeds (part of a calibration's identity)."""
    return config_digest({"prompts": [[r.index, r.prompt, r.negative_prompt, r.seed] for r in records]})


def spec_prompt_records(spec: CalibrationSpec, storage_options: dict[str, Any] | None = None) -> list[PromptRecord] | None:
    """The records of ``spec.prompts``; ``None`` when the spec uses the model's default prompts."""
    if not spec.prompts:
        return None
    return read_prompts(spec.prompts, base_seed=spec.seed, storage_options=storage_options)


def spec_digest(spec: CalibrationSpec, storage_options: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """``spec``'s registry identity and its digest, with its prompt file read to digest the records."""
    records = spec_prompt_records(spec, storage_options)
    digest = None if records is None else prompts_digest(records)
    return spec.identity(digest), spec.digest(digest)


def _records_from_parquet(data: bytes, source: str, base_seed: int) -> list[PromptRecord]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except pa.ArrowException as error:
        raise ValueError(f"{source} is not a readable Parquet file: {error}") from error
    if "prompt" not in table.column_names:
        raise ValueError(f"{source} has no 'prompt' column (columns: {table.column_names})")
    if table.num_rows == 0:
        raise ValueError(f"no prompts: {source} has no rows")

    def optional_column(name: str) -> list | None:
        return table.column(name).to_pylist() if name in table.column_names else None

    return records_from_prompts(
        table.column("prompt").to_pylist(),
        negative_prompts=optional_column("negative_prompt"),
        seeds=optional_column("seed"),
        base_seed=base_seed,
    )


def split_validation(
    records: Sequence[PromptRecord], fraction: float, *, base_seed: int = 0
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Split into ``(fit, validation)``; each keeps source order.

    ``round(fraction * n)`` records (at least one when ``fraction > 0``) go to validation, chosen by
    the smallest hash of (base seed, index, seed): the same records on every rerun, spread over the
    whole source rather than its tail.

    Raises:
        ValueError: if ``fraction`` is outside ``[0, 1)`` or no record would be left to fit.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    num_validation = 0 if fraction == 0 else max(1, round(fraction * len(records)))
    if num_validation >= len(records):
        raise ValueError(
            f"validation fraction {fraction} of {len(records)} prompts leaves no prompt to fit; add prompts"
        )
    ranked = sorted(records, key=lambda r: _sha256_hex(f"validation\x00{base_seed}\x00{r.index}\x00{r.seed}"))
    held_out = {r.index for r in ranked[:num_validation]}
    fit = [r for r in records if r.index not in held_out]
    validation = [r for r in records if r.index in held_out]
    return fit, validation


def screen_records(records: Sequence[PromptRecord], count: int, base_seed: int = 0) -> list[PromptRecord]:
    """``count`` samples of the tail screen (``olss_dist.method.screen``): the ``records``' prompts cycled, each
    with a fresh seed (a hash in the screen's own domain, so never a calibration or evaluation seed by design),
    numbered ``0..count-1``."""
    if count < 0:
        raise ValueError(f"screen samples must be at least 0, got {count}")
    if count and not records:
        raise ValueError("no prompts to draw screen samples from")
    chosen = [records[i % len(records)] for i in range(count)]
    return [
        PromptRecord(i, r.prompt, r.negative_prompt, derive_seed(i, f"screen\x00{r.index}\x00{r.prompt}", base_seed))
        for i, r in enumerate(chosen)
    ]


def make_shards(records: Sequence[PromptRecord], shard_size: int) -> list[Shard]:
    """Consecutive shards of ``shard_size`` records (the last may be smaller).

    Raises:
        ValueError: on no records or ``shard_size < 1``.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    if not records:
        raise ValueError("no prompts to shard")
    num_shards = math.ceil(len(records) / shard_size)
    return [
        Shard(shard_id=i, records=tuple(records[i * shard_size : (i + 1) * shard_size])) for i in range(num_shards)
    ]


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
