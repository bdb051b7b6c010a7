"""Upload records in Redis: what a user uploaded, where it lies, and whether a job may use it.

An upload is ``pending`` from ``POST /v1/uploads/presign`` until ``complete`` validates it, then
``ready`` or ``invalid``; a multipart upload is validated before its record is written, so it is
``ready`` at once (an invalid one is refused and leaves no record). Only ``ready`` uploads can be
named by a job.

Objects (uploads bucket, ``keys.upload_prefix(tenant, id)`` = ``uploads/{tenant}/{id}``):

- ``{prefix}/model.safetensors`` | ``model.pt2`` (models), ``{prefix}/images.zip`` | ``images.tar``
  | ``images.tar.gz`` (image sets): the validated file, written by the API from the bytes it
  validated, so nothing but validated bytes ever lies there. Workers find it by these names.
- ``{prefix}/incoming/{same name}``: where a presigned PUT lands; deleted once validated. The
  presigned URL stays valid until it expires, which is why the validated copy has its own key.

Redis (``P`` is the prefix, ``genq`` by default):

- ``P:upload:{id}``  string, the record as JSON (:class:`UploadRecord`). Pending records expire
  with their presigned URL (plus an hour), invalid ones after a day; ready ones are kept.

Workers never read this store: a job names an upload by id, and the API has checked that it is
the tenant's, ``ready`` and of the right kind before the job was created.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field
from redis import Redis

from services.common import keys
from services.common.jobs import JobError, new_job_id

__all__ = [
    "ARCHIVE_FORMATS",
    "MODEL_FORMATS",
    "UploadKind",
    "UploadRecord",
    "UploadStatus",
    "UploadStore",
    "incoming_key",
    "is_upload_id",
    "new_upload_id",
    "object_name",
    "upload_format",
    "upload_key",
]

_UPLOAD_ID_RE = re.compile(r"^upl_[0-9A-HJKMNP-TV-Z]{26}$")
_INVALID_TTL_S = 24 * 3600
_PENDING_GRACE_S = 3600


class UploadKind(StrEnum):
    """What an upload is for; each kind is referenced by one job field."""

    MODEL = "model"  # model.upload_id
    CALIBRATION = "calibration"  # calibration.upload_id
    KSHOT = "kshot"  # data_scarce.kshot_upload_id
    EVAL = "eval"  # evaluation.eval_upload_id


class UploadStatus(StrEnum):
    PENDING = "pending"
    READY = "ready"
    INVALID = "invalid"


# File name endings each kind accepts -> the format name. Pickled checkpoints (.pt, .pth, .bin,
# .ckpt) are not here on purpose: loading one runs arbitrary code.
MODEL_FORMATS = {".safetensors": "safetensors", ".pt2": "pt2"}
ARCHIVE_FORMATS = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar.gz", ".tgz": "tar.gz"}
_FORMAT_EXTENSIONS = {
    "safetensors": ".safetensors",
    "pt2": ".pt2",
    "zip": ".zip",
    "tar": ".tar",
    "tar.gz": ".tar.gz",
}


class UploadRecord(BaseModel):
    """One upload as stored. ``key`` is the validated object's key in the uploads bucket;
    ``declared_size`` is what a presign request announced."""

    id: str
    tenant: str
    kind: UploadKind
    filename: str
    format: str
    key: str
    status: UploadStatus
    declared_size: int | None = None
    size: int | None = None
    sha256: str | None = None
    error: JobError | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime


def new_upload_id() -> str:
    """``upl_`` + a ULID (the job ids' scheme: sortable by creation time, 80 random bits)."""
    return "upl_" + new_job_id().removeprefix("job_")


def is_upload_id(value: str) -> bool:
    return bool(_UPLOAD_ID_RE.match(value))


def upload_format(kind: UploadKind, filename: str) -> str | None:
    """The format a file name announces for ``kind`` (``safetensors``, ``pt2``, ``zip``, ``tar``,
    ``tar.gz``), or ``None`` when the kind does not accept that ending."""
    accepted = MODEL_FORMATS if kind is UploadKind.MODEL else ARCHIVE_FORMATS
    name = filename.lower()
    # longest ending first, so "x.tar.gz" is not taken for a ".gz"
    for ending in sorted(accepted, key=len, reverse=True):
        if name.endswith(ending) and len(name) > len(ending):
            return accepted[ending]
    return None


def upload_key(tenant: str, upload_id: str, kind: UploadKind, fmt: str) -> str:
    """Key of the validated object: ``uploads/{tenant}/{id}/{name}``, see :func:`object_name`."""
    return f"{keys.upload_prefix(tenant, upload_id)}/{object_name(kind, fmt)}"


def incoming_key(tenant: str, upload_id: str, kind: UploadKind, fmt: str) -> str:
    """Key a presigned PUT writes to: ``uploads/{tenant}/{id}/incoming/{name}``."""
    return f"{keys.upload_prefix(tenant, upload_id)}/incoming/{object_name(kind, fmt)}"


def object_name(kind: UploadKind, fmt: str) -> str:
    """``model.safetensors`` / ``model.pt2`` for models, ``images.zip`` / ``images.tar`` /
    ``images.tar.gz`` for image sets: the names the workers look for."""
    stem = "model" if kind is UploadKind.MODEL else "images"
    return stem + _FORMAT_EXTENSIONS[fmt]


class UploadStore:
    """Upload records in Redis, one JSON string per upload (sync client, like ``JobStore``)."""

    def __init__(self, redis: Redis, prefix: str = "genq", *, pending_ttl_s: int = 3600) -> None:
        """``pending_ttl_s``: how long a presigned URL is valid; a pending record outlives it by an
        hour, long enough for a slow ``complete``, then Redis drops it."""
        if not prefix or ":" in prefix:
            raise ValueError(f"prefix must be non-empty and free of ':', got {prefix!r}")
        if pending_ttl_s < 1:
            raise ValueError(f"pending_ttl_s must be >= 1, got {pending_ttl_s}")
        self._redis = redis
        self._prefix = prefix
        self._pending_ttl_s = pending_ttl_s + _PENDING_GRACE_S

    def new_record(
        self,
        tenant: str,
        kind: UploadKind,
        filename: str,
        fmt: str,
        *,
        declared_size: int | None = None,
        upload_id: str | None = None,
    ) -> UploadRecord:
        """A pending record (not saved yet) with a new id and its object key."""
        upload_id = upload_id or new_upload_id()
        now = datetime.now(UTC)
        return UploadRecord(
            id=upload_id,
            tenant=tenant,
            kind=kind,
            filename=filename,
            format=fmt,
            key=upload_key(tenant, upload_id, kind, fmt),
            status=UploadStatus.PENDING,
            declared_size=declared_size,
            created_at=now,
            updated_at=now,
        )

    def save(self, record: UploadRecord) -> UploadRecord:
        """Write ``record`` (stamped with a new ``updated_at``), with the expiry of its status."""
        record = record.model_copy(update={"updated_at": datetime.now(UTC)})
        ttl = {
            UploadStatus.PENDING: self._pending_ttl_s,
            UploadStatus.INVALID: _INVALID_TTL_S,
            UploadStatus.READY: None,  # a plain SET also drops an earlier expiry
        }[record.status]
        self._redis.set(self._key(record.id), record.model_dump_json(), ex=ttl)
        return record

    def get(self, upload_id: str, tenant: str | None = None) -> UploadRecord | None:
        """The record, or ``None`` if unknown or (with ``tenant``) another tenant's."""
        if not is_upload_id(upload_id):
            return None
        raw = self._redis.get(self._key(upload_id))
        if raw is None:
            return None
        record = UploadRecord.model_validate_json(raw)
        if tenant is not None and record.tenant != tenant:
            return None
        return record

    def _key(self, upload_id: str) -> str:
        return f"{self._prefix}:upload:{upload_id}"
