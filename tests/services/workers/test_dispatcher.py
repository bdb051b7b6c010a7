"""The dispatcher with in-process workers (``InlinePool``) against a real Redis and a real S3 server:
jobs end as the runner's contract says, shards fan out fairly, lost workers and lost messages
are recovered, failures are retried with backoff or fail with their field."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import TypeAdapter

from genq_core.storage import Storage
from genq_core.storage_s3 import StorageError
from services.common import spec
from services.common.jobs import JobRecord, JobStatus, Stage
from services.common.jobstore import JobStore
from services.common.keys import BucketRole
from services.common.queue import JobQueue
from services.common.worker_metrics import worker_metrics_key
from services.workers.actors import GenQWorker
from services.workers.checkpoints import checkpoint_key, read_checkpoint
from services.workers.dispatcher import Dispatcher, DispatcherSettings, InlinePool, WorkerPool
from services.workers.storage import JobStorage
from services.workers.sweeps import requeue_lost_jobs
from tests.services.workers.conftest import Services
from tests.services.workers.test_runner import genq_body

_PREFIXES = itertools.count()


@dataclass
class Env:
    """One test's own key prefix in the shared Redis: store, queue and dispatcher settings."""

    services: Services
    settings: DispatcherSettings
    store: JobStore
    queue: JobQueue

    def submit(self, tenant: str, body: dict[str, Any], *, enqueue: bool = True) -> str:
        """Create a job as the API does (with its fingerprint) and, unless told not to, enqueue it."""
        config = dict(body)
        request = TypeAdapter(spec.JobRequest).validate_python(body)
        if not isinstance(request, spec.QuantizeJobRequest):
            config["generation_fingerprint"] = spec.generation_fingerprint(request)
        job, _ = self.store.create(tenant, body["kind"], config)
        if enqueue:
            self.queue.enqueue(job.id)
        return job.id

    def job(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        assert record is not None
        return record

    def dispatcher(self, pool: WorkerPool, consumer: str) -> Dispatcher:
        settings = self.settings.model_copy(update={"consumer": consumer})
        return Dispatcher(settings, self.services.redis, self.store, self.queue, pool)

    @contextmanager
    def pool(self, size: int, **workers: Any) -> Iterator[InlinePool]:
        workers.setdefault("storages", self.services.storages)
        pool = InlinePool([GenQWorker(self.settings, **workers) for _ in range(size)])
        try:
            yield pool
        finally:
            pool.close()


@pytest.fixture
def env(services: Services) -> Env:
    prefix = f"disp{next(_PREFIXES)}"
    settings = DispatcherSettings(
        **{
            **services.settings.model_dump(),
            "redis_prefix": prefix,
            "poll_s": 0.05,
            "reclaim_idle_ms": 1500,
            "retry_backoff_base_s": 0.5,
            "sweep_every_s": 0.2,
            "lost_enqueue_after_s": 0.5,
        }
    )
    store = JobStore(services.redis, prefix)
    return Env(services, settings, store, settings.make_queue(services.redis))


def drive(dispatchers: list[Dispatcher], until: Callable[[], bool], timeout: float = 120) -> None:
    """Step the dispatchers in turn until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out driving the dispatchers"
        for dispatcher in dispatchers:
            dispatcher.step()


def finished(env: Env, *job_ids: str) -> Callable[[], bool]:
    return lambda: all(env.job(job_id).is_terminal for job_id in job_ids)


def shard_records(caplog: pytest.LogCaptureFixture, job_id: str) -> list[logging.LogRecord]:
    """The dispatcher's "shard done" log lines of a job (they carry shard, node_id, actor)."""
    return [
        r
        for r in caplog.records
        if getattr(r, "job_id", None) == job_id and getattr(r, "node_id", None) is not None
    ]


def placements(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(job id, method) of every call the dispatcher placed on an actor, in order."""
    return [
        (r.__dict__["job_id"], r.__dict__["call"])
        for r in caplog.records
        if r.__dict__.get("call") is not None
    ]


def test_a_genq_job_succeeds_with_its_shards_over_every_worker(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="services.workers")
    job_id = env.submit("acme", genq_body(seed=11))
    with env.pool(2) as pool:
        dispatcher = env.dispatcher(pool, "d1")
        drive([dispatcher], finished(env, job_id))
        assert dispatcher.job_ids == []
    record = env.job(job_id)
    assert record.status == JobStatus.SUCCEEDED, record.error
    assert record.attempt == 1 and record.error is None
    assert record.result["images_generated"] == 40 and record.result["images_kept"] > 0
    assert {a["key"] for a in record.result["artifacts"]} >= {"model/model.safetensors"}
    assert record.progress.images_generated == 40
    assert record.progress.stages[Stage.GENERATING].done == 40
    stages = [t.stage for t in record.transitions if t.status == JobStatus.RUNNING]
    assert stages[-5:] == [
        Stage.GENERATING,
        Stage.FILTERING,
        Stage.QUANTIZING,
        Stage.EVALUATING,
        Stage.UPLOADING,
    ]
    # 5 shards of 8 images, on both workers; then the stages on one
    shards = shard_records(caplog, job_id)
    assert sorted(r.__dict__["shard"] for r in shards) == [0, 1, 2, 3, 4]
    assert {r.__dict__["actor"] for r in shards} == {0, 1}
    assert [m for j, m in placements(caplog) if j == job_id][-1] == "run_job"
    assert env.queue.depth() == 0


def test_two_jobs_share_the_pool(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="services.workers")
    first = env.submit("fair-a", genq_body(kind="generate", seed=21))
    second = env.submit("fair-b", genq_body(kind="generate", seed=22))
    with env.pool(2) as pool:
        drive([env.dispatcher(pool, "d1")], finished(env, first, second))
    for job_id in (first, second):
        assert env.job(job_id).status == JobStatus.SUCCEEDED
        assert env.job(job_id).result["images_generated"] == 40
    # every shard added its images and seconds to the worker metrics (/metrics)
    metrics = env.services.redis.hgetall(worker_metrics_key(env.settings.redis_prefix))
    assert int(metrics[b"images_generated"]) == 80 and float(metrics[b"generation_seconds"]) > 0
    # both were taken at once, and their shards alternate instead of one job's all going first
    shards = [job for job, method in placements(caplog) if method == "generate_shard"]
    assert sorted(shards) == sorted([first] * 5 + [second] * 5)
    assert shards.index(second) < len(shards) - 1 - shards[::-1].index(first)
    assert shards.index(first) < len(shards) - 1 - shards[::-1].index(second)
    # while both still had shards to make, neither got two turns more than the other
    both = shards[: 2 * min(shards.count(first), shards.count(second)) - 2]
    assert all(abs(both[:n].count(first) - both[:n].count(second)) <= 2 for n in range(len(both)))


def test_a_dead_dispatchers_job_resumes_on_another_at_its_last_stage(env: Env) -> None:
    job_id = env.submit("crash", genq_body(seed=12))
    quantizing, release = threading.Event(), threading.Event()

    def hang_when_quantizing(stage: str, done: int, total: int) -> None:
        if stage.split(":")[0] in ("calibrate", "reconstruct"):
            quantizing.set()
            release.wait(timeout=120)  # the "dead" worker: no more progress, no heartbeats

    seen: list[str] = []
    with (
        env.pool(1, observer=hang_when_quantizing) as doomed,
        env.pool(1, observer=lambda s, d, t: seen.append(s)) as healthy,
    ):
        # 1. the first dispatcher runs the job into quantizing, then stops stepping (dies)
        drive([env.dispatcher(doomed, "d1")], quantizing.is_set)
        storage = JobStorage(job_id, env.services.storages)
        assert read_checkpoint(storage, Stage.FILTERING) is not None
        # 2. a second dispatcher reclaims the message once it is idle and resumes the job
        clock = time.monotonic()
        drive([env.dispatcher(healthy, "d2")], finished(env, job_id))
        assert time.monotonic() - clock >= 1.0  # not before reclaim_idle_ms without heartbeats
        release.set()
    record = env.job(job_id)
    assert record.status == JobStatus.SUCCEEDED and record.attempt == 2
    stages = {name.split(":")[0] for name in seen}
    assert "generate" not in stages and "filter" not in stages and "reconstruct" in stages
    assert read_checkpoint(storage, Stage.GENERATING)["attempt"] == 1  # type: ignore[index]
    assert read_checkpoint(storage, Stage.QUANTIZING)["attempt"] == 2  # type: ignore[index]


class FlakyStorage:
    """A bucket whose puts of keys ending in ``fail_on`` fail ``times`` times (an S3 outage)."""

    def __init__(self, inner: Storage, fail_on: str, times: int) -> None:
        self._inner = inner
        self._fail_on = fail_on
        self.failures_left = times

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        if key.endswith(self._fail_on) and self.failures_left > 0:
            self.failures_left -= 1
            raise StorageError(f"S3 is unavailable (writing {key})")
        self._inner.put_bytes(key, data, content_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_storage_outage_is_retried_with_backoff(env: Env) -> None:
    job_id = env.submit("flaky", genq_body(kind="generate", seed=13))
    data = FlakyStorage(env.services.storages[BucketRole.DATA], "checkpoints/filtering.json", 1)
    storages = {**env.services.storages, BucketRole.DATA: data}
    with env.pool(1, storages=storages) as pool:
        drive([env.dispatcher(pool, "d1")], finished(env, job_id))
    record = env.job(job_id)
    assert data.failures_left == 0
    assert record.status == JobStatus.SUCCEEDED and record.attempt == 2 and record.error is None
    # attempt 1 went back to queued, attempt 2 started after the backoff and resumed at filtering
    requeued = next(
        t for t in record.transitions if t.status == JobStatus.QUEUED and t.attempt == 1
    )
    restarted = next(t for t in record.transitions if t.attempt == 2)
    assert (restarted.at - requeued.at).total_seconds() >= 0.5 - 0.01
    storage = JobStorage(job_id, env.services.storages)
    assert read_checkpoint(storage, Stage.GENERATING)["attempt"] == 1  # type: ignore[index]
    assert read_checkpoint(storage, Stage.FILTERING)["attempt"] == 2  # type: ignore[index]
    assert env.queue.depth() == 0


def test_a_bad_request_fails_with_its_field(env: Env) -> None:
    body = genq_body()
    body["model"] = {"source": "builtin", "name": "imagenet-resnet"}
    job_id = env.submit("bad", body)
    with env.pool(1) as pool:
        drive([env.dispatcher(pool, "d1")], finished(env, job_id))
    record = env.job(job_id)
    assert record.status == JobStatus.FAILED and record.attempt == 1
    assert record.error is not None and record.error.code == "invalid_request"
    assert record.error.message.startswith("model.name: unknown built-in model")
    assert not record.error.retryable
    assert env.queue.depth() == 0


def test_cancel_of_a_running_job_ends_it_canceled(env: Env) -> None:
    job_id = env.submit("cancel", genq_body(seed=14))
    with env.pool(2) as pool:
        dispatcher = env.dispatcher(pool, "d1")
        drive([dispatcher], lambda: env.job(job_id).stage == Stage.GENERATING)
        assert env.store.request_cancel(job_id, "cancel") is not None
        drive([dispatcher], finished(env, job_id))
    record = env.job(job_id)
    assert record.status == JobStatus.CANCELED
    storage = JobStorage(job_id, env.services.storages)
    assert not storage.exists(checkpoint_key(Stage.FILTERING))
    assert not storage.exists("report.json")
    assert env.queue.depth() == 0


def test_a_dispatcher_that_stalls_past_the_reclaim_time_keeps_its_job(env: Env) -> None:
    job_id = env.submit("stall", genq_body(seed=16))
    with env.pool(2) as pool:
        dispatcher = env.dispatcher(pool, "d1")
        drive([dispatcher], lambda: env.job(job_id).stage == Stage.GENERATING)
        # its step stalls past reclaim_idle_ms between its heartbeat and its reclaim (a loaded
        # machine): the reclaim hands it its own message back, and it must keep the job
        time.sleep(env.settings.reclaim_idle_ms / 1000 + 0.3)
        dispatcher._next_reclaim = 0.0  # due now
        dispatcher._take_work(block=False)
        assert dispatcher.job_ids == [job_id]
        drive([dispatcher], finished(env, job_id))
    record = env.job(job_id)
    assert record.status == JobStatus.SUCCEEDED and record.attempt == 1
    assert env.queue.depth() == 0


def test_dead_letters_fail_their_job(env: Env) -> None:
    settings = env.settings.model_copy(update={"max_deliveries": 1, "reclaim_idle_ms": 300})
    env.queue = settings.make_queue(env.services.redis)
    env.settings = settings
    job_id = env.submit("dead", genq_body(seed=15))
    # a dispatcher takes the job and dies at once
    (message,) = env.queue.read("ghost", count=1)
    env.store.start_attempt(job_id)
    time.sleep(0.4)
    # its next reclaim makes it a dead letter: running, with no message, but not to run again
    assert env.queue.reclaim("other", count=1) == []
    assert requeue_lost_jobs(env.services.redis, settings.redis_prefix, 0) == []
    with env.pool(1) as pool:
        drive([env.dispatcher(pool, "d1")], finished(env, job_id), timeout=30)
    record = env.job(job_id)
    assert record.status == JobStatus.FAILED
    assert record.error is not None and record.error.code == "worker_lost"
    assert [letter.job_id for letter in env.queue.dead_letters()] == [job_id]
    assert message.job_id == job_id and env.queue.depth() == 0


def test_a_job_whose_enqueue_was_lost_is_enqueued_again(env: Env) -> None:
    body = genq_body()
    body["model"] = {"source": "builtin", "name": "no-such-model"}  # fails fast once it runs
    lost = env.submit("lost", body, enqueue=False)
    prefix = env.settings.redis_prefix
    redis = env.services.redis
    assert requeue_lost_jobs(redis, prefix, 60_000) == []  # too young to be lost
    time.sleep(0.6)
    waiting = env.submit("lost", body)  # old enough too, but it has its message
    time.sleep(0.6)
    with env.pool(1) as pool:
        drive([env.dispatcher(pool, "d1")], finished(env, lost, waiting), timeout=30)
    for job_id in (lost, waiting):
        record = env.job(job_id)
        assert record.status == JobStatus.FAILED and record.attempt == 1  # ran exactly once
        assert record.error is not None and record.error.code == "invalid_request"
    assert requeue_lost_jobs(redis, prefix, 0) == [] and env.queue.depth() == 0


def test_a_running_job_whose_message_was_acked_is_taken_over(env: Env) -> None:
    settings = env.settings.model_copy(update={"reclaim_idle_ms": 300})
    env.queue = settings.make_queue(env.services.redis)
    env.settings = settings
    body = genq_body()
    body["model"] = {"source": "builtin", "name": "no-such-model"}  # fails fast once it runs
    orphan, held = env.submit("orphan", body), env.submit("orphan", body)
    # a dispatcher runs both; one message is acked while its job still runs
    messages = {m.job_id: m for m in env.queue.read("ghost", count=2)}
    for job_id in (orphan, held):
        env.store.start_attempt(job_id)
    assert env.queue.ack(messages[orphan])
    redis, prefix = env.services.redis, settings.redis_prefix
    assert requeue_lost_jobs(redis, prefix, 60_000) == []  # touched too recently
    time.sleep(0.6)
    # `held` still has its message (in flight): only the orphan is enqueued, once
    assert requeue_lost_jobs(redis, prefix, 500) == [orphan]
    assert requeue_lost_jobs(redis, prefix, 500) == []
    with env.pool(1) as pool:
        drive([env.dispatcher(pool, "d1")], finished(env, orphan, held), timeout=30)
    for job_id in (orphan, held):
        record = env.job(job_id)
        assert record.status == JobStatus.FAILED and record.attempt == 2  # a new attempt took over
        assert record.error is not None and record.error.code == "invalid_request"
    assert env.queue.depth() == 0


def test_shutdown_requeues_the_running_job(env: Env) -> None:
    job_id = env.submit("shutdown", genq_body(seed=16))
    with env.pool(1) as pool:
        dispatcher = env.dispatcher(pool, "d1")
        drive([dispatcher], lambda: env.job(job_id).stage == Stage.GENERATING)
        dispatcher.shutdown(grace_s=0.0)
        record = env.job(job_id)
        assert record.status == JobStatus.QUEUED
        assert record.error is not None and record.error.code == "worker_shutdown"
        assert env.queue.depth() == 1 and dispatcher.job_ids == []
    # another dispatcher picks it up after the backoff and finishes it
    with env.pool(1) as pool:
        drive([env.dispatcher(pool, "d2")], finished(env, job_id))
    record = env.job(job_id)
    assert record.status == JobStatus.SUCCEEDED and record.attempt == 2
