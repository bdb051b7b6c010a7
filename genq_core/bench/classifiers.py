"""Small full-precision reference classifiers for Fashion-MNIST, and their training.

:class:`SmallResNet` is a three-block BatchNorm ResNet for 1x28x28 inputs (~1.2 MB of
fp32 weights). :func:`vit_fmnist` builds a small timm ``VisionTransformer`` without BatchNorm
(the no-BN path of GenQ's filters and quantizer). :func:`train_classifier` trains either on
normalized images (SGD or AdamW, OneCycle schedule); :func:`evaluate_top1` measures top-1
accuracy. :func:`shift_images` is the fixed domain shift of the data-scarce experiment.

The reference benchmark's three classifiers (trained by
``benchmarks/fashion/train_classifiers.py``) are built by the builders of :data:`BUILDERS`,
named ``genq_core.bench.classifiers:<builder>`` in ``benchmarks/assets/classifiers.json``, and
trained with :data:`RESNET_RECIPE`, :data:`VIT_RECIPE` and :data:`SHIFTED_RESNET_RECIPE`. All
take images through :func:`genq_core.bench.fashion_mnist.normalize` (the shifted target after
:func:`shift_images`); the builders record that in the model's timm ``pretrained_cfg``.

CPU note: on a machine whose cores are already busy, PyTorch's OpenMP intra-op threads can
make training an order of magnitude slower; ``torch.set_num_threads(1)`` then helps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from genq_core.bench.fashion_mnist import IMAGE_SIZE, MEAN, NUM_CLASSES, STD

__all__ = [
    "BUILDERS",
    "DARKEN_GAMMA",
    "DOMAINS",
    "RESNET_RECIPE",
    "SHIFTED_RESNET_RECIPE",
    "SHIFT_ROTATION_DEGREES",
    "SHIFT_SCALE",
    "VIT_RECIPE",
    "BNConvNet",
    "BasicBlock",
    "SmallResNet",
    "TrainConfig",
    "darken_images",
    "evaluate_top1",
    "to_domain",
    "shift_images",
    "small_resnet_fmnist",
    "train_classifier",
    "vit_fmnist",
]

SHIFT_ROTATION_DEGREES = 30.0
"""Counter-clockwise rotation (as displayed, rows top to bottom) of :func:`shift_images`."""

SHIFT_SCALE = 0.8
"""Zoom factor of :func:`shift_images` (< 1 shrinks the object towards the image centre)."""

DARKEN_GAMMA = 2.0
"""Exponent of :func:`darken_images` (``x -> x ** 2``)."""

CPU_EVAL_BATCH = 64
"""Default batch of :func:`evaluate_top1` on the CPU."""

ACCELERATOR_EVAL_BATCH = 512
"""Default batch of :func:`evaluate_top1` on an accelerator."""

logger = logging.getLogger(__name__)


class BNConvNet(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (32, 32, 64, 64 channels, max-pool after each pair) and a
    linear classifier, for ``[N, 1, 28, 28]`` inputs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(1, 32),
            *conv(32, 32),
            nn.MaxPool2d(2),
            *conv(32, 64),
            *conv(64, 64),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(64 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class SmallResNet(nn.Module):
    """Small BatchNorm ResNet for 28x28 grayscale images.

    Layout: stem Conv3x3(in_chans->w0)+BN+ReLU; ``layers`` = three :class:`BasicBlock`
    (w0->w0 stride 1, w0->w1 stride 2, w1->w2 stride 2); global average pool; ``fc``
    Linear(w2 -> num_classes). With the default widths (32, 64, 128) it has 308,074
    parameters (~1.2 MB fp32). Layers keep PyTorch's default initialisation.

    Input: float [N, in_chans, H, W] (normalized images, H = W = 28 for Fashion-MNIST).
    Output: float logits [N, num_classes].
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: tuple[int, int, int] = (32, 64, 128),
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if len(widths) != 3 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be three positive ints, got {widths}")
        w0, w1, w2 = widths
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, w0, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(w0),
            nn.ReLU(inplace=True),
        )
        self.layers = nn.Sequential(
            BasicBlock(w0, w0, stride=1),
            BasicBlock(w0, w1, stride=2),
            BasicBlock(w1, w2, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images [N, in_chans, H, W] to logits [N, num_classes]."""
        x = self.stem(x)
        x = self.layers(x)
        x = torch.flatten(self.pool(x), 1)
        logits: torch.Tensor = self.fc(x)
        return logits


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    The shortcut is the identity, or Conv1x1(stride)+BN when the stride or the channel
    count changes. Input float [N, in_ch, H, W]; output [N, out_ch, ceil(H/s), ceil(W/s)].
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to float [N, in_ch, H, W]."""
        out: torch.Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + self.shortcut(x))
        return out


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_classifier`.

    ``optimizer`` ``"sgd"``: SGD (momentum ``momentum``, Nesterov); ``"adamw"``: AdamW (betas
    0.9, 0.999; ``momentum`` unused). Either way ``weight_decay`` applies to conv/linear
    weights only (not to biases, norms, nor what the model's ``no_weight_decay()`` names, such
    as a ViT's position embedding and class token), and the learning rate follows a OneCycle
    schedule: cosine warm-up from ``lr / 25`` to ``lr`` over the first ``warmup_fraction`` of
    the steps, then cosine decay to ~0. ``augment`` enables random crop (``crop_padding`` px
    zero padding in normalized space) plus, with ``hflip``, a random horizontal flip.
    ``max_grad_norm`` clips the global gradient norm (``None``: no clipping).

    The defaults train :class:`SmallResNet` on the ~30k-image classifier split of
    Fashion-MNIST to 90.6% test top-1 (seed 0; 4 epochs gave 89.6%), costing ~810 s of
    single-core CPU time (2,340 steps of 64 images).
    """

    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.1
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.25
    max_grad_norm: float | None = None
    seed: int = 0
    augment: bool = True
    crop_padding: int = 2
    hflip: bool = True
    label_smoothing: float = 0.0
    log_every: int = 100

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if not 0.0 < self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in (0, 1), got {self.warmup_fraction}")
        if self.max_grad_norm is not None and not (
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0
        ):
            raise ValueError(f"max_grad_norm must be None or > 0, got {self.max_grad_norm}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite float, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from :meth:`to_dict`'s output; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**values)


RESNET_RECIPE = TrainConfig(epochs=8)
""":class:`SmallResNet` on the ~30k classifier part: SGD + OneCycle, crop + flip, 8 epochs of
64 images (~3,740 steps, ~22 min on one busy core; the 5-epoch default reached 90.6%)."""

SHIFTED_RESNET_RECIPE = dataclasses.replace(RESNET_RECIPE, hflip=False)
""":data:`RESNET_RECIPE` for the shifted target; no flip, since mirroring a rotated image
rotates it the other way, out of the target domain."""

VIT_RECIPE = TrainConfig(
    epochs=15,
    batch_size=128,
    lr=2e-3,
    optimizer="adamw",
    weight_decay=0.05,
    warmup_fraction=0.1,
    max_grad_norm=1.0,
    label_smoothing=0.1,
)
""":func:`vit_fmnist` on the ~30k classifier part: AdamW + warm-up/cosine, crop + flip, label
smoothing 0.1, 15 epochs of 128 images (~3,510 steps, ~95 s per epoch on one core)."""


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place on a labelled image tensor and return it in eval mode.

    Deterministic for a given ``config.seed`` and initial model state on the same
    machine and thread count: ``torch.manual_seed(config.seed)`` is set on entry and a
    dedicated ``torch.Generator`` seeded with ``config.seed`` drives shuffling and
    augmentation. (Seed before constructing the model for reproducible initial weights.)

    Args:
        model: classifier mapping float [B, C, H, W] to logits [B, num_classes]; trained on
            the device of its parameters.
        images: normalized float [N, C, H, W] (e.g. ``normalize(to_float_images(x))``).
        labels: int [N] class labels in ``0..num_classes-1``.
        config: optimisation hyper-parameters.
        on_progress: optional callback ``(step, total_steps)`` called after every step.

    Returns:
        The same ``model`` object, in eval mode.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be a float tensor, got dtype {images.dtype}")
    _check_labels(images, labels)
    n = images.shape[0]

    torch.manual_seed(config.seed)
    shuffle_gen = torch.Generator().manual_seed(config.seed)
    device = _model_device(model)
    labels = labels.to(torch.int64)

    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    groups = _param_groups(model, config.weight_decay)
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))
    else:
        optimizer = torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0
        )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=total_steps,
        pct_start=config.warmup_fraction,
        cycle_momentum=config.optimizer == "sgd",
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    logger.info(
        "training %s on %d images: %d epochs x %d steps, batch %d, %s lr %g",
        type(model).__name__,
        n,
        config.epochs,
        steps_per_epoch,
        config.batch_size,
        config.optimizer,
        config.lr,
    )
    start = time.perf_counter()
    step = 0
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=shuffle_gen)
        loss_sum = 0.0
        correct = 0
        for first in range(0, n, config.batch_size):
            idx = order[first : first + config.batch_size]
            xb = images[idx]
            if config.augment:
                xb = _augment(xb, config.crop_padding, config.hflip, shuffle_gen)
            xb = xb.to(device, non_blocking=True)
            yb = labels[idx].to(device, non_blocking=True)

            logits = model(xb)
            loss = criterion(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()

            step += 1
            loss_value = float(loss.detach())
            loss_sum += loss_value * idx.numel()
            correct += int((logits.detach().argmax(1) == yb).sum())
            if step % config.log_every == 0:
                logger.debug("step %d/%d loss %.4f", step, total_steps, loss_value)
            if on_progress is not None:
                on_progress(step, total_steps)
        logger.info(
            "epoch %d/%d: loss %.4f, train acc %.2f%% (%.1fs)",
            epoch + 1,
            config.epochs,
            loss_sum / n,
            100.0 * correct / n,
            time.perf_counter() - start,
        )
    model.eval()
    return model


@torch.no_grad()
def evaluate_top1(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None
) -> float:
    """Top-1 accuracy in percent (0..100) of ``model`` on float images [N, C, H, W].

    ``labels`` is int [N]. The model is evaluated in eval mode; its previous train/eval
    mode is restored afterwards. ``batch_size`` defaults to 64 on the CPU, where small batches
    keep each layer's activations in cache (a quantized ResNet's 10k test images: 43 s against
    79 s at 512), and to 512 on an accelerator.
    """
    device = _model_device(model)
    if batch_size is None:
        batch_size = CPU_EVAL_BATCH if device.type == "cpu" else ACCELERATOR_EVAL_BATCH
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_labels(images, labels)
    n = images.shape[0]
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for first in range(0, n, batch_size):
            xb = images[first : first + batch_size].to(device)
            yb = labels[first : first + batch_size].to(device)
            correct += int((model(xb).argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / n


def small_resnet_fmnist(num_classes: int = NUM_CLASSES, in_chans: int = 1) -> SmallResNet:
    """The benchmark's BatchNorm CNN: :class:`SmallResNet` with widths (32, 64, 128).

    308,074 parameters for 10 classes. The model's ``pretrained_cfg`` records its
    preprocessing: ``(in_chans, 28, 28)`` inputs normalized with the Fashion-MNIST
    :data:`~genq_core.bench.fashion_mnist.MEAN` / :data:`~genq_core.bench.fashion_mnist.STD`.
    """
    model = SmallResNet(num_classes=num_classes, in_chans=in_chans)
    # timm's data config; nn.Module.__setattr__ is typed for tensors and modules only
    model.pretrained_cfg = _fmnist_pretrained_cfg(num_classes, in_chans)  # type: ignore[assignment]
    return model


def vit_fmnist(num_classes: int = NUM_CLASSES, in_chans: int = 1) -> VisionTransformer:
    """The benchmark's vision transformer without BatchNorm: a small DeiT-style timm ViT.

    ``timm.models.vision_transformer.VisionTransformer`` for 28x28 images: 4x4 patches (49
    patch tokens plus a class token), embedding 96, 5 pre-norm blocks of 4 heads (head width
    24), MLP ratio 2, LayerNorm only, classification from the class token. 381,610 parameters
    for 10 classes (~1.5 MB fp32). Its blocks are timm ``Block`` s, so GenQ's quantizer
    quantizes their attention and the patch-similarity filter reads them. Preprocessing as
    :func:`small_resnet_fmnist` (in ``pretrained_cfg``).

    Input: float [N, in_chans, 28, 28] normalized images. Output: logits [N, num_classes].
    """
    model = VisionTransformer(
        img_size=IMAGE_SIZE,
        patch_size=4,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=96,
        depth=5,
        num_heads=4,
        mlp_ratio=2.0,
        class_token=True,
        global_pool="token",
    )
    # timm's data config; nn.Module.__setattr__ is typed for tensors and modules only
    model.pretrained_cfg = _fmnist_pretrained_cfg(num_classes, in_chans)  # type: ignore[assignment]
    return model


def shift_images(images: torch.Tensor) -> torch.Tensor:
    """The data-scarce experiment's fixed domain shift: rotate, shrink, then invert intensity.

    Each image is rotated counter-clockwise by :data:`SHIFT_ROTATION_DEGREES` (30 degrees) about
    its centre and scaled by :data:`SHIFT_SCALE` (0.8) with bilinear resampling (pixels from
    outside the frame are 0, i.e. Fashion-MNIST's black background), and then inverted:
    ``x -> 1 - x``, giving dark garments on a white background. A pure function of the pixels:
    no randomness, the same output for the same input, each image independent of the batch.

    Used to train the shifted target classifier and to make the data-scarce experiment's
    k-shot and test images; the shifted images are then normalized like any others
    (:func:`genq_core.bench.fashion_mnist.normalize`).

    Args:
        images: float [N, C, H, W] pixels in [0, 1] (e.g. ``to_float_images(x)``), H == W.

    Returns:
        float [N, C, H, W] shifted pixels in [0, 1], same dtype and device.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be float pixels in [0, 1], got dtype {images.dtype}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square, got {images.shape[-2]}x{images.shape[-1]}")
    if images.shape[0] == 0:
        return images.clone()
    # affine_grid maps output coordinates (x right, y down, in [-1, 1]) to input coordinates:
    # the inverse of "rotate counter-clockwise by the angle, then scale"
    angle = math.radians(SHIFT_ROTATION_DEGREES)
    cos, sin = math.cos(angle), math.sin(angle)
    inverse = torch.tensor(
        [[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype, device=images.device
    )
    theta = (inverse / SHIFT_SCALE).expand(images.shape[0], 2, 3)
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    warped = nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return (1.0 - warped).clamp_(0.0, 1.0)


def darken_images(images: torch.Tensor) -> torch.Tensor:
    """The ``dark`` domain: ``x -> x ** DARKEN_GAMMA`` on [0, 1] pixels.

    Background (0) and full white (1) stay; mid tones darken: the mean garment intensity
    (:func:`genq_core.bench.fashion_mnist.garment_intensity`) of the generator part's images
    drops from 0.62 to 0.51 (``benchmarks/fashion/generator_looks.py``). A look inside the
    training data's range, which a generator whose captions describe brightness can be steered
    to. Pure, batch-independent, same dtype and device.

    Args:
        images: float [N, C, H, W] pixels in [0, 1].

    Returns:
        float [N, C, H, W] darkened pixels in [0, 1].
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be float pixels in [0, 1], got dtype {images.dtype}")
    return images.clamp(0.0, 1.0) ** DARKEN_GAMMA


DOMAINS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "original": None,
    "shifted": shift_images,
    "dark": darken_images,
}
"""The benchmark's image domains: the name a classifier's manifest entry records, and the
fixed transform of [0, 1] pixels that makes its images (``None``: the images as they are)."""


def to_domain(images: torch.Tensor, domain: str) -> torch.Tensor:
    """``images`` ([N, C, H, W] pixels in [0, 1]) in ``domain``, a key of :data:`DOMAINS`."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    transform = DOMAINS[domain]
    return images if transform is None else transform(images)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights (ndim > 1) only, not on biases, norm parameters or
    the parameters named by the model's ``no_weight_decay()`` (timm's convention)."""
    no_weight_decay = getattr(model, "no_weight_decay", None)
    exempt = set(no_weight_decay()) if callable(no_weight_decay) else set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim > 1 and name not in exempt:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _augment(
    x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop with ``padding`` px zero padding and (``hflip``) random horizontal flip.

    ``x`` is float [B, C, H, W]; returns a new tensor of the same shape. Randomness comes
    only from ``generator`` (CPU).
    """
    b, _, h, w = x.shape
    if padding > 0:
        padded = nn.functional.pad(x, (padding, padding, padding, padding))
        span = 2 * padding + 1
        dy = torch.randint(0, span, (b,), generator=generator)
        dx = torch.randint(0, span, (b,), generator=generator)
        rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w)
        batch = torch.arange(b).view(b, 1, 1, 1)
        chans = torch.arange(x.shape[1]).view(1, -1, 1, 1)
        x = padded[batch, chans, rows, cols]
    if not hflip:
        return x
    flip = torch.rand(b, generator=generator) < 0.5
    if bool(flip.any()):
        x = x.clone()
        x[flip] = x[flip].flip(-1)
    return x


def _check_labels(images: torch.Tensor, labels: torch.Tensor) -> None:
    """``labels`` must be ``[N]`` for ``N = len(images) > 0``."""
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is empty")


def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free model)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _fmnist_pretrained_cfg(num_classes: int, in_chans: int) -> dict[str, Any]:
    """timm data config of a Fashion-MNIST model (read by ``timm.data.resolve_data_config``)."""
    return {
        "input_size": (in_chans, IMAGE_SIZE, IMAGE_SIZE),
        "mean": MEAN * in_chans,
        "std": STD * in_chans,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "num_classes": num_classes,
    }


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "small_resnet_fmnist": small_resnet_fmnist,
    "vit_fmnist": vit_fmnist,
}
"""The benchmark's model builders by name; ``genq_core.bench.classifiers:<name>`` is the
builder path :func:`genq_core.classifier.load` takes (called with ``num_classes``, ``in_chans``)."""
