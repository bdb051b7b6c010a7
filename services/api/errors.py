"""The API's errors and the one place that maps them to HTTP.

Routes and helpers raise domain errors (the classes below, or the job store's, queue's, spec's and
storage's own exceptions); :data:`_STATUS` says which HTTP status each one is and
:func:`install_error_handlers` turns them into the one error body every client sees::

    {"error": {"code": "...", "message": "...", "retryable": false}}

422s caused by the request's content also list ``fields`` (``[{field, message}]``) and their message
starts with the field's dotted path (``quant.weight_bits: Input should be ...``). Anything else is a
500 ``internal`` with no detail for the client and a log line with the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from genq_core.storage_s3 import StorageError
from services.api.schemas import ErrorBody, ErrorDetail, FieldError
from services.common.jobs import JobKind
from services.common.jobstore import IdempotencyConflict
from services.common.queue import QueueFull
from services.common.spec import LimitExceeded

__all__ = [
    "ERROR_RESPONSES",
    "ApiError",
    "Conflict",
    "Forbidden",
    "InvalidField",
    "InvalidUpload",
    "NotFound",
    "PresignUnsupported",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedMediaType",
    "install_error_handlers",
]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client can act on. ``code`` is stable (clients branch on it); the HTTP status
    is not an attribute: :data:`_STATUS` maps each class to one."""

    code: ClassVar[str] = "error"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = code or self.code
        self.is_retryable = self.retryable if retryable is None else retryable
        self.headers = dict(headers or {})


class NotFound(ApiError):
    """Unknown, or another tenant's: the two are indistinguishable on purpose."""

    code = "not_found"


class Unauthenticated(ApiError):
    code = "unauthorized"


class Forbidden(ApiError):
    """A credential that is genuine but does not allow this (an expired or altered link)."""

    code = "forbidden"


class InvalidField(ApiError):
    """A request that parses but is invalid in one field (``field`` is its dotted path)."""

    code = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.field_message = message


class InvalidUpload(ApiError):
    """An uploaded file failed validation; the message names the archive member or tensor."""

    code = "invalid_upload"


class UnsupportedMediaType(ApiError):
    code = "unsupported_media_type"


class TooLarge(ApiError):
    """Over a size limit; the message names the limit and the setting that sets it."""

    code = "too_large"


class Conflict(ApiError):
    """The resource is not in a state that allows this yet (``not_ready``, ``not_uploaded``)."""

    code = "conflict"


class PresignUnsupported(ApiError):
    """The storage in use (embedded mode's local folders) can't hand out presigned URLs."""

    code = "not_implemented"


class Unavailable(ApiError):
    """A dependency (Redis, S3) does not answer; the message names which."""

    code = "unavailable"
    retryable = True


# The one table of HTTP statuses; subclasses inherit their base's status (looked up along the MRO).
_STATUS: dict[type[Exception], int] = {
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidField: 422,
    InvalidUpload: 422,
    PresignUnsupported: 501,
    Unavailable: 503,
    IdempotencyConflict: 409,
    LimitExceeded: 422,
    QueueFull: 429,
    StorageError: 503,
    RedisConnectionError: 503,
    RedisTimeoutError: 503,
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in [
        (401, "Missing or invalid API key"),
        (404, "Unknown, or another tenant's"),
        (422, "Invalid request; the message names the field"),
        (503, "Redis or S3 unavailable; retry later"),
    ]
}
"""Error responses shared by every authenticated route, for the OpenAPI document."""


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the same body."""
    for exc_type in _STATUS:
        app.add_exception_handler(exc_type, _handle_domain_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _handle_unexpected)


def error_response(
    status: int, detail: ErrorDetail, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON response for ``detail`` (``fields`` left out unless set)."""
    body = {"error": detail.model_dump(exclude_none=True)}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


# ---- handlers -----------------------------------------------------------------------------------


async def _handle_domain_error(request: Request, exc: Exception) -> JSONResponse:
    status = next(_STATUS[cls] for cls in type(exc).__mro__ if cls in _STATUS)
    detail, headers = _describe(exc)
    if status >= 500:
        # The client gets a generic message; the operator gets the real one (it names endpoints).
        log.warning("request %s: %s: %s", _request_id(request), type(exc).__name__, exc)
    return error_response(status, detail, headers)


def _describe(exc: Exception) -> tuple[ErrorDetail, dict[str, str]]:
    """The error body and extra headers of a mapped exception."""
    if isinstance(exc, InvalidField):
        fields = [FieldError(field=exc.field, message=exc.field_message)]
        return ErrorDetail(code=exc.error_code, message=exc.message, fields=fields), exc.headers
    if isinstance(exc, ApiError):
        detail = ErrorDetail(code=exc.error_code, message=exc.message, retryable=exc.is_retryable)
        return detail, exc.headers
    if isinstance(exc, IdempotencyConflict):
        message = (
            f"Idempotency-Key {exc.key!r} was already used with a different request body "
            f"(job {exc.job_id}); use a new key for a new request"
        )
        return ErrorDetail(code="idempotency_conflict", message=message), {}
    if isinstance(exc, LimitExceeded):
        fields = [FieldError(field=exc.field, message=exc.message)]
        return ErrorDetail(code="limit_exceeded", message=str(exc), fields=fields), {}
    if isinstance(exc, QueueFull):
        message = f"the job queue is full; retry after {exc.retry_after_s} s"
        detail = ErrorDetail(code="queue_full", message=message, retryable=True)
        return detail, {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, StorageError):
        message = "object storage is unavailable; retry later"
        return ErrorDetail(code="unavailable", message=message, retryable=True), {}
    message = "the job store is unavailable; retry later"  # Redis connection or timeout errors
    return ErrorDetail(code="unavailable", message=message, retryable=True), {}


async def _handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = [_field_error(error) for error in exc.errors()]
    message = "; ".join(f"{f.field}: {f.message}" for f in fields) or "invalid request"
    return error_response(422, ErrorDetail(code="invalid_request", message=message, fields=fields))


async def _handle_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method, a body over a route's size limit)."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
    detail = ErrorDetail(code=codes.get(exc.status_code, "http_error"), message=str(exc.detail))
    return error_response(exc.status_code, detail, exc.headers)


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = _request_id(request)
    log.error(
        "request %s: unhandled error in %s %s",
        request_id,
        request.method,
        request.url.path,
        exc_info=exc,
    )
    message = f"internal error; quote request id {request_id} when reporting it"
    return error_response(
        500, ErrorDetail(code="internal", message=message), {"X-Request-ID": request_id}
    )


# ---- helpers ------------------------------------------------------------------------------------

_JOB_KINDS = frozenset(kind.value for kind in JobKind)


def _field_error(error: Mapping[str, Any]) -> FieldError:
    """A pydantic error as ``{field, message}``, with the field's dotted path."""
    if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        return FieldError(field="kind", message="must be one of " + ", ".join(sorted(_JOB_KINDS)))
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return FieldError(field=_field_path(error.get("loc", ())), message=message)


def _field_path(loc: Sequence[Any]) -> str:
    """``quant.weight_bits`` from pydantic's ``("body", "genq", "quant", "weight_bits")``.

    The discriminated job body puts the kind's tag after ``body``; it is not a field the user
    wrote, so it is dropped. Query, path and header parameters are named by themselves.
    """
    parts = [str(part) for part in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        source, parts = parts[0], parts[1:]
        if source == "body" and parts and parts[0] in _JOB_KINDS:
            parts = parts[1:]
    return ".".join(parts) or "body"


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))
