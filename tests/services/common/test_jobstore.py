"""The job store against a real redis-server: idempotency, tenants, pagination, fencing, cancel, events."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from services.common.jobs import (
    EventType,
    InvalidTransition,
    JobError,
    JobKind,
    JobRecord,
    JobStatus,
    Stage,
    new_job_id,
)
from services.common.jobstore import IdempotencyConflict, JobNotFound, JobStore, StaleAttempt
from services.common.queue import JobQueue
from tests.support.redis_server import RedisServerInfo, redis_server

CONFIG = {"model": "resnet18", "bits": {"w": 4, "a": 4}, "filters": [], "seed": 0}
OOM = JobError(code="worker_lost", message="the worker died", retryable=True)


@pytest.fixture
def store(client: redis.Redis) -> JobStore:
    return JobStore(client)


def running_job(store: JobStore, tenant: str = "acme") -> tuple[JobRecord, int]:
    job, _ = store.create(tenant, JobKind.GENQ, CONFIG)
    return job, store.start_attempt(job.id)


# ---- create and idempotency --------------------------------------------------------------------


def test_create_stores_a_queued_job_with_its_config(store: JobStore):
    job, created = store.create("acme", "genq", CONFIG)

    assert created
    assert job.status is JobStatus.QUEUED and job.stage is None and job.attempt == 0
    assert job.config == CONFIG and job.result == {} and job.error is None
    assert [(t.status, t.attempt) for t in job.transitions] == [(JobStatus.QUEUED, 0)]
    assert job.created_at == job.updated_at == job.transitions[0].at
    assert job.created_at.tzinfo is not None
    assert store.get(job.id) == job


def test_same_idempotency_key_and_body_returns_the_same_job(store: JobStore):
    first, created_first = store.create("acme", "genq", CONFIG, "key-1", "hash-a")
    again, created_again = store.create("acme", "genq", CONFIG, "key-1", "hash-a")

    assert created_first and not created_again
    assert again.id == first.id
    assert store.counts_by_status()["queued"] == 1


def test_same_idempotency_key_with_another_body_is_a_conflict(store: JobStore):
    first, _ = store.create("acme", "genq", CONFIG, "key-1", "hash-a")

    with pytest.raises(IdempotencyConflict) as raised:
        store.create("acme", "genq", {**CONFIG, "seed": 1}, "key-1", "hash-b")
    assert raised.value.job_id == first.id


def test_idempotency_keys_are_per_tenant(store: JobStore):
    a, _ = store.create("acme", "genq", CONFIG, "key-1", "hash-a")
    b, created = store.create("globex", "genq", CONFIG, "key-1", "hash-b")

    assert created and a.id != b.id


def test_concurrent_creates_with_one_key_make_one_job(store: JobStore):
    barrier = threading.Barrier(20)

    def create(_: int) -> tuple[str, bool]:
        barrier.wait()
        job, created = store.create("acme", "quantize", CONFIG, "same-key", "same-hash")
        return job.id, created

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(create, range(20)))

    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(store.list("acme")[0]) == 1
    assert store.counts_by_status()["queued"] == 1


def test_create_checks_its_inputs(store: JobStore):
    with pytest.raises(ValueError, match="tenant"):
        store.create("a:b", "genq", CONFIG)
    with pytest.raises(ValueError):
        store.create("acme", "train", CONFIG)
    with pytest.raises(ValueError, match="idempotency key"):
        store.create("acme", "genq", CONFIG, idempotency_key="")


# ---- tenants and listing ---------------------------------------------------------------------------


def test_another_tenant_cannot_see_a_job(store: JobStore):
    job, _ = store.create("acme", "genq", CONFIG)

    assert store.get(job.id, tenant="acme") == job
    assert store.get(job.id, tenant="globex") is None
    assert store.list("globex") == ([], None)
    assert store.request_cancel(job.id, "globex") is None
    assert store.get(job.id, "acme").status is JobStatus.QUEUED  # type: ignore[union-attr]


def test_unknown_and_malformed_ids_are_not_found(store: JobStore):
    assert store.get(new_job_id()) is None
    assert store.get("job_nope") is None
    assert store.get("../../etc/passwd") is None
    with pytest.raises(JobNotFound):
        store.start_attempt(new_job_id())


def test_pagination_over_120_jobs_with_filters(store: JobStore):
    kinds = [JobKind.GENQ, JobKind.GENERATE, JobKind.QUANTIZE]
    jobs = [store.create("acme", kinds[i % 3], {"i": i})[0] for i in range(120)]
    store.create("globex", JobKind.GENQ, CONFIG)
    for job in jobs[::4]:
        store.start_attempt(job.id)
    for job in jobs[1::10]:
        store.request_cancel(job.id, "acme")
    status_of = {job.id: store.get(job.id).status for job in jobs}  # type: ignore[union-attr]

    def walk(**filters: object) -> list[str]:
        seen: list[str] = []
        cursor = None
        while True:
            page, cursor = store.list("acme", cursor=cursor, limit=25, **filters)  # type: ignore[arg-type]
            assert len(page) <= 25
            seen += [job.id for job in page]
            if cursor is None:
                return seen

    everything = walk()
    assert everything == sorted((job.id for job in jobs), reverse=True)  # newest first, no repeats

    quantize = walk(kind="quantize")
    assert quantize == sorted((j.id for j in jobs if j.kind is JobKind.QUANTIZE), reverse=True)

    running = walk(status="running")
    assert running == sorted(
        (i for i, s in status_of.items() if s is JobStatus.RUNNING), reverse=True
    )
    assert len(running) == 30

    canceled_generate = walk(status=JobStatus.CANCELED, kind=JobKind.GENERATE)
    expected = [
        j.id for j in jobs if j.kind is JobKind.GENERATE and status_of[j.id] is JobStatus.CANCELED
    ]
    assert canceled_generate == sorted(expected, reverse=True)
    assert canceled_generate  # the filter combination is not vacuous


def test_pages_are_stable_when_jobs_are_created_meanwhile(store: JobStore):
    jobs = [store.create("acme", "genq", {"i": i})[0] for i in range(30)]
    first, cursor = store.list("acme", limit=10)
    time.sleep(0.002)  # the new ids are from a later millisecond, so they sort first
    newcomers = [store.create("acme", "genq", {"new": i})[0] for i in range(5)]

    rest: list[str] = []
    while cursor is not None:
        page, cursor = store.list("acme", cursor=cursor, limit=10)
        rest += [job.id for job in page]

    assert [job.id for job in first] + rest == sorted((j.id for j in jobs), reverse=True)
    newest = [job.id for job in store.list("acme", limit=5)[0]]
    assert newest == sorted((job.id for job in newcomers), reverse=True)


def test_last_full_page_has_no_cursor(store: JobStore):
    for i in range(10):
        store.create("acme", "genq", {"i": i})
    page, cursor = store.list("acme", limit=10)
    assert len(page) == 10 and cursor is None


def test_list_checks_its_inputs(store: JobStore):
    with pytest.raises(ValueError, match="cursor"):
        store.list("acme", cursor="not-a-cursor")
    with pytest.raises(ValueError, match="limit"):
        store.list("acme", limit=0)
    with pytest.raises(ValueError):
        store.list("acme", status="paused")


# ---- attempts, fencing and transitions ---------------------------------------------------------------


def test_worker_lifecycle_records_every_transition(store: JobStore):
    job, token = running_job(store)
    assert token == 1
    store.set_stage(job.id, token, Stage.GENERATING)
    store.update_progress(job.id, token, stage="generating", done=4, total=8, images_generated=4)
    store.update_progress(job.id, token, images_kept=3)
    store.set_stage(job.id, token, Stage.QUANTIZING)
    store.update_progress(job.id, token, stage=Stage.QUANTIZING, total=12)
    store.finish(job.id, token, JobStatus.SUCCEEDED, result={"model": f"jobs/{job.id}/model"})

    done = store.get(job.id)
    assert done is not None and done.is_terminal
    assert done.status is JobStatus.SUCCEEDED and done.result == {"model": f"jobs/{job.id}/model"}
    assert [(t.status.value, t.stage and t.stage.value) for t in done.transitions] == [
        ("queued", None),
        ("running", None),
        ("running", "generating"),
        ("running", "quantizing"),
        ("succeeded", "quantizing"),
    ]
    ats = [t.at for t in done.transitions]
    assert ats == sorted(ats)
    assert done.progress.stages[Stage.GENERATING].done == 4
    assert done.progress.stages[Stage.QUANTIZING].total == 12
    assert (done.progress.images_generated, done.progress.images_kept) == (4, 3)


def test_a_stale_attempt_cannot_write_after_a_newer_one_started(store: JobStore):
    job, old = running_job(store)
    new = store.start_attempt(job.id)  # a dispatcher took the job over from a lost worker
    assert new == 2

    with pytest.raises(StaleAttempt) as raised:
        store.set_stage(job.id, old, Stage.FILTERING)
    assert (raised.value.token, raised.value.current) == (1, 2)
    with pytest.raises(StaleAttempt):
        store.update_progress(job.id, old, images_kept=1)
    with pytest.raises(StaleAttempt):
        store.finish(job.id, old, JobStatus.SUCCEEDED, result={"stale": True})
    with pytest.raises(StaleAttempt):
        store.requeue(job.id, old, OOM)

    store.set_stage(job.id, new, Stage.FILTERING)
    current = store.get(job.id)
    assert current is not None
    assert current.status is JobStatus.RUNNING and current.stage is Stage.FILTERING
    assert current.attempt == 2 and current.result == {}


def test_requeue_then_a_new_attempt_fences_the_old_one(store: JobStore):
    job, first = running_job(store)
    assert store.requeue(job.id, first, OOM) is JobStatus.QUEUED
    queued = store.get(job.id)
    assert queued is not None and queued.status is JobStatus.QUEUED and queued.error == OOM

    second = store.start_attempt(job.id)
    with pytest.raises(StaleAttempt):
        store.finish(job.id, first, JobStatus.FAILED, error=OOM)
    store.finish(job.id, second, JobStatus.SUCCEEDED)
    final = store.get(job.id)
    assert final is not None and final.error is None and final.attempt == 2


def test_illegal_transitions_are_refused(store: JobStore):
    job, token = running_job(store)
    store.finish(job.id, token, JobStatus.FAILED, error=OOM)
    store.finish(job.id, token, JobStatus.FAILED, error=OOM)  # a retried write is a no-op

    with pytest.raises(InvalidTransition, match="'failed' -> 'running'"):
        store.start_attempt(job.id)
    with pytest.raises(InvalidTransition, match="'failed' -> 'succeeded'"):
        store.finish(job.id, token, JobStatus.SUCCEEDED)
    with pytest.raises(InvalidTransition):
        store.set_stage(job.id, token, Stage.EVALUATING)
    with pytest.raises(InvalidTransition):
        store.update_progress(job.id, token, images_kept=1)
    with pytest.raises(InvalidTransition):
        store.requeue(job.id, token, OOM)

    queued, _ = store.create("acme", "genq", CONFIG)
    with pytest.raises(InvalidTransition, match="'queued' -> 'succeeded'"):
        store.finish(queued.id, 0, JobStatus.SUCCEEDED)

    record = store.get(job.id)
    assert record is not None
    assert [t.status for t in record.transitions] == [
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.FAILED,
    ]


def test_worker_writes_check_their_inputs(store: JobStore):
    job, token = running_job(store)
    with pytest.raises(ValueError, match="needs a JobError"):
        store.finish(job.id, token, JobStatus.FAILED)
    with pytest.raises(ValueError, match="terminal"):
        store.finish(job.id, token, JobStatus.RUNNING)
    with pytest.raises(ValueError, match="unknown progress counter"):
        store.update_progress(job.id, token, images_dreamed=1)
    with pytest.raises(ValueError, match="stage"):
        store.update_progress(job.id, token, done=1)
    with pytest.raises(ValueError, match="non-negative"):
        store.update_progress(job.id, token, images_kept=-1)
    with pytest.raises(ValueError):
        store.set_stage(job.id, token, "sleeping")


# ---- cancellation ----------------------------------------------------------------------------------------


def test_cancel_a_queued_job_is_immediate_and_idempotent(store: JobStore):
    job, _ = store.create("acme", "genq", CONFIG)

    canceled = store.request_cancel(job.id, "acme")
    again = store.request_cancel(job.id, "acme")

    assert canceled is not None and canceled.status is JobStatus.CANCELED
    assert again == canceled
    assert [t.status for t in canceled.transitions] == [JobStatus.QUEUED, JobStatus.CANCELED]
    with pytest.raises(InvalidTransition):
        store.start_attempt(job.id)  # the dispatcher drops its queue message


def test_cancel_a_running_job_asks_the_worker(store: JobStore):
    job, token = running_job(store)
    assert not store.is_cancel_requested(job.id)

    asked = store.request_cancel(job.id, "acme")
    assert asked is not None and asked.status is JobStatus.RUNNING and asked.cancel_requested
    assert store.request_cancel(job.id, "acme") == asked
    assert store.is_cancel_requested(job.id)

    store.finish(job.id, token, JobStatus.CANCELED)
    final = store.get(job.id)
    assert final is not None and final.status is JobStatus.CANCELED


def test_requeue_after_a_cancel_request_cancels(store: JobStore):
    job, token = running_job(store)
    store.request_cancel(job.id, "acme")
    assert store.requeue(job.id, token, OOM) is JobStatus.CANCELED


def test_cancel_a_finished_job_changes_nothing(store: JobStore):
    job, token = running_job(store)
    store.finish(job.id, token, JobStatus.SUCCEEDED)
    finished = store.get(job.id)

    assert store.request_cancel(job.id, "acme") == finished
    assert store.request_cancel(new_job_id(), "acme") is None


def test_discard_removes_only_a_never_started_job(store: JobStore):
    job, _ = store.create("acme", "genq", CONFIG, "key-1", "hash-a")
    started, _ = running_job(store)

    assert store.discard(job.id)
    assert not store.discard(started.id)
    assert store.get(job.id) is None
    assert [j.id for j in store.list("acme")[0]] == [started.id]
    assert store.counts_by_status()["queued"] == 0
    again, created = store.create("acme", "genq", CONFIG, "key-1", "hash-a")
    assert created and again.id != job.id  # the key is free again


# ---- events and counts ---------------------------------------------------------------------------------------


def test_events_stream_every_change_in_order(store: JobStore):
    job, token = running_job(store)
    store.set_stage(job.id, token, Stage.GENERATING)
    store.update_progress(job.id, token, stage=Stage.GENERATING, done=1, total=2)
    store.request_cancel(job.id, "acme")
    store.finish(job.id, token, JobStatus.CANCELED)

    events = store.events(job.id)
    assert [(e.type, e.status, e.attempt) for e in events] == [
        (EventType.CREATED, JobStatus.QUEUED, 0),
        (EventType.TRANSITION, JobStatus.RUNNING, 1),
        (EventType.TRANSITION, JobStatus.RUNNING, 1),
        (EventType.PROGRESS, JobStatus.RUNNING, 1),
        (EventType.CANCEL_REQUESTED, JobStatus.RUNNING, 1),
        (EventType.TRANSITION, JobStatus.CANCELED, 1),
    ]
    assert events[3].progress is not None
    assert events[3].progress.stages[Stage.GENERATING].total == 2
    stream_order = sorted(events, key=lambda e: tuple(map(int, e.id.split("-"))))
    assert [e.id for e in events] == [e.id for e in stream_order]
    assert [e.id for e in store.events(job.id, last_id=events[3].id)] == [e.id for e in events[4:]]


def test_events_block_until_the_next_change(store: JobStore):
    job, token = running_job(store)
    last = store.events(job.id)[-1].id
    started = time.monotonic()
    assert store.events(job.id, last_id=last, block_ms=50) == []
    assert time.monotonic() - started >= 0.04

    timer = threading.Timer(0.1, store.set_stage, args=(job.id, token, Stage.FILTERING))
    timer.start()
    try:
        fresh = store.events(job.id, last_id=last, block_ms=3000)
    finally:
        timer.join()
    assert [e.stage for e in fresh] == [Stage.FILTERING]


def test_counts_follow_every_transition(store: JobStore):
    a, token_a = running_job(store)
    b, token_b = running_job(store)
    store.create("acme", "genq", CONFIG)
    c, _ = store.create("globex", "genq", CONFIG)
    store.finish(a.id, token_a, JobStatus.SUCCEEDED)
    store.requeue(b.id, token_b, OOM)
    store.request_cancel(c.id, "globex")

    assert store.counts_by_status() == {
        "queued": 2,
        "running": 0,
        "succeeded": 1,
        "failed": 0,
        "canceled": 1,
    }


@pytest.mark.parametrize("options", [{"decode_responses": True}, {"protocol": 3}])
def test_other_client_settings_work_too(
    server: RedisServerInfo, client: redis.Redis, options: dict[str, object]
):
    store = JobStore(server.client(**options))
    job, token = running_job(store)
    store.update_progress(job.id, token, stage="generating", done=1, total=1)
    assert store.get(job.id) == JobStore(client).get(job.id)
    assert len(store.events(job.id)) == 3


# ---- durability ------------------------------------------------------------------------------------------------


def test_jobs_and_queue_survive_a_restart_with_aof(tmp_path: Path):
    with redis_server(tmp_path, appendonly=True) as first:
        store = JobStore(first.client())
        job, token = running_job(store)
        store.set_stage(job.id, token, Stage.GENERATING)
        JobQueue(first.client()).enqueue(job.id)
        before = store.get(job.id)

    with redis_server(tmp_path, appendonly=True) as second:
        assert second.port != first.port or second.pid != first.pid
        store = JobStore(second.client())
        assert store.get(job.id) == before
        assert store.counts_by_status()["running"] == 1
        queue = JobQueue(second.client())
        assert queue.depth() == 1
        assert [m.job_id for m in queue.read("dispatcher-1")] == [job.id]


def test_a_missing_redis_server_binary_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("shutil.which", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match=r"scripts/install\.sh"), redis_server(tmp_path):
        pass
