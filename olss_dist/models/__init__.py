"""Model adapters: every model the calibration can run on implements ``DiffusionModel``."""

from olss_dist.models.base import DiffusionModel
from olss_dist.models.digest import content_digest
from olss_dist.models.loading import ModelLoadError, load_model
from olss_dist.models.stable_diffusion import StableDiffusionModel

__all__ = ["DiffusionModel", "ModelLoadError", "StableDiffusionModel", "content_digest", "load_model"]
