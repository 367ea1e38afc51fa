"""The scheduling files in deploy/ run a refit command that exists, with options it accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
import yaml

from olss_dist.cli import app

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def refit_option_names() -> set[str]:
    command = typer.main.get_command(app).commands["refit"]
    return {name for parameter in command.params for name in parameter.opts if name.startswith("--")}


def assert_refit_arguments(arguments: list[str]) -> None:
    options = [a for a in arguments if a.startswith("--")]
    assert set(options) <= refit_option_names(), set(options) - refit_option_names()
    assert not arguments[0].startswith("--"), "the model registry comes first"
    assert "--output" in options


def test_cronjob_runs_one_refit_at_a_time_with_the_token_from_a_secret():
    cronjob, claim = yaml.safe_load_all((DEPLOY / "refit-cronjob.yaml").read_text())
    assert (cronjob["apiVersion"], cronjob["kind"]) == ("batch/v1", "CronJob")
    assert len(cronjob["spec"]["schedule"].split()) == 5
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "the store counts attempts, not Kubernetes"
    [container] = job["template"]["spec"]["containers"]
    assert container["command"] == ["olss-dist", "refit"]
    assert_refit_arguments(container["args"])
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "olss-ray-auth"
    [volume] = job["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert env["OLSS_MODEL_CACHE_DIR"]["value"].startswith(mount)


def test_crontab_line_runs_refit_under_flock():
    lines = [line for line in (DEPLOY / "refit.crontab").read_text().splitlines() if line and not line.startswith("#")]
    assignments = dict(line.split("=", 1) for line in lines if "=" in line.split()[0])
    assert assignments["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN_PATH" in assignments
    [entry] = [line for line in lines if "=" not in line.split()[0]]
    fields = shlex.split(entry)
    schedule, command = fields[:5], fields[5:]
    assert len(schedule) == 5 and command[:3] == ["flock", "-n", "/tmp/olss-refit.lock"]
    assert command[3:5] == ["olss-dist", "refit"]
    assert_refit_arguments([a for a in command[5:] if a not in (">>", "2>>") and not a.startswith("/var/log")])
