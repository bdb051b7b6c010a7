"""``/v1/uploads``: models and image sets a job can use, validated before any job may name them.

Two ways in:

- ``POST /v1/uploads?kind=...`` with a multipart body of one file: streamed to a temporary file
  (413 past the kind's size limit), validated, stored, ``ready`` (201) or refused (422).
- ``POST /v1/uploads/presign`` -> a presigned PUT URL; the client PUTs the file straight to S3,
  then ``POST /v1/uploads/{id}/complete`` downloads and validates it the same way.

Either way the object a job reads is written by the API from the bytes it validated.
"""

from __future__ import annotations

import hashlib
import tempfile
from datetime import timedelta
from functools import partial
from pathlib import Path

import anyio
from fastapi import APIRouter, Request, Response

from services.api.deps import BucketsDep, SettingsDep, StateDep, TenantDep, UploadsDep, base_url
from services.api.errors import (
    ERROR_RESPONSES,
    Conflict,
    InvalidField,
    InvalidUpload,
    NotFound,
    TooLarge,
)
from services.api.multipart import receive_file
from services.api.schemas import ErrorBody, PresignRequest, PresignResponse, UploadResponse
from services.api.settings import ApiSettings
from services.api.state import AppState
from services.api.storage import ObjectStore
from services.api.uploads import (
    ARCHIVE_FORMATS,
    MODEL_FORMATS,
    UploadKind,
    UploadRecord,
    UploadStatus,
    UploadStore,
    incoming_key,
    upload_format,
)
from services.api.validation import ArchiveLimits, validate_upload
from services.common.jobs import JobError
from services.common.keys import BucketRole

__all__ = ["router"]

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

_MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file
_UPLOAD_ERRORS = {
    **ERROR_RESPONSES,
    413: {"model": ErrorBody, "description": "Larger than the kind's limit"},
}


@router.post(
    "",
    status_code=201,
    response_model=UploadResponse,
    responses={
        **_UPLOAD_ERRORS,
        415: {"model": ErrorBody, "description": "Not multipart/form-data"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                }
            },
        }
    },
)
async def create_upload(
    request: Request,
    response: Response,
    kind: UploadKind,
    tenant: TenantDep,
    state: StateDep,
) -> UploadResponse:
    """Upload one file (multipart field of any name) as a ``kind`` upload; it is validated before
    this returns: 201 ``ready``, or 422 naming what is wrong (then nothing is kept)."""
    settings = state.settings
    max_bytes = settings.max_upload_bytes(kind.value)
    limit_name = f"GENQ_MAX_UPLOAD_BYTES_{kind.value.upper()}"
    # 1. refuse what is surely too large before reading it
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + _MULTIPART_OVERHEAD:
        raise TooLarge(
            f"the upload is larger than this service's limit of {max_bytes} bytes ({limit_name})"
        )
    async with anyio.TemporaryDirectory(dir=_tmp_dir(settings)) as folder:
        # 2. stream the file part to disk, capped
        path = Path(folder) / "upload"
        received = await receive_file(
            request.stream(),
            request.headers.get("content-type"),
            path,
            max_bytes,
            limit_name,
            check_filename=partial(_format_or_422, kind),
        )
        # 3. check its content, store it, record it (blocking work: in a thread)
        fmt = _format_or_422(kind, received.filename)
        record = state.uploads.new_record(tenant, kind, received.filename, fmt)
        record = await anyio.to_thread.run_sync(
            partial(_accept, state, record, path, received.size, received.sha256)
        )
    response.headers["Location"] = f"{base_url(request, settings)}/v1/uploads/{record.id}"
    return _upload_response(record)


@router.post("/presign", status_code=201, response_model=PresignResponse, responses=_UPLOAD_ERRORS)
def presign_upload(
    body: PresignRequest,
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    uploads: UploadsDep,
    buckets: BucketsDep,
) -> PresignResponse:
    """A URL to PUT the file to (no credentials needed) until ``expires_at``; then ``complete``."""
    # 1. check what the client announces
    fmt = _format_or_422(body.kind, body.filename)
    max_bytes = settings.max_upload_bytes(body.kind.value)
    if body.size > max_bytes:
        raise TooLarge(
            f"size {body.size} is larger than this service's limit of {max_bytes} bytes for "
            f"{body.kind.value} uploads (GENQ_MAX_UPLOAD_BYTES_{body.kind.value.upper()})"
        )
    # 2. a pending record and a URL for its incoming key
    record = uploads.new_record(tenant, body.kind, body.filename, fmt, declared_size=body.size)
    expires = timedelta(seconds=settings.presign_expiry_s)
    target = incoming_key(tenant, record.id, body.kind, fmt)
    url = buckets[BucketRole.UPLOADS].presigned_put_url(target, expires)
    record = uploads.save(record)
    base = base_url(request, settings)
    return PresignResponse(
        id=record.id,
        url=url,
        expires_at=record.created_at + expires,
        complete_url=f"{base}/v1/uploads/{record.id}/complete",
    )


@router.post(
    "/{upload_id}/complete",
    response_model=UploadResponse,
    responses={
        **_UPLOAD_ERRORS,
        409: {"model": ErrorBody, "description": "not_uploaded: nothing was PUT yet"},
    },
)
def complete_upload(upload_id: str, tenant: TenantDep, state: StateDep) -> UploadResponse:
    """Validate what was PUT to the presigned URL: ``ready``, or 422 naming what is wrong (the
    upload is then ``invalid``). Calling it again returns the same outcome."""
    record = _owned_upload(state.uploads, upload_id, tenant)
    if record.status is UploadStatus.READY:
        return _upload_response(record)
    if record.status is UploadStatus.INVALID:
        raise _stored_error(record)

    # 1. the incoming object: there, and within the limits
    bucket = state.buckets[BucketRole.UPLOADS]
    source = incoming_key(tenant, record.id, record.kind, record.format)
    try:
        size = bucket.stat(source).size
    except KeyError:
        raise Conflict(
            f"nothing was uploaded for {record.id} yet: PUT the file to the presigned URL first",
            code="not_uploaded",
            retryable=True,
        ) from None
    max_bytes = state.settings.max_upload_bytes(record.kind.value)
    if size > max_bytes:
        message = (
            f"the upload is {size} bytes, larger than this service's limit of {max_bytes} bytes "
            f"(GENQ_MAX_UPLOAD_BYTES_{record.kind.value.upper()})"
        )
        _reject(state, record, source, "too_large", message)
        raise TooLarge(message)
    if record.declared_size is not None and size != record.declared_size:
        message = f"{size} bytes arrived, {record.declared_size} were announced"
        _reject(state, record, source, "invalid_upload", message)
        raise InvalidUpload(message)

    # 2. download, then validate and store exactly those bytes
    with tempfile.TemporaryDirectory(dir=_tmp_dir(state.settings)) as folder:
        path = Path(folder) / "upload"
        bucket.get_file(source, path)
        digest = _sha256(path)
        try:
            record = _accept(state, record, path, path.stat().st_size, digest)
        except InvalidUpload as err:
            _reject(state, record, source, "invalid_upload", err.message)
            raise
    bucket.delete(source)
    return _upload_response(record)


@router.get("/{upload_id}", response_model=UploadResponse, responses=ERROR_RESPONSES)
def get_upload(upload_id: str, tenant: TenantDep, uploads: UploadsDep) -> UploadResponse:
    """An upload's status, size, sha256 and what validation found in it."""
    return _upload_response(_owned_upload(uploads, upload_id, tenant))


# ---- helpers ------------------------------------------------------------------------------------


def _accept(
    state: AppState, record: UploadRecord, path: Path, size: int, sha256: str
) -> UploadRecord:
    """Validate the file at ``path``, store it under the record's key, save the record ``ready``.

    Raises ``InvalidUpload`` (nothing stored) when the content is not what the kind needs.
    """
    detail = validate_upload(path, record.kind, record.format, _archive_limits(state.settings))
    bucket: ObjectStore = state.buckets[BucketRole.UPLOADS]
    bucket.put_file(record.key, path, _content_type(record.format))
    ready = record.model_copy(
        update={
            "status": UploadStatus.READY,
            "size": size,
            "sha256": sha256,
            "detail": detail,
            "error": None,
        }
    )
    return state.uploads.save(ready)


def _reject(state: AppState, record: UploadRecord, source: str, code: str, message: str) -> None:
    """Mark a presigned upload invalid (kept a day, so GET explains it) and drop its object."""
    invalid = record.model_copy(
        update={"status": UploadStatus.INVALID, "error": JobError(code=code, message=message)}
    )
    state.uploads.save(invalid)
    state.buckets[BucketRole.UPLOADS].delete(source)


def _owned_upload(uploads: UploadStore, upload_id: str, tenant: str) -> UploadRecord:
    record = uploads.get(upload_id, tenant)
    if record is None:
        raise NotFound(f"no upload {upload_id!r}")
    return record


def _stored_error(record: UploadRecord) -> InvalidUpload | TooLarge:
    error = record.error
    message = error.message if error else "the upload is invalid"
    return TooLarge(message) if error and error.code == "too_large" else InvalidUpload(message)


def _format_or_422(kind: UploadKind, filename: str) -> str:
    fmt = upload_format(kind, filename)
    if fmt is None:
        accepted = MODEL_FORMATS if kind is UploadKind.MODEL else ARCHIVE_FORMATS
        why = (
            "; pickled checkpoints (.pt, .pth, .bin, .ckpt) are refused because loading one runs code"
            if kind is UploadKind.MODEL
            else ""
        )
        raise InvalidField(
            "filename",
            f"{filename!r} is not a {kind.value} upload: the name must end with "
            f"{', '.join(accepted)}{why}",
        )
    return fmt


def _tmp_dir(settings: ApiSettings) -> str | None:
    return str(settings.upload_tmp_dir) if settings.upload_tmp_dir else None


def _archive_limits(settings: ApiSettings) -> ArchiveLimits:
    return ArchiveLimits(
        max_files=settings.max_archive_files,
        max_total_bytes=settings.max_archive_bytes,
        max_member_bytes=settings.max_member_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


def _content_type(fmt: str) -> str:
    return {
        "zip": "application/zip",
        "tar": "application/x-tar",
        "tar.gz": "application/gzip",
    }.get(fmt, "application/octet-stream")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(partial(handle.read, 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _upload_response(record: UploadRecord) -> UploadResponse:
    return UploadResponse(
        id=record.id,
        kind=record.kind,
        filename=record.filename,
        format=record.format,
        status=record.status,
        size=record.size,
        sha256=record.sha256,
        error=record.error,
        detail=record.detail,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )
