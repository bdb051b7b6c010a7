from __future__ import annotations

from torch import nn

from genq_core.devices import is_on, on_device


def test_model_on_its_device_is_used_as_is() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert is_on(model, "cpu")
    assert on_device(model, "cpu") is model


def test_model_elsewhere_is_copied_and_the_original_stays() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    moved = on_device(model, "meta")
    assert moved is not model
    assert is_on(moved, "meta") and not is_on(moved, "cpu")
    assert is_on(model, "cpu")
    assert is_on(nn.ReLU(), "meta")  # nothing to move
