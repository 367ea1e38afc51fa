"""Calibrate a diffusion model's OLSS schedulers on a Ray cluster and publish the result.

    ray job submit --working-dir . -- python jobs/calibrate.py --output s3://bucket/registry --device cuda
    python jobs/calibrate.py --output ./registry                     # the same job on a local Ray

The same command as ``olss-dist calibrate`` (``olss_dist.cli``); the job itself is
``olss_dist.distributed.job.run_job``. Under ``ray job submit`` (or with RAY_ADDRESS set) the job joins
the cluster; otherwise it starts a local Ray with CPU workers. On success it prints the published run's
URI on stdout; on bad input it prints one error line and exits non-zero without publishing anything.
"""

from __future__ import annotations

import logging
import sys

import typer

from olss_dist.cli import calibrate

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(calibrate)  # its help is the command's own

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()
