"""The FastAPI application: ``create_app(settings)``; serve it with ``uvicorn --factory``::

    uvicorn --factory services.api.app:create_app --host 0.0.0.0 --port 8000

Distributed mode (``GENQ_MODE=distributed``): Redis for jobs, uploads and the queue, an S3 server
for objects; the app refuses to be built without API keys or those settings and names what is
missing. The embedded mode (``genq serve --embedded``, ``services.embedded``) builds the app with
its in-process job store passed in, local folders for objects and download links the API signs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from redis import Redis

from services.api.errors import install_error_handlers
from services.api.metrics import ApiMetrics
from services.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from services.api.routers import files, health, jobs, uploads
from services.api.settings import ApiSettings
from services.api.state import build_state
from services.api.storage import Buckets
from services.common.settings import Mode

__all__ = ["create_app"]

_DESCRIPTION = """\
Submit jobs that generate calibration images with a diffusion model, filter them, and quantize
a classifier on them; follow them; download what they made through presigned URLs.

Every route under `/v1` needs `Authorization: Bearer <API key>`; a job or upload belongs to the
key's tenant and is invisible (404) to every other. Errors are `{"error": {"code", "message",
"retryable"}}`.
"""


def create_app(
    settings: ApiSettings | None = None,
    *,
    redis: Redis | None = None,
    storage: Buckets | None = None,
) -> FastAPI:
    """Build the API.

    Args:
        settings: ``ApiSettings()`` (from the environment) if not given.
        redis: a client to use instead of one built from ``redis_url`` (it is not closed).
        storage: the object store of each bucket role instead of S3 (distributed) or local
            folders (embedded).

    Raises:
        MissingSettings: the distributed mode lacks API keys, Redis or S3 settings (all named).
    """
    # 1. settings: refuse to start half-configured
    settings = settings or ApiSettings()
    settings.check()
    if settings.mode == Mode.EMBEDDED and redis is None:
        raise ValueError(
            "the embedded mode runs the API and its worker in one process: start it with "
            "`genq serve --embedded` (or set GENQ_MODE=distributed and the Redis/S3 settings)"
        )
    metrics = ApiMetrics()

    # 2. clients and stores live as long as the app
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limiter = anyio.CapacityLimiter(settings.events_max_readers)
        state = await anyio.to_thread.run_sync(
            lambda: build_state(settings, metrics, limiter, redis=redis, buckets=storage)
        )
        app.state.genq = state
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.close)

    # 3. routes, errors, per-request plumbing
    app = FastAPI(
        title="GenQ",
        summary="Generated calibration data and low-bit quantization of image classifiers",
        description=_DESCRIPTION,
        version="1",
        lifespan=lifespan,
    )
    app.include_router(jobs.router)
    app.include_router(uploads.router)
    app.include_router(health.router)
    app.include_router(files.router)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        streaming=[("POST", "/v1/uploads")],  # streams to disk under its own per-kind caps
    )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost: sees every answer
    return app
