"""olss_dist: distributed OLSS calibration of fast diffusion schedulers."""
