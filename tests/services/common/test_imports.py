"""The API imports the job store and queue, and its image has neither torch nor Ray."""

from __future__ import annotations

from tests.support.imports import loaded_modules


def test_store_and_queue_import_neither_torch_nor_ray():
    statements = "import services.common.jobs, services.common.jobstore, services.common.queue"
    assert loaded_modules(statements, ("torch", "ray", "genq_core")) == set()
