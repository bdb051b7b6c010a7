"""The embedded job store: the job store and queue run unchanged on it, and a snapshot brings back
every key (jobs, queue messages, consumer groups, TTLs) after a restart."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from services.common.embedded_store import EmbeddedRedis, SnapshotError
from services.common.jobs import JobStatus
from services.common.jobstore import JobStore
from services.common.queue import JobQueue


def test_jobs_and_queue_messages_survive_a_save_and_reopen(tmp_path: Path):
    snapshot = tmp_path / "jobstore.snapshot"
    with EmbeddedRedis.open(snapshot) as first:
        store, queue = JobStore(first.client()), JobQueue(first.client())
        waiting, _ = store.create("acme", "genq", {"quant": {"iters": 2}})
        held, _ = store.create("acme", "genq", {})
        queue.enqueue(held.id)
        [message] = queue.read("dispatcher-1", count=1)
        queue.enqueue(waiting.id)
        first.client().set("expiring", "x", px=60_000)

    time.sleep(0.15)
    with EmbeddedRedis.open(snapshot) as second:
        store = JobStore(second.client())
        queue = JobQueue(second.client(), reclaim_idle_ms=100)
        restored = store.get(waiting.id)
        assert restored is not None
        assert restored.status is JobStatus.QUEUED
        assert restored.config == {"quant": {"iters": 2}}
        # the undelivered message is delivered; the one the old process held is still pending
        assert [m.job_id for m in queue.read("dispatcher-2")] == [waiting.id]
        assert [m.job_id for m in queue.reclaim("dispatcher-2")] == [held.id]
        assert message.job_id == held.id
        assert 0 < second.client().pttl("expiring") <= 60_000


def test_lua_scripts_streams_and_blocking_reads_work_across_clients(tmp_path: Path):
    with EmbeddedRedis(None) as server:
        api, worker = JobQueue(server.client()), JobQueue(server.client())
        assert worker.read("dispatcher-1", block_ms=10) == []  # before any enqueue: no group
        api.enqueue("job_a")
        assert [m.job_id for m in worker.read("dispatcher-1", block_ms=10)] == ["job_a"]
        assert api.depth() == 1


def test_the_snapshot_is_private_and_written_atomically(tmp_path: Path):
    snapshot = tmp_path / "state" / "jobstore.snapshot"
    server = EmbeddedRedis(snapshot)
    server.client().set("k", "v")

    assert server.save() == 1
    assert stat.S_IMODE(os.stat(snapshot).st_mode) == 0o600
    assert [p.name for p in snapshot.parent.iterdir()] == ["jobstore.snapshot"]  # no .tmp left
    server.close()


def test_periodic_snapshots_catch_changes_before_close(tmp_path: Path):
    snapshot = tmp_path / "jobstore.snapshot"
    server = EmbeddedRedis(snapshot)
    server.start_snapshots(0.05)
    server.client().set("k", "v")
    deadline = time.monotonic() + 5
    while not snapshot.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert EmbeddedRedis.open(snapshot).client().get("k") == b"v"  # before close saved it
    server.close()


def test_a_file_that_is_not_a_snapshot_is_refused_by_name(tmp_path: Path):
    bogus = tmp_path / "jobstore.snapshot"
    bogus.write_bytes(b"not a snapshot")
    with pytest.raises(SnapshotError, match=r"jobstore\.snapshot is not"):
        EmbeddedRedis.open(bogus)


def test_a_truncated_snapshot_is_refused(tmp_path: Path):
    snapshot = tmp_path / "jobstore.snapshot"
    with EmbeddedRedis(snapshot) as server:
        server.client().set("key", "value" * 100)
    snapshot.write_bytes(snapshot.read_bytes()[:-50])
    with pytest.raises(SnapshotError, match="truncated"):
        EmbeddedRedis.open(snapshot)


def test_memory_only_store_saves_nothing(tmp_path: Path):
    server = EmbeddedRedis(None)
    server.client().set("k", "v")
    assert server.save() == 0
    server.close()
    assert list(tmp_path.iterdir()) == []
