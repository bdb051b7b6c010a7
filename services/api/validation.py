"""Checks an uploaded file passes before any job may use it; nothing here runs code from the file.

- Models: a safetensors file (its header parsed in pure Python: 8-byte little-endian header length,
  a JSON header, tensors whose dtypes, shapes and byte ranges tile the data exactly) or a
  ``torch.export`` archive (``.pt2``: a zip whose one top folder holds ``archive_format`` = ``pt2``
  and ``models/*.json``). Nothing is unpickled, ever: a pickled checkpoint is refused with a message
  that says why.
- Image sets (calibration, k-shot, evaluation): a ``.zip`` or ``.tar(.gz)`` of images; k-shot and
  evaluation sets hold one folder per class at the archive's root (``cat/1.png``), calibration
  sets that or flat images (``1.png``). Every member must have a safe relative path, fit the
  size caps, and decode with Pillow. OS litter (``__MACOSX/``, dot files, ``Thumbs.db``) is skipped
  and counted.

Every failure raises :class:`~services.api.errors.InvalidUpload` whose message names the member or
tensor at fault. Each check returns a JSON-ready ``detail`` for the upload record.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from PIL import Image

from services.api.errors import InvalidUpload
from services.api.uploads import UploadKind

__all__ = ["ArchiveLimits", "IMAGE_SUFFIXES", "validate_upload"]

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
)
_PIL_FORMATS_LIST = ["PNG", "JPEG", "MPO", "BMP", "WEBP", "GIF", "TIFF", "PPM"]

# safetensors dtypes a classifier's weights may use, with their sizes in bytes.
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own cap
_MAX_PT2_JSON = 64 * 1024 * 1024
_LITTER_NAMES = frozenset({"Thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on an archive's content (settings ``GENQ_MAX_ARCHIVE_FILES`` etc.)."""

    max_files: int
    max_total_bytes: int
    max_member_bytes: int
    max_image_pixels: int


def validate_upload(
    path: Path, kind: UploadKind, fmt: str, limits: ArchiveLimits
) -> dict[str, Any]:
    """Check the file at ``path`` as a ``kind`` upload in format ``fmt``; its ``detail`` on success.

    Raises:
        InvalidUpload: naming what is wrong (the member, the tensor, the layout).
    """
    if kind is UploadKind.MODEL:
        if fmt == "safetensors":
            return check_safetensors(path)
        if fmt == "pt2":
            return check_pt2(path, limits)
        raise ValueError(f"not a model format: {fmt!r}")
    by_class = kind in (UploadKind.KSHOT, UploadKind.EVAL)
    return check_image_archive(path, fmt, limits, by_class=by_class, what=kind.value)


# ---- models -------------------------------------------------------------------------------------


def check_safetensors(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check that the tensors tile the data section exactly.

    Layout: ``u64 little-endian N``, ``N`` bytes of JSON ``{name: {dtype, shape, data_offsets}}``
    (plus an optional ``__metadata__`` of strings), then the data; offsets are relative to the data.
    """
    # 1. the header length and the header
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InvalidUpload(f"not a safetensors file: only {size} bytes")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise InvalidUpload(_not_safetensors_message(prefix, header_len, size))
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as err:
        raise InvalidUpload(
            f"not a safetensors file: its header is not valid JSON ({err})"
        ) from None
    if not isinstance(header, dict):
        raise InvalidUpload("not a safetensors file: its header is not a JSON object")

    # 2. metadata: strings only
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidUpload("safetensors __metadata__ must map strings to strings")
    if not header:
        raise InvalidUpload("the safetensors file holds no tensors")

    # 3. every tensor: a known dtype, a sane shape, a byte range of the right length
    ranges: list[tuple[int, int, str]] = []
    dtypes: Counter[str] = Counter()
    parameters = 0
    for name, info in header.items():
        begin, end, count = _check_tensor(name, info)
        ranges.append((begin, end, name))
        dtypes[info["dtype"]] += 1
        parameters += count

    # 4. the ranges tile the data section: sorted, contiguous from 0, ending at the file's end
    data_size = size - 8 - header_len
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            problem = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise InvalidUpload(f"safetensors tensor {name!r}: data_offsets {problem}")
        position = end
    if position != data_size:
        raise InvalidUpload(
            f"safetensors data is {data_size} bytes but its tensors cover {position}: the file is "
            "truncated or has trailing bytes"
        )
    return {
        "format": "safetensors",
        "tensors": len(header),
        "parameters": parameters,
        "dtypes": dict(sorted(dtypes.items())),
        "metadata": metadata,
    }


def check_pt2(path: Path, limits: ArchiveLimits) -> dict[str, Any]:
    """Check a ``torch.export.save`` archive's layout without loading anything from it."""
    # 1. a zip, safe member names, within the caps, CRCs intact
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            start = handle.read(2)
        hint = " (it looks like a Python pickle)" if _looks_like_pickle(start) else ""
        raise InvalidUpload(f"not a torch.export .pt2 archive: not a zip file{hint}")
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        _check_zip_entries(infos, limits)
        names = [info.filename for info in infos if not info.is_dir()]
        # 2. one top folder, holding the archive's format marker and its model descriptions
        roots = {name.split("/", 1)[0] for name in names}
        if len(roots) != 1 or any("/" not in name for name in names):
            raise InvalidUpload(
                "not a torch.export .pt2 archive: its members must lie in one top folder"
            )
        root = roots.pop()
        pickled = next((n for n in names if n == f"{root}/data.pkl"), None)
        if pickled:
            raise InvalidUpload(
                f"member {pickled!r}: this is a torch.save checkpoint (a pickle), not a "
                "torch.export archive; pickles are refused because loading one runs code "
                "(save the model with torch.export.save, or its weights with safetensors)"
            )
        marker = f"{root}/archive_format"
        if marker not in names:
            raise InvalidUpload(f"not a torch.export .pt2 archive: no {marker!r} member")
        if archive.read(marker).strip() != b"pt2":
            raise InvalidUpload(f"member {marker!r} does not say 'pt2'")
        models = [n for n in names if n.startswith(f"{root}/models/") and n.endswith(".json")]
        if not models:
            raise InvalidUpload(f"not a torch.export .pt2 archive: no {root}/models/*.json member")
        for name in models:
            _check_json_member(archive, name)
        byteorder = f"{root}/byteorder"
        if byteorder in names and archive.read(byteorder).strip() not in (b"little", b"big"):
            raise InvalidUpload(f"member {byteorder!r} must say 'little' or 'big'")
        bad = archive.testzip()
        if bad is not None:
            raise InvalidUpload(f"member {bad!r} is corrupt (CRC mismatch)")
    weights = [n for n in names if n.startswith(f"{root}/data/weights/")]
    return {
        "format": "pt2",
        "archive": root,
        "models": sorted(PurePosixPath(n).stem for n in models),
        "members": len(names),
        "weight_files": len(weights),
    }


# ---- image archives -----------------------------------------------------------------------------


def check_image_archive(
    path: Path, fmt: str, limits: ArchiveLimits, *, by_class: bool, what: str
) -> dict[str, Any]:
    """Decode every image of a zip or tar archive and check its layout: ``class/image`` at the
    root (required with ``by_class``) or, for calibration sets, flat images at the root."""
    images: list[PurePosixPath] = []
    formats: Counter[str] = Counter()
    skipped = 0
    for name, data in _archive_members(path, fmt, limits):
        member = PurePosixPath(name)
        if _is_litter(member):
            skipped += 1
            continue
        if member.suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidUpload(
                f"member {name!r} is not an image (allowed: {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        formats[_check_image(name, data(), limits.max_image_pixels)] += 1
        images.append(member)
    if not images:
        raise InvalidUpload(f"the {what} archive holds no images")
    detail: dict[str, Any] = {
        "format": fmt,
        "images": len(images),
        "image_formats": dict(sorted(formats.items())),
        "skipped": skipped,
    }
    classes = _layout(images, what, by_class)
    if classes is not None:
        detail["classes"] = classes
    return detail


def _archive_members(path: Path, fmt: str, limits: ArchiveLimits) -> Iterator[tuple[str, Any]]:
    """``(name, read)`` for every regular file of the archive, after checking names and caps;
    ``read()`` returns the member's bytes (at most ``max_member_bytes``)."""
    if fmt == "zip":
        if not zipfile.is_zipfile(path):
            raise InvalidUpload("not a zip archive")
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            _check_zip_entries(infos, limits)
            for zip_info in infos:
                if not zip_info.is_dir():
                    yield zip_info.filename, _zip_reader(archive, zip_info, limits.max_member_bytes)
        return
    with _open_tar(path, fmt) as archive:
        count, total = 0, 0
        try:
            for info in archive:  # streams: one header at a time, so the count cap bites early
                count += 1
                if count > limits.max_files:
                    raise InvalidUpload(f"the archive has more than {limits.max_files} entries")
                _check_member_name(info.name)
                if info.isdir():
                    continue
                if not info.isfile():
                    raise InvalidUpload(
                        f"member {info.name!r} is a link or special file; archives may hold "
                        "only folders and image files"
                    )
                total += info.size
                _check_sizes(info.name, info.size, total, limits)
                yield info.name, _tar_reader(archive, info)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise InvalidUpload(
                f"the {fmt} archive is corrupt after {count} entries ({err})"
            ) from None


def _open_tar(path: Path, fmt: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:gz" if fmt == "tar.gz" else "r:")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise InvalidUpload(f"not a {fmt} archive ({err})") from None


def _check_zip_entries(infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
    if len(infos) > limits.max_files:
        raise InvalidUpload(f"the archive has {len(infos)} entries, more than {limits.max_files}")
    total = 0
    for info in infos:
        _check_member_name(info.filename)
        if info.flag_bits & 0x1:
            raise InvalidUpload(f"member {info.filename!r} is encrypted")
        # a symlink stored by Info-ZIP: Unix mode S_IFLNK in the high bits of external_attr
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise InvalidUpload(
                f"member {info.filename!r} is a symbolic link; archives may hold only folders "
                "and files"
            )
        total += info.file_size
        _check_sizes(info.filename, info.file_size, total, limits)


def _zip_reader(archive: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> Any:
    def read() -> bytes:
        try:
            with archive.open(info) as handle:
                data = handle.read(cap + 1)  # a lying file_size can't make us read more
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise InvalidUpload(f"member {info.filename!r} is corrupt ({err})") from None
        if len(data) > cap:
            raise InvalidUpload(f"member {info.filename!r} is larger than {cap} bytes")
        return data

    return read


def _tar_reader(archive: tarfile.TarFile, info: tarfile.TarInfo) -> Any:
    def read() -> bytes:
        handle: IO[bytes] | None = archive.extractfile(info)
        if handle is None:
            raise InvalidUpload(f"member {info.name!r} cannot be read")
        data = handle.read(info.size)
        if len(data) != info.size:
            raise InvalidUpload(f"member {info.name!r} is truncated")
        return data

    return read


def _check_member_name(name: str) -> None:
    """Refuse names that could land outside a folder they are extracted to."""
    parts = name.rstrip("/").split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or (len(parts[0]) >= 2 and parts[0][1] == ":")  # a Windows drive, C:
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise InvalidUpload(
            f"member {name!r} has an unsafe path (absolute, '..', '.', empty parts or backslashes)"
        )


def _check_sizes(name: str, size: int, total: int, limits: ArchiveLimits) -> None:
    if size > limits.max_member_bytes:
        raise InvalidUpload(
            f"member {name!r} is {size} bytes, more than the limit of {limits.max_member_bytes}"
        )
    if total > limits.max_total_bytes:
        raise InvalidUpload(
            f"the archive unpacks to more than {limits.max_total_bytes} bytes (at member {name!r})"
        )


def _check_image(name: str, data: bytes, max_pixels: int) -> str:
    """Decode one image fully; its Pillow format name. Size is checked before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Only these decoders: others may shell out (EPS runs Ghostscript) or be exotic.
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS_LIST) as image:
                fmt = image.format or "?"
                width, height = image.size
                if width * height > max_pixels:
                    raise InvalidUpload(
                        f"member {name!r} is {width}x{height} pixels, more than the limit of "
                        f"{max_pixels}"
                    )
                image.verify()  # structure and checksums
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS_LIST) as image:
                image.load()  # every pixel: verify() alone passes e.g. truncated JPEGs
    except InvalidUpload:
        raise
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise InvalidUpload(f"member {name!r} is not a decodable image ({err})") from None
    return fmt


def _layout(images: list[PurePosixPath], what: str, by_class: bool) -> dict[str, int] | None:
    """``{class: image count}`` for ``class/image`` archives, ``None`` for flat ones.

    Workers read a class from the folder an image lies in at the archive's root, so that is the
    one layout with classes; k-shot and evaluation sets need it, a calibration set may instead be
    flat. Either way every image sits at the same depth, so no image's class is ambiguous.
    """
    for image in images:
        if len(image.parts) > 2:
            raise InvalidUpload(
                f"member {str(image)!r} is nested too deep: {what} archives hold "
                + ("class folders of images" if by_class else "images, or class folders of images")
                + " at their root"
            )
        if by_class and len(image.parts) < 2:
            raise InvalidUpload(
                f"member {str(image)!r} is not inside a class folder ({what} archives need one "
                "folder per class at their root)"
            )
    first = images[0]
    mixed = next((image for image in images if len(image.parts) != len(first.parts)), None)
    if mixed is not None:
        raise InvalidUpload(
            f"member {str(mixed)!r} and member {str(first)!r} mix a flat layout with class "
            f"folders; a {what} archive holds one or the other"
        )
    if len(first.parts) == 1:
        return None
    return dict(sorted(Counter(image.parent.name for image in images).items()))


def _is_litter(member: PurePosixPath) -> bool:
    """Files that archivers of macOS and Windows add on their own; not the user's data."""
    return (
        member.name in _LITTER_NAMES
        or any(part.startswith(".") for part in member.parts)
        or member.parts[0] == "__MACOSX"
    )


# ---- helpers ------------------------------------------------------------------------------------


def _check_tensor(name: str, info: Any) -> tuple[int, int, int]:
    """``(begin, end, element count)`` of one safetensors header entry, checked."""
    where = f"safetensors tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise InvalidUpload(f"{where}: needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPE_BYTES:
        raise InvalidUpload(f"{where}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise InvalidUpload(f"{where}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(offset) for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InvalidUpload(f"{where}: data_offsets must be [begin, end] with begin <= end")
    count = math.prod(shape)
    if offsets[1] - offsets[0] != count * _DTYPE_BYTES[dtype]:
        raise InvalidUpload(
            f"{where}: {dtype} {shape} needs {count * _DTYPE_BYTES[dtype]} bytes, data_offsets "
            f"give {offsets[1] - offsets[0]}"
        )
    return offsets[0], offsets[1], count


def _check_json_member(archive: zipfile.ZipFile, name: str) -> None:
    if archive.getinfo(name).file_size > _MAX_PT2_JSON:
        raise InvalidUpload(f"member {name!r} is too large for a model description")
    try:
        parsed = json.loads(archive.read(name))
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile) as err:
        raise InvalidUpload(f"member {name!r} is not valid JSON ({err})") from None
    if not isinstance(parsed, dict):
        raise InvalidUpload(f"member {name!r} is not a JSON object")


def _not_safetensors_message(prefix: bytes, header_len: int, size: int) -> str:
    if _looks_like_pickle(prefix):
        return (
            "not a safetensors file: it looks like a Python pickle (torch.save); pickles are "
            "refused because loading one runs code: save the weights with "
            "safetensors.torch.save_file"
        )
    if prefix.startswith(b"PK\x03\x04"):
        return (
            "not a safetensors file: it is a zip archive (a torch.save checkpoint or a .pt2?); "
            "send weights as safetensors or a torch.export archive as .pt2"
        )
    return f"not a safetensors file: header length {header_len} does not fit in {size} bytes"


def _looks_like_pickle(start: bytes) -> bool:
    # pickle protocol 2+ starts with PROTO (0x80) and the protocol number
    return len(start) >= 2 and start[0] == 0x80 and 2 <= start[1] <= 5


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result
