"""The storage a job writes through: its outputs under ``jobs/{id}/``, split over two buckets.

``genq_core`` writes keys such as ``synthetic/images/0003/000017.png`` or ``model/model.safetensors``
to a :class:`~genq_core.storage.Storage`. :class:`JobStorage` is that storage for one job: it puts
every key under ``keys.job_prefix(job_id)`` and sends it to the bucket its first component belongs
to (``keys.bucket_role``): datasets, calibration sets, tokens and checkpoints to the data bucket
(which a deployment may expire), models and reports to the results bucket (kept). So the pipeline
stays unaware of buckets and jobs, and a retried job overwrites its own keys instead of
duplicating them.
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from genq_core.storage import Storage, check_key
from genq_core.storage_s3 import S3Storage
from services.common import keys
from services.common.keys import BucketRole
from services.common.settings import Mode, StoreSettings

__all__ = ["FileStorage", "JobStorage", "Storages", "file_sha256", "open_storages"]

Storages = Mapping[BucketRole, Storage]
"""The backing storage of each bucket: data, results and uploads."""

_CHUNK = 1024 * 1024


@runtime_checkable
class FileStorage(Protocol):
    """A storage that moves whole files without holding them in memory (``S3Storage``)."""

    def put_file(
        self, key: str, path: str | Path, content_type: str = "application/octet-stream"
    ) -> None: ...

    def get_file(self, key: str, path: str | Path) -> None: ...


def open_storages(
    settings: StoreSettings, *, create_buckets: bool = False
) -> dict[BucketRole, Storage]:
    """The three buckets of ``settings``: S3 in the distributed mode, folders in the embedded one.

    Args:
        settings: the shared store settings (checked for the distributed mode's secrets).
        create_buckets: create missing S3 buckets (tests and first starts; deployments usually
            create them beforehand).

    Raises:
        MissingSettings: the distributed mode lacks the S3 endpoint or credentials.
    """
    settings.check()
    names = {
        BucketRole.DATA: settings.s3_bucket_data,
        BucketRole.RESULTS: settings.s3_bucket_results,
        BucketRole.UPLOADS: settings.s3_bucket_uploads,
    }
    if settings.mode == Mode.EMBEDDED:
        return {role: settings.local_storage(bucket) for role, bucket in names.items()}
    assert settings.s3_endpoint and settings.s3_access_key and settings.s3_secret_key
    storages: dict[BucketRole, Storage] = {}
    for role, bucket in names.items():
        storage = S3Storage(
            settings.s3_endpoint,
            settings.s3_access_key.get_secret_value(),
            settings.s3_secret_key.get_secret_value(),
            bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
            public_endpoint=settings.s3_public_endpoint,
        )
        if create_buckets:
            storage.ensure_bucket()
        storages[role] = storage
    return storages


class JobStorage(Storage):
    """One job's outputs: keys relative to ``jobs/{job_id}/``, routed to the data or results bucket.

    Args:
        job_id: a well-formed job id (anything else raises ``ValueError``: no path tricks).
        storages: the backing storage of each bucket; ``UPLOADS`` is not used here.
    """

    def __init__(self, job_id: str, storages: Storages) -> None:
        self.job_id = job_id
        self.prefix = keys.job_prefix(job_id)
        self._data = storages[BucketRole.DATA]
        self._results = storages[BucketRole.RESULTS]

    def __repr__(self) -> str:
        return f"JobStorage({self.job_id!r}, data={self._data!r}, results={self._results!r})"

    def backing(self, key: str) -> Storage:
        """The bucket's storage that holds ``key`` (relative to the job)."""
        return self._data if keys.bucket_role(key) == BucketRole.DATA else self._results

    def full_key(self, key: str) -> str:
        """``jobs/{job_id}/{key}``, the key in the backing storage."""
        check_key(key)
        return f"{self.prefix}/{key}"

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        self.backing(key).put_bytes(self.full_key(key), data, content_type)

    def get_bytes(self, key: str) -> bytes:
        return self.backing(key).get_bytes(self.full_key(key))

    def exists(self, key: str) -> bool:
        return self.backing(key).exists(self.full_key(key))

    def list(self, prefix: str = "") -> builtins.list[str]:
        # A prefix such as "" or "s" can match keys in both buckets: ask both.
        backings = [self._data] if self._data is self._results else [self._data, self._results]
        full_prefix = f"{self.prefix}/{prefix}"
        found: set[str] = set()
        for storage in backings:
            for key in storage.list(full_prefix):
                relative = key.removeprefix(f"{self.prefix}/")
                if self.backing(relative) is storage:  # ignore strays in the wrong bucket
                    found.add(relative)
        return sorted(found)

    def delete(self, key: str) -> None:
        self.backing(key).delete(self.full_key(key))

    def put_file(
        self, key: str, path: str | Path, content_type: str = "application/octet-stream"
    ) -> None:
        """Store the file at ``path`` under ``key``, streamed when the bucket supports it."""
        storage = self.backing(key)
        if isinstance(storage, FileStorage):
            storage.put_file(self.full_key(key), path, content_type)
        else:
            storage.put_bytes(self.full_key(key), Path(path).read_bytes(), content_type)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in chunks (archives can be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
