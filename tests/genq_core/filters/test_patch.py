from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genq_core.filters import is_vit_like, patch_similarity_entropy
from genq_core.filters.patch import _similarity_entropy


def test_diverse_input_ranks_above_a_constant_one(tiny_vit: nn.Module) -> None:
    diverse = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    constant = torch.full((2, 3, 32, 32), 0.5)
    scores = patch_similarity_entropy(tiny_vit, torch.cat([diverse, constant]))
    assert scores.shape == (4,)
    assert float(scores[:2].min()) > float(scores[2:].max()) + 1.0


def test_identical_tokens_give_the_half_normal_entropy() -> None:
    # every similarity is 1: the KDE is a Gaussian at the edge of [-1, 1], cut to a half-normal
    tokens = torch.ones(1, 5, 4)
    h = 0.05
    entropy = float(_similarity_entropy(tokens, bandwidth=h, grid_size=801)[0])
    assert entropy == pytest.approx(0.5 * math.log(math.pi * math.e * h * h / 2), abs=0.02)


def test_spread_similarities_have_higher_entropy() -> None:
    generator = torch.Generator().manual_seed(1)
    spread = torch.randn(1, 16, 3, generator=generator)  # low dimension: cosines cover [-1, 1]
    narrow = torch.ones(1, 16, 3) + 0.01 * torch.randn(1, 16, 3, generator=generator)
    both = _similarity_entropy(torch.cat([spread, narrow]), bandwidth=0.05, grid_size=201)
    assert float(both[0]) > float(both[1]) + 1.0
    assert float(both[0]) <= math.log(2.0) + 1e-6  # the uniform density on [-1, 1] is the maximum


def test_batches_and_indices(tiny_vit: nn.Module) -> None:
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    whole = patch_similarity_entropy(tiny_vit, images, batch_size=8)
    torch.testing.assert_close(patch_similarity_entropy(tiny_vit, images, batch_size=2), whole)
    rows = torch.tensor([4, 0])
    torch.testing.assert_close(
        patch_similarity_entropy(tiny_vit, images, indices=rows), whole[rows]
    )
    assert all(not m._forward_hooks for m in tiny_vit.modules())


def test_is_vit_like(tiny_vit: nn.Module, bn_net: nn.Module) -> None:
    assert is_vit_like(tiny_vit)
    assert not is_vit_like(bn_net)
    with pytest.raises(ValueError, match="ViT-like"):
        patch_similarity_entropy(bn_net, torch.zeros(2, 3, 16, 16))


def test_bad_parameters(tiny_vit: nn.Module) -> None:
    images = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="bandwidth"):
        patch_similarity_entropy(tiny_vit, images, bandwidth=0.0)
    with pytest.raises(ValueError, match="grid_size"):
        patch_similarity_entropy(tiny_vit, images, grid_size=2)
