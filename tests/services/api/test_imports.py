"""The API image has neither torch nor Ray: importing the whole API must not pull them in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_the_api_imports_neither_torch_nor_ray():
    code = (
        "import json, sys\n"
        "import services.api.app, services.api.validation, services.api.multipart\n"
        "services.api.app.create_app\n"
        "heavy = ('torch', 'ray', 'torchvision', 'timm', 'diffusers')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout) == []
