"""Scheduled refits: calibrate each new model of a registry once (the same command as ``olss-dist refit``).

    python jobs/refit.py s3://bucket/models --output s3://bucket/registry --address http://head:8265
    python jobs/refit.py models.yaml --output ./registry --inline --teacher-steps 50 --steps 4,8
    python jobs/refit.py s3://bucket/models --output s3://bucket/registry --watch --interval 900

Skips models whose weights and calibration config already have a complete run, reports running jobs
instead of starting duplicates, retries failed ones up to --max-attempts; exit status 1 when any failed.
See docs/refit.md and deploy/REFIT.md (CronJob, crontab).
"""

from __future__ import annotations

import logging
import sys

import typer

from olss_dist.cli import refit

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command(help=__doc__.split("\n\n")[0])(refit)

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()
