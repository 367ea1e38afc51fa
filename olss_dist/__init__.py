"""olss_dist: distributed OLSS calibration of fast diffusion schedulers."""

from olss_dist.calibration import Calibration
from olss_dist.method import calibrate
from olss_dist.onpolicy import fit_on_policy
from olss_dist.plan import Plan
from olss_dist.scheduler import OLSSScheduler
from olss_dist.teacher import record_trajectories, trailing_timesteps

__all__ = [
    "Calibration",
    "OLSSScheduler",
    "Plan",
    "calibrate",
    "fit_on_policy",
    "record_trajectories",
    "trailing_timesteps",
]
