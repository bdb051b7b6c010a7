"""What a running API process holds: its clients and stores, built once in the app's lifespan."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
from redis import Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from genq_core.storage_s3 import StorageError
from services.api.metrics import ApiMetrics
from services.api.settings import ApiSettings
from services.api.signing import LinkSigner
from services.api.storage import Buckets, local_buckets, s3_buckets
from services.api.uploads import UploadStore
from services.common.jobstore import JobStore
from services.common.queue import JobQueue
from services.common.settings import Mode

__all__ = ["AppState", "build_state"]

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """Shared by every request (``request.app.state.genq``); every member is thread-safe.

    ``events_limiter`` bounds the blocking event-stream reads in flight, apart from the threadpool
    the sync routes use, so many open event streams can't starve the other routes.
    """

    settings: ApiSettings
    redis: Redis
    store: JobStore
    queue: JobQueue
    uploads: UploadStore
    buckets: Buckets
    metrics: ApiMetrics
    events_limiter: anyio.CapacityLimiter
    owns_redis: bool
    link_signer: LinkSigner | None = None
    """Signs the embedded mode's download links (``/files/<token>``); ``None`` with S3."""

    def close(self) -> None:
        if self.owns_redis:
            self.redis.close()


def build_state(
    settings: ApiSettings,
    metrics: ApiMetrics,
    events_limiter: anyio.CapacityLimiter,
    redis: Redis | None = None,
    buckets: Buckets | None = None,
) -> AppState:
    """Connect the stores (given clients are used as they are and not closed by the app).

    Nothing here needs Redis or S3 to be up: the process starts, and ``/readyz`` says what is
    missing until it is. Buckets are created if they can be; if S3 is down, readiness retries.
    """
    # 1. Redis and what lives in it
    owns_redis = redis is None
    if redis is None:
        assert settings.redis_url  # settings.check() guarantees it in the distributed mode
        redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_socket_timeout_s,
            socket_connect_timeout=settings.redis_connect_timeout_s,
            health_check_interval=30,
            # redis-py's default (10 retries, up to 1 s apart) would hold a request, and
            # /readyz, for ~10 s while Redis is down; fail fast and let the client retry.
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), settings.redis_retries),
        )
    prefix = settings.redis_prefix
    store = JobStore(redis, prefix)
    queue = JobQueue(
        redis,
        prefix,
        max_depth=settings.max_queue_depth,
        full_retry_after_s=settings.queue_full_retry_after_s,
    )
    uploads = UploadStore(redis, prefix, pending_ttl_s=settings.presign_expiry_s)
    metrics.bind(redis, prefix, store, queue)

    # 2. object storage, one store per bucket role; local folders get signed download links
    link_signer: LinkSigner | None = None
    if buckets is None:
        if settings.mode == Mode.DISTRIBUTED:
            buckets = s3_buckets(settings)
        else:
            link_signer = LinkSigner()
            buckets = local_buckets(settings, link_signer)
    for role, bucket in buckets.items():
        try:
            bucket.ensure_bucket()
        except (StorageError, OSError) as err:
            log.warning("could not create the %s bucket yet (/readyz retries): %s", role, err)
    return AppState(
        settings=settings,
        redis=redis,
        store=store,
        queue=queue,
        uploads=uploads,
        buckets=buckets,
        metrics=metrics,
        events_limiter=events_limiter,
        owns_redis=owns_redis,
        link_signer=link_signer,
    )
