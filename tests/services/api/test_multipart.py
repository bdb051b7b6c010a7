"""The streaming multipart parser on bodies split at every possible place."""

from __future__ import annotations

import pytest

from services.api.errors import InvalidField, UnsupportedMediaType
from services.api.multipart import SingleFileParser, boundary_of

BOUNDARY = b"XyZ123"
CONTENT = b"line one\r\n--XyZ12 almost a boundary\r\n\r\n" + bytes(range(256))


def body(*parts: bytes, preamble: bytes = b"") -> bytes:
    out = preamble
    for part in parts:
        out += b"--" + BOUNDARY + b"\r\n" + part + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


FILE_PART = (
    b'Content-Disposition: form-data; name="file"; filename="C:\\\\dir\\\\m; \\"x\\".zip"\r\n'
    b"Content-Type: application/zip\r\n\r\n" + CONTENT
)


def parse(data: bytes, chunk: int) -> tuple[bytes, SingleFileParser]:
    parser = SingleFileParser(BOUNDARY)
    out = b"".join(parser.feed(data[i : i + chunk]) for i in range(0, len(data), chunk))
    parser.close()
    return out, parser


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
def test_the_file_comes_out_whole_however_the_body_is_split(chunk: int):
    out, parser = parse(body(FILE_PART, preamble=b"ignored preamble\r\n"), chunk)

    assert out == CONTENT
    assert parser.field == "file"
    assert parser.filename == 'm; "x".zip'  # the base name of a Windows path, quotes unescaped


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (body(FILE_PART, FILE_PART), "exactly one file part"),
        (body(b'Content-Disposition: form-data; name="note"\r\n\r\nhi'), "'note' is not a file"),
        (body(FILE_PART)[:-30], "ended early"),
        (b"--" + BOUNDARY + b"--\r\n", "has no parts"),
        (b"no boundary at all", "holds no multipart part"),
    ],
)
def test_malformed_bodies_are_refused(data: bytes, message: str):
    with pytest.raises(InvalidField, match=message) as info:
        parse(data, 5)
    assert info.value.field == "file"


def test_the_boundary_comes_from_the_content_type():
    assert boundary_of('multipart/form-data; charset=utf-8; boundary="a b"') == b"a b"
    with pytest.raises(UnsupportedMediaType, match="application/json"):
        boundary_of("application/json")
    with pytest.raises(UnsupportedMediaType, match="boundary"):
        boundary_of("multipart/form-data")
