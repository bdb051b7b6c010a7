"""The distributed mode end to end, every component real and in its own process: redis-server
(AOF on), a JuiceFS S3 gateway, a Ray head node, the API (``genq serve`` under uvicorn) and a
dispatcher with its Ray actor (``python -m services.workers``). Driven over HTTP only, by the
client: a job runs and its artifacts download through presigned URLs with their sha256 checked;
a running job is canceled; tenants are isolated; idempotency keys hold."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from genq_core.client import GenQClient, GenQError
from tests.services.workers.test_runner import genq_body
from tests.support.processes import wait_until
from tests.support.service_stack import ServiceStack, distributed_stack

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY_ACME, KEY_GLOBEX = "acme-e2e-key", "globex-e2e-key"

TINY_JOB = genq_body()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    root = tmp_path_factory.mktemp("distributed")
    settings = {"GENQ_POLL_S": "0.1", "GENQ_PROGRESS_INTERVAL_S": "0", "GENQ_CANCEL_POLL_S": "0.2"}
    keys = {KEY_ACME: "acme", KEY_GLOBEX: "globex"}
    with distributed_stack(root, keys, settings) as running:
        yield running
    for process in (running.dispatcher, running.api):  # every process it started is gone
        assert process.poll() is not None


def _client(stack: ServiceStack, key: str = KEY_ACME) -> GenQClient:
    return GenQClient(stack.url, key)


def _logs(stack: ServiceStack) -> str:
    return stack.log_tails()


def test_a_job_runs_on_ray_and_every_artifact_downloads_with_its_sha256(
    stack: ServiceStack, tmp_path: Path
):
    with _client(stack) as client:
        job_id = client.submit(TINY_JOB)["id"]
        final = client.wait(job_id, timeout=300)
        assert final["status"] == "succeeded", (final, _logs(stack))
        artifacts = client.artifacts(job_id)
        assert {a["key"] for a in artifacts} >= {
            "model/model.safetensors",
            "model/encodings.json",
            "report.json",
            "synthetic/dataset.tar",
        }
        for artifact in artifacts:  # straight from S3, no API key
            body = httpx.get(artifact["url"]).raise_for_status().content
            assert hashlib.sha256(body).hexdigest() == artifact["sha256"], artifact["key"]
            assert len(body) == artifact["size"]
        report = json.loads(
            httpx.get(next(a["url"] for a in artifacts if a["key"] == "report.json")).content
        )
        assert report["job"]["id"] == job_id
        assert final["progress"]["images_generated"] == 40


def test_a_running_job_is_canceled(stack: ServiceStack):
    long_job = {**TINY_JOB, "quant": {"preset": "qdrop", "iters": 20_000}}
    with _client(stack) as client:
        job_id = client.submit(long_job)["id"]
        wait_until(
            lambda: client.get(job_id).get("stage") == "quantizing",
            240,
            f"job {job_id} to reach quantizing",
            stack.logs,
        )
        assert client.cancel(job_id)["status"] in ("running", "canceled")
        started = time.monotonic()
        final = client.wait(job_id, timeout=120)
        assert final["status"] == "canceled", (final, _logs(stack))
        assert time.monotonic() - started < 60
        assert client.cancel(job_id)["status"] == "canceled"  # idempotent


def test_tenants_see_only_their_own_jobs(stack: ServiceStack):
    with _client(stack) as acme, _client(stack, KEY_GLOBEX) as globex:
        job_id = acme.submit({**TINY_JOB, "generation": {**TINY_JOB["generation"], "seed": 7}})[
            "id"
        ]
        for call in (globex.get, globex.cancel, globex.artifacts):
            with pytest.raises(GenQError) as caught:
                call(job_id)
            assert caught.value.status == 404
        assert job_id not in {job["id"] for job in globex.list(limit=100)}
        assert acme.wait(job_id, timeout=300)["status"] == "succeeded"


def test_idempotency_keys_return_the_same_job_or_409(stack: ServiceStack):
    body = {**TINY_JOB, "generation": {**TINY_JOB["generation"], "seed": 11}}
    with _client(stack) as client:
        first = client.submit(body, idempotency_key="e2e-key-1")
        again = client.submit(body, idempotency_key="e2e-key-1")
        assert again["id"] == first["id"]
        with pytest.raises(GenQError) as caught:
            client.submit(
                {**body, "quant": {"preset": "qdrop", "iters": 3}}, idempotency_key="e2e-key-1"
            )
        assert caught.value.status == 409
        assert client.wait(first["id"], timeout=300)["status"] == "succeeded"
