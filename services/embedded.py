"""The embedded mode: the whole service in one process, with no external servers.

``genq serve --embedded`` runs :func:`serve`: the REST API (uvicorn), a dispatcher with in-process
workers (``InlinePool``), the job store and queue on an in-process Redis saved to
``<data_dir>/jobstore.snapshot`` (``services.common.embedded_store``) and the object storage in
``<data_dir>/storage/<bucket>/`` folders. Download URLs are links the API signs itself. The API,
the job records and the worker code are the distributed mode's, so what works here works there.

One API key is made on first start and kept in ``<data_dir>/api-key`` (mode 0600); its tenant is
``local``. Set ``GENQ_API_KEYS`` to use your own keys instead.

Stopping (Ctrl-C, SIGTERM) lets a running job go on for ``GENQ_SHUTDOWN_GRACE_S`` (default here
5 s), requeues it and saves the job store; the next start resumes it from its last finished stage.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from fastapi import FastAPI

from services.api.app import create_app
from services.api.settings import ApiSettings, hash_api_key
from services.common.embedded_store import EmbeddedRedis
from services.common.jobstore import JobStore
from services.common.settings import Mode
from services.workers.actors import GenQWorker
from services.workers.dispatcher import Dispatcher, DispatcherSettings, InlinePool

__all__ = ["API_KEY_FILE", "EmbeddedService", "LOCAL_TENANT", "ensure_api_key", "serve"]

log = logging.getLogger(__name__)

API_KEY_FILE = "api-key"
"""Under ``data_dir``: the embedded service's API key (made on first start)."""
LOCAL_TENANT = "local"
SNAPSHOT_FILE = "jobstore.snapshot"


def ensure_api_key(data_dir: Path) -> str:
    """The key in ``data_dir/api-key``, made (random, mode 0600) if the file does not exist."""
    path = data_dir / API_KEY_FILE
    if path.exists():
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"{path} is empty: delete it to get a new key")
        return key
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "genq-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return key


class EmbeddedService:
    """The API app plus a dispatcher thread and its in-process workers, on one data folder.

    Args:
        data_dir: storage, job-store snapshot and API key live here.
        workers: in-process workers (jobs, or shards of one job, that run at once).
        snapshot_every_s: how often the job store is saved (and once more on :meth:`stop`).
        api: ``ApiSettings`` fields over the environment's (``GENQ_*``) and the defaults here.
        worker: ``DispatcherSettings`` fields likewise (``threads``, ``assets_dir``, ...).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        workers: int = 1,
        snapshot_every_s: float = 5.0,
        api: dict[str, Any] | None = None,
        worker: dict[str, Any] | None = None,
    ) -> None:
        # 1. settings: the embedded mode on one folder, whatever the environment says
        self.data_dir = data_dir.resolve()
        shared: dict[str, Any] = {"mode": Mode.EMBEDDED, "data_dir": self.data_dir}
        api_fields: dict[str, Any] = {**shared, **(api or {})}
        self.api_key: str | None = None
        if not ApiSettings(**api_fields).api_keys:
            self.api_key = ensure_api_key(self.data_dir)
            api_fields["api_keys"] = [f"{hash_api_key(self.api_key)}={LOCAL_TENANT}"]
        self.api_settings = ApiSettings(**api_fields)
        defaults: dict[str, Any] = {"consumer": "embedded", "shutdown_grace_s": 5.0}
        worker_fields = {**defaults, **(worker or {}), **shared, "num_actors": workers}
        self.worker_settings = DispatcherSettings(**worker_fields)
        self.worker_settings = self.worker_settings.model_copy(
            update={
                "assets_dir": self.worker_settings.assets_dir.resolve(),
                "model_cache_dir": self.worker_settings.model_cache_dir.resolve(),
            }
        )
        self._snapshot_every_s = snapshot_every_s
        self._redis: EmbeddedRedis | None = None
        self._pool: InlinePool | None = None
        self._dispatcher: Dispatcher | None = None
        self._thread: threading.Thread | None = None
        self.app: FastAPI | None = None

    @property
    def redis(self) -> EmbeddedRedis:
        """The job store's server (after :meth:`start`)."""
        if self._redis is None:
            raise RuntimeError("the embedded service is not started")
        return self._redis

    def start(self) -> FastAPI:
        """Load the job store, start the dispatcher thread; returns the API app to serve."""
        # 1. the job store, as the last run left it
        self._redis = EmbeddedRedis.open(self.data_dir / SNAPSHOT_FILE)
        self._redis.start_snapshots(self._snapshot_every_s)

        # 2. the workers and their dispatcher, in a thread of this process
        settings = self.worker_settings
        dispatcher_redis = self._redis.client()
        self._pool = InlinePool(
            [GenQWorker(settings, redis=self._redis.client()) for _ in range(settings.num_actors)]
        )
        self._dispatcher = Dispatcher(
            settings,
            dispatcher_redis,
            JobStore(dispatcher_redis, settings.redis_prefix),
            settings.make_queue(dispatcher_redis),
            self._pool,
        )
        self._thread = threading.Thread(
            target=self._dispatcher.run, name="genq-dispatcher", daemon=True
        )
        self._thread.start()

        # 3. the API on the same job store
        self.app = create_app(self.api_settings, redis=self._redis.client())
        return self.app

    def stop(self) -> None:
        """Stop the dispatcher (running jobs get the grace period, then are requeued), close the
        workers and save the job store."""
        if self._dispatcher is not None and self._thread is not None:
            self._dispatcher.stop()
            self._thread.join()
        if self._pool is not None:
            self._pool.close()
        if self._redis is not None:
            self._redis.close()
        self._dispatcher = self._thread = self._pool = self._redis = None

    def __enter__(self) -> FastAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    threads: int | None = None,
    log_level: str = "info",
) -> None:
    """Run the embedded service until Ctrl-C or SIGTERM (uvicorn handles both). Logging is the
    caller's (``services.common.logs``): uvicorn logs through the root logger, and the API writes
    one access line per request."""
    import uvicorn

    worker: dict[str, Any] = {} if threads is None else {"threads": threads}
    service = EmbeddedService(data_dir, workers=workers, worker=worker)
    app = service.start()
    try:
        url = f"http://{host}:{port}"
        if service.api_key is not None:
            key_file = service.data_dir / API_KEY_FILE
            print(
                f"GenQ (embedded) on {url}; data in {service.data_dir}\n"
                f"  export GENQ_SERVER={url} GENQ_API_KEY=$(cat {key_file})",
                flush=True,
            )
        # uvicorn shuts the API down on SIGINT/SIGTERM, then raises the signal again with the
        # handlers it found: make those raise here, so that the workers stop and the job store
        # is saved before the process exits
        previous = signal.signal(signal.SIGTERM, _raise_stop)
        try:
            uvicorn.run(
                app, host=host, port=port, log_level=log_level, log_config=None, access_log=False
            )
        except (_Stop, KeyboardInterrupt):
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        service.stop()
        log.info("embedded service stopped; job store saved in %s", service.data_dir)


class _Stop(Exception):
    """SIGTERM, after uvicorn's graceful shutdown."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop
