"""olss_dist: distributed OLSS calibration of fast diffusion schedulers."""

from olss_dist.calibration import Calibration
from olss_dist.plan import Plan
from olss_dist.scheduler import OLSSScheduler
from olss_dist.teacher import record_trajectories, trailing_timesteps

__all__ = ["Calibration", "OLSSScheduler", "Plan", "record_trajectories", "trailing_timesteps"]
