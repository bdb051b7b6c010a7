from __future__ import annotations

import pytest
import torch
from torch import nn

from genq_core.filters import (
    FilterCanceled,
    classifier_logits,
    energy_from_logits,
    energy_scores,
    label_agreement,
)


def template_classifier() -> tuple[nn.Module, torch.Tensor]:
    """A linear classifier whose weight rows are three class templates ``[3, 3, 8, 8]``."""
    templates = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    templates = templates / templates.flatten(1).norm(dim=1).view(3, 1, 1, 1)
    linear = nn.Linear(3 * 8 * 8, 3)
    with torch.no_grad():
        linear.weight.copy_(templates.flatten(1))
        linear.bias.zero_()
    return nn.Sequential(nn.Flatten(), linear).eval(), templates


def test_energy_formula() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    energy = energy_from_logits(logits, temperature=2.0)
    expected = -2.0 * torch.log(torch.exp(logits / 2.0).sum(dim=1))
    torch.testing.assert_close(energy, expected)


def test_confident_image_has_lower_energy_than_noise() -> None:
    model, templates = template_classifier()
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.05
    confident = templates * 10.0
    energy = energy_scores(model, torch.cat([confident, noise]))
    assert energy.shape == (7,)
    assert float(energy[:3].max()) < float(energy[3:].min()) - 5.0


def test_label_agreement() -> None:
    model, templates = template_classifier()
    images = templates * 10.0
    agree = label_agreement(model, images, torch.tensor([0, 2, 2]))
    assert agree.tolist() == [True, False, True]
    subset = label_agreement(model, images, torch.tensor([0, 2, 2]), indices=torch.tensor([2, 1]))
    assert subset.tolist() == [True, False]


def test_batches_do_not_change_scores() -> None:
    model, _ = template_classifier()
    images = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        energy_scores(model, images, batch_size=3), energy_scores(model, images, batch_size=64)
    )


def test_model_mode_is_restored_and_progress_reported() -> None:
    model, _ = template_classifier()
    model.train()
    seen: list[tuple[str, int, int]] = []
    energy_scores(
        model, torch.zeros(5, 3, 8, 8), batch_size=2, on_progress=lambda *a: seen.append(a)
    )
    assert model.training
    assert seen[-1] == ("filter:energy", 5, 5) and len(seen) == 3


def test_cancel() -> None:
    model, _ = template_classifier()
    with pytest.raises(FilterCanceled):
        energy_scores(model, torch.zeros(4, 3, 8, 8), should_stop=lambda: True)


def test_errors() -> None:
    model, _ = template_classifier()
    with pytest.raises(ValueError, match="temperature"):
        energy_scores(model, torch.zeros(2, 3, 8, 8), temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        label_agreement(model, torch.zeros(2, 3, 8, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[B, K\] logits"):
        classifier_logits(nn.Identity(), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="indices"):
        classifier_logits(model, torch.zeros(2, 3, 8, 8), indices=torch.tensor([2]))
