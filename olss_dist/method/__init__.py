"""The calibration method over a rollout backend: candidates, on-policy fits and the validated choice.

``rollouts.RolloutBackend`` is the seam: ``run.run_method`` drives it unchanged in one process
(``rollouts.InProcessBackend``, ``run.calibrate``) and on Ray actors (``olss_dist.distributed``).
"""
