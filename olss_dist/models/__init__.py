"""Model adapters: every model the calibration can run on implements ``DiffusionModel``."""

from olss_dist.models.base import DiffusionModel

__all__ = ["DiffusionModel"]
