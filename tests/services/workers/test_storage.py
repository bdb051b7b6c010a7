"""JobStorage: a job's keys under jobs/{id}/, routed to the data or the results bucket."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.common.jobs import new_job_id
from services.common.keys import BucketRole
from services.common.settings import Mode, StoreSettings
from services.workers.storage import JobStorage, file_sha256, open_storages


def test_keys_go_to_their_bucket_under_the_job_prefix(tmp_path: Path) -> None:
    storages = open_storages(StoreSettings(mode=Mode.EMBEDDED, data_dir=tmp_path))
    job_id = new_job_id()
    storage = JobStorage(job_id, storages)
    storage.put_bytes("synthetic/images/0000/000000.png", b"png")
    storage.put_bytes("checkpoints/generating.json", b"{}")
    storage.put_bytes("model/model.safetensors", b"weights")
    storage.put_bytes("report.json", b"{}")

    data, results = storages[BucketRole.DATA], storages[BucketRole.RESULTS]
    assert data.list() == [
        f"jobs/{job_id}/checkpoints/generating.json",
        f"jobs/{job_id}/synthetic/images/0000/000000.png",
    ]
    assert results.list() == [
        f"jobs/{job_id}/model/model.safetensors",
        f"jobs/{job_id}/report.json",
    ]
    assert (tmp_path / "storage" / "genq-data" / "jobs" / job_id).is_dir()
    # listing merges both buckets; reads, existence and deletes route the same way
    assert storage.list() == [
        "checkpoints/generating.json",
        "model/model.safetensors",
        "report.json",
        "synthetic/images/0000/000000.png",
    ]
    assert storage.list("s") == ["synthetic/images/0000/000000.png"]
    assert storage.get_bytes("model/model.safetensors") == b"weights"
    storage.delete("report.json")
    assert not storage.exists("report.json")
    with pytest.raises(KeyError):
        storage.get_bytes("report.json")
    # other jobs' keys are not this job's
    JobStorage(new_job_id(), storages).put_bytes("report.json", b"other")
    assert "report.json" not in storage.list()


def test_bad_job_ids_and_keys_are_refused(tmp_path: Path) -> None:
    storages = open_storages(StoreSettings(mode=Mode.EMBEDDED, data_dir=tmp_path))
    with pytest.raises(ValueError, match="not a job id"):
        JobStorage("../../etc", storages)
    storage = JobStorage(new_job_id(), storages)
    for key in ("../other/report.json", "/report.json", "a//b"):
        with pytest.raises(ValueError):
            storage.put_bytes(key, b"x")


def test_put_file_and_its_sha256(tmp_path: Path) -> None:
    storages = open_storages(StoreSettings(mode=Mode.EMBEDDED, data_dir=tmp_path / "data"))
    storage = JobStorage(new_job_id(), storages)
    path = tmp_path / "archive.tar"
    path.write_bytes(b"tar" * 1000)
    storage.put_file("synthetic/dataset.tar", path, "application/x-tar")
    assert storage.get_bytes("synthetic/dataset.tar") == path.read_bytes()
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
