"""Evaluation of quantized models: accuracy, agreement with the float model, SQNR, size.

Data arguments are either tensors or iterables of batches, so a ``DataLoader`` works as well as a
tensor held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from genq_core.quant.prepare import QuantizedModel

__all__ = [
    "ModelSize",
    "accuracy",
    "agreement",
    "layer_sqnr",
    "model_size",
    "output_sqnr",
]

LabelledData = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]
ImageData = torch.Tensor | Iterable[torch.Tensor]


@torch.no_grad()
def accuracy(
    model: nn.Module,
    data: LabelledData,
    topk: tuple[int, ...] = (1, 5),
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """Top-k accuracy in percent, e.g. ``{"top1": 90.1, "top5": 99.8}``.

    Args:
        data: ``(images [N, C, H, W], labels [N])`` or an iterable of such batches.
        topk: which k to report; k larger than the number of classes counts every sample correct.
    """
    if not topk or any(k < 1 for k in topk):
        raise ValueError(f"topk must be positive integers, got {topk}")
    model.eval()
    correct = dict.fromkeys(topk, 0)
    total = 0
    for images, labels in _labelled_batches(data, batch_size):
        logits = model(images.to(device))
        labels = labels.to(logits.device)
        ranked = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
        for k in topk:
            correct[k] += int((ranked[:, :k] == labels[:, None]).any(dim=1).sum())
        total += labels.shape[0]
    if total == 0:
        raise ValueError("evaluation set is empty")
    return {f"top{k}": 100.0 * correct[k] / total for k in topk}


@torch.no_grad()
def agreement(
    reference: nn.Module,
    model: nn.Module,
    images: ImageData,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> float:
    """Percent of images on which ``model`` predicts the same class as ``reference``.

    The label-free quality measure: use held-out images (synthetic ones when no real data exists).
    """
    reference.eval()
    model.eval()
    same = total = 0
    for batch in _image_batches(images, batch_size):
        batch = batch.to(device)
        same += int((reference(batch).argmax(1) == model(batch).argmax(1)).sum())
        total += batch.shape[0]
    if total == 0:
        raise ValueError("image set is empty")
    return 100.0 * same / total


@torch.no_grad()
def output_sqnr(
    reference: nn.Module,
    model: nn.Module,
    images: ImageData,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> float:
    """SQNR in dB of ``model``'s logits against ``reference``'s over ``images``."""
    reference.eval()
    model.eval()
    signal = noise = 0.0
    for batch in _image_batches(images, batch_size):
        batch = batch.to(device)
        ref, out = reference(batch).double(), model(batch).double()
        signal += float(ref.pow(2).sum())
        noise += float((ref - out).pow(2).sum())
    return _db(signal, noise)


@torch.no_grad()
def layer_sqnr(
    qmodel: QuantizedModel,
    images: ImageData,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """SQNR in dB of each quantized layer's output, in execution order, plus ``"output"``.

    The reference is the same model with quantization switched off (the BN-folded float model),
    so each figure measures the error accumulated up to that layer.
    """
    qmodel.eval()
    names = [name for name, _ in qmodel.quant_layers()] + ["output"]
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    weights_on = [q.enabled for _, q in qmodel.weight_quantizers()]
    acts_on = [q.enabled for _, q in qmodel.activation_quantizers()]
    try:
        for batch in _image_batches(images, batch_size):
            batch = batch.to(device)
            qmodel.set_quant_state(weights=False, activations=False)
            ref = _layer_outputs(qmodel, batch)
            qmodel.set_quant_state(weights=True, activations=True)
            out = _layer_outputs(qmodel, batch)
            for name in names:
                signal[name] += float(ref[name].double().pow(2).sum())
                noise[name] += float((ref[name].double() - out[name].double()).pow(2).sum())
    finally:
        for (_, wq), on in zip(qmodel.weight_quantizers(), weights_on, strict=True):
            wq.enabled = on
        for (_, aq), on in zip(qmodel.activation_quantizers(), acts_on, strict=True):
            aq.enabled = on
    return {name: _db(signal[name], noise[name]) for name in names}


@dataclass(frozen=True)
class ModelSize:
    """Storage of a model's parameters in bytes.

    Attributes:
        float_bytes: every parameter as fp32.
        quantized_bytes: quantized weights at their bit widths (plus one fp32 scale and one
            zero point per channel), everything else fp32.
        compression: ``float_bytes / quantized_bytes``.
    """

    float_bytes: int
    quantized_bytes: int

    @property
    def compression(self) -> float:
        return self.float_bytes / self.quantized_bytes if self.quantized_bytes else math.inf


def model_size(qmodel: QuantizedModel) -> ModelSize:
    """The size of ``qmodel``'s weights at fp32 and at their quantized bit widths."""
    quantized_weights = {id(layer.weight) for _, layer in qmodel.quant_layers()}
    float_bits = quant_bits = 0
    seen: set[int] = set()
    for name, param in qmodel.model.named_parameters():
        if name.endswith(".alpha") or name.endswith("quantizer.scale") or id(param) in seen:
            continue  # quantizer state is accounted for below
        seen.add(id(param))
        float_bits += 32 * param.numel()
        if id(param) not in quantized_weights:
            quant_bits += 32 * param.numel()
    for _, layer in qmodel.quant_layers():
        wq = layer.weight_quantizer
        quant_bits += wq.bits * layer.weight.numel() + (32 + wq.bits) * wq.scale.numel()
    return ModelSize(
        float_bytes=math.ceil(float_bits / 8), quantized_bytes=math.ceil(quant_bits / 8)
    )


def _layer_outputs(qmodel: QuantizedModel, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in qmodel.quant_layers():

        def hook(_: nn.Module, __: object, out: torch.Tensor, name: str = name) -> None:
            outputs[name] = out

        handles.append(layer.register_forward_hook(hook))
    try:
        outputs["output"] = qmodel(batch)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _labelled_batches(
    data: LabelledData, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
        return
    for batch in data:
        images, labels = batch
        yield images, labels


def _image_batches(images: ImageData, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    for batch in images:
        yield batch[0] if isinstance(batch, tuple | list) else batch
