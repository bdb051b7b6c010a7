"""Jobs through real Ray actors (a local Ray): the dispatcher's pool, warm models, a dead actor."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from services.common.jobs import JobStatus
from services.common.jobstore import JobStore
from services.workers.actors import RayPool
from services.workers.dispatcher import DispatcherSettings
from tests.services.workers.conftest import Services
from tests.services.workers.test_dispatcher import Env, drive, finished, shard_records
from tests.services.workers.test_runner import genq_body
from tests.support.ray_cluster import kill_processes_under, ray_client_env


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """``ray.init(address="local")`` with 2 CPUs and its files in a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="genqray-", dir="/tmp"))  # short: unix socket paths
    try:
        with ray_client_env():
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                object_store_memory=100 * 1024 * 1024,
                _temp_dir=str(root),
                logging_level=logging.ERROR,
            )
            try:
                yield
            finally:
                ray.shutdown()
    finally:
        kill_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def env(services: Services, local_ray: None) -> Env:
    settings = DispatcherSettings(
        **{
            **services.settings.model_dump(),
            "redis_prefix": "rayactors",
            "poll_s": 0.1,
            "threads": 1,
            "actor_num_cpus": 1,
            "retry_backoff_base_s": 0.5,
        }
    )
    store = JobStore(services.redis, settings.redis_prefix)
    return Env(services, settings, store, settings.make_queue(services.redis))


def test_jobs_run_on_ray_actors_that_keep_their_models_warm(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.workers")
    pool = RayPool(env.settings, size=1)
    try:
        dispatcher = env.dispatcher(pool, "ray-d1")
        first = env.submit("ray", genq_body(seed=31))
        drive([dispatcher], finished(env, first), timeout=300)
        second = env.submit("ray", genq_body(kind="generate", seed=32))  # same models
        drive([dispatcher], finished(env, second), timeout=300)
        for job_id in (first, second):
            record = env.job(job_id)
            assert record.status == JobStatus.SUCCEEDED, record.error
            assert record.result["images_generated"] == 40
        # each model was loaded once for both jobs, by the actor, on its node
        (stats,) = pool.stats()
        assert stats["classifier_loads"] == 1 and stats["generator_loads"] == 1
        assert {r.__dict__["node_id"] for r in shard_records(caplog, first)} == set(pool.node_ids)
    finally:
        pool.close()


def test_a_job_on_an_actor_that_dies_is_retried_on_its_restart(env: Env) -> None:
    pool = RayPool(env.settings, size=1)
    try:
        dispatcher = env.dispatcher(pool, "ray-d2")
        job_id = env.submit("raykill", genq_body(kind="generate", seed=33))
        drive([dispatcher], lambda: env.job(job_id).progress.images_generated > 0, timeout=300)
        ray.kill(pool.handle(0), no_restart=False)  # the process dies; Ray starts a new one
        drive([dispatcher], finished(env, job_id), timeout=300)
    finally:
        pool.close()
    record = env.job(job_id)
    assert record.status == JobStatus.SUCCEEDED and record.attempt == 2
    requeued = [t for t in record.transitions if t.status == JobStatus.QUEUED and t.attempt == 1]
    assert requeued, "the lost attempt went back to the queue"
