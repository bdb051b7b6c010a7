from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from genq_core.quant import (
    QuantConfig,
    ReconstructionConfig,
    export_onnx_qdq,
    load_quantized,
    quantize_model,
    save_quantized,
)

CHEAP = ReconstructionConfig.cheap()


@pytest.mark.parametrize("preset", ["mse", "qdrop"])
def test_save_load_gives_identical_outputs(
    preset: str, tiny_resnet: nn.Module, images: torch.Tensor, tmp_path: Path
) -> None:
    config = QuantConfig(weight_bits=4, act_bits=4, preset=preset, reconstruction=CHEAP)
    qmodel = quantize_model(tiny_resnet, config, images)
    save_quantized(qmodel, tmp_path / "q")
    reloaded = load_quantized(tiny_resnet, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(images), qmodel(images))
    assert reloaded.config == config
    meta = json.loads((tmp_path / "q" / "encodings.json").read_text())
    layers = {layer["name"]: layer for layer in meta["layers"]}
    stem = layers["stem"]["weight"]
    assert stem["bits"] == 8 and len(stem["scale"]) == 8
    assert layers["layers.0.conv1"]["input"]["bits"] == 4
    if preset == "qdrop":
        assert layers["layers.0.conv1"]["weight"]["rounding"] == "hard"


def test_load_rejects_other_architecture_and_missing_files(
    tiny_resnet: nn.Module, images: torch.Tensor, tmp_path: Path
) -> None:
    qmodel = quantize_model(tiny_resnet, QuantConfig(preset="minmax"), images)
    save_quantized(qmodel, tmp_path / "q")
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    with pytest.raises(ValueError, match="does not match|BatchNorm layout"):
        load_quantized(other, tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_quantized(tiny_resnet, tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    (tmp_path / "bad" / "encodings.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a GenQ encodings file"):
        load_quantized(tiny_resnet, tmp_path / "bad")


def test_onnx_qdq_export_matches_torch(
    tiny_resnet: nn.Module, images: torch.Tensor, tmp_path: Path
) -> None:
    config = QuantConfig(weight_bits=8, act_bits=8, preset="adaround", reconstruction=CHEAP)
    qmodel = quantize_model(tiny_resnet, config, images)
    path = export_onnx_qdq(qmodel, tmp_path / "model.onnx", images[:2])
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("DequantizeLinear") >= 2 * 7  # weight + input of each of the 7 layers
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        torch_out = qmodel(images).numpy()
    # identical but for values on a rounding tie, where one code may differ (ORT multiplies by a
    # reciprocal scale); such a flip moves an output by about one quantization step
    exact = np.isclose(onnx_out, torch_out, atol=1e-5).all(axis=1)
    assert exact.mean() > 0.9
    np.testing.assert_allclose(onnx_out, torch_out, atol=0.01 * float(np.abs(torch_out).max()))
    assert (onnx_out.argmax(1) == torch_out.argmax(1)).mean() > 0.95


def test_onnx_export_refuses_low_bits(
    tiny_resnet: nn.Module, images: torch.Tensor, tmp_path: Path
) -> None:
    qmodel = quantize_model(tiny_resnet, QuantConfig(weight_bits=4, preset="minmax"), images)
    with pytest.raises(ValueError, match="8 bits.*layers.0.conv1"):
        export_onnx_qdq(qmodel, tmp_path / "m.onnx", images[:2])
