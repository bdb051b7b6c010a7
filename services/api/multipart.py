"""Stream the one file of a ``multipart/form-data`` upload to disk, with a hard size cap.

Why not Starlette's ``request.form()``: it needs the ``python-multipart`` package (not in the API
image), and it spools the whole file before a route sees it, so a size cap would bite only after
the bytes were received. This parser handles exactly what an upload needs: one file part (no
other fields), written chunk by chunk while the cap and the sha256 are kept.

:class:`SingleFileParser` is a push parser (feed it bytes as they arrive); :func:`receive_file`
drives it from a request body stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath

import anyio

from services.api.errors import InvalidField, TooLarge, UnsupportedMediaType

__all__ = ["ReceivedFile", "SingleFileParser", "boundary_of", "receive_file"]

_MAX_HEADER_BYTES = 16 * 1024
_MAX_PREAMBLE_BYTES = 64 * 1024
_MAX_FILENAME = 255


@dataclass(frozen=True)
class ReceivedFile:
    """What arrived: the form field's name, the client's file name (base name only), its size and
    sha256 (of the bytes written)."""

    field: str
    filename: str
    size: int
    sha256: str


class _State(Enum):
    PREAMBLE = 1
    HEADERS = 2
    BODY = 3
    AFTER_FILE = 4
    DONE = 5


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; 415 for any other type."""
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != "multipart/form-data":
        raise UnsupportedMediaType(
            "uploads are multipart/form-data with one file part "
            f"(e.g. curl -F file=@model.safetensors); got {media.strip() or 'no Content-Type'}"
        )
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
            if 1 <= len(boundary) <= 70:
                return boundary.encode("latin-1")
    raise UnsupportedMediaType("multipart/form-data without a valid boundary parameter")


class SingleFileParser:
    """Push parser for a multipart body holding exactly one file part.

    ``feed(data)`` returns the file bytes that ``data`` completed (possibly empty: the parser holds
    back a delimiter's length in case the delimiter is split between two chunks); ``close()``
    checks the body ended properly. Errors are :class:`InvalidField` on the field ``file``.
    """

    def __init__(self, boundary: bytes) -> None:
        # Every delimiter but the first follows a CRLF; starting the buffer with one makes the
        # first look like the others.
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray(b"\r\n")
        self._state = _State.PREAMBLE
        self._skipped = 0
        self.field: str | None = None
        self.filename: str | None = None

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        progressed = True
        while progressed and self._state is not _State.DONE:
            progressed = self._step(out)
        return bytes(out)

    def close(self) -> None:
        if self._state is _State.PREAMBLE:
            raise _invalid("the body holds no multipart part; send the file as a form part")
        if self._state is not _State.DONE:
            raise _invalid("the multipart body ended early (the upload was cut off?)")

    def _step(self, out: bytearray) -> bool:
        """Advance one state if the buffer allows; whether it did."""
        if self._state is _State.PREAMBLE:
            return self._find_first_delimiter()
        if self._state is _State.HEADERS:
            return self._parse_headers()
        if self._state is _State.BODY:
            return self._take_body(out)
        return self._after_file()

    def _find_first_delimiter(self) -> bool:
        at = self._buffer.find(self._delimiter)
        if at < 0:
            keep = len(self._delimiter) - 1
            self._skipped += max(0, len(self._buffer) - keep)
            if self._skipped > _MAX_PREAMBLE_BYTES:
                raise _invalid("no multipart boundary found at the start of the body")
            del self._buffer[: max(0, len(self._buffer) - keep)]
            return False
        end = at + len(self._delimiter)
        if len(self._buffer) < end + 2:
            return False
        if self._buffer[end : end + 2] == b"--":
            raise _invalid("the multipart body has no parts; send one file")
        if self._buffer[end : end + 2] != b"\r\n":
            raise _invalid("malformed multipart boundary line")
        del self._buffer[: end + 2]
        self._state = _State.HEADERS
        return True

    def _parse_headers(self) -> bool:
        at = self._buffer.find(b"\r\n\r\n")
        if at < 0:
            if len(self._buffer) > _MAX_HEADER_BYTES:
                raise _invalid("the multipart part's headers are too long")
            return False
        lines = bytes(self._buffer[:at]).decode("utf-8", "replace").split("\r\n")
        del self._buffer[: at + 4]
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise _invalid(f"malformed multipart header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        disposition, params = _parse_disposition(headers.get("content-disposition", ""))
        if disposition != "form-data" or "name" not in params:
            raise _invalid("the multipart part has no 'Content-Disposition: form-data; name=...'")
        if "filename" not in params:
            raise _invalid(
                f"form field {params['name']!r} is not a file; an upload is one file part "
                "(e.g. curl -F file=@calibration.zip)"
            )
        filename = PurePosixPath(params["filename"].replace("\\", "/")).name
        if not filename or len(filename) > _MAX_FILENAME:
            raise _invalid(f"the file name must be 1..{_MAX_FILENAME} characters")
        self.field, self.filename = params["name"], filename
        self._state = _State.BODY
        return True

    def _take_body(self, out: bytearray) -> bool:
        at = self._buffer.find(self._delimiter)
        if at < 0:
            # everything but a possible partial delimiter at the end is file data
            safe = len(self._buffer) - (len(self._delimiter) - 1)
            if safe > 0:
                out += self._buffer[:safe]
                del self._buffer[:safe]
            return False
        out += self._buffer[:at]
        del self._buffer[: at + len(self._delimiter)]
        self._state = _State.AFTER_FILE
        return True

    def _after_file(self) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] == b"--":
            self._state = _State.DONE
            self._buffer.clear()  # the epilogue is ignored, as RFC 2046 says
            return True
        raise _invalid("an upload holds exactly one file part; this body has more parts")


async def receive_file(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    destination: Path,
    max_bytes: int,
    limit_name: str,
    check_filename: Callable[[str], object] | None = None,
) -> ReceivedFile:
    """Write the file part of a multipart body to ``destination``; 413 past ``max_bytes``.

    ``limit_name`` is the setting that sets the cap (named in the 413's message);
    ``check_filename`` runs as soon as the part's headers arrive, so a file the service would
    refuse by its name is refused before its bytes are read. File writes run in a worker thread
    (anyio's async file), so the event loop never blocks on the disk.
    """
    parser = SingleFileParser(boundary_of(content_type))
    checked = check_filename is None
    digest = hashlib.sha256()
    size = 0
    async with await anyio.open_file(destination, "wb") as handle:
        async for chunk in chunks:
            data = parser.feed(chunk)
            if not checked and parser.filename is not None:
                assert check_filename is not None
                check_filename(parser.filename)
                checked = True
            if not data:
                continue
            size += len(data)
            if size > max_bytes:
                raise TooLarge(
                    f"the upload is larger than this service's limit of {max_bytes} bytes "
                    f"({limit_name})"
                )
            digest.update(data)
            await handle.write(data)
    parser.close()
    assert parser.field is not None and parser.filename is not None  # set once past HEADERS
    return ReceivedFile(
        field=parser.field, filename=parser.filename, size=size, sha256=digest.hexdigest()
    )


def _parse_disposition(value: str) -> tuple[str, dict[str, str]]:
    """``form-data; name="file"; filename="a b.zip"`` -> ("form-data", {name, filename}).

    Quoted values may contain ``;`` and backslash-escaped quotes.
    """
    kind, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i = 0
    while i < len(rest):
        while i < len(rest) and rest[i] in " ;\t":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        name = rest[i:eq].strip().lower()
        i = eq + 1
        if i < len(rest) and rest[i] == '"':
            i += 1
            chars = []
            while i < len(rest) and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < len(rest):
                    i += 1
                chars.append(rest[i])
                i += 1
            i += 1  # the closing quote
            params[name] = "".join(chars)
        else:
            end = rest.find(";", i)
            end = len(rest) if end < 0 else end
            params[name] = rest[i:end].strip()
            i = end
    return kind.strip().lower(), params


def _invalid(message: str) -> InvalidField:
    return InvalidField("file", message)
