from __future__ import annotations

import pytest

from services.common.jobs import new_job_id
from services.common.keys import BucketRole, bucket_role, job_key, upload_prefix


def test_job_keys_are_deterministic_and_checked() -> None:
    job = new_job_id()
    assert job_key(job, "model/model.safetensors") == f"jobs/{job}/model/model.safetensors"
    with pytest.raises(ValueError, match="not a job id"):
        job_key("../other", "report.json")


def test_datasets_and_results_go_to_their_buckets() -> None:
    assert bucket_role("synthetic/images/0001/000002.png") == BucketRole.DATA
    assert bucket_role("checkpoints/generate.json") == BucketRole.DATA
    assert bucket_role("model/encodings.json") == BucketRole.RESULTS
    assert bucket_role("report.json") == BucketRole.RESULTS


def test_upload_prefix_rejects_path_tricks() -> None:
    assert upload_prefix("acme", "up_1") == "uploads/acme/up_1"
    for tenant, upload in (("", "x"), ("a/b", "x"), ("acme", "..")):
        with pytest.raises(ValueError):
            upload_prefix(tenant, upload)
