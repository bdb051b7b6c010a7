"""Calibration sources GenQ is compared against: Gaussian noise and model inversion.

* :func:`gaussian_noise`: i.i.d. normal images in the classifier's *normalised* input space
  (after ``(pixel - mean) / std``), so ``mean=0, std=1`` is noise with the training data's
  per-channel mean and standard deviation in pixel space.
* :func:`model_inversion`: ZeroQ / DeepInversion-style synthesis (the "Genie/ZeroQ" baseline of
  the GenQ paper): random inputs are optimised so that the BatchNorm input statistics of each
  batch match the layers' running statistics, plus a cross-entropy pull towards random target
  labels and an optional total-variation smoothness prior. Needs a model with BatchNorm.
* :func:`timed` / :class:`SourceTiming`: wall-clock seconds per 1000 images of any source, for
  the benchmark's cost column.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from genq_core.align import batchnorm_layers, bn_inputs, bn_loss, eval_mode
from genq_core.devices import on_device
from genq_core.progress import Canceled, ProgressFn, StopFn, check_stop

__all__ = [
    "ModelInversionCanceled",
    "ModelInversionConfig",
    "SourceTiming",
    "bn_statistics_loss",
    "gaussian_noise",
    "model_inversion",
    "timed",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LOG_EVERY = 100


class ModelInversionCanceled(Canceled):
    """``should_stop()`` returned True; no images are returned."""


def gaussian_noise(
    n: int,
    shape: Sequence[int],
    seed: int,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
) -> torch.Tensor:
    """``n`` Gaussian-noise images ``[n, *shape]`` (float32, CPU), identical for the same seed.

    The values live in the classifier's normalised input space, where its preprocessing maps
    the training data to roughly zero mean and unit variance per channel: the defaults are noise
    with the data's first two moments. ``mean`` and ``std`` are one value or one per channel
    (``shape[0]``).

    Raises:
        ValueError: ``n < 1``, a non-positive dimension, a per-channel list of the wrong
            length, or ``std <= 0``.
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    dims = tuple(shape)
    if not dims or not all(_is_int(d) and d >= 1 for d in dims):
        raise ValueError(f"shape must be positive integers like (C, H, W), got {shape!r}")
    means = _per_channel("mean", mean, dims)
    stds = _per_channel("std", std, dims)
    if (stds <= 0).any():
        raise ValueError(f"std must be > 0, got {std!r}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *dims), generator=generator) * stds + means


@dataclass(frozen=True)
class ModelInversionConfig:
    """Settings of :func:`model_inversion`.

    Attributes:
        iters: Adam steps per batch (learning rate cosine-annealed to 0).
        lr: Adam learning rate on the pixels (normalised space).
        batch_size: images optimised together; BN statistics are matched per batch.
        bn_weight: weight of the BN-statistics loss (see :func:`bn_statistics_loss`).
        ce_weight: weight of the cross-entropy to the random target labels; 0 gives ZeroQ.
        tv_weight: weight of the total-variation prior (mean absolute difference of neighbour
            pixels); 0 disables it.
        seed: seeds the initial noise and the target labels.
    """

    iters: int = 500
    lr: float = 0.25
    batch_size: int = 64
    bn_weight: float = 1.0
    ce_weight: float = 1.0
    tv_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(_is_int(self.iters) and self.iters >= 1, "iters", self.iters, "must be >= 1")
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(
            _is_int(self.batch_size) and self.batch_size >= 1,
            "batch_size",
            self.batch_size,
            "must be >= 1",
        )
        for name in ("bn_weight", "ce_weight", "tv_weight"):
            value = getattr(self, name)
            _check(value >= 0, name, value, "must be >= 0")
        _check(self.bn_weight > 0, "bn_weight", self.bn_weight, "must be > 0")
        _check(_is_int(self.seed), "seed", self.seed, "must be an integer")


def model_inversion(
    model: nn.Module,
    n: int,
    shape: Sequence[int],
    num_classes: int,
    config: ModelInversionConfig,
    *,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthesise ``n`` calibration images from a BatchNorm model by inverting its statistics.

    For each batch of ``config.batch_size`` images: start from standard-normal noise and random
    target labels, then take ``config.iters`` Adam steps on the pixels minimising
    ``bn_weight * L_BN + ce_weight * CE(model(x), y) + tv_weight * TV(x)`` with the model in
    eval mode. The model's parameters, buffers and mode are left as they were (gradients are
    taken with respect to the images only).

    Args:
        model: a classifier with BatchNorm layers that track running statistics.
        n: number of images.
        shape: ``(C, H, W)`` of one image, in the model's normalised input space.
        num_classes: the model's number of classes; targets are drawn uniformly from it.
        config: iterations, learning rate, loss weights, seed.
        device: where the optimisation runs.
        on_progress: ``on_progress("model_inversion", step, total)`` counting Adam steps over
            all batches.
        should_stop: polled before every step; True raises :class:`ModelInversionCanceled`.

    Returns:
        ``(images [n, *shape] float32 CPU, target labels [n] int64 CPU)``.

    Raises:
        ValueError: a model without BatchNorm running statistics, ``n < 1``, a bad shape or
            ``num_classes < 1``.
        ModelInversionCanceled: ``should_stop()`` returned True.
    """
    # 1. check inputs
    if not isinstance(config, ModelInversionConfig):
        raise ValueError(f"config must be a ModelInversionConfig, got {type(config).__name__}")
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    dims = tuple(shape)
    if not dims or not all(_is_int(d) and d >= 1 for d in dims):
        raise ValueError(f"shape must be positive integers like (C, H, W), got {shape!r}")
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    batchnorm_layers(model, "model inversion")
    target = torch.device(device)
    net = on_device(model, target)

    # 2. initial noise and target labels, all drawn up front so batches don't depend on each other
    generator = torch.Generator().manual_seed(config.seed)
    start = torch.randn((n, *dims), generator=generator)
    labels = torch.randint(num_classes, (n,), generator=generator)

    # 3. optimise batch by batch
    batches = math.ceil(n / config.batch_size)
    total = batches * config.iters
    results = []
    with eval_mode(net), bn_inputs(net) as captured:
        for b in range(batches):
            chunk = slice(b * config.batch_size, (b + 1) * config.batch_size)
            images = start[chunk].to(target).requires_grad_(True)
            batch_labels = labels[chunk].to(target)
            optimizer = torch.optim.Adam([images], lr=config.lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.iters)
            for it in range(config.iters):
                check_stop(
                    should_stop,
                    f"model inversion at batch {b + 1}/{batches}, step {it}",
                    ModelInversionCanceled,
                )
                captured.clear()
                logits = net(images)
                loss = config.bn_weight * bn_loss(captured)
                if config.ce_weight > 0:
                    loss = loss + config.ce_weight * F.cross_entropy(logits, batch_labels)
                if config.tv_weight > 0:
                    loss = loss + config.tv_weight * _total_variation(images)
                (grad,) = torch.autograd.grad(loss, [images])
                optimizer.zero_grad(set_to_none=True)
                images.grad = grad
                optimizer.step()
                schedule.step()
                if (it + 1) % _LOG_EVERY == 0:
                    logger.debug(
                        "model inversion batch %d/%d step %d: loss %.4f",
                        b + 1,
                        batches,
                        it + 1,
                        float(loss.detach()),
                    )
                if on_progress is not None:
                    on_progress("model_inversion", b * config.iters + it + 1, total)
            results.append(images.detach().float().cpu())
    logger.info("model inversion made %d images in %d batches", n, batches)
    return torch.cat(results), labels


def bn_statistics_loss(model: nn.Module, images: torch.Tensor) -> float:
    """The BN-statistics loss of one batch, as :func:`model_inversion` minimises it.

    ``L_BN = sum over BatchNorm layers of ||mu_B - mu_run||_2 + ||sigma_B - sigma_run||_2``, with
    ``mu_B``, ``sigma_B`` the per-channel mean and standard deviation of the layer's *input* over
    the batch (and spatial positions), and ``sigma_run = sqrt(running_var + eps)``. Runs on the
    model's device; the model is left as it was.

    Raises:
        ValueError: the model has no BatchNorm layers with running statistics.
    """
    batchnorm_layers(model, "the BN-statistics loss")
    with torch.no_grad(), eval_mode(model), bn_inputs(model) as captured:
        param = next(model.parameters(), None)
        model(images.to(param.device) if param is not None else images)
        return float(bn_loss(captured))


@dataclass(frozen=True)
class SourceTiming:
    """How long one calibration source took to make its images.

    Attributes:
        source: the source's name (``"genq"``, ``"noise"``, ``"model_inversion"``, ...).
        images: images made.
        seconds: wall-clock seconds.
    """

    source: str
    images: int
    seconds: float

    def __post_init__(self) -> None:
        _check(_is_int(self.images) and self.images >= 1, "images", self.images, "must be >= 1")
        _check(self.seconds >= 0, "seconds", self.seconds, "must be >= 0")

    @property
    def seconds_per_1000(self) -> float:
        """Wall-clock seconds per 1000 images."""
        return 1000.0 * self.seconds / self.images

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "images": self.images,
            "seconds": self.seconds,
            "seconds_per_1000": self.seconds_per_1000,
        }


def timed(source: str, fn: Callable[[], T], images: int | None = None) -> tuple[T, SourceTiming]:
    """Run ``fn()`` and time it as calibration source ``source``.

    Args:
        source: name of the source, echoed in the timing.
        fn: makes the images; CUDA work is synchronised before the clock stops.
        images: how many images ``fn`` makes; ``None`` counts them from the result (a tensor's
            first dimension, the first element of a tuple/list that is a tensor, or ``len``).

    Returns:
        ``(fn's result, SourceTiming)``.

    Raises:
        ValueError: the image count cannot be read from the result, or is zero.
    """
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    count = images if images is not None else _count_images(source, result)
    if count < 1:
        raise ValueError(f"{source}: made no images")
    return result, SourceTiming(source=source, images=count, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# helpers


def _check(ok: bool, name: str, value: object, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name} {requirement}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_channel(name: str, value: float | Sequence[float], dims: tuple[int, ...]) -> torch.Tensor:
    if isinstance(value, int | float):
        return torch.tensor(float(value))
    values = torch.tensor([float(v) for v in value])
    if values.numel() != dims[0]:
        raise ValueError(f"{name} needs 1 or {dims[0]} values (one per channel), got {len(values)}")
    return values.view(-1, *([1] * (len(dims) - 1)))


def _total_variation(images: torch.Tensor) -> torch.Tensor:
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


def _count_images(source: str, result: object) -> int:
    if isinstance(result, torch.Tensor):
        return int(result.shape[0])
    if isinstance(result, tuple | list) and result and isinstance(result[0], torch.Tensor):
        return int(result[0].shape[0])
    if hasattr(result, "__len__"):
        return len(result)
    raise ValueError(f"{source}: cannot count the images in a {type(result).__name__}; pass images")
