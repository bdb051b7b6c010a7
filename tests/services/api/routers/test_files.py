"""``/files/{token}``: the embedded mode's signed download links, from the artifacts manifest to
the bytes; altered or expired links are 403s, and an S3-backed API serves none."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.settings import ApiSettings, hash_api_key
from services.common.embedded_store import EmbeddedRedis
from services.common.settings import Mode
from tests.services.api.routers.test_jobs import error_of, submitted
from tests.support.api_testing import ACME, BASE_URL, GLOBEX, KEY_ACME, KEY_GLOBEX

REPORT = b'{"top1": 91.2}'


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[TestClient]:
    """The API in the embedded mode: local folders and the in-process job store."""
    settings = ApiSettings(
        mode=Mode.EMBEDDED,
        data_dir=tmp_path,
        api_keys=[f"{hash_api_key(KEY_ACME)}=acme", f"{hash_api_key(KEY_GLOBEX)}=globex"],
    )
    with (
        EmbeddedRedis(None) as server,
        TestClient(create_app(settings, redis=server.client()), base_url=BASE_URL) as client,
    ):
        yield client


def finished_job(api: TestClient, data_dir: Path) -> str:
    """A job whose report is stored and listed in its manifest, as a worker leaves it."""
    job_id = submitted(api)
    results = data_dir / "storage" / "genq-results" / "jobs" / job_id
    results.mkdir(parents=True)
    (results / "report.json").write_bytes(REPORT)
    entry = {
        "key": "report.json",
        "size": len(REPORT),
        "sha256": hashlib.sha256(REPORT).hexdigest(),
    }
    (results / "artifacts.json").write_text(json.dumps([entry]))
    return job_id


def artifact(api: TestClient, job_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/jobs/{job_id}/artifacts", headers=ACME)
    assert response.status_code == 200, response.text
    [entry] = response.json()["artifacts"]
    return dict(entry)


def test_artifact_urls_download_the_object_without_an_api_key(embedded: TestClient, tmp_path: Path):
    entry = artifact(embedded, finished_job(embedded, tmp_path))

    assert entry["url"].startswith(f"{BASE_URL}/files/")
    download = embedded.get(entry["url"])  # no Authorization header
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == entry["sha256"]
    assert 'filename="report.json"' in download.headers["content-disposition"]


def test_an_altered_link_is_a_403(embedded: TestClient, tmp_path: Path):
    url = artifact(embedded, finished_job(embedded, tmp_path))["url"]
    mac = url.rsplit("/", 1)[1].split(".")[1]
    other = artifact(embedded, finished_job(embedded, tmp_path))["url"]
    other_body = other.rsplit("/", 1)[1].split(".")[0]

    response = embedded.get(f"/files/{other_body}.{mac}")

    assert response.status_code == 403
    assert error_of(response)["code"] == "forbidden"
    assert "not valid" in error_of(response)["message"]


def test_an_expired_link_is_a_403(tmp_path: Path):
    settings = ApiSettings(
        mode=Mode.EMBEDDED,
        data_dir=tmp_path,
        api_keys=[f"{hash_api_key(KEY_ACME)}=acme"],
        presign_expiry_s=1,
    )
    with (
        EmbeddedRedis(None) as server,
        TestClient(create_app(settings, redis=server.client()), base_url=BASE_URL) as api,
    ):
        url = artifact(api, finished_job(api, tmp_path))["url"]
        time.sleep(1.1)  # past the 1 s expiry
        response = api.get(url)

    assert response.status_code == 403
    assert "expired" in error_of(response)["message"]


def test_a_deleted_object_is_a_404(embedded: TestClient, tmp_path: Path):
    job_id = finished_job(embedded, tmp_path)
    url = artifact(embedded, job_id)["url"]
    (tmp_path / "storage" / "genq-results" / "jobs" / job_id / "report.json").unlink()

    assert embedded.get(url).status_code == 404


def test_other_tenants_get_no_links(embedded: TestClient, tmp_path: Path):
    job_id = finished_job(embedded, tmp_path)
    assert embedded.get(f"/v1/jobs/{job_id}/artifacts", headers=GLOBEX).status_code == 404


def test_presigned_uploads_are_501_in_the_embedded_mode(embedded: TestClient):
    response = embedded.post(
        "/v1/uploads/presign",
        json={"kind": "model", "filename": "m.safetensors", "size": 10},
        headers=ACME,
    )
    assert response.status_code == 501
    assert "multipart" in error_of(response)["message"]


def test_an_s3_backed_api_serves_no_links(api: TestClient):
    response = api.get("/files/anything.at-all")
    assert response.status_code == 404
    assert "presigned" in error_of(response)["message"]
