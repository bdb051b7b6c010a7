"""``/healthz`` (the process answers), ``/readyz`` (Redis and S3 answer), ``/metrics`` (Prometheus).

None of them needs an API key: probes and scrapers have none. ``/metrics`` carries counts only,
no tenant's data; keep it off the public ingress all the same.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from services.api.deps import StateDep
from services.api.errors import Unavailable
from services.api.schemas import ErrorBody, HealthResponse, ReadyResponse

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """Liveness: the process serves requests (no dependency is checked)."""
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ErrorBody, "description": "a dependency does not answer"}},
)
def readyz(state: StateDep) -> ReadyResponse:
    """Readiness: Redis answers PING and every bucket is reachable; 503 naming what is not."""
    checks: dict[str, str] = {}
    failures: list[tuple[str, Exception]] = []
    try:
        state.redis.ping()
        checks["redis"] = "ok"
    except Exception as err:  # any failure means not ready
        failures.append(("redis", err))
    for role, bucket in state.buckets.items():
        name = f"s3:{role.value}"
        try:
            try:
                bucket.ping()
            except Exception:
                # the bucket may be missing because S3 was down at startup: create it now
                bucket.ensure_bucket()
                bucket.ping()
            checks[name] = "ok"
        except Exception as err:
            failures.append((name, err))
    if failures:
        # The full reasons name internal hosts: they go to the log, the probe gets the names.
        log.warning("not ready: %s", "; ".join(f"{name}: {err}" for name, err in failures))
        summary = ", ".join(f"{name} ({type(err).__name__})" for name, err in failures)
        raise Unavailable(f"not ready: {summary} not reachable")
    return ReadyResponse(checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    response_model=None,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
def metrics(state: StateDep) -> Response:
    """Prometheus metrics: requests, jobs by status, queue depth, stage durations."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
