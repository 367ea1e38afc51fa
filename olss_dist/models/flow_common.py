"""What the SD3 and Flux transformer adapters share: the flow scheduler, the dynamic shift ``mu``, the state
every flow adapter holds (``FlowTransformerModel``) and the last step of their ``from_folder``."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable, Sequence

from olss_dist.models.base import DiffusionModel
from olss_dist.models.common import GENERIC_PROMPTS, FolderLoad, ModelLoadError, load_vae
from olss_dist.models.digest import content_digest


def flow_scheduler(scheduler_config: dict[str, Any], where: Path):
    """``FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)``; ``ModelLoadError`` for another scheduler class."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    name = str(scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler"))
    if not name.startswith("FlowMatch"):
        raise ModelLoadError(f"{where}: scheduler {name!r} is not a flow-matching scheduler (FlowMatchEulerDiscreteScheduler)")
    return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)


def dynamic_shift(
    scheduler: Any, image_seq_len: int, calculate_shift: Callable[..., float], max_shift: float
) -> float:
    """``mu`` of ``image_seq_len`` image tokens as a pipeline's ``calculate_shift`` gives it from the scheduler config.

    Args:
        scheduler: the pipeline's ``scheduler.config`` (diffusers' defaults filled in, as the pipeline reads it).
        image_seq_len: transformer image tokens (patches) per sample.
        calculate_shift: the pipeline module's own ``calculate_shift``.
        max_shift: the pipeline's fallback ``max_shift`` where the config has none (SD3 1.16, Flux 1.15; the
            scheduler's own default, filled into ``scheduler.config``, wins over both).
    """
    return float(
        calculate_shift(
            image_seq_len,
            scheduler.get("base_image_seq_len", 256),
            scheduler.get("max_image_seq_len", 4096),
            scheduler.get("base_shift", 0.5),
            scheduler.get("max_shift", max_shift),
        )
    )


class FlowTransformerModel(DiffusionModel):
    """A diffusers flow-matching transformer pipeline (``vae=None``) as a velocity at the timestep ``σ·1000``.

    Holds what SD3 and Flux hold alike: the folder (for the lazily loaded VAE), the pipeline and its
    transformer, the scheduler config, ids, guidance scale, T5 length, device and dtype (the transformer's),
    and the default prompts. A subclass lays out its latents in ``set_latent_layout``.

    Args:
        folder: the diffusers folder.
        pipeline: the diffusers pipeline holding the transformer, text encoders and tokenizers (``vae=None``).
        scheduler_config: the folder's ``scheduler/scheduler_config.json``.
        resolution: ``(height, width)`` in pixels (or an int, square) the model is calibrated at.
        model_id: the spec the model was loaded from.
        digest: ``content_digest(folder)``.
        guidance_scale: the guidance scale.
        prompts: default prompts; ``None`` uses a generic list of 24.
        max_sequence_length: T5 tokens (the pipeline's ``max_sequence_length``).
        vae_scale: the VAE's down-sampling factor (``vae_scale_factor(folder)``).
    """

    def __init__(
        self,
        folder: Path,
        pipeline: Any,
        scheduler_config: dict[str, Any],
        resolution: Any,
        *,
        model_id: str,
        digest: str,
        guidance_scale: float,
        prompts: Sequence[str] | None,
        max_sequence_length: int,
        vae_scale: int,
    ):
        self.folder = Path(folder)
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.scheduler_config = dict(scheduler_config)
        self.model_id = model_id
        self.digest = digest
        self.guidance_scale = float(guidance_scale)
        self.prediction_type = "flow_prediction"
        self.alphas_cumprod = None
        self.max_sequence_length = int(max_sequence_length)
        self.device = self.transformer.device
        self.dtype = self.transformer.dtype
        self.mu = self.set_latent_layout(resolution, vae_scale)
        self.prompts = list(prompts) if prompts is not None else list(GENERIC_PROMPTS)
        self.vae = None

    @abstractmethod
    def set_latent_layout(self, resolution: Any, vae_scale: int) -> float | None:
        """Set ``resolution`` (checked pixels) and ``latent_shape`` (and what follows from them); return ``mu``.

        Raises:
            ModelLoadError: the resolution is not one the transformer takes.
        """

    @classmethod
    def from_pipeline(
        cls,
        load: FolderLoad,
        pipeline: Any,
        resolution: Any,
        *,
        model_id: str | None,
        guidance_scale: float,
        prompts: Sequence[str] | None,
        max_sequence_length: int,
        vae_scale: int,
    ) -> "FlowTransformerModel":
        """The model of a loaded folder's ``pipeline``; ``model_id`` defaults to the folder, the digest is its content's."""
        return cls(
            load.folder,
            pipeline,
            load.scheduler_config,
            resolution,
            model_id=model_id or str(load.folder),
            digest=content_digest(load.folder),
            guidance_scale=guidance_scale,
            prompts=prompts,
            max_sequence_length=max_sequence_length,
            vae_scale=vae_scale,
        )

    def default_prompts(self) -> list[str]:
        return list(self.prompts)

    def load_vae(self) -> Any:
        """The folder's ``AutoencoderKL`` in fp32 on ``self.device``, loaded on first use."""
        if self.vae is None:
            self.vae = load_vae(self.folder, self.device)
        return self.vae
