"""Object storage on an S3 server (MinIO in production): :class:`S3Storage`.

:class:`S3Storage` implements :class:`~genq_core.storage.Storage` with the same semantics as
:class:`~genq_core.storage.LocalStorage` (keys checked by :func:`~genq_core.storage.check_key`,
``KeyError`` for a missing object, sorted recursive listing, deleting a missing key is a no-op)
and adds what the REST service needs: file upload and download, object metadata, presigned
URLs and a readiness check. Every object lives under ``prefix`` inside ``bucket``; keys are
relative to that prefix.

Failures of the server or the network raise :class:`StorageError`, whose message names the
endpoint, the bucket and the operation; a key that is both an object and a folder on servers
that forbid it (MinIO, the JuiceFS gateway) raises ``ValueError`` like ``LocalStorage``.

This module must not import torch: the API image imports it and has no torch.
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote, urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from minio.helpers import check_bucket_name

from genq_core.storage import Storage, check_key

__all__ = ["ObjectInfo", "S3Config", "S3Storage", "StorageError"]

# S3's limits for presigned URLs (SigV4): at least one second, at most seven days.
_MIN_PRESIGN_EXPIRY = timedelta(seconds=1)
_MAX_PRESIGN_EXPIRY = timedelta(days=7)
# Error codes by which a server says the credentials are wrong or not allowed.
_CREDENTIAL_ERRORS = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)
# MinIO's codes for a key that is below an existing object or names a folder of objects.
_PARENT_IS_OBJECT_ERRORS = frozenset({"XMinioParentIsObject"})
_KEY_IS_FOLDER_ERRORS = frozenset({"XMinioObjectExistsAsDirectory"})
_DOWNLOAD_CHUNK = 1024 * 1024


class StorageError(RuntimeError):
    """The S3 server could not be reached, rejected the credentials, or failed a request."""


@dataclass(frozen=True)
class S3Config:
    """Where an :class:`S3Storage` keeps its objects and how it reaches the server.

    Args:
        endpoint: ``host:port`` of the S3 API as this process reaches it, without a scheme.
        access_key: the S3 access key.
        secret_key: the S3 secret key (left out of ``repr``).
        bucket: the bucket that holds the objects.
        prefix: a key prefix inside the bucket (``""`` or e.g. ``"tenants/x"``); keys are
            relative to it. A trailing ``/`` is optional.
        secure: use HTTPS to reach ``endpoint``.
        region: the bucket's region; set explicitly so no request is needed to discover it.
        public_endpoint: the host users reach the server on, for presigned URLs:
            ``host:port`` (scheme from ``secure``) or ``http(s)://host[:port]``. ``None``:
            presign for ``endpoint``.
        connect_timeout: seconds to wait for a TCP connection, > 0.
        read_timeout: seconds to wait for data on an open connection, > 0.
        max_retries: retries of a failed idempotent request (connection errors, HTTP 500,
            502, 503, 504), >= 0.
    """

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str
    prefix: str = ""
    secure: bool = False
    region: str = "us-east-1"
    public_endpoint: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        _check_host_port(self.endpoint, "endpoint")
        if not self.access_key or not self.secret_key:
            raise ValueError("access_key and secret_key must be non-empty")
        try:
            check_bucket_name(self.bucket, strict=True)
        except ValueError as err:
            raise ValueError(
                f"bucket {self.bucket!r} is not a valid S3 bucket name: {err}"
            ) from None
        if self.prefix:
            try:
                check_key(self.prefix.removesuffix("/"))
            except ValueError as err:
                raise ValueError(
                    f"prefix {self.prefix!r} is not a valid key prefix: {err}"
                ) from None
        if not self.region:
            raise ValueError("region must be non-empty (e.g. 'us-east-1')")
        if self.public_endpoint is not None:
            _split_public_endpoint(self.public_endpoint, self.secure)
        if not self.connect_timeout > 0 or not self.read_timeout > 0:
            raise ValueError(
                f"timeouts must be > 0, got connect_timeout={self.connect_timeout!r}, "
                f"read_timeout={self.read_timeout!r}"
            )
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries!r}")


@dataclass(frozen=True)
class ObjectInfo:
    """Metadata of one stored object.

    Attributes:
        key: the key, relative to the storage prefix.
        size: length in bytes.
        etag: the server's entity tag without quotes (the MD5 of a single-part upload,
            ``<hash>-<parts>`` after a multipart upload).
        content_type: the ``Content-Type`` stored with the object.
        last_modified: when the object was written (timezone-aware, UTC).
    """

    key: str
    size: int
    etag: str
    content_type: str
    last_modified: datetime


class S3Storage(Storage):
    """Objects in an S3 bucket, below a key prefix (see :class:`S3Config` for the arguments).

    Writes are atomic as S3 makes them: a reader sees the old object or the new one. Unlike
    ``LocalStorage``, deleting a key that only names a folder of objects is a no-op (S3 has no
    folders), and whether a key may be both an object and a folder depends on the server.
    The bucket is not created on construction: call :meth:`ensure_bucket` once.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        prefix: str = "",
        secure: bool = False,
        region: str = "us-east-1",
        public_endpoint: str | None = None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_retries: int = 3,
    ):
        self.config = S3Config(
            endpoint=endpoint,
            access_key=access_key,
            secret_key=secret_key,
            bucket=bucket,
            prefix=prefix,
            secure=secure,
            region=region,
            public_endpoint=public_endpoint,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_retries=max_retries,
        )
        self.bucket = bucket
        self._key_prefix = prefix.removesuffix("/") + "/" if prefix else ""
        self._url = f"{'https' if secure else 'http'}://{endpoint}"
        http_client = _http_client(self.config)
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http_client,
        )
        # Presigned URLs sign the Host header, so they are signed by a client built on the host
        # users reach. It never sends a request: the region is given, so none is looked up.
        if public_endpoint is None:
            self._presign_client = self._client
        else:
            public_host, public_secure = _split_public_endpoint(public_endpoint, secure)
            self._presign_client = Minio(
                public_host,
                access_key=access_key,
                secret_key=secret_key,
                secure=public_secure,
                region=region,
                http_client=http_client,
            )

    @classmethod
    def from_config(cls, config: S3Config) -> S3Storage:
        """An :class:`S3Storage` for ``config``."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    def __repr__(self) -> str:
        return f"S3Storage({self._url!r}, bucket={self.bucket!r}, prefix={self._key_prefix!r})"

    # -- the Storage protocol -------------------------------------------------------------

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        object_name = self._object_name(key)
        with self._s3_errors(f"writing {key!r}", key, writing=True):
            self._client.put_object(
                self.bucket, object_name, io.BytesIO(data), len(data), content_type=content_type
            )

    def get_bytes(self, key: str) -> bytes:
        object_name = self._object_name(key)
        with self._s3_errors(f"reading {key!r}", key):
            response = self._client.get_object(self.bucket, object_name)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except KeyError:
            return False
        return True

    def list(self, prefix: str = "") -> builtins.list[str]:
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"prefix {prefix!r} must be relative and must not contain '..'")
        keys = []
        with self._s3_errors(f"listing {prefix!r}"):
            for obj in self._client.list_objects(
                self.bucket, prefix=self._key_prefix + prefix, recursive=True
            ):
                key = (obj.object_name or "").removeprefix(self._key_prefix)
                # Folder markers and names written by other tools that no key can address.
                if not obj.is_dir and _is_valid_key(key):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        object_name = self._object_name(key)
        with self._s3_errors(f"deleting {key!r}", key):
            self._client.remove_object(self.bucket, object_name)

    # -- what the service needs beyond the protocol ---------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet; safe to call again or concurrently."""
        with self._s3_errors("creating the bucket"):
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket, location=self.config.region)
            except S3Error as err:
                if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
                if not self._client.bucket_exists(self.bucket):
                    raise  # the name is taken by another account

    def ping(self) -> None:
        """Check that the server answers, accepts the credentials and has the bucket.

        Raises:
            StorageError: saying which of these failed.
        """
        with self._s3_errors("checking the bucket"):
            found = self._client.bucket_exists(self.bucket)
        if not found:
            raise StorageError(
                f"bucket {self.bucket!r} does not exist at {self._url}; create it with "
                "ensure_bucket()"
            )

    def put_file(
        self, key: str, path: str | Path, content_type: str = "application/octet-stream"
    ) -> None:
        """Upload the file at ``path`` to ``key``, streaming it (multipart above 5 MiB)."""
        object_name = self._object_name(key)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no file to upload at {path}")
        with self._s3_errors(f"uploading {path} to {key!r}", key, writing=True):
            self._client.fput_object(self.bucket, object_name, str(path), content_type=content_type)

    def get_file(self, key: str, path: str | Path) -> None:
        """Download ``key`` to ``path`` (parent folders are created).

        The object is written to a temporary file next to ``path`` and renamed into place, so
        ``path`` holds either its old content or the whole object, never a partial download.

        Raises:
            KeyError: there is no object under ``key``.
        """
        object_name = self._object_name(key)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle, self._s3_errors(f"downloading {key!r}", key):
                response = self._client.get_object(self.bucket, object_name)
                try:
                    for chunk in response.stream(_DOWNLOAD_CHUNK):
                        handle.write(chunk)
                finally:
                    response.close()
                    response.release_conn()
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def stat(self, key: str) -> ObjectInfo:
        """Metadata of the object under ``key``.

        Raises:
            KeyError: there is no object under ``key``.
        """
        object_name = self._object_name(key)
        with self._s3_errors(f"reading the metadata of {key!r}", key):
            info = self._client.stat_object(self.bucket, object_name)
        if info.last_modified is None:
            raise StorageError(f"{self._url} returned no Last-Modified for {key!r}")
        return ObjectInfo(
            key=key,
            size=info.size or 0,
            etag=(info.etag or "").strip('"'),
            content_type=info.content_type or "application/octet-stream",
            last_modified=info.last_modified,
        )

    def presigned_get_url(self, key: str, expires: timedelta, filename: str | None = None) -> str:
        """A URL that downloads ``key`` without credentials until ``expires`` has passed.

        The URL is signed for ``public_endpoint`` when one is configured. It is built locally:
        it does not check that the object exists.

        Args:
            key: the object.
            expires: how long the URL stays valid, 1 second to 7 days.
            filename: if given, the download is offered as an attachment with this name
                (``Content-Disposition``); a plain file name without ``/``, ``\\``, ``"`` or
                control characters.
        """
        object_name = self._object_name(key)
        _check_expiry(expires)
        response_headers: dict[str, str | list[str] | tuple[str]] | None = None
        if filename is not None:
            response_headers = {"response-content-disposition": _content_disposition(filename)}
        with self._s3_errors(f"presigning a download of {key!r}"):
            return self._presign_client.presigned_get_object(
                self.bucket, object_name, expires=expires, response_headers=response_headers
            )

    def presigned_put_url(self, key: str, expires: timedelta) -> str:
        """A URL that uploads ``key`` with an HTTP PUT without credentials until ``expires``.

        Signed for ``public_endpoint`` when one is configured; ``expires`` is 1 second to 7
        days. The uploader's ``Content-Type`` header is stored with the object.
        """
        object_name = self._object_name(key)
        _check_expiry(expires)
        with self._s3_errors(f"presigning an upload of {key!r}"):
            return self._presign_client.presigned_put_object(
                self.bucket, object_name, expires=expires
            )

    # -- helpers --------------------------------------------------------------------------

    def _object_name(self, key: str) -> str:
        check_key(key)
        return self._key_prefix + key

    @contextmanager
    def _s3_errors(
        self, action: str, key: str | None = None, writing: bool = False
    ) -> Iterator[None]:
        """Turn minio and urllib3 errors raised inside into KeyError, ValueError or StorageError.

        ``action`` says what was being done (``"reading 'a/b'"``); with ``key``, a missing
        object raises ``KeyError`` naming it, and when ``writing`` it, a key that would be both
        an object and a folder raises ``ValueError``.
        """
        try:
            yield
        except S3Error as err:
            self._raise_for_s3_error(err, action, key, writing)
        except urllib3.exceptions.HTTPError as err:
            reason = err.reason if isinstance(err, urllib3.exceptions.MaxRetryError) else err
            raise StorageError(
                f"cannot reach S3 endpoint {self._url} (bucket {self.bucket!r}) while {action}: "
                f"{reason}"
            ) from err
        except MinioException as err:
            raise StorageError(
                f"S3 endpoint {self._url} (bucket {self.bucket!r}) gave an invalid response "
                f"while {action}: {err}"
            ) from err

    def _raise_for_s3_error(
        self, err: S3Error, action: str, key: str | None, writing: bool
    ) -> NoReturn:
        where = f"{self._url} (bucket {self.bucket!r})"
        if key is not None and err.code == "NoSuchKey":
            raise KeyError(f"no object {key!r} in {self!r}") from None
        if key is not None and writing and _names_parent_object(err):
            raise ValueError(
                f"key {key!r} lies below an existing object in {self!r}; a key cannot "
                "be both an object and a folder"
            ) from None
        if key is not None and writing and _names_folder(err):
            raise ValueError(f"key {key!r} names a folder of other objects in {self!r}") from None
        if err.code == "NoSuchBucket":
            raise StorageError(
                f"bucket {self.bucket!r} does not exist at {self._url} (while {action}); create "
                "it with ensure_bucket()"
            ) from err
        if err.code in _CREDENTIAL_ERRORS:
            raise StorageError(
                f"S3 endpoint {where} refused access while {action} ({err.code}: {err.message}); "
                "check the access key, the secret key and the bucket policy"
            ) from err
        raise StorageError(
            f"S3 endpoint {where} failed while {action}: {err.code}: {err.message}"
        ) from err


def _http_client(config: S3Config) -> urllib3.PoolManager:
    """A connection pool with the configured timeouts and a bounded retry policy.

    minio's default waits 5 minutes and retries 5 times: far too long for a readiness check.
    ``raise_on_status=False`` hands the last error response to minio after the retries, so the
    server's error code reaches the caller instead of a bare "too many 500 error responses".
    """
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=config.connect_timeout, read=config.read_timeout),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=config.max_retries,
            backoff_factor=0.1,
            status_forcelist=[500, 502, 503, 504],
            raise_on_status=False,
        ),
    )


def _check_host_port(value: str, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is ``host`` or ``host:port`` (no scheme, no path)."""
    if not value or "://" in value or "/" in value or value != value.strip():
        raise ValueError(f"{name} must be 'host:port' without scheme or path, got {value!r}")
    port = value.rpartition(":")[2] if ":" in value and not value.endswith("]") else None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{name} {value!r} has an invalid port {port!r}")


def _split_public_endpoint(public_endpoint: str, secure: bool) -> tuple[str, bool]:
    """``(host:port, secure)`` of a ``host:port`` or ``http(s)://host[:port]`` endpoint."""
    if "://" not in public_endpoint:
        _check_host_port(public_endpoint, "public_endpoint")
        return public_endpoint, secure
    parts = urlsplit(public_endpoint)
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query:
        raise ValueError(
            f"public_endpoint must be 'host:port' or 'http(s)://host[:port]' without a path, "
            f"got {public_endpoint!r}"
        )
    _check_host_port(parts.netloc, "public_endpoint")
    return parts.netloc, parts.scheme == "https"


def _check_expiry(expires: timedelta) -> None:
    if not _MIN_PRESIGN_EXPIRY <= expires <= _MAX_PRESIGN_EXPIRY:
        raise ValueError(f"expires must be between 1 second and 7 days, got {expires}")


def _content_disposition(filename: str) -> str:
    """An ``attachment`` disposition for ``filename``, with an RFC 5987 form for non-ASCII."""
    if (
        not filename
        or any(char in filename for char in '/\\"')
        or any(ord(char) < 32 or ord(char) == 127 for char in filename)
    ):
        raise ValueError(
            f"filename must be a plain file name without '/', '\\\\', '\"' or control "
            f"characters, got {filename!r}"
        )
    ascii_name = filename.encode("ascii", "replace").decode("ascii")
    if ascii_name == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _is_valid_key(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False
    return True


def _names_parent_object(err: S3Error) -> bool:
    # The JuiceFS gateway reports the file system's ENOTDIR as a retryable InternalError.
    return err.code in _PARENT_IS_OBJECT_ERRORS or (
        err.code == "InternalError" and "not a directory" in (err.message or "")
    )


def _names_folder(err: S3Error) -> bool:
    # The JuiceFS gateway reports the file system's EISDIR as a retryable InternalError.
    return err.code in _KEY_IS_FOLDER_ERRORS or (
        err.code == "InternalError" and "is a directory" in (err.message or "")
    )
