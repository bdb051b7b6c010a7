"""Job records and the job state machine, shared by the API and the workers.

A job moves ``queued -> running (stage, progress) -> succeeded | failed | canceled``; a running job can
go back to ``queued`` when its attempt failed in a retryable way. The table below is the one place that
says which moves are legal: the Redis store (``jobstore.py``) compiles it into its Lua scripts, so the
check and the write happen atomically, and this module checks it in Python for everyone else.

Timestamps are timezone-aware UTC datetimes; the store takes them from the Redis server's clock so that
writers on different hosts agree on the order of events.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ALLOWED_TRANSITIONS",
    "TERMINAL_STATUSES",
    "EventType",
    "InvalidTransition",
    "JobError",
    "JobEvent",
    "JobKind",
    "JobProgress",
    "JobRecord",
    "JobStatus",
    "Stage",
    "StageProgress",
    "Transition",
    "check_transition",
    "is_job_id",
    "new_job_id",
]


class JobKind(StrEnum):
    """What a job does: the whole pipeline, only the synthetic data, or only quantization."""

    GENQ = "genq"
    GENERATE = "generate"
    QUANTIZE = "quantize"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class Stage(StrEnum):
    """What a running job is doing now; the order of a full ``genq`` job."""

    INVERTING = "inverting"  # data-scarce mode: textual inversion of a style token
    GENERATING = "generating"
    FILTERING = "filtering"
    QUANTIZING = "quantizing"
    EVALUATING = "evaluating"
    UPLOADING = "uploading"


class EventType(StrEnum):
    """The kinds of entries in a job's event stream (what ``GET /v1/jobs/{id}/events`` relays)."""

    CREATED = "created"
    TRANSITION = "transition"
    PROGRESS = "progress"
    CANCEL_REQUESTED = "cancel_requested"


TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
)

# running -> running is a stage change or a new attempt taking over from a lost worker;
# running -> queued puts a job back for a retry. Terminal states go nowhere.
ALLOWED_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.RUNNING,
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELED,
            JobStatus.QUEUED,
        }
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


class InvalidTransition(ValueError):
    """A status change that the state machine forbids (e.g. ``succeeded -> running``)."""

    def __init__(
        self, old: JobStatus | str, new: JobStatus | str, job_id: str | None = None
    ) -> None:
        self.old = str(old)
        self.new = str(new)
        self.job_id = job_id
        where = f" for job {job_id}" if job_id else ""
        super().__init__(f"illegal job transition {self.old!r} -> {self.new!r}{where}")


def check_transition(old: JobStatus | str, new: JobStatus | str) -> None:
    """Raise ``InvalidTransition`` unless ``old -> new`` is in ``ALLOWED_TRANSITIONS``.

    Unknown status names are illegal too (raised as ``InvalidTransition``, not a bare ``ValueError``
    from the enum), so callers handle one exception.
    """
    try:
        old_status, new_status = JobStatus(old), JobStatus(new)
    except ValueError:
        raise InvalidTransition(old, new) from None
    if new_status not in ALLOWED_TRANSITIONS[old_status]:
        raise InvalidTransition(old_status, new_status)


class JobError(BaseModel):
    """A structured error, the same shape the REST API returns: ``{code, message, retryable}``."""

    model_config = ConfigDict(frozen=True)

    code: str = Field(min_length=1)
    message: str
    retryable: bool = False


class StageProgress(BaseModel):
    done: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)


class JobProgress(BaseModel):
    """Per-stage ``done/total`` plus counters. Workers update parts of it through
    ``JobStore.update_progress``; every int field other than ``stages`` is a counter."""

    stages: dict[Stage, StageProgress] = Field(default_factory=dict)
    images_generated: int = Field(default=0, ge=0)
    images_kept: int = Field(default=0, ge=0)
    blocks_reconstructed: int = Field(default=0, ge=0)

    @classmethod
    def counter_names(cls) -> tuple[str, ...]:
        """The counters a worker may set (every field except ``stages``)."""
        return tuple(name for name in cls.model_fields if name != "stages")


class Transition(BaseModel):
    """One entry of a job's history: the status (and stage) it entered, when, in which attempt."""

    model_config = ConfigDict(frozen=True)

    status: JobStatus
    stage: Stage | None = None
    at: datetime
    attempt: int = Field(ge=0)


class JobRecord(BaseModel):
    """A job as stored in Redis and echoed by the API.

    ``config`` is the fully resolved job configuration and ``result`` the artifact keys etc.; both are
    opaque here. ``error`` is the latest attempt's error: set by a failure or a retryable requeue,
    cleared when the job succeeds. ``attempt`` is 0 until a worker starts it and is also the fencing
    token of the current attempt.
    """

    id: str
    tenant: str
    kind: JobKind
    status: JobStatus
    stage: Stage | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    attempt: int = Field(default=0, ge=0)
    created_at: datetime
    updated_at: datetime
    transitions: list[Transition] = Field(default_factory=list)
    error: JobError | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    cancel_requested: bool = False
    result: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobEvent(BaseModel):
    """One entry of a job's event stream; ``id`` is the Redis stream id, usable as SSE ``Last-Event-ID``.

    Every event carries the job's status, stage and attempt after the change; progress events also
    carry the whole progress so a client never has to merge partial updates.
    """

    id: str
    type: EventType
    at: datetime
    status: JobStatus
    stage: Stage | None = None
    attempt: int = Field(ge=0)
    progress: JobProgress | None = None


# ULID: 48 bits of milliseconds + 80 random bits in Crockford base32, so ids sort by creation time.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_JOB_ID_RE = re.compile(r"^job_[0-9A-HJKMNP-TV-Z]{26}$")


def new_job_id(now_ms: int | None = None) -> str:
    """A new job id, ``job_`` + a 26-character ULID: lexical order is creation order (to the ms)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "job_" + "".join(reversed(chars))


def is_job_id(value: str) -> bool:
    """Whether ``value`` looks like an id from ``new_job_id`` (the API 404s anything else cheaply)."""
    return bool(_JOB_ID_RE.match(value))
