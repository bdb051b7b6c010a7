from __future__ import annotations

import pytest
import torch
from torch import nn

from genq_core.evaluate import output_sqnr
from genq_core.quant import (
    QuantConfig,
    QuantizationCanceled,
    ReconstructionConfig,
    quantize_model,
)
from genq_core.quant.modules import QuantLinear

CHEAP = ReconstructionConfig.cheap()


@pytest.mark.parametrize("preset", ["minmax", "percentile", "mse", "adaround", "brecq", "qdrop"])
def test_every_preset_w8a8_is_close_to_float(
    preset: str, tiny_resnet: nn.Module, images: torch.Tensor
) -> None:
    config = QuantConfig(weight_bits=8, act_bits=8, preset=preset, reconstruction=CHEAP)
    qmodel = quantize_model(tiny_resnet, config, images)
    assert output_sqnr(tiny_resnet, qmodel, images) > 25.0
    if config.preset_spec.granularity is not None:
        assert all(layer.weight_quantizer.rounding == "hard" for _, layer in qmodel.quant_layers())


def test_lower_bits_lose_more(tiny_resnet: nn.Module, images: torch.Tensor) -> None:
    sqnr = {}
    for bits in (8, 4, 2):
        config = QuantConfig(weight_bits=bits, act_bits=bits, preset="minmax")
        sqnr[bits] = output_sqnr(tiny_resnet, quantize_model(tiny_resnet, config, images), images)
    assert sqnr[8] > sqnr[4] > sqnr[2]


def test_adaround_beats_nearest_rounding_on_a_linear_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    # correlated inputs: rounding errors of different weights can cancel, which AdaRound exploits
    x = torch.randn(512, 6) @ torch.randn(6, 32) + 0.05 * torch.randn(512, 32)
    base = QuantConfig(weight_bits=3, act_bits=8, preset="mse", first_last_bits=None)
    nearest = quantize_model(model, base, x)
    learned = quantize_model(
        model,
        QuantConfig(
            weight_bits=3,
            act_bits=8,
            preset="adaround",
            first_last_bits=None,
            reconstruction=ReconstructionConfig(iters=1500, batch_size=64),
        ),
        x,
    )
    assert output_sqnr(model, learned, x) > output_sqnr(model, nearest, x) + 2.0


def test_deterministic_for_a_seed(tiny_resnet: nn.Module, images: torch.Tensor) -> None:
    config = QuantConfig(weight_bits=4, act_bits=4, preset="qdrop", reconstruction=CHEAP, seed=3)
    first = quantize_model(tiny_resnet, config, images)
    second = quantize_model(tiny_resnet, config, images)
    with torch.no_grad():
        assert torch.equal(first(images), second(images))


def test_progress_and_iterable_of_batches(tiny_resnet: nn.Module, images: torch.Tensor) -> None:
    events: list[tuple[str, int, int]] = []
    batches = [(images[i : i + 16], torch.zeros(16)) for i in range(0, 64, 16)]
    config = QuantConfig(
        preset="brecq", reconstruction=ReconstructionConfig(iters=50, batch_size=8)
    )
    quantize_model(tiny_resnet, config, batches, on_progress=lambda *e: events.append(e))
    stages = [stage for stage, _, _ in events]
    assert stages[0] == "calibrate" and stages[-1] == "reconstruct"
    reconstruct = [(done, total) for stage, done, total in events if stage == "reconstruct"]
    assert reconstruct[-1] == (4 * 50, 4 * 50)  # four units: stem, two blocks, fc
    assert [d for d, _ in reconstruct] == sorted(d for d, _ in reconstruct)


def test_should_stop_cancels(tiny_resnet: nn.Module, images: torch.Tensor) -> None:
    calls = iter(range(100))
    with pytest.raises(QuantizationCanceled):
        quantize_model(
            tiny_resnet,
            QuantConfig(preset="qdrop", reconstruction=CHEAP),
            images,
            should_stop=lambda: next(calls) >= 3,
        )


def test_max_calibration_images_limits_the_set(tiny_resnet: nn.Module) -> None:
    seen: list[int] = []
    config = QuantConfig(preset="minmax", max_calibration_images=10, batch_size=4)
    data = [torch.randn(8, 3, 16, 16) for _ in range(5)]
    quantize_model(tiny_resnet, config, data, on_progress=lambda s, d, t: seen.append(t))
    assert set(seen) == {10}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (torch.empty(0, 3, 16, 16), "empty"),
        ([], "empty"),
        (torch.full((4, 3, 16, 16), float("nan")), "NaN"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), "float"),
        ([torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)], "differ in shape"),
        (["not a tensor"], "tensors"),
    ],
)
def test_bad_calibration_data(tiny_resnet: nn.Module, data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_model(tiny_resnet, QuantConfig(preset="minmax"), data)  # type: ignore[arg-type]


def test_bad_config_type(tiny_resnet: nn.Module, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="QuantConfig"):
        quantize_model(tiny_resnet, {"weight_bits": 4}, images)  # type: ignore[arg-type]


def test_vit_qdrop_and_activation_functions(tiny_vit: nn.Module) -> None:
    x = torch.randn(32, 3, 16, 16)
    qmodel = quantize_model(
        tiny_vit, QuantConfig(weight_bits=8, act_bits=8, preset="qdrop", reconstruction=CHEAP), x
    )
    assert output_sqnr(tiny_vit, qmodel, x) > 20.0
    assert isinstance(qmodel.model.get_submodule("head"), QuantLinear)


def test_silu_gelu_and_pooling_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.SiLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GELU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    ).eval()
    x = torch.randn(32, 3, 16, 16)
    qmodel = quantize_model(model, QuantConfig(weight_bits=8, act_bits=8, preset="mse"), x)
    assert output_sqnr(model, qmodel, x) > 25.0


def test_bn_alignment_runs_first_and_changes_the_calibration(
    tiny_resnet: nn.Module, images: torch.Tensor
) -> None:
    events: list[tuple[str, int, int]] = []
    plain = QuantConfig(weight_bits=4, act_bits=4, preset="minmax", batch_size=32)
    aligned = QuantConfig(
        weight_bits=4, act_bits=4, preset="minmax", batch_size=32, bn_align_iters=3
    )
    first = quantize_model(tiny_resnet, plain, images)
    second = quantize_model(tiny_resnet, aligned, images, on_progress=lambda *e: events.append(e))
    stages = list(dict.fromkeys(stage for stage, _, _ in events))
    assert stages == ["bn_align", "calibrate"]
    assert [e for e in events if e[0] == "bn_align"][-1] == ("bn_align", 6, 6)  # 2 batches x 3
    with torch.no_grad():
        assert not torch.equal(first(images), second(images))


def test_bn_alignment_needs_batchnorm_and_can_be_canceled(
    tiny_resnet: nn.Module, images: torch.Tensor
) -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))
    with pytest.raises(ValueError, match="bn_align_iters=2 needs BatchNorm"):
        quantize_model(plain, QuantConfig(preset="minmax", bn_align_iters=2), images)
    with pytest.raises(QuantizationCanceled, match="BN alignment"):
        quantize_model(
            tiny_resnet,
            QuantConfig(preset="minmax", bn_align_iters=2),
            images,
            should_stop=lambda: True,
        )
