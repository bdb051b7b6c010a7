"""What an import pulls in, seen from a fresh interpreter (this one has imported everything)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

__all__ = ["loaded_modules"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def loaded_modules(statements: str, packages: Collection[str], timeout_s: float = 60.0) -> set[str]:
    """Run ``statements`` in a new Python process at the repository root; return the modules of
    ``packages`` (top-level names, e.g. ``("torch", "ray")``) that are loaded afterwards.

    Raises:
        subprocess.CalledProcessError: the statements failed (its ``stderr`` says why).
    """
    report = (
        "\nimport json as _json, sys as _sys\n"
        f"_packages = {sorted(packages)!r}\n"
        "print(_json.dumps(sorted(m for m in _sys.modules if m.split('.')[0] in _packages)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", statements + report],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))
