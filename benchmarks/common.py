"""Shared setup of the benchmark scripts: pinned thread counts and a description of the machine.

Import this before numpy or torch: OpenBLAS reads its thread count when it loads. On a small machine
shared with other work, one thread per library gives timings that can be repeated; set
``OMP_NUM_THREADS`` (used for every library) to measure something else.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time
from typing import Callable, TypeVar

T = TypeVar("T")

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads() -> int:
    """Use ``$OMP_NUM_THREADS`` (default 1) threads in BLAS and torch; returns the count."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))
    import torch

    torch.set_num_threads(threads)
    return threads


def describe_machine() -> str:
    """One line: CPU model, logical CPUs, threads used, load average (the machine may be shared), versions."""
    import numpy
    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown CPU")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{model}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} thread(s) used, load average {load}; "
            f"python {platform.python_version()}, numpy {numpy.__version__}, torch {torch.__version__}")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measured(function: Callable[[], T]) -> tuple[T, float, int]:
    """``(result, wall seconds, peak resident bytes above the start)`` of one call of ``function``.

    Linux only: memory freed earlier is handed back to the system first (``malloc_trim``) and the
    peak resident set is reset (``/proc/self/clear_refs``), so the peak counts what ``function``
    itself held at its worst, numpy, torch and LAPACK alike, and not what was resident before.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    start_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    return result, seconds, max(_status_kib("VmHWM") - start_kib, 0) * 1024
