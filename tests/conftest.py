"""Shared test options: ``--runslow`` enables tests marked ``slow``."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without the interpreter's finalisation once Ray was used in this process.

    After the Ray tests' ``ray.shutdown()``, Ray's core-worker threads crash the interpreter's
    shutdown with a segmentation fault (every test passed; reproduced with
    ``pytest tests/services/workers/test_actors.py tests/services/workers/test_multinode.py``),
    which would turn a passing run into exit code 139. This hook runs after pytest has reported
    everything, so it only skips the crash and keeps pytest's own exit status.
    """
    if "ray" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash.get(_EXIT_STATUS, 0))
