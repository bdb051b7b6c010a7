from __future__ import annotations

import timm
import torch
from torch import nn

from genq_core.quant import QuantConfig, find_units, prepare_model
from genq_core.quant.blocks import following_activation


def test_residual_blocks_found_with_layers_outside(
    tiny_resnet: nn.Module, images: torch.Tensor
) -> None:
    qmodel = prepare_model(tiny_resnet, QuantConfig(), images[:2])
    units = [name for name, _ in find_units(qmodel.model, "block")]
    assert units == ["stem", "layers.0", "layers.1", "fc"]
    layers = [name for name, _ in find_units(qmodel.model, "layer")]
    assert len(layers) == 1 + 2 + 3 + 1


def test_plain_sequential_falls_back_to_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
    qmodel = prepare_model(model, QuantConfig(), torch.randn(2, 3, 8, 8))
    assert [name for name, _ in find_units(qmodel.model, "block")] == ["0", "2"]


def test_following_activation_skips_folded_batchnorm_and_stops_at_pooling() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
    ).eval()
    qmodel = prepare_model(model, QuantConfig(), torch.randn(2, 3, 12, 12))
    post = following_activation(qmodel.model, "0")
    assert post is not None
    assert [type(m) for m in post] == [nn.Identity, nn.ReLU]
    assert following_activation(qmodel.model, "4") is None  # only the folded BN follows


def test_following_activation_needs_a_plain_sequential(
    tiny_resnet: nn.Module, images: torch.Tensor
) -> None:
    qmodel = prepare_model(tiny_resnet, QuantConfig(), images[:2])
    assert following_activation(qmodel.model, "fc") is None


def test_transformer_blocks_found(tiny_vit: nn.Module) -> None:
    qmodel = prepare_model(tiny_vit, QuantConfig(), torch.randn(2, 3, 16, 16))
    units = [name for name, _ in find_units(qmodel.model, "block")]
    assert units == ["patch_embed.proj", "blocks.0", "blocks.1", "head"]
    wrapped = prepare_model(
        tiny_vit, QuantConfig(quantize_block_inputs=True), torch.randn(2, 3, 16, 16)
    )
    assert [n for n, _ in find_units(wrapped.model, "block")] == units


def test_inverted_residuals_of_timm_mobilenet_found() -> None:
    model = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=3).eval()
    qmodel = prepare_model(model, QuantConfig(), torch.randn(2, 3, 32, 32))
    units = dict(find_units(qmodel.model, "block"))
    kinds = {type(m).__name__ for m in units.values()}
    assert {"InvertedResidual", "DepthwiseSeparableConv"} <= kinds
    assert "conv_stem" in units and "classifier" in units
