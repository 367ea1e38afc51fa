"""Small synthetic run files for artifact tests: a scheduler config, a safetensors file, plans and a report."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import save as save_safetensors

CONFIG = {"teacher_steps": 20, "planned_step_counts": [4, 8], "num_samples": 16, "seed": 7}


def run_files(seed: int = 0) -> dict[str, bytes]:
    """``{name: bytes}`` of a plausible run; ``seed`` makes the contents differ between publishers."""
    rng = np.random.default_rng(seed)
    r_factor = np.triu(rng.standard_normal((41, 41)))
    plans = [
        {"num_steps": k, "nodes": list(range(0, 20, 20 // k)), "timesteps": list(range(999, 0, -999 // k))[:k],
         "coefficients": rng.standard_normal((k, k + 1)).tolist(), "step_errors": rng.random(k).tolist(),
         "fit": "teacher_forced", "spacing": "minimax"}
        for k in CONFIG["planned_step_counts"]
    ]
    return {
        "scheduler_config.json": json.dumps({"_class_name": "OLSSScheduler", "seed": seed}).encode(),
        "calibration.safetensors": save_safetensors({"r_factor": r_factor}, metadata={"seed": str(seed)}),
        "plans.json": json.dumps(plans).encode(),
        "report.json": json.dumps({"held_out_mse": {"4": 0.12, "8": 0.03}, "samples": 16}).encode(),
    }
