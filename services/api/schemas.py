"""Response bodies of the REST API (request bodies are ``services.common.spec`` and ``PresignRequest``).

Responses are kept apart from the stored records (``JobRecord``, ``UploadRecord``) so that what a
user sees is chosen here, field by field: no tenant field, no object keys of uploads.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.api.uploads import UploadKind, UploadStatus
from services.common.jobs import (
    EventType,
    JobError,
    JobKind,
    JobProgress,
    JobStatus,
    Stage,
    Transition,
)

__all__ = [
    "ArtifactOut",
    "ArtifactsResponse",
    "ErrorBody",
    "ErrorDetail",
    "FieldError",
    "HealthResponse",
    "JobAccepted",
    "JobEventOut",
    "JobPage",
    "JobResponse",
    "JobUrls",
    "PresignRequest",
    "PresignResponse",
    "ReadyResponse",
    "UploadResponse",
]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# ---- errors -------------------------------------------------------------------------------------


class FieldError(_Out):
    """One invalid field of a request: ``field`` is its dotted path (``quant.weight_bits``)."""

    field: str
    message: str


class ErrorDetail(_Out):
    """The one error shape of the API; ``fields`` only on 422s caused by the request's content."""

    code: str
    message: str
    retryable: bool = False
    fields: list[FieldError] | None = None


class ErrorBody(_Out):
    error: ErrorDetail


# ---- jobs ---------------------------------------------------------------------------------------


class JobUrls(_Out):
    self: str
    cancel: str
    events: str
    artifacts: str


class JobAccepted(_Out):
    """The answer to ``POST /v1/jobs`` (new or replayed by its ``Idempotency-Key``)."""

    id: str
    kind: JobKind
    status: JobStatus
    created_at: datetime
    urls: JobUrls


class JobResponse(_Out):
    """A job as its owner sees it.

    ``config`` is the fully resolved request (every default filled in), plus
    ``generation_fingerprint`` for jobs that generate.
    ``error`` is the latest attempt's error; ``result`` is what the worker reported when it finished.
    """

    id: str
    kind: JobKind
    status: JobStatus
    stage: Stage | None
    progress: JobProgress
    attempt: int
    cancel_requested: bool
    error: JobError | None
    transitions: list[Transition]
    config: dict[str, Any]
    result: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    urls: JobUrls


class JobPage(_Out):
    """One page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next page
    (``None`` at the end). A filtered page may be short and still have a cursor."""

    data: list[JobResponse]
    next_cursor: str | None


class JobEventOut(_Out):
    """The data of one server-sent event; the SSE ``id`` is the same ``id`` (for Last-Event-ID)."""

    id: str
    type: EventType
    at: datetime
    status: JobStatus
    stage: Stage | None
    attempt: int
    progress: JobProgress | None


class ArtifactOut(_Out):
    """One artifact of a job with a presigned download URL (valid until ``expires_at``)."""

    name: str
    kind: str
    key: str = Field(
        description="the artifact's key relative to the job (e.g. model/model.safetensors)"
    )
    size: int
    sha256: str
    content_type: str
    url: str


class ArtifactsResponse(_Out):
    job_id: str
    expires_at: datetime
    artifacts: list[ArtifactOut]


# ---- uploads ------------------------------------------------------------------------------------


class PresignRequest(BaseModel):
    """Body of ``POST /v1/uploads/presign``: what the client is about to upload."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: UploadKind
    filename: str = Field(min_length=1, max_length=255)
    size: int = Field(ge=1, description="bytes the client will PUT")


class UploadResponse(_Out):
    """An upload: ``pending`` until the presigned PUT is completed, then ``ready`` (a job may use
    it) or ``invalid`` (``error`` says why). ``detail`` describes the content (tensors, images,
    classes)."""

    id: str
    kind: UploadKind
    filename: str
    format: str
    status: UploadStatus
    size: int | None
    sha256: str | None
    error: JobError | None
    detail: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class PresignResponse(_Out):
    """Where to PUT the file (no credentials needed) before ``expires_at``; then call ``complete``."""

    id: str
    url: str
    method: Literal["PUT"] = "PUT"
    expires_at: datetime
    complete_url: str


# ---- health -------------------------------------------------------------------------------------


class HealthResponse(_Out):
    status: Literal["ok"] = "ok"


class ReadyResponse(_Out):
    status: Literal["ready"] = "ready"
    checks: dict[str, str]
