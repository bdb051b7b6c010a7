"""The user-facing entry point: ``quantize_model(model, config, calibration_data)``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from genq_core.align import AlignCanceled, AlignConfig, align_to_bn_statistics, batchnorm_layers
from genq_core.devices import on_device
from genq_core.quant.calibration import ActivationObserver
from genq_core.quant.config import QuantConfig
from genq_core.quant.prepare import QuantizedModel, prepare_model
from genq_core.quant.reconstruct import ProgressFn, QuantizationCanceled, StopFn, reconstruct

__all__ = ["CalibrationData", "calibrate", "collect_images", "quantize_model"]

logger = logging.getLogger(__name__)

CalibrationData = (
    torch.Tensor | Iterable[torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]]
)


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration_data: CalibrationData,
    *,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> QuantizedModel:
    """Quantize a float classifier on a calibration set; the caller's model is not modified.

    Args:
        model: any ``nn.Module`` classifier mapping ``[N, C, H, W]`` images to ``[N, K]`` logits.
        config: bit widths, preset and reconstruction settings.
        calibration_data: ``[N, C, H, W]`` preprocessed images, or an iterable of such batches (or
            of ``(images, labels)`` tuples, labels ignored). The first
            ``config.max_calibration_images`` are used.
        device: where calibration and reconstruction run (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        on_progress: called as ``on_progress(stage, done, total)`` with stages ``"bn_align"``
            (only with ``config.bn_align_iters``), ``"calibrate"`` and ``"reconstruct"``.
        should_stop: polled between batches and blocks; returning True raises
            :class:`QuantizationCanceled`.

    Returns:
        A :class:`QuantizedModel` in eval mode on ``device``, with weights and activations
        fake-quantized.

    Raises:
        ValueError: empty or non-finite calibration data, a model that cannot be prepared, or
            ``config.bn_align_iters`` with a model without BatchNorm.
        UnsupportedModuleError: a module with weights the quantizer does not handle (named).
        QuantizationCanceled: ``should_stop()`` returned True.
    """
    # 1. check inputs
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    target = torch.device(device)
    images = collect_images(calibration_data, config.max_calibration_images).to(target)

    # 2. optionally, pull the images towards the float model's BatchNorm statistics
    if config.bn_align_iters > 0:
        batchnorm_layers(model, f"bn_align_iters={config.bn_align_iters}")
        align = AlignConfig(
            iters=config.bn_align_iters, lr=config.bn_align_lr, batch_size=config.batch_size
        )
        try:
            images = align_to_bn_statistics(
                model,
                images,
                align,
                device=target,
                on_progress=on_progress,
                should_stop=should_stop,
            ).to(target)
        except AlignCanceled as canceled:
            raise QuantizationCanceled(str(canceled)) from canceled

    # 3. copy, fold BatchNorm, swap in quantizers
    source = on_device(model, target)  # prepare_model copies again; the caller's stays put
    qmodel = prepare_model(source, config, images[:2]).to(target)

    # 4. range calibration of weights and activations
    calibrate(qmodel, images, on_progress=on_progress, should_stop=should_stop)

    # 5. learned rounding and step sizes, layer by layer or block by block
    if config.preset_spec.granularity is not None:
        reconstruct(qmodel, images, config, target, on_progress, should_stop)
    qmodel.set_quant_state(weights=True, activations=True)
    return qmodel.eval()


@torch.no_grad()
def calibrate(
    qmodel: QuantizedModel,
    images: torch.Tensor,
    *,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> None:
    """Range-calibrate every quantizer of ``qmodel`` with its preset's method.

    Weights are calibrated from their values; activations from what they see while ``images``
    run through the model with quantized weights and float activations.
    """
    config = qmodel.config
    spec = config.preset_spec
    for _, layer in qmodel.quant_layers():
        layer.weight_quantizer.calibrate(layer.weight, spec.weight_init)

    generator = torch.Generator().manual_seed(config.seed)
    observers: dict[str, ActivationObserver] = {}
    handles = []
    for name, quantizer in qmodel.activation_quantizers():
        observer = ActivationObserver(generator=generator)
        observers[name] = observer
        handles.append(quantizer.register_forward_pre_hook(_observe(observer)))
    qmodel.set_quant_state(weights=True, activations=False)
    total = images.shape[0]
    try:
        for start in range(0, total, config.batch_size):
            if should_stop is not None and should_stop():
                raise QuantizationCanceled("canceled during calibration")
            qmodel(images[start : start + config.batch_size])
            if on_progress is not None:
                on_progress("calibrate", min(start + config.batch_size, total), total)
    finally:
        for handle in handles:
            handle.remove()
    unused = []
    for name, quantizer in qmodel.activation_quantizers():
        if observers[name].empty:
            unused.append(name)
            continue
        quantizer.calibrate(observers[name], spec.act_init, config.percentile)
    if unused:
        raise ValueError(f"activation quantizers never reached in forward(): {unused}")
    qmodel.set_quant_state(weights=True, activations=True)


def collect_images(data: CalibrationData, limit: int | None) -> torch.Tensor:
    """Concatenate calibration batches into one float tensor ``[N, ...]`` (``N <= limit``).

    Raises:
        ValueError: no images, non-float or non-finite values, or batches of different shapes.
    """
    if isinstance(data, torch.Tensor):
        batches: Iterable[object] = [data]
    else:
        batches = data
    collected: list[torch.Tensor] = []
    count = 0
    for batch in batches:
        images = batch[0] if isinstance(batch, tuple | list) else batch
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"calibration batches must be tensors, got {type(images).__name__}")
        if images.dim() < 2:
            raise ValueError(f"calibration batch must be [N, ...], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"calibration images must be float (preprocessed), got {images.dtype}")
        if collected and images.shape[1:] != collected[0].shape[1:]:
            raise ValueError(
                f"calibration batches differ in shape: {tuple(collected[0].shape[1:])} vs "
                f"{tuple(images.shape[1:])}"
            )
        if limit is not None:
            images = images[: limit - count]
        collected.append(images.detach().float())
        count += images.shape[0]
        if limit is not None and count >= limit:
            break
    if count == 0:
        raise ValueError("calibration set is empty")
    result = torch.cat(collected)
    if not torch.isfinite(result).all():
        raise ValueError("calibration images contain NaN or Inf values")
    logger.info("calibrating on %d images of shape %s", count, tuple(result.shape[1:]))
    return result


def _observe(observer: ActivationObserver) -> Callable[..., None]:
    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        observer.update(args[0])

    return hook
