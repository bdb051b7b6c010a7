"""Tiny seeded models shared by the filter tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from genq_core.filters import ClipModel, load_clip


class TinyBNNet(nn.Module):
    """conv-BN-ReLU, strided conv-BN-ReLU, pool, linear-BN1d-ReLU, linear: BN on 4-D and 2-D."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def in_distribution(n: int, seed: int) -> torch.Tensor:
    """``[n, 3, 16, 16]`` images from the distribution the BN statistics were measured on."""
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.1


@pytest.fixture
def bn_net() -> nn.Module:
    """A :class:`TinyBNNet` whose running statistics are the exact averages over 256 images."""
    torch.manual_seed(0)
    model = TinyBNNet()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in in_distribution(256, seed=100).split(64):
            model(batch)
    return model.eval()


@pytest.fixture
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=3,
    )
    return model.eval()


@pytest.fixture
def plain_mlp() -> nn.Module:
    """Neither BatchNorm nor transformer blocks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16), nn.ReLU(), nn.Linear(16, 3))


TINY_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    },
    "preprocess_cfg": {},
}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``local-dir:`` open_clip folder: a tiny config, no weights (random initialisation)."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir: Path) -> ClipModel:
    """The tiny random CLIP model, built once (importing open_clip takes seconds)."""
    torch.manual_seed(0)
    return load_clip(f"local-dir:{tiny_clip_dir}")
