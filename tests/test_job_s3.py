"""The job publishing straight to S3 (moto on 127.0.0.1) and loading the result by URI; missing S3 and GCS
buckets refused before anything is written (the GCS store's publishing is tested in test_artifacts.py)."""

import s3fs

from olss_dist import OLSSScheduler
from olss_dist.artifacts import ArtifactError
from olss_dist.distributed.checkpoints import check_writable
from olss_dist.distributed.job import run_job
from olss_dist.spec import CalibrationSpec, ExecutionConfig


def test_job_publishes_to_s3_and_the_scheduler_loads_by_uri(local_ray, s3_root, run_cache, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a sample of class {i % 4}, variant {i}" for i in range(8)))
    spec = CalibrationSpec(model="analytic", prompts=str(prompts), steps=(2, 4), teacher_steps=20, validation_fraction=0.25)
    result = run_job(spec, ExecutionConfig(output=s3_root, shard_size=2, keep_states="memory"), quiet=True)
    assert result.uri.startswith(s3_root + "/")
    scheduler = OLSSScheduler.from_pretrained(result.uri)
    assert scheduler.available_steps == [2, 4]
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == result.plans[1].timesteps.tolist()


def test_missing_bucket_is_refused_and_never_created(s3_bucket):
    missing = f"{s3_bucket}-missing"
    try:
        check_writable(f"s3://{missing}/registry")
    except ArtifactError as error:
        assert "does not exist" in str(error)
    else:
        raise AssertionError("a missing bucket was accepted")
    assert missing not in [b.rstrip("/") for b in s3fs.S3FileSystem().ls("")]


def test_missing_gcs_bucket_is_refused_and_never_created(gcs_bucket, gcs_endpoint):
    from conftest import gcsfs_for_tests

    missing = f"{gcs_bucket}-missing"
    try:
        check_writable(f"gs://{missing}/registry")
    except ArtifactError as error:
        assert "does not exist" in str(error)
    else:
        raise AssertionError("a missing bucket was accepted")
    assert missing not in [b.rstrip("/") for b in gcsfs_for_tests(gcs_endpoint).ls("")]
