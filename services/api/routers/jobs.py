"""``/v1/jobs``: submit, read, list and cancel jobs, follow their events, fetch their artifacts.

Routes that call Redis or S3 are plain ``def`` (FastAPI runs them in its threadpool); the event
stream is an async generator whose blocking reads run in worker threads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import PurePosixPath
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genq_core.storage import check_key
from services.api.deps import (
    BucketsDep,
    OwnedJobDep,
    SettingsDep,
    StateDep,
    StoreDep,
    TenantDep,
    base_url,
)
from services.api.errors import ERROR_RESPONSES, Conflict, InvalidField
from services.api.schemas import (
    ArtifactOut,
    ArtifactsResponse,
    ErrorBody,
    JobAccepted,
    JobEventOut,
    JobPage,
    JobResponse,
    JobUrls,
)
from services.api.uploads import UploadKind, UploadStatus, UploadStore
from services.common import keys
from services.common.jobs import (
    TERMINAL_STATUSES,
    EventType,
    JobKind,
    JobRecord,
    JobStatus,
)
from services.common.jobstore import JobStore
from services.common.spec import (
    GenerateJobRequest,
    GenqJobRequest,
    JobRequest,
    QuantizeJobRequest,
    check_limits,
    generation_fingerprint,
    request_hash,
)

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"  # printable ASCII, no spaces

AnyJobRequest = GenqJobRequest | GenerateJobRequest | QuantizeJobRequest


@router.post(
    "",
    status_code=202,
    response_model=JobAccepted,
    responses={
        **ERROR_RESPONSES,
        409: {"model": ErrorBody, "description": "Idempotency-Key reused with another body"},
        429: {"model": ErrorBody, "description": "Queue full; see Retry-After"},
    },
)
def submit_job(
    body: JobRequest,
    request: Request,
    response: Response,
    tenant: TenantDep,
    state: StateDep,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", pattern=_IDEMPOTENCY_KEY_PATTERN)
    ] = None,
) -> JobAccepted:
    """Submit a job; 202 with its id and URLs. With ``Idempotency-Key``, resending the same body
    returns the same job (for 24 h) and a different body is a 409."""
    # 1. the deployment's limits and the references to the tenant's uploads and jobs
    check_limits(body, state.settings.limits())
    _check_uploads(body, tenant, state.uploads)
    _check_dataset_job(body, tenant, state.store)

    # 2. the resolved config: the request with every default, plus the generation fingerprint
    config: dict[str, Any] = body.model_dump(mode="json")
    if isinstance(body, GenqJobRequest | GenerateJobRequest):
        config["generation_fingerprint"] = generation_fingerprint(body)

    # 3. create (or find the earlier job of this idempotency key); a replay is not enqueued again
    job, created = state.store.create(
        tenant, body.kind, config, idempotency_key=idempotency_key, body_hash=request_hash(body)
    )
    if created:
        # 4. enqueue; if that fails (queue full, Redis gone) the job must not linger as queued
        try:
            state.queue.enqueue(job.id)
        except BaseException:
            try:
                state.store.discard(job.id)
            except Exception:
                log.exception("job %s: enqueue failed and so did discarding the job", job.id)
            raise
    else:
        response.headers["Idempotent-Replayed"] = "true"

    request.state.job_id = job.id  # for the request's log line
    urls = _job_urls(base_url(request, state.settings), job.id)
    response.headers["Location"] = urls.self
    return JobAccepted(
        id=job.id, kind=job.kind, status=job.status, created_at=job.created_at, urls=urls
    )


@router.get("", response_model=JobPage, responses=ERROR_RESPONSES)
def list_jobs(
    request: Request,
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    status: JobStatus | None = None,
    kind: JobKind | None = None,
    cursor: Annotated[str | None, Query(pattern=r"^job_[0-9A-HJKMNP-TV-Z]{26}$")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobPage:
    """The tenant's jobs, newest first; ``next_cursor`` continues the listing (``None``: the end)."""
    jobs, next_cursor = store.list(tenant, status=status, kind=kind, cursor=cursor, limit=limit)
    base = base_url(request, settings)
    return JobPage(data=[_job_response(job, base) for job in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobResponse, responses=ERROR_RESPONSES)
def get_job(job: OwnedJobDep, request: Request, settings: SettingsDep) -> JobResponse:
    """A job's status, stage, progress, history, error and resolved config."""
    return _job_response(job, base_url(request, settings))


@router.post("/{job_id}/cancel", response_model=JobResponse, responses=ERROR_RESPONSES)
def cancel_job(
    job: OwnedJobDep, request: Request, tenant: TenantDep, store: StoreDep, settings: SettingsDep
) -> JobResponse:
    """Cancel a job: a queued one at once, a running one at its next checkpoint
    (``cancel_requested``). Idempotent; a finished job is returned unchanged."""
    canceled = store.request_cancel(job.id, tenant) or job
    return _job_response(canceled, base_url(request, settings))


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        **ERROR_RESPONSES,
        200: {
            "description": "Server-sent events; each data is a JobEventOut. The stream ends "
            "after the job's terminal transition. Resume with the Last-Event-ID header."
        },
    },
)
async def job_events(
    job: OwnedJobDep,
    state: StateDep,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", pattern=r"^(0|\d{1,20}-\d{1,20})$")
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    """The job's events as they happen (``created``, ``transition``, ``progress``,
    ``cancel_requested``), oldest first, ending after the job reaches a terminal status."""
    store, block_ms = state.store, state.settings.events_block_ms
    last_id = last_event_id or "0"
    while True:
        # 1. wait for the next events (in a thread of the events' own limiter)
        read = partial(store.events, job.id, last_id, block_ms=block_ms)
        events = await anyio.to_thread.run_sync(read, limiter=state.events_limiter)
        # 2. relay them; the terminal transition is the last one
        for event in events:
            last_id = event.id
            out = JobEventOut.model_validate(event.model_dump())
            yield ServerSentEvent(id=event.id, event=event.type.value, data=out)
            if event.type is EventType.TRANSITION and event.status in TERMINAL_STATUSES:
                return
        if events:
            continue
        # 3. nothing new: stop if the job has ended (its terminal event was sent before
        #    Last-Event-ID, or trimmed) or is gone; otherwise keep waiting
        current = await anyio.to_thread.run_sync(store.get, job.id)
        if current is None or current.is_terminal:
            return


@router.get(
    "/{job_id}/artifacts",
    response_model=ArtifactsResponse,
    responses={
        **ERROR_RESPONSES,
        409: {"model": ErrorBody, "description": "not_ready: the job has no artifacts yet"},
        501: {"model": ErrorBody, "description": "no presigned URLs in the embedded mode"},
    },
)
def job_artifacts(
    job: OwnedJobDep, request: Request, settings: SettingsDep, buckets: BucketsDep
) -> ArtifactsResponse:
    """Every artifact the job wrote (its manifest) with presigned download URLs."""
    # 1. the manifest, written by the worker once the job's outputs are all stored
    manifest_key = keys.job_key(job.id, keys.ARTIFACTS_MANIFEST)
    try:
        raw = buckets[keys.bucket_role(keys.ARTIFACTS_MANIFEST)].get_bytes(manifest_key)
    except KeyError:
        ended = job.status in TERMINAL_STATUSES
        reason = f"it ended {job.status.value} without any" if ended else "not yet"
        raise Conflict(
            f"job {job.id} has no artifacts ({reason}); status {job.status.value}",
            code="not_ready",
            retryable=not ended,
        ) from None
    entries = _parse_manifest(job.id, raw)

    # 2. a download URL per artifact, from the bucket its key belongs to
    expires = timedelta(seconds=settings.presign_expiry_s)
    expires_at = datetime.now(UTC) + expires
    base = base_url(request, settings)

    def download_url(entry: _ManifestEntry) -> str:
        url = buckets[keys.bucket_role(entry.key)].presigned_get_url(
            keys.job_key(job.id, entry.key), expires, filename=PurePosixPath(entry.key).name
        )
        return base + url if url.startswith("/") else url  # the embedded mode's own links

    artifacts = [
        ArtifactOut(
            name=entry.name or PurePosixPath(entry.key).name,
            kind=entry.kind or entry.name or PurePosixPath(entry.key).suffix.lstrip("."),
            key=entry.key,
            size=entry.size,
            sha256=entry.sha256,
            content_type=entry.content_type,
            url=download_url(entry),
        )
        for entry in entries
    ]
    return ArtifactsResponse(job_id=job.id, expires_at=expires_at, artifacts=artifacts)


# ---- helpers ------------------------------------------------------------------------------------

# Which job fields name an upload, and the upload kind each expects.
_UPLOAD_FIELDS: tuple[tuple[str, UploadKind], ...] = (
    ("model.upload_id", UploadKind.MODEL),
    ("calibration.upload_id", UploadKind.CALIBRATION),
    ("data_scarce.kshot_upload_id", UploadKind.KSHOT),
    ("evaluation.eval_upload_id", UploadKind.EVAL),
)


def _check_uploads(body: AnyJobRequest, tenant: str, uploads: UploadStore) -> None:
    """Every upload the job names must be the tenant's, validated (``ready``) and of the kind the
    field needs; else 422 on the field."""
    formats: dict[str, str] = {}
    for field, kind in _UPLOAD_FIELDS:
        upload_id = _dotted(body, field)
        if upload_id is None:
            continue
        record = uploads.get(upload_id, tenant)
        if record is None:
            raise InvalidField(field, f"no upload {upload_id!r}")
        if record.kind is not kind:
            raise InvalidField(
                field, f"upload {upload_id} is a {record.kind.value!r} upload, not {kind.value!r}"
            )
        if record.status is not UploadStatus.READY:
            why = f": {record.error.message}" if record.error else ""
            raise InvalidField(
                field, f"upload {upload_id} is {record.status.value}, not ready{why}"
            )
        formats[field] = record.format
    # A safetensors file holds weights only: it needs the architecture; a .pt2 holds both.
    model_format = formats.get("model.upload_id")
    if model_format == "safetensors" and not body.model.name:
        raise InvalidField(
            "model.name", "a safetensors upload needs the timm architecture it is for"
        )
    if model_format == "pt2" and body.model.name:
        raise InvalidField(
            "model.name", "a torch.export (.pt2) upload holds its architecture; leave name unset"
        )


def _check_dataset_job(body: AnyJobRequest, tenant: str, store: JobStore) -> None:
    """``calibration.dataset_job_id`` must be the tenant's succeeded genq or generate job."""
    field = "calibration.dataset_job_id"
    dataset_job_id = _dotted(body, field)
    if dataset_job_id is None:
        return
    source = store.get(dataset_job_id, tenant)
    if source is None:
        raise InvalidField(field, f"no job {dataset_job_id!r}")
    if source.kind not in (JobKind.GENQ, JobKind.GENERATE):
        raise InvalidField(
            field, f"job {dataset_job_id} is a {source.kind.value!r} job and made no dataset"
        )
    if source.status is not JobStatus.SUCCEEDED:
        raise InvalidField(
            field, f"job {dataset_job_id} is {source.status.value}; its dataset is not complete"
        )


def _dotted(body: BaseModel, path: str) -> Any:
    value: Any = body
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


class _ManifestEntry(BaseModel):
    """One artifact as the worker lists it in ``artifacts.json`` (``key`` relative to the job)."""

    model_config = ConfigDict(extra="ignore")

    key: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str | None = None
    kind: str | None = None
    content_type: str = "application/octet-stream"


def _parse_manifest(job_id: str, raw: bytes) -> list[_ManifestEntry]:
    """Entries of a job's ``artifacts.json``: a JSON list, or ``{"artifacts": [...]}`` as
    ``run_genq`` writes it. A malformed manifest is the worker's bug: it surfaces as a 500."""
    try:
        data = json.loads(raw)
        items = data["artifacts"] if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError("the manifest is not a list of artifacts")
        entries = [_ManifestEntry.model_validate(item) for item in items]
        prefix = keys.job_prefix(job_id) + "/"
        entries = [
            e.model_copy(update={"key": e.key.removeprefix(prefix)})
            if e.key.startswith(prefix)
            else e
            for e in entries
        ]
        for entry in entries:
            check_key(entry.key)  # no '..': an artifact can't point outside its job
    except (ValueError, KeyError, TypeError, ValidationError) as err:
        raise RuntimeError(f"job {job_id}: malformed {keys.ARTIFACTS_MANIFEST}: {err}") from err
    return entries


def _job_urls(base: str, job_id: str) -> JobUrls:
    job_url = f"{base}/v1/jobs/{job_id}"
    return JobUrls(
        self=job_url,
        cancel=f"{job_url}/cancel",
        events=f"{job_url}/events",
        artifacts=f"{job_url}/artifacts",
    )


def _job_response(job: JobRecord, base: str) -> JobResponse:
    return JobResponse(
        id=job.id,
        kind=job.kind,
        status=job.status,
        stage=job.stage,
        progress=job.progress,
        attempt=job.attempt,
        cancel_requested=job.cancel_requested,
        error=job.error,
        transitions=job.transitions,
        config=job.config,
        result=job.result,
        created_at=job.created_at,
        updated_at=job.updated_at,
        urls=_job_urls(base, job.id),
    )
