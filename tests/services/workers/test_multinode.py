"""Scale-out over a real multi-node Ray cluster: ``ray start --head`` plus two ``ray start --address``
worker nodes on this machine, one actor on each, one job's shards on both."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import ray

from services.common.jobs import JobStatus
from services.common.jobstore import JobStore
from services.workers.actors import RayPool
from services.workers.dispatcher import DispatcherSettings
from tests.services.workers.conftest import Services
from tests.services.workers.test_dispatcher import Env, drive, finished, shard_records
from tests.services.workers.test_runner import genq_body
from tests.support.ray_cluster import RayClusterInfo, WorkerNode, ray_client_env, ray_cluster

NODE_RESOURCES = ({"genq_node_a": 1.0}, {"genq_node_b": 1.0})


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayClusterInfo]:
    """A head node without CPUs and two worker nodes of 1 CPU, each with its own resource."""
    nodes = [WorkerNode(1, NODE_RESOURCES[0]), WorkerNode(1, NODE_RESOURCES[1])]
    with ray_client_env(), ray_cluster(nodes) as info:
        ray.init(address=info.address, logging_level=logging.ERROR)
        try:
            yield info
        finally:
            ray.shutdown()


# Three Ray nodes on 2 cores take ~25 s to start; the worker nodes join one at a time
# (tests/support/ray_cluster.py), since several joining at once timed out here.
def test_one_jobs_shards_spread_over_two_nodes(
    services: Services, cluster: RayClusterInfo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.workers")
    settings = DispatcherSettings(
        **{
            **services.settings.model_dump(),
            "redis_prefix": "multinode",
            "poll_s": 0.1,
            "threads": 1,
            "actor_num_cpus": 1,
        }
    )
    env = Env(
        services,
        settings,
        JobStore(services.redis, settings.redis_prefix),
        settings.make_queue(services.redis),
    )
    pool = RayPool(settings, size=2, resources=NODE_RESOURCES)
    try:
        assert len(set(pool.node_ids)) == 2  # one actor on each worker node
        job_id = env.submit("multinode", genq_body(kind="generate", seed=41))
        drive([env.dispatcher(pool, "multinode-d1")], finished(env, job_id), timeout=300)
    finally:
        pool.close()
    record = env.job(job_id)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert record.result["images_generated"] == 40
    shards = shard_records(caplog, job_id)
    assert sorted(r.__dict__["shard"] for r in shards) == [0, 1, 2, 3, 4]
    nodes = {r.__dict__["node_id"] for r in shards}
    assert len(nodes) == 2 and nodes == set(pool.node_ids)
