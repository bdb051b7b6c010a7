"""Post-training quantization of classifiers: fake-quant functions, quantizers, reconstruction.

Entry point: :func:`quantize_model`. Layers: ``functional`` (pure tensor functions),
``quantizers`` and ``modules`` (state), ``quantize``/``reconstruct`` (the algorithm).
"""

from genq_core.quant.blocks import find_units, register_block_type
from genq_core.quant.config import PRESETS, PresetSpec, QuantConfig, ReconstructionConfig
from genq_core.quant.export import export_onnx_qdq, load_quantized, save_quantized
from genq_core.quant.prepare import QuantizedModel, UnsupportedModuleError, prepare_model
from genq_core.quant.quantize import calibrate, collect_images, quantize_model
from genq_core.quant.reconstruct import QuantizationCanceled

__all__ = [
    "PRESETS",
    "PresetSpec",
    "QuantConfig",
    "QuantizationCanceled",
    "QuantizedModel",
    "ReconstructionConfig",
    "UnsupportedModuleError",
    "calibrate",
    "collect_images",
    "export_onnx_qdq",
    "find_units",
    "load_quantized",
    "prepare_model",
    "quantize_model",
    "register_block_type",
    "save_quantized",
]
