"""olss_dist: distributed OLSS calibration of fast diffusion schedulers.

The public names are imported lazily, so light modules (``olss_dist.artifacts``, the CLI) start without
loading torch and diffusers.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "Calibration": "olss_dist.core.calibration",
    "OLSSScheduler": "olss_dist.scheduler",
    "Plan": "olss_dist.core.plan",
    "calibrate": "olss_dist.method.run",
    "fit_on_policy": "olss_dist.core.onpolicy",
    "record_trajectories": "olss_dist.core.teacher",
    "trailing_timesteps": "olss_dist.core.teacher",
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'olss_dist' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return __all__
