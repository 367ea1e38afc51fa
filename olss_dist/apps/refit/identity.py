"""What a refit decides about: a model's weights digest and its calibration's identity.

The identity is ``CalibrationSpec.identity`` with the prompt file's digest (``olss_dist.prompts.spec_digest``),
the very config a job of that spec publishes, so a refit finds the run a job made and a job publishes
under the digest the refit looked for. The config needs neither Ray nor torch; the model digest hashes the
folder's files (``models.loading`` fetches a remote folder, and imports torch, so it is imported on use).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from olss_dist.apps.refit.registry import local_or_uri
from olss_dist.artifacts.layout import check_model_digest
from olss_dist.spec import CalibrationSpec


@dataclass(frozen=True)
class Target:
    """A model's calibration with its identity.

    Attributes:
        spec: what the job calibrates (``spec.model`` is the model's location; a local prompt file or LoRA
            is an absolute path).
        model_digest: ``content_digest`` of the model folder (with ``spec.lora``: ``lora_digest`` over it and the LoRA).
        config: ``spec.identity(prompts digest)``, the config a run of ``spec`` publishes.
        config_digest: sha256 of ``config`` (``spec.digest``).
    """

    spec: CalibrationSpec
    model_digest: str
    config: dict[str, Any]
    config_digest: str

    @property
    def model(self) -> str:
        """The model's id in the store: its location, with the LoRA's when there is one (``lora_model_id``)."""
        from olss_dist.models.lora import lora_model_id  # torch: only once a model is identified

        return lora_model_id(self.spec.model, self.spec.lora)

    def submission_id(self, attempt: int) -> str:
        """The Ray job id of ``attempt``: derived from the pair, so no record is needed to avoid a duplicate."""
        return f"olss-refit-{self.model_digest[:12]}-{self.config_digest[:12]}-{attempt}"


def model_digest(model: str, storage_options: dict[str, Any] | None = None, lora: str | None = None) -> str:
    """``content_digest`` of the diffusers folder at ``model`` (a URI is copied to the model cache first); with
    ``lora``, ``lora_digest`` of it and the LoRA file (fetched the same way), the digest a job of both publishes.

    Raises:
        ValueError: (``ModelLoadError``) nothing loadable at ``model`` or ``lora``; FileNotFoundError: not a
            diffusers folder.
    """
    from olss_dist.models.digest import content_digest, lora_digest
    from olss_dist.models.loading import local_folder  # imports torch: only when a model is identified

    from olss_dist.models.lora import builtin_folder, resolve_lora

    builtin = builtin_folder(model)  # the committed models' folders, as the job loads them
    base = content_digest(builtin if builtin is not None else local_folder(model, storage_options))
    return base if lora is None else lora_digest(base, resolve_lora(lora, storage_options))


def target_of(spec: CalibrationSpec, model_digest: str, storage_options: dict[str, Any] | None = None) -> Target:
    """``spec``'s target for the weights of ``model_digest``: its prompt file is made absolute (jobs run in
    another working directory) and read to digest its records."""
    from olss_dist.prompts import spec_digest  # pyarrow: only when a model is identified

    if spec.prompts:
        spec = replace(spec, prompts=local_or_uri(spec.prompts))
    if spec.lora:
        spec = replace(spec, lora=local_or_uri(spec.lora.removeprefix("file://")))
    config, digest = spec_digest(spec, storage_options)
    return Target(spec, check_model_digest(model_digest), config, digest)


def identify(spec: CalibrationSpec, storage_options: dict[str, Any] | None = None) -> Target:
    """The model's digest and calibration identity, exactly as a job of ``spec`` publishes them.

    Raises:
        ValueError, OSError, ArtifactError: the model or the prompt file cannot be read.
    """
    return target_of(spec, model_digest(spec.model, storage_options, spec.lora), storage_options)
