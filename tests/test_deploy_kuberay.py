"""The KubeRay files in deploy/: their entrypoints parse with the job's and the refit's own command-line parsers,
the cluster they describe has a GPU worker group and is deleted after the job, and every storage option that
names an environment variable finds it on every pod."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from olss_dist.artifacts.options import ENV_PREFIX, literal_secrets
from olss_dist.cli import app, parse_calibrate_arguments
from olss_dist.spec import SpecError

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def calibrate_rayjob() -> dict:
    [rayjob] = documents("rayjob.yaml")
    return rayjob


def refit_rayjob_files() -> tuple[dict, dict]:
    """``(the RayJob the CronJob creates, the CronJob)`` of deploy/refit-rayjob-cronjob.yaml."""
    by_kind = {document["kind"]: document for document in documents("refit-rayjob-cronjob.yaml")}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    return yaml.safe_load(by_kind["ConfigMap"]["data"]["rayjob.yaml"]), by_kind


def script_arguments(entrypoint: str, script: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[0] == "python" and words[1].endswith(f"/{script}"), words[:2]
    return words[2:]


def parse_refit_arguments(arguments: list[str]) -> dict:
    """The refit command's parameters for ``arguments``, parsed (types and choices checked) by its own parser."""
    command = typer.main.get_command(app).commands["refit"]  # type: ignore[attr-defined]
    with command.make_context("refit", list(arguments)) as context:
        return dict(context.params)


def pods(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def assert_ephemeral_gpu_cluster(rayjob: dict) -> None:
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), "the head runs the driver, no actors"
    [gpu_group] = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    [worker] = gpu_group["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"]
    images = {container["image"] for pod in pods(rayjob) for container in pod["containers"]}
    assert len(images) == 1 and "REPLACE-ME" in images.pop(), "one image, marked as a placeholder"
    import ray

    assert cluster["rayVersion"] == ray.__version__


def assert_only_references(storage_options: dict) -> None:
    assert storage_options and literal_secrets(storage_options) == [], "references, no literal secrets"


def referenced_variables(storage_options: dict) -> set[str]:
    return {value[len(ENV_PREFIX):] for value in storage_options.values() if str(value).startswith(ENV_PREFIX)}


def assert_every_pod_has(rayjob: dict, variables: set[str]) -> None:
    for pod in pods(rayjob):
        for container in pod["containers"]:
            names = {variable["name"] for variable in container.get("env", [])}
            assert variables <= names, (container["name"], variables - names)


def test_calibrate_rayjob_runs_the_job_with_options_it_has_on_gpus():
    rayjob = calibrate_rayjob()
    assert_ephemeral_gpu_cluster(rayjob)
    spec, execution, _ = parse_calibrate_arguments(script_arguments(rayjob["spec"]["entrypoint"], "jobs/calibrate.py"))
    assert execution.device == "cuda" and execution.wait_for_gpus_s > 0
    assert "REPLACE-ME" in spec.model and "REPLACE-ME" in execution.output
    [gpu_group] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    [worker] = gpu_group["template"]["spec"]["containers"]
    gpus = gpu_group["replicas"] * int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert execution.num_workers == gpus, "one calibration actor per GPU of the worker group"
    assert_only_references(execution.storage_options)
    assert_every_pod_has(rayjob, referenced_variables(execution.storage_options))


def test_refit_cronjob_creates_a_rayjob_that_refits_inline():
    rayjob, by_kind = refit_rayjob_files()
    assert_ephemeral_gpu_cluster(rayjob)
    assert rayjob["metadata"]["generateName"], "a new RayJob name per run"
    params = parse_refit_arguments(script_arguments(rayjob["spec"]["entrypoint"], "jobs/refit.py"))
    assert params["inline"] and params["device"] == "cuda" and "REPLACE-ME" in params["output"]
    storage_options = json.loads(params["storage_options"])
    assert_only_references(storage_options)
    assert_every_pod_has(rayjob, referenced_variables(storage_options))

    cronjob = by_kind["CronJob"]
    assert len(cronjob["spec"]["schedule"].split()) == 5 and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    mount = container["volumeMounts"][0]
    assert container["command"][3] == f"{mount['mountPath']}/rayjob.yaml"
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    # The pod's service account may create RayJobs, and nothing else.
    assert pod["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
    binding = by_kind["RoleBinding"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert binding["roleRef"]["name"] == by_kind["Role"]["metadata"]["name"]
    [rule] = by_kind["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]


def test_the_two_rayjobs_run_the_same_image_and_gpu_pods():
    calibrate, (refit, _) = calibrate_rayjob(), refit_rayjob_files()
    def images(rayjob: dict) -> set[str]:
        return {container["image"] for pod in pods(rayjob) for container in pod["containers"]}

    assert images(calibrate) == images(refit)

    def gpu_resources(rayjob: dict) -> dict:
        [group] = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        return group["template"]["spec"]["containers"][0]["resources"]

    assert gpu_resources(calibrate) == gpu_resources(refit)


def test_an_entrypoint_with_an_option_the_job_lacks_is_caught():
    """The parsers the tests above rely on refuse what the job does not have (the check can fail)."""
    with pytest.raises(Exception, match="No such option: --gpus-per-worker"):  # click's UsageError, as typer ships it
        parse_calibrate_arguments(["--output", "s3://b/r", "--gpus-per-worker", "2"])
    with pytest.raises(Exception, match="No such option: --wait-for-gpus"):
        parse_refit_arguments(["s3://b/models", "--output", "s3://b/r", "--wait-for-gpus", "60"])
    with pytest.raises(SpecError, match="^device: "):  # values are checked too, as the job checks them
        parse_calibrate_arguments(["--output", "s3://b/r", "--device", "gpu"])
