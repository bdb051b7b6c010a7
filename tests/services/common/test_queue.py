"""The job queue against a real redis-server: depth limit, reclaim, dead letters, delayed retries."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from services.common.queue import JobQueue, QueueFull
from tests.support.redis_server import RedisServerInfo

IDLE_MS = 200  # small, so "a dead consumer" is quick to simulate


@pytest.fixture
def make_queue(client: redis.Redis) -> Callable[..., JobQueue]:
    def make(**options: object) -> JobQueue:
        settings: dict[str, object] = {
            "max_depth": 100,
            "reclaim_idle_ms": IDLE_MS,
            "max_deliveries": 3,
            "backoff_base_s": 0.3,
            "backoff_max_s": 1.0,
        }
        settings.update(options)
        return JobQueue(client, **settings)  # type: ignore[arg-type]

    return make


def test_a_message_is_delivered_once_and_gone_after_ack(make_queue: Callable[..., JobQueue]):
    queue = make_queue()
    message_id = queue.enqueue("job_a")
    assert queue.depth() == 1

    [message] = queue.read("dispatcher-1")
    assert (message.id, message.job_id, message.deliveries) == (message_id, "job_a", 1)
    assert queue.read("dispatcher-2") == []
    assert queue.depth() == 1  # in flight still counts

    assert queue.ack(message)
    assert queue.depth() == 0
    assert not queue.ack(message)


def test_enqueue_refuses_at_max_depth_with_a_retry_after(make_queue: Callable[..., JobQueue]):
    queue = make_queue(max_depth=3, full_retry_after_s=7)
    for name in "abc":
        queue.enqueue(f"job_{name}")

    with pytest.raises(QueueFull) as raised:
        queue.enqueue("job_d")
    assert (raised.value.retry_after_s, raised.value.depth, raised.value.max_depth) == (7, 3, 3)

    # in-flight and delayed messages count as well: only an ack makes room
    [message] = queue.read("dispatcher-1")
    assert queue.retry_later(message, attempt=1)
    with pytest.raises(QueueFull):
        queue.enqueue("job_d")
    [other] = queue.read("dispatcher-1")
    queue.ack(other)
    queue.enqueue("job_d")


def test_concurrent_enqueues_never_overshoot(make_queue: Callable[..., JobQueue]):
    queue = make_queue(max_depth=5)
    barrier = threading.Barrier(20)

    def enqueue(i: int) -> bool:
        barrier.wait()
        try:
            queue.enqueue(f"job_{i}")
        except QueueFull:
            return False
        return True

    with ThreadPoolExecutor(max_workers=20) as pool:
        accepted = sum(pool.map(enqueue, range(20)))
    assert accepted == 5 and queue.depth() == 5


def test_a_dead_consumers_message_is_reclaimed_after_the_idle_timeout(
    make_queue: Callable[..., JobQueue],
):
    queue = make_queue()
    queue.enqueue("job_a")
    [held] = queue.read("dispatcher-dead")  # ... and it never acks

    assert queue.reclaim("dispatcher-2") == []  # not idle long enough yet
    time.sleep(IDLE_MS / 1000 + 0.05)
    [taken] = queue.reclaim("dispatcher-2")

    assert (taken.id, taken.job_id, taken.deliveries) == (held.id, "job_a", 2)
    assert taken.consumer == "dispatcher-2"
    assert not queue.ack(held)  # the old holder can't ack what it lost
    assert not queue.heartbeat(held)
    assert queue.ack(taken)
    assert queue.depth() == 0


def test_heartbeats_keep_a_live_consumers_message(make_queue: Callable[..., JobQueue]):
    queue = make_queue()
    queue.enqueue("job_a")
    [held] = queue.read("dispatcher-1")
    for _ in range(4):  # 320 ms in all: longer than the idle timeout, so the heartbeats matter
        time.sleep(IDLE_MS / 1000 * 0.4)
        assert queue.heartbeat(held)
        assert queue.reclaim("dispatcher-2") == []
    assert queue.ack(held)


def test_a_message_delivered_too_often_becomes_a_dead_letter(make_queue: Callable[..., JobQueue]):
    queue = make_queue(max_deliveries=2)
    queue.enqueue("job_poison")
    [first] = queue.read("dispatcher-1")
    time.sleep(IDLE_MS / 1000 + 0.05)
    [second] = queue.reclaim("dispatcher-2")
    assert second.deliveries == 2
    time.sleep(IDLE_MS / 1000 + 0.05)

    assert queue.reclaim("dispatcher-3") == []
    [letter] = queue.dead_letters()
    assert (letter.message_id, letter.job_id, letter.deliveries) == (first.id, "job_poison", 3)
    assert letter.dead_at.tzinfo is not None
    assert queue.depth() == 0
    assert queue.read("dispatcher-3") == []


def test_a_delayed_retry_is_readable_only_after_its_backoff(make_queue: Callable[..., JobQueue]):
    queue = make_queue(backoff_base_s=0.3)
    queue.enqueue("job_a")
    [message] = queue.read("dispatcher-1")
    assert queue.retry_later(message, attempt=1)
    scheduled = time.monotonic()

    assert queue.read("dispatcher-1") == []
    assert queue.depth() == 1
    while not (again := queue.read("dispatcher-2")):
        assert time.monotonic() - scheduled < 2.0, "the retry never came back"
        time.sleep(0.02)

    assert time.monotonic() - scheduled >= 0.25
    assert [(m.job_id, m.deliveries) for m in again] == [("job_a", 1)]
    assert again[0].id != message.id


def test_a_blocking_read_wakes_up_for_a_due_retry(make_queue: Callable[..., JobQueue]):
    queue = make_queue(backoff_base_s=0.2)
    queue.enqueue("job_a")
    [message] = queue.read("dispatcher-1")
    queue.retry_later(message, attempt=1)

    started = time.monotonic()
    again = queue.read("dispatcher-1", block_ms=3000)
    assert [m.job_id for m in again] == ["job_a"]
    assert 0.15 <= time.monotonic() - started < 1.5


def test_backoff_doubles_up_to_the_max(make_queue: Callable[..., JobQueue]):
    queue = make_queue(backoff_base_s=0.3, backoff_max_s=1.0)
    assert [queue.backoff_s(n) for n in (1, 2, 3, 100)] == [0.3, 0.6, 1.0, 1.0]
    with pytest.raises(ValueError):
        queue.backoff_s(0)


def test_only_the_holder_can_schedule_a_retry(make_queue: Callable[..., JobQueue]):
    queue = make_queue()
    queue.enqueue("job_a")
    [held] = queue.read("dispatcher-dead")
    time.sleep(IDLE_MS / 1000 + 0.05)
    [taken] = queue.reclaim("dispatcher-2")

    assert not queue.retry_later(held, attempt=1)
    assert queue.depth() == 1
    assert queue.retry_later(taken, attempt=1)


def test_the_group_comes_back_after_redis_lost_it(
    make_queue: Callable[..., JobQueue], client: redis.Redis
):
    queue = make_queue()
    queue.enqueue("job_a")
    [held] = queue.read("dispatcher-1")
    client.flushdb()  # e.g. Redis restarted without its AOF

    assert not queue.ack(held)
    assert not queue.heartbeat(held)
    client.flushdb()
    assert queue.reclaim("dispatcher-2") == []
    client.flushdb()
    assert queue.read("dispatcher-1") == []
    queue.enqueue("job_b")
    assert [m.job_id for m in queue.read("dispatcher-1")] == ["job_b"]


def test_jobs_enqueued_before_the_first_dispatcher_are_delivered(server: RedisServerInfo):
    with server.client() as client:
        client.flushdb()
        JobQueue(client).enqueue("job_early")  # the API enqueues: a stream, no group yet
        dispatcher_queue = JobQueue(client)
        assert [m.job_id for m in dispatcher_queue.read("dispatcher-1")] == ["job_early"]


def test_making_a_queue_does_not_need_redis_up():
    JobQueue(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1))


def test_the_queue_checks_its_settings(client: redis.Redis):
    with pytest.raises(ValueError, match="max_depth"):
        JobQueue(client, max_depth=0)
    with pytest.raises(ValueError, match="backoff"):
        JobQueue(client, backoff_base_s=10, backoff_max_s=1)
