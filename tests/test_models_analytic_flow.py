"""The analytic flow-matching mixture: its exact velocity agrees with the VP mixture's exact epsilon."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from olss_dist.core.noise_process import FlowMatchingProcess, noise_process_from_config
from olss_dist.core.teacher import linear_teacher
from olss_dist.models import load_model
from olss_dist.models.analytic import GaussianMixtureFlowModel, GaussianMixtureModel


@pytest.mark.parametrize("sigma", [0.97, 0.6, 0.25, 0.02])
@pytest.mark.parametrize("classes", [None, torch.arange(6) % 10])
def test_velocity_and_vp_epsilon_predict_the_same_clean_sample(sigma, classes):
    flow, vp = GaussianMixtureFlowModel(), GaussianMixtureModel()
    x = torch.randn(6, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    velocity = flow.class_output(x, sigma * 1000, classes)
    x0_flow = x - sigma * velocity  # x = x0 + sigma v
    # The same noise level written as VP: x / r = sqrt(a) x0 + sqrt(1 - a) eps with r = |(1 - sigma, sigma)|.
    r = float(np.hypot(1 - sigma, sigma))
    p, q = (1 - sigma) / r, sigma / r
    vp.signal_and_noise = lambda t: (p, q, p * p, q * q)
    eps = vp.class_output(x / r, 0, classes)
    x0_vp = (x / r - q * eps) / p
    assert torch.allclose(x0_flow, x0_vp, rtol=1e-9, atol=1e-9)


def test_flow_teacher_lands_on_the_prompted_class():
    model = load_model("analytic-flow")
    assert isinstance(model, GaussianMixtureFlowModel) and model.prediction_type == "flow_prediction"
    process = noise_process_from_config(model.scheduler_config)
    assert isinstance(process, FlowMatchingProcess) and process.scheduler.config.shift == 3.0
    classes = torch.arange(10)
    x_T = torch.randn(10, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    *_, (x0, _) = linear_teacher(model, x_T, classes, process.teacher_schedule(200))
    distances = ((x0.reshape(10, 1, -1).double() - model.means[None]) ** 2).sum(-1)
    nearest = distances.argmin(1)
    assert torch.equal(model.component_class[nearest], classes)


def test_flow_timesteps_out_of_range_are_refused():
    with pytest.raises(ValueError, match="sigma"):
        GaussianMixtureFlowModel()(torch.zeros(1, 4, 4, 4), 1001.0, torch.zeros(1))
