"""Saving, loading and ONNX export of quantized models.

A saved model is a directory with
* ``model.safetensors``: the quantized model's state (folded weights, scales, zero points,
  rounding variables, step sizes);
* ``encodings.json``: the config, the input shape, the folded BatchNorms and, per layer, the bit
  widths, scales and zero points (readable without torch).

Loading rebuilds the module tree from the same float model and config, then restores the state,
so outputs after reload are identical.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import genq_core
from genq_core.quant.config import QuantConfig
from genq_core.quant.prepare import QuantizedModel, prepare_model
from genq_core.quant.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = ["ENCODINGS_FILE", "STATE_FILE", "export_onnx_qdq", "load_quantized", "save_quantized"]

logger = logging.getLogger(__name__)

STATE_FILE = "model.safetensors"
ENCODINGS_FILE = "encodings.json"
FORMAT_VERSION = 1


def save_quantized(qmodel: QuantizedModel, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``encodings.json`` into ``directory`` (created if needed)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in qmodel.model.state_dict().items()}
    save_file(state, str(out / STATE_FILE), metadata={"format": "genq-quantized"})
    (out / ENCODINGS_FILE).write_text(json.dumps(encodings(qmodel), indent=2) + "\n")
    return out


def load_quantized(
    model: nn.Module, directory: str | Path, device: str | torch.device = "cpu"
) -> QuantizedModel:
    """Rebuild a quantized model saved by :func:`save_quantized` from its float ``model``.

    Raises:
        FileNotFoundError: a file is missing from ``directory``.
        ValueError: the files are not a GenQ quantized model, or ``model`` has another
            architecture than the one that was quantized.
    """
    src = Path(directory)
    for name in (STATE_FILE, ENCODINGS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found; is {src} a saved quantized model?")
    try:
        meta = json.loads((src / ENCODINGS_FILE).read_text())
        config = QuantConfig.from_dict(meta["config"])
        input_shape = tuple(int(d) for d in meta["input_shape"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{src / ENCODINGS_FILE} is not a GenQ encodings file: {err}") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported encodings format_version {meta.get('format_version')!r}")
    example = torch.zeros((2, *input_shape))
    source = model if _on_cpu(model) else copy.deepcopy(model).cpu()
    qmodel = prepare_model(source, config, example)
    saved_pairs = [tuple(pair) for pair in meta["folded_batchnorms"]]
    if saved_pairs != [tuple(pair) for pair in qmodel.folded_batchnorms]:
        raise ValueError("the float model's BatchNorm layout differs from the saved model's")
    state = load_file(str(src / STATE_FILE))
    try:
        qmodel.model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the float model does not match the saved quantized model: {err}"
        ) from err
    return qmodel.to(torch.device(device)).eval()


def encodings(qmodel: QuantizedModel) -> dict[str, Any]:
    """The JSON-serialisable description of every quantizer (see the module docstring)."""
    layers = []
    for name, layer in qmodel.quant_layers():
        wq = layer.weight_quantizer
        layers.append(
            {
                "name": name,
                "type": type(layer).__name__,
                "weight": _weight_encoding(wq),
                "input": _act_encoding(layer.input_quantizer),
            }
        )
    activations = {name: _act_encoding(q) for name, q in qmodel.activation_quantizers()}
    return {
        "format_version": FORMAT_VERSION,
        "genq_version": genq_core.__version__,
        "torch_version": torch.__version__,
        "config": qmodel.config.to_dict(),
        "input_shape": list(qmodel.input_shape),
        "folded_batchnorms": [list(pair) for pair in qmodel.folded_batchnorms],
        "layers": layers,
        "activations": activations,
    }


def export_onnx_qdq(
    qmodel: QuantizedModel, path: str | Path, example_input: torch.Tensor, opset: int = 18
) -> Path:
    """Export an 8-bit quantized model to ONNX with QuantizeLinear/DequantizeLinear pairs.

    Weights become ``DequantizeLinear`` of their 8-bit codes (per channel), activations a
    ``QuantizeLinear -> DequantizeLinear`` pair (uint8, per tensor) in front of each consumer.

    Raises:
        ValueError: a quantizer is not 8-bit (ONNX QDQ has no 2..7-bit types) or disabled.
    """
    problems = [
        f"{name} ({q.bits}-bit)"
        for name, q in [*qmodel.weight_quantizers(), *qmodel.activation_quantizers()]
        if q.bits != 8
    ]
    problems += [
        f"{name} (disabled)"
        for name, q in [*qmodel.weight_quantizers(), *qmodel.activation_quantizers()]
        if not q.enabled
    ]
    if problems:
        shown = ", ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
        raise ValueError(f"ONNX QDQ export needs every quantizer enabled at 8 bits; not: {shown}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = qmodel if _on_cpu(qmodel) else copy.deepcopy(qmodel).cpu()
    model.eval()
    # The TorchScript exporter maps torch.fake_quantize_* to QuantizeLinear/DequantizeLinear; the
    # torch.export-based one has no fake-tensor kernel for them with a dynamic batch size.
    with _onnx_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example_input.cpu(),),
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    return out


@contextlib.contextmanager
def _onnx_mode(qmodel: QuantizedModel) -> Iterator[None]:
    """Make quantizers emit ``torch.fake_quantize_*`` ops, which export as Q/DQ pairs."""
    quantizers: list[WeightQuantizer | ActivationQuantizer] = [
        *(q for _, q in qmodel.weight_quantizers()),
        *(q for _, q in qmodel.activation_quantizers()),
    ]
    for _, layer in qmodel.quant_layers():
        layer.weight_quantizer.prepare_export(layer.weight)
    for _, aq in qmodel.activation_quantizers():
        aq.prepare_export()
    for q in quantizers:
        q.onnx_export = True
    try:
        yield
    finally:
        for q in quantizers:
            q.onnx_export = False
        for _, layer in qmodel.quant_layers():
            layer.weight_quantizer._export_weight = None


def _weight_encoding(wq: WeightQuantizer) -> dict[str, Any]:
    return {
        "bits": wq.bits,
        "symmetric": wq.symmetric,
        "per_channel": wq.per_channel,
        "rounding": wq.rounding,
        "quant_min": wq.quant_min,
        "quant_max": wq.quant_max,
        "scale": wq.scale.tolist(),
        "zero_point": [int(z) for z in wq.zero_point.tolist()],
    }


def _act_encoding(aq: ActivationQuantizer) -> dict[str, Any]:
    return {
        "bits": aq.bits,
        "quant_min": aq.quant_min,
        "quant_max": aq.quant_max,
        "scale": float(aq.scale.abs().item()),
        "zero_point": int(aq.zero_point.item()),
    }


def _on_cpu(model: nn.Module) -> bool:
    param = next(model.parameters(), None)
    return param is None or param.device.type == "cpu"
