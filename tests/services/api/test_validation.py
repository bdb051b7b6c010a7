"""Upload validation on files built in memory: what passes, and that each refusal names its cause."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from services.api.errors import InvalidUpload
from services.api.uploads import UploadKind, upload_format
from services.api.validation import ArchiveLimits, validate_upload
from tests.support.upload_files import png_bytes, pt2_bytes, safetensors_bytes, tar_bytes, zip_bytes

LIMITS = ArchiveLimits(
    max_files=10, max_total_bytes=10**6, max_member_bytes=10**5, max_image_pixels=10**4
)
PNG = png_bytes()


def check(tmp_path: Path, data: bytes, kind: UploadKind, fmt: str, limits: ArchiveLimits = LIMITS):
    path = tmp_path / "upload"
    path.write_bytes(data)
    return validate_upload(path, kind, fmt, limits)


def refused(tmp_path: Path, data: bytes, kind: UploadKind, fmt: str, **limits: int) -> str:
    custom = ArchiveLimits(**{**LIMITS.__dict__, **limits})
    with pytest.raises(InvalidUpload) as info:
        check(tmp_path, data, kind, fmt, custom)
    return info.value.message


def safetensors_with_header(header: dict[str, object], data_size: int) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(data_size)


@pytest.mark.parametrize(
    ("header", "data_size", "message"),
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, "needs 8 bytes"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, 2, "unsupported dtype 'Q4'"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, 0, "non-negative"),
        (
            {
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
            },
            6,
            "tensor 'b': data_offsets overlaps",
        ),
        ({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, 9, "trailing bytes"),
        ({"__metadata__": {"a": "b"}}, 0, "holds no tensors"),
        ({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, 1, "exactly dtype"),
    ],
)
def test_broken_safetensors_name_the_tensor_or_the_problem(
    tmp_path: Path, header: dict[str, object], data_size: int, message: str
):
    data = safetensors_with_header(header, data_size)
    assert message in refused(tmp_path, data, UploadKind.MODEL, "safetensors")


def test_valid_models_report_what_they_hold(tmp_path: Path):
    weights = check(
        tmp_path,
        safetensors_bytes({"w": ("F16", [3, 3]), "step": ("I64", [])}),
        UploadKind.MODEL,
        "safetensors",
    )
    exported = check(tmp_path, pt2_bytes("net"), UploadKind.MODEL, "pt2")

    assert weights == {
        "format": "safetensors",
        "tensors": 2,
        "parameters": 10,
        "dtypes": {"F16": 1, "I64": 1},
        "metadata": {},
    }
    assert exported["archive"] == "net" and exported["models"] == ["model"]


def test_pt2_layout_is_checked(tmp_path: Path):
    no_marker = zip_bytes({"m/models/model.json": b"{}"})
    two_roots = zip_bytes({"a/archive_format": b"pt2", "b/models/model.json": b"{}"})
    bad_json = zip_bytes({"m/archive_format": b"pt2", "m/models/model.json": b"{nope"})

    assert "no 'm/archive_format' member" in refused(tmp_path, no_marker, UploadKind.MODEL, "pt2")
    assert "one top folder" in refused(tmp_path, two_roots, UploadKind.MODEL, "pt2")
    assert "'m/models/model.json' is not valid JSON" in refused(
        tmp_path, bad_json, UploadKind.MODEL, "pt2"
    )
    assert "not a zip file" in refused(tmp_path, b"plain", UploadKind.MODEL, "pt2")


def test_archive_caps_and_links_are_refused(tmp_path: Path):
    many = zip_bytes({f"{i}.png": PNG for i in range(11)})
    big = zip_bytes({"big.png": bytes(2000)})
    large_image = io.BytesIO()
    Image.new("RGB", (200, 200)).save(large_image, format="PNG")
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w") as archive:
        info = tarfile.TarInfo("cat/evil.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    zip_link = io.BytesIO()
    with zipfile.ZipFile(zip_link, "w") as archive:
        info_zip = zipfile.ZipInfo("evil.png")
        info_zip.external_attr = 0o120777 << 16
        archive.writestr(info_zip, "/etc/passwd")

    calibration = UploadKind.CALIBRATION
    assert "more than 10" in refused(tmp_path, many, calibration, "zip")
    assert "member 'big.png' is 2000 bytes" in refused(
        tmp_path, big, calibration, "zip", max_member_bytes=1000
    )
    assert "unpacks to more than 1500 bytes" in refused(
        tmp_path,
        zip_bytes({"a.png": bytes(1000), "b.png": bytes(1000)}),
        calibration,
        "zip",
        max_total_bytes=1500,
    )
    assert "200x200 pixels" in refused(
        tmp_path, zip_bytes({"a.png": large_image.getvalue()}), calibration, "zip"
    )
    assert "member 'cat/evil.png' is a link" in refused(
        tmp_path, link.getvalue(), UploadKind.KSHOT, "tar"
    )
    assert "member 'evil.png' is a symbolic link" in refused(
        tmp_path, zip_link.getvalue(), calibration, "zip"
    )


def test_non_image_formats_are_not_decoded(tmp_path: Path):
    # An EPS file would be rendered by Ghostscript if Pillow were allowed to open it.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    message = refused(tmp_path, zip_bytes({"x.png": eps}), UploadKind.CALIBRATION, "zip")
    assert "member 'x.png' is not a decodable image" in message


def test_class_folders_lie_at_the_root(tmp_path: Path):
    nested = tar_bytes({"set/cat/1.png": PNG, "set/dog/1.png": PNG})
    mixed = zip_bytes({"cat/1.png": PNG, "2.png": PNG})
    detail = check(
        tmp_path, tar_bytes({"cat/1.png": PNG, "dog/1.png": PNG}), UploadKind.EVAL, "tar"
    )
    flat = check(tmp_path, zip_bytes({"1.png": PNG}), UploadKind.CALIBRATION, "zip")

    assert "member 'set/cat/1.png' is nested too deep" in refused(
        tmp_path, nested, UploadKind.KSHOT, "tar"
    )
    assert "mix a flat layout with class folders" in refused(
        tmp_path, mixed, UploadKind.CALIBRATION, "zip"
    )
    assert detail["classes"] == {"cat": 1, "dog": 1}
    assert "classes" not in flat
    assert "holds no images" in refused(
        tmp_path, zip_bytes({".DS_Store": b"x"}), UploadKind.CALIBRATION, "zip"
    )


@pytest.mark.parametrize(
    ("kind", "filename", "fmt"),
    [
        (UploadKind.MODEL, "Net.SafeTensors", "safetensors"),
        (UploadKind.MODEL, "net.pt", None),
        (UploadKind.MODEL, ".pt2", None),
        (UploadKind.KSHOT, "k.tar.gz", "tar.gz"),
        (UploadKind.KSHOT, "k.tgz", "tar.gz"),
        (UploadKind.EVAL, "e.safetensors", None),
    ],
)
def test_upload_format_comes_from_the_name(kind: UploadKind, filename: str, fmt: str | None):
    assert upload_format(kind, filename) == fmt
