"""The API imports the job store and queue, and its image has neither torch nor Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_store_and_queue_import_neither_torch_nor_ray():
    code = (
        "import json, sys\n"
        "import services.common.jobs, services.common.jobstore, services.common.queue\n"
        "heavy = ('torch', 'ray', 'genq_core')\n"
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
