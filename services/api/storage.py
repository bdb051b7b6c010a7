"""The object storage the API needs, as a small interface, one instance per bucket role.

Distributed mode: :class:`~genq_core.storage_s3.S3Storage` per bucket (it satisfies
:class:`ObjectStore` as it is). Embedded mode: :class:`LocalObjectStore`, a folder per bucket;
its download URLs are links signed by the API itself (``services.api.signing``, served by
``services.api.routers.files``); presigned uploads answer 501 there (upload with multipart).
"""

from __future__ import annotations

import mimetypes
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from genq_core.storage import LocalStorage, check_key
from genq_core.storage_s3 import ObjectInfo, S3Storage
from services.api.errors import PresignUnsupported
from services.api.settings import ApiSettings
from services.api.signing import LinkSigner
from services.common.keys import BucketRole

__all__ = ["Buckets", "LocalObjectStore", "ObjectStore", "local_buckets", "s3_buckets"]


class ObjectStore(Protocol):
    """One bucket, as the API uses it (keys are ``/``-separated, see ``genq_core.storage``)."""

    def get_bytes(self, key: str) -> bytes:
        """The object; ``KeyError`` if missing."""
        ...

    def put_file(
        self, key: str, path: str | Path, content_type: str = "application/octet-stream"
    ) -> None: ...

    def get_file(self, key: str, path: str | Path) -> None:
        """Download to ``path``; ``KeyError`` if missing."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """Size and type of the object; ``KeyError`` if missing."""
        ...

    def delete(self, key: str) -> None: ...

    def presigned_get_url(self, key: str, expires: timedelta, filename: str | None = None) -> str:
        """A download URL needing no credentials; a path starting with ``/`` is relative to the
        API's base URL (the embedded mode's signed links)."""
        ...

    def presigned_put_url(self, key: str, expires: timedelta) -> str: ...

    def ensure_bucket(self) -> None: ...

    def ping(self) -> None:
        """Raise (``StorageError``) unless the bucket is reachable."""
        ...


Buckets = Mapping[BucketRole, ObjectStore]
"""The storage of each bucket role: data (datasets), results (models, reports), uploads."""


def s3_buckets(settings: ApiSettings) -> dict[BucketRole, ObjectStore]:
    """An :class:`S3Storage` per bucket role, presigning for ``s3_public_endpoint``."""
    assert settings.s3_endpoint and settings.s3_access_key and settings.s3_secret_key  # check()ed
    names = {
        BucketRole.DATA: settings.s3_bucket_data,
        BucketRole.RESULTS: settings.s3_bucket_results,
        BucketRole.UPLOADS: settings.s3_bucket_uploads,
    }
    return {
        role: S3Storage(
            settings.s3_endpoint,
            settings.s3_access_key.get_secret_value(),
            settings.s3_secret_key.get_secret_value(),
            bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
            public_endpoint=settings.s3_public_endpoint,
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
            max_retries=settings.s3_max_retries,
        )
        for role, bucket in names.items()
    }


def local_buckets(
    settings: ApiSettings, signer: LinkSigner | None = None
) -> dict[BucketRole, ObjectStore]:
    """Embedded mode: a folder per bucket under ``data_dir`` (the workers' layout too); with
    ``signer``, download URLs are links it signs."""
    names = {
        BucketRole.DATA: settings.s3_bucket_data,
        BucketRole.RESULTS: settings.s3_bucket_results,
        BucketRole.UPLOADS: settings.s3_bucket_uploads,
    }
    stores: dict[BucketRole, ObjectStore] = {}
    for role, bucket in names.items():
        local = settings.local_storage(bucket)
        assert isinstance(local, LocalStorage)
        stores[role] = LocalObjectStore(local, role=role, signer=signer)
    return stores


class LocalObjectStore:
    """A :class:`~genq_core.storage.LocalStorage` folder as an :class:`ObjectStore`.

    Download URLs are ``/files/<token>`` links signed by ``signer`` for the bucket ``role``
    (without a signer they raise :class:`~services.api.errors.PresignUnsupported`, 501);
    presigned uploads always do: upload with a multipart ``POST /v1/uploads``.
    """

    def __init__(
        self,
        storage: LocalStorage,
        *,
        role: BucketRole | None = None,
        signer: LinkSigner | None = None,
    ) -> None:
        if (role is None) != (signer is None):
            raise ValueError("a LocalObjectStore signs links with both a role and a signer")
        self._storage = storage
        self._role = role
        self._signer = signer

    def __repr__(self) -> str:
        return f"LocalObjectStore({self._storage!r})"

    def get_bytes(self, key: str) -> bytes:
        return self._storage.get_bytes(key)

    def put_file(
        self, key: str, path: str | Path, content_type: str = "application/octet-stream"
    ) -> None:
        # put_bytes writes to a temporary file and renames it into place: readers never see a
        # partial object. Embedded mode is one machine, so holding the file in memory is fine.
        self._storage.put_bytes(key, Path(path).read_bytes(), content_type)

    def get_file(self, key: str, path: str | Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise KeyError(f"no object {key!r} in {self._storage!r}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def stat(self, key: str) -> ObjectInfo:
        source = self._path(key)
        if not source.is_file():
            raise KeyError(f"no object {key!r} in {self._storage!r}")
        info = source.stat()
        return ObjectInfo(
            key=key,
            size=info.st_size,
            etag="",
            content_type=mimetypes.guess_type(key)[0] or "application/octet-stream",
            last_modified=datetime.fromtimestamp(info.st_mtime, UTC),
        )

    def delete(self, key: str) -> None:
        self._storage.delete(key)

    def presigned_get_url(self, key: str, expires: timedelta, filename: str | None = None) -> str:
        if self._signer is None or self._role is None:
            raise PresignUnsupported(
                "download URLs need an S3 server or the embedded service's signed links; this "
                "local storage has neither"
            )
        check_key(key)
        expires_at = datetime.now(UTC) + expires
        return self._signer.link(self._role.value, key, expires_at, filename)

    def presigned_put_url(self, key: str, expires: timedelta) -> str:
        raise PresignUnsupported(
            "presigned uploads need an S3 server; in the embedded mode, upload with a "
            "multipart POST /v1/uploads"
        )

    def ensure_bucket(self) -> None:
        self._storage.root.mkdir(parents=True, exist_ok=True)

    def ping(self) -> None:
        if not self._storage.root.is_dir():
            raise OSError(f"storage folder {self._storage.root} is missing")

    def local_path(self, key: str) -> Path:
        """Where the object ``key`` lives (or would live) on disk; ``ValueError`` on a bad key."""
        check_key(key)
        return self._storage.root / key

    def _path(self, key: str) -> Path:
        return self.local_path(key)
