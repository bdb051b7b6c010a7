"""Small, valid (or deliberately broken) files of every upload kind, built in memory without torch.

- :func:`safetensors_bytes`: a safetensors file with zero-filled tensors.
- :func:`pt2_bytes`: a zip with the layout of ``torch.export.save`` (``archive_format`` = ``pt2``,
  ``models/model.json``, weights under ``data/weights/``).
- :func:`png_bytes`: a tiny PNG; :func:`zip_bytes` / :func:`tar_bytes`: archives of named members.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import zipfile
from collections.abc import Mapping

from PIL import Image

__all__ = ["pt2_bytes", "png_bytes", "safetensors_bytes", "tar_bytes", "zip_bytes"]

_DTYPE_BYTES = {"F32": 4, "F16": 2, "I64": 8, "U8": 1}


def safetensors_bytes(
    tensors: Mapping[str, tuple[str, list[int]]] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """``{name: (dtype, shape)}`` as a safetensors file (data all zeros, tensors in name order)."""
    tensors = tensors or {"conv.weight": ("F32", [4, 3, 3, 3]), "fc.bias": ("F32", [10])}
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape) in sorted(tensors.items()):
        size = math.prod(shape) * _DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    return len(raw).to_bytes(8, "little") + raw + bytes(offset)


def pt2_bytes(root: str = "model") -> bytes:
    """A zip laid out like ``torch.export.save``'s output (its content is not a real program)."""
    return zip_bytes(
        {
            f"{root}/archive_format": b"pt2",
            f"{root}/archive_version": b"0",
            f"{root}/byteorder": b"little",
            f"{root}/models/model.json": json.dumps({"graph_module": {}}).encode(),
            f"{root}/data/weights/weight_0": bytes(24),
            f"{root}/data/weights/model_weights_config.json": b"{}",
        }
    )


def png_bytes(size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(members: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: Mapping[str, bytes], gzip: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
