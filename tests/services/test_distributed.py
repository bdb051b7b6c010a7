"""The distributed mode end to end, every component real and in its own process: redis-server
(AOF on), a JuiceFS S3 gateway, a Ray head node, the API (``genq serve`` under uvicorn) and a
dispatcher with its Ray actor (``python -m services.workers``). Driven over HTTP only, by the
client: a job runs and its artifacts download through presigned URLs with their sha256 checked;
a running job is canceled; tenants are isolated; idempotency keys hold."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from genq_core.client import GenQClient, GenQError
from services.api.settings import hash_api_key
from tests.services.workers.test_runner import genq_body
from tests.support.processes import start_on_free_port, start_process, stop_process, wait_until
from tests.support.ray_cluster import RAY_ENV, ray_cluster
from tests.support.redis_server import redis_server
from tests.support.s3_server import s3_server

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY_ACME, KEY_GLOBEX = "acme-e2e-key", "globex-e2e-key"

TINY_JOB = genq_body()


@dataclass(frozen=True)
class Stack:
    url: str
    processes: tuple[subprocess.Popen[bytes], ...]
    logs: Path


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("distributed")
    processes: list[subprocess.Popen[bytes]] = []
    with ExitStack() as stack:
        # 1. the servers: Redis, S3, a Ray head with 2 CPUs
        redis_info = stack.enter_context(redis_server(root / "redis", appendonly=True))
        s3 = stack.enter_context(s3_server(root / "s3"))
        ray_info = stack.enter_context(ray_cluster([], head_cpus=2))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
        env.update(RAY_ENV)
        env.update(
            OMP_NUM_THREADS="1",
            GENQ_MODE="distributed",
            GENQ_REDIS_URL=redis_info.url,
            GENQ_S3_ENDPOINT=s3.endpoint,
            GENQ_S3_ACCESS_KEY=s3.access_key,
            GENQ_S3_SECRET_KEY=s3.secret_key,
            GENQ_API_KEYS=f"{hash_api_key(KEY_ACME)}=acme,{hash_api_key(KEY_GLOBEX)}=globex",
            GENQ_RAY_ADDRESS=ray_info.address,
            GENQ_NUM_ACTORS="1",
            GENQ_ACTOR_NUM_CPUS="1",
            GENQ_THREADS="1",
            GENQ_ASSETS_DIR=str(REPO_ROOT / "benchmarks" / "assets"),
            GENQ_MODEL_CACHE_DIR=str(root / "model-cache"),
            GENQ_POLL_S="0.1",
            GENQ_PROGRESS_INTERVAL_S="0",
            GENQ_CANCEL_POLL_S="0.2",
        )
        # 2. the dispatcher and its actor, on the Ray cluster
        dispatcher = start_process(
            [sys.executable, "-m", "services.workers"], root / "dispatcher.log", env
        )
        processes.append(dispatcher)
        stack.callback(stop_process, dispatcher, 60.0)
        # 3. the API, as `genq serve` runs it
        genq = str(Path(sys.executable).parent / "genq")
        api, port = start_on_free_port(
            lambda port: [genq, "serve", "--port", str(port), "--log-level", "warning"],
            _ready,
            what="genq serve",
            port_taken="address already in use",
            log_path=root / "api.log",
            timeout_s=60,
            env=env,
        )
        processes.append(api)
        stack.callback(stop_process, api)
        yield Stack(f"http://127.0.0.1:{port}", tuple(processes), root)
    for process in processes:  # every process this module started is gone
        assert process.poll() is not None


def _client(stack: Stack, key: str = KEY_ACME) -> GenQClient:
    return GenQClient(stack.url, key)


def _logs(stack: Stack) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(stack.logs.glob("*.log"))
    )


def test_a_job_runs_on_ray_and_every_artifact_downloads_with_its_sha256(
    stack: Stack, tmp_path: Path
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


def test_a_running_job_is_canceled(stack: Stack):
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


def test_tenants_see_only_their_own_jobs(stack: Stack):
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


def test_idempotency_keys_return_the_same_job_or_409(stack: Stack):
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
