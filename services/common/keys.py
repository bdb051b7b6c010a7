"""Object-store layout: deterministic keys per job, so a retried stage overwrites, never duplicates.

A job's outputs keep the keys ``run_genq`` gives them (``synthetic/...``, ``model/...``,
``report.json``, ...) under ``jobs/{job_id}/``; which bucket an output goes to depends on its
first key component (datasets may expire, results are kept). Uploads live under
``uploads/{tenant}/{upload_id}/``.
"""

from __future__ import annotations

from enum import StrEnum

from services.common.jobs import is_job_id

__all__ = [
    "ARTIFACTS_MANIFEST",
    "CHECKPOINT_PREFIX",
    "DATA_PREFIXES",
    "BucketRole",
    "bucket_role",
    "job_key",
    "job_prefix",
    "upload_prefix",
]

ARTIFACTS_MANIFEST = "artifacts.json"
"""Key (under the job prefix) of the manifest of a job's artifacts: name, kind, size, sha256."""

CHECKPOINT_PREFIX = "checkpoints"
"""Key component under which workers keep stage checkpoints of a job (data bucket)."""

DATA_PREFIXES = ("synthetic", "calibration", "tokens", CHECKPOINT_PREFIX)
"""First key components of a job's outputs that go to the data bucket; all others are results."""


class BucketRole(StrEnum):
    DATA = "data"
    RESULTS = "results"
    UPLOADS = "uploads"


def job_prefix(job_id: str) -> str:
    """``jobs/{job_id}`` for a well-formed job id; ``ValueError`` otherwise (no path tricks)."""
    if not is_job_id(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return f"jobs/{job_id}"


def job_key(job_id: str, key: str) -> str:
    """The full key of a job output ``key`` (as ``run_genq`` names it)."""
    return f"{job_prefix(job_id)}/{key}"


def bucket_role(key: str) -> BucketRole:
    """Where a job output goes, by its first key component (``key`` relative to the job)."""
    first = key.split("/", 1)[0]
    return BucketRole.DATA if first in DATA_PREFIXES else BucketRole.RESULTS


def upload_prefix(tenant: str, upload_id: str) -> str:
    """``uploads/{tenant}/{upload_id}``."""
    for name, value in (("tenant", tenant), ("upload_id", upload_id)):
        if not value or "/" in value or value in (".", ".."):
            raise ValueError(f"{name} must be a non-empty name without '/', got {value!r}")
    return f"uploads/{tenant}/{upload_id}"
