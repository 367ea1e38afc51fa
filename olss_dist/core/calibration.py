"""Calibration statistics: the triangular factor of all teacher trajectories, and the fits made from it."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.numpy import save as save_safetensors
from safetensors.numpy import load as load_safetensors

from olss_dist.core.lstsq import solve_from_r
from olss_dist.core.plan import Plan
from olss_dist.core.path_search import SearchErrors, check_nodes, even_nodes, output_column, search_nodes, state_column
from olss_dist.core.teacher import check_model_timesteps
from olss_dist.core.tsqr import DEFAULT_CHUNK_ROWS, merge_r_factors, trajectory_r_factor

FORMAT = "olss_dist.core.calibration"
FORMAT_VERSION = 1
FINITE_CHECK_ELEMENTS = 1 << 20
"""Elements checked for NaN and Inf at a time (whole samples, at least one)."""


def as_tensor(array: Any) -> torch.Tensor:
    """``array`` as a torch tensor (numpy arrays and sequences are converted without copying where possible)."""
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))


def check_trajectories(states: torch.Tensor, noise_preds: torch.Tensor, num_teacher_steps: int) -> None:
    """Raise ValueError unless ``states (B, N+1, *shape)`` and ``noise_preds (B, N, *shape)`` are finite and match."""
    if states.ndim < 3:
        raise ValueError(f"states must be (B, N+1, *latent_shape), got shape {tuple(states.shape)}")
    expected = (states.shape[0], num_teacher_steps, *states.shape[2:])
    if states.shape[1] != num_teacher_steps + 1:
        raise ValueError(
            f"states has {states.shape[1]} states per sample, expected N+1 = {num_teacher_steps + 1} for {num_teacher_steps} timesteps"
        )
    if tuple(noise_preds.shape) != expected:
        raise ValueError(f"noise_preds must have shape {expected}, got {tuple(noise_preds.shape)}")
    if states.shape[0] == 0:
        raise ValueError("trajectories are empty (batch size 0)")
    # A few samples at a time: isfinite of the whole batch would allocate a batch-sized temporary.
    step = max(1, FINITE_CHECK_ELEMENTS // max(1, states[0].numel()))
    for name, tensor in (("states", states), ("noise_preds", noise_preds)):
        if not all(torch.isfinite(tensor[start : start + step]).all() for start in range(0, tensor.shape[0], step)):
            raise ValueError(f"{name} contain NaN or Inf")


class Calibration:
    """Exact least-squares statistics of teacher trajectories, independent of the sample count.

    Args:
        r_factor: ``(2N+1, 2N+1)`` float64 upper-triangular factor of the calibration matrix whose rows
            are latent elements of samples and whose columns are ``s_0, e_0, s_1, ..., e_{N-1}, s_N``.
        num_samples: trajectories behind ``r_factor``.
        num_rows: rows behind ``r_factor`` (samples x latent elements).
        timesteps: ``(N,)`` strictly decreasing model timesteps of the teacher: int64 train timesteps (VP)
            or float64 ``sigma * 1000`` (flow matching), kept in the dtype given (``check_model_timesteps``).
    """

    def __init__(self, r_factor: np.ndarray, num_samples: int, num_rows: int, timesteps: Any):
        self.timesteps = check_model_timesteps(timesteps)
        self.r_factor = np.ascontiguousarray(r_factor, dtype=np.float64)
        size = 2 * len(self.timesteps) + 1
        if self.r_factor.shape != (size, size):
            raise ValueError(f"r_factor must be ({size}, {size}) for {len(self.timesteps)} timesteps, got {self.r_factor.shape}")
        self.num_samples = int(num_samples)
        self.num_rows = int(num_rows)
        self._search_errors: SearchErrors | None = None

    @property
    def num_teacher_steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_trajectories(
        cls, states: Any, noise_preds: Any, timesteps: Any, chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> "Calibration":
        """Reduce trajectories to their R factor, streaming ``chunk_rows`` rows at a time.

        Args:
            states: ``(B, N+1, *shape)`` teacher states, numpy or torch (any device; the QR runs there).
            noise_preds: ``(B, N, *shape)`` guided outputs.
            timesteps: ``(N,)`` teacher timesteps.
            chunk_rows: rows per chunk; beside the trajectories the reduction holds R and one chunk,
                ``(2N+1 + max(chunk_rows, D)) * (2N+1)`` float64, whatever the sample count.
        """
        timesteps = check_model_timesteps(timesteps)
        states, noise_preds = as_tensor(states), as_tensor(noise_preds)
        check_trajectories(states, noise_preds, len(timesteps))
        r = trajectory_r_factor(states, noise_preds, chunk_rows)
        return cls(r.cpu().numpy(), states.shape[0], states[:, 0].numel(), timesteps)

    @classmethod
    def merge(cls, calibrations: Sequence["Calibration"]) -> "Calibration":
        """Statistics of the union of the samples behind ``calibrations`` (order does not matter)."""
        if len(calibrations) == 0:
            raise ValueError("Calibration.merge needs at least one calibration")
        first = calibrations[0]
        for other in calibrations[1:]:
            if not np.array_equal(other.timesteps, first.timesteps):
                raise ValueError("cannot merge calibrations with different teacher timesteps")
        return cls(
            merge_r_factors([c.r_factor for c in calibrations]),
            sum(c.num_samples for c in calibrations),
            sum(c.num_rows for c in calibrations),
            first.timesteps,
        )

    def fit(self, nodes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced OLSS fit of a path (the paper's coefficients).

        Step ``i`` fits ``s_{nodes[i+1]}`` (``s_N`` after the last node) on ``[x_T, e_{nodes[0]}, ..., e_{nodes[i]}]``.

        Returns:
            coefficients ``(K, K+1)`` and step_errors ``(K,)``: mean squared error per element.
        """
        return self._fit(check_nodes(nodes, self.num_teacher_steps))

    def fit_start(self, plan_nodes: Sequence[int], start_step: int) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced fit of the path ``plan_nodes`` started mid-way at its index ``start_step`` (img2img).

        The sampler starts from the teacher state ``s_{n_s}`` (``n_s = plan_nodes[start_step]``), which takes
        the place of ``x_T``: step ``r`` fits ``s_{n_{s+r+1}}`` (``s_N`` after the last node) on
        ``[s_{n_s}, e_{n_s}, ..., e_{n_{s+r}}]``. R holds every state column, so this is the same small
        least squares as ``fit`` (../shared/MATH.md, "Starting mid-way").

        Args:
            plan_nodes: the K nodes of the start-0 path (strictly increasing from 0).
            start_step: ``s`` in ``[0, K)``.

        Returns:
            coefficients ``(K-s, K-s+1)`` over ``[x_start, o_s, ...]`` and step_errors ``(K-s,)``.
        """
        nodes = check_nodes(plan_nodes, self.num_teacher_steps)
        integer = isinstance(start_step, (int, np.integer)) and not isinstance(start_step, bool)
        if not integer or not 0 <= start_step < len(nodes):
            raise ValueError(f"start_step must be an integer in [0, {len(nodes)}), got {start_step!r}")
        return self._fit(nodes[int(start_step):])

    def _fit(self, nodes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Fits of ``fit`` on checked ``nodes`` whose first node's state is the start (``x_T`` when it is 0)."""
        targets = nodes[1:] + [self.num_teacher_steps]
        coefficients = np.zeros((len(nodes), len(nodes) + 1))
        step_errors = np.zeros(len(nodes))
        for i, target in enumerate(targets):
            features = [state_column(nodes[0])] + [output_column(n) for n in nodes[: i + 1]]
            weights, residual = solve_from_r(self.r_factor, features, [state_column(target)])
            coefficients[i, : i + 2] = weights[:, 0]
            step_errors[i] = residual[0] / self.num_rows
        return coefficients, step_errors

    def memoised_search_errors(self) -> SearchErrors:
        """The search errors on this R, built once and shared by every search and plan made from it
        (their values do not depend on the order they were asked for in)."""
        if self._search_errors is None:
            self._search_errors = SearchErrors(self.r_factor, self.num_rows)
        return self._search_errors

    def search_errors(self, nodes: Sequence[int]) -> np.ndarray:
        """``(K,)`` local search errors of the path ``nodes`` (see ``olss_dist.core.path_search``)."""
        return self.memoised_search_errors().along(check_nodes(nodes, self.num_teacher_steps))

    def plan_for_nodes(self, nodes: Sequence[int], spacing: str) -> Plan:
        """Teacher-forced plan on given nodes."""
        nodes = check_nodes(nodes, self.num_teacher_steps)
        coefficients, step_errors = self.fit(nodes)
        return Plan(
            nodes=nodes,
            timesteps=self.timesteps[nodes],
            coefficients=coefficients,
            step_errors=step_errors,
            search_errors=self.search_errors(nodes),
            fit="teacher_forced",
            spacing=spacing,
            num_teacher_steps=self.num_teacher_steps,
        )

    def plan(self, num_steps: int) -> Plan:
        """Minimax path of exactly ``num_steps`` nodes with its teacher-forced coefficients."""
        nodes, _ = search_nodes(self.memoised_search_errors(), int(num_steps))
        return self.plan_for_searched_nodes(nodes)

    def plan_for_searched_nodes(self, nodes: list[int]) -> Plan:
        """``plan_for_nodes`` for the path a search returned: ``"uniform"`` when it kept even spacing
        (never worse than the minimax path), else ``"minimax"``."""
        spacing = "uniform" if nodes == even_nodes(self.num_teacher_steps, len(nodes)) else "minimax"
        return self.plan_for_nodes(nodes, spacing)

    def to_bytes(self) -> bytes:
        """safetensors bytes: tensors ``r_factor`` and ``timesteps`` (int64 VP / float64 flow: the dtype
        says which, so files written before flow support load unchanged), counts in the JSON metadata."""
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "num_samples": str(self.num_samples),
            "num_rows": str(self.num_rows),
        }
        return save_safetensors({"r_factor": self.r_factor, "timesteps": self.timesteps}, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Calibration":
        metadata = safetensors_metadata(data)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"not an olss_dist calibration (format {metadata.get('format')!r})")
        tensors = load_safetensors(data)
        return cls(tensors["r_factor"], int(metadata["num_samples"]), int(metadata["num_rows"]), tensors["timesteps"])

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        return cls.from_bytes(Path(path).read_bytes())


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob, read from its JSON header."""
    if len(data) < 8:
        raise ValueError("truncated safetensors data")
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    return header.get("__metadata__", {})
