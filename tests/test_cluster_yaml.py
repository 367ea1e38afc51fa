"""cluster.yaml is a valid Ray cluster-launcher config for the installed Ray, with GPU workers and token auth."""

import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_launcher_accepts_it(cluster_config):
    # What `ray up` does before touching the cloud: fill provider defaults, then schema and consistency checks.
    validate_config(prepare_config(cluster_config))


def test_required_keys_and_head_node_type(cluster_config):
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cluster_config, key
    assert cluster_config["head_node_type"] in cluster_config["available_node_types"]


def test_head_is_cpu_and_workers_declare_gpus(cluster_config):
    node_types = cluster_config["available_node_types"]
    head = node_types[cluster_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in node_types.items() if name != cluster_config["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert all(t.get("min_workers", 0) == 0 for t in workers), "GPU nodes autoscale from zero"


def test_images_match_installed_ray_and_python(cluster_config):
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    docker = cluster_config["docker"]
    for image in (docker["head_image"], docker["worker_image"]):
        repository, tag = image.split(":")
        assert repository == "rayproject/ray"
        assert tag.split("-")[0] == ray.__version__, f"{image} does not match ray {ray.__version__}"
        assert python in tag.split("-"), f"{image} does not match {python}"
    assert docker["worker_image"].endswith("-gpu")


def test_package_installed_and_token_auth_everywhere(cluster_config):
    assert any("pip install" in c and "/home/ray/olss-dist" in c for c in cluster_config["setup_commands"])
    assert cluster_config["file_mounts"]["/home/ray/olss-dist"] == "."
    assert "/home/ray/.ray/auth_token" in cluster_config["file_mounts"]
    assert "--env RAY_AUTH_MODE=token" in cluster_config["docker"]["run_options"]
    for commands in (cluster_config["head_start_ray_commands"], cluster_config["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
