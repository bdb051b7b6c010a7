"""Shared fixtures of the genq_core tests: a tiny BatchNorm classifier with known statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

SHAPE = (3, 8, 8)


class TinyBNNet(nn.Module):
    """conv-bn-relu x2, pooled linear head."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture
def bn_model() -> TinyBNNet:
    """Running statistics of "real" data: per-channel offsets, std 0.5 (unlike N(0, 1) noise)."""
    torch.manual_seed(0)
    model = TinyBNNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the batches below
    gen = torch.Generator().manual_seed(1)
    offset = torch.tensor([1.0, -0.5, 0.3]).view(1, 3, 1, 1)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(0.5 * torch.randn((32, *SHAPE), generator=gen) + offset)
    return model.eval()


def assert_untouched(model: nn.Module, state: dict[str, torch.Tensor], training: bool) -> None:
    """The caller's model is as it was: weights, running statistics, mode, gradients, hooks."""
    assert model.training == training
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks for m in model.modules())
