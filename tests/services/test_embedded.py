"""The embedded mode end to end: ``genq serve --embedded`` as a real process, driven over HTTP by
the client; a job runs, its artifacts download through signed links with their sha256 checked,
and jobs (finished and queued) survive a restart."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from genq_core.client import GenQClient
from services.common.embedded_store import EmbeddedRedis
from services.common.jobstore import JobStore
from services.common.queue import JobQueue
from services.common.spec import GenqJobRequest, generation_fingerprint
from services.embedded import API_KEY_FILE, SNAPSHOT_FILE, EmbeddedService, ensure_api_key
from tests.services.workers.test_runner import genq_body
from tests.support.processes import start_on_free_port, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS = REPO_ROOT / "benchmarks" / "assets"

TINY_JOB = genq_body()


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _serve(data_dir: Path, log: Path) -> tuple[Any, str]:
    """``genq serve --embedded`` on a free port; its process and URL once it is ready."""
    genq = Path(sys.executable).parent / "genq"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(
        OMP_NUM_THREADS="1",
        GENQ_ASSETS_DIR=str(ASSETS),
        GENQ_MODEL_CACHE_DIR=str(data_dir.parent / "model-cache"),
        GENQ_PROGRESS_INTERVAL_S="0",
    )
    process, port = start_on_free_port(
        lambda port: [
            str(genq),
            "serve",
            "--embedded",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--threads",
            "1",
        ],
        _answers,
        what="genq serve --embedded",
        port_taken="address already in use",
        log_path=log,
        timeout_s=120,
        env=env,
    )
    return process, f"http://127.0.0.1:{port}"


def _stop(process: Any) -> int:
    """SIGTERM, as a service manager stops it; its exit code."""
    process.send_signal(signal.SIGTERM)
    try:
        return int(process.wait(timeout=60))
    finally:
        stop_process(process)


def test_a_job_runs_and_downloads_and_survives_a_restart(tmp_path: Path):
    data_dir, log = tmp_path / "service", tmp_path / "serve.log"

    # 1. a job through the real process, its artifacts through signed links
    process, url = _serve(data_dir, log)
    try:
        key = (data_dir / API_KEY_FILE).read_text().strip()
        with GenQClient(url, key) as client:
            job_id = client.submit(TINY_JOB)["id"]
            final = client.wait(job_id, timeout=240)
            assert final["status"] == "succeeded", final
            files = client.download(job_id, tmp_path / "first")
        names = sorted(p.relative_to(tmp_path / "first").as_posix() for p in files)
        assert {"model/model.safetensors", "report.json", "synthetic/dataset.tar"} <= set(names)
        report = json.loads((tmp_path / "first" / "report.json").read_text())
        assert report["job"]["id"] == job_id and 0 <= report["evaluation"]["agreement"] <= 100
    finally:
        code = _stop(process)
    assert code == 0, log.read_text()[-2000:]

    # 2. after a restart: the same key, the job still there, its links signed anew
    process, url = _serve(data_dir, log)
    try:
        with GenQClient(url, key) as client:
            assert client.get(job_id)["status"] == "succeeded"
            again = client.download(job_id, tmp_path / "second")
        for path in again:
            twin = tmp_path / "first" / path.relative_to(tmp_path / "second")
            assert (
                hashlib.sha256(path.read_bytes()).digest()
                == hashlib.sha256(twin.read_bytes()).digest()
            )
        wrong_key = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": "Bearer x"})
        assert wrong_key.status_code == 401
    finally:
        assert _stop(process) == 0


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    return tmp_path / "service"


def _embedded(data_dir: Path, cache: Path) -> EmbeddedService:
    return EmbeddedService(
        data_dir,
        worker={
            "assets_dir": ASSETS,
            "model_cache_dir": cache,
            "threads": 1,
            "poll_s": 0.05,
            "progress_interval_s": 0.0,
        },
    )


def test_a_job_queued_when_the_service_stopped_runs_after_the_restart(
    service_dir: Path, tmp_path: Path
):
    # a job the API accepted and saved, whose service stopped before any worker took it
    with EmbeddedRedis.open(service_dir / SNAPSHOT_FILE) as stored:
        request = GenqJobRequest.model_validate(TINY_JOB)
        config = {**TINY_JOB, "generation_fingerprint": generation_fingerprint(request)}
        job, _ = JobStore(stored.client()).create("local", "genq", config)
        JobQueue(stored.client()).enqueue(job.id)

    service = _embedded(service_dir, tmp_path / "cache")
    key = ensure_api_key(service_dir)
    with service as app, TestClient(app) as api:
        headers = {"Authorization": f"Bearer {key}"}
        deadline = time.monotonic() + 240
        status = "queued"
        while status not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
            time.sleep(0.2)
            status = api.get(f"/v1/jobs/{job.id}", headers=headers).json()["status"]
        assert status == "succeeded"
        artifacts = api.get(f"/v1/jobs/{job.id}/artifacts", headers=headers).json()["artifacts"]
        assert {a["key"] for a in artifacts} >= {"report.json", "model/model.safetensors"}


def test_the_api_key_is_made_once_and_kept_private(tmp_path: Path):
    first = ensure_api_key(tmp_path)

    assert ensure_api_key(tmp_path) == first
    assert oct((tmp_path / API_KEY_FILE).stat().st_mode & 0o777) == "0o600"
    (tmp_path / API_KEY_FILE).write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        ensure_api_key(tmp_path)


def test_configured_api_keys_replace_the_generated_one(tmp_path: Path):
    from services.api.settings import hash_api_key

    service = EmbeddedService(tmp_path, api={"api_keys": [f"{hash_api_key('mine')}=team"]})

    assert service.api_key is None
    assert not (tmp_path / API_KEY_FILE).exists()


def test_the_embedded_mode_ignores_distributed_settings_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("GENQ_MODE", "distributed")
    monkeypatch.setenv("GENQ_DATA_DIR", "/elsewhere")

    service = EmbeddedService(tmp_path / "d")

    assert service.api_settings.mode == service.worker_settings.mode == "embedded"
    assert service.worker_settings.data_dir == (tmp_path / "d").resolve()
