#!/usr/bin/env bash
# Install everything the tests and benchmarks need on a fresh machine (Debian, Python 3.11).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${GENQ_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

# 1. system packages: Fashion-MNIST (the reference benchmark's real data), Redis (the
#    service's job store, started by the integration tests) and docker-compose (validates
#    docker-compose.yml offline; no engine runs here)
APT_PACKAGES=(dataset-fashion-mnist redis-server docker-compose)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# 2. the virtual environment, pinned by requirements/constraints.txt
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.genq-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/constraints.txt -nt "$stamp" ]; then
    "$VENV/bin/pip" install -q -c requirements/constraints.txt -e ".[core,generate,api,worker,embedded,dev]"
    touch "$stamp"
fi
