from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genq_core.evaluate import accuracy, agreement, layer_sqnr, model_size, output_sqnr
from genq_core.quant import QuantConfig, quantize_model


class FixedLogits(nn.Module):
    """Returns the logits stored for each input index (input is ``[N, 1]`` of indices)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()]


def test_topk_accuracy() -> None:
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 0, 5])
    model = FixedLogits(logits)
    result = accuracy(model, (torch.arange(3)[:, None].float(), labels), topk=(1, 5))
    assert result == {"top1": pytest.approx(100 / 3), "top5": pytest.approx(100 / 3)}
    batches = [(torch.arange(3)[:, None].float(), labels)]
    assert accuracy(model, batches, topk=(1, 6))["top6"] == 100.0
    with pytest.raises(ValueError, match="empty"):
        accuracy(model, [], topk=(1,))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        accuracy(model, (torch.zeros(3, 1), labels[:2]))


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)
    ).eval()


def test_agreement_and_sqnr() -> None:
    model = _small_cnn()
    x = torch.randn(64, 3, 8, 8)
    assert agreement(model, model, x) == 100.0
    assert output_sqnr(model, model, x) == math.inf
    q8 = quantize_model(model, QuantConfig(weight_bits=8, act_bits=8, preset="minmax"), x)
    q2 = quantize_model(
        model, QuantConfig(weight_bits=2, act_bits=2, preset="minmax", first_last_bits=None), x
    )
    assert agreement(model, q8, x) > agreement(model, q2, x)
    per_layer = layer_sqnr(q8, x)
    assert list(per_layer) == ["0", "3", "output"]
    assert all(25.0 < value < math.inf for value in per_layer.values())
    assert per_layer["output"] == pytest.approx(output_sqnr(model, q8, x), abs=1e-6)
    assert all(q.enabled for _, q in q8.activation_quantizers())  # state restored


def test_model_size_counts_bits() -> None:
    model = _small_cnn()
    x = torch.randn(8, 3, 8, 8)
    config = QuantConfig(weight_bits=4, act_bits=4, preset="minmax", first_last_bits=None)
    size = model_size(quantize_model(model, config, x))
    params = sum(p.numel() for p in model.parameters())
    assert size.float_bytes == params * 4
    assert 6.0 < size.compression < 8.0  # 4-bit weights, fp32 biases and scales
