"""Object storage: where images, manifests and models go, addressed by ``/``-separated keys.

:class:`Storage` is the protocol every stage writes through; :class:`LocalStorage` keeps objects as
files under a root folder (embedded mode, tests). The service adds an S3 implementation of the
same protocol. Keys are relative paths such as ``jobs/42/images/0003/000017.png``; they never start
with ``/`` and never contain empty, ``.`` or ``..`` components.
"""

from __future__ import annotations

import builtins
import os
import tempfile
from pathlib import Path
from typing import Protocol

__all__ = ["LocalStorage", "Storage", "check_key"]

# Suffix of the temporary files LocalStorage writes before renaming them into place; list()
# hides them and keys may not end with it.
_TMP_SUFFIX = ".genq-tmp"


class Storage(Protocol):
    """A flat key -> bytes store (the subset of S3 that ``genq_core`` needs)."""

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        """Store ``data`` under ``key``, replacing any previous object atomically."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The object under ``key``; ``KeyError`` naming the key if there is none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Every key that starts with ``prefix`` (a plain string prefix, like S3), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object under ``key``; deleting a missing key is not an error."""
        ...


class LocalStorage(Storage):
    """Objects as files below ``root``; writes go to a temporary file renamed into place.

    A reader therefore sees either the old object or the new one, never a partial file. The
    ``content_type`` of :meth:`put_bytes` is accepted for protocol compatibility and not stored.

    Args:
        root: the folder that holds the objects; created if missing.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._resolved_root = self.root.resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        path = self._path(key)
        if path.is_dir():
            raise ValueError(f"key {key!r} names a folder of other objects in {self.root}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(
                f"key {key!r} lies below an existing object in {self.root}; a key cannot be both "
                "an object and a folder"
            ) from None
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent
        )
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(f"no object {key!r} in {self.root}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> builtins.list[str]:
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"prefix {prefix!r} must be relative and must not contain '..'")
        # Walk only the deepest folder the prefix fully names.
        folder = prefix.rpartition("/")[0]
        start = self.root / folder if folder else self.root
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(start):
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.endswith(_TMP_SUFFIX):
                    continue
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            raise ValueError(f"key {key!r} names a folder of other objects in {self.root}")
        path.unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        check_key(key)
        path = self.root / key
        # A symlink inside the root must not lead outside it.
        if not path.resolve().is_relative_to(self._resolved_root):
            raise ValueError(f"key {key!r} resolves outside {self.root}")
        return path


def check_key(key: str) -> None:
    """Raise ``ValueError`` unless ``key`` is a safe relative ``/``-separated object key.

    Rejected: empty keys, absolute keys, backslashes, and empty, ``.`` or ``..`` components
    (``a//b``, ``a/./b``, ``../b``, a trailing ``/``), which could escape the root or alias
    another key.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key must be a non-empty string, got {key!r}")
    if key.startswith("/"):
        raise ValueError(f"storage key {key!r} must be relative, not absolute")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"storage key {key!r} must not contain backslashes or NUL bytes")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"storage key {key!r} must not contain empty, '.' or '..' components")
    if key.endswith(_TMP_SUFFIX):
        raise ValueError(f"storage key {key!r} must not end with {_TMP_SUFFIX!r} (reserved)")
