"""Per-request plumbing: a request id on every response, the request metrics, a body size cap.

Pure ASGI middlewares, not Starlette's ``BaseHTTPMiddleware``: they must not buffer or re-wrap
streaming requests and responses (uploads, server-sent events).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Collection

from fastapi import HTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.metrics import ApiMetrics

__all__ = ["BodyLimitMiddleware", "RequestContextMiddleware"]

access_log = logging.getLogger("genq.api.access")
"""One line per request: method, route template, status, duration, request id, tenant, job id."""

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class RequestContextMiddleware:
    """Give each request an id (the client's ``X-Request-ID`` if sane, else a new one), echo it in
    the response, keep it in ``request.state.request_id`` for logs, and time the request."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaping the app is a 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = _route_template(scope)
            self.metrics.observe(scope["method"], route, status, seconds)
            state = scope.get("state", {})
            job_id = scope.get("path_params", {}).get("job_id") or state.get("job_id")
            access_log.info(
                "%s %s %d",
                scope["method"],
                route,
                status,
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                    "tenant": state.get("tenant"),
                    "job_id": job_id,
                },
            )


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` (413), so no route buffers a huge JSON body.

    Counted as the body arrives (a lying or missing Content-Length doesn't help); the 413 is an
    ``HTTPException`` raised from ``receive``, which FastAPI passes on to the app's error handlers.
    ``streaming`` lists the ``(method, path)`` of routes that stream their body with caps of
    their own (uploads).
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, streaming: Collection[tuple[str, str]] = ()
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streaming = frozenset(streaming)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.streaming:
            await self.app(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(
                        413, f"the request body is larger than {self.max_bytes} bytes"
                    )
            return message

        await self.app(scope, limited_receive, send)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID_RE.match(candidate):
                return candidate
    return uuid.uuid4().hex


def _route_template(scope: Scope) -> str:
    """The matched route's path template; ``unmatched`` for 404s on unknown paths (bounded labels)."""
    route = scope.get("route")
    if isinstance(route, BaseRoute):
        return str(getattr(route, "path", "unmatched"))
    return "unmatched"
