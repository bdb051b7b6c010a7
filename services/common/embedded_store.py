"""The embedded mode's job store: an in-process Redis (fakeredis, with Lua) saved to a file.

The job store, the queue and the upload records run unchanged on it: the same Lua scripts, streams
and consumer groups as on a real Redis, so the embedded mode is the distributed mode minus the
network. Every client of one :class:`EmbeddedRedis` (the API's, the dispatcher's, each worker's)
sees the same data; the server is thread-safe.

Durability: :meth:`EmbeddedRedis.save` writes every key (``DUMP`` + its TTL) to a snapshot file
atomically; :meth:`EmbeddedRedis.open` loads it back, so queued and finished jobs survive a
restart. :meth:`start_snapshots` saves every few seconds and :meth:`close` once more. A crash loses
at most the last interval's changes; a job that was running then is reclaimed by the dispatcher
like one a dead worker held (its stages resume from their checkpoints in the storage).

The snapshot holds fakeredis's ``DUMP`` payloads, which are Python pickles: it is this process's
own state file, written with mode 0600, and must not come from anyone else (``data_dir`` is the
service's private folder).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path
from types import TracebackType

import fakeredis
import redis

__all__ = ["EmbeddedRedis", "SnapshotError"]

log = logging.getLogger(__name__)

_MAGIC = b"GENQSNAP1\n"
_HEADER = struct.Struct(">IqI")  # key length, TTL in ms (-1: none), payload length


class SnapshotError(RuntimeError):
    """The snapshot file is not one this module wrote (or is truncated); names the file."""


class EmbeddedRedis:
    """One in-process Redis server; :meth:`client` connects to it.

    Args:
        snapshot: the file it is saved to and loaded from (``None``: memory only).
    """

    def __init__(self, snapshot: Path | None = None) -> None:
        self.snapshot = snapshot
        self._server = fakeredis.FakeServer()
        self._admin = self.client()
        self._save_lock = threading.Lock()
        self._stop = threading.Event()
        self._saver: threading.Thread | None = None

    @classmethod
    def open(cls, snapshot: Path | None) -> EmbeddedRedis:
        """A server holding what ``snapshot`` saved (empty if the file does not exist yet).

        Raises:
            SnapshotError: the file exists but is not a snapshot, or is truncated.
        """
        store = cls(snapshot)
        if snapshot is not None and snapshot.exists():
            restored = store._load(snapshot)
            log.info("embedded job store: %d keys restored from %s", restored, snapshot)
        return store

    def client(self) -> redis.Redis:
        """A new client of this server (one per thread or component, as with a real Redis)."""
        return fakeredis.FakeRedis(server=self._server)

    def save(self) -> int:
        """Write every key to the snapshot file (atomically: a temporary file renamed over it);
        returns how many keys were written. A no-op without a snapshot file."""
        if self.snapshot is None:
            return 0
        with self._save_lock:
            # 1. read every key with its TTL (DUMP is atomic per key; writers go on meanwhile,
            #    and the next save catches what changed)
            records: list[bytes] = []
            for key in self._admin.scan_iter(count=1000):
                payload = self._admin.dump(key)
                if payload is None:  # expired or deleted since the scan saw it
                    continue
                ttl = int(self._admin.pttl(key))  # -1: no TTL; 0: expires this millisecond
                if ttl == -2:  # gone since the DUMP
                    continue
                records.append(_HEADER.pack(len(key), ttl, len(payload)) + key + payload)
            # 2. write them next to the target, then rename over it
            self.snapshot.parent.mkdir(parents=True, exist_ok=True)
            partial = self.snapshot.with_name(self.snapshot.name + ".tmp")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(_MAGIC)
                out.write(struct.pack(">Q", len(records)))
                for record in records:
                    out.write(record)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, self.snapshot)
            return len(records)

    def start_snapshots(self, every_s: float) -> None:
        """Save every ``every_s`` seconds in a background thread until :meth:`close`."""
        if self.snapshot is None or self._saver is not None:
            return
        if every_s <= 0:
            raise ValueError(f"every_s must be positive, got {every_s}")

        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.save()
                except OSError as err:  # a full disk: keep serving, say so, try again later
                    log.error("embedded job store: could not save %s: %s", self.snapshot, err)

        self._saver = threading.Thread(target=loop, name="genq-jobstore-snapshots", daemon=True)
        self._saver.start()

    def close(self) -> None:
        """Stop the background saves and save once more."""
        self._stop.set()
        if self._saver is not None:
            self._saver.join()
            self._saver = None
        self.save()
        self._admin.close()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _load(self, snapshot: Path) -> int:
        data = snapshot.read_bytes()
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 8:
            raise SnapshotError(f"{snapshot} is not a GenQ job-store snapshot")
        (count,) = struct.unpack_from(">Q", data, len(_MAGIC))
        offset = len(_MAGIC) + 8
        pipe = self._admin.pipeline(transaction=False)
        for _ in range(count):
            if offset + _HEADER.size > len(data):
                raise SnapshotError(f"{snapshot} is truncated (after {offset} bytes)")
            key_len, ttl, payload_len = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size
            end = offset + key_len + payload_len
            if end > len(data):
                raise SnapshotError(f"{snapshot} is truncated (after {offset} bytes)")
            key = data[offset : offset + key_len]
            payload = data[offset + key_len : end]
            offset = end
            # a key with a TTL gets what was left of it when saved (time stood still meanwhile)
            pipe.restore(key, max(ttl, 1) if ttl >= 0 else 0, payload, replace=True)
        pipe.execute()
        return int(count)
