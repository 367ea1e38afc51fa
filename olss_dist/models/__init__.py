"""Model adapters: every model the calibration can run on implements ``DiffusionModel``."""

from olss_dist.models.base import DiffusionModel
from olss_dist.models.common import ModelLoadError, TextConditioning
from olss_dist.models.digest import content_digest
from olss_dist.models.flux import FluxModel
from olss_dist.models.loading import load_model
from olss_dist.models.sd3 import StableDiffusion3Model
from olss_dist.models.stable_diffusion import StableDiffusionModel

__all__ = [
    "DiffusionModel", "FluxModel", "ModelLoadError", "StableDiffusion3Model", "StableDiffusionModel", "TextConditioning",
    "content_digest", "load_model",
]
