"""BatchNorm alignment: nudge calibration images towards the float model's training statistics.

Every BatchNorm layer remembers the mean and variance of its input channels over the training
data. Model inversion (:func:`genq_core.baselines.model_inversion`) builds images from noise so
that each batch reproduces those statistics; alignment starts from images that are already
natural (generated, filtered) and takes a few of the same Adam steps on their pixels:

    L(x) = L_BN(x) + ce_weight * CE(f(x), y),
    L_BN = sum over BN layers of ||mu_B - mu_run||_2 + ||sigma_B - sigma_run||_2,

with ``mu_B``, ``sigma_B`` the per-channel statistics of the layer's input over the batch and
``y`` the float model's own top-1 class of each unaligned image (so no labels are needed, and the
pull keeps each image in the class it already shows). The learning rate is cosine-annealed to 0.
After every step each channel is clamped to the range the input set spans: images come
preprocessed, so that range is the valid one (black to white after normalisation), and without
the clamp the steps make pixels darker than black or brighter than white that no real image has
(on a darkened target they wrecked the quantized model; BENCHMARKS.md has the numbers).

Why: generated images can sit farther from those statistics than real data (on the reference
benchmark, whose BN ResNet gives its generated sets a larger ``D_BN`` than real data's); a few
steps close that distance while the images stay what they were. BENCHMARKS.md ("GenQ + BN
alignment") has what this changes for the quantized model.

The helpers that capture BatchNorm inputs and compute ``L_BN`` are shared with model inversion.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genq_core.devices import on_device
from genq_core.progress import Canceled, ProgressFn, StopFn, check_stop

__all__ = [
    "AlignCanceled",
    "AlignConfig",
    "align_to_bn_statistics",
    "batchnorm_layers",
    "bn_inputs",
    "bn_loss",
    "eval_mode",
]

logger = logging.getLogger(__name__)


class AlignCanceled(Canceled):
    """``should_stop()`` returned True; no images are returned."""


@dataclass(frozen=True)
class AlignConfig:
    """Settings of :func:`align_to_bn_statistics`.

    Attributes:
        iters: Adam steps per batch (learning rate cosine-annealed to 0).
        lr: Adam learning rate on the pixels (normalised input space).
        batch_size: images aligned together; BN statistics are matched per batch.
        ce_weight: weight of the cross-entropy to each image's own float top-1 class; 0 matches
            the statistics only.
        clamp_to_input_range: after every step, clamp each channel to the [min, max] it spans
            over the whole input set (the valid pixel range of preprocessed images).
    """

    iters: int = 50
    lr: float = 0.05
    batch_size: int = 64
    ce_weight: float = 1.0
    clamp_to_input_range: bool = True

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size"):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        ok = isinstance(self.ce_weight, int | float) and 0 <= self.ce_weight < math.inf
        if not ok:
            raise ValueError(f"ce_weight must be a finite number >= 0, got {self.ce_weight!r}")
        if not isinstance(self.clamp_to_input_range, bool):
            raise ValueError(
                f"clamp_to_input_range must be true or false, got {self.clamp_to_input_range!r}"
            )


def align_to_bn_statistics(
    model: nn.Module,
    images: torch.Tensor,
    config: AlignConfig,
    *,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> torch.Tensor:
    """``images`` after ``config.iters`` steps towards the model's BatchNorm statistics.

    Batches of ``config.batch_size`` consecutive images are aligned independently (the result
    of a batch does not depend on the others, except through the per-channel pixel range of the
    whole set that ``config.clamp_to_input_range`` keeps). The model's parameters, buffers and mode are
    left as they were; gradients are taken with respect to the images only.

    Args:
        model: the unfolded float classifier, with BatchNorm layers that track running
            statistics.
        images: ``[N, C, H, W]`` preprocessed (normalised) images, finite, ``N >= 1``.
        config: steps, learning rate, batch size, cross-entropy weight.
        device: where the optimisation runs.
        on_progress: ``on_progress("bn_align", step, total)`` counting Adam steps over all
            batches.
        should_stop: polled before every step; True raises :class:`AlignCanceled`.

    Returns:
        float32 CPU ``[N, C, H, W]``, the aligned images (the input is not modified).

    Raises:
        ValueError: a model without BatchNorm running statistics, or images that are not a
            non-empty finite ``[N, C, H, W]`` float tensor.
        AlignCanceled: ``should_stop()`` returned True.
    """
    # 1. check inputs
    if not isinstance(config, AlignConfig):
        raise ValueError(f"config must be an AlignConfig, got {type(config).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got {shape}")
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise ValueError("images must be finite floating-point values")
    batchnorm_layers(model, "BN alignment")
    target = torch.device(device)
    net = on_device(model, target)

    # 2. the per-channel pixel range of the whole set, and each image's own class under the
    # float model: the cross-entropy target
    channels = images.transpose(0, 1).reshape(images.shape[1], -1)
    low = channels.amin(dim=1).view(1, -1, 1, 1).to(device=target, dtype=torch.float32)
    high = channels.amax(dim=1).view(1, -1, 1, 1).to(device=target, dtype=torch.float32)
    batches = list(torch.split(images, config.batch_size))
    total = len(batches) * config.iters
    results = []
    with eval_mode(net), bn_inputs(net) as captured:
        for b, batch in enumerate(batches):
            pixels = batch.to(device=target, dtype=torch.float32)
            with torch.no_grad():
                classes = net(pixels).argmax(dim=1)

            # 3. Adam on the pixels, learning rate cosine-annealed to 0
            pixels = pixels.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([pixels], lr=config.lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.iters)
            for it in range(config.iters):
                check_stop(
                    should_stop,
                    f"BN alignment at batch {b + 1}/{len(batches)}, step {it}",
                    AlignCanceled,
                )
                captured.clear()
                logits = net(pixels)
                loss = bn_loss(captured)
                if config.ce_weight > 0:
                    loss = loss + config.ce_weight * F.cross_entropy(logits, classes)
                (grad,) = torch.autograd.grad(loss, [pixels])
                optimizer.zero_grad(set_to_none=True)
                pixels.grad = grad
                optimizer.step()
                schedule.step()
                if config.clamp_to_input_range:
                    with torch.no_grad():
                        pixels.clamp_(low, high)
                if on_progress is not None:
                    on_progress("bn_align", b * config.iters + it + 1, total)
            results.append(pixels.detach().float().cpu())
    logger.info(
        "aligned %d images to the BN statistics in %d batches", images.shape[0], len(batches)
    )
    return torch.cat(results)


def batchnorm_layers(model: nn.Module, purpose: str) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers with running statistics; ``purpose`` names who needs them.

    Raises:
        ValueError: there are none.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
    ]
    if not layers:
        raise ValueError(
            f"{purpose} needs BatchNorm layers with running statistics; "
            f"{type(model).__name__} has none"
        )
    return layers


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def bn_inputs(
    model: nn.Module,
) -> Iterator[list[tuple[torch.Tensor, nn.modules.batchnorm._BatchNorm]]]:
    """Collect ``(input, layer)`` of every BatchNorm forward while active; hooks removed after."""
    captured: list[tuple[torch.Tensor, nn.modules.batchnorm._BatchNorm]] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        captured.append((args[0], module))

    handles = [
        layer.register_forward_pre_hook(hook)
        for layer in batchnorm_layers(model, "collecting BatchNorm inputs")
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def bn_loss(captured: list[tuple[torch.Tensor, nn.modules.batchnorm._BatchNorm]]) -> torch.Tensor:
    """``L_BN`` of one forward pass from :func:`bn_inputs`'s captures (a 0-dim tensor)."""
    if not captured:
        raise ValueError("no BatchNorm layer ran in the forward pass")
    total = torch.zeros((), device=captured[0][0].device)
    for inputs, layer in captured:
        assert layer.running_mean is not None and layer.running_var is not None
        dims = [d for d in range(inputs.dim()) if d != 1]
        mean = inputs.float().mean(dims)
        std = torch.sqrt(inputs.float().var(dims, unbiased=False) + layer.eps)
        run_std = torch.sqrt(layer.running_var.float() + layer.eps)
        total = total + torch.linalg.vector_norm(mean - layer.running_mean.float())
        total = total + torch.linalg.vector_norm(std - run_std)
    return total
