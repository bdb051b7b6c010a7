from __future__ import annotations

import hashlib
from pathlib import Path

from genq_core.bench.runinfo import cpu_name, file_sha256


def test_file_sha256_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # > 1 MiB: several chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_cpu_name_is_not_empty() -> None:
    assert cpu_name().strip()
