"""The benchmark's generator: a small but genuine Stable Diffusion trained on Fashion-MNIST.

Nothing here downloads anything. The components are the ones a production Stable Diffusion 1.x
checkpoint has, only small: an ``AutoencoderKL`` (32x32 RGB -> 4x8x8 latents), a
``UNet2DConditionModel`` on those latents, a ``CLIPTextModel`` over CLIP's real 49,408-token
vocabulary (:func:`genq_core.generate.tiny.clip_tokenizer`), and DDIM. They are trained here in two
stages, only on the generator part of the fixed training split (:class:`GeneratorData` refuses any
other image), with captions built from the class names and the same prompt templates that
:func:`genq_core.generate.prompts.build_specs` draws from, so generation prompts match training
captions:

1. :func:`train_vae` trains the autoencoder (L1 reconstruction plus a small KL term) and measures
   the latent scaling factor, which goes into the VAE's config as in Stable Diffusion.
2. :func:`train_unet_and_text_encoder` trains the UNet and the text encoder together, from scratch
   or from a saved pipeline's weights, with the VAE frozen (epsilon prediction, 10% empty
   captions for classifier-free guidance).

By default the captions' adjectives are drawn at random, so the text carries the class and nothing
else. With ``GeneratorTrainConfig.look_words`` each image's adjective describes how it looks (its
brightness within its class), as the captions of a production Stable Diffusion describe styles:
that gives prompt words, and textual inversion's learned tokens, a direction to steer the look.

Each stage runs to a step count or a wall-clock budget, whichever comes first, appends its loss to a
CSV file and checkpoints periodically, so a killed run continues where it stopped: every random
draw of a step (batch, noise, timesteps, captions) depends only on ``(seed, stage, step)``.
:func:`measure_agreement` is the quality bar: the fraction of generated images that a classifier
assigns to the prompted class.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

# Imported from their modules: mypy reads diffusers' top-level names as dummy classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from genq_core.bench.fashion_mnist import (
    CLASS_NAMES,
    TrainSplit,
    garment_intensity,
    load_split,
    normalize,
    split_train_indices,
)
from genq_core.configio import from_dict, to_dict
from genq_core.generate.prompts import (
    DEFAULT_ADJECTIVES,
    DEFAULT_TEMPLATES,
    build_specs,
    check_templates,
)
from genq_core.generate.tiny import CLIP_VOCAB_SIZE, clip_tokenizer
from genq_core.generate.tiny import assemble_pipeline as assemble_components
from genq_core.progress import Canceled, ProgressFn, StopFn

__all__ = [
    "Agreement",
    "GeneratorData",
    "GeneratorTrainConfig",
    "GeneratorTrainingCanceled",
    "StageResult",
    "assemble_pipeline",
    "build_scheduler",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "image_looks",
    "load_generator_data",
    "measure_agreement",
    "prepare_images",
    "to_classifier_input",
    "train_unet_and_text_encoder",
    "train_vae",
    "training_captions",
]

logger = logging.getLogger(__name__)

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)

VAE_STAGE = "train_vae"
UNET_STAGE = "train_unet"

# Stable Diffusion 1.x's noise schedule, shared by training (DDPM) and sampling (DDIM).
_NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
}
_SOURCE_SIZE = 28  # Fashion-MNIST images are 28x28
_SCALING_SAMPLES = 4096  # images whose latents set the VAE's scaling factor
_ENCODE_BATCH = 256
# Fields that only decide how long a stage runs or how often it reports: a resumed run may change
# them; any other field changed since the checkpoint was written is an error.
_BUDGET_FIELDS = frozenset(
    {
        "vae_steps",
        "vae_minutes",
        "unet_steps",
        "unet_minutes",
        "checkpoint_every",
        "log_every",
    }
)


class GeneratorTrainingCanceled(Canceled):
    """``should_stop()`` returned True; a checkpoint was written, so a rerun resumes there."""


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Sizes, optimisation settings and budgets of the generator's two training stages.

    The defaults are the benchmark's generator: 15.6M parameters (VAE 2.7M, UNet 5.8M, text
    encoder 7.1M, of which 6.3M are the 49,408-row token embedding), 66 MB saved in fp32. The step
    counts are the recipe (on 2 idle CPU cores roughly 1 s per step of either stage); the
    ``*_minutes`` budgets only cap them. Tests shrink the ``*_channels`` and ``text_*`` sizes.

    Attributes:
        seed: seeds the initial weights and every random draw of training.
        split_seed: seed of :func:`genq_core.bench.fashion_mnist.split_train_indices`; the
            benchmark's fixed split uses 0.
        pad: pixels of background added on each side of the 28x28 images (the pipeline's images
            are ``28 + 2 * pad`` pixels square; a multiple of the VAE's downsampling factor).
        vae_channels: ``AutoencoderKL.block_out_channels``; the latents are
            ``image_size / 2 ** (len(vae_channels) - 1)`` pixels square.
        vae_layers_per_block: ResNet layers per VAE block.
        latent_channels: channels of the latents.
        norm_num_groups: GroupNorm groups of the VAE and the UNet; divides every channel count.
        vae_batch_size: images per VAE step.
        vae_lr: peak AdamW learning rate of the VAE.
        vae_kl_weight: weight of the KL term against the per-image sum of absolute errors, as in
            the latent diffusion paper (1e-6): it keeps the latents bounded, not Gaussian.
        vae_steps: VAE steps (the stage ends there, and so does its learning-rate cosine).
        vae_minutes: wall-clock budget of the VAE stage in minutes (training time over all
            resumed runs); ``None`` for none.
        text_hidden_size: width of the text encoder (and the UNet's cross-attention).
        text_layers: transformer layers of the text encoder.
        text_heads: attention heads of the text encoder.
        max_length: tokens per prompt, start and end tokens included (also the text encoder's
            position embeddings); every training caption must fit.
        unet_channels: ``UNet2DConditionModel.block_out_channels``: a plain block, then
            cross-attention blocks.
        unet_layers_per_block: ResNet layers per UNet block.
        unet_attention_heads: attention heads of the UNet's transformer blocks.
        unet_batch_size: images per UNet step.
        unet_lr: peak AdamW learning rate of the UNet and the text encoder.
        unet_steps: UNet steps (as ``vae_steps``).
        unet_minutes: wall-clock budget of the UNet stage in minutes; ``None`` for none.
        caption_dropout: probability that an image is trained with the empty caption, which
            classifier-free guidance uses as the unconditional prompt.
        templates: caption templates with ``{cls}`` and optionally ``{adjective}`` (the
            generation prompts' templates, :data:`genq_core.generate.prompts.DEFAULT_TEMPLATES`).
        adjectives: words for ``{adjective}``.
        look_words: words that describe each image's look, darkest first (``""``: no word).
            With n words, each class's images are split into n equal parts by garment
            intensity (:func:`image_looks`), and an image's captions put its part's word in
            ``{adjective}``: ``("dark", "", "bright")`` captions the darkest third "a photo of
            a dark coat". Empty (the default): ``{adjective}`` is drawn from ``adjectives``,
            independently of the image.
        warmup_steps: linear learning-rate warm-up of each stage.
        final_lr_fraction: after the warm-up the learning rate follows a cosine from its peak
            down to this fraction of it at ``vae_steps`` / ``unet_steps`` (1.0: constant). A
            stage cut short by its minutes stops before the end of its cosine.
        grad_clip: gradient-norm clipping of each step.
        ema_power: the UNet and the text encoder keep an exponential moving average of their
            weights with decay ``1 - (1 + step) ** -ema_power`` (at most ``ema_max_decay``);
            the average is what gets saved. ``None`` saves the raw weights.
        ema_max_decay: upper bound of the EMA decay.
        checkpoint_every: steps between checkpoints (one is also written when a stage ends).
        log_every: steps between lines of the loss file (each line is the mean over them).
    """

    seed: int = 0
    split_seed: int = 0
    pad: int = 2
    vae_channels: tuple[int, ...] = (32, 64, 128)
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_steps: int = 1000
    vae_minutes: float | None = None
    text_hidden_size: int = 128
    text_layers: int = 4
    text_heads: int = 4
    max_length: int = 16
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 2
    unet_attention_heads: int = 4
    unet_batch_size: int = 128
    unet_lr: float = 5e-4
    unet_steps: int = 2500
    unet_minutes: float | None = None
    caption_dropout: float = 0.1
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    adjectives: tuple[str, ...] = DEFAULT_ADJECTIVES
    look_words: tuple[str, ...] = ()
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    ema_power: float | None = 2 / 3
    ema_max_decay: float = 0.9999
    checkpoint_every: int = 100
    log_every: int = 25

    def __post_init__(self) -> None:
        positive_ints = (
            "vae_layers_per_block",
            "latent_channels",
            "norm_num_groups",
            "vae_batch_size",
            "vae_steps",
            "text_hidden_size",
            "text_layers",
            "text_heads",
            "unet_layers_per_block",
            "unet_attention_heads",
            "unet_batch_size",
            "unet_steps",
            "checkpoint_every",
            "log_every",
        )
        for name in positive_ints:
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, value, "must be an integer >= 1")
        for name in ("seed", "split_seed", "pad", "warmup_steps"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 0, name, value, "must be an integer >= 0")
        for name in ("vae_channels", "unet_channels"):
            value = getattr(self, name)
            _check(
                isinstance(value, tuple)
                and len(value) >= 2
                and all(_is_int(c) and c >= 1 and c % self.norm_num_groups == 0 for c in value),
                name,
                value,
                f"must be a tuple of >= 2 channel counts divisible by norm_num_groups="
                f"{self.norm_num_groups}",
            )
        factor = 2 ** (len(self.vae_channels) - 1)
        _check(
            self.image_size % factor == 0,
            "pad",
            self.pad,
            f"must make the image side (28 + 2 * pad = {self.image_size}) a multiple of the "
            f"VAE's downsampling factor {factor}",
        )
        _check(
            self.text_hidden_size % self.text_heads == 0,
            "text_heads",
            self.text_heads,
            f"must divide text_hidden_size={self.text_hidden_size}",
        )
        _check(
            all(c % self.unet_attention_heads == 0 for c in self.unet_channels),
            "unet_attention_heads",
            self.unet_attention_heads,
            f"must divide every UNet channel count {self.unet_channels}",
        )
        _check(
            _is_int(self.max_length) and self.max_length >= 3,
            "max_length",
            self.max_length,
            "must be an integer >= 3",
        )
        for name in ("vae_lr", "unet_lr", "grad_clip"):
            value = getattr(self, name)
            _check(_is_number(value) and 0 < value < math.inf, name, value, "must be > 0")
        _check(
            _is_number(self.vae_kl_weight) and 0 <= self.vae_kl_weight < math.inf,
            "vae_kl_weight",
            self.vae_kl_weight,
            "must be >= 0",
        )
        for name in ("vae_minutes", "unet_minutes"):
            value = getattr(self, name)
            _check(
                value is None or (_is_number(value) and 0 < value < math.inf),
                name,
                value,
                "must be > 0 or None",
            )
        _check(
            _is_number(self.final_lr_fraction) and 0 <= self.final_lr_fraction <= 1,
            "final_lr_fraction",
            self.final_lr_fraction,
            "must be in [0, 1]",
        )
        _check(
            _is_number(self.caption_dropout) and 0 <= self.caption_dropout < 1,
            "caption_dropout",
            self.caption_dropout,
            "must be in [0, 1)",
        )
        _check(
            self.ema_power is None or (_is_number(self.ema_power) and 0 < self.ema_power <= 1),
            "ema_power",
            self.ema_power,
            "must be in (0, 1] or None",
        )
        _check(
            _is_number(self.ema_max_decay) and 0 <= self.ema_max_decay < 1,
            "ema_max_decay",
            self.ema_max_decay,
            "must be in [0, 1)",
        )
        for name in ("templates", "adjectives", "look_words"):
            value = getattr(self, name)
            _check(
                isinstance(value, tuple) and all(isinstance(v, str) for v in value),
                name,
                value,
                "must be a tuple of strings",
            )
        _check(
            len(self.look_words) != 1
            and len(set(self.look_words)) == len(self.look_words)
            and any(self.look_words) == bool(self.look_words)
            and all("{" not in w and "}" not in w for w in self.look_words),
            "look_words",
            self.look_words,
            "must be empty or >= 2 distinct words (one may be empty) without braces",
        )
        _check(
            not self.look_words or any("{adjective}" in t for t in self.templates),
            "look_words",
            self.look_words,
            "need a template with {adjective} to put them in",
        )
        check_templates(self.templates, self.adjectives)
        _check(
            not any("{token}" in t for t in self.templates),
            "templates",
            self.templates,
            "must not use {token}: the generator is trained on class names only",
        )

    @property
    def image_size(self) -> int:
        """Side of the pipeline's square images in pixels (32 by default)."""
        return _SOURCE_SIZE + 2 * self.pad

    @property
    def latent_size(self) -> int:
        """Side of the square latents (8 by default)."""
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; :meth:`from_dict` is the inverse."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorTrainConfig:
        """Build a config from :meth:`to_dict`'s output (lists accepted for tuples)."""
        return from_dict(cls, data)


@dataclass(frozen=True)
class GeneratorData:
    """The generator's training images: only ever the generator part of the fixed split.

    Validated on construction: every index lies in ``split.generator`` and in no other part, so
    the classifier's images, the k-shot pool and the test set (never in the split) cannot reach
    the generator through this type.

    Attributes:
        images: uint8 ``[N, 28, 28]`` in 0..255.
        labels: int64 ``[N]`` class labels in ``0..9``.
        indices: int64 ``[N]`` positions of the images in the 60k training set.
        split: the split the indices come from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    split: TrainSplit = field(repr=False)

    def __post_init__(self) -> None:
        n = self.indices.shape[0] if self.indices.ndim == 1 else -1
        if n < 1:
            raise ValueError(f"indices must be a non-empty 1-D tensor, got {self.indices.shape}")
        if self.images.dtype != torch.uint8 or tuple(self.images.shape) != (n, 28, 28):
            raise ValueError(
                f"images must be uint8 [{n}, 28, 28], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if tuple(self.labels.shape) != (n,) or self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 [{n}], got {self.labels.dtype}")
        if not bool(torch.isin(self.indices, self.split.generator).all()):
            raise ValueError("indices: the generator may only see the split's generator part")
        others = torch.cat([self.split.classifier, self.split.kshot])
        if bool(torch.isin(self.indices, others).any()):
            raise ValueError("indices: images of the classifier part or the k-shot pool")
        if torch.unique(self.indices).numel() != n:
            raise ValueError("indices: duplicate images")

    def subset(self, per_class: int) -> GeneratorData:
        """The first ``per_class`` images of each class (for smoke runs and tests)."""
        if not _is_int(per_class) or per_class < 1:
            raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
        keep = (
            torch.cat(
                [
                    torch.nonzero(self.labels == c).flatten()[:per_class]
                    for c in self.labels.unique()
                ]
            )
            .sort()
            .values
        )
        return GeneratorData(
            self.images[keep], self.labels[keep], self.indices[keep], split=self.split
        )


@dataclass(frozen=True)
class StageResult:
    """How a training stage ended.

    Attributes:
        steps: steps done in all, over resumed runs.
        seconds: training time in all, over resumed runs (checkpoint writes included).
        loss: mean loss of the last logged interval (``nan`` if no step was logged).
        stopped_by: ``"steps"`` or ``"minutes"``: which budget ended the stage.
    """

    steps: int
    seconds: float
    loss: float
    stopped_by: str


@dataclass(frozen=True)
class Agreement:
    """How often a classifier assigns generated images to the prompted class.

    Attributes:
        overall: fraction in ``[0, 1]`` over all images.
        per_class: class name -> fraction, in class order.
        confusion: ``[C][C]`` counts, row = prompted class, column = predicted class.
        images: uint8 ``[N, H, W]`` grayscale generated images, class by class (``N = C * n``),
            exactly as the classifier saw them before its centre crop.
        labels: int64 ``[N]`` prompted classes; ``predictions``: int64 ``[N]`` predicted ones.
        prompts: the prompt of each image.
        seconds: generation and classification time.
    """

    overall: float
    per_class: dict[str, float]
    confusion: list[list[int]]
    images: torch.Tensor
    labels: torch.Tensor
    predictions: torch.Tensor
    prompts: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-ready (no images)."""
        return {
            "overall": self.overall,
            "per_class": dict(self.per_class),
            "confusion": [list(row) for row in self.confusion],
            "num_images": int(self.labels.numel()),
            "seconds": self.seconds,
        }


def load_generator_data(
    root: Path | None = None, split_seed: int = 0, per_class: int | None = None
) -> GeneratorData:
    """The generator part of the fixed split of the 60k Fashion-MNIST training images.

    Args:
        root: directory of the IDX files (see :func:`genq_core.bench.fashion_mnist.load_split`).
        split_seed: seed of :func:`~genq_core.bench.fashion_mnist.split_train_indices`.
        per_class: keep only the first this many images of each class (``None``: all).
    """
    images, labels = load_split("train", root)
    split = split_train_indices(labels, seed=split_seed)
    indices = split.generator
    data = GeneratorData(images[indices], labels[indices], indices, split=split)
    logger.info(
        "generator part of the split: %d of %d training images (seed %d)",
        indices.numel(),
        labels.numel(),
        split_seed,
    )
    return data if per_class is None else data.subset(per_class)


def training_captions(
    class_name: str, config: GeneratorTrainConfig, look: str | None = None
) -> list[str]:
    """Every caption of ``class_name``, whitespace-normalised.

    Without ``look``: each template with each adjective, without repeats. These are the prompts
    :func:`genq_core.generate.prompts.build_specs` draws from with the same templates and
    adjectives, so generation asks for exactly what training showed. With ``look`` (one of
    ``config.look_words``): one caption per template, ``look`` in its ``{adjective}``.
    """
    if look is not None:
        if look not in config.look_words:
            raise ValueError(f"look must be one of {config.look_words}, got {look!r}")
        return [
            " ".join(template.format(cls=class_name, adjective=look).split())
            for template in config.templates
        ]
    captions: list[str] = []
    for template in config.templates:
        words = config.adjectives if "{adjective}" in template else ("",)
        for adjective in words:
            caption = " ".join(template.format(cls=class_name, adjective=adjective).split())
            if caption not in captions:
                captions.append(caption)
    return captions


def image_looks(images: torch.Tensor, labels: torch.Tensor, num_looks: int) -> torch.Tensor:
    """Each image's look: its garment-intensity part within its class, 0 the darkest.

    Args:
        images: uint8 ``[N, 28, 28]``.
        labels: int64 ``[N]``.
        num_looks: parts per class (``len(config.look_words)``).

    Returns:
        int64 ``[N]`` in ``0..num_looks - 1``; within a class the parts differ in size by at
        most one image, ties broken by position.
    """
    if not _is_int(num_looks) or num_looks < 1:
        raise ValueError(f"num_looks must be an integer >= 1, got {num_looks!r}")
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"images must be [N, H, W] with labels [N], got {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    intensity = garment_intensity(images.unsqueeze(1).float() / 255)
    looks = torch.empty_like(labels)
    for cls in labels.unique():
        members = torch.nonzero(labels == cls).flatten()
        rank = torch.sort(intensity[members], stable=True).indices.argsort()
        looks[members] = rank * num_looks // members.numel()
    return looks


def prepare_images(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Fashion-MNIST images as the VAE sees them.

    Args:
        images: uint8 ``[N, 28, 28]`` in 0..255.
        pad: pixels of background (0) added on each side.

    Returns:
        float32 ``[N, 3, 28 + 2 * pad, 28 + 2 * pad]`` in ``[-1, 1]``, the gray value repeated on
        the three channels.
    """
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 [N, H, W], got {images.dtype} {images.shape}")
    x = images.to(torch.float32).div(127.5).sub(1.0)
    x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def to_classifier_input(pixels: torch.Tensor, pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated images as the Fashion-MNIST classifiers see them.

    The images are quantised to 8 bits and turned to grayscale with PIL's weights, as a PNG
    converted to ``"L"`` is, then centre-cropped by ``pad`` pixels on each side and normalised
    with :func:`genq_core.bench.fashion_mnist.normalize`.

    Args:
        pixels: float ``[N, 3, H, W]`` in ``[0, 1]`` (a pipeline's ``output_type="pt"``).
        pad: pixels cropped from each side (the padding :func:`prepare_images` added).

    Returns:
        ``(inputs, gray)``: normalised float ``[N, 1, H - 2 pad, W - 2 pad]`` and the uint8
        ``[N, H, W]`` grayscale images before the crop.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [N, 3, H, W], got {tuple(pixels.shape)}")
    rgb = (pixels.detach().float().cpu().clamp(0, 1) * 255).round()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    gray = (rgb * luma).sum(1).round().clamp(0, 255).to(torch.uint8)
    height, width = gray.shape[1:]
    if height <= 2 * pad or width <= 2 * pad:
        raise ValueError(f"images of {height}x{width} are too small to crop {pad} px per side")
    cropped = gray[:, pad : height - pad, pad : width - pad]
    return normalize(cropped.unsqueeze(1).float() / 255.0), gray


def build_tokenizer(config: GeneratorTrainConfig) -> CLIPTokenizer:
    """CLIP's real tokenizer, padding and truncating to ``config.max_length`` tokens."""
    return clip_tokenizer(model_max_length=config.max_length)


def build_vae(config: GeneratorTrainConfig) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` (from the global RNG), scaling factor 1."""
    blocks = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=config.vae_channels,
        layers_per_block=config.vae_layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.image_size,
        scaling_factor=1.0,
    )


def build_unet(config: GeneratorTrainConfig) -> UNet2DConditionModel:
    """A randomly initialised UNet: a plain first block, cross-attention in the others."""
    blocks = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (blocks - 1) + ("UpBlock2D",),
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=config.text_hidden_size,
        # diffusers' historical name: this is the number of heads, not their width
        attention_head_dim=config.unet_attention_heads,
    )


def build_text_encoder(config: GeneratorTrainConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A randomly initialised ``CLIPTextModel`` over the full CLIP vocabulary."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=config.text_hidden_size,
            intermediate_size=4 * config.text_hidden_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.x's noise schedule and ``steps_offset=1``."""
    return DDIMScheduler(**_NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` of the components in eval mode, no safety checker."""
    return assemble_components(vae, text_encoder, tokenizer, unet, build_scheduler())


def train_vae(
    data: GeneratorData,
    config: GeneratorTrainConfig,
    work_dir: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> tuple[AutoencoderKL, StageResult]:
    """Stage 1: train the autoencoder, then measure its latent scaling factor.

    Steps run until ``config.vae_steps`` or ``config.vae_minutes``, whichever comes first. Every
    ``config.checkpoint_every`` steps (and at the end) ``work_dir/vae_checkpoint.pt`` is written;
    ``work_dir/vae_loss.csv`` gets a line (step, loss, reconstruction, kl, seconds) every
    ``config.log_every`` steps.

    Args:
        data: the generator part of the split.
        config: sizes, optimisation settings and budgets.
        work_dir: checkpoints and loss files; created if missing.
        resume: continue from the checkpoint in ``work_dir`` if there is one (budgets may have
            changed since, nothing else); otherwise start afresh and replace it.
        device: where training runs.
        on_progress: called as ``on_progress("train_vae", step, config.vae_steps)`` after each
            step.
        should_stop: polled before each step; True writes a checkpoint and raises
            :class:`GeneratorTrainingCanceled`.

    Returns:
        The VAE in eval mode on ``device``, ``vae.config.scaling_factor`` set to ``1 / std`` of
        its sampled latents, and how the stage ended.

    The global RNG is seeded with ``config.seed`` for the initial weights; every later draw comes
    from generators seeded by ``(config.seed, stage, step)``.
    """
    # 1. check inputs, the model, its optimiser and the checkpoint to resume from
    if not isinstance(config, GeneratorTrainConfig):
        raise ValueError(f"config must be a GeneratorTrainConfig, got {type(config).__name__}")
    _check_data(data, config.vae_batch_size, "vae_batch_size")
    target = torch.device(device)
    run = _StageFiles(Path(work_dir), "vae")
    torch.manual_seed(config.seed)
    vae = _moved(build_vae(config), target)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    state = run.start(config, resume, {"model": vae, "optimizer": optimizer})
    budget = _Budget(config.vae_steps, config.vae_minutes, state.step, state.seconds)

    # 2. train
    pixels_per_image = 3 * config.image_size**2
    log = _LossLog(run.loss_file, ("loss", "reconstruction", "kl"), config.log_every)
    vae.train()
    while not budget.done():
        if should_stop is not None and should_stop():
            run.save(config, budget, {"model": vae, "optimizer": optimizer})
            log.close()
            raise GeneratorTrainingCanceled(f"canceled VAE training at step {budget.step}")
        generator = _step_generator(config.seed, VAE_STAGE, budget.step)
        batch = _batch_indices(data, config.vae_batch_size, config.seed, VAE_STAGE, budget.step)
        x = prepare_images(data.images[batch], config.pad).to(target)
        _set_lr(optimizer, config.vae_lr, budget.step, config.vae_steps, config)

        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator).to(target)
        reconstruction = vae.decode(posterior.mean + posterior.std * eps).sample
        rec = F.l1_loss(reconstruction, x)
        kl = posterior.kl().mean()
        loss = rec + config.vae_kl_weight * kl / pixels_per_image
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        optimizer.step()

        budget.advance()
        log.add(budget.step, budget.seconds, loss.item(), rec.item(), kl.item())
        if budget.step % config.checkpoint_every == 0:
            run.save(config, budget, {"model": vae, "optimizer": optimizer})
        if on_progress is not None:
            on_progress(VAE_STAGE, budget.step, config.vae_steps)
    if budget.step % config.checkpoint_every:
        run.save(config, budget, {"model": vae, "optimizer": optimizer})
    log.close()
    result = budget.result(log.last_mean)

    # 3. the scaling factor that gives the latents unit variance, kept in the VAE's config
    vae.eval()
    scaling = _measure_scaling_factor(vae, data, config, target)
    vae.register_to_config(scaling_factor=scaling)
    logger.info(
        "VAE: %d steps in %.0f s (stopped by %s), loss %.4f, scaling factor %.4f",
        result.steps,
        result.seconds,
        result.stopped_by,
        result.loss,
        scaling,
    )
    return vae, result


def train_unet_and_text_encoder(
    vae: AutoencoderKL,
    data: GeneratorData,
    config: GeneratorTrainConfig,
    work_dir: str | Path,
    *,
    resume: bool = False,
    init: StableDiffusionPipeline | None = None,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> tuple[StableDiffusionPipeline, StageResult]:
    """Stage 2: train the UNet and the text encoder on the frozen VAE's latents.

    Latents are ``vae.config.scaling_factor`` times a sample of the VAE's posterior (its moments
    are computed once for all images); the loss is the MSE of the predicted noise at uniformly
    drawn timesteps of Stable Diffusion's schedule. Each image gets one of its class's
    :func:`training_captions` (of its look, with ``config.look_words``), or with probability
    ``config.caption_dropout`` the empty caption.
    Budgets, checkpoints (``work_dir/unet_checkpoint.pt``) and the loss file
    (``work_dir/unet_loss.csv``) work as in :func:`train_vae`.

    Args:
        vae: the trained VAE (from :func:`train_vae`). It is moved to ``device``, put in eval
            mode and frozen (``requires_grad_(False)``), and becomes the pipeline's VAE.
        data: the generator part of the split.
        config: sizes, optimisation settings and budgets.
        work_dir: checkpoints and loss files.
        resume: continue from the checkpoint in ``work_dir`` if there is one; it must have been
            trained on latents of the same VAE weights, from the same initial weights.
        init: start from this pipeline's UNet and text encoder (a fine-tune, e.g. of a saved
            generator with new captions) instead of from scratch; their sizes must be the
            config's. ``None``: from scratch.
        device: where training runs.
        on_progress: called as ``on_progress("train_unet", step, config.unet_steps)``.
        should_stop: polled before each step (see :func:`train_vae`).

    Returns:
        The pipeline in eval mode on ``device`` (EMA weights unless ``config.ema_power`` is
        None), ready for ``save_pretrained``, and how the stage ended.
    """
    # 1. check inputs; the tokenizer and every caption as token ids
    if not isinstance(config, GeneratorTrainConfig):
        raise ValueError(f"config must be a GeneratorTrainConfig, got {type(config).__name__}")
    _check_data(data, config.unet_batch_size, "unet_batch_size")
    _check_vae(vae, config)
    target = torch.device(device)
    tokenizer = build_tokenizer(config)
    caption_ids, empty_ids = _caption_ids(tokenizer, config)

    # 2. the models, their optimiser and EMA, the checkpoint to resume from
    torch.manual_seed(config.seed + 1)
    unet = _moved(build_unet(config), target)
    text_encoder = _moved(build_text_encoder(config, tokenizer), target)
    if init is not None:
        _load_initial_weights(unet, text_encoder, init)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=0.0)
    ema = _Ema(parameters, config.ema_power, config.ema_max_decay)
    vae = _moved(vae, target).eval().requires_grad_(False)
    digests = {"vae_digest": _state_digest(vae)}
    if init is not None:
        digests["init_digest"] = _state_digest(unet) + _state_digest(text_encoder)
    state_objects: dict[str, Any] = {
        "unet": unet,
        "text_encoder": text_encoder,
        "optimizer": optimizer,
        "ema": ema,
    }
    run = _StageFiles(Path(work_dir), "unet")
    state = run.start(config, resume, state_objects, extra=digests)

    # 3. the VAE posterior of every image, once; each image's caption row (class, look)
    started = time.perf_counter()
    num_looks = max(1, len(config.look_words))
    looks = image_looks(data.images, data.labels, num_looks) if config.look_words else None
    rows = data.labels * num_looks + (looks if looks is not None else 0)
    latent_mean, latent_std = _encode_moments(vae, data, config, target)
    scaling = float(vae.config["scaling_factor"])
    noise_scheduler = DDPMScheduler(**_NOISE_SCHEDULE)
    logger.info("encoded %d images in %.0f s", len(data.labels), time.perf_counter() - started)
    budget = _Budget(config.unet_steps, config.unet_minutes, state.step, state.seconds)

    # 4. train
    rows = rows.to(target)
    caption_ids, empty_ids = caption_ids.to(target), empty_ids.to(target)
    log = _LossLog(run.loss_file, ("loss",), config.log_every)
    unet.train()
    text_encoder.train()
    while not budget.done():
        if should_stop is not None and should_stop():
            run.save(config, budget, state_objects, extra=digests)
            log.close()
            raise GeneratorTrainingCanceled(f"canceled UNet training at step {budget.step}")
        generator = _step_generator(config.seed, UNET_STAGE, budget.step)
        batch = _batch_indices(data, config.unet_batch_size, config.seed, UNET_STAGE, budget.step)
        n = batch.numel()
        batch = batch.to(target)
        _set_lr(optimizer, config.unet_lr, budget.step, config.unet_steps, config)

        eps = torch.randn(latent_mean[batch].shape, generator=generator).to(target)
        latents = (latent_mean[batch] + latent_std[batch] * eps) * scaling
        noise = torch.randn(latents.shape, generator=generator).to(target)
        timesteps = torch.randint(
            int(noise_scheduler.config.num_train_timesteps), (n,), generator=generator
        ).to(target)
        choice = torch.randint(caption_ids.shape[1], (n,), generator=generator).to(target)
        dropped = (torch.rand(n, generator=generator) < config.caption_dropout).to(target)
        input_ids = torch.where(
            dropped.unsqueeze(1), empty_ids.unsqueeze(0), caption_ids[rows[batch], choice]
        )

        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(input_ids)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        ema.update(parameters, budget.step)

        budget.advance()
        log.add(budget.step, budget.seconds, loss.item())
        if budget.step % config.checkpoint_every == 0:
            run.save(config, budget, state_objects, extra=digests)
        if on_progress is not None:
            on_progress(UNET_STAGE, budget.step, config.unet_steps)
    if budget.step % config.checkpoint_every:
        run.save(config, budget, state_objects, extra=digests)
    log.close()

    # 5. the pipeline, with the averaged weights
    ema.copy_to(parameters)
    result = budget.result(log.last_mean)
    logger.info(
        "UNet + text encoder: %d steps in %.0f s (stopped by %s), loss %.4f",
        result.steps,
        result.seconds,
        result.stopped_by,
        result.loss,
    )
    return assemble_pipeline(vae, text_encoder, tokenizer, unet), result


@torch.no_grad()
def measure_agreement(
    pipe: StableDiffusionPipeline,
    classifier: nn.Module,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    num_per_class: int = 50,
    guidance_scale: float = 5.0,
    steps: int = 25,
    seed: int = 0,
    templates: tuple[str, ...] = DEFAULT_TEMPLATES,
    adjectives: tuple[str, ...] = DEFAULT_ADJECTIVES,
    pad: int = 2,
    batch_size: int = 50,
    on_progress: ProgressFn | None = None,
) -> Agreement:
    """Generate ``num_per_class`` images per class and classify them.

    Prompts and per-image seeds come from :func:`genq_core.generate.prompts.build_specs`, so the
    images are those the benchmark's generation stage makes with the same settings. The pipeline
    samples with its own scheduler; images go through :func:`to_classifier_input`.

    Args:
        pipe: a Stable Diffusion pipeline making ``28 + 2 * pad`` pixel images.
        classifier: maps normalised ``[N, 1, 28, 28]`` images to ``[N, C]`` logits; evaluated
            in eval mode on the device of its parameters (its mode is restored afterwards).
        class_names: label order of the classifier.
        num_per_class, guidance_scale, steps, seed: generation settings.
        templates, adjectives: prompt templates and words.
        pad: pixels cropped from each side before classification.
        batch_size: images per pipeline call.
        on_progress: called as ``on_progress("agreement", images_done, images_total)``.
    """
    # 1. check inputs, prompts and seeds
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    specs = build_specs(class_names, num_per_class, templates, adjectives, seed)
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    started = time.perf_counter()

    # 2. generate and classify batch by batch
    grays, predictions = [], []
    try:
        for first in range(0, len(specs), batch_size):
            batch = specs[first : first + batch_size]
            output = pipe(
                prompt=[spec.prompt for spec in batch],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(spec.seed) for spec in batch],
                output_type="pt",
            )
            inputs, gray = to_classifier_input(output.images, pad)
            predictions.append(classifier(inputs.to(device)).argmax(1).cpu())
            grays.append(gray)
            if on_progress is not None:
                on_progress("agreement", first + len(batch), len(specs))
    finally:
        classifier.train(was_training)

    # 3. the fractions
    labels = torch.tensor([spec.class_index for spec in specs])
    predicted = torch.cat(predictions)
    num_classes = len(class_names)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = {
        name: float(confusion[c, c]) / max(1, int(confusion[c].sum()))
        for c, name in enumerate(class_names)
    }
    return Agreement(
        overall=float((predicted == labels).float().mean()),
        per_class=per_class,
        confusion=confusion.tolist(),
        images=torch.cat(grays),
        labels=labels,
        predictions=predicted,
        prompts=[spec.prompt for spec in specs],
        seconds=time.perf_counter() - started,
    )


@dataclass
class _Budget:
    """Step and wall-clock budget of a stage, counted over resumed runs."""

    max_steps: int
    minutes: float | None
    step: int
    seconds_before: float
    stopped_by: str = "steps"
    _since: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self._since

    def done(self) -> bool:
        if self.step >= self.max_steps:
            self.stopped_by = "steps"
            return True
        if self.minutes is not None and self.seconds >= 60.0 * self.minutes:
            self.stopped_by = "minutes"
            return True
        return False

    def advance(self) -> None:
        self.step += 1

    def result(self, loss: float) -> StageResult:
        return StageResult(self.step, self.seconds, loss, self.stopped_by)


@dataclass(frozen=True)
class _Resumed:
    step: int
    seconds: float


class _StageFiles:
    """A stage's checkpoint and loss file in the work directory."""

    def __init__(self, work_dir: Path, name: str) -> None:
        self.name = name
        self.work_dir = work_dir
        self.checkpoint = work_dir / f"{name}_checkpoint.pt"
        self.loss_file = work_dir / f"{name}_loss.csv"

    def start(
        self,
        config: GeneratorTrainConfig,
        resume: bool,
        objects: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> _Resumed:
        """Load the checkpoint into ``objects`` (when resuming and there is one)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and self.checkpoint.is_file()):
            self.checkpoint.unlink(missing_ok=True)
            self.loss_file.unlink(missing_ok=True)
            return _Resumed(0, 0.0)
        saved = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        changed = _changed_fields(GeneratorTrainConfig.from_dict(saved["config"]), config)
        if changed:
            raise ValueError(
                f"{self.checkpoint} was written with other settings ({', '.join(changed)}); "
                "only budgets may change on resume: start afresh without resume"
            )
        for key, value in (extra or {}).items():
            if saved.get(key) != value:
                raise ValueError(
                    f"{self.checkpoint} does not match this run ({key} differs): the VAE or the "
                    "initial weights changed since it was written; delete it to train this "
                    "stage afresh"
                )
        for key, target in objects.items():
            target.load_state_dict(saved[key])
        _truncate_log(self.loss_file, saved["step"])
        logger.info("%s: resumed from %s at step %d", self.name, self.checkpoint, saved["step"])
        return _Resumed(int(saved["step"]), float(saved["seconds"]))

    def save(
        self,
        config: GeneratorTrainConfig,
        budget: _Budget,
        objects: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write the checkpoint atomically (a killed write leaves the previous one)."""
        payload = {
            "config": config.to_dict(),
            "step": budget.step,
            "seconds": budget.seconds,
            **(extra or {}),
            **{key: target.state_dict() for key, target in objects.items()},
        }
        temporary = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        torch.save(payload, temporary)
        os.replace(temporary, self.checkpoint)


class _LossLog:
    """Appends ``step,<values>,seconds`` lines, each the mean over ``every`` steps."""

    def __init__(self, path: Path, names: tuple[str, ...], every: int) -> None:
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        # a resumed stage reports the last loss logged before, until it logs a new one
        self.last_mean = float(lines[-1].split(",")[1]) if len(lines) > 1 else math.nan
        self._handle = path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._handle)
        if not lines:
            self._writer.writerow(["step", *names, "seconds"])
            self._handle.flush()
        self._every = every
        self._sums = [0.0] * len(names)
        self._count = 0

    def add(self, step: int, seconds: float, *values: float) -> None:
        self._sums = [s + v for s, v in zip(self._sums, values, strict=True)]
        self._count += 1
        if step % self._every == 0:
            means = [s / self._count for s in self._sums]
            self.last_mean = means[0]
            self._writer.writerow([step, *(f"{m:.6g}" for m in means), f"{seconds:.1f}"])
            self._handle.flush()
            logger.info("step %d: loss %.5f (%.0f s)", step, means[0], seconds)
            self._sums = [0.0] * len(self._sums)
            self._count = 0

    def close(self) -> None:
        if self._count and math.isnan(self.last_mean):  # fewer steps than one interval
            self.last_mean = self._sums[0] / self._count
        self._handle.close()


class _Ema:
    """Exponential moving average of parameters with diffusers' warm-up decay."""

    def __init__(
        self, parameters: Sequence[nn.Parameter], power: float | None, max_decay: float
    ) -> None:
        self.power = power
        self.max_decay = max_decay
        self.shadow = [p.detach().clone() for p in parameters] if power is not None else []

    @torch.no_grad()
    def update(self, parameters: Sequence[nn.Parameter], step: int) -> None:
        if self.power is None:
            return
        decay = min(self.max_decay, 1.0 - (1.0 + step) ** -self.power)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in parameters], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, parameters: Sequence[nn.Parameter]) -> None:
        if self.power is None:  # no average kept: the raw weights stay
            return
        for shadow, param in zip(self.shadow, parameters, strict=True):
            param.copy_(shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": list(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.power is None:
            return
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            shadow.copy_(saved)


def _caption_ids(
    tokenizer: CLIPTokenizer, config: GeneratorTrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every caption row ``[R, K, L]`` and of the empty caption ``[L]``.

    A row is a class (``R = C``), or with ``config.look_words`` a class and a look (row
    ``class * len(look_words) + look``).

    Tokenized the way ``StableDiffusionPipeline`` tokenizes prompts (padded to the maximum
    length, truncated). Raises ``ValueError`` if a caption would be truncated.
    """

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return torch.as_tensor(ids, dtype=torch.int64)

    looks: tuple[str | None, ...] = config.look_words or (None,)
    per_row = []
    for name, look in itertools.product(CLASS_NAMES, looks):
        captions = training_captions(name, config, look)
        for caption in captions:
            length = len(tokenizer(caption).input_ids)
            if length > tokenizer.model_max_length:
                raise ValueError(
                    f"max_length: caption {caption!r} has {length} tokens, more than "
                    f"{tokenizer.model_max_length}; raise max_length or shorten the templates"
                )
        per_row.append(encode(captions))
    return torch.stack(per_row), encode([""])[0]


def _load_initial_weights(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, init: StableDiffusionPipeline
) -> None:
    """Copy ``init``'s UNet and text encoder weights (any dtype) into the freshly built ones."""
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        try:
            module.load_state_dict(getattr(init, name).state_dict())
        except RuntimeError as error:
            raise ValueError(
                f"init: the {name} differs in size from the config's "
                f"({str(error).splitlines()[0]}); train with the config it was saved with"
            ) from error


def _batch_indices(
    data: GeneratorData, batch_size: int, seed: int, stage: str, step: int
) -> torch.Tensor:
    """Positions in ``data`` of step ``step``'s batch: epochs of seeded permutations, last
    incomplete batch of each epoch dropped."""
    n = len(data.labels)
    per_epoch = n // batch_size
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(_derive_seed(seed, stage, "epoch", epoch))
    order = torch.randperm(n, generator=generator)
    return order[position * batch_size : (position + 1) * batch_size]


def _step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The CPU generator of every random draw of one step."""
    return torch.Generator().manual_seed(_derive_seed(seed, stage, "step", step))


def _derive_seed(seed: int, stage: str, purpose: str, index: int) -> int:
    digest = hashlib.sha256(f"genq-generator:{seed}:{stage}:{purpose}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _set_lr(
    optimizer: torch.optim.Optimizer,
    peak: float,
    step: int,
    total: int,
    config: GeneratorTrainConfig,
) -> None:
    """Linear warm-up to ``peak``, then a cosine down to ``final_lr_fraction * peak`` at
    ``total``; a function of the step alone, so a resumed run continues the same schedule."""
    warmup = config.warmup_steps
    if step < warmup:
        scale = (step + 1) / warmup
    else:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = config.final_lr_fraction
        scale = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = peak * scale


@torch.no_grad()
def _encode_moments(
    vae: AutoencoderKL,
    data: GeneratorData,
    config: GeneratorTrainConfig,
    device: torch.device,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``[N, latent_channels, S, S]`` of the VAE's posterior for each image."""
    images = data.images if limit is None else data.images[:limit]
    means, stds = [], []
    for first in range(0, len(images), _ENCODE_BATCH):
        x = prepare_images(images[first : first + _ENCODE_BATCH], config.pad).to(device)
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _measure_scaling_factor(
    vae: AutoencoderKL, data: GeneratorData, config: GeneratorTrainConfig, device: torch.device
) -> float:
    """``1 / std`` of latents sampled from the posteriors of (up to) 4096 images."""
    mean, std = _encode_moments(vae, data, config, device, limit=_SCALING_SAMPLES)
    generator = torch.Generator().manual_seed(_derive_seed(config.seed, VAE_STAGE, "scale", 0))
    sample = mean + std * torch.randn(mean.shape, generator=generator).to(device)
    return float(1.0 / sample.float().std())


def _state_digest(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _changed_fields(saved: GeneratorTrainConfig, current: GeneratorTrainConfig) -> list[str]:
    before, now = saved.to_dict(), current.to_dict()
    return [name for name in now if name not in _BUDGET_FIELDS and before.get(name) != now[name]]


def _truncate_log(path: Path, step: int) -> None:
    """Drop the loss lines after ``step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    columns = len(lines[0].split(",")) if lines else 0
    kept = lines[:1] + [
        line
        for line in lines[1:]
        if len(fields := line.split(",")) == columns  # not a line cut off by a kill
        and fields[0].isdigit()
        and int(fields[0]) <= step
    ]
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def _check_data(data: GeneratorData, batch_size: int, name: str) -> None:
    if not isinstance(data, GeneratorData):
        raise ValueError(
            f"data must be GeneratorData (the split's generator part), got {type(data).__name__}"
        )
    if len(data.labels) < batch_size:
        raise ValueError(f"{name}={batch_size} is larger than the {len(data.labels)} images")
    if int(data.labels.max()) >= len(CLASS_NAMES):
        raise ValueError(f"labels must be in 0..{len(CLASS_NAMES) - 1}")


def _check_vae(vae: AutoencoderKL, config: GeneratorTrainConfig) -> None:
    if tuple(vae.config["block_out_channels"]) != config.vae_channels:
        raise ValueError(
            f"vae has blocks {tuple(vae.config['block_out_channels'])}, the config "
            f"{config.vae_channels}: train it with train_vae and the same config"
        )
    if int(vae.config["latent_channels"]) != config.latent_channels:
        raise ValueError("vae: latent_channels differ from the config")


def _moved(module: _ModuleT, device: torch.device) -> _ModuleT:
    """``module.to(device)``, in place; diffusers' decorated ``to`` confuses mypy."""
    untyped: Any = module
    untyped.to(device)
    return module


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: object, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {requirement}, got {value!r}")
