"""Run registry on real bucket protocols (S3 on moto, GCS on fake-gcs-server, both on loopback: ``bucket_root``
runs each such test once per store), on file:// and on plain local paths."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest
from artifact_data import CONFIG, run_files
from olss_dist.artifacts import (
    ArtifactError,
    config_digest,
    fetch_run,
    find_complete_run,
    list_models,
    publish_run,
    pull_run,
    read_manifest,
    resolve_run,
    staging_uri,
)
from olss_dist.artifacts.errors import PreconditionFailed
from olss_dist.artifacts.layout import sha256_hex
from olss_dist.artifacts.stores import open_store

MODEL_ID = "org/tiny-sd"
MODEL_DIGEST = "weights0001"


def publish(root: str, seed: int = 0, config: dict | None = None, **kwargs):
    return publish_run(
        root, model_id=MODEL_ID, model_digest=MODEL_DIGEST, config=config or CONFIG, files=run_files(seed), **kwargs
    )


def assert_same_files(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (directory / name).read_bytes() == data, name


# ------------------------------------------------------------------------------------------------ round trips


def test_bucket_publish_and_fetch_round_trip(bucket_root, tmp_path):
    published = publish(bucket_root, seed=1, extra_manifest={"quality": {"held_out_mse": 0.03}})
    assert published.uri == f"{bucket_root}/org--tiny-sd/{MODEL_DIGEST}/{published.run_id}"
    local = fetch_run(published.uri, cache_dir=tmp_path / "cache")
    assert_same_files(local, run_files(1))
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest == published.manifest
    assert local.name == sha256_hex((local / "manifest.json").read_bytes())
    files = run_files(1)
    assert manifest["files"] == {name: {"sha256": sha256_hex(data), "size": len(data)} for name, data in files.items()}
    assert manifest["model"] == {"id": MODEL_ID, "digest": MODEL_DIGEST, "slug": "org--tiny-sd"}
    assert manifest["config"] == CONFIG and manifest["config_digest"] == config_digest(CONFIG)
    assert manifest["teacher_steps"] == 20 and manifest["planned_step_counts"] == [4, 8]
    assert manifest["quality"] == {"held_out_mse": 0.03}
    assert {"olss-dist", "torch", "diffusers", "numpy", "ray"} <= set(manifest["versions"])
    assert manifest["created_at"].endswith("Z")


def test_model_uri_and_latest_json_resolve_to_the_run(bucket_root, tmp_path):
    published = publish(bucket_root)
    model_uri = f"{bucket_root}/org--tiny-sd"
    for uri in (model_uri, model_uri + "/", f"{model_uri}/latest.json", f"{published.uri}/manifest.json"):
        assert resolve_run(uri).uri == published.uri, uri
    assert fetch_run(model_uri, cache_dir=tmp_path) == fetch_run(published.uri, cache_dir=tmp_path)


def test_cache_hit_reverifies_and_heals(bucket_root, tmp_path):
    published = publish(bucket_root)
    local = fetch_run(published.uri, cache_dir=tmp_path)
    (local / "plans.json").write_bytes(b"[]")
    healed = fetch_run(published.uri, cache_dir=tmp_path)
    assert healed == local
    assert_same_files(healed, run_files(0))


@pytest.mark.parametrize("style", ["path", "file_uri", "relative"])
def test_local_round_trip(tmp_path, monkeypatch, style):
    monkeypatch.chdir(tmp_path)
    root = {"path": str(tmp_path / "reg"), "file_uri": f"file://{tmp_path}/reg", "relative": "reg"}[style]
    published = publish(root, seed=3)
    assert published.uri.startswith(root)
    assert resolve_run(f"{root}/org--tiny-sd").uri == published.uri
    assert_same_files(fetch_run(published.uri, cache_dir=tmp_path / "cache"), run_files(3))
    pulled = pull_run(f"{root}/org--tiny-sd/latest.json", tmp_path / "pulled")
    assert_same_files(pulled, run_files(3))


def test_pull_refuses_an_existing_directory(tmp_path):
    published = publish(str(tmp_path / "reg"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        pull_run(published.uri, tmp_path / "taken")


def test_memory_filesystem_round_trip(tmp_path):
    published = publish("memory://olss-test-registry")
    assert_same_files(fetch_run("memory://olss-test-registry/org--tiny-sd", cache_dir=tmp_path), run_files(0))
    assert published.run_id == list_models("memory://olss-test-registry")[0].latest_run_id


# ------------------------------------------------------------------------------------------------ integrity


def test_tampered_byte_is_refused_naming_the_file(bucket_root, tmp_path, bucket_fs):
    published = publish(bucket_root)
    fs = bucket_fs
    key = f"{published.uri}/calibration.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0x01
    fs.pipe_file(key, bytes(data))
    with pytest.raises(ArtifactError, match=r"tampered.*calibration\.safetensors.*sha256"):
        fetch_run(published.uri, cache_dir=tmp_path / "cache")
    assert not any(p.name[0] != "." for p in (tmp_path / "cache").iterdir())
    assert not list((tmp_path / "cache").iterdir())


def test_truncated_and_missing_files_are_refused(bucket_root, tmp_path, bucket_fs):
    published = publish(bucket_root)
    fs = bucket_fs
    fs.pipe_file(f"{published.uri}/plans.json", b"[]")
    with pytest.raises(ArtifactError, match=r"plans\.json has 2 bytes"):
        fetch_run(published.uri, cache_dir=tmp_path)
    fs.pipe_file(f"{published.uri}/plans.json", run_files(0)["plans.json"])
    fs.rm(f"{published.uri}/report.json")
    with pytest.raises(ArtifactError, match=r"incomplete: report\.json"):
        pull_run(published.uri, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


def test_edited_manifest_is_refused_through_the_pointer(bucket_root, bucket_fs):
    published = publish(bucket_root)
    fs = bucket_fs
    manifest = json.loads(fs.cat_file(f"{published.uri}/manifest.json"))
    manifest["files"]["plans.json"]["sha256"] = "0" * 64
    fs.pipe_file(f"{published.uri}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="modified after publishing"):
        resolve_run(f"{bucket_root}/org--tiny-sd")


def test_run_files_are_never_overwritten(bucket_root):
    published = publish(bucket_root)
    store = open_store(published.uri)
    with pytest.raises(PreconditionFailed):
        store.write_new("plans.json", b"[]")
    assert store.read("plans.json") == run_files(0)["plans.json"]


# ------------------------------------------------------------------------------------------------ visibility


def test_run_without_manifest_is_invisible(bucket_root, tmp_path, bucket_fs):
    published = publish(bucket_root, seed=1)
    orphan = f"{bucket_root}/org--tiny-sd/{MODEL_DIGEST}/20000101T000000Z-0badc0de"
    fs = bucket_fs
    for name, data in run_files(2).items():
        fs.pipe_file(f"{orphan}/{name}", data)
    with pytest.raises(ArtifactError, match="no run at"):
        fetch_run(orphan, cache_dir=tmp_path)
    [model] = list_models(bucket_root)
    assert [run.run_id for run in model.runs] == [published.run_id]
    assert find_complete_run(bucket_root, MODEL_ID, MODEL_DIGEST, config_digest(CONFIG)) == published.uri
    assert resolve_run(f"{bucket_root}/org--tiny-sd").uri == published.uri


def test_failed_publish_leaves_nothing_visible(bucket_root, bucket_fs):
    publish(bucket_root, seed=1)
    pointer_before = bucket_fs.cat_file(f"{bucket_root}/org--tiny-sd/latest.json")
    store_class = type(open_store(bucket_root))
    real_write_new = store_class.write_new

    def fail_on_manifest(self, key, data):
        if key.endswith("manifest.json"):
            raise ConnectionResetError("connection reset by peer")
        real_write_new(self, key, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store_class, "write_new", fail_on_manifest)
        with pytest.raises(ArtifactError, match="cannot publish run .*connection reset"):
            publish(bucket_root, seed=2)
    assert bucket_fs.cat_file(f"{bucket_root}/org--tiny-sd/latest.json") == pointer_before
    [model] = list_models(bucket_root)
    assert len(model.runs) == 1
    assert len(bucket_fs.ls(f"{bucket_root}/org--tiny-sd/{MODEL_DIGEST}")) == 1  # partial run removed


# ------------------------------------------------------------------------------------------------ concurrency


def test_compare_and_swap_refuses_a_stale_token(bucket_root, tmp_path):
    for root in (bucket_root, str(tmp_path / "local"), f"memory://olss-test-cas-{tmp_path.name}"):
        store = open_store(root)
        store.check_root(create=True)
        store.replace_if("m/latest.json", b"{}", None)
        with pytest.raises(PreconditionFailed):
            store.replace_if("m/latest.json", b"{}", None)  # create-if-absent on an existing object
        data, token = store.read_versioned("m/latest.json")
        store.replace_if("m/latest.json", b'{"a": 1}', token)
        with pytest.raises(PreconditionFailed):
            store.replace_if("m/latest.json", b'{"b": 2}', token)  # token from before the last write
        assert store.read_versioned("m/latest.json")[0] == b'{"a": 1}', root


def _publish_concurrently(root: str, publishers: int, runs_each: int) -> list[str]:
    barrier = threading.Barrier(publishers)
    run_ids: list[str] = []
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for round_ in range(runs_each):
                run_ids.append(publish(root, seed=100 * index + round_).run_id)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(publishers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return run_ids


def assert_no_lost_update(root: str, run_ids: list[str], pointer: dict) -> None:
    known = [pointer["latest"]["run_id"]] + [run["run_id"] for run in pointer["previous"]]
    assert sorted(known) == sorted(run_ids)
    newest = max((run["created_at"], run["run_id"]) for run in [pointer["latest"], *pointer["previous"]])
    assert pointer["latest"]["run_id"] == newest[1]
    [model] = list_models(root)
    assert sorted(run.run_id for run in model.runs) == sorted(run_ids)
    assert model.latest_run_id in run_ids


def test_concurrent_bucket_publishers_lose_no_update(bucket_root, tmp_path, bucket_fs):
    run_ids = _publish_concurrently(bucket_root, publishers=4, runs_each=2)
    pointer = json.loads(bucket_fs.cat_file(f"{bucket_root}/org--tiny-sd/latest.json"))
    assert_no_lost_update(bucket_root, run_ids, pointer)
    for run in list_models(bucket_root)[0].runs:
        seed = json.loads(fetch_run(run.uri, cache_dir=tmp_path).joinpath("scheduler_config.json").read_text())["seed"]
        assert_same_files(fetch_run(run.uri, cache_dir=tmp_path), run_files(seed))


def _publish_in_child(root: str, first_seed: int, runs: int, results) -> None:
    for seed in range(first_seed, first_seed + runs):
        results.put(publish(root, seed=seed).run_id)


def test_concurrent_local_processes_lose_no_update(tmp_path):
    # fork: the children inherit the imported modules (no torch import per child) and touch only local files.
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    root = str(tmp_path / "reg")
    processes = [context.Process(target=_publish_in_child, args=(root, 10 * i, 3, results)) for i in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    run_ids = [results.get(timeout=5) for _ in range(9)]
    pointer = json.loads((tmp_path / "reg" / "org--tiny-sd" / "latest.json").read_text())
    assert_no_lost_update(root, run_ids, pointer)


# ------------------------------------------------------------------------------------------------ registry


def test_find_complete_run_matches_model_and_config(bucket_root, bucket_fs):
    digest = config_digest(CONFIG)
    assert find_complete_run(bucket_root, MODEL_ID, MODEL_DIGEST, digest) is None
    first = publish(bucket_root, seed=1)
    other_config = {**CONFIG, "seed": 8}
    publish(bucket_root, seed=2, config=other_config)
    assert find_complete_run(bucket_root, MODEL_ID, MODEL_DIGEST, digest) == first.uri
    assert find_complete_run(bucket_root, MODEL_ID, "otherweights", digest) is None
    assert find_complete_run(bucket_root, "org/other", MODEL_DIGEST, digest) is None
    bucket_fs.rm(f"{first.uri}/plans.json")
    assert find_complete_run(bucket_root, MODEL_ID, MODEL_DIGEST, digest) is None


def test_list_models_reports_runs_and_latest(bucket_root):
    first = publish(bucket_root, seed=1)
    second = publish(bucket_root, seed=2)
    publish_run(bucket_root, model_id="other/model", model_digest="d2", config=CONFIG, files=run_files(3))
    models = {model.model_id: model for model in list_models(bucket_root)}
    assert set(models) == {MODEL_ID, "other/model"}
    tiny = models[MODEL_ID]
    assert [run.run_id for run in tiny.runs] == [first.run_id, second.run_id]
    assert tiny.latest_run_id == second.run_id
    assert tiny.runs[0].planned_step_counts == [4, 8] and tiny.runs[0].teacher_steps == 20
    assert list_models(f"{bucket_root}/nothing-here") == []


def test_staging_is_stable_and_never_a_run(bucket_root, bucket_fs):
    digest = config_digest(CONFIG)
    uri = staging_uri(bucket_root, MODEL_ID, MODEL_DIGEST, digest)
    assert uri == f"{bucket_root}/org--tiny-sd/{MODEL_DIGEST}/_staging/{digest}"
    assert staging_uri(bucket_root + "/", MODEL_ID, MODEL_DIGEST, digest) == uri
    fs = bucket_fs
    fs.pipe_file(f"{uri}/shard-00000.safetensors", run_files(0)["calibration.safetensors"])
    published = publish(bucket_root)
    [model] = list_models(bucket_root)
    assert [run.run_id for run in model.runs] == [published.run_id]
    assert find_complete_run(bucket_root, MODEL_ID, MODEL_DIGEST, digest) == published.uri


def test_read_manifest_of_a_model(tmp_path):
    published = publish(str(tmp_path))
    assert read_manifest(str(tmp_path / "org--tiny-sd")) == published.manifest
