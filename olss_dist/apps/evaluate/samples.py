"""Held-out samples of an evaluation: seeds from the evaluation's own hash domain, prompts, initial noise.

Seeds never come from the calibration's ``derive_seed`` (``olss_dist.prompts``), and every calibration
seed the run lets us rebuild is excluded (``published.calibration_seeds``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

EVALUATION_SEED_DOMAIN = "olss-dist/evaluate"
SEED_MODULUS = 2**32


@dataclass
class EvaluationSet:
    """Held-out samples: prompt, seed and initial noise of each, and the model's conditioning.

    Attributes:
        prompts: ``(B,)`` prompts; ``negative_prompts`` the same length (``""``: none).
        seeds: ``(B,)`` seeds of the initial noise.
        x_T: ``(B, *latent_shape)`` initial noise.
        cond: conditioning indexable along B.
    """

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    x_T: torch.Tensor
    cond: Any

    def __len__(self) -> int:
        return len(self.seeds)


def evaluation_seeds(num_samples: int, seed_offset: int = 0, exclude: Sequence[int] = ()) -> list[int]:
    """``num_samples`` seeds in ``[0, 2**32)`` from the evaluation's own hash domain.

    Seed ``j`` hashes ``(EVALUATION_SEED_DOMAIN, seed_offset, j)``; calibration seeds hash a different
    string (``olss_dist.prompts.derive_seed``). Seeds in ``exclude`` (or repeated) are skipped, so the
    result never meets a known calibration seed. Different ``seed_offset`` values give independent sets.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    excluded, seeds, index = set(int(s) for s in exclude), [], 0
    while len(seeds) < num_samples:
        digest = hashlib.sha256(f"{EVALUATION_SEED_DOMAIN}\x00{seed_offset}\x00{index}".encode()).digest()
        seed = int.from_bytes(digest[:8], "big") % SEED_MODULUS
        if seed not in excluded:
            seeds.append(seed)
            excluded.add(seed)
        index += 1
    return seeds


def evaluation_set(
    model,
    num_samples: int,
    prompts: Sequence[str] | None = None,
    negative_prompts: Sequence[str] | None = None,
    seed_offset: int = 0,
    exclude_seeds: Sequence[int] = (),
) -> EvaluationSet:
    """``num_samples`` held-out samples: prompts cycled from ``prompts`` (default: the model's), fresh seeds.

    Args:
        model: a ``DiffusionModel`` (``encode_prompts``, ``initial_noise``, ``default_prompts``).
        negative_prompts: one per prompt in ``prompts`` (cycled with them); ``None``: no negative prompts.
    """
    prompts = list(prompts) if prompts is not None else model.default_prompts()
    if not prompts:
        raise ValueError("no evaluation prompts")
    negatives = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    seeds = evaluation_seeds(num_samples, seed_offset, exclude_seeds)
    chosen = [prompts[i % len(prompts)] for i in range(num_samples)]
    chosen_negatives = [negatives[i % len(prompts)] for i in range(num_samples)]
    cond = model.encode_prompts(chosen, chosen_negatives if any(chosen_negatives) else None)
    return EvaluationSet(chosen, chosen_negatives, seeds, model.initial_noise(seeds), cond)
