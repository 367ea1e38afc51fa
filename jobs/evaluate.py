"""Evaluate a published OLSS run against diffusers' built-in solvers on held-out samples.

    python jobs/evaluate.py --model analytic --artifact ./registry/<model>/<digest>/<run> --output eval/
    ray job submit --working-dir . -- python jobs/evaluate.py --model embedded --artifact s3://bucket/registry/embedded

The same command as ``olss-dist evaluate`` (``olss_dist.cli``); the evaluation itself is ``olss_dist.apps.evaluate``.
It runs in one process (use a GPU node for Stable Diffusion models).
"""

import typer

from olss_dist.cli import evaluate

if __name__ == "__main__":
    typer.run(evaluate)
