"""``pipe(..., num_inference_steps=k)`` works for every k in 1…100 (issue 16 §3): the calibrated counts replay their
plans, every other count runs the fallback built-in in OLSS form with one warning, never an exception."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from olss_dist import OLSSScheduler
from olss_dist.core.builtin import builtin_plan, exact_vp_config
from olss_dist.core.noise_schedule import alphas_cumprod_from_config
from olss_dist.core.teacher import trailing_timesteps

SD_CONFIG = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
FLOW_CONFIG = FlowMatchEulerDiscreteScheduler(shift=3.0).config


def vp_scheduler() -> OLSSScheduler:
    config = exact_vp_config(alphas_cumprod_from_config(dict(SD_CONFIG)))
    plans = [builtin_plan("deis", k, config, trailing_timesteps(1000)) for k in (5, 10, 20)]
    return OLSSScheduler.from_plans(plans)


def run(scheduler: OLSSScheduler, k: int) -> torch.Tensor:
    """A diffusers loop with a model whose output is a fixed linear function of the state."""
    x = torch.ones(1, 2, 2, 2) * scheduler.init_noise_sigma
    scheduler.set_timesteps(k)
    # diffusers' multistep solvers round trailing timesteps so that a few counts get one extra (61 -> 62 for
    # DPM-Solver++): the fallback serves the solver's own timesteps, as the solver itself would
    assert len(scheduler.timesteps) in (k, k + 1)
    for t in scheduler.timesteps:
        x = scheduler.step(0.5 * scheduler.scale_model_input(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("family", ["vp", "flow"])
def test_every_step_count_from_1_to_100_samples_and_warns_once_per_uncalibrated_count(family):
    if family == "vp":
        scheduler = vp_scheduler()
    else:
        scheduler = OLSSScheduler.from_config(FLOW_CONFIG)  # no plans at all: every count is the fallback
    calibrated = set(scheduler.available_steps)
    for k in range(1, 101):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            final = run(scheduler, k)
        assert torch.isfinite(final).all(), k
        messages = [str(w.message) for w in caught if "no plan for" in str(w.message)]
        assert len(messages) == (0 if k in calibrated else 1), (k, messages)
    assert calibrated == ({5, 10, 20} if family == "vp" else set())
    np.testing.assert_allclose(run(scheduler, 100).numpy(), run(scheduler, 100).numpy())  # a rerun resets the run
