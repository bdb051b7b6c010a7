"""Tests for genq_core.bench.classifiers (SmallResNet, training, evaluation)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from genq_core.bench.classifiers import (
    BasicBlock,
    SmallResNet,
    TrainConfig,
    evaluate_top1,
    train_classifier,
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: tiny convs are much faster so on an oversubscribed CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_small_resnet_forward_shape_and_size() -> None:
    model = SmallResNet().eval()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 308_074  # ~1.2 MB of fp32 weights
    assert n_params * 4 < 1_300_000
    assert isinstance(model.layers, torch.nn.Sequential)
    assert len(model.layers) == 3
    assert isinstance(model.fc, torch.nn.Linear)
    assert model.fc.in_features == 128


def test_small_resnet_custom_shape() -> None:
    model = SmallResNet(num_classes=4, in_chans=3, widths=(8, 16, 24)).eval()
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 4)


def test_basic_block_shortcut() -> None:
    same = BasicBlock(8, 8, stride=1)
    assert isinstance(same.shortcut, torch.nn.Identity)
    down = BasicBlock(8, 16, stride=2).eval()
    assert not isinstance(down.shortcut, torch.nn.Identity)
    assert down(torch.randn(1, 8, 28, 28)).shape == (1, 16, 14, 14)


@pytest.mark.usefixtures("one_thread")
def test_train_classifier_learns_and_is_deterministic() -> None:
    images, labels = _two_patterns(n=128)
    config = TrainConfig(epochs=1, batch_size=16, lr=0.1, seed=0)
    progress: list[tuple[int, int]] = []

    def run(record: bool) -> torch.nn.Module:
        torch.manual_seed(123)
        model = SmallResNet(num_classes=2, widths=(8, 8, 8))
        callback = (lambda s, t: progress.append((s, t))) if record else None
        return train_classifier(model, images, labels, config, on_progress=callback)

    first = run(record=True)
    assert not first.training
    assert evaluate_top1(first, images, labels) > 90.0
    held_out_images, held_out_labels = _two_patterns(n=64, seed=1)
    assert evaluate_top1(first, held_out_images, held_out_labels) > 90.0
    assert progress[-1] == (8, 8)
    assert len(progress) == 8

    second = run(record=False)
    state_a, state_b = first.state_dict(), second.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_evaluate_top1_restores_mode_and_counts() -> None:
    model = _ConstantModel(cls=1)
    model.train()
    labels = torch.tensor([1, 1, 0, 1])
    assert evaluate_top1(model, torch.zeros(4, 1, 2, 2), labels, batch_size=3) == 75.0
    assert model.training


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("crop_padding", -1),
        ("label_smoothing", 1.0),
        ("log_every", 0),
    ],
)
def test_train_config_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_classifier_rejects_bad_inputs() -> None:
    model = SmallResNet(widths=(4, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        train_classifier(model, torch.zeros(4, 28, 28), torch.zeros(4), TrainConfig())
    with pytest.raises(ValueError, match="labels"):
        train_classifier(model, torch.zeros(4, 1, 28, 28), torch.zeros(3), TrainConfig())


class _ConstantModel(torch.nn.Module):
    """Always predicts class ``cls`` out of 2, for float [N, ...] input."""

    def __init__(self, cls: int) -> None:
        super().__init__()
        self.cls = cls
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 2)
        logits[:, self.cls] = 1.0
        return logits


def _two_patterns(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images [n, 1, 28, 28] of two textures: horizontal vs vertical stripes.

    Texture survives global average pooling, the 2px crop and the horizontal flip.
    Labels int64 [n] alternate 0, 1, 0, ...
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    stripes = (torch.arange(28) // 2 % 2).to(torch.float32) * 2.0 - 1.0  # [28] of +-1
    horizontal = stripes.view(28, 1).expand(28, 28)
    vertical = stripes.view(1, 28).expand(28, 28)
    images = 0.5 * torch.randn(n, 1, 28, 28, generator=gen)
    images[labels == 0, 0] += horizontal
    images[labels == 1, 0] += vertical
    return images, labels
