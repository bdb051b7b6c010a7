"""``/v1/jobs`` against real Redis and S3: submit, validation, idempotency, queue limits, reading,
listing, cancel, tenant isolation, server-sent events and artifacts with presigned URLs."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import httpx2
import pytest
import redis
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.api.uploads import UploadKind, UploadStatus, UploadStore
from services.common.jobs import JobError, JobKind, JobStatus, Stage
from services.common.jobstore import JobStore
from services.common.queue import JobQueue
from services.common.spec import GenqJobRequest
from tests.support.api_testing import ACME, BASE_URL, GLOBEX, bucket
from tests.support.s3_server import S3ServerInfo

GENQ = {"kind": "genq", "model": {"source": "timm", "name": "resnet18"}}
GENERATE = {"kind": "generate", "model": {"source": "timm", "name": "resnet18"}}


def submit(api: TestClient, body: dict[str, Any] | None = None, **headers: str) -> httpx2.Response:
    return api.post("/v1/jobs", json=body or GENQ, headers={**ACME, **headers})


def submitted(api: TestClient, body: dict[str, Any] | None = None) -> str:
    response = submit(api, body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def error_of(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    return error


def finish(store: JobStore, job_id: str, status: JobStatus = JobStatus.SUCCEEDED) -> None:
    """Run a job to ``status`` the way a worker does."""
    token = store.start_attempt(job_id)
    store.set_stage(job_id, token, Stage.GENERATING)
    store.update_progress(
        job_id, token, stage=Stage.GENERATING, done=4, total=4, images_generated=4
    )
    error = JobError(code="oom", message="out of memory") if status is JobStatus.FAILED else None
    store.finish(job_id, token, status, error=error)


def ready_upload(redis_client: redis.Redis, tenant: str, kind: UploadKind, filename: str) -> str:
    """A validated upload record, as the upload routes leave it."""
    uploads = UploadStore(redis_client)
    fmt = filename.split(".", 1)[1]
    record = uploads.new_record(tenant, kind, filename, fmt)
    ready = record.model_copy(update={"status": UploadStatus.READY, "size": 3, "sha256": "ab" * 32})
    return uploads.save(ready).id


# ---- submit -------------------------------------------------------------------------------------


def test_submit_answers_202_with_location_urls_and_the_resolved_config(
    api: TestClient, store: JobStore, redis_client: redis.Redis
):
    response = submit(api)

    assert response.status_code == 202, response.text
    body = response.json()
    job_id = body["id"]
    assert body["status"] == "queued" and body["kind"] == "genq"
    assert response.headers["Location"] == f"{BASE_URL}/v1/jobs/{job_id}"
    assert body["urls"] == {
        "self": f"{BASE_URL}/v1/jobs/{job_id}",
        "cancel": f"{BASE_URL}/v1/jobs/{job_id}/cancel",
        "events": f"{BASE_URL}/v1/jobs/{job_id}/events",
        "artifacts": f"{BASE_URL}/v1/jobs/{job_id}/artifacts",
    }
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert "x-request-id" in response.headers
    # stored for the tenant, with every default and the fingerprint; on the queue
    job = store.get(job_id, "acme")
    assert job is not None and job.kind is JobKind.GENQ
    request = GenqJobRequest.model_validate(GENQ).model_dump(mode="json")
    assert job.config == {**request, "generation_fingerprint": job.config["generation_fingerprint"]}
    assert job.config["quant"]["weight_bits"] == 4
    assert len(job.config["generation_fingerprint"]) == 64
    assert JobQueue(redis_client).depth() == 1


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            {**GENQ, "quant": {"weight_bits": 9}},
            "quant.weight_bits",
            "quant.weight_bits: Input should be less than or equal to 8",
        ),
        (
            {**GENQ, "model": {"source": "timm", "name": "r", "colour": "red"}},
            "model.colour",
            "model.colour: Extra inputs are not permitted",
        ),
        ({"kind": "train", "model": GENQ["model"]}, "kind", "kind: must be one of"),
        (
            {"kind": "quantize", "model": GENQ["model"]},
            "calibration",
            "calibration: Field required",
        ),
        (
            {"kind": "genq", "model": {"source": "timm"}},
            "model",
            "model: name is required with source='timm'",
        ),
    ],
)
def test_invalid_bodies_are_422s_naming_the_field(
    api: TestClient, redis_client: redis.Redis, body: dict[str, Any], field: str, message: str
):
    response = submit(api, body)

    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_request" and error["retryable"] is False
    assert error["message"].startswith(message), error["message"]
    assert error["fields"][0]["field"] == field
    assert "Traceback" not in response.text
    assert JobQueue(redis_client).depth() == 0


def test_limits_come_from_settings(make_client: Callable[..., TestClient]):
    api = make_client(max_bits=6, max_images_per_job=100)

    bits = submit(api, {**GENQ, "quant": {"weight_bits": 8}})
    images = submit(
        api,
        {
            **GENQ,
            "model": {"source": "timm", "name": "r", "num_classes": 10},
            "generation": {"num_per_class": 11},
        },
    )

    assert bits.status_code == 422
    assert error_of(bits)["message"] == (
        "quant.weight_bits: 8 bits is outside this service's range 2..6"
    )
    assert error_of(bits)["code"] == "limit_exceeded"
    assert images.status_code == 422
    assert error_of(images)["fields"][0]["field"] == "generation.num_per_class"
    assert "110 images" in error_of(images)["message"]


def test_jobs_may_only_name_the_tenants_own_ready_uploads_of_the_right_kind(
    api: TestClient, redis_client: redis.Redis, store: JobStore
):
    own_model = ready_upload(redis_client, "acme", UploadKind.MODEL, "m.safetensors")
    foreign_model = ready_upload(redis_client, "globex", UploadKind.MODEL, "m.safetensors")
    calibration = ready_upload(redis_client, "acme", UploadKind.CALIBRATION, "c.zip")

    def with_model(upload_id: str, name: str | None = "resnet18") -> dict[str, Any]:
        model = {"source": "upload", "upload_id": upload_id, "name": name}
        return {**GENQ, "model": model}

    unknown = submit(api, with_model("upl_00000000000000000000000000"))
    foreign = submit(api, with_model(foreign_model))
    wrong_kind = submit(api, with_model(calibration))
    no_architecture = submit(api, with_model(own_model, name=None))
    good = submit(api, with_model(own_model))

    for response in (unknown, foreign):
        assert response.status_code == 422
        assert error_of(response)["message"].startswith("model.upload_id: no upload")
    assert "is a 'calibration' upload, not 'model'" in error_of(wrong_kind)["message"]
    assert error_of(no_architecture)["fields"][0]["field"] == "model.name"
    assert good.status_code == 202, good.text
    job = store.get(good.json()["id"])
    assert job is not None
    assert job.config["model"]["upload_id"] == own_model


def test_a_pending_upload_is_refused(api: TestClient, redis_client: redis.Redis):
    uploads = UploadStore(redis_client)
    pending = uploads.save(uploads.new_record("acme", UploadKind.KSHOT, "k.zip", "zip"))
    body = {**GENQ, "data_scarce": {"kshot_upload_id": pending.id}}

    response = submit(api, body)

    assert response.status_code == 422
    assert error_of(response)["message"] == (
        f"data_scarce.kshot_upload_id: upload {pending.id} is pending, not ready"
    )


def test_quantize_needs_the_tenants_succeeded_dataset_job(api: TestClient, store: JobStore):
    dataset_job = submitted(api, GENERATE)
    other_tenant_job, _ = store.create("globex", "generate", {})
    finish(store, other_tenant_job.id)

    def quantize(job_id: str) -> httpx2.Response:
        body = {
            "kind": "quantize",
            "model": GENQ["model"],
            "calibration": {"dataset_job_id": job_id},
        }
        return submit(api, body)

    still_queued = quantize(dataset_job)
    foreign = quantize(other_tenant_job.id)
    finish(store, dataset_job)
    good = quantize(dataset_job)

    assert still_queued.status_code == 422
    assert error_of(still_queued)["message"] == (
        f"calibration.dataset_job_id: job {dataset_job} is queued; its dataset is not complete"
    )
    assert error_of(foreign)["message"].startswith("calibration.dataset_job_id: no job")
    assert good.status_code == 202, good.text


# ---- idempotency and the queue limit ------------------------------------------------------------


def test_same_idempotency_key_and_body_give_the_same_job_enqueued_once(
    api: TestClient, redis_client: redis.Redis
):
    first = submit(api, GENQ, **{"Idempotency-Key": "order-1"})
    again = submit(api, GENQ, **{"Idempotency-Key": "order-1"})
    other_body = submit(
        api, {**GENQ, "quant": {"weight_bits": 2}}, **{"Idempotency-Key": "order-1"}
    )

    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert JobQueue(redis_client).depth() == 1
    assert other_body.status_code == 409
    assert error_of(other_body)["code"] == "idempotency_conflict"
    assert first.json()["id"] in error_of(other_body)["message"]


def test_a_full_queue_answers_429_with_retry_after_and_keeps_no_job(
    make_client: Callable[..., TestClient], store: JobStore, redis_client: redis.Redis
):
    api = make_client(max_queue_depth=1, queue_full_retry_after_s=7)
    accepted = submit(api, GENQ)

    refused = submit(api, GENERATE, **{"Idempotency-Key": "k"})

    assert accepted.status_code == 202
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "7"
    assert error_of(refused) == {
        "code": "queue_full",
        "message": "the job queue is full; retry after 7 s",
        "retryable": True,
    }
    jobs, _ = store.list("acme")
    assert [job.id for job in jobs] == [accepted.json()["id"]]
    assert store.counts_by_status()["queued"] == 1
    # the idempotency key was freed with the discarded job: once there is room, it works
    redis_client.delete("genq:queue")
    assert submit(api, GENERATE, **{"Idempotency-Key": "k"}).status_code == 202


# ---- read, list, cancel -------------------------------------------------------------------------


def test_get_returns_status_progress_history_and_error(api: TestClient, store: JobStore):
    job_id = submitted(api)
    finish(store, job_id, JobStatus.FAILED)

    response = api.get(f"/v1/jobs/{job_id}", headers=ACME)

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "failed" and body["stage"] == "generating" and body["attempt"] == 1
    assert body["progress"]["stages"]["generating"] == {"done": 4, "total": 4}
    assert body["progress"]["images_generated"] == 4
    assert [(t["status"], t["stage"]) for t in body["transitions"]] == [
        ("queued", None),
        ("running", None),
        ("running", "generating"),
        ("failed", "generating"),
    ]
    assert body["error"] == {"code": "oom", "message": "out of memory", "retryable": False}
    assert body["config"]["model"]["name"] == "resnet18"
    assert body["urls"]["self"].endswith(job_id)
    assert "tenant" not in body


def test_list_pages_with_a_cursor_and_filters(api: TestClient, store: JobStore):
    ids = [submitted(api, GENQ if i % 2 else GENERATE) for i in range(5)]
    api.post(f"/v1/jobs/{ids[0]}/cancel", headers=ACME)

    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = api.get("/v1/jobs", params=params, headers=ACME).json()
        pages.append([job["id"] for job in body["data"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    canceled = api.get("/v1/jobs", params={"status": "canceled"}, headers=ACME).json()
    genq = api.get("/v1/jobs", params={"kind": "genq"}, headers=ACME).json()
    bad = api.get("/v1/jobs", params={"status": "done", "limit": 0}, headers=ACME)

    assert pages == [ids[::-1][0:2], ids[::-1][2:4], ids[::-1][4:]]
    assert [job["id"] for job in canceled["data"]] == [ids[0]]
    assert [job["id"] for job in genq["data"]] == [ids[3], ids[1]]
    assert bad.status_code == 422
    assert {f["field"] for f in error_of(bad)["fields"]} == {"status", "limit"}


def test_cancel_is_idempotent_and_a_no_op_on_finished_jobs(api: TestClient, store: JobStore):
    queued = submitted(api)
    running = submitted(api)
    done = submitted(api)
    store.start_attempt(running)
    finish(store, done)

    first = api.post(f"/v1/jobs/{queued}/cancel", headers=ACME)
    second = api.post(f"/v1/jobs/{queued}/cancel", headers=ACME)
    on_running = api.post(f"/v1/jobs/{running}/cancel", headers=ACME)
    on_done = api.post(f"/v1/jobs/{done}/cancel", headers=ACME)

    assert first.status_code == second.status_code == 200
    assert first.json()["status"] == second.json()["status"] == "canceled"
    assert len(second.json()["transitions"]) == 2  # canceled once
    assert on_running.json()["status"] == "running" and on_running.json()["cancel_requested"]
    assert on_done.json()["status"] == "succeeded" and not on_done.json()["cancel_requested"]


def test_other_tenants_get_404_everywhere_and_see_none_of_the_jobs(api: TestClient):
    job_id = submitted(api)

    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/jobs/{job_id}/artifacts"),
    ]:
        response = api.request(method, path, headers=GLOBEX)
        assert response.status_code == 404, (method, path)
        assert error_of(response)["code"] == "not_found"
    assert api.get("/v1/jobs", headers=GLOBEX).json() == {"data": [], "next_cursor": None}
    assert api.get(f"/v1/jobs/{job_id}", headers=ACME).json()["status"] == "queued"
    assert api.get("/v1/jobs/not-a-job-id", headers=ACME).status_code == 404


def test_requests_without_a_valid_key_are_401(api: TestClient):
    missing = api.get("/v1/jobs")
    wrong = api.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    basic = api.get("/v1/jobs", headers={"Authorization": "Basic YTpi"})

    assert missing.status_code == wrong.status_code == basic.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert wrong.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert error_of(missing)["code"] == "unauthorized"
    assert api.post("/v1/jobs", json=GENQ).status_code == 401


def test_an_unexpected_error_is_a_500_without_details(
    make_settings: Callable[..., ApiSettings], redis_client: redis.Redis
):
    app = create_app(make_settings(), redis=redis_client)
    with TestClient(app, raise_server_exceptions=False) as api:
        job_id = submitted(api)

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internals")

        app.state.genq.store.get = broken
        response = api.get(f"/v1/jobs/{job_id}", headers={**ACME, "X-Request-ID": "req-42"})

    assert response.status_code == 500
    assert error_of(response) == {
        "code": "internal",
        "message": "internal error; quote request id req-42 when reporting it",
        "retryable": False,
    }
    assert "secret internals" not in response.text


# ---- events -------------------------------------------------------------------------------------


def read_events(api: TestClient, job_id: str, **headers: str) -> list[dict[str, Any]]:
    """Every event of the job's stream, until the server ends it."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers={**ACME, **headers}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "data" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = json.loads(value) if name == "data" else value
    return events


def test_events_relay_the_history_in_order_and_end_on_a_terminal_job(
    api: TestClient, store: JobStore
):
    job_id = submitted(api)
    finish(store, job_id)

    events = read_events(api, job_id)

    assert [(e["event"], e["data"]["status"], e["data"]["stage"]) for e in events] == [
        ("created", "queued", None),
        ("transition", "running", None),
        ("transition", "running", "generating"),
        ("progress", "running", "generating"),
        ("transition", "succeeded", "generating"),
    ]
    assert all(e["id"] == e["data"]["id"] for e in events)
    assert events[3]["data"]["progress"]["images_generated"] == 4
    # resuming after the third event gives the rest only
    resumed = read_events(api, job_id, **{"Last-Event-ID": events[2]["id"]})
    assert [e["id"] for e in resumed] == [e["id"] for e in events[3:]]


def test_events_follow_a_running_job_until_it_ends(api: TestClient, store: JobStore):
    job_id = submitted(api)
    token = store.start_attempt(job_id)

    def work() -> None:
        time.sleep(0.4)  # longer than events_block_ms: the stream waits across reads
        store.set_stage(job_id, token, Stage.QUANTIZING)
        store.finish(job_id, token, JobStatus.SUCCEEDED)

    worker = threading.Thread(target=work)
    worker.start()
    events = read_events(api, job_id)
    worker.join()

    assert [e["data"]["status"] for e in events] == ["queued", "running", "running", "succeeded"]
    assert events[2]["data"]["stage"] == "quantizing"


# ---- artifacts ----------------------------------------------------------------------------------


def test_artifacts_are_409_before_the_manifest_then_presigned_urls_with_matching_sha256(
    api: TestClient, store: JobStore, s3_info: S3ServerInfo
):
    job_id = submitted(api)
    before = api.get(f"/v1/jobs/{job_id}/artifacts", headers=ACME)

    # the worker writes its outputs, then the manifest (keys relative to the job, as run_genq does)
    outputs = {
        "model/model.safetensors": (b"weights" * 100, "application/octet-stream"),
        "report.json": (b'{"top1": 0.9}', "application/json"),
        "synthetic/manifest.jsonl": (b'{"index": 0}\n', "application/x-ndjson"),
    }
    entries = []
    for key, (data, content_type) in outputs.items():
        bucket_name = "genq-data" if key.startswith("synthetic/") else "genq-results"
        bucket(s3_info, bucket_name).put_bytes(f"jobs/{job_id}/{key}", data, content_type)
        entries.append(
            {
                "name": key.replace("/", "-"),
                "key": key,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "content_type": content_type,
            }
        )
    manifest = json.dumps({"artifacts": entries}).encode()
    bucket(s3_info, "genq-results").put_bytes(f"jobs/{job_id}/artifacts.json", manifest)
    finish(store, job_id)

    after = api.get(f"/v1/jobs/{job_id}/artifacts", headers=ACME)

    assert before.status_code == 409
    assert error_of(before)["code"] == "not_ready" and error_of(before)["retryable"] is True
    assert after.status_code == 200, after.text
    body = after.json()
    assert datetime.fromisoformat(body["expires_at"]) > datetime.now(UTC)
    assert [a["key"] for a in body["artifacts"]] == list(outputs)
    for artifact in body["artifacts"]:
        download = httpx.get(artifact["url"])
        assert download.status_code == 200, artifact["key"]
        assert hashlib.sha256(download.content).hexdigest() == artifact["sha256"]
        assert len(download.content) == artifact["size"]


def test_a_failed_job_without_artifacts_is_a_final_409(api: TestClient, store: JobStore):
    job_id = submitted(api)
    finish(store, job_id, JobStatus.FAILED)

    response = api.get(f"/v1/jobs/{job_id}/artifacts", headers=ACME)

    assert response.status_code == 409
    assert error_of(response)["retryable"] is False
    assert "failed" in error_of(response)["message"]


def test_an_oversized_job_body_is_a_413(api: TestClient):
    body = {**GENQ, "generation": {"negative_prompt": "x" * (2 * 1024 * 1024)}}

    response = submit(api, body)

    assert response.status_code == 413
    assert error_of(response)["code"] == "too_large"
