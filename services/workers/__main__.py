"""``python -m services.workers``: a dispatcher and its pool of workers, until SIGTERM.

Every setting comes from ``GENQ_*`` variables (:class:`~services.workers.dispatcher.DispatcherSettings`:
Redis, S3, device, ``GENQ_NUM_ACTORS``, ``GENQ_RAY_ADDRESS``, ...). The workers are Ray actors:
``GENQ_RAY_ADDRESS`` unset starts a local Ray (paths are then made absolute against this
folder), ``auto`` or ``host:port`` joins a cluster started with ``ray start`` (set
``GENQ_ASSETS_DIR`` and ``GENQ_MODEL_CACHE_DIR`` to absolute paths valid on every node).
``--inline`` runs the workers as threads of this process instead, without Ray.

SIGTERM or SIGINT stops taking jobs, lets running ones go on for ``GENQ_SHUTDOWN_GRACE_S`` and
requeues the rest. Logs are JSON lines with the job id, attempt, shard and node where they apply.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from redis import Redis

from services.common.jobstore import JobStore
from services.common.logs import configure_logging
from services.workers.dispatcher import Dispatcher, DispatcherSettings, InlinePool, WorkerPool


def main(argv: Sequence[str] | None = None) -> int:
    """Run a dispatcher until SIGTERM; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m services.workers", description=__doc__)
    parser.add_argument("--inline", action="store_true", help="workers in this process, no Ray")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)

    # 1. settings and logs
    settings = DispatcherSettings()
    settings.check()
    if not settings.redis_url:
        parser.error("the dispatcher needs the job store: set GENQ_REDIS_URL")
    configure_logging(args.log_level)

    # 2. the job store and the queue
    redis = Redis.from_url(
        settings.redis_url, socket_timeout=settings.poll_s + 10, health_check_interval=30
    )
    store = JobStore(redis, settings.redis_prefix)
    queue = settings.make_queue(redis)

    # 3. the workers: Ray actors, or threads of this process
    pool: WorkerPool
    uses_ray = not args.inline
    if uses_ray:
        import ray

        from services.workers.actors import RayPool

        if settings.ray_address is None:  # a local Ray: its workers share this filesystem
            settings = settings.model_copy(
                update={
                    "assets_dir": settings.assets_dir.resolve(),
                    "model_cache_dir": settings.model_cache_dir.resolve(),
                }
            )
        ray.init(address=settings.ray_address)
        pool = RayPool(settings)
    else:
        pool = InlinePool.create(settings)

    # 4. run until told to stop
    dispatcher = Dispatcher(settings, redis, store, queue, pool)

    def stop(signum: int, frame: FrameType | None) -> None:
        dispatcher.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        dispatcher.run()
    finally:
        pool.close()
        if uses_ray:
            ray.shutdown()
        redis.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
