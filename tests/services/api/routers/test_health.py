"""``/healthz``, ``/readyz`` (real Redis and S3, then each taken away) and ``/metrics``."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.common.jobstore import JobStore
from services.common.worker_metrics import record_generation, record_gpu_peak
from tests.support.api_testing import ACME
from tests.support.s3_server import s3_server


def test_healthz_and_readyz_need_no_key(api: TestClient):
    health = api.get("/healthz")
    ready = api.get("/readyz")

    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "checks": {"redis": "ok", "s3:data": "ok", "s3:results": "ok", "s3:uploads": "ok"},
    }


def test_readyz_is_503_naming_redis_when_it_is_unreachable(
    make_settings: Callable[..., ApiSettings],
):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unreachable = redis.Redis(
        port=port, socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    with TestClient(create_app(make_settings(), redis=unreachable)) as api:
        response = api.get("/readyz")
        jobs = api.get("/v1/jobs", headers=ACME)

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "unavailable" and error["retryable"] is True
    assert error["message"].startswith("not ready: redis (ConnectionError)")
    assert "s3" not in error["message"]
    assert jobs.status_code == 503 and jobs.json()["error"]["retryable"] is True


def test_readyz_is_503_naming_s3_when_the_server_stops(
    make_settings: Callable[..., ApiSettings], redis_client: redis.Redis, tmp_path: Path
):
    with ExitStack() as server_running:
        short_lived = server_running.enter_context(s3_server(tmp_path / "s3"))
        settings = make_settings(
            s3_endpoint=short_lived.endpoint, s3_connect_timeout_s=0.5, s3_max_retries=0
        )
        with TestClient(create_app(settings, redis=redis_client)) as api:
            before = api.get("/readyz")
            server_running.close()  # stop the S3 server under the running app
            after = api.get("/readyz")

    assert before.status_code == 200
    assert after.status_code == 503
    message = after.json()["error"]["message"]
    assert "s3:data (StorageError)" in message and "redis" not in message


def test_metrics_expose_jobs_queue_stages_worker_metrics_and_requests(
    api: TestClient, store: JobStore, redis_client: redis.Redis
):
    for _ in range(2):
        api.post(
            "/v1/jobs",
            json={"kind": "generate", "model": {"source": "timm", "name": "r"}},
            headers=ACME,
        )
    job, _ = store.create("acme", "genq", {})
    store.start_attempt(job.id)
    redis_client.hset(
        "genq:metrics:stage_seconds",
        mapping={"generating:sum": 12.5, "generating:count": 2, "junk": "x"},
    )
    record_generation(redis_client, "genq", images=40, seconds=8.0)
    record_generation(redis_client, "genq", images=24, seconds=4.0)
    record_gpu_peak(redis_client, "genq", "node-a", 3_000)
    record_gpu_peak(redis_client, "genq", "node-a", 2_000)  # lower: the peak stays
    api.get("/v1/jobs/job_00000000000000000000000000", headers=ACME)

    response = api.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'genq_jobs{status="queued"} 2.0' in text
    assert 'genq_jobs{status="running"} 1.0' in text
    assert 'genq_jobs{status="succeeded"} 0.0' in text
    assert "genq_queue_depth 2.0" in text
    assert 'genq_stage_duration_seconds_sum{stage="generating"} 12.5' in text
    assert 'genq_stage_duration_seconds_count{stage="generating"} 2.0' in text
    assert "genq_store_up 1.0" in text
    assert "genq_images_generated_total 64.0" in text
    assert "genq_generation_seconds_total 12.0" in text
    assert 'genq_worker_gpu_memory_peak_bytes{node="node-a"} 3000.0' in text
    assert 'genq_http_requests_total{method="POST",route="/v1/jobs",status="202"} 2.0' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    assert (
        'genq_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/jobs"}'
        in text
    )


def test_unknown_paths_and_methods_get_the_error_shape(api: TestClient):
    missing = api.get("/v2/nothing")
    wrong_method = api.delete("/healthz")

    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_the_openapi_document_builds(api: TestClient):
    document = api.get("/openapi.json").json()

    assert "/v1/jobs/{job_id}/events" in document["paths"]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


@pytest.mark.parametrize("request_id", ["abc-123", "bad id with spaces"])
def test_every_response_carries_a_request_id(api: TestClient, request_id: str):
    response = api.get("/healthz", headers={"X-Request-ID": request_id})

    if " " in request_id:
        assert len(response.headers["x-request-id"]) == 32  # replaced by a fresh one
    else:
        assert response.headers["x-request-id"] == request_id


def test_the_app_builds_its_own_clients_from_the_settings(
    make_settings: Callable[..., ApiSettings], redis_client: redis.Redis
):
    with TestClient(create_app(make_settings())) as api:
        ready = api.get("/readyz")
        app_redis = api.app.state.genq.redis  # type: ignore[attr-defined]

    assert ready.status_code == 200
    assert app_redis is not redis_client


def test_every_request_logs_one_access_line_with_its_ids(
    api: TestClient, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="genq.api.access")
    created = api.post(
        "/v1/jobs",
        json={"kind": "generate", "model": {"source": "timm", "name": "r"}},
        headers={**ACME, "X-Request-ID": "req-42"},
    )
    job_id = created.json()["id"]
    api.get(f"/v1/jobs/{job_id}", headers=ACME)

    post, get = [r for r in caplog.records if r.name == "genq.api.access"][-2:]
    assert (post.method, post.route, post.status) == ("POST", "/v1/jobs", 202)  # type: ignore[attr-defined]
    assert (post.request_id, post.tenant, post.job_id) == ("req-42", "acme", job_id)  # type: ignore[attr-defined]
    assert (get.route, get.status, get.job_id) == ("/v1/jobs/{job_id}", 200, job_id)  # type: ignore[attr-defined]
    assert get.duration_ms >= 0  # type: ignore[attr-defined]
