"""The API image has neither torch nor Ray: importing the whole API must not pull them in."""

from __future__ import annotations

from tests.support.imports import loaded_modules


def test_the_api_imports_neither_torch_nor_ray():
    statements = (
        "import services.api.app, services.api.validation, services.api.multipart\n"
        "services.api.app.create_app\n"
    )
    heavy = ("torch", "ray", "torchvision", "timm", "diffusers")
    assert loaded_modules(statements, heavy) == set()
