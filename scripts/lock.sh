#!/usr/bin/env bash
# Re-resolve every extra in a scratch venv and rewrite requirements/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
python3.11 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" -e ".[core,generate,api,worker,embedded,dev]"
{
    echo "# Pinned versions for every install (pip install -c requirements/constraints.txt ...)."
    echo "# Regenerate: scripts/lock.sh (after changing dependencies in pyproject.toml)."
    "$tmp/venv/bin/pip" freeze --exclude-editable | grep -v '^-e'
} > requirements/constraints.txt
rm -rf "$tmp"
