"""``OLSSScheduler`` outside the conditions its plans were calibrated under (issue 16 §2).

The job's scheduler files (``model_scheduler_files``, the same function ``run_job`` publishes with) record the
run's ``calibrated_conditions`` and the model's latent shape in ``olss_plans.json``; a run published with them and
loaded by URI drives ``StableDiffusionPipeline`` without a warning at the calibrated resolution, with exactly one
line naming both resolutions at another one (however often it is called there), and a run whose plans file has
no conditions (older runs) loads and never warns. Guidance scale never reaches a scheduler: the
``callback_on_step_end`` check that docs/scheduler.md shows sees the pipeline's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from tiny_sd import tiny_pipeline

from olss_dist.artifacts import publish_run
from olss_dist.core.builtin import builtin_plan
from olss_dist.core.scheduler_plans import PLANS_FILE_NAME, read_plans_file
from olss_dist.core.teacher import trailing_timesteps
from olss_dist.distributed.job import model_scheduler_files
from olss_dist.method.run import builtin_config
from olss_dist.scheduler import OLSSScheduler

CONDITIONS = {"guidance_scales": [7.5], "resolutions": [[16, 16]], "negative_prompts": []}
STEPS = 3


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The tiny SD pipeline: 8x8 latents, VAE scale 2 (16x16 pixels its own)."""
    pipe = tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def publish(pipe, root: Path, conditions: dict | None) -> str:
    """A run with a DDIM plan in OLSS form, its scheduler files as the job writes them (with ``conditions``)."""
    alphas = pipe.scheduler.alphas_cumprod.double().numpy()
    plan = builtin_plan("ddim", STEPS, builtin_config(alphas), trailing_timesteps(1000))
    model = {"noise_process": "vp", "alphas_cumprod": alphas.tolist(), "prediction_type": "epsilon", "latent_shape": [4, 8, 8]}
    files = model_scheduler_files([plan], model, conditions)
    published = publish_run(
        str(root), model_id="tiny-sd", model_digest="d" * 16, config={"model": "tiny-sd", "guidance_scale": 7.5},
        files={**files, "plans.json": json.dumps([plan.to_dict()]).encode()},
        extra_manifest={"teacher_steps": 1000, "planned_step_counts": [STEPS],
                        **({} if conditions is None else {"calibrated_conditions": conditions})},
    )
    return published.uri


def condition_warnings(pipe, scheduler, sizes: list[int], **call) -> list[str]:
    """The conditions warning lines of one pipeline call per size in ``sizes``."""
    pipe.scheduler = scheduler
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for size in sizes:
            latents = pipe(prompt=["a red cat"], height=size, width=size, num_inference_steps=STEPS, output_type="latent",
                           generator=torch.Generator().manual_seed(0), **call).images
            assert latents.shape[-1] == size // 2 and latents.isfinite().all()
    return [str(w.message) for w in caught if "calibrated at" in str(w.message)]


def test_the_run_records_its_conditions_and_warns_once_at_another_resolution(pipe, tmp_path):
    uri = publish(pipe, tmp_path / "runs", CONDITIONS)
    scheduler = OLSSScheduler.from_pretrained(uri)
    assert scheduler.calibrated_conditions == {**CONDITIONS, "latent_shapes": [[4, 8, 8]]}
    assert "calibrated_conditions" not in scheduler.config  # other schedulers built from the config never see it
    assert condition_warnings(pipe, scheduler, [16, 16]) == []
    lines = condition_warnings(pipe, scheduler, [32, 32, 16])
    assert lines == [
        "OLSSScheduler: latents 4x16x16 (32x32 pixels) are not the resolution the plans were calibrated at "
        "(4x8x8 (16x16 pixels)); the plans are replayed as calibrated and may lose their margin over the built-in "
        "solvers (calibrate at this resolution: --resolution)"]
    scheduler.save_pretrained(tmp_path / "saved")  # the conditions survive a save and a plain-folder load
    again = OLSSScheduler.from_pretrained(tmp_path / "saved")
    assert again.calibrated_conditions == scheduler.calibrated_conditions
    assert len(condition_warnings(pipe, again, [24])) == 1


def test_a_run_without_recorded_conditions_loads_and_never_warns(pipe, tmp_path):
    uri = publish(pipe, tmp_path / "old", None)
    folder = Path(uri.removeprefix("file://"))
    document = json.loads((folder / PLANS_FILE_NAME).read_text())
    assert "calibrated_conditions" not in document  # as every run published before the conditions were
    scheduler = OLSSScheduler.from_pretrained(uri)
    assert scheduler.calibrated_conditions is None and scheduler.available_steps == [STEPS]
    assert condition_warnings(pipe, scheduler, [16, 32]) == []


def test_malformed_conditions_are_one_line_naming_the_key(tmp_path):
    document = {"format": "olss_dist.scheduler_plans", "format_version": 1, "plans": [],
                "calibrated_conditions": {"latent_shapes": [[4, 0, 8]]}}
    with pytest.raises(ValueError, match=r"^plans\.json: calibrated_conditions\.latent_shapes must be a list of lists"):
        read_plans_file(json.dumps(document).encode(), "plans.json")


def test_the_documented_guidance_check_sees_the_pipelines_scale(pipe, tmp_path):
    """docs/scheduler.md: guidance never reaches the scheduler; a step-end callback compares the pipeline's."""
    scheduler = OLSSScheduler.from_pretrained(publish(pipe, tmp_path / "runs", CONDITIONS))
    seen = []

    def check_guidance(pipe, step, timestep, callback_kwargs):
        calibrated = (pipe.scheduler.calibrated_conditions or {}).get("guidance_scales") or []
        if step == 0 and calibrated and pipe.guidance_scale not in calibrated:
            seen.append(f"guidance {pipe.guidance_scale:g} is not the calibrated {calibrated}")
        return callback_kwargs

    assert condition_warnings(pipe, scheduler, [16], guidance_scale=7.5, callback_on_step_end=check_guidance) == []
    assert condition_warnings(pipe, scheduler, [16], guidance_scale=3.0, callback_on_step_end=check_guidance) == []
    assert seen == ["guidance 3 is not the calibrated [7.5]"]
