"""deploy/*.Dockerfile and .dockerignore, checked statically (no engine runs here): pinned bases,
non-root users, the API image without torch or Ray, caches as volumes, a small build context."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO_ROOT / "deploy").glob("*.Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["api.Dockerfile", "worker.Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned_and_the_user_is_not_root(path: Path):
    steps = instructions(path)
    for keyword, args in steps:
        if keyword == "FROM" or (keyword == "COPY" and "--from=" in args):
            image = args.split("--from=")[-1].split()[0] if keyword == "COPY" else args.split()[0]
            name, _, tag = image.rpartition(":")
            assert name and re.search(r"\d", tag) and tag != "latest", f"{path.name}: {image}"
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), path.name
    assert any("useradd" in args for keyword, args in steps if keyword == "RUN")


def test_the_api_image_installs_the_api_extra_only_and_it_has_no_torch_or_ray():
    runs = " ".join(args for keyword, args in instructions(REPO_ROOT / "deploy/api.Dockerfile"))
    assert '".[api]"' in runs and "worker" not in runs and "torch" not in runs
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert not [dep for dep in extras["api"] if re.match(r"(torch|ray|genq\[)", dep)]


def test_the_worker_image_has_cuda_torch_and_caches_as_a_volume():
    steps = instructions(REPO_ROOT / "deploy/worker.Dockerfile")
    base = next(args for keyword, args in steps if keyword == "FROM")
    assert base.startswith("nvidia/cuda:") and "cudnn" in base
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert '".[worker]"' in runs and "download.pytorch.org/whl/cu" in runs
    assert "-c requirements/constraints.txt" in runs
    env = " ".join(args for keyword, args in steps if keyword == "ENV")
    assert "HF_HOME=/cache/" in env and "TORCH_HOME=/cache/" in env
    assert 'VOLUME ["/cache"]' in (REPO_ROOT / "deploy/worker.Dockerfile").read_text()


def test_the_build_context_leaves_out_what_the_images_do_not_need():
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "tests", ".env"):
        assert entry in ignored
    copied = {
        args.split()[0]
        for path in DOCKERFILES
        for keyword, args in instructions(path)
        if keyword == "COPY" and "--from=" not in args
    }
    for source in copied:  # nothing the images copy is ignored
        assert source not in ignored and (REPO_ROOT / source).exists(), source
