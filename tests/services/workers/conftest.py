"""Fixtures of the worker tests: a real Redis, a real S3 server and worker settings that use them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import torch

from genq_core.storage import Storage
from services.common.jobstore import JobStore
from services.common.keys import BucketRole
from services.common.settings import Mode
from services.workers.settings import WorkerSettings
from services.workers.storage import open_storages
from tests.support.redis_server import redis_server
from tests.support.s3_server import s3_server

REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Services:
    """What a worker needs, all real: the job store on Redis, the buckets on an S3 server."""

    store: JobStore
    redis: redis.Redis
    storages: dict[BucketRole, Storage]
    settings: WorkerSettings


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    """The test machines' cores are shared with benchmarks."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    root = tmp_path_factory.mktemp("services")
    with redis_server(root / "redis", appendonly=False) as redis_info, s3_server(root / "s3") as s3:
        settings = WorkerSettings(
            mode=Mode.DISTRIBUTED,
            redis_url=redis_info.url,
            s3_endpoint=s3.endpoint,
            s3_access_key=s3.access_key,  # type: ignore[arg-type]
            s3_secret_key=s3.secret_key,  # type: ignore[arg-type]
            assets_dir=REPO_ROOT / "benchmarks" / "assets",
            model_cache_dir=root / "cache",
            shard_images=8,
            progress_interval_s=0.0,
            cancel_poll_s=0.0,
        )
        client = redis_info.client()
        try:
            yield Services(
                store=JobStore(client),
                redis=client,
                storages=open_storages(settings, create_buckets=True),
                settings=settings,
            )
        finally:
            client.close()
