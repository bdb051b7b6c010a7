"""Periodic repairs the dispatcher runs: jobs whose queue message is gone for good.

Two ways a job can be stuck without any worker ever picking it up again:

- **dead letters**: ``JobQueue.reclaim`` gave up on a message its dispatchers kept dying on and
  moved it to the dead letters; the queue can't touch job records, so the job still says
  ``queued``/``running``. :func:`fail_dead_letters` fails it (``worker_lost``).
- **lost messages**: the API creates a job (``JobStore.create``) and then enqueues it
  (``JobQueue.enqueue``) in two steps; if it crashes in between, the job is ``queued`` forever
  with no message. A ``running`` job whose message was acked while a dispatcher still ran it
  (a bug, or a hand-edited queue) is stuck the same way: its dispatcher drops it at the next
  failed heartbeat and nobody reclaims it. :func:`requeue_lost_jobs` finds queued or running
  jobs untouched for longer than a threshold that are neither in the stream nor in the delayed
  set and enqueues them again; the dispatcher that reads the new message takes the job over
  (``JobStore.start_attempt`` fences out the old attempt).

Neither ``JobStore`` nor ``JobQueue`` has a method for the second, and the worker may not change
``services/common``; so this module reads the Redis keys those two document as their layout
(``P:tenant:{t}:jobs:{status}``, ``P:job:{id}`` fields ``status``/``updated_at``/``attempt``,
``P:queue``, ``P:queue:delayed``) and re-enqueues with one Lua script that checks again, so
concurrent sweepers on several dispatchers never enqueue a job twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, MutableSet
from typing import Any, cast

from redis import Redis

from services.common.jobs import InvalidTransition, JobError, JobStatus
from services.common.jobstore import JobNotFound, JobStore, StaleAttempt
from services.common.queue import JobQueue

__all__ = ["current_attempt", "fail_dead_letters", "indexed_job_ids", "requeue_lost_jobs"]

logger = logging.getLogger(__name__)

_SCAN_BATCH = 500
# statuses whose job must have a queue message somewhere (the stream or the delayed set)
_NEEDS_MESSAGE = (JobStatus.QUEUED, JobStatus.RUNNING)


def fail_dead_letters(store: JobStore, queue: JobQueue, handled: MutableSet[str]) -> list[str]:
    """Fail each dead letter's job that isn't terminal yet; returns the job ids failed now.

    ``start_attempt`` first fences out any zombie still running the job, then ``finish(FAILED)``
    records why. A letter whose job is terminal, gone or already handled by this process
    (``handled``, message ids) is skipped, so a repeated sweep costs one read per new letter.
    """
    failed: list[str] = []
    for letter in queue.dead_letters():
        if letter.message_id in handled:
            continue
        record = store.get(letter.job_id)
        if record is not None and not record.is_terminal:
            error = JobError(
                code="worker_lost",
                message=(
                    f"the workers running this job stopped {letter.deliveries} times without "
                    "finishing it; it was given up on"
                ),
                # it took its workers down that often in a row: the same request likely would again
                retryable=False,
            )
            try:
                token = store.start_attempt(letter.job_id)
                store.finish(letter.job_id, token, JobStatus.FAILED, error=error)
                failed.append(letter.job_id)
                logger.warning(
                    "job %s failed: dead letter after %d deliveries",
                    letter.job_id,
                    letter.deliveries,
                    extra={"job_id": letter.job_id},
                )
            except (InvalidTransition, JobNotFound, StaleAttempt):
                pass  # it finished, vanished or was taken over meanwhile: nothing to repair
        handled.add(letter.message_id)
    return failed


def requeue_lost_jobs(redis: Redis, prefix: str, older_than_ms: int) -> list[str]:
    """Enqueue again every queued or running job untouched for ``older_than_ms`` that has no message.

    Returns the job ids enqueued. A candidate is checked again atomically, in one script, just
    before its message is added (still queued or running, still untouched, still in neither the
    stream nor the delayed set), so a job that the API enqueued late, that finished meanwhile or
    that another sweeper repaired is left alone.
    The queue's ``max_depth`` is not applied: the API accepted these jobs already.
    """
    if older_than_ms < 0:
        raise ValueError(f"older_than_ms must be >= 0, got {older_than_ms}")
    # 1. what is waiting somewhere: the stream's messages and the delayed retries
    stream, delayed, dead = f"{prefix}:queue", f"{prefix}:queue:delayed", f"{prefix}:queue:dead"
    waiting = set(_stream_job_ids(redis, stream))
    waiting.update(_text(member) for member in cast(list[Any], redis.zrange(delayed, 0, -1)))
    # 2. queued jobs that are old enough and not waiting
    seconds, micros = cast(tuple[int, int], redis.time())
    cutoff_ms = int(seconds) * 1000 + int(micros) // 1000 - older_than_ms
    candidates = [
        (job_id, status)
        for status in _NEEDS_MESSAGE
        for job_id in indexed_job_ids(redis, prefix, status)
        if job_id not in waiting
    ]
    requeued: list[str] = []
    enqueue_if_lost = redis.register_script(_ENQUEUE_IF_LOST)
    for job_id, status in candidates:
        updated_at = redis.hget(f"{prefix}:job:{job_id}", "updated_at")
        if updated_at is None or int(updated_at) > cutoff_ms:
            continue
        # 3. check again and enqueue in one step
        added = enqueue_if_lost(
            keys=[f"{prefix}:job:{job_id}", stream, delayed, dead], args=[job_id, older_than_ms]
        )
        if int(cast(Any, added)) == 1:
            requeued.append(job_id)
            logger.warning(
                "job %s was %s without a queue message; enqueued it again",
                job_id,
                status.value,
                extra={"job_id": job_id},
            )
    return requeued


def indexed_job_ids(redis: Redis, prefix: str, status: JobStatus) -> Iterator[str]:
    """Every job id in the per-tenant index of ``status`` (``P:tenant:{t}:jobs:{status}``)."""
    # Tenants never contain ':', so only the per-status index of this status ends this way.
    pattern = f"{prefix}:tenant:*:jobs:{status.value}"
    for index in redis.scan_iter(match=pattern, count=_SCAN_BATCH):
        start = 0
        while True:
            batch = cast(list[Any], redis.zrange(index, start, start + _SCAN_BATCH - 1))
            yield from (_text(job_id) for job_id in batch)
            if len(batch) < _SCAN_BATCH:
                break
            start += _SCAN_BATCH


def current_attempt(redis: Redis, prefix: str, job_id: str) -> int | None:
    """The job's current attempt (its fencing token), or ``None`` for an unknown job.

    One field read: cheap enough for a shard to poll between batches, so a shard of an attempt
    that lost the job stops instead of finishing work nobody will gather.
    """
    raw = redis.hget(f"{prefix}:job:{job_id}", "attempt")
    return None if raw is None else int(raw)


def _stream_job_ids(redis: Redis, stream: str) -> Iterator[str]:
    """The job ids of every message in the stream (waiting or in flight), oldest first."""
    start = "-"
    while True:
        entries = cast(list[Any], redis.xrange(stream, start, "+", count=_SCAN_BATCH))
        for _, fields in entries:
            value = fields.get(b"job_id", fields.get("job_id"))
            if value is not None:
                yield _text(value)
        if len(entries) < _SCAN_BATCH:
            return
        start = "(" + _text(entries[-1][0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


# KEYS: job hash, stream, delayed, dead letters. ARGV: job id, min age (ms). -> 1 if enqueued,
# else 0. The statuses are _NEEDS_MESSAGE's. A dead letter's job is fail_dead_letters' to fail
# (the dispatcher runs it first), never to run again. The stream and dead-letter scans are
# O(length), but only run for the rare job that looked lost outside; job ids are unique, so a
# dead letter that contains the id is the job's.
_ENQUEUE_IF_LOST = """
local job = redis.call('HMGET', KEYS[1], 'status', 'updated_at')
if job[1] ~= 'queued' and job[1] ~= 'running' then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(job[2]) > now - tonumber(ARGV[2]) then return 0 end
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
for _, letter in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do
  if string.find(letter, ARGV[1], 1, true) then return 0 end
end
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'job_id' and fields[i + 1] == ARGV[1] then return 0 end
  end
end
redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[1])
return 1
"""
